-- Issue 24: `patient` is `subject` (or, for an AuditEvent, an agent or entity) that points at a
-- Patient, so its index rows repeated those rows. They are no longer stored: a search on
-- `patient` reads the base parameters' rows of type Patient (crates/store/src/search/mod.rs,
-- ALIASES). Short names (names.rs): '13' AuditEvent.patient, '32' Communication.patient,
-- '51' CommunicationRequest.patient.
DELETE FROM idx_ref WHERE param IN ('13', '32', '51');
