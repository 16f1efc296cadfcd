package pgstore

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/statemill/statemill/infra/apperr"
)

// Classify turns connection-level failures into apperr.Unavailable, so the
// HTTP layer answers 503 (retry later) rather than 500. Errors that already
// carry a code pass through.
func Classify(err error) error {
	if err == nil {
		return nil
	}
	var ae *apperr.Error
	if errors.As(err, &ae) {
		return err
	}
	if Unreachable(err) {
		return apperr.Wrap(apperr.Unavailable, err, "the database is unavailable; retry later")
	}
	return err
}

// Unreachable reports whether err means PostgreSQL could not be reached or
// dropped the connection, as opposed to refusing the statement.
func Unreachable(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var connectErr *pgconn.ConnectError
	if errors.As(err, &connectErr) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		// 08: connection exception; 57P01-03: shutdown / cannot connect now; 53300: too many connections.
		return strings.HasPrefix(pgErr.Code, "08") || strings.HasPrefix(pgErr.Code, "57P") || pgErr.Code == "53300"
	}
	// A server that dies mid-statement leaves the client reading an
	// unexpected EOF (seen when the fault suite killed the postmaster).
	return pgconn.SafeToRetry(err) || errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, io.EOF) || strings.Contains(err.Error(), "conn closed")
}

// IsUniqueViolation reports whether err is a unique-constraint violation of
// the named constraint ("" matches any).
func IsUniqueViolation(err error, constraint string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505" && (constraint == "" || pgErr.ConstraintName == constraint)
}
