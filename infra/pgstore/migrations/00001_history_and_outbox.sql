-- +goose Up
-- history is the append-only record of every transition of every entity.
-- sequence orders a replay and reads well; it is NOT a commit-order watermark
-- (transactions commit out of sequence order): transaction_id, the xid8 of the
-- writing transaction, is what replay cursors compare.
CREATE TABLE history (
    sequence        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    transaction_id  xid8        NOT NULL DEFAULT pg_current_xact_id(),
    entity_type     text        NOT NULL,
    entity_id       uuid        NOT NULL,
    version         bigint      NOT NULL CHECK (version > 0),
    event           text        NOT NULL,
    from_state      text        NOT NULL,
    to_state        text        NOT NULL,
    attributes      jsonb       NOT NULL,
    correlation_id  text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    UNIQUE (entity_type, entity_id, version)
);
CREATE INDEX history_transaction_id ON history (transaction_id);

-- No code path may change history: updates, deletes and truncation raise.
-- +goose StatementBegin
CREATE FUNCTION history_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'history is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END;
$$;
-- +goose StatementEnd
CREATE TRIGGER history_no_update_delete BEFORE UPDATE OR DELETE ON history
    FOR EACH ROW EXECUTE FUNCTION history_is_append_only();
CREATE TRIGGER history_no_truncate BEFORE TRUNCATE ON history
    FOR EACH STATEMENT EXECUTE FUNCTION history_is_append_only();

-- The transactional outbox, in the exact shape of watermill-sql's
-- DefaultPostgreSQLSchema for the topic "outbox", so Watermill's SQL
-- subscriber (and its forwarder) read it; created here so that it exists
-- before the first command writes to it.
CREATE TABLE watermill_outbox (
    "offset"        BIGSERIAL,
    "uuid"          VARCHAR(36) NOT NULL,
    "created_at"    TIMESTAMP   NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "payload"       JSON DEFAULT NULL,
    "metadata"      JSON DEFAULT NULL,
    "transaction_id" xid8       NOT NULL,
    PRIMARY KEY ("transaction_id", "offset")
);
CREATE TABLE watermill_offsets_outbox (
    consumer_group                VARCHAR(255) NOT NULL,
    offset_acked                  BIGINT,
    last_processed_transaction_id xid8 NOT NULL,
    PRIMARY KEY (consumer_group)
);

-- +goose Down
DROP TABLE watermill_offsets_outbox;
DROP TABLE watermill_outbox;
DROP TABLE history;
DROP FUNCTION history_is_append_only();
