//! Parses a FHIR search query (`GET` query string or `POST _search` form) against the registry.
//! Multiple values in one parameter (`a,b`) are OR; a repeated parameter is AND.

use super::index::{parse_reference, RefParts};
use super::{dates, ParamType, Registry, SearchParam};
use fhir_codec::Issue;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
    Sa,
    Eb,
    Ap,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenValue {
    /// `code`: any system.
    Code(String),
    /// `system|code`, `|code` (no system), `system|` (any code in system).
    SystemCode(Option<String>, Option<String>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringMatch {
    Prefix,
    Exact,
    Contains,
}

#[derive(Debug, Clone)]
pub enum Condition {
    Token {
        key: String,
        not: bool,
        values: Vec<TokenValue>,
    },
    Reference {
        key: String,
        values: Vec<RefParts>,
    },
    Date {
        key: String,
        values: Vec<(Prefix, i64, i64)>,
    },
    Str {
        key: String,
        mode: StringMatch,
        values: Vec<String>,
    },
    Missing {
        key: String,
        kind: ParamType,
        missing: bool,
    },
    Id {
        not: bool,
        ids: Vec<String>,
    },
    LastUpdated(Vec<(Prefix, i64, i64)>),
    /// Any of the groups, each a conjunction. Never parsed from a query: the access policy adds it
    /// to confine a search to what the token may see (an empty list matches nothing).
    AnyOf(Vec<Vec<Condition>>),
}

#[derive(Debug, Clone)]
pub enum SortKey {
    Param {
        key: String,
        kind: ParamType,
        descending: bool,
    },
    Id {
        descending: bool,
    },
    LastUpdated {
        descending: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Include {
    /// The type whose reference parameter is followed (`Communication` in `Communication:part-of`).
    pub source_type: String,
    pub param_key: String,
    pub target_type: Option<String>,
    pub iterate: bool,
    pub reverse: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Total {
    None,
    Accurate,
}

#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub conditions: Vec<Condition>,
    pub sort: Vec<SortKey>,
    pub count: usize,
    pub offset: usize,
    /// The highest row id visible to this search: pages after the first keep the first page's view,
    /// so messages that arrive while a client pages do not shift or duplicate entries.
    pub snapshot: Option<i64>,
    pub total: Total,
    pub summary_count: bool,
    pub includes: Vec<Include>,
    /// Parameters that were used, normalised, for the `self` link (paging parameters excluded).
    pub used: Vec<(String, String)>,
    /// Parameters that were ignored (lenient handling), reported in the Bundle.
    pub ignored: Vec<Issue>,
    /// What `_include`/`_revinclude` may reach, by type: `None` reaches everything; otherwise only
    /// the types listed, each limited by its condition if any. Set by the access policy, so that
    /// `:iterate` never walks through a resource the caller may not see.
    pub include_access: Option<std::collections::HashMap<String, Option<Condition>>>,
}

impl SearchRequest {
    /// Confines the search by the access policy's condition `c`, leaving out the parts of it that
    /// the search's own conditions already imply: in `recipient=Practitioner/x` searched by
    /// Practitioner/x, the compartment's "x is a recipient" holds for every match, so the SQL
    /// does not test it again for each (what is left: "and it is not someone else's draft").
    /// Only exact implications are used (a reference or positive token condition whose values
    /// are a subset of the policy's), so the result matches exactly the same resources.
    pub fn confine(&mut self, c: Condition) {
        if let Some(c) = without_implied(&self.conditions, c) {
            self.conditions.push(c);
        }
    }

    /// A search for `conditions` alone: no sort, includes or paging state, `count` results.
    pub fn of(conditions: Vec<Condition>, count: usize) -> SearchRequest {
        SearchRequest {
            conditions,
            sort: vec![],
            count,
            offset: 0,
            snapshot: None,
            total: Total::None,
            summary_count: false,
            includes: vec![],
            used: vec![],
            ignored: vec![],
            include_access: None,
        }
    }
}

/// Deepest page offset honoured (deeper paging should narrow the search instead).
pub const MAX_OFFSET: usize = 10_000_000;
/// Most values one parameter may carry, and most parameters one search may have.
pub const MAX_VALUES: usize = 100;
pub const MAX_PARAMS: usize = 50;

pub struct Limits {
    pub default_count: usize,
    pub max_count: usize,
    pub strict: bool,
}

/// Parses `pairs` (already URL-decoded) for a search on `res_type`.
pub fn parse(
    registry: &Registry,
    res_type: &str,
    pairs: &[(String, String)],
    base_url: &str,
    limits: &Limits,
) -> Result<SearchRequest, Vec<Issue>> {
    let mut req = SearchRequest::of(vec![], limits.default_count);
    let mut errors = Vec::new();
    if pairs.len() > MAX_PARAMS {
        return Err(vec![Issue {
            code: "too-costly",
            expression: String::new(),
            diagnostics: format!("a search may have at most {MAX_PARAMS} parameters"),
        }]);
    }
    for (name, value) in pairs {
        // NUL cannot even be compared by PostgreSQL; no stored string holds a control character.
        if fhir_codec::has_control_chars(name) || fhir_codec::has_control_chars(value) {
            errors.push(Issue {
                code: "invalid",
                expression: if fhir_codec::has_control_chars(name) {
                    String::new()
                } else {
                    name.clone()
                },
                diagnostics: "search parameters may not contain control characters".into(),
            });
            continue;
        }
        let (code, modifier) = match name.split_once(':') {
            Some((c, m)) => (c, Some(m)),
            None => (name.as_str(), None),
        };
        let bad = |msg: String| Issue {
            code: "invalid",
            expression: name.clone(),
            diagnostics: msg,
        };
        let result: Result<bool, Issue> = match code {
            "_count" => value
                .parse::<usize>()
                .map(|n| {
                    req.count = n.min(limits.max_count);
                    if n == 0 {
                        req.summary_count = true;
                    }
                    true
                })
                .map_err(|_| {
                    bad(format!(
                        "_count must be a non-negative integer, not '{value}'"
                    ))
                }),
            "_offset" => match value.parse::<usize>() {
                Ok(n) if n <= MAX_OFFSET => {
                    req.offset = n;
                    Ok(false)
                }
                _ => Err(bad(format!(
                    "_offset must be an integer from 0 to {MAX_OFFSET}"
                ))),
            },
            "_snapshot" => match value.parse::<i64>() {
                Ok(n) if n >= 0 => {
                    req.snapshot = Some(n);
                    Ok(false)
                }
                _ => Err(bad("_snapshot must be a non-negative integer".into())),
            },
            "_total" => match value.as_str() {
                "none" | "estimate" => {
                    req.total = Total::None;
                    Ok(true)
                }
                "accurate" => {
                    req.total = Total::Accurate;
                    Ok(true)
                }
                _ => Err(bad(format!(
                    "_total must be none, estimate or accurate, not '{value}'"
                ))),
            },
            "_summary" => match value.as_str() {
                "count" => {
                    req.summary_count = true;
                    Ok(true)
                }
                "false" => Ok(true),
                _ => Err(bad(format!(
                    "_summary={value} is not supported (supported: count, false)"
                ))),
            },
            "_format" | "_pretty" => Ok(false),
            "_sort" => parse_sort(registry, res_type, value)
                .map(|s| {
                    req.sort = s;
                    true
                })
                .map_err(bad),
            "_include" | "_revinclude" => {
                let iterate = match modifier {
                    None => false,
                    Some("iterate") | Some("recurse") => true,
                    Some(m) => return Err(vec![bad(format!("unknown modifier ':{m}' on {code}"))]),
                };
                parse_include(registry, value, iterate, code == "_revinclude")
                    .map(|inc| {
                        req.includes.push(inc);
                        true
                    })
                    .map_err(bad)
            }
            _ if code.starts_with('_') && registry.get(res_type, code).is_none() => Err(Issue {
                code: "not-supported",
                expression: name.clone(),
                diagnostics: format!("parameter '{code}' is not supported"),
            }),
            _ => match registry.get(res_type, code) {
                None => Err(Issue {
                    code: "not-supported",
                    expression: name.clone(),
                    diagnostics: format!("unknown search parameter '{code}' for {res_type}"),
                }),
                Some(p) => parse_condition(p, modifier, value, base_url)
                    .map(|c| {
                        req.conditions.push(c);
                        true
                    })
                    .map_err(bad),
            },
        };
        match result {
            Ok(true) => req.used.push((name.clone(), value.clone())),
            Ok(false) => {}
            Err(issue) if issue.code == "not-supported" && !limits.strict => {
                req.ignored.push(issue)
            }
            Err(issue) => errors.push(issue),
        }
    }
    if errors.is_empty() {
        Ok(req)
    } else {
        Err(errors)
    }
}

/// Splits on commas not escaped with `\`, and unescapes `\,` `\|` `\$` `\\`.
pub fn split_values(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n @ (',' | '$' | '\\')) => out.last_mut().unwrap().push(n),
                Some('|') => out.last_mut().unwrap().push_str("\\|"),
                Some(n) => {
                    out.last_mut().unwrap().push('\\');
                    out.last_mut().unwrap().push(n);
                }
                None => out.last_mut().unwrap().push('\\'),
            },
            ',' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

fn parse_condition(
    p: &SearchParam,
    modifier: Option<&str>,
    value: &str,
    base_url: &str,
) -> Result<Condition, String> {
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(format!(":missing takes true or false, not '{value}'")),
        };
        if p.is_resource_level() {
            return Err(format!(
                "{} is never missing; :missing is not supported on it",
                p.code
            ));
        }
        return Ok(Condition::Missing {
            key: p.key.clone(),
            kind: p.kind,
            missing,
        });
    }
    let values = split_values(value);
    if values.len() > MAX_VALUES {
        return Err(format!("at most {MAX_VALUES} values per parameter"));
    }
    if values.iter().any(String::is_empty) {
        return Err(format!("empty value in '{value}'"));
    }
    // No stored value is longer (see index::MAX_INDEXED_BYTES); a token may be `system|code`.
    let max = super::index::MAX_INDEXED_BYTES;
    let token = matches!(p.kind, ParamType::Token) && p.code != "_id";
    if values.iter().any(|v| {
        if token {
            match split_token(v) {
                Some((sys, code)) => sys.len() > max || code.is_some_and(|c| c.len() > max),
                None => v.len() > max,
            }
        } else {
            v.len() > max
        }
    }) {
        return Err(format!("a search value may be at most {max} bytes"));
    }
    let unsupported = |m: &str| {
        Err(format!(
            "modifier ':{m}' is not supported on {} ({})",
            p.code,
            p.kind.as_str()
        ))
    };
    if p.code == "_id" {
        let not = match modifier {
            None => false,
            Some("not") => true,
            Some(m) => return unsupported(m),
        };
        return Ok(Condition::Id { not, ids: values });
    }
    if p.code == "_lastUpdated" {
        if let Some(m) = modifier {
            return unsupported(m);
        }
        return Ok(Condition::LastUpdated(
            values
                .iter()
                .map(|v| parse_date(v))
                .collect::<Result<_, _>>()?,
        ));
    }
    Ok(match p.kind {
        ParamType::Token | ParamType::Uri => {
            let not = match modifier {
                None => false,
                Some("not") if p.kind == ParamType::Token => true,
                Some(m) => return unsupported(m),
            };
            let values = values
                .into_iter()
                .map(|v| match split_token(&v) {
                    // `|code` is "no system": SystemCode(None, Some(code)).
                    Some((sys, code)) if p.kind == ParamType::Token => {
                        TokenValue::SystemCode((!sys.is_empty()).then_some(sys), code)
                    }
                    _ => TokenValue::Code(v.replace("\\|", "|")),
                })
                .collect();
            Condition::Token {
                key: p.key.clone(),
                not,
                values,
            }
        }
        ParamType::Reference => {
            let type_modifier = match modifier {
                None => None,
                Some(m) if m.starts_with(|c: char| c.is_ascii_uppercase()) => {
                    if !p.targets.is_empty() && !p.targets.iter().any(|t| t == m) {
                        return Err(format!("{} cannot refer to {m}", p.code));
                    }
                    Some(m.to_string())
                }
                Some(m) => return unsupported(m),
            };
            let mut refs = Vec::new();
            for v in values {
                let mut parts = parse_reference(&v, base_url)
                    .ok_or_else(|| format!("'{v}' is not a valid reference"))?;
                if let Some(t) = &type_modifier {
                    if parts.target_type.as_ref().is_some_and(|x| x != t) {
                        return Err(format!("'{v}' is not a {t} reference"));
                    }
                    parts.target_type = Some(t.clone());
                }
                refs.push(parts);
            }
            Condition::Reference {
                key: p.key.clone(),
                values: refs,
            }
        }
        ParamType::Date => {
            if let Some(m) = modifier {
                return unsupported(m);
            }
            Condition::Date {
                key: p.key.clone(),
                values: values
                    .iter()
                    .map(|v| parse_date(v))
                    .collect::<Result<_, _>>()?,
            }
        }
        ParamType::String => {
            let mode = match modifier {
                None => StringMatch::Prefix,
                Some("exact") => StringMatch::Exact,
                Some("contains") => StringMatch::Contains,
                Some(m) => return unsupported(m),
            };
            let values = values
                .into_iter()
                .map(|v| {
                    if mode == StringMatch::Exact {
                        v
                    } else {
                        super::index::normalize_string(&v)
                    }
                })
                .collect();
            Condition::Str {
                key: p.key.clone(),
                mode,
                values,
            }
        }
    })
}

/// `system|code` split at the first unescaped `|`.
fn split_token(v: &str) -> Option<(String, Option<String>)> {
    let bytes = v.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            i += 2;
            continue;
        }
        if bytes[i] == b'|' {
            let code = &v[i + 1..];
            return Some((
                v[..i].replace("\\|", "|"),
                (!code.is_empty()).then(|| code.replace("\\|", "|")),
            ));
        }
        i += 1;
    }
    None
}

fn parse_date(v: &str) -> Result<(Prefix, i64, i64), String> {
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, &v[2..]),
        Some("ne") => (Prefix::Ne, &v[2..]),
        Some("lt") => (Prefix::Lt, &v[2..]),
        Some("gt") => (Prefix::Gt, &v[2..]),
        Some("le") => (Prefix::Le, &v[2..]),
        Some("ge") => (Prefix::Ge, &v[2..]),
        Some("sa") => (Prefix::Sa, &v[2..]),
        Some("eb") => (Prefix::Eb, &v[2..]),
        Some("ap") => (Prefix::Ap, &v[2..]),
        _ => (Prefix::Eq, v),
    };
    let (lo, hi) =
        dates::range(rest).ok_or_else(|| format!("'{v}' is not a valid date search value"))?;
    Ok((prefix, lo, hi))
}

fn parse_sort(registry: &Registry, res_type: &str, value: &str) -> Result<Vec<SortKey>, String> {
    let mut keys = Vec::new();
    for item in value.split(',') {
        let (descending, code) = match item.strip_prefix('-') {
            Some(c) => (true, c),
            None => (false, item),
        };
        let key = match code {
            "_id" => SortKey::Id { descending },
            "_lastUpdated" => SortKey::LastUpdated { descending },
            _ => {
                let p = registry
                    .get(res_type, code)
                    .ok_or_else(|| format!("cannot sort by unknown parameter '{code}'"))?;
                if p.kind == ParamType::Reference {
                    return Err(format!(
                        "sorting by reference parameter '{code}' is not supported"
                    ));
                }
                SortKey::Param {
                    key: p.key.clone(),
                    kind: p.kind,
                    descending,
                }
            }
        };
        keys.push(key);
    }
    Ok(keys)
}

fn parse_include(
    registry: &Registry,
    value: &str,
    iterate: bool,
    reverse: bool,
) -> Result<Include, String> {
    let mut parts = value.split(':');
    let (source_type, code, target) = (parts.next(), parts.next(), parts.next());
    let (Some(source_type), Some(code)) = (source_type, code) else {
        return Err(format!("'{value}' must be Type:parameter[:TargetType]"));
    };
    let p = registry
        .get(source_type, code)
        .filter(|p| p.kind == ParamType::Reference && !p.is_resource_level())
        .ok_or_else(|| format!("'{source_type}:{code}' is not a reference search parameter"))?;
    Ok(Include {
        source_type: source_type.to_string(),
        param_key: p.key.clone(),
        target_type: target.map(String::from),
        iterate,
        reverse,
    })
}

/// `c` less what `given` implies, at any depth: `None` when all of it is implied. Sound because
/// the policy's conditions nest only AND (a group) and OR (`AnyOf`), never a negation around
/// them: a part true of every resource matching `given` can be dropped from a group, and a group
/// left empty makes its `AnyOf` true.
fn without_implied(given: &[Condition], c: Condition) -> Option<Condition> {
    if implied(given, &c) {
        return None;
    }
    match c {
        Condition::AnyOf(groups) => {
            let mut kept = Vec::with_capacity(groups.len());
            for g in groups {
                let g: Vec<Condition> = g
                    .into_iter()
                    .filter_map(|c| without_implied(given, c))
                    .collect();
                if g.is_empty() {
                    return None;
                }
                kept.push(g);
            }
            Some(Condition::AnyOf(kept))
        }
        c => Some(c),
    }
}

/// Does every resource matching all of `given` also match `c`?  (`false` when unsure.)
fn implied(given: &[Condition], c: &Condition) -> bool {
    fn subset<T: PartialEq>(mine: &[T], theirs: &[T]) -> bool {
        !mine.is_empty() && mine.iter().all(|v| theirs.contains(v))
    }
    match c {
        Condition::Reference { key, values } => given.iter().any(|g| {
            matches!(g, Condition::Reference { key: k, values: v } if k == key && subset(v, values))
        }),
        Condition::Token {
            key,
            not: false,
            values,
        } => given.iter().any(|g| {
            matches!(g, Condition::Token { key: k, not: false, values: v } if k == key && subset(v, values))
        }),
        Condition::AnyOf(groups) => groups.iter().any(|g| g.iter().all(|c| implied(given, c))),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_escaped_values() {
        assert_eq!(split_values(r"a,b\,c"), vec!["a", "b,c"]);
        assert_eq!(
            split_token("http://s|c"),
            Some(("http://s".into(), Some("c".into())))
        );
        assert_eq!(split_token("|c"), Some(("".into(), Some("c".into()))));
        assert_eq!(split_token("http://s|"), Some(("http://s".into(), None)));
        assert_eq!(split_token("c"), None);
    }

    fn reference(key: &str, refs: &[&str]) -> Condition {
        Condition::Reference {
            key: key.into(),
            values: refs
                .iter()
                .map(|r| crate::search::index::parse_reference(r, "http://courier").unwrap())
                .collect(),
        }
    }

    fn not_draft() -> Condition {
        Condition::Token {
            key: "Communication.status".into(),
            not: true,
            values: vec![TokenValue::Code("preparation".into())],
        }
    }

    /// The compartment of Practitioner/x as the policy builds it: x sent it, or x is a
    /// recipient and it is not a draft.
    fn compartment() -> Condition {
        Condition::AnyOf(vec![
            vec![reference("Communication.sender", &["Practitioner/x"])],
            vec![
                reference("Communication.recipient", &["Practitioner/x"]),
                not_draft(),
            ],
        ])
    }

    fn confined(own: Vec<Condition>) -> Vec<Condition> {
        let mut req = SearchRequest::of(own, 10);
        req.confine(compartment());
        req.conditions
    }

    #[test]
    fn confine_leaves_out_only_what_the_search_implies() {
        // recipient=Practitioner/x: "x is a recipient" goes, "not a draft" stays.
        let c = confined(vec![reference(
            "Communication.recipient",
            &["Practitioner/x"],
        )]);
        let Condition::AnyOf(groups) = &c[1] else {
            panic!("{c:?}")
        };
        assert_eq!(groups.len(), 2);
        assert!(
            matches!(groups[1].as_slice(), [Condition::Token { not: true, .. }]),
            "{groups:?}"
        );
        assert!(
            matches!(groups[0].as_slice(), [Condition::Reference { .. }]),
            "{groups:?}"
        );

        // sender=Practitioner/x implies a whole group: nothing to add.
        let c = confined(vec![reference("Communication.sender", &["Practitioner/x"])]);
        assert_eq!(c.len(), 1, "{c:?}");

        // Not implied, so kept whole: a wider value set, a bare id (also Patient/x), another
        // parameter, a negated token.
        for own in [
            reference(
                "Communication.recipient",
                &["Practitioner/x", "Practitioner/y"],
            ),
            reference("Communication.recipient", &["x"]),
            reference("Communication.subject", &["Practitioner/x"]),
            not_draft(),
        ] {
            let c = confined(vec![own]);
            let Condition::AnyOf(groups) = &c[1] else {
                panic!("{c:?}")
            };
            assert_eq!(
                groups.iter().map(Vec::len).collect::<Vec<_>>(),
                vec![1, 2],
                "{c:?}"
            );
        }

        // Tokens: a subset of the values implies, a superset does not.
        let status = |codes: &[&str]| Condition::Token {
            key: "Communication.status".into(),
            not: false,
            values: codes
                .iter()
                .map(|c| TokenValue::Code(c.to_string()))
                .collect(),
        };
        assert!(implied(
            &[status(&["completed"])],
            &status(&["completed", "in-progress"])
        ));
        assert!(!implied(
            &[status(&["completed", "stopped"])],
            &status(&["completed"])
        ));
        assert!(!implied(&[], &status(&["completed"])));
    }
}
