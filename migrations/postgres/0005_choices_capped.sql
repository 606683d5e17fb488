-- See migrations/sqlite/0007_choices_capped.sql.
ALTER TABLE usage ADD COLUMN choices INTEGER NOT NULL DEFAULT 1;
ALTER TABLE usage ADD COLUMN capped BOOLEAN NOT NULL DEFAULT FALSE;
