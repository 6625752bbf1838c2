DROP TABLE idx_string; DROP TABLE idx_date; DROP TABLE idx_ref; DROP TABLE idx_token; DROP TABLE resource_versions; DROP TABLE resources; DROP TABLE data_keys;
