-- +goose Up
-- history is the append-only record of every transition of every entity.
-- Unlike PostgreSQL's, sequence here IS a commit-order watermark: every
-- write transaction begins IMMEDIATE, so writers (even in other processes)
-- hold the database's write lock one at a time, and AUTOINCREMENT never
-- hands out a rowid at or below one already used. Rows committed after a
-- reader's snapshot therefore all have a greater sequence than any it saw.
-- Times are UTC text of fixed width (microseconds for occurred_at), so text
-- order is time order.
CREATE TABLE history (
    sequence        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL UNIQUE,
    entity_type     TEXT    NOT NULL,
    entity_id       TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version > 0),
    event           TEXT    NOT NULL,
    from_state      TEXT    NOT NULL,
    to_state        TEXT    NOT NULL,
    attributes      TEXT    NOT NULL CHECK (json_valid(attributes)),
    correlation_id  TEXT    NOT NULL,
    occurred_at     TEXT    NOT NULL,
    UNIQUE (entity_type, entity_id, version)
);

-- No code path may change history: updates and deletes raise (SQLite has
-- no TRUNCATE; a DELETE without WHERE fires the trigger too, as triggers
-- turn off the truncate optimisation).
-- +goose StatementBegin
CREATE TRIGGER history_no_update BEFORE UPDATE ON history
BEGIN
    SELECT RAISE(ABORT, 'history is append-only: UPDATE refused');
END;
-- +goose StatementEnd
-- +goose StatementBegin
CREATE TRIGGER history_no_delete BEFORE DELETE ON history
BEGIN
    SELECT RAISE(ABORT, 'history is append-only: DELETE refused');
END;
-- +goose StatementEnd

-- The transactional outbox: one row per event, the event JSON as it goes
-- on the wire. "offset" order is commit order for the same reason as
-- history's sequence; AUTOINCREMENT matters more here, because pruning
-- deletes the newest published rows too, and a reused offset at or below a
-- relay's acknowledged one would never be published.
CREATE TABLE outbox (
    "offset"        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        TEXT    NOT NULL,
    routing_key     TEXT    NOT NULL,
    payload         TEXT    NOT NULL CHECK (json_valid(payload)),
    correlation_id  TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    created_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX outbox_created_at ON outbox (created_at);

-- How far each relay (consumer group) has published: every row at or below
-- offset_acked is on the broker.
CREATE TABLE outbox_offsets (
    consumer_group  TEXT    PRIMARY KEY,
    offset_acked    INTEGER NOT NULL DEFAULT 0,
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- +goose Down
DROP TABLE outbox_offsets;
DROP TABLE outbox;
DROP TABLE history;
