-- The index of absolute (other servers') references holds only those, and covers what a search
-- driven from it reads (the principal date and the row id), like idx_ref_lookup does for local
-- references. Before, it held every reference row, local ones (url NULL) included, which no
-- search reads through it (a search by URL asks `url = ?`), yet every write put them there
-- (measured on a 50,000-message store with 32 concurrent creates: 15 of the ~226 pages each
-- group commit wrote to the write-ahead log); and SQLite preferred the covering idx_ref_lookup
-- over it, reading every entry of the parameter for one URL.
DROP INDEX idx_ref_url;
CREATE INDEX idx_ref_url ON idx_ref (param, url, at_hi, at_lo, rid) WHERE url IS NOT NULL;
