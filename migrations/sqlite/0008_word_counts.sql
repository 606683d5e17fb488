-- `tollgate numbers` (issue 15): tokens per word, counted on sampled
-- requests off the request path and summed per flush. Counts only: the
-- text itself is never stored.
CREATE TABLE word_counts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    team TEXT NOT NULL,
    -- The model's tokenizer family (`openai-o200k`, `claude`, `llama`, ...).
    family TEXT NOT NULL,
    -- The writing system most of the text's letters are in.
    script TEXT NOT NULL,
    -- `prompt` or `completion`.
    side TEXT NOT NULL,
    samples INTEGER NOT NULL,
    words INTEGER NOT NULL,
    chars INTEGER NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX word_counts_created_at ON word_counts (created_at);
