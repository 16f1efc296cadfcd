package handlers

import (
	"context"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/statemill/statemill/commands"
	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/pgstore"
	"github.com/statemill/statemill/infra/sandbox"
	"github.com/statemill/statemill/infra/sqlitestore"
)

// Both repositories run the same command scenarios: the embedded mode must
// answer exactly as the PostgreSQL one does.
func TestRepositories(t *testing.T) {
	t.Parallel()
	repos := map[string]func(t *testing.T) Repository{
		"postgres": func(t *testing.T) Repository {
			ctx := testCtx(t)
			pool, err := pgstore.Open(ctx, pgstore.PoolConfig{URL: sandbox.Postgres(t), MaxConns: 8})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pool.Close)
			if err := pgstore.Migrate(ctx, pool, pgstore.Framework(), Migrations()); err != nil {
				t.Fatal(err)
			}
			return NewPostgresRepository(pgstore.New(pool, nil))
		},
		"sqlite": func(t *testing.T) Repository {
			ctx := testCtx(t)
			db, err := sqlitestore.Open(ctx, sqlitestore.Config{Path: filepath.Join(t.TempDir(), "products.db")})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = db.Close() })
			if err := sqlitestore.Migrate(ctx, db, sqlitestore.Framework(), SQLiteMigrations()); err != nil {
				t.Fatal(err)
			}
			return NewSQLiteRepository(sqlitestore.New(db))
		},
	}
	for name, newRepo := range repos {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			t.Run("Lifecycle", func(t *testing.T) { t.Parallel(); testLifecycle(t, newRepo(t)) })
			t.Run("Refusals", func(t *testing.T) { t.Parallel(); testRefusals(t, newRepo(t)) })
			t.Run("Idempotency", func(t *testing.T) { t.Parallel(); testIdempotency(t, newRepo(t)) })
			t.Run("ConcurrentAdjustments", func(t *testing.T) { t.Parallel(); testConcurrentAdjustments(t, newRepo(t)) })
			t.Run("ListPages", func(t *testing.T) { t.Parallel(); testListPages(t, newRepo(t)) })
		})
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func create(t *testing.T, repo Repository, name string, inventory int64) *Product {
	t.Helper()
	p, err := CreateProductHandler{repo}.Handle(testCtx(t), &commands.CreateProduct{Name: name, Price: 250, InitialInventory: inventory})
	if err != nil {
		t.Fatalf("create %s: %v", name, err)
	}
	return p
}

func adjust(ctx context.Context, repo Repository, id string, n int64, idem commands.Idempotency) (*Product, error) {
	return AdjustInventoryHandler{repo}.Handle(ctx, &commands.AdjustInventory{ProductID: id, Adjust: &n, Idempotency: idem})
}

func testLifecycle(t *testing.T, repo Repository) {
	ctx := testCtx(t)
	p := create(t, repo, "lamp", 3)
	if p.State != "in_stock" || p.Version != 2 || p.Inventory != 3 {
		t.Fatalf("created = %+v, want in_stock at version 2", p)
	}
	p, err := adjust(ctx, repo, p.ID, -3, commands.Idempotency{})
	if err != nil || p.State != "out_of_stock" || p.Version != 3 {
		t.Fatalf("reduce to zero = %+v, %v; want out_of_stock at version 3", p, err)
	}
	// An upper-case id names the same product.
	p, err = DiscontinueProductHandler{repo}.Handle(ctx, &commands.DiscontinueProduct{ProductID: strings.ToUpper(p.ID)})
	if err != nil || p.State != "discontinued" || p.Version != 4 {
		t.Fatalf("discontinue = %+v, %v", p, err)
	}
	got, err := repo.Get(ctx, p.ID)
	if err != nil || got.Version != 4 || got.State != "discontinued" || !got.CreatedAt.Equal(got.CreatedAt.UTC()) {
		t.Fatalf("Get = %+v, %v", got, err)
	}
	history, err := repo.History(ctx, p.ID)
	if err != nil {
		t.Fatal(err)
	}
	var trail []string
	for i, e := range history {
		if e.Version != int64(i+1) || e.EntityID != p.ID {
			t.Fatalf("history[%d] = version %d of %s", i, e.Version, e.EntityID)
		}
		trail = append(trail, e.Event+":"+e.To)
	}
	want := "create:created add_inventory:in_stock reduce_inventory:out_of_stock discontinue:discontinued"
	if strings.Join(trail, " ") != want {
		t.Fatalf("history = %v, want %s", trail, want)
	}
}

func testRefusals(t *testing.T, repo Repository) {
	ctx := testCtx(t)
	p := create(t, repo, "chair", 1)
	cases := []struct {
		name string
		run  func() error
		code apperr.Code
	}{
		{"duplicate name", func() error {
			_, err := CreateProductHandler{repo}.Handle(ctx, &commands.CreateProduct{Name: "chair", Price: 1})
			return err
		}, apperr.Conflict},
		{"unknown product", func() error {
			_, err := adjust(ctx, repo, "6b1d2f3e-0000-4000-8000-000000000000", 1, commands.Idempotency{})
			return err
		}, apperr.NotFound},
		{"bad id", func() error { _, err := repo.Get(ctx, "not-a-uuid"); return err }, apperr.NotFound},
		{"below zero", func() error { _, err := adjust(ctx, repo, p.ID, -2, commands.Idempotency{}); return err }, apperr.Invalid},
		{"stale If-Match", func() error {
			n := int64(1)
			_, err := AdjustInventoryHandler{repo}.Handle(ctx, &commands.AdjustInventory{ProductID: p.ID, Adjust: &n, IfVersion: 1})
			return err
		}, apperr.PreconditionFailed},
		{"bad page cursor", func() error { _, err := repo.List(ctx, "x", 10); return err }, apperr.Invalid},
	}
	for _, c := range cases {
		if err := c.run(); apperr.CodeOf(err) != c.code {
			t.Errorf("%s: error %v (code %q), want code %q", c.name, err, apperr.CodeOf(err), c.code)
		}
	}
	got, err := repo.Get(ctx, p.ID)
	if err != nil || got.Version != p.Version || got.Inventory != 1 {
		t.Fatalf("after the refusals: %+v, %v; want it unchanged", got, err)
	}
}

func testIdempotency(t *testing.T, repo Repository) {
	ctx := testCtx(t)
	p := create(t, repo, "desk", 0)
	idem := commands.Idempotency{Key: "k-1", Fingerprint: "adjust +5"}
	first, err := adjust(ctx, repo, p.ID, 5, idem)
	if err != nil {
		t.Fatal(err)
	}
	again, err := adjust(ctx, repo, p.ID, 5, idem)
	if err != nil || again.Version != first.Version || again.Inventory != 5 {
		t.Fatalf("retry = %+v, %v; want the first outcome %+v", again, err, first)
	}
	if _, err := adjust(ctx, repo, p.ID, 7, commands.Idempotency{Key: "k-1", Fingerprint: "adjust +7"}); apperr.CodeOf(err) != apperr.Invalid {
		t.Fatalf("key reused for another request: %v", err)
	}
	history, err := repo.History(ctx, p.ID)
	if err != nil || len(history) != 2 {
		t.Fatalf("history has %d events, %v; want 2 (the retry fired nothing)", len(history), err)
	}
}

func testConcurrentAdjustments(t *testing.T, repo Repository) {
	ctx := testCtx(t)
	p := create(t, repo, "shelf", 0)
	const workers, each = 4, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for range workers {
		wg.Go(func() {
			for range each {
				if _, err := adjust(ctx, repo, p.ID, 1, commands.Idempotency{}); err != nil {
					errs <- err
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got, err := repo.Get(ctx, p.ID)
	if err != nil || got.Inventory != workers*each || got.Version != 1+workers*each {
		t.Fatalf("after %d adjustments: %+v, %v", workers*each, got, err)
	}
}

func testListPages(t *testing.T, repo Repository) {
	ctx := testCtx(t)
	for _, name := range []string{"a", "b", "c", "d", "e"} {
		create(t, repo, name, 0)
	}
	var seen []string
	after := ""
	for {
		page, err := repo.List(ctx, after, 2)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) == 0 {
			break
		}
		for _, p := range page {
			if len(seen) > 0 && p.ID <= seen[len(seen)-1] {
				t.Fatalf("page not in id order: %s after %s", p.ID, seen[len(seen)-1])
			}
			seen = append(seen, p.ID)
		}
		after = page[len(page)-1].ID
	}
	if len(seen) != 5 {
		t.Fatalf("listed %d products, want 5", len(seen))
	}
}
