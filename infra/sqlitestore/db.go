// Package sqlitestore is statemill's embedded store: one SQLite file (or an
// in-memory database) through the pure-Go driver modernc.org/sqlite, with
// the same history, transactional outbox, idempotency keys and replay
// requests as pgstore, so a whole system runs with nothing installed.
//
// Every write goes through one connection whose transactions begin
// IMMEDIATE: writers take the write lock at BEGIN, one at a time, so a
// transaction that reads and then writes never fails with "database is
// locked" on the upgrade, and rowid order is commit order (history's
// sequence and the outbox offset are commit-order watermarks here, unlike
// in PostgreSQL). Reads outside commands use a separate pool of read-only
// connections, which WAL lets run beside the writer.
package sqlitestore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" driver
)

// Memory is the Path of a private in-memory database.
const Memory = ":memory:"

// Synchronous settings (PRAGMA synchronous) that WAL mode makes sense with.
const (
	// SynchronousFull syncs the WAL at every commit: a command that
	// answered survives a power loss.
	SynchronousFull = "FULL"
	// SynchronousNormal syncs only at checkpoints: still atomic and safe
	// against a crash of the process, but the last commits can be lost
	// with the machine's power.
	SynchronousNormal = "NORMAL"
)

// Config configures Open. Zero values take the defaults.
type Config struct {
	// Path is the database file, created with its parent directory when
	// missing; or Memory (":memory:") for a database that lives as long as
	// the DB.
	Path string
	// BusyTimeout is how long a statement waits for a lock held by
	// another connection (another process on the same file, a checkpoint)
	// before it fails as unavailable. Default 5s.
	BusyTimeout time.Duration
	// ReadConns is the size of the read-only pool used for reads outside
	// commands (History, Recall, the outbox reader). Default 4.
	ReadConns int
	// OneConnection makes reads share the writer's connection (always so
	// for a Memory database). Measured with 8 command goroutines and 4
	// paced readers on a 2-core machine, it commits 2-4x more commands per
	// second, but reads wait behind the queued commands (median 5-7ms
	// instead of under 1ms) and a long read stalls every command; so the
	// default is the read pool. See BenchmarkConnectionModes.
	OneConnection bool
	// Synchronous is SynchronousFull (default) or SynchronousNormal.
	Synchronous string
}

func (c Config) withDefaults() Config {
	if c.BusyTimeout == 0 {
		c.BusyTimeout = 5 * time.Second
	}
	if c.ReadConns == 0 {
		c.ReadConns = 4
	}
	if c.Synchronous == "" {
		c.Synchronous = SynchronousFull
	}
	c.Synchronous = strings.ToUpper(c.Synchronous)
	return c
}

// Validate reports a config Open cannot use.
func (c Config) Validate() error {
	var errs []error
	if strings.TrimSpace(c.Path) == "" {
		errs = append(errs, errors.New("sqlitestore: Path is empty (a file, or \":memory:\")"))
	}
	if strings.ContainsAny(c.Path, "?#") {
		// Looks like a URI query or fragment, which Path is not: refuse
		// rather than create a file of that odd name.
		errs = append(errs, fmt.Errorf("sqlitestore: Path %q must not contain '?' or '#'", c.Path))
	}
	if c.BusyTimeout < 0 {
		errs = append(errs, errors.New("sqlitestore: BusyTimeout must not be negative"))
	}
	if c.ReadConns < 0 {
		errs = append(errs, errors.New("sqlitestore: ReadConns must not be negative"))
	}
	switch strings.ToUpper(c.Synchronous) {
	case "", SynchronousFull, SynchronousNormal:
	default:
		errs = append(errs, fmt.Errorf("sqlitestore: Synchronous %q is neither FULL nor NORMAL", c.Synchronous))
	}
	return errors.Join(errs...)
}

// DB is an open SQLite database: the single writer connection, the reader
// pool, and the notifier that wakes relays after commits that wrote to the
// outbox. It is safe for concurrent use.
type DB struct {
	writer *sql.DB
	reader *sql.DB // the writer itself for a Memory database or OneConnection
	path   string
	wake   notifier
}

// Open opens (creating when missing) the database of c, applies the
// connection settings and checks that the file can be used. It does not
// migrate: call Migrate.
func Open(ctx context.Context, c Config) (*DB, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	c = c.withDefaults()
	db := &DB{path: c.Path}
	db.wake.init()
	memory := c.Path == Memory

	pragmas := []string{
		fmt.Sprintf("busy_timeout(%d)", c.BusyTimeout.Milliseconds()),
		"foreign_keys(1)",
	}
	var name string
	if memory {
		name = ":memory:"
	} else {
		abs, err := filepath.Abs(c.Path)
		if err != nil {
			return nil, fmt.Errorf("sqlitestore: path %q: %w", c.Path, err)
		}
		if err := os.MkdirAll(filepath.Dir(abs), 0o755); err != nil {
			return nil, fmt.Errorf("sqlitestore: create the directory of %s: %w", abs, err)
		}
		name = abs
		db.path = abs
	}

	// journal_mode is a property of the file and needs no other connection
	// open to change, so the writer sets it before the readers connect.
	writerPragmas := append(append([]string(nil), pragmas...), "journal_mode(WAL)", "synchronous("+c.Synchronous+")")
	writer, err := sql.Open("sqlite", dsn(name, writerPragmas, true))
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: open %s: %w", c.Path, err)
	}
	// One writer: transactions queue in database/sql (each waiting with
	// its own context) instead of spinning in SQLite's busy handler. Kept
	// open forever, which a Memory database needs to keep its data.
	writer.SetMaxOpenConns(1)
	writer.SetMaxIdleConns(1)
	writer.SetConnMaxLifetime(0)
	writer.SetConnMaxIdleTime(0)
	if err := writer.PingContext(ctx); err != nil {
		_ = writer.Close()
		return nil, Classify(fmt.Errorf("sqlitestore: open %s: %w", c.Path, err))
	}
	db.writer, db.reader = writer, writer
	if memory || c.OneConnection {
		return db, nil
	}

	// query_only: a write through the reader pool is a bug, and would
	// also break the single-writer ordering.
	reader, err := sql.Open("sqlite", dsn(name, append(pragmas, "query_only(1)"), false))
	if err != nil {
		_ = writer.Close()
		return nil, fmt.Errorf("sqlitestore: open %s: %w", c.Path, err)
	}
	reader.SetMaxOpenConns(c.ReadConns)
	reader.SetMaxIdleConns(c.ReadConns)
	if err := reader.PingContext(ctx); err != nil {
		_ = reader.Close()
		_ = writer.Close()
		return nil, Classify(fmt.Errorf("sqlitestore: open %s: %w", c.Path, err))
	}
	db.reader = reader
	return db, nil
}

// dsn is the driver's URI for name with the given pragmas; writer
// transactions begin IMMEDIATE.
func dsn(name string, pragmas []string, immediate bool) string {
	q := url.Values{}
	for _, p := range pragmas {
		q.Add("_pragma", p)
	}
	if immediate {
		q.Set("_txlock", "immediate")
	}
	if name == Memory {
		return "file::memory:?" + q.Encode()
	}
	// A file: URI escapes what the path holds (spaces, '%').
	u := url.URL{Scheme: "file", Path: name, RawQuery: q.Encode()}
	return u.String()
}

// Path is the database file's absolute path, or Memory.
func (db *DB) Path() string { return db.path }

// Writer is the single write connection. Every write outside InTx (a
// domain's maintenance, a relay's offsets) must go through it too, or the
// commit-order guarantee is lost.
func (db *DB) Writer() *sql.DB { return db.writer }

// Reader is the read-only pool for queries outside commands. For a Memory
// database, or with OneConnection, it is the writer: then do not use it
// inside InTx's fn, which holds the only connection.
func (db *DB) Reader() *sql.DB { return db.reader }

// Close closes both pools and wakes every waiting relay, which then finds
// the database closed.
func (db *DB) Close() error {
	var errs []error
	if db.reader != db.writer {
		errs = append(errs, db.reader.Close())
	}
	errs = append(errs, db.writer.Close())
	db.wake.notify()
	return errors.Join(errs...)
}

// notifier is a broadcast without lost wake-ups: a waiter takes the channel
// first, then looks for work, then waits; notify closes the channel and
// replaces it, so a notify between the look and the wait still wakes.
type notifier struct {
	mu sync.Mutex
	ch chan struct{}
}

func (n *notifier) init() { n.ch = make(chan struct{}) }

func (n *notifier) wait() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.ch
}

func (n *notifier) notify() {
	n.mu.Lock()
	defer n.mu.Unlock()
	close(n.ch)
	n.ch = make(chan struct{})
}
