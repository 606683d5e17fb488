-- Every batch updates its rollup rows again, so each row of usage_daily
-- leaves a dead version per batch. Half-empty pages let those updates be
-- HOT (no index entry, pruned inside the page), and vacuum runs on this
-- table after a fixed number of them instead of a share of a growing table.
ALTER TABLE usage_daily SET (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
