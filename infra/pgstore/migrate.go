package pgstore

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/pressly/goose/v3"
	"github.com/pressly/goose/v3/lock"
)

//go:embed migrations/*.sql
var frameworkMigrations embed.FS

// MigrationSet is one owner's embedded goose migrations with its own version
// table, so the framework and each domain evolve their schemas independently.
type MigrationSet struct {
	Name string // also names the version table: <name>_schema_version
	FS   fs.FS  // *.sql files at its root
	// LockID is the advisory lock that serialises concurrent starts.
	LockID int64
}

// Framework is the framework's own schema: history and outbox.
func Framework() MigrationSet {
	sub, _ := fs.Sub(frameworkMigrations, "migrations")
	return MigrationSet{Name: "statemill", FS: sub, LockID: 0x57a7e0001}
}

// Migrate applies every pending migration of each set, in order. Instances
// starting together serialise on an advisory lock per set.
func Migrate(ctx context.Context, pool *pgxpool.Pool, sets ...MigrationSet) error {
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	for _, set := range sets {
		locker, err := lock.NewPostgresSessionLocker(lock.WithLockID(set.LockID))
		if err != nil {
			return fmt.Errorf("migrate %s: %w", set.Name, err)
		}
		p, err := goose.NewProvider(goose.DialectPostgres, db, set.FS,
			goose.WithTableName(set.Name+"_schema_version"),
			goose.WithSessionLocker(locker),
			goose.WithDisableGlobalRegistry(true))
		if err != nil {
			return fmt.Errorf("migrate %s: %w", set.Name, err)
		}
		results, err := p.Up(ctx)
		if err != nil {
			return Classify(fmt.Errorf("migrate %s: %w", set.Name, err))
		}
		for _, r := range results {
			slog.InfoContext(ctx, "migration applied", "set", set.Name, "source", r.Source.Path, "duration", r.Duration)
		}
	}
	return nil
}
