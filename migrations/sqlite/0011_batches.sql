-- The Batch API (SPEC 12). A result line's usage row has the batch's id
-- and the line's `custom_id` as its request id, so request ids are unique
-- per batch ('' for every other row): a result file read twice lands once.
ALTER TABLE usage ADD COLUMN batch_id TEXT NOT NULL DEFAULT '';
DROP INDEX usage_request_id;
CREATE UNIQUE INDEX usage_request_id ON usage (request_id, batch_id);

-- Batch input files uploaded through tollgate: whose, and the most their
-- requests may cost at batch prices (NULL: a line tollgate cannot bound).
CREATE TABLE batch_files (
    file_id TEXT PRIMARY KEY,
    team TEXT NOT NULL,
    lines BIGINT NOT NULL,
    bound_nano_usd BIGINT,
    created_ms BIGINT NOT NULL
);

-- Batches created through tollgate, until their results are billed
-- (`billed_ms`, set by the one process that claims them).
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY,
    format TEXT NOT NULL,
    team TEXT NOT NULL,
    key_id TEXT,
    upstream TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    reserved_nano_usd BIGINT NOT NULL DEFAULT 0,
    output_file_id TEXT,
    billed_ms BIGINT
);
