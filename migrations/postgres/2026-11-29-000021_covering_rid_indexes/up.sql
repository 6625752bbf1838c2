-- The (rid, param) index of the token table also holds the code and system, so that checking one
-- resource against a token condition beside the one that drives a search (`status=completed`
-- for each of a recipient's messages) reads only the index and not the table row as well.
-- Measured on a 1,000,000-message store, `status=completed` checked for a recipient's ~1,000
-- messages: 106–112 ms with the table rows, 5.7–6.3 ms without (first read through a new
-- connection). idx_date_rid already held (lo, hi). References are never probed per row (they
-- stay short lists) and strings seldom are, so idx_ref_rid and idx_string_rid stay narrow: the
-- three together cost 5–8% of creates/s at 32 clients.
DROP INDEX idx_token_rid;
CREATE INDEX idx_token_rid ON idx_token (rid, param, code, system);
