-- Usage v2 (SPEC 9): every billed dimension. Existing rows keep their
-- values; their new counts are 0 and their breakdown unknown ('{}').
ALTER TABLE usage ADD COLUMN service_tier TEXT;
ALTER TABLE usage ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN audio_prompt_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN audio_completion_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN cache_write_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN image_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage ADD COLUMN tool_calls INTEGER NOT NULL DEFAULT 0;
-- Every earlier row went through the one wire format tollgate spoke.
ALTER TABLE usage ADD COLUMN provider TEXT NOT NULL DEFAULT 'openai';
-- Component -> nano-USD, zero components omitted; the values sum to cost_nano_usd.
ALTER TABLE usage ADD COLUMN cost_breakdown TEXT NOT NULL DEFAULT '{}';
