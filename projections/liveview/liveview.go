// Package liveview is the in-memory Product read model behind the live web
// page: the newest state of every product, a numbered stream of changes
// that a browser can resume from (Last-Event-ID), and an in-process fan-out
// to any number of watchers. It is a projection.MemoryProjection: a
// projection.View keeps it current from one broker queue per process and
// refills it from a latest replay after every (re)connect.
package liveview

import (
	"cmp"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/statemill/statemill/events"
	"github.com/statemill/statemill/infra/envelope"
)

// DefaultHistory is how many recent changes a Model keeps for resuming
// watchers by default.
const DefaultHistory = 1024

// Product is one product as the page shows it.
type Product struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Price     int64     `json:"price"` // cents
	Inventory int64     `json:"inventory"`
	State     string    `json:"state"`
	Version   int64     `json:"version"`
	UpdatedAt time.Time `json:"updated_at"` // occurred_at of the transition that made this version
}

// Change is one applied transition: the product as it is after it.
type Change struct {
	Seq     uint64  `json:"seq"`
	Event   string  `json:"event"`
	From    string  `json:"from"`
	To      string  `json:"to"`
	Product Product `json:"product"`
}

// Snapshot is the whole model at one point of the change stream.
type Snapshot struct {
	Epoch    string         `json:"epoch"`
	Seq      uint64         `json:"seq"`
	Products []Product      `json:"products"` // by name, then id
	Counts   map[string]int `json:"counts"`   // products per state, every state of the machine listed
}

// Status is the state of the feed behind the model, for watchers to show.
type Status struct {
	// Connected: the model's feed consumes from the broker.
	Connected bool `json:"connected"`
	// Replaying: the model was emptied and is being refilled from history.
	Replaying bool `json:"replaying"`
}

// Config configures a Model.
type Config struct {
	// Epoch names this instance of the change stream: change ids are
	// "<epoch>-<seq>", and an id of another epoch (a previous process) is
	// unknown. Default: 8 random hex digits. It must match [a-z0-9]{1,32}.
	Epoch string
	// History is how many recent changes are kept for watchers that resume
	// or fall behind; older ones get a fresh snapshot. Default 1024.
	History int
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

var epochPattern = regexp.MustCompile(`^[a-z0-9]{1,32}$`)

// Validate reports a configuration the model cannot use.
func (c Config) Validate() error {
	var errs []error
	if c.Epoch != "" && !epochPattern.MatchString(c.Epoch) {
		errs = append(errs, fmt.Errorf("liveview: epoch %q must match %s", c.Epoch, epochPattern))
	}
	if c.History < 0 {
		errs = append(errs, errors.New("liveview: history must not be negative"))
	}
	return errors.Join(errs...)
}

// Model is the live Product read model. It is safe for concurrent use:
// one writer (the view) and any number of readers and watchers.
type Model struct {
	epoch string
	log   *slog.Logger

	mu        sync.RWMutex
	products  map[string]Product
	seq       uint64
	ring      ring
	status    Status
	malformed int64
	watchers  map[*Watcher]struct{}
}

// New returns an empty model.
func New(c Config) (*Model, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if c.Epoch == "" {
		b := make([]byte, 4)
		if _, err := rand.Read(b); err != nil {
			return nil, fmt.Errorf("liveview: epoch: %w", err)
		}
		c.Epoch = hex.EncodeToString(b)
	}
	if c.History == 0 {
		c.History = DefaultHistory
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return &Model{
		epoch:    c.Epoch,
		log:      c.Logger,
		products: map[string]Product{},
		ring:     ring{buf: make([]Change, c.History)},
		status:   Status{Replaying: true},
		watchers: map[*Watcher]struct{}{},
	}, nil
}

// Epoch is the model's epoch.
func (m *Model) Epoch() string { return m.epoch }

// EventID is the stream id of the point after change seq: "<epoch>-<seq>".
func (m *Model) EventID(seq uint64) string { return m.epoch + "-" + strconv.FormatUint(seq, 10) }

// Apply applies Product events, newest version winning: an event whose
// version is not newer than the product's changes nothing, so duplicates
// and late arrivals are harmless. Events of other entity types, and ones
// whose attributes cannot be read, are skipped (logged).
func (m *Model) Apply(evs []envelope.Event) {
	changed := false
	m.mu.Lock()
	for _, e := range evs {
		if e.EntityType != events.EntityType {
			continue
		}
		var a events.ProductAttributes
		if err := e.DecodeAttributes(&a); err != nil {
			m.malformed++
			m.log.Warn("liveview: skipped an event whose attributes cannot be read", "event_id", e.ID, "err", err)
			continue
		}
		if cur, ok := m.products[e.EntityID]; ok && cur.Version >= e.Version {
			continue
		}
		p := Product{
			ID: e.EntityID, Name: a.Name, Price: a.Price, Inventory: a.Inventory,
			// The transition's target is the state; the attributes carry
			// the same, and stand in for an event without one.
			State:   cmp.Or(e.To, a.State),
			Version: e.Version, UpdatedAt: e.OccurredAt.UTC(),
		}
		m.products[e.EntityID] = p
		m.seq++
		m.ring.push(Change{Seq: m.seq, Event: e.Event, From: e.From, To: e.To, Product: p})
		changed = true
	}
	m.mu.Unlock()
	if changed {
		m.notify()
	}
}

// Reset empties the model. It is a change of its own: watchers cannot resume
// across it and get a fresh snapshot.
func (m *Model) Reset() {
	m.mu.Lock()
	clear(m.products)
	m.seq++
	m.ring.reset()
	m.mu.Unlock()
	m.notify()
}

// SetStatus records the feed's status and wakes the watchers when it
// changed.
func (m *Model) SetStatus(s Status) {
	m.mu.Lock()
	changed := m.status != s
	m.status = s
	m.mu.Unlock()
	if changed {
		m.notify()
	}
}

// Status is the feed's status as last set.
func (m *Model) Status() Status {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.status
}

// Len is the number of products.
func (m *Model) Len() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.products)
}

// Malformed is the number of events skipped because their attributes could
// not be read.
func (m *Model) Malformed() int64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.malformed
}

// Snapshot returns every product and the stream position it reflects.
func (m *Model) Snapshot() Snapshot {
	m.mu.RLock()
	defer m.mu.RUnlock()
	ps := make([]Product, 0, len(m.products)) // [] in JSON when empty, not null
	ps = slices.AppendSeq(ps, maps.Values(m.products))
	slices.SortFunc(ps, func(a, b Product) int {
		return cmp.Or(strings.Compare(strings.ToLower(a.Name), strings.ToLower(b.Name)), strings.Compare(a.ID, b.ID))
	})
	return Snapshot{Epoch: m.epoch, Seq: m.seq, Products: ps, Counts: m.countsLocked()}
}

// Product returns one product.
func (m *Model) Product(id string) (Product, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	p, ok := m.products[id]
	return p, ok
}

// Counts returns the number of products per state, with every state of the
// Product machine present (0 when empty).
func (m *Model) Counts() map[string]int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.countsLocked()
}

func (m *Model) countsLocked() map[string]int {
	c := make(map[string]int, len(events.ProductMachine.States))
	for _, s := range events.ProductMachine.States {
		c[s] = 0
	}
	for _, p := range m.products {
		c[p.State]++
	}
	return c
}

// Since returns the changes after seq, oldest first, and the seq they end at.
// ok is false when the model cannot tell what happened since seq (it is
// older than the history kept, from before a Reset, or from the future):
// the watcher then needs a Snapshot.
func (m *Model) Since(seq uint64) (changes []Change, last uint64, ok bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if seq > m.seq {
		return nil, 0, false
	}
	if seq == m.seq {
		return nil, seq, true
	}
	changes, ok = m.ring.since(seq)
	if !ok {
		return nil, 0, false
	}
	return changes, m.seq, true
}

// Resume is Since for a stream id ("<epoch>-<seq>", as EventID makes): ok is
// false for an id of another epoch, a malformed one, or one Since cannot
// serve.
func (m *Model) Resume(id string) (changes []Change, last uint64, ok bool) {
	epoch, seqText, found := strings.Cut(id, "-")
	if !found || epoch != m.epoch {
		return nil, 0, false
	}
	seq, err := strconv.ParseUint(seqText, 10, 64)
	if err != nil {
		return nil, 0, false
	}
	return m.Since(seq)
}

// Watcher is woken whenever the model or its status changes. It never
// blocks the model: a wake-up is a flag, not a queue, and the watcher reads
// what it missed with Since. A watcher too slow to keep up falls out of the
// history kept, gets ok=false from Since, and must start again from a
// Snapshot: a slow client is dropped back to a snapshot, never waited for.
type Watcher struct {
	m *Model
	c chan struct{}
}

// Watch registers a watcher; Close unregisters it.
func (m *Model) Watch() *Watcher {
	w := &Watcher{m: m, c: make(chan struct{}, 1)}
	m.mu.Lock()
	m.watchers[w] = struct{}{}
	m.mu.Unlock()
	return w
}

// C receives a value after changes; several changes may share one.
func (w *Watcher) C() <-chan struct{} { return w.c }

// Close unregisters the watcher. It is idempotent.
func (w *Watcher) Close() {
	w.m.mu.Lock()
	delete(w.m.watchers, w)
	w.m.mu.Unlock()
}

// Watchers is the number of registered watchers.
func (m *Model) Watchers() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return len(m.watchers)
}

func (m *Model) notify() {
	m.mu.RLock()
	defer m.mu.RUnlock()
	for w := range m.watchers {
		select {
		case w.c <- struct{}{}:
		default: // already woken; it reads everything it missed at once
		}
	}
}

// ring keeps the newest len(buf) changes, whose seqs are consecutive.
type ring struct {
	buf   []Change
	start int // index of the oldest change
	n     int
}

func (r *ring) push(c Change) {
	if len(r.buf) == 0 {
		return
	}
	if r.n < len(r.buf) {
		r.buf[(r.start+r.n)%len(r.buf)] = c
		r.n++
		return
	}
	r.buf[r.start] = c
	r.start = (r.start + 1) % len(r.buf)
}

func (r *ring) reset() {
	clear(r.buf)
	r.start, r.n = 0, 0
}

// since returns the changes after seq when the ring still holds the one
// right after it.
func (r *ring) since(seq uint64) ([]Change, bool) {
	if r.n == 0 {
		return nil, false
	}
	first := r.buf[r.start].Seq
	if seq+1 < first {
		return nil, false
	}
	skip := int(seq + 1 - first)
	out := make([]Change, 0, r.n-skip)
	for i := skip; i < r.n; i++ {
		out = append(out, r.buf[(r.start+i)%len(r.buf)])
	}
	return out, true
}
