-- Each reference index row carries its resource's principal date (the lowest start and highest end
-- of Communication.sent, CommunicationRequest.authored or AuditEvent.date; NULL when it has none).
-- A search driven by a reference (the inbox: recipient=…&_sort=-sent) then sorts its matches from
-- the one index range it reads, instead of probing idx_date once per match. The list of
-- parameters is `search::REFERENCE_SORT_DATES`; the store fills the columns on every write.
ALTER TABLE idx_ref ADD COLUMN at_lo BIGINT, ADD COLUMN at_hi BIGINT;
UPDATE idx_ref x SET at_lo = d.lo, at_hi = d.hi
FROM (SELECT rid, MIN(lo) AS lo, MAX(hi) AS hi FROM idx_date
      WHERE param IN ('Communication.sent', 'CommunicationRequest.authored', 'AuditEvent.date')
      GROUP BY rid) d
WHERE d.rid = x.rid;
DROP INDEX idx_ref_lookup;
CREATE INDEX idx_ref_lookup ON idx_ref (param, target_id, target_type, url, at_hi, at_lo, rid);
