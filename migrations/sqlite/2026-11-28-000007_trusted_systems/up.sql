-- The identifier systems an EHR is trusted for (space-separated): only identifiers in these
-- systems join a record to an identity another EHR brought (an enterprise MRN, NPI, …).
ALTER TABLE ehrs ADD COLUMN trusted_systems TEXT NOT NULL DEFAULT '';
