package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/statemill/statemill/infra/projection"
	"github.com/statemill/statemill/projections/catalog"
)

// newHTTPClient keeps enough idle connections for every client goroutine:
// each request reuses a kept-alive connection, as a load balancer's would.
func newHTTPClient(conns int) *http.Client {
	return &http.Client{
		Timeout: time.Minute,
		Transport: &http.Transport{
			DialContext:         (&net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			MaxIdleConns:        4 * conns,
			MaxIdleConnsPerHost: 2 * conns,
			IdleConnTimeout:     90 * time.Second,
			DisableCompression:  true,
		},
	}
}

// call sends a request with a JSON body (or none) and expects status want;
// out, when not nil, receives the decoded response.
func call(ctx context.Context, c *http.Client, method, url string, body []byte, want int, out any) error {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, url, err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, url, err)
	}
	defer res.Body.Close()
	if res.StatusCode != want {
		b, _ := io.ReadAll(io.LimitReader(res.Body, 1024))
		return fmt.Errorf("%s %s: status %d, want %d: %s", method, url, res.StatusCode, want, strings.TrimSpace(string(b)))
	}
	if out == nil {
		_, err = io.Copy(io.Discard, res.Body)
	} else {
		err = json.NewDecoder(res.Body).Decode(out)
	}
	if err != nil {
		return fmt.Errorf("%s %s: read response: %w", method, url, err)
	}
	return nil
}

// createProducts creates n products over HTTP with a large inventory, so
// random ±1 adjustments never hit zero and every command is accepted.
func createProducts(ctx context.Context, c *http.Client, base, tag string, n, clients int) ([]string, error) {
	ids := make([]string, n)
	var next atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	for range clients {
		g.Go(func() error {
			for {
				i := int(next.Add(1) - 1)
				if i >= n {
					return nil
				}
				body := fmt.Appendf(nil, `{"name":"%s-%d","price":100,"initial_inventory":1000000}`, tag, i)
				var p struct {
					ID string `json:"id"`
				}
				if err := call(gctx, c, http.MethodPost, base+"/api/products", body, http.StatusCreated, &p); err != nil {
					return err
				}
				ids[i] = p.ID
			}
		})
	}
	if err := g.Wait(); err != nil {
		return nil, fmt.Errorf("create products: %w", err)
	}
	return ids, nil
}

var adjustBodies = [2][]byte{[]byte(`{"adjust_inventory":1}`), []byte(`{"adjust_inventory":-1}`)}

// driveClosed runs clients closed-loop clients (each sends its next command
// when the last one answered) for d, each command an adjust_inventory of a
// random product, and returns the commands done, the time taken, and every
// command's latency.
func driveClosed(ctx context.Context, c *http.Client, base string, ids []string, clients int, d time.Duration) (int, time.Duration, latencies, error) {
	per := make([]latencies, clients)
	g, gctx := errgroup.WithContext(ctx)
	start := time.Now()
	deadline := start.Add(d)
	for i := range clients {
		g.Go(func() error {
			l := make(latencies, 0, 8192)
			for time.Now().Before(deadline) {
				url := base + "/api/products/" + ids[rand.IntN(len(ids))]
				t0 := time.Now()
				if err := call(gctx, c, http.MethodPut, url, adjustBodies[rand.IntN(2)], http.StatusOK, nil); err != nil {
					return err
				}
				l = append(l, time.Since(t0))
			}
			per[i] = l
			return nil
		})
	}
	err := g.Wait()
	elapsed := time.Since(start)
	var all latencies
	for _, l := range per {
		all = append(all, l...)
	}
	return len(all), elapsed, all, err
}

// metricsText fetches a service's /metrics (Prometheus text format).
func metricsText(ctx context.Context, c *http.Client, base string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/metrics", nil)
	if err != nil {
		return "", fmt.Errorf("metrics: %w", err)
	}
	res, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("metrics: %w", err)
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	if err != nil {
		return "", fmt.Errorf("metrics: %w", err)
	}
	if res.StatusCode != http.StatusOK {
		return "", fmt.Errorf("metrics: status %d", res.StatusCode)
	}
	return string(b), nil
}

// metricSum adds the samples of metric name whose labels contain label
// ("" for all).
func metricSum(text, name, label string) float64 {
	var sum float64
	for line := range strings.Lines(text) {
		rest, ok := strings.CutPrefix(line, name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		labels, value := "", strings.TrimSpace(rest)
		if rest[0] == '{' {
			end := strings.IndexByte(rest, '}')
			if end < 0 {
				continue
			}
			labels, value = rest[:end+1], strings.TrimSpace(rest[end+1:])
		}
		if label != "" && !strings.Contains(labels, label) {
			continue
		}
		if f := strings.Fields(value); len(f) > 0 {
			if v, err := strconv.ParseFloat(f[0], 64); err == nil {
				sum += v
			}
		}
	}
	return sum
}

// outboxPending reads statemill_outbox_pending from the products service's
// /metrics: the relay's own count of rows committed but not yet published,
// whichever relay implementation runs.
func outboxPending(ctx context.Context, c *http.Client, base string) (float64, error) {
	text, err := metricsText(ctx, c, base)
	if err != nil {
		return 0, err
	}
	if !strings.Contains(text, "\nstatemill_outbox_pending ") {
		return 0, errors.New("metrics: no statemill_outbox_pending")
	}
	v := metricSum(text, "statemill_outbox_pending", "")
	if v < 0 {
		return 0, errors.New("metrics: statemill_outbox_pending is -1: the relay cannot count its backlog")
	}
	return v, nil
}

// waitOutboxDrained polls the backlog until it is empty and returns how
// long that took.
func waitOutboxDrained(ctx context.Context, c *http.Client, base string, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	last := math.NaN()
	for {
		n, err := outboxPending(ctx, c, base)
		if err != nil {
			return 0, err
		}
		if n == 0 {
			return time.Since(start), nil
		}
		last = n
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("outbox not drained after %s: %.0f rows pending", timeout, last)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-tick.C:
		}
	}
}

// backlogSampler reads the outbox backlog at a fixed interval while a load
// runs.
type backlogSampler struct {
	stop    chan struct{}
	done    chan struct{}
	samples []float64
	err     error
}

func sampleBacklog(ctx context.Context, c *http.Client, base string, every time.Duration) *backlogSampler {
	s := &backlogSampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			n, err := outboxPending(ctx, c, base)
			if err != nil {
				s.err = err
				return
			}
			s.samples = append(s.samples, n)
			select {
			case <-ctx.Done():
				return
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

// finish stops sampling and returns the largest and the last sample.
func (s *backlogSampler) finish() (peak, last float64, err error) {
	close(s.stop)
	<-s.done
	if s.err != nil {
		return 0, 0, s.err
	}
	if len(s.samples) == 0 {
		return 0, 0, errors.New("no backlog sample")
	}
	for _, v := range s.samples {
		peak = max(peak, v)
	}
	return peak, s.samples[len(s.samples)-1], nil
}

// commands is S1: adjust_inventory commands over HTTP, closed loop, with
// the outbox backlog sampled during each run.
func (b *bench) commands(ctx context.Context) error {
	b.logf("S1: commands end to end over HTTP")
	sys, err := b.e.newSystem(ctx, "main")
	if err != nil {
		return err
	}
	b.main = sys
	if err := sys.startProducts(ctx); err != nil {
		return err
	}
	base := sys.products.base
	ids, err := createProducts(ctx, b.client, base, "bench", b.plan.Products, b.plan.Clients)
	if err != nil {
		return fmt.Errorf("S1: %w", err)
	}
	b.ids = ids
	drainTimeout := 10 * time.Minute

	if _, _, _, err := driveClosed(ctx, b.client, base, ids, b.plan.Clients, b.plan.S1Warmup); err != nil {
		return fmt.Errorf("S1 warm-up: %w", err)
	}
	if _, err := waitOutboxDrained(ctx, b.client, base, drainTimeout); err != nil {
		return fmt.Errorf("S1 warm-up: %w", err)
	}
	var rate, p50s, p99s, peaks, finals, drains, cpuMachine, cpuProducts, cpuWait, cpuBench []float64
	for rep := range b.plan.Reps {
		s := sampleBacklog(ctx, b.client, base, b.plan.BacklogEvery)
		mark := markCPU(sys.products)
		n, elapsed, lat, err := driveClosed(ctx, b.client, base, ids, b.plan.Clients, b.plan.S1Duration)
		cpu := mark.since(sys.products)
		peak, final, serr := s.finish()
		if err != nil {
			return fmt.Errorf("S1: %w", err)
		}
		if serr != nil {
			return fmt.Errorf("S1 backlog: %w", serr)
		}
		// Each run starts with an empty outbox, so the runs are alike; how
		// long the relay needs to catch up is a figure of its own.
		drain, err := waitOutboxDrained(ctx, b.client, base, drainTimeout)
		if err != nil {
			return fmt.Errorf("S1: %w", err)
		}
		p50, p99 := lat.p50p99()
		r := float64(n) / elapsed.Seconds()
		b.logf("  S1 rep %d: %d commands in %s: %.0f/s, p50 %.2f ms, p99 %.2f ms; outbox backlog max %.0f, at the end %.0f, drained %s later; CPU: machine %.0f%%, products %.0f%% (waiting for a CPU %.0f%%), bench %.0f%%",
			rep+1, n, elapsed.Round(time.Millisecond), r, p50, p99, peak, final, drain.Round(time.Millisecond), cpu.Machine, cpu.Procs[0], cpu.Waits[0], cpu.Bench)
		cpuMachine, cpuProducts, cpuBench = append(cpuMachine, cpu.Machine), append(cpuProducts, cpu.Procs[0]), append(cpuBench, cpu.Bench)
		cpuWait = append(cpuWait, cpu.Waits[0])
		rate, p50s, p99s = append(rate, r), append(p50s, p50), append(p99s, p99)
		peaks, finals, drains = append(peaks, peak), append(finals, final), append(drains, drain.Seconds())
	}
	c := b.plan.Clients
	b.res.add(
		newFigure("s1_command_throughput", "commands/s", fmt.Sprintf("PUT /api/products/{id} adjust_inventory ±1 over %d products, %d closed-loop keep-alive clients", len(ids), c), rate),
		newFigure("s1_command_latency_p50", "ms", "S1 per-command latency (HTTP request to response), median", p50s),
		newFigure("s1_command_latency_p99", "ms", "S1 per-command latency, 99th percentile", p99s),
		newFigure("s1_outbox_backlog_max", "events", fmt.Sprintf("largest statemill_outbox_pending sampled every %s during an S1 run", b.plan.BacklogEvery), peaks),
		newFigure("s1_outbox_backlog_final", "events", "statemill_outbox_pending when an S1 run ends; a final value near the max of a run that keeps growing with the run's length means the relay falls behind", finals),
		newFigure("s1_outbox_drain_after_load", "s", "time from the end of an S1 run until the outbox is empty", drains),
		newFigure("s1_cpu_machine", "%", "share of all CPUs busy during an S1 run (every process on the machine)", cpuMachine),
		newFigure("s1_cpu_products", "% of a CPU", "CPU used by the products process during an S1 run", cpuProducts),
		newFigure("s1_cpu_wait_products", "% of wall time", "time the products process's threads were ready to run but waited for a CPU (summed over threads)", cpuWait),
		newFigure("s1_cpu_bench", "% of a CPU", "CPU used by the bench (the HTTP load) during an S1 run", cpuBench),
	)
	return nil
}

// projectionLatency is S3: commands at half of S1's throughput, each one's
// commit (its HTTP 200) to the moment the catalog's read model holds its
// version.
func (b *bench) projectionLatency(ctx context.Context) error {
	sys := b.main
	rate := b.res.median("s1_command_throughput") / 2
	if math.IsNaN(rate) || rate <= 0 {
		return errors.New("S3: no S1 throughput to take half of")
	}
	b.logf("S3: commit → applied in the catalog at %.0f commands/s", rate)
	if err := b.e.purgeQueue(sys.topology.UnroutableQueue()); err != nil {
		return fmt.Errorf("S3: %w", err)
	}
	if err := sys.startCatalog(ctx); err != nil {
		return err
	}
	// A new catalog fills itself from history first; measure live applying
	// only.
	if _, err := waitRebuild(ctx, b.client, sys.catalog, "", 15*time.Minute); err != nil {
		return fmt.Errorf("S3: the catalog's first rebuild: %w", err)
	}
	conn, err := pgx.Connect(ctx, sys.catalogDB)
	if err != nil {
		return fmt.Errorf("S3: connect to the catalog database: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	gen := projection.ActiveGenerationSQL(catalog.Schema, sys.catalogName)

	if _, _, err := b.latencyRun(ctx, conn, gen, rate, b.plan.S3Warmup); err != nil {
		return fmt.Errorf("S3 warm-up: %w", err)
	}
	d := max(b.plan.S3Duration, time.Duration(float64(b.plan.S3MinSamples)/rate*float64(time.Second)))
	var p50s, p99s, rates, counts []float64
	for rep := range b.plan.Reps {
		lat, achieved, err := b.latencyRun(ctx, conn, gen, rate, d)
		if err != nil {
			return fmt.Errorf("S3: %w", err)
		}
		p50, p99 := lat.p50p99()
		b.logf("  S3 rep %d: %d commands at %.0f/s: commit → applied p50 %.2f ms, p99 %.2f ms", rep+1, len(lat), achieved, p50, p99)
		p50s, p99s = append(p50s, p50), append(p99s, p99)
		rates, counts = append(rates, achieved), append(counts, float64(len(lat)))
	}
	b.res.add(
		newFigure("s3_projection_latency_p50", "ms", "commit (HTTP 200) → the catalog's read model holds that version, median; polled every 1 ms", p50s),
		newFigure("s3_projection_latency_p99", "ms", "the same, 99th percentile", p99s),
		newFigure("s3_offered_rate", "commands/s", "rate achieved by the rate-limited load (target: half of S1's median)", rates),
		newFigure("s3_samples", "commands", "commands measured per run", counts),
	)
	return nil
}

// awaited is a command whose version the catalog has not shown yet.
type awaited struct {
	version  int64
	commitAt time.Time
}

// latencyTracker pairs commits with the first poll that sees them applied.
type latencyTracker struct {
	mu      sync.Mutex
	pending map[string][]awaited
	lat     latencies
}

func (t *latencyTracker) add(id string, version int64, at time.Time) {
	t.mu.Lock()
	t.pending[id] = append(t.pending[id], awaited{version, at})
	t.mu.Unlock()
}

func (t *latencyTracker) ids() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	ids := make([]string, 0, len(t.pending))
	for id := range t.pending {
		ids = append(ids, id)
	}
	return ids
}

// seen records that a poll that started at polled found id at version:
// every awaited version up to it was applied before that poll's snapshot.
func (t *latencyTracker) seen(id string, version int64, polled time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	keep := t.pending[id][:0]
	for _, a := range t.pending[id] {
		if a.version <= version {
			t.lat = append(t.lat, polled.Sub(a.commitAt))
		} else {
			keep = append(keep, a)
		}
	}
	if len(keep) == 0 {
		delete(t.pending, id)
	} else {
		t.pending[id] = keep
	}
}

// latencyRun offers adjust_inventory commands at rate for d (open loop:
// command i is due at start + i/rate, whatever the earlier ones did) and
// returns each command's commit → applied latency and the rate achieved.
//
// One goroutine polls the catalog's read model every millisecond on its
// own connection for the products with commands awaited. A row seen by a
// poll was applied before the poll's statement started, and was not seen by
// the previous poll, so taking the poll's start time as the applied time
// errs late by at most one poll interval plus a query (≈1.5 ms).
func (b *bench) latencyRun(ctx context.Context, conn *pgx.Conn, gen string, rate float64, d time.Duration) (latencies, float64, error) {
	base := b.main.products.base
	ids := b.ids
	t := &latencyTracker{pending: map[string][]awaited{}}
	total := max(1, int(rate*d.Seconds()))
	interval := time.Duration(float64(time.Second) / rate)

	pollCtx, stopPoll := context.WithCancel(ctx)
	defer stopPoll()
	loadDone := make(chan struct{})
	pollErr := make(chan error, 1)
	go func() { pollErr <- pollApplied(pollCtx, conn, gen, t, loadDone) }()

	var next atomic.Int64
	g, gctx := errgroup.WithContext(ctx)
	start := time.Now()
	for range b.plan.Clients {
		g.Go(func() error {
			for {
				i := next.Add(1) - 1
				if i >= int64(total) {
					return nil
				}
				if err := sleepUntil(gctx, start.Add(time.Duration(i)*interval)); err != nil {
					return err
				}
				id := ids[rand.IntN(len(ids))]
				var p struct {
					Version int64 `json:"version"`
				}
				if err := call(gctx, b.client, http.MethodPut, base+"/api/products/"+id, adjustBodies[rand.IntN(2)], http.StatusOK, &p); err != nil {
					return err
				}
				t.add(id, p.Version, time.Now())
			}
		})
	}
	err := g.Wait()
	achieved := float64(total) / time.Since(start).Seconds()
	close(loadDone)
	if err != nil {
		stopPoll()
		<-pollErr
		return nil, 0, err
	}
	if err := <-pollErr; err != nil {
		return nil, 0, err
	}
	return t.lat, achieved, nil
}

// pollApplied polls until loadDone is closed and nothing is awaited, or
// for at most a minute after the load ended.
func pollApplied(ctx context.Context, conn *pgx.Conn, gen string, t *latencyTracker, loadDone <-chan struct{}) error {
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	var giveUp <-chan time.Time
	query := `SELECT id::text, version FROM catalog.products WHERE generation = ` + gen + ` AND id = ANY($1::uuid[])`
	for {
		ids := t.ids()
		if len(ids) > 0 {
			polled := time.Now()
			rows, err := conn.Query(ctx, query, ids)
			if err != nil {
				return fmt.Errorf("poll the catalog: %w", err)
			}
			var id string
			var version int64
			_, err = pgx.ForEachRow(rows, []any{&id, &version}, func() error {
				t.seen(id, version, polled)
				return nil
			})
			if err != nil {
				return fmt.Errorf("poll the catalog: %w", err)
			}
		}
		select {
		case <-loadDone:
			if len(t.ids()) == 0 {
				return nil
			}
			if giveUp == nil {
				giveUp = time.After(time.Minute)
			}
		default:
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-giveUp:
			return fmt.Errorf("%d commands not applied in the catalog a minute after the load ended", len(t.ids()))
		case <-tick.C:
		}
	}
}

// sleepUntil waits until t or ctx is done.
func sleepUntil(ctx context.Context, t time.Time) error {
	d := time.Until(t)
	if d <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}
