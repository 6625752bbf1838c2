CREATE TABLE idx_ref_old (
    rid         BIGINT,
    param       TEXT,
    target_type TEXT,
    target_id   TEXT,
    url         TEXT,
    at_lo       BIGINT,
    at_hi       BIGINT
);
INSERT INTO idx_ref_old (rid, param, target_type, target_id, url, at_lo, at_hi)
SELECT rid, param, target_type, target_id, url, at_lo, at_hi FROM idx_ref ORDER BY rid, n;
DROP TABLE idx_ref;
ALTER TABLE idx_ref_old RENAME TO idx_ref;
CREATE INDEX idx_ref_rid ON idx_ref (rid, param);
CREATE INDEX idx_ref_lookup ON idx_ref (param, target_id, target_type, url, at_hi, at_lo, rid);
CREATE INDEX idx_ref_url ON idx_ref (param, url, at_hi, at_lo, rid) WHERE url IS NOT NULL;
