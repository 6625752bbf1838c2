//! What the index tables store in place of a search parameter's key and of a well-known token
//! system: a short name. Each index row is stored two or three times (its table and its indexes),
//! and an AuditEvent has ten token rows, most of them `AuditEvent.entity-type` and a 50-character
//! code system URL: the long names were over half of what a message with its audit cost (issue 24,
//! docs/benchmarks.md).
//!
//! Everything above the SQL keeps the full names (`Communication.recipient`, the system's URL);
//! the names are exchanged only where SQL is written: the index rows the store inserts, and every
//! query that names a parameter or a system ([`key`], [`system`]).
//!
//! The lists are part of the stored data: a name, once given, is never changed or reused. A new
//! search parameter gets the next free name (a test and the registry's load refuse a parameter
//! without one), and migration `2026-12-09-000100_short_index_names` rewrote the rows stored
//! before, from these same lists (a test checks that it names each pair).

use std::collections::HashMap;
use std::sync::LazyLock;

/// Each search parameter's index key and the name its rows carry. Append only.
pub const KEYS: &[(&str, &str)] = &[
    ("AuditEvent.action", "1"),
    ("AuditEvent.address", "2"),
    ("AuditEvent.agent", "3"),
    ("AuditEvent.agent-name", "4"),
    ("AuditEvent.agent-role", "5"),
    ("AuditEvent.altid", "6"),
    ("AuditEvent.date", "7"),
    ("AuditEvent.entity", "8"),
    ("AuditEvent.entity-name", "9"),
    ("AuditEvent.entity-role", "10"),
    ("AuditEvent.entity-type", "11"),
    ("AuditEvent.outcome", "12"),
    ("AuditEvent.patient", "13"),
    ("AuditEvent.policy", "14"),
    ("AuditEvent.site", "15"),
    ("AuditEvent.source", "16"),
    ("AuditEvent.subtype", "17"),
    ("AuditEvent.type", "18"),
    ("CareTeam.participant", "19"),
    ("CareTeam.patient", "20"),
    ("Communication._security", "21"),
    ("Communication.attachment", "22"),
    ("Communication.based-on", "23"),
    ("Communication.category", "24"),
    ("Communication.encounter", "25"),
    ("Communication.identifier", "26"),
    ("Communication.in-response-to", "27"),
    ("Communication.instantiates-canonical", "28"),
    ("Communication.instantiates-uri", "29"),
    ("Communication.medium", "30"),
    ("Communication.part-of", "31"),
    ("Communication.patient", "32"),
    ("Communication.priority", "33"),
    ("Communication.received", "34"),
    ("Communication.recipient", "35"),
    ("Communication.sender", "36"),
    ("Communication.sent", "37"),
    ("Communication.status", "38"),
    ("Communication.subject", "39"),
    ("Communication.topic", "40"),
    ("CommunicationRequest._security", "41"),
    ("CommunicationRequest.attachment", "42"),
    ("CommunicationRequest.authored", "43"),
    ("CommunicationRequest.based-on", "44"),
    ("CommunicationRequest.category", "45"),
    ("CommunicationRequest.encounter", "46"),
    ("CommunicationRequest.group-identifier", "47"),
    ("CommunicationRequest.identifier", "48"),
    ("CommunicationRequest.medium", "49"),
    ("CommunicationRequest.occurrence", "50"),
    ("CommunicationRequest.patient", "51"),
    ("CommunicationRequest.priority", "52"),
    ("CommunicationRequest.recipient", "53"),
    ("CommunicationRequest.replaces", "54"),
    ("CommunicationRequest.requester", "55"),
    ("CommunicationRequest.sender", "56"),
    ("CommunicationRequest.status", "57"),
    ("CommunicationRequest.subject", "58"),
    ("Group.member", "59"),
    ("PractitionerRole.practitioner", "60"),
];

/// Code systems Courier's own resources use (the BALP AuditEvents above all) and the name their
/// token rows carry instead of the URL. Append only.
pub const SYSTEMS: &[(&str, &str)] = &[
    (
        "http://terminology.hl7.org/CodeSystem/audit-event-type",
        "~1",
    ),
    ("http://hl7.org/fhir/restful-interaction", "~2"),
    (
        "http://terminology.hl7.org/CodeSystem/audit-entity-type",
        "~3",
    ),
    ("http://terminology.hl7.org/CodeSystem/object-role", "~4"),
    (
        "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
        "~5",
    ),
    ("http://dicom.nema.org/resources/ontology/DCM", "~6"),
    (
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
        "~7",
    ),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "~8"),
    (
        "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
        "~9",
    ),
    (
        "http://terminology.hl7.org/CodeSystem/security-source-type",
        "~10",
    ),
    (
        "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
        "~11",
    ),
    ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "~12"),
    (
        "http://terminology.hl7.org/CodeSystem/communication-category",
        "~13",
    ),
    (
        "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode",
        "~14",
    ),
    ("urn:ietf:rfc:3986", "~15"),
    ("http://hl7.org/fhir/resource-types", "~16"),
    (
        "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
        "~17",
    ),
];

/// Resource types a reference names, and the name a reference row carries instead (`idx_ref.
/// target_type`; a row is stored twice, and most name a Patient, a Practitioner or a
/// Communication). A type not listed is stored as it is: a type's name starts with an upper-case
/// letter (`index::parse_reference`), a short name is digits, so neither can be taken for the
/// other. Append only.
pub const TYPES: &[(&str, &str)] = &[
    ("Patient", "1"),
    ("Practitioner", "2"),
    ("PractitionerRole", "3"),
    ("RelatedPerson", "4"),
    ("Communication", "5"),
    ("CommunicationRequest", "6"),
    ("Organization", "7"),
    ("CareTeam", "8"),
    ("Group", "9"),
    ("Device", "10"),
    ("Encounter", "11"),
    ("Binary", "12"),
    ("AuditEvent", "13"),
    ("Location", "14"),
    ("DocumentReference", "15"),
    ("Appointment", "16"),
    ("DiagnosticReport", "17"),
    ("Observation", "18"),
    ("MedicationRequest", "19"),
    ("ServiceRequest", "20"),
    ("Task", "21"),
    ("HealthcareService", "22"),
    ("Endpoint", "23"),
    ("Subscription", "24"),
];

/// The name a reference row carries for the resource type `t`.
pub fn ty(t: &str) -> &str {
    BY_TYPE.get(t).copied().unwrap_or(t)
}

/// The resource type a reference row's `target_type` names (the inverse of [`ty`]).
pub fn type_of(stored: &str) -> &str {
    TYPE_BY_NAME.get(stored).copied().unwrap_or(stored)
}

/// SQL for the resource type that the reference row column `col` (`x.target_type`) names: what
/// a query compares with `resources.res_type` or puts into a `Type/id` reference. NULL stays NULL.
pub fn type_sql(col: &str) -> String {
    format!("(CASE {col}{} ELSE {col} END)", *TYPE_WHENS)
}

/// SQL for the short name of the resource type in column `col` (`t.res_type`): what a reference
/// row pointing at that resource carries (the inverse of [`type_sql`], so a join from resources
/// to reference rows can use all of `idx_ref_lookup`'s leading columns).
pub fn short_type_sql(col: &str) -> String {
    format!("(CASE {col}{} ELSE {col} END)", *SHORT_WHENS)
}

static SHORT_WHENS: LazyLock<String> = LazyLock::new(|| {
    TYPES
        .iter()
        .map(|(t, n)| format!(" WHEN '{t}' THEN '{n}'"))
        .collect()
});
static TYPE_WHENS: LazyLock<String> = LazyLock::new(|| {
    TYPES
        .iter()
        .map(|(t, n)| format!(" WHEN '{n}' THEN '{t}'"))
        .collect()
});
static BY_TYPE: LazyLock<HashMap<&str, &str>> = LazyLock::new(|| TYPES.iter().copied().collect());
static TYPE_BY_NAME: LazyLock<HashMap<&str, &str>> =
    LazyLock::new(|| TYPES.iter().map(|(t, n)| (*n, *t)).collect());

/// The name index rows carry for the parameter `key`. A key without one (no such parameter) is
/// returned as it is: it contains a `.`, so it matches no stored row.
pub fn key(key: &str) -> &str {
    BY_KEY.get(key).copied().unwrap_or(key)
}

/// The lists as maps: each create looks up ~24 keys and ~12 systems on the single writer.
static BY_KEY: LazyLock<HashMap<&str, &str>> = LazyLock::new(|| KEYS.iter().copied().collect());
static BY_SYSTEM: LazyLock<HashMap<&str, &str>> =
    LazyLock::new(|| SYSTEMS.iter().copied().collect());

/// What `idx_token.system` holds for a token's system: `''` for none (the column is part of the
/// table's key, so never NULL), a well-known system's short name, any other system as it is — but
/// one that is empty or starts with `~` gets a `~` in front, so no system a client sends can be
/// stored as, or match, another one's name.
pub fn system(system: Option<&str>) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    match system {
        None => Cow::Borrowed(""),
        Some(s) => match BY_SYSTEM.get(s) {
            Some(name) => Cow::Borrowed(name),
            None if s.is_empty() || s.starts_with('~') => Cow::Owned(format!("~{s}")),
            None => Cow::Borrowed(s),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_parameter_has_one_name_and_names_are_distinct() {
        let reg = super::super::Registry::load().unwrap();
        let mut keys = HashSet::new();
        let mut names = HashSet::new();
        for (k, n) in KEYS {
            assert!(keys.insert(*k), "{k} listed twice");
            assert!(names.insert(*n), "name {n} given twice");
            assert!(!n.contains('.'), "{n}: a name must not look like a key");
        }
        for t in [
            "AuditEvent",
            "Communication",
            "CommunicationRequest",
            "CareTeam",
            "Group",
            "PractitionerRole",
        ] {
            for p in reg.indexed(t) {
                assert!(
                    keys.contains(p.key.as_str()),
                    "{} has no stored name",
                    p.key
                );
            }
        }
        let mut systems = HashSet::new();
        for (url, n) in SYSTEMS {
            assert!(systems.insert(*n), "system name {n} given twice");
            assert!(n.starts_with('~') && n[1..].chars().all(|c| c.is_ascii_digit()));
            assert!(url.contains(':'));
        }
    }

    #[test]
    fn no_client_system_can_be_stored_as_another() {
        assert_eq!(system(None), "");
        assert_eq!(
            system(Some("http://dicom.nema.org/resources/ontology/DCM")),
            "~6"
        );
        // A client's system that looks like a name, or is empty, is kept apart.
        assert_eq!(system(Some("~6")), "~~6");
        assert_eq!(system(Some("~~6")), "~~~6");
        assert_eq!(system(Some("")), "~");
        assert_eq!(system(Some("http://example.org/x")), "http://example.org/x");
        assert_eq!(key("Communication.recipient"), "35");
        assert_eq!(key("Nothing.such"), "Nothing.such");
    }

    /// Short type names are distinct digits, never a type's name; the SQL expression and the
    /// functions agree; the migration that rewrote the stored rows (and its down.sql) names each
    /// pair as the list does, once, on both backends.
    #[test]
    fn type_names_are_distinct_and_the_migration_uses_them() {
        let mut types = HashSet::new();
        let mut names = HashSet::new();
        for (t, n) in TYPES {
            assert!(types.insert(*t), "{t} listed twice");
            assert!(names.insert(*n), "type name {n} given twice");
            assert!(n.chars().all(|c| c.is_ascii_digit()), "{n}");
            assert!(t.starts_with(|c: char| c.is_ascii_uppercase()), "{t}");
            assert_eq!(type_of(ty(t)), *t);
            assert!(type_sql("x").contains(&format!(" WHEN '{n}' THEN '{t}'")));
        }
        assert_eq!(ty("Patient"), "1");
        assert_eq!(ty("Basic"), "Basic");
        assert_eq!(type_of("Basic"), "Basic");
        assert!(short_type_sql("x").contains(" WHEN 'Patient' THEN '1'"));
        // Rows stored before a type is listed carry its full name: a type appended to TYPES needs
        // a new migration that converts those rows (2026-12-13-000100 has run already and never
        // runs again). Add it, check it here, then raise this count.
        const CONVERTED_BY_2026_12_13: usize = 24;
        assert_eq!(
            TYPES.len(),
            CONVERTED_BY_2026_12_13,
            "a type was appended to TYPES: add a migration converting its stored rows"
        );
        for backend in ["sqlite", "postgres"] {
            for file in ["up.sql", "down.sql"] {
                let sql = std::fs::read_to_string(format!(
                    "{}/../../migrations/{backend}/2026-12-13-000100_reference_type_names/{file}",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap();
                assert_eq!(
                    sql.matches("\n    ('").count(),
                    CONVERTED_BY_2026_12_13,
                    "{backend} {file}"
                );
                for (t, n) in &TYPES[..CONVERTED_BY_2026_12_13] {
                    let pair = format!("('{t}', '{n}')");
                    assert_eq!(
                        sql.matches(pair.as_str()).count(),
                        1,
                        "{backend} {file}: {pair}"
                    );
                }
            }
        }
    }

    /// The migration that rewrote the rows stored before, and its down.sql, name each pair as the
    /// lists do, once, in the table both read their names from, on both backends (a name that
    /// differed would hide every older row from searches).
    #[test]
    fn the_migration_uses_the_same_names() {
        for backend in ["sqlite", "postgres"] {
            for file in ["up.sql", "down.sql"] {
                let sql = std::fs::read_to_string(format!(
                    "{}/../../migrations/{backend}/2026-12-09-000100_short_index_names/{file}",
                    env!("CARGO_MANIFEST_DIR")
                ))
                .unwrap();
                let rows = sql.matches("\n    ('").count();
                assert_eq!(
                    rows,
                    KEYS.len() + SYSTEMS.len(),
                    "{backend} {file}: pairs listed"
                );
                for (long, short) in KEYS.iter().chain(SYSTEMS) {
                    let pair = format!("('{long}', '{short}')");
                    assert_eq!(
                        sql.matches(pair.as_str()).count(),
                        1,
                        "{backend} {file}: {pair}"
                    );
                }
            }
        }
    }
}
