-- Reports by key filter on created_at (usage_created_at) and group by key_id;
-- nothing looks rows up by key. One b-tree fewer per inserted usage row.
DROP INDEX IF EXISTS usage_key_created_at;
