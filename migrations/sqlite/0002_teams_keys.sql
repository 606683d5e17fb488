-- Teams (with at most one budget) and virtual API keys (stored only as hashes).
CREATE TABLE teams (
    name              TEXT    PRIMARY KEY,
    budget_nano_usd   INTEGER,
    budget_period     TEXT,
    max_output_tokens INTEGER,
    created_at        TEXT    NOT NULL,
    updated_at        TEXT    NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    team        TEXT NOT NULL REFERENCES teams (name),
    name        TEXT,
    key_hash    TEXT NOT NULL UNIQUE,
    key_prefix  TEXT NOT NULL,
    models      TEXT NOT NULL DEFAULT '',
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE INDEX usage_key_created_at ON usage (key_id, created_at);
