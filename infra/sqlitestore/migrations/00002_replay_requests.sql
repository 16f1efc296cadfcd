-- +goose Up
-- replay_requests records every replay a consumer asked for, keyed by its
-- replay_id so a repeated request (a redelivery, a retried POST) runs once.
-- Same columns and meaning as pgstore's: a bounded pool claims pending
-- rows; a running row whose heartbeat is stale belongs to a responder that
-- died and is taken over; cursor is pinned before the first event is
-- published. Times are UTC text, as in history.
CREATE TABLE replay_requests (
    replay_id    TEXT    PRIMARY KEY,
    prefix       TEXT    NOT NULL,
    entity_type  TEXT    NOT NULL,
    "after"      TEXT    NOT NULL DEFAULT '',
    mode         TEXT    NOT NULL CHECK (mode IN ('full', 'latest')),
    status       TEXT    NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'running', 'done', 'failed')),
    count        INTEGER,
    "cursor"     TEXT,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0,
    claim        TEXT,
    requested_at TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at   TEXT,
    heartbeat_at TEXT,
    finished_at  TEXT
);
-- The sweep looks only at unfinished requests.
CREATE INDEX replay_requests_unfinished ON replay_requests (requested_at)
    WHERE status IN ('pending', 'running');

-- +goose Down
DROP TABLE replay_requests;
