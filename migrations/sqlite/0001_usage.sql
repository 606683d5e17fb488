-- One row per request attributed to a team (SPEC section 6).
-- Money is integer nano-USD; created_at is UTC ISO-8601 with milliseconds.
CREATE TABLE usage (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at        TEXT    NOT NULL,
    request_id        TEXT    NOT NULL,
    team              TEXT    NOT NULL,
    key_id            TEXT,
    model             TEXT    NOT NULL,
    base_model        TEXT    NOT NULL,
    upstream          TEXT    NOT NULL,
    endpoint          TEXT    NOT NULL,
    stream            INTEGER NOT NULL,
    status            INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    cost_nano_usd     INTEGER NOT NULL,
    token_source      TEXT    NOT NULL,
    latency_ms        INTEGER NOT NULL,
    end_user          TEXT
);

CREATE INDEX usage_created_at ON usage (created_at);
CREATE INDEX usage_team_created_at ON usage (team, created_at);
CREATE UNIQUE INDEX usage_request_id ON usage (request_id);
