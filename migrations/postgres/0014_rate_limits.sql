-- Rate limits (SPEC 14): requests and tokens per minute of a team or a key,
-- under its ledger account (a team's name, or `key:ID`). NULL: not limited.
CREATE TABLE rate_limits (
    account TEXT PRIMARY KEY,
    rpm BIGINT,
    tpm BIGINT
);

-- What every replica was granted of each limit in each UTC minute
-- (window_ms: the minute's start, Unix ms). Grants are taken under a row
-- lock and never pass the limit, so the replicas together never admit
-- more than it; windows older than ten minutes are deleted.
CREATE TABLE rate_windows (
    account TEXT NOT NULL,
    window_ms BIGINT NOT NULL,
    requests BIGINT NOT NULL,
    tokens BIGINT NOT NULL,
    PRIMARY KEY (account, window_ms)
);
