-- Identity mapping: Courier's own identities (patient, practitioner, related person), each linked to
-- the (EHR iss, EHR reference) pairs it is known by and to its business identifiers (MRN with its
-- system, NPI, …), so one person seen in two EHRs is one Courier identity.
CREATE TABLE identities (
    courier_ref TEXT PRIMARY KEY,
    kind        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE identity_links (
    iss         TEXT NOT NULL,
    ehr_ref     TEXT NOT NULL,
    courier_ref TEXT NOT NULL REFERENCES identities (courier_ref),
    PRIMARY KEY (iss, ehr_ref)
);
CREATE INDEX identity_links_courier ON identity_links (courier_ref, iss);

CREATE TABLE identity_identifiers (
    system      TEXT NOT NULL,
    value       TEXT NOT NULL,
    courier_ref TEXT NOT NULL REFERENCES identities (courier_ref),
    PRIMARY KEY (system, value)
);
CREATE INDEX identity_identifiers_courier ON identity_identifiers (courier_ref);

-- Refused links, for an administrator: one identifier (or one EHR record) claiming two identities.
CREATE TABLE identity_conflicts (
    id          TEXT PRIMARY KEY,
    at          BIGINT NOT NULL,
    iss         TEXT NOT NULL,
    ehr_ref     TEXT NOT NULL,
    claimed     TEXT NOT NULL,
    reason      TEXT NOT NULL
);
