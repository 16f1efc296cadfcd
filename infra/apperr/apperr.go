// Package apperr is statemill's one error type: every failure that crosses a
// package boundary carries a Code, and the HTTP layer maps codes to statuses in
// one place (infra/web).
package apperr

import (
	"context"
	"errors"
	"fmt"
)

// Code classifies a failure by what the caller can do about it.
type Code string

const (
	Invalid            Code = "invalid"             // the request is well-formed but breaks a rule (422)
	Malformed          Code = "malformed"           // the request cannot be parsed (400)
	NotFound           Code = "not_found"           // the entity does not exist (404)
	Conflict           Code = "conflict"            // the entity's state forbids it (409)
	PreconditionFailed Code = "precondition_failed" // If-Match does not match (412)
	TooLarge           Code = "too_large"           // the body is over the limit (413)
	UnsupportedMedia   Code = "unsupported_media"   // the content type is not JSON (415)
	Unavailable        Code = "unavailable"         // a dependency is down; retry later (503)
	Internal           Code = "internal"            // a bug or an unexpected failure (500)
)

// Error is a failure with a code, a message fit for the caller, optional
// per-field messages, and the underlying cause (never shown to callers).
type Error struct {
	Code    Code              `json:"code"`
	Message string            `json:"message"`
	Fields  map[string]string `json:"fields,omitempty"`
	Err     error             `json:"-"`
}

func (e *Error) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("%s: %s: %v", e.Code, e.Message, e.Err)
	}
	return fmt.Sprintf("%s: %s", e.Code, e.Message)
}

func (e *Error) Unwrap() error { return e.Err }

// Is makes errors.Is(err, &Error{Code: c}) match any error of code c.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Code == e.Code
}

// Errorf returns an *Error with the given code and a formatted message.
func Errorf(code Code, format string, args ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// Wrap returns an *Error with the given code and message that keeps err as its cause.
func Wrap(code Code, err error, message string) *Error {
	return &Error{Code: code, Message: message, Err: err}
}

// Field returns an Invalid error about one input field.
func Field(field, message string) *Error {
	return &Error{Code: Invalid, Message: "validation failed", Fields: map[string]string{field: message}}
}

// Fields collects per-field validation messages; Err returns nil while it is empty.
type Fields map[string]string

// Add records message for field unless the field already has one (first rule wins).
func (f Fields) Add(field, message string) {
	if _, ok := f[field]; !ok {
		f[field] = message
	}
}

// Err returns an Invalid error carrying the fields, or nil when there are none.
func (f Fields) Err() error {
	if len(f) == 0 {
		return nil
	}
	return &Error{Code: Invalid, Message: "validation failed", Fields: f}
}

// CodeOf returns the code of err: its own if it carries one, Unavailable for
// a deadline, Internal for anything else.
func CodeOf(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return Unavailable
	}
	return Internal
}

// As returns err as an *Error, classifying foreign errors with CodeOf and
// hiding their text behind a generic message.
func As(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	code := CodeOf(err)
	msg := "internal error"
	if code == Unavailable {
		msg = "a dependency is unavailable; retry later"
	}
	return &Error{Code: code, Message: msg, Err: err}
}
