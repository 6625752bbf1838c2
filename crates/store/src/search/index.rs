//! What a resource contributes to the search index, computed from the registry's expressions.
//! Only codes, references, dates and (for string parameters, none of which select message text)
//! short strings are indexed.

use super::{dates, ParamType, Registry, SearchParam};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Entry {
    Token {
        param: String,
        system: Option<String>,
        code: String,
    },
    Ref {
        param: String,
        target_type: Option<String>,
        target_id: Option<String>,
        url: Option<String>,
    },
    Date {
        param: String,
        lo: i64,
        hi: i64,
    },
    Str {
        param: String,
        norm: String,
        raw: String,
    },
}

/// A reference split into its parts. A reference to this server (relative, or absolute under
/// `base_url`) has type and id and no url; an external one keeps its url.
#[derive(Debug, Clone, PartialEq)]
pub struct RefParts {
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub url: Option<String>,
}

pub fn parse_reference(reference: &str, base_url: &str) -> Option<RefParts> {
    if reference.starts_with('#') {
        return None; // contained: not searchable across resources
    }
    let local = reference
        .strip_prefix(base_url)
        .and_then(|r| r.strip_prefix('/'))
        .or_else(|| (!reference.contains(':')).then_some(reference));
    match local {
        Some(rel) => {
            let mut parts = rel.split('/');
            match (parts.next(), parts.next()) {
                (Some(t), Some(id)) if is_type_name(t) && fhir_codec::is_valid_id(id) => {
                    Some(RefParts {
                        target_type: Some(t.to_string()),
                        target_id: Some(id.to_string()),
                        url: None,
                    })
                }
                (Some(id), None) if fhir_codec::is_valid_id(id) => Some(RefParts {
                    target_type: None,
                    target_id: Some(id.to_string()),
                    url: None,
                }),
                _ => None,
            }
        }
        None => {
            // Absolute URL elsewhere (or urn:): keep the URL, plus type/id when it has that shape.
            let segs: Vec<&str> = reference
                .trim_end_matches('/')
                .rsplit('/')
                .take(4)
                .collect();
            let (t, id) = match segs.as_slice() {
                [_v, "_history", id, t, ..] if is_type_name(t) => {
                    (Some(t.to_string()), Some(id.to_string()))
                }
                [id, t, ..] if is_type_name(t) => (Some(t.to_string()), Some(id.to_string())),
                _ => (None, None),
            };
            Some(RefParts {
                target_type: t,
                target_id: id,
                url: Some(reference.to_string()),
            })
        }
    }
}

fn is_type_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Lower-cased, accents and punctuation folded to spaces: what `string` search compares.
pub fn normalize_string(s: &str) -> String {
    s.chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The most bytes (UTF-8) one indexed value may have: a token's code or system, a uri, a reference,
/// a string parameter's value. PostgreSQL's btree refuses an index row over 2,704 bytes
/// (`idx_token_lookup` holds code and system, `idx_ref_lookup` a reference's type, id and url), so
/// with every value at most 1,024 bytes a row stays well under it; SQLite has no such limit but gets
/// the same rule, so both backends answer alike. Writes with a longer value are refused
/// ([`check_indexable`]); search values longer than this are refused too (they could match nothing).
pub const MAX_INDEXED_BYTES: usize = 1024;

/// Can the index tables hold `s` on both backends (length, and no NUL, which PostgreSQL's text
/// type cannot store)?
pub fn fits(s: &str) -> bool {
    s.len() <= MAX_INDEXED_BYTES && !s.contains('\0')
}

impl Entry {
    /// The value of this entry the index cannot hold, if any.
    fn oversized(&self) -> Option<&str> {
        match self {
            Entry::Token { system, code, .. } => system
                .as_deref()
                .filter(|s| !fits(s))
                .or_else(|| (!fits(code)).then_some(code.as_str())),
            Entry::Ref {
                target_type,
                target_id,
                url,
                ..
            } => [target_type, target_id, url]
                .into_iter()
                .flatten()
                .find(|s| !fits(s))
                .map(String::as_str),
            Entry::Date { .. } => None,
            Entry::Str { norm, raw, .. } => (!fits(norm) || !fits(raw)).then_some(raw.as_str()),
        }
    }
}

/// Every value of `resource` that a search parameter indexes and that is longer than
/// [`MAX_INDEXED_BYTES`] (a reference is measured whole, indexed or not), each named by its path
/// (`Communication.identifier[0].value`). The write paths refuse such a resource with 400.
pub fn check_indexable(
    registry: &Registry,
    res_type: &str,
    resource: &Value,
    base_url: &str,
) -> Vec<fhir_codec::Issue> {
    let mut bad: Vec<String> = Vec::new();
    // Dates before the year 1 (`0000-…`): the time types parse them, FHIR's date, dateTime and
    // instant do not (their year is 0001–9999).
    let mut before_year_one: Vec<String> = Vec::new();
    for p in registry.indexed(res_type) {
        if p.kind == ParamType::Date {
            // The year as written (`0001-01-01T00:00:00+14:00` is year 0 in UTC, and valid).
            for v in p.expression.eval(resource) {
                if let Some(s) = v.as_str().filter(|s| s.starts_with("0000")) {
                    before_year_one.push(s.to_string());
                }
            }
        }
        if p.kind == ParamType::Reference {
            for v in p.expression.eval(resource) {
                if let Some(r) = v
                    .get("reference")
                    .and_then(Value::as_str)
                    .or_else(|| v.as_str())
                {
                    if !fits(r) {
                        bad.push(r.to_string());
                    }
                }
            }
        }
        let mut es = Vec::new();
        param_entries(p, resource, base_url, &mut es);
        bad.extend(es.iter().filter_map(Entry::oversized).map(String::from));
    }
    bad.sort();
    bad.dedup();
    before_year_one.sort();
    before_year_one.dedup();
    bad.iter()
        .map(|s| fhir_codec::Issue {
            code: "too-long",
            expression: path_of(resource, res_type, s).unwrap_or_else(|| res_type.to_string()),
            diagnostics: format!(
                "this searchable value is longer than {MAX_INDEXED_BYTES} bytes, the most this server indexes"
            ),
        })
        .chain(before_year_one.iter().map(|s| fhir_codec::Issue {
            code: "value",
            expression: path_of(resource, res_type, s).unwrap_or_else(|| res_type.to_string()),
            diagnostics: format!("'{s}' is not a FHIR date: years run from 0001 to 9999"),
        }))
        .collect()
}

/// The path of the first string equal to `needle` in `v` (`Type.a[0].b`).
fn path_of(v: &Value, path: &str, needle: &str) -> Option<String> {
    match v {
        Value::String(s) if s == needle => Some(path.to_string()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| path_of(x, &format!("{path}[{i}]"), needle)),
        Value::Object(o) => o
            .iter()
            .find_map(|(k, x)| path_of(x, &format!("{path}.{k}"), needle)),
        _ => None,
    }
}

/// Every index entry of `resource` (of type `res_type`).
pub fn entries(
    registry: &Registry,
    res_type: &str,
    resource: &Value,
    base_url: &str,
) -> Vec<Entry> {
    let mut out = Vec::new();
    for p in registry.indexed(res_type) {
        param_entries(p, resource, base_url, &mut out);
    }
    // The same value reached twice (e.g. two identical codings) is indexed once. A value the index
    // cannot hold is left out (the write paths refuse such resources first; this keeps the
    // server's own writes, such as AuditEvents, from failing on one).
    let mut seen = std::collections::HashSet::with_capacity(out.len());
    out.retain(|e| e.oversized().is_none() && seen.insert(e.clone()));
    out
}

/// The index entries of one search parameter of `resource`, appended to `out` (duplicates kept).
pub fn param_entries(p: &SearchParam, resource: &Value, base_url: &str, out: &mut Vec<Entry>) {
    for v in p.expression.eval(resource) {
        match p.kind {
            ParamType::Token => token_entries(&p.key, v, out),
            ParamType::Uri => {
                if let Some(s) = v.as_str() {
                    out.push(Entry::Token {
                        param: p.key.clone(),
                        system: None,
                        code: s.to_string(),
                    });
                }
            }
            ParamType::Reference => {
                let r = v
                    .get("reference")
                    .and_then(Value::as_str)
                    .or_else(|| v.as_str());
                if let Some(parts) = r.and_then(|r| parse_reference(r, base_url)) {
                    out.push(Entry::Ref {
                        param: p.key.clone(),
                        target_type: parts.target_type,
                        target_id: parts.target_id,
                        url: parts.url,
                    });
                }
            }
            ParamType::Date => {
                let range = match v {
                    Value::String(s) => dates::range(s),
                    Value::Object(o) => {
                        let lo = o
                            .get("start")
                            .and_then(Value::as_str)
                            .and_then(dates::range)
                            .map(|r| r.0);
                        let hi = o
                            .get("end")
                            .and_then(Value::as_str)
                            .and_then(dates::range)
                            .map(|r| r.1);
                        (lo.is_some() || hi.is_some())
                            .then(|| (lo.unwrap_or(dates::MIN), hi.unwrap_or(dates::MAX)))
                    }
                    _ => None,
                };
                if let Some((lo, hi)) = range {
                    out.push(Entry::Date {
                        param: p.key.clone(),
                        lo,
                        hi,
                    });
                }
            }
            ParamType::String => {
                let mut texts = Vec::new();
                string_leaves(v, &mut texts);
                for raw in texts {
                    let norm = normalize_string(raw);
                    if !norm.is_empty() {
                        out.push(Entry::Str {
                            param: p.key.clone(),
                            norm,
                            raw: raw.to_string(),
                        });
                    }
                }
            }
        }
    }
}

fn token_entries(param: &str, v: &Value, out: &mut Vec<Entry>) {
    let mut push = |system: Option<&str>, code: &str| {
        out.push(Entry::Token {
            param: param.to_string(),
            system: system.map(String::from),
            code: code.to_string(),
        })
    };
    match v {
        Value::String(s) => push(None, s),
        Value::Bool(b) => push(None, if *b { "true" } else { "false" }),
        Value::Object(o) => {
            if let Some(codings) = o.get("coding").and_then(Value::as_array) {
                for c in codings {
                    if let Some(code) = c.get("code").and_then(Value::as_str) {
                        push(c.get("system").and_then(Value::as_str), code);
                    }
                }
            } else if let Some(code) = o.get("code").and_then(Value::as_str) {
                push(o.get("system").and_then(Value::as_str), code); // Coding
            } else if let Some(value) = o.get("value").and_then(Value::as_str) {
                push(o.get("system").and_then(Value::as_str), value); // Identifier, ContactPoint
            }
        }
        _ => {}
    }
}

fn string_leaves<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| string_leaves(x, out)),
        Value::Object(o) => o
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .for_each(|(_, x)| string_leaves(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_to_this_server_are_local() {
        let base = "https://c.example/fhir";
        let p = parse_reference("https://c.example/fhir/Patient/7", base).unwrap();
        assert_eq!(
            (p.target_type.as_deref(), p.target_id.as_deref(), p.url),
            (Some("Patient"), Some("7"), None)
        );
        let p = parse_reference("Patient/7", base).unwrap();
        assert_eq!(p.url, None);
        let p = parse_reference("https://other/fhir/Patient/7", base).unwrap();
        assert_eq!(p.url.as_deref(), Some("https://other/fhir/Patient/7"));
        assert_eq!(p.target_id.as_deref(), Some("7"));
        assert!(parse_reference("#contained", base).is_none());
    }

    #[test]
    fn indexes_registry_parameters() {
        let reg = Registry::load().unwrap();
        let r = serde_json::json!({"resourceType":"Communication","status":"completed",
            "recipient":[{"reference":"Patient/1"}],"sent":"2024-01-01",
            "category":[{"coding":[{"system":"http://s","code":"c"}]}],
            "payload":[{"contentString":"secret text"}]});
        let e = entries(&reg, "Communication", &r, "http://x");
        assert!(e.contains(&Entry::Token {
            param: "Communication.status".into(),
            system: None,
            code: "completed".into()
        }));
        assert!(e.contains(&Entry::Token {
            param: "Communication.category".into(),
            system: Some("http://s".into()),
            code: "c".into()
        }));
        assert!(e
            .iter()
            .any(|x| matches!(x, Entry::Date { param, .. } if param == "Communication.sent")));
        assert!(e
            .iter()
            .any(|x| matches!(x, Entry::Ref { param, .. } if param == "Communication.recipient")));
        assert!(!format!("{e:?}").contains("secret"));
    }

    #[test]
    fn values_too_long_to_index_are_named_and_never_indexed() {
        let reg = Registry::load().unwrap();
        let long = "x".repeat(MAX_INDEXED_BYTES + 1);
        let r = serde_json::json!({"resourceType":"Communication","status":"completed",
            "identifier":[{"system":"http://s","value":"ok"},{"system":"http://s","value":long}],
            "recipient":[{"reference":format!("https://elsewhere.example/{long}")}]});
        let issues = check_indexable(&reg, "Communication", &r, "http://x");
        let mut exprs: Vec<&str> = issues.iter().map(|i| i.expression.as_str()).collect();
        exprs.sort();
        assert_eq!(
            exprs,
            vec![
                "Communication.identifier[1].value",
                "Communication.recipient[0].reference"
            ]
        );
        let e = entries(&reg, "Communication", &r, "http://x");
        assert!(e.iter().all(|x| x.oversized().is_none()));
        let at_limit = "y".repeat(MAX_INDEXED_BYTES);
        let r = serde_json::json!({"resourceType":"Communication","status":"completed",
            "identifier":[{"system":at_limit,"value":at_limit}]});
        assert!(check_indexable(&reg, "Communication", &r, "http://x").is_empty());
    }
}
