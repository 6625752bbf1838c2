-- Issue 20. What the web app shows of a person (name, birth date, gender, MRN, role), read from
-- the EHR at each launch, sealed (AES-256-GCM under Courier's system data key). Purged with the
-- person's erasure, and when not refreshed within the message retention period.
CREATE TABLE person_summaries (
    courier_ref TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- A patient's care team as their EHR lists it (CareTeam.participant.member, read at launch):
-- whom the patient may pick to write to.
CREATE TABLE care_team_members (
    patient_ref TEXT NOT NULL,
    member_ref  TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (patient_ref, member_ref)
);
-- "Mark unread": the user's own flag on a message they read. The read receipt its sender saw
-- stays true; only the user's unread count and list change. Reading it again clears the flag.
ALTER TABLE receipts ADD COLUMN unread_mark BIGINT;
