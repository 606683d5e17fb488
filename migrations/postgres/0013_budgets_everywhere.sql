-- Budgets at every level (SPEC 14). A request's tags (header
-- `x-tollgate-tags: a,b`) are stored in column `tags` of `usage` as a JSON
-- array of the sorted, distinct tags (`["a","b"]`), kept once in `names`;
-- NULL without tags. The view is the one before with `tags` added.
-- `budgets` holds the budgets of keys, end users and tags (a team's stays
-- on `teams`), each under its ledger account: `key:ID`, `user:TEAM:USER`
-- or `tag:TAG` (team names have no ':').
ALTER TABLE usage_rows ADD COLUMN tags INTEGER; -- names.id of the JSON array
DROP VIEW usage;
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
    COALESCE(u.meters, ('{' || rtrim(CASE WHEN (u.prompt_tokens - COALESCE(u.cached_tokens, 0)) > 0 THEN '"input":' || ((u.prompt_tokens - COALESCE(u.cached_tokens, 0)))::text || ',' ELSE '' END || CASE WHEN COALESCE(u.cached_tokens, 0) > 0 THEN '"cached_input":' || (COALESCE(u.cached_tokens, 0))::text || ',' ELSE '' END || CASE WHEN u.completion_tokens > 0 THEN '"output":' || (u.completion_tokens)::text || ',' ELSE '' END, ',') || '}')::jsonb) AS meters,
    tg.name AS tags
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
    LEFT JOIN names r ON u.id < 0 AND r.id = -u.id
    LEFT JOIN names tg ON tg.id = u.tags;

CREATE TABLE budgets (
    account TEXT PRIMARY KEY,
    budget_nano_usd BIGINT NOT NULL,
    budget_period TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
