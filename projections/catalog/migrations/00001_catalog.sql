-- +goose Up
-- The catalog read model. Rows are kept per generation: the projection
-- runtime rebuilds into a new generation while the active one serves reads,
-- then swaps by switching the active generation in one transaction.
CREATE SCHEMA IF NOT EXISTS catalog;
CREATE TABLE catalog.products (
    generation bigint      NOT NULL,
    id         uuid        NOT NULL,
    name       text        NOT NULL,
    price      bigint      NOT NULL,
    inventory  bigint      NOT NULL,
    state      text        NOT NULL,
    version    bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (generation, id)
);
CREATE INDEX products_generation_state ON catalog.products (generation, state);

-- +goose Down
DROP TABLE catalog.products;
