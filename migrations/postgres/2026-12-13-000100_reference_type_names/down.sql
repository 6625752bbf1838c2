-- Undoes 2026-12-13-000100: reference rows name their target's type in full again.
CREATE TABLE reference_type_names (long TEXT PRIMARY KEY, short TEXT NOT NULL);
INSERT INTO reference_type_names (long, short) VALUES
    ('Patient', '1'),
    ('Practitioner', '2'),
    ('PractitionerRole', '3'),
    ('RelatedPerson', '4'),
    ('Communication', '5'),
    ('CommunicationRequest', '6'),
    ('Organization', '7'),
    ('CareTeam', '8'),
    ('Group', '9'),
    ('Device', '10'),
    ('Encounter', '11'),
    ('Binary', '12'),
    ('AuditEvent', '13'),
    ('Location', '14'),
    ('DocumentReference', '15'),
    ('Appointment', '16'),
    ('DiagnosticReport', '17'),
    ('Observation', '18'),
    ('MedicationRequest', '19'),
    ('ServiceRequest', '20'),
    ('Task', '21'),
    ('HealthcareService', '22'),
    ('Endpoint', '23'),
    ('Subscription', '24');
UPDATE idx_ref SET target_type = (SELECT n.long FROM reference_type_names n WHERE n.short = idx_ref.target_type)
WHERE target_type IN (SELECT short FROM reference_type_names);
DROP TABLE reference_type_names;
