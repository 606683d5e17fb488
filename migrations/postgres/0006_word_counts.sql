-- See migrations/sqlite/0008_word_counts.sql.
CREATE TABLE word_counts (
    id BIGSERIAL PRIMARY KEY,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    team TEXT NOT NULL,
    family TEXT NOT NULL,
    script TEXT NOT NULL,
    side TEXT NOT NULL,
    samples BIGINT NOT NULL,
    words BIGINT NOT NULL,
    chars BIGINT NOT NULL,
    tokens BIGINT NOT NULL
);
CREATE INDEX word_counts_created_at ON word_counts (created_at);
