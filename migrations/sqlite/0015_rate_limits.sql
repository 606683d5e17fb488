-- Rate limits (SPEC 14): requests and tokens per minute of a team or a key,
-- under its ledger account (a team's name, or `key:ID`). NULL: not limited.
CREATE TABLE rate_limits (
    account TEXT PRIMARY KEY,
    rpm BIGINT,
    tpm BIGINT
);
