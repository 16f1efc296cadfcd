-- +goose Up
-- replay_requests records every replay a consumer asked for, keyed by its
-- replay_id so a repeated request (an AMQP redelivery, a retried POST) runs
-- once. A bounded pool claims pending rows; a running row whose heartbeat is
-- stale belongs to a responder that died and is taken over. cursor is pinned
-- before the first event is published, so a resumed replay sends exactly the
-- set the first attempt began to send.
CREATE TABLE replay_requests (
    replay_id    uuid        PRIMARY KEY,
    prefix       text        NOT NULL,
    entity_type  text        NOT NULL,
    "after"      text        NOT NULL DEFAULT '',
    mode         text        NOT NULL CHECK (mode IN ('full', 'latest')),
    status       text        NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'running', 'done', 'failed')),
    count        bigint,
    "cursor"     text,
    error        text,
    attempts     integer     NOT NULL DEFAULT 0,
    claim        uuid,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    heartbeat_at timestamptz,
    finished_at  timestamptz
);
-- The sweep looks only at unfinished requests.
CREATE INDEX replay_requests_unfinished ON replay_requests (requested_at)
    WHERE status IN ('pending', 'running');

-- +goose Down
DROP TABLE replay_requests;
