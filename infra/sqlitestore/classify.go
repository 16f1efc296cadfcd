package sqlitestore

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"strings"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"

	"github.com/statemill/statemill/infra/apperr"
)

// HistoryVersionKey is how SQLite names history's (entity type, entity id,
// version) uniqueness in a violation, for IsUniqueViolation.
const HistoryVersionKey = "history.entity_type, history.entity_id, history.version"

// Classify turns failures that mean "the database cannot serve now" into
// apperr.Unavailable, so the HTTP layer answers 503 (retry later) rather
// than 500, as pgstore.Classify does. Errors that already carry a code pass
// through.
func Classify(err error) error {
	if err == nil {
		return nil
	}
	var ae *apperr.Error
	if errors.As(err, &ae) {
		return err
	}
	if Unavailable(err) {
		return apperr.Wrap(apperr.Unavailable, err, "the database is unavailable; retry later")
	}
	return err
}

// Unavailable reports whether err means the database could not serve the
// statement rather than refused it: a lock still held after the busy
// timeout (another process writing, a checkpoint), an I/O failure, a full
// disk, a file that cannot be opened, a closed DB, or a deadline.
func Unavailable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, sql.ErrConnDone) || errors.Is(err, driver.ErrBadConn) {
		return true
	}
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff { // the primary code of an extended one
		case sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN,
			sqlite3.SQLITE_FULL, sqlite3.SQLITE_PROTOCOL, sqlite3.SQLITE_NOMEM:
			return true
		}
		return false
	}
	// database/sql does not export the error of a closed *sql.DB.
	return strings.Contains(err.Error(), "sql: database is closed")
}

// IsUniqueViolation reports whether err is a violation of a UNIQUE or
// PRIMARY KEY constraint on the given columns, named as SQLite reports
// them ("table.column, table.column", e.g. HistoryVersionKey); "" matches
// any. SQLite has no constraint names in these errors, so the columns
// stand in for pgstore's constraint name.
func IsUniqueViolation(err error, columns string) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	if se.Code() != sqlite3.SQLITE_CONSTRAINT_UNIQUE && se.Code() != sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY {
		return false
	}
	if columns == "" {
		return true
	}
	return violatedColumns(se.Error()) == columns
}

// violatedColumns extracts the column list from a message such as
// "constraint failed: UNIQUE constraint failed: t.a, t.b (2067)".
func violatedColumns(msg string) string {
	for _, marker := range []string{"UNIQUE constraint failed: ", "PRIMARY KEY constraint failed: "} {
		if i := strings.LastIndex(msg, marker); i >= 0 {
			cols := msg[i+len(marker):]
			if j := strings.LastIndex(cols, " ("); j >= 0 {
				cols = cols[:j]
			}
			return strings.TrimSpace(cols)
		}
	}
	return ""
}
