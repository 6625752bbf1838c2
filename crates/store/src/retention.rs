//! Retention classes: which class a resource belongs to, and how long the class is kept.
//!
//! A class names a period after which its data is destroyed. Communications and
//! CommunicationRequests take the first class whose `categories` list one of their category codes,
//! else the class whose `types` list their type; other resources take the class listing their type.
//! A resource in no class is in the `system` class and kept (Groups, CareTeams, PractitionerRoles).
//! The class also scopes the data key a version is sealed with (see `store::keys`), so expiring
//! data can be crypto-erased. The classes are published in the CapabilityStatement (extension
//! `retention-policy`) and their codes in the CodeSystem `retention-class`.

use serde::Deserialize;
use serde_json::{json, Value};

/// Code system of the retention classes.
pub const CLASS_SYSTEM: &str = "https://courier.example.org/fhir/CodeSystem/retention-class";
/// Extension on the CapabilityStatement that states each class's period and what it covers.
pub const POLICY_EXTENSION: &str =
    "https://courier.example.org/fhir/StructureDefinition/retention-policy";
/// The class of data without a retention period, and of Courier's own secrets.
pub const SYSTEM: &str = "system";
/// The class the audit trail is in by default (its purge also cuts the audit chain).
pub const AUDIT: &str = "audit";

const DAY_MICROS: i64 = 86_400 * 1_000_000;

/// One retention class (a `[[retention]]` table of the config file).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetentionClass {
    /// The class code, e.g. `message`.
    pub class: String,
    /// Days after its last change that a resource of this class is destroyed; none: kept.
    pub days: Option<i64>,
    /// Resource types in this class.
    #[serde(default)]
    pub types: Vec<String>,
    /// Communication / CommunicationRequest category codes that put a message in this class.
    #[serde(default)]
    pub categories: Vec<String>,
}

/// The built-in classes: messages (with their attachments) 6 years, appointment notices 2 years,
/// the audit trail 6 years (HIPAA §164.316(b)(2): six years).
pub fn defaults() -> Vec<RetentionClass> {
    vec![
        RetentionClass {
            class: "notification".into(),
            days: Some(730),
            types: vec![],
            categories: vec!["appointment".into()],
        },
        RetentionClass {
            class: "message".into(),
            days: Some(2190),
            types: vec![
                "Communication".into(),
                "CommunicationRequest".into(),
                "Binary".into(),
            ],
            categories: vec![],
        },
        RetentionClass {
            class: AUDIT.into(),
            days: Some(2190),
            types: vec!["AuditEvent".into()],
            categories: vec![],
        },
    ]
}

/// Parses `COURIER_RETENTION`: `class=days[:Type|Type][@category|category]` entries separated by
/// `;`, `days` a number or `never`. Example:
/// `notification=730@appointment;message=2190:Communication|CommunicationRequest|Binary;audit=2190:AuditEvent`.
pub fn parse_env(text: &str) -> anyhow::Result<Vec<RetentionClass>> {
    let mut out = vec![];
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (class, rest) = entry.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("COURIER_RETENTION entry '{entry}' is not class=days…")
        })?;
        let (rest, categories) = match rest.split_once('@') {
            Some((r, c)) => (r, c.split('|').map(str::to_string).collect()),
            None => (rest, vec![]),
        };
        let (days, types) = match rest.split_once(':') {
            Some((d, t)) => (d, t.split('|').map(str::to_string).collect()),
            None => (rest, vec![]),
        };
        let days = match days.trim() {
            "never" => None,
            d => Some(d.parse().map_err(|_| {
                anyhow::anyhow!("COURIER_RETENTION: days of class '{class}' must be a number or 'never', got '{d}'")
            })?),
        };
        out.push(RetentionClass {
            class: class.trim().to_string(),
            days,
            types,
            categories,
        });
    }
    Ok(out)
}

/// The configured classes, checked.
#[derive(Debug, Clone)]
pub struct Policy {
    pub classes: Vec<RetentionClass>,
}

impl Policy {
    pub fn new(classes: Vec<RetentionClass>) -> anyhow::Result<Policy> {
        let mut seen = std::collections::HashSet::new();
        for c in &classes {
            anyhow::ensure!(
                !c.class.is_empty()
                    && c.class.len() <= 64
                    && c.class
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_'),
                "retention class '{}' must be letters, digits, '-' or '_'",
                c.class
            );
            anyhow::ensure!(
                c.class != SYSTEM,
                "retention class 'system' is reserved (data kept without a period)"
            );
            anyhow::ensure!(
                seen.insert(c.class.clone()),
                "retention class '{}' is defined twice",
                c.class
            );
            if let Some(d) = c.days {
                anyhow::ensure!(
                    d >= 1,
                    "retention class '{}': days must be at least 1",
                    c.class
                );
            }
        }
        Ok(Policy { classes })
    }

    /// The class of a resource of type `res_type` with body `body` (none: a deletion, which the
    /// caller gives the class of the version it deletes).
    pub fn class_of(&self, res_type: &str, body: &Value) -> &str {
        if matches!(res_type, "Communication" | "CommunicationRequest") {
            let codes: Vec<&str> = body["category"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| c["coding"].as_array().into_iter().flatten())
                .filter_map(|c| c["code"].as_str())
                .collect();
            if let Some(c) = self
                .classes
                .iter()
                .find(|c| c.categories.iter().any(|k| codes.contains(&k.as_str())))
            {
                return &c.class;
            }
        }
        self.classes
            .iter()
            .find(|c| c.types.iter().any(|t| t == res_type))
            .map_or(SYSTEM, |c| &c.class)
    }

    /// The class's period in microseconds; none: kept.
    pub fn period(&self, class: &str) -> Option<i64> {
        self.classes
            .iter()
            .find(|c| c.class == class)
            .and_then(|c| c.days)
            .map(|d| d.saturating_mul(DAY_MICROS))
    }

    /// The CapabilityStatement extension stating each class.
    pub fn extension(&self) -> Vec<Value> {
        self.classes
            .iter()
            .map(|c| {
                let mut ext = vec![json!({"url": "class", "valueCoding": {"system": CLASS_SYSTEM, "code": c.class}})];
                if let Some(d) = c.days {
                    ext.push(json!({"url": "period", "valueDuration": {"value": d, "unit": "d", "system": "http://unitsofmeasure.org", "code": "d"}}));
                }
                for t in &c.types {
                    ext.push(json!({"url": "resourceType", "valueCode": t}));
                }
                for k in &c.categories {
                    ext.push(json!({"url": "category", "valueCode": k}));
                }
                json!({"url": POLICY_EXTENSION, "extension": ext})
            })
            .collect()
    }
}

/// The end (exclusive, in microseconds) of the calendar month (UTC) holding `micros`: the write
/// window of a scoped data key.
pub fn window_end(micros: i64) -> i64 {
    use chrono::{Datelike, TimeZone, Utc};
    let t = Utc
        .timestamp_micros(micros)
        .single()
        .unwrap_or_else(Utc::now);
    let (y, m) = if t.month() == 12 {
        (t.year() + 1, 1)
    } else {
        (t.year(), t.month() + 1)
    };
    Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
        .single()
        .map_or(i64::MAX, |d| d.timestamp_micros())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_category_class_wins_over_the_type_class_and_unlisted_types_are_kept() {
        let p = Policy::new(defaults()).unwrap();
        let reminder = json!({"category": [{"coding": [{"code": "appointment"}]}]});
        assert_eq!(p.class_of("Communication", &reminder), "notification");
        assert_eq!(p.class_of("Communication", &json!({})), "message");
        assert_eq!(p.class_of("Binary", &reminder), "message");
        assert_eq!(p.class_of("AuditEvent", &json!({})), "audit");
        assert_eq!(p.class_of("Group", &json!({})), "system");
        assert_eq!(p.period("message"), Some(2190 * DAY_MICROS));
        assert_eq!(p.period("system"), None);
    }

    #[test]
    fn the_environment_form_parses_and_bad_entries_are_refused() {
        let c = parse_env("short=1@appointment|results; keep=never:Binary ;audit=10:AuditEvent")
            .unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].categories, vec!["appointment", "results"]);
        assert_eq!(c[1].days, None);
        assert_eq!(c[1].types, vec!["Binary"]);
        assert!(parse_env("x=soon").is_err());
        assert!(parse_env("nodays").is_err());
        assert!(Policy::new(parse_env("system=3").unwrap()).is_err());
        assert!(Policy::new(parse_env("a=3;a=4").unwrap()).is_err());
        assert!(Policy::new(parse_env("a=0").unwrap()).is_err());
    }

    #[test]
    fn a_write_window_ends_at_the_next_month() {
        // 2026-11-28T12:00:00Z → 2026-12-01; 2026-12-31 → 2027-01-01.
        assert_eq!(window_end(1_795_867_200_000_000), 1_796_083_200_000_000);
        assert_eq!(window_end(1_798_675_200_000_000), 1_798_761_600_000_000);
    }
}
