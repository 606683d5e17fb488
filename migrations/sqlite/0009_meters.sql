-- Every billed meter of a request, kept apart (SPEC 11): JSON object
-- meter -> count, zero meters omitted; '{}' for rows written before it.
ALTER TABLE usage ADD COLUMN meters TEXT NOT NULL DEFAULT '{}';
