-- Compact usage rows (SPEC 15): a plain row costs under 150 bytes with its
-- index. Every repeated string (team, key, model, provider, upstream,
-- endpoint, tier, end user) is a `names` id; tollgate's own request ids
-- are their prefix's name id and their counter in one integer, which is
-- the row's `id` and its only unique key; times are Unix milliseconds; a
-- plain row's cost lines and meters are columns, not JSON. The view
-- `usage` shows every row with the columns and values of before (SPEC 6
-- and 9), so readers of `usage` see no change. Existing rows are copied
-- (their request ids kept as names).
CREATE TABLE names (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

CREATE TABLE usage_rows (
    id INTEGER PRIMARY KEY, -- the request: its prefix's name id << 40 | its counter (tollgate's own ids), or minus the name id of 'request_id<US>batch_id'
    created_ms INTEGER NOT NULL, -- when the request arrived, Unix milliseconds
    cost_nano_usd INTEGER NOT NULL,
    cost_cached_input INTEGER, -- NULL: 0; with cost_output, the cost lines of a plain row
    cost_output INTEGER, -- NULL: 0
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
    status INTEGER NOT NULL,
    flags INTEGER NOT NULL, -- 1: stream, 2: capped, 4: token_source estimated
    attempts INTEGER, -- NULL: 1
    choices INTEGER, -- NULL: 1
    cost_breakdown TEXT, -- NULL: input, cached_input and output only (from the columns)
    meters TEXT -- NULL: input, cached_input and output only (from the token counts)
);

INSERT OR IGNORE INTO names (name)
SELECT team FROM usage WHERE team IS NOT NULL
UNION SELECT key_id FROM usage WHERE key_id IS NOT NULL
UNION SELECT model FROM usage WHERE model IS NOT NULL
UNION SELECT base_model FROM usage WHERE base_model IS NOT NULL
UNION SELECT upstream FROM usage WHERE upstream IS NOT NULL
UNION SELECT endpoint FROM usage WHERE endpoint IS NOT NULL
UNION SELECT provider FROM usage WHERE provider IS NOT NULL
UNION SELECT end_user FROM usage WHERE end_user IS NOT NULL
UNION SELECT service_tier FROM usage WHERE service_tier IS NOT NULL
UNION SELECT request_id || char(31) || batch_id FROM usage;

INSERT INTO usage_rows (id, created_ms, cost_nano_usd, team, key_id, model, base_model, upstream, endpoint, provider, prompt_tokens, completion_tokens, cached_tokens, latency_ms, end_user, service_tier, reasoning_tokens, audio_prompt_tokens, audio_completion_tokens, cache_write_tokens, image_tokens, tool_calls, status, flags, attempts, choices, cost_breakdown, meters)
SELECT -(SELECT id FROM names WHERE name = u.request_id || char(31) || u.batch_id),
       (CAST(strftime('%s', u.created_at) AS INTEGER) * 1000 + CAST(substr(u.created_at, 21, 3) AS INTEGER)),
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
       (u.stream + 2 * u.capped + 4 * (u.token_source = 'estimated')),
       u.attempts,
       u.choices,
       u.cost_breakdown,
       u.meters
FROM usage u;

DROP TABLE usage;
-- Reports' last partial hour, the request log and retention read by time.
CREATE INDEX usage_rows_created_ms ON usage_rows (created_ms);

CREATE VIEW usage AS SELECT
    u.id AS id,
    strftime('%Y-%m-%dT%H:%M:%S', u.created_ms / 1000, 'unixepoch') || '.' || printf('%03d', u.created_ms % 1000) || 'Z' AS created_at,
    u.created_ms AS created_ms,
    CASE WHEN u.id > 0 THEN p.name || printf('%08x', u.id & 1099511627775) ELSE substr(r.name, 1, instr(r.name, char(31)) - 1) END AS request_id,
    CASE WHEN u.id > 0 THEN '' ELSE substr(r.name, instr(r.name, char(31)) + 1) END AS batch_id,
    t.name AS team,
    k.name AS key_id,
    m.name AS model,
    COALESCE(bm.name, m.name) AS base_model,
    up.name AS upstream,
    e.name AS endpoint,
    u.flags & 1 AS stream,
    u.status AS status,
    u.prompt_tokens AS prompt_tokens,
    u.completion_tokens AS completion_tokens,
    COALESCE(u.cached_tokens, 0) AS cached_tokens,
    u.cost_nano_usd AS cost_nano_usd,
    CASE WHEN (u.flags & 4) = 4 THEN 'estimated' ELSE 'upstream' END AS token_source,
    u.latency_ms AS latency_ms,
    eu.name AS end_user,
    st.name AS service_tier,
    COALESCE(u.reasoning_tokens, 0) AS reasoning_tokens,
    COALESCE(u.audio_prompt_tokens, 0) AS audio_prompt_tokens,
    COALESCE(u.audio_completion_tokens, 0) AS audio_completion_tokens,
    COALESCE(u.cache_write_tokens, 0) AS cache_write_tokens,
    COALESCE(u.image_tokens, 0) AS image_tokens,
    COALESCE(u.tool_calls, 0) AS tool_calls,
    pr.name AS provider,
    COALESCE(u.cost_breakdown, '{' || rtrim(CASE WHEN (u.cost_nano_usd - COALESCE(u.cost_cached_input, 0) - COALESCE(u.cost_output, 0)) > 0 THEN '"input":' || CAST((u.cost_nano_usd - COALESCE(u.cost_cached_input, 0) - COALESCE(u.cost_output, 0)) AS TEXT) || ',' ELSE '' END || CASE WHEN COALESCE(u.cost_cached_input, 0) > 0 THEN '"cached_input":' || CAST(COALESCE(u.cost_cached_input, 0) AS TEXT) || ',' ELSE '' END || CASE WHEN COALESCE(u.cost_output, 0) > 0 THEN '"output":' || CAST(COALESCE(u.cost_output, 0) AS TEXT) || ',' ELSE '' END, ',') || '}') AS cost_breakdown,
    COALESCE(u.attempts, 1) AS attempts,
    COALESCE(u.choices, 1) AS choices,
    (u.flags >> 1) & 1 AS capped,
    COALESCE(u.meters, '{' || rtrim(CASE WHEN (u.prompt_tokens - COALESCE(u.cached_tokens, 0)) > 0 THEN '"input":' || CAST((u.prompt_tokens - COALESCE(u.cached_tokens, 0)) AS TEXT) || ',' ELSE '' END || CASE WHEN COALESCE(u.cached_tokens, 0) > 0 THEN '"cached_input":' || CAST(COALESCE(u.cached_tokens, 0) AS TEXT) || ',' ELSE '' END || CASE WHEN u.completion_tokens > 0 THEN '"output":' || CAST(u.completion_tokens AS TEXT) || ',' ELSE '' END, ',') || '}') AS meters
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
