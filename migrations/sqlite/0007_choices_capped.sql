-- `tollgate numbers` (issue 15): choices asked for (`n`) and whether the
-- answer stopped at its output cap.
ALTER TABLE usage ADD COLUMN choices INTEGER NOT NULL DEFAULT 1;
ALTER TABLE usage ADD COLUMN capped INTEGER NOT NULL DEFAULT 0;
