//! Search parameters are data: the `SearchParameter` resources in `fhir-profiles/` drive what is
//! indexed ([`index`]), what a query may say ([`query`]), how it runs ([`sql`]) and what the
//! CapabilityStatement lists.

pub mod dates;
pub mod eval;
pub mod fhirpath;
pub mod index;
pub mod names;
pub mod query;
pub mod sql;

use fhirpath::Expression;
use query::{Condition, TokenValue};
use serde_json::Value;
use std::collections::BTreeMap;

include!(concat!(env!("OUT_DIR"), "/profiles.rs"));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Token,
    Reference,
    Date,
    String,
    Uri,
}

impl ParamType {
    fn parse(s: &str) -> Option<ParamType> {
        Some(match s {
            "token" => ParamType::Token,
            "reference" => ParamType::Reference,
            "date" => ParamType::Date,
            "string" => ParamType::String,
            "uri" => ParamType::Uri,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ParamType::Token => "token",
            ParamType::Reference => "reference",
            ParamType::Date => "date",
            ParamType::String => "string",
            ParamType::Uri => "uri",
        }
    }
}

/// The principal date of each resource type that has one, as the index key of its date parameter.
/// Every reference index row of a resource carries this date's lowest start and highest end
/// (`idx_ref.at_lo`/`at_hi`, NULL when the resource has none), so a search driven by a reference
/// that sorts by this date — the inbox, `recipient=…&_sort=-sent` — sorts the matches it read from
/// one index range instead of looking each one up in `idx_date`. Migration 000019 backfills the
/// same list.
pub const REFERENCE_SORT_DATES: [&str; 3] = [
    "Communication.sent",
    "CommunicationRequest.authored",
    "AuditEvent.date",
];

/// The principal date's index key for `res_type` (see [`REFERENCE_SORT_DATES`]).
pub fn reference_sort_date(res_type: &str) -> Option<&'static str> {
    REFERENCE_SORT_DATES.iter().copied().find(|k| {
        k.strip_prefix(res_type)
            .and_then(|r| r.strip_prefix('.'))
            .is_some()
    })
}

/// Parameters whose index rows would repeat another parameter's rows of one target type, and
/// so are not stored (issue 24: a message's patient was indexed twice, as `subject` and as
/// `patient`, and so was an AuditEvent's, as `entity` and as `patient`). A search, `:missing` or
/// `_include` on one reads the rows of its base parameters that point at the target type
/// ([`sql`], `Store::follow`); the in-memory evaluation (`index::entries`) still computes it from
/// its own expression. [`Registry::load`] checks that each definition is exactly
/// `<base>.where(resolve() is <type>)` (joined by `|` for several bases).
pub const ALIASES: [(&str, &[&str], &str); 3] = [
    (
        "AuditEvent.patient",
        &["AuditEvent.agent", "AuditEvent.entity"],
        "Patient",
    ),
    (
        "Communication.patient",
        &["Communication.subject"],
        "Patient",
    ),
    (
        "CommunicationRequest.patient",
        &["CommunicationRequest.subject"],
        "Patient",
    ),
];

/// The base parameters and target type of `key` when it is one of [`ALIASES`].
pub fn alias_of(key: &str) -> Option<(&'static [&'static str], &'static str)> {
    ALIASES
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, bases, t)| (*bases, *t))
}

/// Parameters that have no index rows: a search checks them on the bodies of the candidates the
/// other conditions select ([`eval`]), in `Store::search`. Issue 24: an AuditEvent — one per
/// read, search and write — stored ~17 index rows, ~1.1 KB, most of them the same few codes
/// on every event (type `rest`, the agent names and addresses, the entity types and roles). Its
/// references (`agent`, `entity`, `source`, and `patient` through them), its `date` and its
/// `outcome` (a failure is the rare value a security review looks for) keep their rows: BALP's
/// searches are by patient, user, resource and time, and those select the candidates.
pub const UNSTORED: [&str; 12] = [
    "AuditEvent.action",
    "AuditEvent.address",
    "AuditEvent.agent-name",
    "AuditEvent.agent-role",
    "AuditEvent.altid",
    "AuditEvent.entity-name",
    "AuditEvent.entity-role",
    "AuditEvent.entity-type",
    "AuditEvent.policy",
    "AuditEvent.site",
    "AuditEvent.subtype",
    "AuditEvent.type",
];

/// Parameters whose most common value has no index rows: an AuditEvent's `outcome` is `0`
/// (success) on nearly every event, so a row for it selected nothing and cost ~32 B per event on
/// SQLite and ~130 B on PostgreSQL (issue 24). Its other values keep their rows (a failure is the
/// rare value a security review looks for), and an event without an outcome has one row with the
/// empty code ([`SPARSE_MISSING`]), so that "no row" means exactly the common value. The SQL of
/// a search reads conditions on these parameters in that stored form ([`stored_form`]); checks
/// in memory ([`eval`]) see every value, as before.
pub const SPARSE: [(&str, &str); 1] = [("AuditEvent.outcome", "0")];

/// The code of the row that stands for "no value" of a [`SPARSE`] parameter.
pub const SPARSE_MISSING: &str = "";

/// The value of `key` that has no rows, when `key` is one of [`SPARSE`].
pub fn sparse_of(key: &str) -> Option<&'static str> {
    SPARSE.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
}

/// `c` as the stored rows of [`SPARSE`] parameters answer it, or `None` when `c` names none of
/// them. For a sparse parameter `p` whose common value is `z`:
///
/// - `p=z` matches a resource with no row for `p`; `p=a,z` a row for `a` or none;
/// - `p:not=z` a resource with some row (another value, or the empty code of "no value");
/// - `p:missing=true` the empty code's row, `p:missing=false` anything without it.
///
/// A value with a system never matches `z`, whose rows (had they been stored) carry none.
/// Applied once, where the SQL is made: its `Missing` means "no row", not "no value".
pub fn stored_form(c: &Condition) -> Option<Condition> {
    match c {
        Condition::AnyOf(groups) => {
            if !groups.iter().flatten().any(|c| stored_form(c).is_some()) {
                return None;
            }
            Some(Condition::AnyOf(
                groups
                    .iter()
                    .map(|g| {
                        g.iter()
                            .map(|c| stored_form(c).unwrap_or_else(|| c.clone()))
                            .collect()
                    })
                    .collect(),
            ))
        }
        Condition::Token { key, not, values } => {
            let z = sparse_of(key)?;
            let is_z = |v: &TokenValue| match v {
                TokenValue::Code(c) | TokenValue::SystemCode(None, Some(c)) => c == z,
                _ => false,
            };
            if !values.iter().any(is_z) {
                return None;
            }
            let none = |missing: bool| Condition::Missing {
                key: key.clone(),
                kind: ParamType::Token,
                missing,
            };
            let others: Vec<TokenValue> = values.iter().filter(|v| !is_z(v)).cloned().collect();
            let rest = |not: bool| Condition::Token {
                key: key.clone(),
                not,
                values: others.clone(),
            };
            Some(match (*not, others.is_empty()) {
                (false, true) => none(true),
                (false, false) => Condition::AnyOf(vec![vec![none(true)], vec![rest(false)]]),
                (true, true) => none(false),
                (true, false) => Condition::AnyOf(vec![vec![none(false), rest(true)]]),
            })
        }
        Condition::Missing { key, missing, .. } => {
            sparse_of(key)?;
            Some(Condition::Token {
                key: key.clone(),
                not: !*missing,
                values: vec![TokenValue::SystemCode(
                    None,
                    Some(SPARSE_MISSING.to_string()),
                )],
            })
        }
        _ => None,
    }
}

/// Is `key` one of [`UNSTORED`]?
pub fn is_unstored(key: &str) -> bool {
    UNSTORED.contains(&key)
}

/// One search parameter of one resource type.
#[derive(Debug, Clone)]
pub struct SearchParam {
    pub code: String,
    pub base: String,
    pub kind: ParamType,
    pub url: String,
    pub description: String,
    pub expression: Expression,
    pub targets: Vec<String>,
    /// The name its index rows carry: `Communication.recipient`.
    pub key: String,
}

impl SearchParam {
    /// `_id` and `_lastUpdated` live on the resource row itself, not in the index tables.
    pub fn is_resource_level(&self) -> bool {
        self.base == "Resource"
    }
}

/// Every search parameter the server supports, by resource type and code.
#[derive(Debug, Default)]
pub struct Registry {
    by_type: BTreeMap<String, BTreeMap<String, SearchParam>>,
    common: BTreeMap<String, SearchParam>,
}

impl Registry {
    /// Loads the embedded `fhir-profiles/SearchParameter/*.json`. A definition the engine cannot run
    /// (unsupported type or expression) is a start-up error, so the CapabilityStatement never lists
    /// a parameter that does not work.
    pub fn load() -> anyhow::Result<Registry> {
        let mut reg = Registry::default();
        let mut raw_expressions: BTreeMap<String, String> = BTreeMap::new();
        for (name, text) in PROFILES {
            let v: Value =
                serde_json::from_str(text).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            if v["resourceType"] != "SearchParameter" {
                continue;
            }
            let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            let kind = ParamType::parse(&s("type")).ok_or_else(|| {
                anyhow::anyhow!(
                    "{name}: search parameter type '{}' is not supported",
                    s("type")
                )
            })?;
            let expression = Expression::compile(&s("expression"))
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            let targets = v["target"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|t| t.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for base in v["base"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let p = SearchParam {
                    code: s("code"),
                    base: base.to_string(),
                    kind,
                    url: s("url"),
                    description: s("description"),
                    expression: expression.clone(),
                    targets: Vec::clone(&targets),
                    key: format!("{base}.{}", s("code")),
                };
                raw_expressions.insert(p.key.clone(), s("expression"));
                if base == "Resource" {
                    reg.common.insert(p.code.clone(), p);
                } else {
                    reg.by_type
                        .entry(base.to_string())
                        .or_default()
                        .insert(p.code.clone(), p);
                }
            }
        }
        // Index rows carry a short name for each parameter (names.rs): one without a name would
        // be stored under its full key, which no migration expects.
        for p in reg.by_type.values().flat_map(|m| m.values()) {
            if names::key(&p.key) == p.key {
                anyhow::bail!(
                    "{}: no short name for its index rows in crates/store/src/search/names.rs",
                    p.key
                );
            }
        }
        for key in UNSTORED {
            if !raw_expressions.contains_key(key) {
                anyhow::bail!("{key} (search::UNSTORED) is not a search parameter");
            }
        }
        for (key, bases, target) in ALIASES {
            let expected: Vec<String> = bases
                .iter()
                .map(|b| {
                    let base = raw_expressions.get(*b).map(String::as_str).unwrap_or("?");
                    format!("{base}.where(resolve() is {target})")
                })
                .collect();
            if raw_expressions.get(key) != Some(&expected.join(" | ")) {
                anyhow::bail!(
                    "{key}: stored as its base parameters' rows of type {target} (search::ALIASES), \
                     but its expression is not {}",
                    expected.join(" | ")
                );
            }
        }
        for key in REFERENCE_SORT_DATES {
            let (base, code) = key.split_once('.').expect("Type.code");
            match reg.by_type.get(base).and_then(|m| m.get(code)) {
                Some(p) if p.kind == ParamType::Date => {}
                _ => anyhow::bail!(
                    "{key}: the principal date of {base} is not a date search parameter"
                ),
            }
        }
        Ok(reg)
    }

    /// The parameter `code` of `res_type` (type-specific first, then `_id`/`_lastUpdated`).
    pub fn get(&self, res_type: &str, code: &str) -> Option<&SearchParam> {
        self.by_type
            .get(res_type)
            .and_then(|m| m.get(code))
            .or_else(|| self.common.get(code))
    }

    /// The name the index rows of the parameter `code` of `res_type` carry ([`names::key`]), for
    /// SQL written by hand; empty (it matches no row) when there is no such parameter.
    pub fn index_name(&self, res_type: &str, code: &str) -> String {
        self.get(res_type, code)
            .map(|p| names::key(&p.key).to_string())
            .unwrap_or_default()
    }

    /// Type-specific parameters of `res_type` (those that are indexed).
    pub fn indexed(&self, res_type: &str) -> impl Iterator<Item = &SearchParam> {
        self.by_type
            .get(res_type)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// The index keys of every reference parameter (what points at a resource from elsewhere).
    pub fn reference_keys(&self) -> Vec<String> {
        self.by_type
            .values()
            .flat_map(|m| m.values())
            .filter(|p| p.kind == ParamType::Reference)
            .map(|p| p.key.clone())
            .collect()
    }

    /// All parameters usable on `res_type`, for the CapabilityStatement.
    pub fn all_for(&self, res_type: &str) -> Vec<&SearchParam> {
        self.common.values().chain(self.indexed(res_type)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::index::Entry;
    use super::query::{Condition, TokenValue};
    use super::*;

    const OUTCOME: &str = "AuditEvent.outcome";

    /// An event's entries with outcome `o`, as searched in memory, and as stored.
    fn event(o: Option<&str>) -> (Vec<Entry>, Vec<Entry>) {
        let date = Entry::Date {
            param: "AuditEvent.date".into(),
            lo: 1,
            hi: 2,
        };
        let tok = |code: &str| Entry::Token {
            param: OUTCOME.into(),
            system: None,
            code: code.into(),
        };
        let all = o.map(tok).into_iter().chain([date.clone()]).collect();
        let stored = match o {
            Some("0") => vec![date],
            Some(c) => vec![tok(c), date],
            None => vec![tok(SPARSE_MISSING), date],
        };
        (all, stored)
    }

    #[test]
    fn a_sparse_parameter_searched_in_its_stored_form_matches_as_on_every_value() {
        let code = |c: &str| TokenValue::Code(c.into());
        let no_system = |c: &str| TokenValue::SystemCode(None, Some(c.into()));
        let with_system = |c: &str| {
            TokenValue::SystemCode(
                Some("http://hl7.org/fhir/audit-event-outcome".into()),
                Some(c.into()),
            )
        };
        let token = |not, values: Vec<TokenValue>| Condition::Token {
            key: OUTCOME.into(),
            not,
            values,
        };
        let missing = |missing| Condition::Missing {
            key: OUTCOME.into(),
            kind: ParamType::Token,
            missing,
        };
        let mut conditions = vec![missing(true), missing(false)];
        for not in [false, true] {
            for values in [
                vec![code("0")],
                vec![no_system("0")],
                vec![with_system("0")],
                vec![code("4")],
                vec![code("0"), code("4")],
                vec![code("8"), no_system("0")],
                vec![code("12"), code("4")],
            ] {
                conditions.push(token(not, values));
            }
        }
        // The policy's groups (a token scope `?outcome=0`) are rewritten inside.
        conditions.push(Condition::AnyOf(vec![
            vec![token(false, vec![code("0")])],
            vec![missing(true)],
        ]));
        let events = [None, Some("0"), Some("4"), Some("8"), Some("12")];
        let mut changed = 0;
        for c in &conditions {
            let s = stored_form(c);
            changed += usize::from(s.is_some());
            let s = s.unwrap_or_else(|| c.clone());
            for o in events {
                let (all, stored) = event(o);
                assert_eq!(
                    eval::admits(&s, &stored, None),
                    eval::admits(c, &all, None),
                    "{c:?} on outcome {o:?}: stored form {s:?}"
                );
            }
        }
        assert!(
            changed >= 10,
            "most of these need the stored form ({changed})"
        );
        // Other parameters are left as they are.
        let status = Condition::Token {
            key: "Communication.status".into(),
            not: false,
            values: vec![code("0")],
        };
        assert!(stored_form(&status).is_none());
    }

    #[test]
    fn the_migration_names_the_sparse_parameter_by_its_short_key() {
        for backend in ["sqlite", "postgres"] {
            for file in ["up.sql", "down.sql"] {
                let path = format!(
                    "{}/../../migrations/{backend}/2026-12-14-000100_audit_outcome_sparse/{file}",
                    env!("CARGO_MANIFEST_DIR")
                );
                let sql = std::fs::read_to_string(&path).unwrap();
                let (key, zero) = SPARSE[0];
                assert!(sql.contains(&format!("'{}'", names::key(key))), "{path}");
                assert!(sql.contains(&format!("code = '{SPARSE_MISSING}'")) || file == "up.sql");
                assert!(sql.contains(&format!("'{zero}'")), "{path}");
                assert_eq!(names::system(None), "");
            }
        }
    }
}
