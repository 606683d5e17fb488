-- Budget alerts (SPEC 14): one row per webhook, budget, period and
-- threshold crossed, claimed by the replica that first saw the crossing
-- (the primary key makes the claim exclusive across replicas and
-- restarts) and marked delivered once the receiver answered 2xx. The body
-- is kept so a retry, by this replica or another after a crash, sends the
-- same alert. `target` is a hash of the webhook URL (the URL may hold a
-- secret); `account` the budget's ledger account (a team's name, `key:ID`,
-- `user:TEAM:USER`, `tag:TAG`); `period` 'total' or the period's start.
CREATE TABLE alerts_sent (
    target TEXT NOT NULL,
    account TEXT NOT NULL,
    period TEXT NOT NULL,
    threshold_ppm BIGINT NOT NULL,
    body TEXT NOT NULL,
    claimed_by TEXT NOT NULL,
    claimed_ms BIGINT NOT NULL,
    delivered_ms BIGINT,
    attempts INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (target, account, period, threshold_ppm)
);
