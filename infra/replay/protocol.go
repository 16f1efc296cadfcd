// Package replay is statemill's replay protocol (DESIGN §6): a consumer asks
// the producer to publish history again under a routing-key prefix that only
// that consumer is bound to, and the producer brackets the events with
// markers. It also holds the responder that answers such requests from the
// history of a PostgreSQL store (one REPEATABLE READ snapshot) or of the
// embedded SQLite store (a read bounded by a sequence).
package replay

import (
	"encoding/base64"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/google/uuid"

	"github.com/statemill/statemill/infra/apperr"
	"github.com/statemill/statemill/infra/envelope"
)

// Mode says what a replay publishes.
type Mode string

const (
	// Full publishes every transition, in sequence order.
	Full Mode = "full"
	// Latest publishes only the newest transition of each entity, for views
	// that need state, not history: a start costs O(entities).
	Latest Mode = "latest"
)

// RequestRoutingKey is the routing key of a Request on the commands exchange.
const RequestRoutingKey = "replay.request"

// Marker event names, published as `<prefix>.<entity_type>.<marker>`. No
// entity event may carry these names.
const (
	StartedEvent   = "replay_started"
	CompletedEvent = "replay_completed"
)

// BatchEvent names a message of a batched replay (Request.Batch above 1):
// `<prefix>.<entity_type>.replay_batch`, its body a JSON array of events
// (envelope.EncodeBatch), each as its own message would carry it. No entity
// event may carry this name either.
const BatchEvent = "replay_batch"

// MaxBatch bounds Request.Batch: a thousand events of about half a kilobyte
// make a message of half a megabyte.
const MaxBatch = 1000

// reservedPrefixes are words the routing scheme uses: a replay under them
// could reach consumers it is not meant for.
var reservedPrefixes = []string{"replay", "events", "commands", "amq", "live", "dead"}

// Request asks for a replay.
type Request struct {
	ReplayID   string `json:"replay_id"`
	Prefix     string `json:"prefix"`
	EntityType string `json:"entity_type"`
	// After, when set, is the cursor of an earlier replay: only transitions
	// that snapshot did not see are replayed.
	After string `json:"after,omitempty"`
	Mode  Mode   `json:"mode,omitempty"`
	// Batch, above 1, lets the producer put up to Batch events in one
	// message (BatchEvent): the broker then handles one message, not
	// Batch, for that many events, which is what bounds a large rebuild.
	// 0 or 1: one message per event, each with the event's id as message
	// id (DESIGN §6). Either way the consumer counts distinct event ids.
	Batch int `json:"batch,omitempty"`
}

// Normalize fills the defaults (a fresh replay id, mode full) and validates
// the request against the entity types the producer serves. Errors are
// apperr.Invalid with one message per field.
func (r *Request) Normalize(entityTypes []string) error {
	f := apperr.Fields{}
	if r.ReplayID == "" {
		r.ReplayID = uuid.Must(uuid.NewV7()).String()
	} else if uuid.Validate(r.ReplayID) != nil {
		f.Add("replay_id", "must be a UUID")
	}
	if err := envelope.ValidatePrefix(r.Prefix, entityTypes, reservedPrefixes...); err != nil {
		f.Add("prefix", err.Error())
	}
	if !slices.Contains(entityTypes, r.EntityType) {
		f.Add("entity_type", fmt.Sprintf("must be one of %s", strings.Join(entityTypes, ", ")))
	}
	if r.Mode == "" {
		r.Mode = Full
	}
	if r.Mode != Full && r.Mode != Latest {
		f.Add("mode", `must be "full" or "latest"`)
	}
	if r.Batch < 0 || r.Batch > MaxBatch {
		f.Add("batch", fmt.Sprintf("must be between 0 and %d", MaxBatch))
	} else if r.Batch == 0 {
		r.Batch = 1
	}
	if r.After != "" {
		if _, err := ParseCursor(r.After); err != nil {
			f.Add("after", err.Error())
		}
	}
	return f.Err()
}

// Started opens a replay: `<prefix>.<entity_type>.replay_started`.
type Started struct {
	ReplayID      string `json:"replay_id"`
	ExpectedCount int64  `json:"expected_count"`
}

// Completed closes a replay: `<prefix>.<entity_type>.replay_completed`.
// Count is the number of events published for the replay (in a batched
// replay, more than its messages); a
// consumer is complete when it has received Count distinct event ids of the
// replay (this marker may overtake the last events). Cursor identifies the
// snapshot the replay read.
type Completed struct {
	ReplayID string `json:"replay_id"`
	Count    int64  `json:"count"`
	Cursor   string `json:"cursor"`
}

// Reserved reports whether an event name belongs to the replay protocol (a
// marker or a batch), which no entity event may carry.
func Reserved(event string) bool {
	return event == StartedEvent || event == CompletedEvent || event == BatchEvent
}

// Cursor identifies what one replay read, so that a later replay can
// continue after it. It is one of two kinds, by the store that made it:
//
//   - PostgreSQL: Snapshot is a pg_snapshot (text xmin:xmax:xip,...): the
//     transitions the replay saw are exactly those whose xid is visible in
//     it (sequence is not a commit-order watermark there).
//   - SQLite (the embedded store), when Snapshot is "": Sequence is the
//     greatest history sequence the replay's read could see. With SQLite's
//     single writer sequence order is commit order, so the replay saw
//     exactly the transitions with sequence ≤ Sequence.
//
// A store refuses a cursor of the other kind.
type Cursor struct {
	Snapshot string
	Sequence int64
}

// Token prefixes (inside the base64 of the token) of the two kinds; kept
// stable, as consumers store tokens.
const (
	cursorPrefix         = "pg1:"
	sequenceCursorPrefix = "sq1:"
)

var (
	snapshotPattern = regexp.MustCompile(`^\d{1,20}:\d{1,20}:(\d{1,20}(,\d{1,20})*)?$`)
	sequencePattern = regexp.MustCompile(`^(0|[1-9]\d{0,18})$`)
)

// IsSequence reports whether c is a cursor of the embedded store (a
// history sequence) rather than a PostgreSQL snapshot.
func (c Cursor) IsSequence() bool { return c.Snapshot == "" }

// String is the opaque token handed to consumers.
func (c Cursor) String() string {
	raw := cursorPrefix + c.Snapshot
	if c.IsSequence() {
		raw = sequenceCursorPrefix + strconv.FormatInt(c.Sequence, 10)
	}
	return base64.RawURLEncoding.EncodeToString([]byte(raw))
}

// ParseCursor reads a token made by Cursor.String, of either kind.
func ParseCursor(token string) (Cursor, error) {
	notCursor := fmt.Errorf("is not a replay cursor")
	b, err := base64.RawURLEncoding.DecodeString(token)
	if err != nil || len(b) > 1<<16 {
		return Cursor{}, notCursor
	}
	raw := string(b)
	if snap, ok := strings.CutPrefix(raw, cursorPrefix); ok {
		if !snapshotPattern.MatchString(snap) {
			return Cursor{}, notCursor
		}
		return Cursor{Snapshot: snap}, nil
	}
	if seq, ok := strings.CutPrefix(raw, sequenceCursorPrefix); ok && sequencePattern.MatchString(seq) {
		n, err := strconv.ParseInt(seq, 10, 64)
		if err != nil {
			return Cursor{}, notCursor
		}
		return Cursor{Sequence: n}, nil
	}
	return Cursor{}, notCursor
}
