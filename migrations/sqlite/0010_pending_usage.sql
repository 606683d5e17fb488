-- Background responses (SPEC 12) answered but not billed yet: a row from
-- creation until a poll, the resumed stream or a cancel claims it (deleted
-- with RETURNING, so exactly one claim wins across replicas); the usage
-- row is written then. `reserved_nano_usd` keeps the budget held across a
-- restart.
CREATE TABLE pending_usage (
    response_id TEXT PRIMARY KEY,
    request_id TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    team TEXT NOT NULL,
    key_id TEXT,
    model TEXT NOT NULL,
    upstream TEXT NOT NULL,
    end_user TEXT,
    reserved_nano_usd BIGINT NOT NULL DEFAULT 0
);
