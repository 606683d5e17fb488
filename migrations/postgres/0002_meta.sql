-- See migrations/sqlite/0004_meta.sql: `serve` proves it can write here at start.
CREATE TABLE tollgate_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
