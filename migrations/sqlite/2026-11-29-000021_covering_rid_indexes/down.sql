DROP INDEX idx_token_rid;
CREATE INDEX idx_token_rid ON idx_token (rid, param);
DROP INDEX idx_ref_rid;
CREATE INDEX idx_ref_rid ON idx_ref (rid, param);
DROP INDEX idx_string_rid;
CREATE INDEX idx_string_rid ON idx_string (rid, param);
