package sqlitestore

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/pressly/goose/v3"
)

//go:embed migrations/*.sql
var frameworkMigrations embed.FS

// MigrationSet is one owner's embedded goose migrations (SQLite dialect)
// with its own version table, so the framework and each domain evolve their
// schemas independently, as with pgstore.MigrationSet.
type MigrationSet struct {
	Name string // also names the version table: <name>_schema_version
	FS   fs.FS  // *.sql files at its root
}

// Framework is the framework's own schema: history, outbox and its
// offsets, idempotency keys, replay requests.
func Framework() MigrationSet {
	sub, _ := fs.Sub(frameworkMigrations, "migrations")
	return MigrationSet{Name: "statemill", FS: sub}
}

// Migrate applies every pending migration of each set, in order, through
// the writer connection: each migration's transaction begins IMMEDIATE,
// and two processes migrating one file together take turns on the write
// lock (the second finds nothing left to apply only if it reads the
// version table after the first committed, so start one process first).
func Migrate(ctx context.Context, db *DB, sets ...MigrationSet) error {
	for _, set := range sets {
		if set.Name == "" || set.FS == nil {
			return errors.New("sqlitestore: a migration set needs a Name and an FS")
		}
		p, err := goose.NewProvider(goose.DialectSQLite3, db.writer, set.FS,
			goose.WithTableName(set.Name+"_schema_version"),
			goose.WithDisableGlobalRegistry(true))
		if err != nil {
			return fmt.Errorf("sqlitestore: migrate %s: %w", set.Name, err)
		}
		results, err := p.Up(ctx)
		if err != nil {
			return Classify(fmt.Errorf("sqlitestore: migrate %s: %w", set.Name, err))
		}
		for _, r := range results {
			slog.InfoContext(ctx, "migration applied", "set", set.Name, "source", r.Source.Path, "duration", r.Duration)
		}
	}
	return nil
}
