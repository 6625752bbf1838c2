-- Out-of-office: which (message, recipient) pairs were answered automatically (once each).
CREATE TABLE away_handled (
    comm_id   TEXT NOT NULL,
    recipient TEXT NOT NULL,
    at        BIGINT NOT NULL,
    PRIMARY KEY (comm_id, recipient)
);
