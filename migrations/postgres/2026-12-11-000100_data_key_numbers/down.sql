ALTER TABLE resource_versions ADD COLUMN key_id TEXT;
UPDATE resource_versions v SET key_id = k.key_id FROM data_keys k WHERE k.n = v.key_n;
UPDATE resource_versions SET key_id = '' WHERE key_id IS NULL;
ALTER TABLE resource_versions ALTER COLUMN key_id SET NOT NULL;
DROP INDEX resource_versions_key;
ALTER TABLE resource_versions DROP COLUMN key_n;
CREATE INDEX resource_versions_key ON resource_versions (key_id);
DROP INDEX data_keys_n;
ALTER TABLE data_keys DROP COLUMN n;
