DROP INDEX idx_ref_url;
CREATE INDEX idx_ref_url ON idx_ref (param, url);
