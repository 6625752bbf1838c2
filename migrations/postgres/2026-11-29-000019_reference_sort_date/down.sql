DROP INDEX idx_ref_lookup;
CREATE INDEX idx_ref_lookup ON idx_ref (param, target_id, target_type, rid);
ALTER TABLE idx_ref DROP COLUMN at_hi, DROP COLUMN at_lo;
