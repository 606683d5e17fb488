-- One row per fact tollgate keeps about its own database. `serve` writes
-- `last_start` at start, which proves the database can be written before
-- any request is accepted (a read-only file would otherwise drop every row).
CREATE TABLE tollgate_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
