-- Issue 24: on SQLite the reference index table becomes a WITHOUT ROWID table keyed by
-- (rid, param, n), `n` numbering a resource's reference rows from 0. Its rows are then stored
-- twice (the table, keyed as the per-resource index idx_ref_rid was, and idx_ref_lookup) instead
-- of three times, and no index entry carries a rowid. A reference's type, id and url may each be
-- NULL, so they cannot be the key themselves (a WITHOUT ROWID key is NOT NULL); `n` makes each
-- row's key unique. PostgreSQL keeps its table (a heap has no such saving).
CREATE TABLE idx_ref_new (
    rid         BIGINT NOT NULL,
    param       TEXT NOT NULL,
    n           INTEGER NOT NULL,
    target_type TEXT,
    target_id   TEXT,
    url         TEXT,
    at_lo       BIGINT,
    at_hi       BIGINT,
    PRIMARY KEY (rid, param, n)
) WITHOUT ROWID;
INSERT INTO idx_ref_new (rid, param, n, target_type, target_id, url, at_lo, at_hi)
SELECT rid, param, ROW_NUMBER() OVER (PARTITION BY rid ORDER BY rowid) - 1, target_type, target_id, url, at_lo, at_hi
FROM idx_ref WHERE rid IS NOT NULL AND param IS NOT NULL;
DROP TABLE idx_ref;
ALTER TABLE idx_ref_new RENAME TO idx_ref;
CREATE INDEX idx_ref_lookup ON idx_ref (param, target_id, target_type, url, at_hi, at_lo, rid);
CREATE INDEX idx_ref_url ON idx_ref (param, url, at_hi, at_lo, rid) WHERE url IS NOT NULL;
