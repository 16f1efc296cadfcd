-- +goose Up
-- batch is the most events a replay may put in one message (1: one message
-- per event). It is part of the request, so a resumed replay keeps it.
ALTER TABLE replay_requests ADD COLUMN batch integer NOT NULL DEFAULT 1 CHECK (batch BETWEEN 1 AND 1000);

-- +goose Down
ALTER TABLE replay_requests DROP COLUMN batch;
