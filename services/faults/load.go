package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Kinds of command the load sends.
type cmdKind uint8

const (
	kindCreate cmdKind = iota
	kindAdd
	kindReduce
	kindDiscontinue
)

func (k cmdKind) String() string {
	return [...]string{"create", "add_inventory", "reduce_inventory", "discontinue"}[k]
}

// Outcomes of a command, in Jepsen's terms: acknowledged (2xx, so
// committed), rejected (a 4xx: the system refused it, nothing changed), or
// indeterminate (no answer before the deadline: it may or may not have
// happened, but never half).
type outcome uint8

const (
	outcomePending outcome = iota
	outcomeAcked
	outcomeRejected
	outcomeIndeterminate
)

// command is one command of the load and what became of it.
type command struct {
	kind     cmdKind
	key      string // Idempotency-Key and X-Request-ID (so the correlation id of its events)
	product  int    // index into load.products
	amount   int64  // the adjustment, or a create's initial inventory
	outcome  outcome
	status   int    // the last HTTP status
	id       string // the product id the answer names
	version  int64  // the product version the answer names
	attempts int
	took     time.Duration // from the first attempt to the outcome
}

// product is what the clients know about a product, from the answers.
type product struct {
	id           string
	inventory    int64
	version      int64
	discontinued bool
}

type loadConfig struct {
	commands int
	products int // the first commands create this many products
	clients  int
	// duration paces the load: command i is sent no earlier than
	// i*duration/commands after the start, so the faults of a scenario
	// happen while commands flow.
	duration time.Duration
	// deadline bounds one command, retries included.
	deadline time.Duration
	prefix   string // unique to the scenario run: product names and keys
	seed     uint64
	gates    []float64 // see scenario.gates
}

// load drives the products API with concurrent clients. Every command
// carries a unique Idempotency-Key and is retried with it on network
// errors, timeouts and 5xx until it is answered or its deadline passes.
type load struct {
	cfg    loadConfig
	target *service
	client *http.Client
	cmds   []command

	started       atomic.Int64 // commands sent at least once (attempted)
	createsDone   atomic.Int64 // creates with an outcome
	acked         atomic.Int64
	rejected      atomic.Int64
	indeterminate atomic.Int64
	retries       atomic.Int64
	serverErrors  atomic.Int64 // 5xx answers other than 503
	count503      atomic.Int64
	max503        atomic.Int64 // nanoseconds
	hung          atomic.Int64 // attempts answered after hungAfter, or not at all within the client timeout
	maxAttempt    atomic.Int64 // nanoseconds: the slowest single attempt
	finished      chan struct{}
	startedAt     time.Time
	began         atomic.Int64 // steps of the fault begun so far (gates)

	mu           sync.Mutex
	products     []product
	ready        []int // indexes of created products
	rejections   map[string]int
	rejectSample []string // the first two answers of each kind of rejection
	serverSample []string // the first few unexpected 5xx answers
}

func newLoad(cfg loadConfig, target *service) *load {
	return &load{
		cfg:    cfg,
		target: target,
		client: &http.Client{
			Timeout:   10 * time.Second,
			Transport: &http.Transport{MaxIdleConnsPerHost: cfg.clients, IdleConnTimeout: 30 * time.Second},
		},
		cmds:       make([]command, cfg.commands),
		products:   make([]product, cfg.products),
		rejections: map[string]int{},
		finished:   make(chan struct{}),
	}
}

// run sends every command and returns when each has an outcome.
func (l *load) run(ctx context.Context) {
	defer close(l.finished)
	l.startedAt = time.Now()
	jobs := make(chan int)
	var wg sync.WaitGroup
	for c := range l.cfg.clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(l.cfg.seed, uint64(c)))
			for i := range jobs {
				l.execute(ctx, rng, i)
			}
		}()
	}
	interval := l.cfg.duration / time.Duration(max(1, l.cfg.commands))
	timer := time.NewTimer(0)
	defer timer.Stop()
	gate := 0
dispatch:
	for i := range l.cfg.commands {
		for gate < len(l.cfg.gates) && i >= int(l.cfg.gates[gate]*float64(l.cfg.commands)) {
			gate++
			if err := l.awaitFault(ctx, gate); err != nil {
				break dispatch
			}
		}
		if d := time.Until(l.startedAt.Add(time.Duration(i) * interval)); d > 0 {
			timer.Reset(d)
			select {
			case <-ctx.Done():
				break dispatch
			case <-timer.C:
			}
		}
		select {
		case <-ctx.Done():
			break dispatch
		case jobs <- i:
		}
	}
	close(jobs)
	wg.Wait()
}

// faultBegan records that a step of the fault began (see scenario.gates).
func (l *load) faultBegan() { l.began.Add(1) }

// awaitFault waits until n steps of the fault began. A fault that never
// comes (its script failed) holds the load back for two minutes at most;
// the scenario then reports its error.
func (l *load) awaitFault(ctx context.Context, n int) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	limit := time.NewTimer(2 * time.Minute)
	defer limit.Stop()
	for l.began.Load() < int64(n) {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-limit.C:
			return nil
		case <-t.C:
		}
	}
	return nil
}

// reached waits until frac of the commands were sent (or the load ended).
func (l *load) reached(ctx context.Context, frac float64) error {
	target := int64(frac * float64(l.cfg.commands))
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for l.started.Load() < target {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-l.finished:
			return nil
		case <-t.C:
		}
	}
	return nil
}

// since is the time since the load started, for fault timelines.
func (l *load) since() float64 { return time.Since(l.startedAt).Seconds() }

// plan decides what command i does.
func (l *load) plan(ctx context.Context, rng *rand.Rand, i int) (method, path string, body []byte, c *command, err error) {
	c = &l.cmds[i]
	c.key = fmt.Sprintf("%s-c%06d", l.cfg.prefix, i)
	if i < l.cfg.products {
		c.kind, c.product = kindCreate, i
		if i%2 == 0 {
			c.amount = 1 + rng.Int64N(20)
		}
		body, _ = json.Marshal(map[string]any{"name": fmt.Sprintf("%s-p%04d", l.cfg.prefix, i), "price": 100 + i, "initial_inventory": c.amount})
		return http.MethodPost, "/api/products", body, c, nil
	}
	p, err := l.pick(ctx, rng)
	if err != nil {
		return "", "", nil, nil, err
	}
	c.product = p.index
	switch r := rng.Float64(); {
	case r < 0.005:
		c.kind = kindDiscontinue
		return http.MethodDelete, "/api/products/" + p.id, nil, c, nil
	case r < 0.62 || p.inventory < 3:
		c.kind, c.amount = kindAdd, 1+rng.Int64N(9)
	default:
		c.kind, c.amount = kindReduce, -1-rng.Int64N(3)
	}
	body, _ = json.Marshal(map[string]int64{"adjust_inventory": c.amount})
	return http.MethodPut, "/api/products/" + p.id, body, c, nil
}

type picked struct {
	index     int
	id        string
	inventory int64
}

// pick chooses a created, not discontinued product, waiting for the first
// creates to be answered. When every product is discontinued it picks one
// anyway (the command is then refused with 409, which is an outcome too).
func (l *load) pick(ctx context.Context, rng *rand.Rand) (picked, error) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		l.mu.Lock()
		if n := len(l.ready); n > 0 {
			start := rng.IntN(n)
			for k := range n {
				idx := l.ready[(start+k)%n]
				if p := l.products[idx]; !p.discontinued || k == n-1 {
					l.mu.Unlock()
					return picked{idx, p.id, p.inventory}, nil
				}
			}
		}
		l.mu.Unlock()
		if l.createsDone.Load() == int64(l.cfg.products) {
			return picked{}, errors.New("no product could be created")
		}
		select {
		case <-ctx.Done():
			return picked{}, ctx.Err()
		case <-t.C:
		}
	}
}

// answer is the part of a product answer the checks need.
type answer struct {
	ID        string `json:"id"`
	Inventory int64  `json:"inventory"`
	State     string `json:"state"`
	Version   int64  `json:"version"`
}

// problem is the part of a problem-details answer the report shows.
type problem struct {
	Title  string `json:"title"`
	Detail string `json:"detail"`
}

func (l *load) execute(ctx context.Context, rng *rand.Rand, i int) {
	method, path, body, c, err := l.plan(ctx, rng, i)
	if err != nil {
		return // the load is stopping: never sent, not attempted
	}
	l.started.Add(1)
	began := time.Now()
	defer func() {
		c.took = time.Since(began)
		if c.kind == kindCreate {
			l.createsDone.Add(1)
		}
	}()
	deadline := began.Add(l.cfg.deadline)
	backoff := 50 * time.Millisecond
	for {
		c.attempts++
		if c.attempts > 1 {
			l.retries.Add(1)
		}
		status, resp, latency, err := l.send(ctx, method, path, body, c.key)
		c.status = status
		storeMax(&l.maxAttempt, int64(latency))
		if latency > hungAfter {
			l.hung.Add(1)
		}
		switch {
		case err != nil:
			// no answer: retry with the same key
		case status/100 == 2:
			var a answer
			if jerr := json.Unmarshal(resp, &a); jerr != nil || a.ID == "" || a.Version < 1 {
				l.noteServerError(method, path, status, resp)
				c.outcome = outcomeIndeterminate
				l.indeterminate.Add(1)
				return
			}
			c.outcome, c.id, c.version = outcomeAcked, a.ID, a.Version
			l.acked.Add(1)
			l.learn(c, a)
			return
		case status == http.StatusServiceUnavailable:
			l.count503.Add(1)
			storeMax(&l.max503, int64(latency))
		case status >= 500 || status == http.StatusTooManyRequests || status == http.StatusRequestTimeout:
			l.noteServerError(method, path, status, resp)
		default:
			c.outcome = outcomeRejected
			l.rejected.Add(1)
			var p problem
			_ = json.Unmarshal(resp, &p)
			l.mu.Lock()
			k := fmt.Sprintf("%s %d %s", c.kind, status, p.Title)
			if l.rejections[k]++; l.rejections[k] <= 2 {
				l.rejectSample = append(l.rejectSample, fmt.Sprintf("%s %s (attempt %d): %s", c.key, k, c.attempts, p.Detail))
			}
			l.mu.Unlock()
			return
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			c.outcome = outcomeIndeterminate
			l.indeterminate.Add(1)
			return
		}
		if !wait(ctx, backoff/2+rand.N(backoff/2+1)) {
			c.outcome = outcomeIndeterminate
			l.indeterminate.Add(1)
			return
		}
		backoff = min(2*backoff, time.Second)
	}
}

// hungAfter is how long an attempt may take before it counts as hung: a
// command commits in milliseconds, and one that cannot (the database is
// down) must be answered 503 quickly (DESIGN §4).
const hungAfter = 5 * time.Second

func storeMax(a *atomic.Int64, v int64) {
	for {
		old := a.Load()
		if v <= old || a.CompareAndSwap(old, v) {
			return
		}
	}
}

// latencies returns the p50, p99 and max of the commands' times to their
// outcome, in milliseconds.
func (l *load) latencies() (p50, p99, maxMs float64) {
	var ds []time.Duration
	for i := range l.cmds {
		if c := &l.cmds[i]; c.outcome != outcomePending {
			ds = append(ds, c.took)
		}
	}
	if len(ds) == 0 {
		return 0, 0, 0
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	ms := func(d time.Duration) float64 { return round(float64(d) / float64(time.Millisecond)) }
	return ms(ds[len(ds)/2]), ms(ds[len(ds)*99/100]), ms(ds[len(ds)-1])
}

func (l *load) noteServerError(method, path string, status int, body []byte) {
	if status >= 500 && status != http.StatusServiceUnavailable || status/100 == 2 {
		l.serverErrors.Add(1)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.serverSample) < 5 {
		l.serverSample = append(l.serverSample, fmt.Sprintf("%s %s → %d %s", method, path, status, bytes.TrimSpace(body)))
	}
}

// learn records what an answer says about its product.
func (l *load) learn(c *command, a answer) {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := &l.products[c.product]
	if c.kind == kindCreate && p.id == "" {
		p.id = a.ID
		l.ready = append(l.ready, c.product)
	}
	if a.Version > p.version {
		p.version, p.inventory = a.Version, a.Inventory
		p.discontinued = a.State == "discontinued"
	}
}

// send makes one attempt. err means no answer (connection refused or
// reset, timeout).
func (l *load) send(ctx context.Context, method, path string, body []byte, key string) (int, []byte, time.Duration, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, l.target.base+path, rd)
	if err != nil {
		return 0, nil, 0, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set("Idempotency-Key", key)
	req.Header.Set("X-Request-ID", key)
	start := time.Now()
	res, err := l.client.Do(req)
	if err != nil {
		return 0, nil, time.Since(start), err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(io.LimitReader(res.Body, 1<<20))
	latency := time.Since(start)
	if err != nil {
		return 0, nil, latency, err
	}
	return res.StatusCode, b, latency, nil
}

// rejectionSummary lists the rejections by kind, status and title.
func (l *load) rejectionSummary() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]string, 0, len(l.rejections))
	for k, n := range l.rejections {
		out = append(out, fmt.Sprintf("%s: %d", k, n))
	}
	sort.Strings(out)
	return append(out, l.rejectSample...)
}

func (l *load) serverErrorSample() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.serverSample...)
}

// keyOf maps a correlation id back to its command.
func (l *load) index() map[string]*command {
	m := make(map[string]*command, len(l.cmds))
	for i := range l.cmds {
		if c := &l.cmds[i]; c.key != "" {
			m[c.key] = c
		}
	}
	return m
}

// kindCounts is the number of acknowledged commands per kind.
func (l *load) kindCounts() map[string]int {
	m := map[string]int{}
	for i := range l.cmds {
		if c := &l.cmds[i]; c.outcome == outcomeAcked {
			m[strings.ReplaceAll(c.kind.String(), "_inventory", "")]++
		}
	}
	return m
}
