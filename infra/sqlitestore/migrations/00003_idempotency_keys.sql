-- +goose Up
-- The outcome of each command sent with an Idempotency-Key, written in the
-- command's own transaction: a retry finds it and gets the first outcome
-- instead of firing again.
CREATE TABLE idempotency_keys (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    response    TEXT NOT NULL CHECK (json_valid(response)),
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- +goose Down
DROP TABLE idempotency_keys;
