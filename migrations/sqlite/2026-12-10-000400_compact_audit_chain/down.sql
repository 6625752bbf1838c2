ALTER TABLE audit_chain ADD COLUMN audit_id TEXT NOT NULL DEFAULT '';
UPDATE audit_chain SET audit_id = COALESCE((SELECT r.fhir_id FROM resource_versions v JOIN resources r ON r.rid = v.rid WHERE v.vid = audit_chain.vid), '');
UPDATE audit_chain SET hash = lower(hex(hash));
