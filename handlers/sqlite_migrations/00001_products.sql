-- +goose Up
-- products is the write model of the Product entity (SQLite, embedded mode):
-- the same columns and rules as the PostgreSQL table. Times are UTC text at
-- microsecond precision, so text order is time order.
CREATE TABLE products (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    price      INTEGER NOT NULL CHECK (price >= 0),
    inventory  INTEGER NOT NULL CHECK (inventory >= 0),
    state      TEXT    NOT NULL,
    version    INTEGER NOT NULL CHECK (version > 0),
    created_at TEXT    NOT NULL,
    updated_at TEXT    NOT NULL
) STRICT;

-- +goose Down
DROP TABLE products;
