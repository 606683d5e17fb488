-- Fallbacks (SPEC 10); see migrations/sqlite/0006_attempts.sql.
ALTER TABLE usage ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
