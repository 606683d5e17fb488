-- Fallbacks (SPEC 10): how many upstreams were tried for the request.
ALTER TABLE usage ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
