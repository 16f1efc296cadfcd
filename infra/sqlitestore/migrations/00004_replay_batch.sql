-- +goose Up
-- batch is the most events a replay may put in one message (1: one message
-- per event), as in pgstore's replay_requests.
ALTER TABLE replay_requests ADD COLUMN batch INTEGER NOT NULL DEFAULT 1 CHECK (batch BETWEEN 1 AND 1000);

-- +goose Down
ALTER TABLE replay_requests DROP COLUMN batch;
