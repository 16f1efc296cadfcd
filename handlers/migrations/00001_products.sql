-- +goose Up
-- products is the write model of the Product entity: its current state. Its
-- history lives in the framework's history table.
CREATE TABLE products (
    id         uuid        PRIMARY KEY,
    name       text        NOT NULL CONSTRAINT products_name_key UNIQUE,
    price      bigint      NOT NULL CHECK (price >= 0),
    inventory  bigint      NOT NULL CONSTRAINT products_inventory_check CHECK (inventory >= 0),
    state      text        NOT NULL,
    version    bigint      NOT NULL CHECK (version > 0),
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);

-- +goose Down
DROP TABLE products;
