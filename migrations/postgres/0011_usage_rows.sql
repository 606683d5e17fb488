-- Compact usage rows (SPEC 15): a plain row costs under 150 bytes with its
-- index. Every repeated string (team, key, model, provider, upstream,
-- endpoint, tier, end user) is a `names` id; tollgate's own request ids
-- are their prefix's name id and their counter in one integer, which is
-- the row's `id` and its only unique key; times are Unix milliseconds; a
-- plain row's cost lines and meters are columns, not JSON. The view
-- `usage` shows every row with the columns and values of before (SPEC 6
-- and 9), so readers of `usage` see no change. Existing rows are copied
-- (their request ids kept as names).
-- On Postgres the rows are range-partitioned by month of created_ms
-- (`usage_rows_YYYY_MM`, created ahead by tollgate; retention drops them
-- whole), with a default partition for any row outside them. Each
-- partition has its own unique index on id: a row written twice (a spool
-- replay) has the same time, so the same partition.
CREATE TABLE names (
    id SERIAL PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE usage_rows (
    id BIGINT NOT NULL, -- the request: its prefix's name id << 40 | its counter (tollgate's own ids), or minus the name id of 'request_id<US>batch_id'
    created_ms BIGINT NOT NULL, -- when the request arrived, Unix milliseconds
    cost_nano_usd BIGINT NOT NULL,
    cost_cached_input BIGINT, -- NULL: 0; with cost_output, the cost lines of a plain row
    cost_output BIGINT, -- NULL: 0
    team INTEGER NOT NULL, -- names.id, as every name below
    key_id INTEGER,
    model INTEGER NOT NULL,
    base_model INTEGER, -- NULL: the model
    upstream INTEGER NOT NULL,
    endpoint INTEGER NOT NULL,
    provider INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER, -- NULL: 0, as every count below
    latency_ms INTEGER NOT NULL,
    end_user INTEGER,
    service_tier INTEGER,
    reasoning_tokens INTEGER,
    audio_prompt_tokens INTEGER,
    audio_completion_tokens INTEGER,
    cache_write_tokens INTEGER,
    image_tokens INTEGER,
    tool_calls INTEGER,
    status SMALLINT NOT NULL,
    flags SMALLINT NOT NULL, -- 1: stream, 2: capped, 4: token_source estimated
    attempts SMALLINT, -- NULL: 1
    choices SMALLINT, -- NULL: 1
    cost_breakdown JSONB, -- NULL: input, cached_input and output only (from the columns)
    meters JSONB -- NULL: input, cached_input and output only (from the token counts)
) PARTITION BY RANGE (created_ms);
CREATE TABLE usage_rows_default PARTITION OF usage_rows DEFAULT;
CREATE UNIQUE INDEX usage_rows_default_id ON usage_rows_default (id);
-- Time ranges: a BRIN index costs a few pages per partition, not bytes per row.
CREATE INDEX usage_rows_created_ms ON usage_rows USING brin (created_ms);

-- A partition for every month the existing rows are in, and this one.
DO $$
DECLARE
    m DATE;
    last DATE := date_trunc('month', now() AT TIME ZONE 'UTC')::date;
    name TEXT;
BEGIN
    SELECT COALESCE(date_trunc('month', MIN(created_at) AT TIME ZONE 'UTC')::date, last)
      INTO m FROM usage;
    WHILE m <= last LOOP
        name := 'usage_rows_' || to_char(m, 'YYYY_MM');
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_rows FOR VALUES FROM (%s) TO (%s)',
            name,
            (EXTRACT(EPOCH FROM m::timestamp AT TIME ZONE 'UTC') * 1000)::bigint,
            (EXTRACT(EPOCH FROM (m + INTERVAL '1 month')::timestamp AT TIME ZONE 'UTC') * 1000)::bigint);
        EXECUTE format('CREATE UNIQUE INDEX %I ON %I (id)', name || '_id', name);
        m := (m + INTERVAL '1 month')::date;
    END LOOP;
END
$$;

INSERT INTO names (name)
SELECT team FROM usage WHERE team IS NOT NULL
UNION SELECT key_id FROM usage WHERE key_id IS NOT NULL
UNION SELECT model FROM usage WHERE model IS NOT NULL
UNION SELECT base_model FROM usage WHERE base_model IS NOT NULL
UNION SELECT upstream FROM usage WHERE upstream IS NOT NULL
UNION SELECT endpoint FROM usage WHERE endpoint IS NOT NULL
UNION SELECT provider FROM usage WHERE provider IS NOT NULL
UNION SELECT end_user FROM usage WHERE end_user IS NOT NULL
UNION SELECT service_tier FROM usage WHERE service_tier IS NOT NULL
UNION SELECT request_id || chr(31) || batch_id FROM usage ON CONFLICT (name) DO NOTHING;

INSERT INTO usage_rows (id, created_ms, cost_nano_usd, team, key_id, model, base_model, upstream, endpoint, provider, prompt_tokens, completion_tokens, cached_tokens, latency_ms, end_user, service_tier, reasoning_tokens, audio_prompt_tokens, audio_completion_tokens, cache_write_tokens, image_tokens, tool_calls, status, flags, attempts, choices, cost_breakdown, meters)
SELECT -(SELECT id FROM names WHERE name = u.request_id || chr(31) || u.batch_id),
       CAST(EXTRACT(EPOCH FROM u.created_at) * 1000 AS BIGINT),
       u.cost_nano_usd,
       (SELECT id FROM names WHERE name = u.team),
       (SELECT id FROM names WHERE name = u.key_id),
       (SELECT id FROM names WHERE name = u.model),
       (SELECT id FROM names WHERE name = u.base_model),
       (SELECT id FROM names WHERE name = u.upstream),
       (SELECT id FROM names WHERE name = u.endpoint),
       (SELECT id FROM names WHERE name = u.provider),
       u.prompt_tokens,
       u.completion_tokens,
       u.cached_tokens,
       u.latency_ms,
       (SELECT id FROM names WHERE name = u.end_user),
       (SELECT id FROM names WHERE name = u.service_tier),
       u.reasoning_tokens,
       u.audio_prompt_tokens,
       u.audio_completion_tokens,
       u.cache_write_tokens,
       u.image_tokens,
       u.tool_calls,
       u.status,
       (CASE WHEN u.stream THEN 1 ELSE 0 END + CASE WHEN u.capped THEN 2 ELSE 0 END + CASE WHEN u.token_source = 'estimated' THEN 4 ELSE 0 END),
       u.attempts,
       u.choices,
       u.cost_breakdown,
       u.meters
FROM usage u;

DROP TABLE usage;

CREATE VIEW usage AS SELECT
    u.id AS id,
    TIMESTAMPTZ 'epoch' + u.created_ms * INTERVAL '1 millisecond' AS created_at,
    u.created_ms AS created_ms,
    CASE WHEN u.id > 0 THEN p.name || CASE WHEN length(to_hex(u.id & 1099511627775)) >= 8 THEN to_hex(u.id & 1099511627775) ELSE lpad(to_hex(u.id & 1099511627775), 8, '0') END ELSE split_part(r.name, chr(31), 1) END AS request_id,
    CASE WHEN u.id > 0 THEN '' ELSE split_part(r.name, chr(31), 2) END AS batch_id,
    t.name AS team,
    k.name AS key_id,
    m.name AS model,
    COALESCE(bm.name, m.name) AS base_model,
    up.name AS upstream,
    e.name AS endpoint,
    (u.flags & 1) = 1 AS stream,
    CAST(u.status AS INTEGER) AS status,
    CAST(u.prompt_tokens AS BIGINT) AS prompt_tokens,
    CAST(u.completion_tokens AS BIGINT) AS completion_tokens,
    CAST(COALESCE(u.cached_tokens, 0) AS BIGINT) AS cached_tokens,
    u.cost_nano_usd AS cost_nano_usd,
    CASE WHEN (u.flags & 4) = 4 THEN 'estimated' ELSE 'upstream' END AS token_source,
    CAST(u.latency_ms AS BIGINT) AS latency_ms,
    eu.name AS end_user,
    st.name AS service_tier,
    CAST(COALESCE(u.reasoning_tokens, 0) AS BIGINT) AS reasoning_tokens,
    CAST(COALESCE(u.audio_prompt_tokens, 0) AS BIGINT) AS audio_prompt_tokens,
    CAST(COALESCE(u.audio_completion_tokens, 0) AS BIGINT) AS audio_completion_tokens,
    CAST(COALESCE(u.cache_write_tokens, 0) AS BIGINT) AS cache_write_tokens,
    CAST(COALESCE(u.image_tokens, 0) AS BIGINT) AS image_tokens,
    CAST(COALESCE(u.tool_calls, 0) AS BIGINT) AS tool_calls,
    pr.name AS provider,
    COALESCE(u.cost_breakdown, ('{' || rtrim(CASE WHEN (u.cost_nano_usd - COALESCE(u.cost_cached_input, 0) - COALESCE(u.cost_output, 0)) > 0 THEN '"input":' || ((u.cost_nano_usd - COALESCE(u.cost_cached_input, 0) - COALESCE(u.cost_output, 0)))::text || ',' ELSE '' END || CASE WHEN COALESCE(u.cost_cached_input, 0) > 0 THEN '"cached_input":' || (COALESCE(u.cost_cached_input, 0))::text || ',' ELSE '' END || CASE WHEN COALESCE(u.cost_output, 0) > 0 THEN '"output":' || (COALESCE(u.cost_output, 0))::text || ',' ELSE '' END, ',') || '}')::jsonb) AS cost_breakdown,
    CAST(COALESCE(u.attempts, 1) AS INTEGER) AS attempts,
    CAST(COALESCE(u.choices, 1) AS INTEGER) AS choices,
    (u.flags & 2) = 2 AS capped,
    COALESCE(u.meters, ('{' || rtrim(CASE WHEN (u.prompt_tokens - COALESCE(u.cached_tokens, 0)) > 0 THEN '"input":' || ((u.prompt_tokens - COALESCE(u.cached_tokens, 0)))::text || ',' ELSE '' END || CASE WHEN COALESCE(u.cached_tokens, 0) > 0 THEN '"cached_input":' || (COALESCE(u.cached_tokens, 0))::text || ',' ELSE '' END || CASE WHEN u.completion_tokens > 0 THEN '"output":' || (u.completion_tokens)::text || ',' ELSE '' END, ',') || '}')::jsonb) AS meters
FROM usage_rows u
    JOIN names t ON t.id = u.team
    LEFT JOIN names k ON k.id = u.key_id
    JOIN names m ON m.id = u.model
    LEFT JOIN names bm ON bm.id = u.base_model
    JOIN names up ON up.id = u.upstream
    JOIN names e ON e.id = u.endpoint
    JOIN names pr ON pr.id = u.provider
    LEFT JOIN names eu ON eu.id = u.end_user
    LEFT JOIN names st ON st.id = u.service_tier
    LEFT JOIN names p ON u.id > 0 AND p.id = (u.id >> 40)
    LEFT JOIN names r ON u.id < 0 AND r.id = -u.id;
