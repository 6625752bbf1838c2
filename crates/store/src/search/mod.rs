//! Search parameters are data: the `SearchParameter` resources in `fhir-profiles/` drive what is
//! indexed ([`index`]), what a query may say ([`query`]), how it runs ([`sql`]) and what the
//! CapabilityStatement lists.

pub mod dates;
pub mod fhirpath;
pub mod index;
pub mod names;
pub mod query;
pub mod sql;

use fhirpath::Expression;
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
