package sqlitestore

import (
	"context"

	"github.com/statemill/statemill/infra/outbox"
)

// Rows implements outbox.OrderedOutbox: SQLite's single writer makes offset
// order commit order, so outbox.SequentialRelay relays this outbox.
func (o *Outbox) Rows(ctx context.Context, after int64, limit int) ([]outbox.Row, error) {
	msgs, err := o.Read(ctx, after, limit)
	if err != nil {
		return nil, err
	}
	rows := make([]outbox.Row, len(msgs))
	for i, m := range msgs {
		rows[i] = outbox.Row{Offset: m.Offset, RoutingKey: m.RoutingKey, Message: m.Message()}
	}
	return rows, nil
}

var _ outbox.OrderedOutbox = (*Outbox)(nil)
