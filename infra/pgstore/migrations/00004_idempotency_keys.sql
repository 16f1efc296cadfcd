-- +goose Up
-- The outcome of each command sent with an Idempotency-Key, written in the
-- command's own transaction: a retry finds it and gets the first outcome
-- instead of firing again.
CREATE TABLE idempotency_keys (
    key         text        PRIMARY KEY,
    fingerprint text        NOT NULL,
    response    jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);

-- +goose Down
DROP TABLE idempotency_keys;
