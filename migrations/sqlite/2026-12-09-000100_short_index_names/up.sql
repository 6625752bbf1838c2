-- Issue 24: the index rows carry short names for search parameters and for the code systems
-- Courier's own resources use (names.rs says why). A token without a system stores '' instead of
-- NULL, and a stored system that is empty or starts with '~' gets a '~' in front (as names::system).
-- On SQLite the token and date tables become WITHOUT ROWID tables keyed by what the per-resource
-- index held (rid, param, value): each row is stored twice (the table and its lookup index)
-- instead of three times.
-- Each full name and its short name, parameters (Type.code) and code systems (URIs): the lists
-- of crates/store/src/search/names.rs, which a test holds this table to.
CREATE TABLE migration_short_names (long TEXT PRIMARY KEY, short TEXT NOT NULL UNIQUE);
INSERT INTO migration_short_names (long, short) VALUES
    ('AuditEvent.action', '1'),
    ('AuditEvent.address', '2'),
    ('AuditEvent.agent', '3'),
    ('AuditEvent.agent-name', '4'),
    ('AuditEvent.agent-role', '5'),
    ('AuditEvent.altid', '6'),
    ('AuditEvent.date', '7'),
    ('AuditEvent.entity', '8'),
    ('AuditEvent.entity-name', '9'),
    ('AuditEvent.entity-role', '10'),
    ('AuditEvent.entity-type', '11'),
    ('AuditEvent.outcome', '12'),
    ('AuditEvent.patient', '13'),
    ('AuditEvent.policy', '14'),
    ('AuditEvent.site', '15'),
    ('AuditEvent.source', '16'),
    ('AuditEvent.subtype', '17'),
    ('AuditEvent.type', '18'),
    ('CareTeam.participant', '19'),
    ('CareTeam.patient', '20'),
    ('Communication._security', '21'),
    ('Communication.attachment', '22'),
    ('Communication.based-on', '23'),
    ('Communication.category', '24'),
    ('Communication.encounter', '25'),
    ('Communication.identifier', '26'),
    ('Communication.in-response-to', '27'),
    ('Communication.instantiates-canonical', '28'),
    ('Communication.instantiates-uri', '29'),
    ('Communication.medium', '30'),
    ('Communication.part-of', '31'),
    ('Communication.patient', '32'),
    ('Communication.priority', '33'),
    ('Communication.received', '34'),
    ('Communication.recipient', '35'),
    ('Communication.sender', '36'),
    ('Communication.sent', '37'),
    ('Communication.status', '38'),
    ('Communication.subject', '39'),
    ('Communication.topic', '40'),
    ('CommunicationRequest._security', '41'),
    ('CommunicationRequest.attachment', '42'),
    ('CommunicationRequest.authored', '43'),
    ('CommunicationRequest.based-on', '44'),
    ('CommunicationRequest.category', '45'),
    ('CommunicationRequest.encounter', '46'),
    ('CommunicationRequest.group-identifier', '47'),
    ('CommunicationRequest.identifier', '48'),
    ('CommunicationRequest.medium', '49'),
    ('CommunicationRequest.occurrence', '50'),
    ('CommunicationRequest.patient', '51'),
    ('CommunicationRequest.priority', '52'),
    ('CommunicationRequest.recipient', '53'),
    ('CommunicationRequest.replaces', '54'),
    ('CommunicationRequest.requester', '55'),
    ('CommunicationRequest.sender', '56'),
    ('CommunicationRequest.status', '57'),
    ('CommunicationRequest.subject', '58'),
    ('Group.member', '59'),
    ('PractitionerRole.practitioner', '60'),
    ('http://terminology.hl7.org/CodeSystem/audit-event-type', '~1'),
    ('http://hl7.org/fhir/restful-interaction', '~2'),
    ('http://terminology.hl7.org/CodeSystem/audit-entity-type', '~3'),
    ('http://terminology.hl7.org/CodeSystem/object-role', '~4'),
    ('https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType', '~5'),
    ('http://dicom.nema.org/resources/ontology/DCM', '~6'),
    ('http://terminology.hl7.org/CodeSystem/v3-ParticipationType', '~7'),
    ('http://terminology.hl7.org/CodeSystem/v3-ActCode', '~8'),
    ('http://terminology.hl7.org/CodeSystem/extra-security-role-type', '~9'),
    ('http://terminology.hl7.org/CodeSystem/security-source-type', '~10'),
    ('http://terminology.hl7.org/CodeSystem/provenance-participant-type', '~11'),
    ('http://terminology.hl7.org/CodeSystem/v3-ActReason', '~12'),
    ('http://terminology.hl7.org/CodeSystem/communication-category', '~13'),
    ('http://terminology.hl7.org/CodeSystem/v3-ParticipationMode', '~14'),
    ('urn:ietf:rfc:3986', '~15'),
    ('http://hl7.org/fhir/resource-types', '~16'),
    ('http://terminology.hl7.org/CodeSystem/v3-Confidentiality', '~17');

CREATE TABLE idx_token_new (
    rid    BIGINT NOT NULL,
    param  TEXT NOT NULL,
    code   TEXT NOT NULL,
    system TEXT NOT NULL,
    PRIMARY KEY (rid, param, code, system)
) WITHOUT ROWID;
INSERT OR IGNORE INTO idx_token_new (rid, param, code, system)
SELECT rid, COALESCE((SELECT n.short FROM migration_short_names n WHERE n.long = idx_token.param), idx_token.param), code,
    CASE WHEN idx_token.system IS NULL THEN ''
        WHEN idx_token.system = '' OR substr(idx_token.system, 1, 1) = '~' THEN '~' || idx_token.system
        ELSE COALESCE((SELECT n.short FROM migration_short_names n WHERE n.long = idx_token.system), idx_token.system) END
FROM idx_token;
DROP TABLE idx_token;
ALTER TABLE idx_token_new RENAME TO idx_token;
CREATE INDEX idx_token_lookup ON idx_token (param, code, system, rid);

CREATE TABLE idx_date_new (
    rid   BIGINT NOT NULL,
    param TEXT NOT NULL,
    lo    BIGINT NOT NULL,
    hi    BIGINT NOT NULL,
    PRIMARY KEY (rid, param, lo, hi)
) WITHOUT ROWID;
INSERT OR IGNORE INTO idx_date_new (rid, param, lo, hi)
SELECT rid, COALESCE((SELECT n.short FROM migration_short_names n WHERE n.long = idx_date.param), idx_date.param), lo, hi FROM idx_date;
DROP TABLE idx_date;
ALTER TABLE idx_date_new RENAME TO idx_date;
CREATE INDEX idx_date_lo ON idx_date (param, lo, rid);

UPDATE idx_ref SET param = COALESCE((SELECT n.short FROM migration_short_names n WHERE n.long = idx_ref.param), idx_ref.param);
UPDATE idx_string SET param = COALESCE((SELECT n.short FROM migration_short_names n WHERE n.long = idx_string.param), idx_string.param);
DROP TABLE migration_short_names;
