package sqlitestore_test

import (
	"context"
	"database/sql"
	"fmt"
	"net/url"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/sqlitestore"
)

// BenchmarkConnectionModes measures the connection layouts the store could
// use, on the same file and schema, with 8 goroutines running commands
// (read the entity, then write it, its history row and its outbox row)
// while 4 goroutines read history every 5ms each. It reports commands/s,
// history reads/s with their latency, and failed commands; the store uses
// "1writer-immediate+readers".
//
//	go test -run '^$' -bench ConnectionModes -benchtime 2000x ./infra/sqlitestore
func BenchmarkConnectionModes(b *testing.B) {
	modes := []struct {
		name         string
		writers      int
		txlock       string
		readers      int // 0: reads share the writer pool
		synchronous  string
		pacedReaders int
	}{
		{"1writer-immediate-no-reads", 1, "immediate", 4, "FULL", 0},
		{"1writer-immediate+readers", 1, "immediate", 4, "FULL", 4},
		{"1writer-immediate+readers-syncNORMAL", 1, "immediate", 4, "NORMAL", 4},
		{"one-connection-for-all", 1, "immediate", 0, "FULL", 4},
		{"one-connection-for-all-syncNORMAL", 1, "immediate", 0, "NORMAL", 4},
		{"4writers-immediate+readers", 4, "immediate", 4, "FULL", 4},
		{"4writers-deferred+readers", 4, "deferred", 4, "FULL", 4},
	}
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) {
			path := tempPath(b)
			db, err := sqlitestore.Open(context.Background(), sqlitestore.Config{Path: path})
			if err != nil {
				b.Fatal(err)
			}
			if err := sqlitestore.Migrate(context.Background(), db, sqlitestore.Framework()); err != nil {
				b.Fatal(err)
			}
			if _, err := db.Writer().Exec(`CREATE TABLE w (id TEXT PRIMARY KEY, version INTEGER NOT NULL)`); err != nil {
				b.Fatal(err)
			}
			_ = db.Close()

			dsn := func(extra ...string) string {
				q := url.Values{}
				q.Add("_pragma", "busy_timeout(5000)")
				q.Add("_pragma", "journal_mode(WAL)")
				q.Add("_pragma", "synchronous("+m.synchronous+")")
				for _, e := range extra {
					q.Add("_pragma", e)
				}
				q.Set("_txlock", m.txlock)
				return (&url.URL{Scheme: "file", Path: path, RawQuery: q.Encode()}).String()
			}
			writer, err := sql.Open("sqlite", dsn())
			if err != nil {
				b.Fatal(err)
			}
			defer writer.Close()
			writer.SetMaxOpenConns(m.writers)
			writer.SetMaxIdleConns(m.writers)
			reader := writer
			if m.readers > 0 {
				if reader, err = sql.Open("sqlite", dsn("query_only(1)")); err != nil {
					b.Fatal(err)
				}
				defer reader.Close()
				reader.SetMaxOpenConns(m.readers)
				reader.SetMaxIdleConns(m.readers)
			}
			ids := make([]string, 16)
			for i := range ids {
				ids[i] = uuid.NewString()
				if _, err := writer.Exec(`INSERT INTO w (id, version) VALUES (?, 0)`, ids[i]); err != nil {
					b.Fatal(err)
				}
			}

			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var reads, failed atomic.Int64
			var firstErr atomic.Value
			var readers sync.WaitGroup
			var latMu sync.Mutex
			var latencies []time.Duration
			for r := range m.pacedReaders {
				readers.Go(func() {
					// Paced, as pages and APIs read: a reader looping flat
					// out only measures CPU starvation on a small machine.
					tick := time.NewTicker(5 * time.Millisecond)
					defer tick.Stop()
					for i := r; ; i++ {
						select {
						case <-ctx.Done():
							return
						case <-tick.C:
						}
						began := time.Now()
						rows, err := reader.QueryContext(ctx, `SELECT sequence, version, attributes FROM history WHERE entity_id = ? ORDER BY version`, ids[i%len(ids)])
						if err != nil {
							continue
						}
						for rows.Next() {
						}
						_ = rows.Close()
						reads.Add(1)
						latMu.Lock()
						latencies = append(latencies, time.Since(began))
						latMu.Unlock()
					}
				})
			}

			const workers = 8
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for g := range workers {
				wg.Go(func() {
					for {
						n := next.Add(1)
						if n > int64(b.N) {
							return
						}
						if err := benchCommand(writer, ids[(int(n)+g)%len(ids)]); err != nil {
							failed.Add(1)
							firstErr.CompareAndSwap(nil, err.Error())
						}
					}
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			cancel()
			readers.Wait()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "cmds/s")
			b.ReportMetric(float64(reads.Load())/elapsed.Seconds(), "reads/s")
			b.ReportMetric(float64(failed.Load()), "failed")
			if len(latencies) > 0 {
				slices.Sort(latencies)
				b.ReportMetric(float64(latencies[len(latencies)/2].Microseconds())/1000, "read-p50-ms")
				b.ReportMetric(float64(latencies[len(latencies)*99/100].Microseconds())/1000, "read-p99-ms")
			}
			if fi, err := os.Stat(path + "-wal"); err == nil {
				b.ReportMetric(float64(fi.Size())/1e6, "wal-MB")
			}
			if e := firstErr.Load(); e != nil {
				b.Logf("first failure: %s", e)
			}
		})
	}
}

// benchCommand is a command's statements: read, then write.
func benchCommand(db *sql.DB, id string) error {
	tx, err := db.Begin()
	if err != nil {
		return err
	}
	defer tx.Rollback() //nolint:errcheck
	var v int64
	if err := tx.QueryRow(`SELECT version FROM w WHERE id = ?`, id).Scan(&v); err != nil {
		return err
	}
	if _, err := tx.Exec(`UPDATE w SET version = ? WHERE id = ?`, v+1, id); err != nil {
		return err
	}
	eventID := uuid.NewString()
	attrs := fmt.Sprintf(`{"id":%q,"version":%d}`, id, v+1)
	if _, err := tx.Exec(`INSERT INTO history (event_id, entity_type, entity_id, version, event, from_state, to_state,
		attributes, correlation_id, occurred_at) VALUES (?, 'w', ?, ?, 'step', 'a', 'b', ?, 'c', ?)`,
		eventID, id, v+1, attrs, time.Now().UTC().Format("2006-01-02T15:04:05.000000Z")); err != nil {
		return err
	}
	if _, err := tx.Exec(`INSERT INTO outbox (event_id, routing_key, payload, correlation_id, schema_version)
		VALUES (?, 'w.step', ?, 'c', 1)`, eventID, attrs); err != nil {
		return err
	}
	return tx.Commit()
}
