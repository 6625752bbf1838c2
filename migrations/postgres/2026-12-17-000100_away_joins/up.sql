-- Threads a covering colleague joined while the clinician they cover for was away (the
-- out-of-office job adds the delegate to the thread's header). The row goes when the cover ends
-- (the clinician is back, or names another delegate): the delegate then leaves the thread again,
-- unless they wrote in it. Erased with the header.
CREATE TABLE away_joins (
    header_id TEXT NOT NULL,
    delegate TEXT NOT NULL,
    away TEXT NOT NULL,
    PRIMARY KEY (header_id, delegate, away)
);
CREATE INDEX away_joins_cover ON away_joins (away, delegate);
