-- tollgate on Postgres: the SQLite schema with native types, plus the shared
-- budget tables that let several replicas enforce one budget (SPEC section 5).
-- Money is integer nano-USD (BIGINT); times are timestamptz.

CREATE TABLE usage (
    id                BIGSERIAL   PRIMARY KEY,
    created_at        TIMESTAMPTZ NOT NULL,
    request_id        TEXT        NOT NULL,
    team              TEXT        NOT NULL,
    key_id            TEXT,
    model             TEXT        NOT NULL,
    base_model        TEXT        NOT NULL,
    upstream          TEXT        NOT NULL,
    endpoint          TEXT        NOT NULL,
    stream            BOOLEAN     NOT NULL,
    status            INTEGER     NOT NULL,
    prompt_tokens     BIGINT      NOT NULL,
    completion_tokens BIGINT      NOT NULL,
    cached_tokens     BIGINT      NOT NULL,
    cost_nano_usd     BIGINT      NOT NULL,
    token_source      TEXT        NOT NULL,
    latency_ms        BIGINT      NOT NULL,
    end_user          TEXT
);

CREATE INDEX usage_created_at ON usage (created_at);
CREATE INDEX usage_team_created_at ON usage (team, created_at);
CREATE UNIQUE INDEX usage_request_id ON usage (request_id);

CREATE TABLE teams (
    name              TEXT        PRIMARY KEY,
    budget_nano_usd   BIGINT,
    budget_period     TEXT,
    max_output_tokens BIGINT,
    created_at        TIMESTAMPTZ NOT NULL,
    updated_at        TIMESTAMPTZ NOT NULL
);

CREATE TABLE api_keys (
    id          TEXT        PRIMARY KEY,
    team        TEXT        NOT NULL REFERENCES teams (name),
    name        TEXT,
    key_hash    TEXT        NOT NULL UNIQUE,
    key_prefix  TEXT        NOT NULL,
    models      TEXT        NOT NULL DEFAULT '',
    created_at  TIMESTAMPTZ NOT NULL,
    revoked_at  TIMESTAMPTZ
);

-- Spend recorded per team and budget period ('total' or the period's start
-- as UTC text). The usage writer adds each batch's cost in the transaction
-- that inserts the rows.
CREATE TABLE budget_state (
    team    TEXT   NOT NULL,
    period  TEXT   NOT NULL,
    spent   BIGINT NOT NULL,
    PRIMARY KEY (team, period)
);

-- Budget each replica holds for requests in flight and costs not yet
-- written. Invariant: spent + SUM(leased) <= the team's limit. A replica
-- spends only from its lease, takes more under a row lock on budget_state,
-- returns what it does not use, and its lease shrinks by what its writer
-- records. Leases of replicas that stopped heartbeating are reclaimed.
CREATE TABLE budget_leases (
    team         TEXT        NOT NULL,
    period       TEXT        NOT NULL,
    node         TEXT        NOT NULL,
    leased       BIGINT      NOT NULL,
    heartbeat_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (team, period, node)
);
CREATE INDEX budget_leases_node ON budget_leases (node);
