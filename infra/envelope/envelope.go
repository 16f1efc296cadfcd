// Package envelope is the wire contract of statemill: the JSON of a
// transition event, the AMQP headers that travel with it, and the routing-key
// scheme `[<prefix>.]<entity_type>.<event>` (DESIGN §5).
package envelope

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"time"

	gojson "github.com/goccy/go-json"
)

// SchemaVersion is the version of the event JSON below. Consumers refuse
// events with a newer major version than they know.
const SchemaVersion = 1

// Header names carried as AMQP headers (and Watermill metadata).
const (
	HeaderCorrelationID = "correlation_id"
	HeaderSchemaVersion = "schema_version"
	HeaderReplayID      = "replay_id"
)

// Event is one state transition of one entity, as stored in history and as
// published: a replayed event carries the same fields, values and message id
// as the live one.
type Event struct {
	ID            string          `json:"id"`
	SchemaVersion int             `json:"schema_version"`
	Sequence      int64           `json:"sequence"`
	EntityType    string          `json:"entity_type"`
	EntityID      string          `json:"entity_id"`
	Version       int64           `json:"version"`
	Event         string          `json:"event"`
	From          string          `json:"from"`
	To            string          `json:"to"`
	Attributes    json.RawMessage `json:"entity_attributes"`
	OccurredAt    time.Time       `json:"occurred_at"`
	CorrelationID string          `json:"correlation_id"`
}

// RoutingKey is where the event is published live: `<entity_type>.<event>`.
func (e Event) RoutingKey() string { return e.EntityType + "." + e.Event }

// ErrMalformed marks an event that cannot be decoded or lacks required
// fields: such a message is poison and belongs in a dead-letter queue.
var ErrMalformed = errors.New("malformed event")

// Decode parses and checks an event body. It decodes with goccy/go-json,
// which reads this shape in a fifth of encoding/json's time (a rebuild
// decodes every event of the history); the fuzz test holds it to
// encoding/json's results.
func Decode(body []byte) (Event, error) {
	var e Event
	if err := gojson.Unmarshal(body, &e); err != nil {
		return Event{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if err := e.check(); err != nil {
		return Event{}, err
	}
	return e, nil
}

// DecodeAttributes decodes the event's entity_attributes into v, with the
// library Decode uses.
func (e Event) DecodeAttributes(v any) error {
	if err := gojson.Unmarshal(e.Attributes, v); err != nil {
		return fmt.Errorf("%w: entity_attributes: %v", ErrMalformed, err)
	}
	return nil
}

// DecodeBatch parses and checks a batch body: a JSON array of events (see
// EncodeBatch). Any malformed event makes the whole batch malformed.
func DecodeBatch(body []byte) ([]Event, error) {
	var es []Event
	if err := gojson.Unmarshal(body, &es); err != nil {
		return nil, fmt.Errorf("%w: batch: %v", ErrMalformed, err)
	}
	if es == nil {
		return nil, fmt.Errorf("%w: batch: not an array", ErrMalformed)
	}
	for i := range es {
		if err := es[i].check(); err != nil {
			return nil, fmt.Errorf("batch event %d: %w", i, err)
		}
	}
	return es, nil
}

// EncodeBatch is the body of a message carrying several events: a JSON
// array of the events, each exactly as its own message's body would be.
func EncodeBatch(es []Event) ([]byte, error) {
	return json.Marshal(es)
}

// check reports a decoded event that lacks required fields.
func (e Event) check() error {
	switch {
	case e.ID == "":
		return fmt.Errorf("%w: no id", ErrMalformed)
	case e.SchemaVersion < 1 || e.SchemaVersion > SchemaVersion:
		return fmt.Errorf("%w: schema_version %d not supported", ErrMalformed, e.SchemaVersion)
	case !wordPattern.MatchString(e.EntityType):
		return fmt.Errorf("%w: bad entity_type %q", ErrMalformed, e.EntityType)
	case e.EntityID == "":
		return fmt.Errorf("%w: no entity_id", ErrMalformed)
	case e.Version < 1:
		return fmt.Errorf("%w: version %d", ErrMalformed, e.Version)
	case !wordPattern.MatchString(e.Event):
		return fmt.Errorf("%w: bad event name %q", ErrMalformed, e.Event)
	}
	return nil
}

// wordPattern is what an entity type or event name may be: one routing-key
// word, so `*` and `#` in bindings keep their meaning.
var wordPattern = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)

// ValidName reports whether s can be an entity type or event name.
func ValidName(s string) bool { return wordPattern.MatchString(s) }

// prefixPattern is the shape of a replay prefix (DESIGN §6).
var prefixPattern = regexp.MustCompile(`^[a-z][a-z0-9-]{0,39}$`)

// ValidatePrefix checks a replay prefix: the right shape, and not a word the
// routing scheme already uses (an entity type, or one of reserved), because
// such a prefix would route replayed events to live consumers.
func ValidatePrefix(prefix string, entityTypes []string, reserved ...string) error {
	if !prefixPattern.MatchString(prefix) {
		return fmt.Errorf("prefix %q must match %s", prefix, prefixPattern)
	}
	for _, w := range append(append([]string(nil), entityTypes...), reserved...) {
		if prefix == w {
			return fmt.Errorf("prefix %q is a word the system uses", prefix)
		}
	}
	return nil
}

// ReplayRoutingKey is where a replayed event goes: `<prefix>.<entity_type>.<event>`.
func ReplayRoutingKey(prefix, entityType, event string) string {
	return prefix + "." + entityType + "." + event
}

// LiveBinding is the binding key that receives every live event of an entity type.
func LiveBinding(entityType string) string { return entityType + ".#" }

// ReplayBinding is the binding key that receives a consumer's replays of an entity type.
func ReplayBinding(prefix, entityType string) string { return prefix + "." + entityType + ".#" }

type correlationKey struct{}

// WithCorrelationID returns ctx carrying the correlation id that every
// event caused by this request will carry.
func WithCorrelationID(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, correlationKey{}, id)
}

// CorrelationID returns the correlation id in ctx, or "".
func CorrelationID(ctx context.Context) string {
	id, _ := ctx.Value(correlationKey{}).(string)
	return id
}
