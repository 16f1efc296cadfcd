package web

import (
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"mime"
	"net/http"
	"reflect"
	"strconv"
	"strings"

	"github.com/statemill/statemill/infra/apperr"
)

// MaxBodyBytes caps every JSON request body. Commands are small; the cap
// keeps one client from making the server buffer megabytes per request.
const MaxBodyBytes = 1 << 20

// DecodeJSON decodes the JSON object in r's body into dst and returns nil or
// an *apperr.Error, never a 5xx code for anything the client sent:
//
//   - Content-Type not application/json (parameters allowed; a charset other
//     than UTF-8 is refused, JSON is UTF-8) → UnsupportedMedia (415);
//   - body over MaxBodyBytes → TooLarge (413);
//   - empty body, malformed JSON, a value of the wrong type (including an
//     integer outside its Go type's range, such as 1e30 for an int64), an
//     unknown field, or data after the value → Invalid (422), with Fields
//     naming the field when one is known;
//   - the body cannot be read (the client hung up, a broken chunked encoding)
//     → Malformed (400).
//
// Only a dst that is not a non-nil pointer yields Internal: that is a bug.
// A literal null leaves dst untouched; the caller's validation sees zero
// values. w is needed only so http.MaxBytesReader can close the connection of
// an oversized request; the argument order follows the project brief.
func DecodeJSON(r *http.Request, w http.ResponseWriter, dst any) error {
	if err := checkJSONContentType(r.Header.Get("Content-Type")); err != nil {
		return err
	}
	if r.ContentLength > MaxBodyBytes { // refuse before reading a byte
		return tooLarge()
	}
	if r.Body == nil {
		return apperr.Errorf(apperr.Invalid, "request body is empty; a JSON value is required")
	}
	body := &readErrReader{r: http.MaxBytesReader(innermost(w), r.Body, MaxBodyBytes)}
	dec := json.NewDecoder(body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(dst); err != nil {
		return decodeError(err, body.err, dst)
	}
	// One value per body: "{}{}" or "{} x" is a client bug we must not hide.
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		if body.err != nil {
			return readError(body.err)
		}
		return apperr.Errorf(apperr.Invalid, "request body must hold exactly one JSON value; found data after it")
	}
	return nil
}

// checkJSONContentType accepts application/json with any parameters but a
// non-UTF-8 charset.
func checkJSONContentType(ct string) *apperr.Error {
	if ct == "" {
		return apperr.Errorf(apperr.UnsupportedMedia, "Content-Type must be application/json; none was given")
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil || mt != "application/json" {
		return apperr.Errorf(apperr.UnsupportedMedia, "Content-Type must be application/json")
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") && !strings.EqualFold(cs, "utf8") {
		return apperr.Errorf(apperr.UnsupportedMedia, "JSON must be UTF-8; charset %q is not supported", cs)
	}
	return nil
}

func tooLarge() *apperr.Error {
	return apperr.Errorf(apperr.TooLarge, "request body is larger than %d bytes", MaxBodyBytes)
}

func readError(err error) *apperr.Error {
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return tooLarge()
	}
	return apperr.Wrap(apperr.Malformed, err, "request body could not be read")
}

// decodeError turns a json.Decoder error into a client-facing *apperr.Error.
// readErr is the last non-EOF error the body reader returned, to tell a
// transport failure or the size cap from bad JSON.
func decodeError(err, readErr error, dst any) error {
	var (
		syntaxErr *json.SyntaxError
		typeErr   *json.UnmarshalTypeError
		invalid   *json.InvalidUnmarshalError
		ae        *apperr.Error
		mbe       *http.MaxBytesError
	)
	switch {
	// A failed read explains any decode error that follows it, however the
	// json package wrapped it (its v2-backed variant turns it into a
	// SyntaxError without Unwrap).
	case readErr != nil:
		return readError(readErr)
	case errors.As(err, &mbe):
		return tooLarge()
	case errors.Is(err, io.EOF):
		return apperr.Errorf(apperr.Invalid, "request body is empty; a JSON value is required")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return apperr.Errorf(apperr.Invalid, "request body is not valid JSON: it ends in the middle of a value")
	case errors.As(err, &syntaxErr):
		return apperr.Errorf(apperr.Invalid, "request body is not valid JSON at byte %d: %s",
			syntaxErr.Offset, strings.TrimPrefix(syntaxErr.Error(), "json: "))
	case errors.As(err, &typeErr):
		msg := "must be " + describe(typeErr.Type)
		if typeErr.Field == "" {
			return apperr.Errorf(apperr.Invalid, "request body %s", msg)
		}
		return &apperr.Error{Code: apperr.Invalid, Message: "validation failed",
			Fields: map[string]string{typeErr.Field: msg}}
	case errors.As(err, &invalid):
		return apperr.Wrap(apperr.Internal, err, fmt.Sprintf("DecodeJSON needs a non-nil pointer, got %T", dst))
	case errors.As(err, &ae):
		return ae // a custom UnmarshalJSON already said what is wrong
	}
	// encoding/json reports unknown fields only as text; both its v1 and its
	// v2-backed implementation use this exact form.
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		if uq, uerr := strconv.Unquote(name); uerr == nil {
			name = uq
		}
		return &apperr.Error{Code: apperr.Invalid, Message: "validation failed",
			Fields: map[string]string{name: "unknown field"}}
	}
	// What is left comes from a custom UnmarshalJSON/UnmarshalText (for
	// example time.Time): it describes the client's input, so say it.
	return &apperr.Error{Code: apperr.Invalid,
		Message: "request body is invalid: " + strings.TrimPrefix(err.Error(), "json: "), Err: err}
}

var textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()

// describe names what a JSON value for Go type t must look like, in words a
// client understands (never Go type names).
func describe(t reflect.Type) string {
	if t == nil {
		return "of another type"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if reflect.PointerTo(t).Implements(textUnmarshaler) {
		return "a string" // uuid.UUID, netip.Addr, ...: text in JSON
	}
	switch t.Kind() {
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		bits := t.Bits()
		return fmt.Sprintf("an integer between %d and %d", int64(-1)<<(bits-1), int64(1)<<(bits-1)-1)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return fmt.Sprintf("an integer between 0 and %d", uint64(math.MaxUint64)>>(64-t.Bits()))
	case reflect.Float32, reflect.Float64:
		return "a number"
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Map, reflect.Struct:
		return "an object"
	default:
		return "of another type"
	}
}

// readErrReader remembers the last non-EOF error of the body, so a failure
// to read is not mistaken for malformed JSON.
type readErrReader struct {
	r   io.Reader
	err error
}

func (rr *readErrReader) Read(p []byte) (int, error) {
	n, err := rr.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		rr.err = err
	}
	return n, err
}

// innermost unwraps middleware response writers so http.MaxBytesReader
// reaches net/http's own writer, the only one that can mark the connection
// for closing when the limit is hit.
func innermost(w http.ResponseWriter) http.ResponseWriter {
	for w != nil {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		w = u.Unwrap()
	}
	return w
}
