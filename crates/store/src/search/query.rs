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
    within_parameter_limit(pairs)?;
    for (name, value) in pairs {
        if let Some(issue) = control_characters(name, value) {
            errors.push(issue);
            continue;
        }
        let (code, modifier) = code_and_modifier(name);
        let bad = |msg: String| Issue {
            code: "invalid",
            expression: name.clone(),
            diagnostics: msg,
        };
        let result: Result<bool, Issue> = match code {
            "_count" => set_count(&mut req, value, limits.max_count).map_err(bad),
            "_offset" => set_offset(&mut req, value).map_err(bad),
            "_snapshot" => set_snapshot(&mut req, value).map_err(bad),
            "_total" => set_total(&mut req, value).map_err(bad),
            "_summary" => set_summary(&mut req, value).map_err(bad),
            "_format" | "_pretty" => Ok(false),
            "_sort" => parse_sort(registry, res_type, value)
                .map(|s| {
                    req.sort = s;
                    true
                })
                .map_err(bad),
            "_include" | "_revinclude" => {
                // An unknown modifier here fails the search at once, with this issue alone.
                let iterate = include_iterates(code, modifier).map_err(|m| vec![bad(m)])?;
                parse_include(registry, value, iterate, code == "_revinclude")
                    .map(|inc| {
                        req.includes.push(inc);
                        true
                    })
                    .map_err(bad)
            }
            _ => search_condition(registry, res_type, name, value, base_url).map(|c| {
                req.conditions.push(c);
                true
            }),
        };
        file_outcome(&mut req, &mut errors, name, value, result, limits.strict);
    }
    if errors.is_empty() {
        Ok(req)
    } else {
        Err(errors)
    }
}

/// Refuses a search of more than [`MAX_PARAMS`] parameters.
fn within_parameter_limit(pairs: &[(String, String)]) -> Result<(), Vec<Issue>> {
    if pairs.len() > MAX_PARAMS {
        return Err(vec![Issue {
            code: "too-costly",
            expression: String::new(),
            diagnostics: format!("a search may have at most {MAX_PARAMS} parameters"),
        }]);
    }
    Ok(())
}

/// A parameter's name split into its code and modifier: `subject:Patient`.
fn code_and_modifier(name: &str) -> (&str, Option<&str>) {
    match name.split_once(':') {
        Some((c, m)) => (c, Some(m)),
        None => (name, None),
    }
}

/// The issue with a parameter whose name or value holds a control character (PostgreSQL cannot
/// even compare NUL; no stored string holds one), naming the parameter unless it is the name.
fn control_characters(name: &str, value: &str) -> Option<Issue> {
    if !fhir_codec::has_control_chars(name) && !fhir_codec::has_control_chars(value) {
        return None;
    }
    Some(Issue {
        code: "invalid",
        expression: if fhir_codec::has_control_chars(name) {
            String::new()
        } else {
            name.to_string()
        },
        diagnostics: "search parameters may not contain control characters".into(),
    })
}

/// `_count`: the page size, at most `max_count`; 0 asks for the total alone.
fn set_count(req: &mut SearchRequest, value: &str, max_count: usize) -> Result<bool, String> {
    value
        .parse::<usize>()
        .map(|n| {
            req.count = n.min(max_count);
            if n == 0 {
                req.summary_count = true;
            }
            true
        })
        .map_err(|_| format!("_count must be a non-negative integer, not '{value}'"))
}

/// `_offset`: where the page starts, at most [`MAX_OFFSET`] (a paging parameter: not echoed).
fn set_offset(req: &mut SearchRequest, value: &str) -> Result<bool, String> {
    match value.parse::<usize>() {
        Ok(n) if n <= MAX_OFFSET => {
            req.offset = n;
            Ok(false)
        }
        _ => Err(format!("_offset must be an integer from 0 to {MAX_OFFSET}")),
    }
}

/// `_snapshot`: the highest row id the pages see (a paging parameter: not echoed).
fn set_snapshot(req: &mut SearchRequest, value: &str) -> Result<bool, String> {
    match value.parse::<i64>() {
        Ok(n) if n >= 0 => {
            req.snapshot = Some(n);
            Ok(false)
        }
        _ => Err("_snapshot must be a non-negative integer".into()),
    }
}

/// `_total`: whether the Bundle counts all matches (`estimate` counts none).
fn set_total(req: &mut SearchRequest, value: &str) -> Result<bool, String> {
    match value {
        "none" | "estimate" => {
            req.total = Total::None;
            Ok(true)
        }
        "accurate" => {
            req.total = Total::Accurate;
            Ok(true)
        }
        _ => Err(format!(
            "_total must be none, estimate or accurate, not '{value}'"
        )),
    }
}

/// `_summary`: `count` (the total alone) or `false`.
fn set_summary(req: &mut SearchRequest, value: &str) -> Result<bool, String> {
    match value {
        "count" => {
            req.summary_count = true;
            Ok(true)
        }
        "false" => Ok(true),
        _ => Err(format!(
            "_summary={value} is not supported (supported: count, false)"
        )),
    }
}

/// Whether `_include`/`_revinclude` (`code`) follows references on from what it includes
/// (`:iterate`, or the older `:recurse`); any other modifier is refused.
fn include_iterates(code: &str, modifier: Option<&str>) -> Result<bool, String> {
    match modifier {
        None => Ok(false),
        Some("iterate") | Some("recurse") => Ok(true),
        Some(m) => Err(format!("unknown modifier ':{m}' on {code}")),
    }
}

/// The condition of search parameter `name` (`code[:modifier]`) of `res_type`; not-supported when
/// `res_type` has no such parameter.
fn search_condition(
    registry: &Registry,
    res_type: &str,
    name: &str,
    value: &str,
    base_url: &str,
) -> Result<Condition, Issue> {
    let (code, modifier) = code_and_modifier(name);
    let not_supported = |diagnostics: String| Issue {
        code: "not-supported",
        expression: name.to_string(),
        diagnostics,
    };
    if code.starts_with('_') && registry.get(res_type, code).is_none() {
        return Err(not_supported(format!(
            "parameter '{code}' is not supported"
        )));
    }
    match registry.get(res_type, code) {
        None => Err(not_supported(format!(
            "unknown search parameter '{code}' for {res_type}"
        ))),
        Some(p) => parse_condition(p, modifier, value, base_url).map_err(|msg| Issue {
            code: "invalid",
            expression: name.to_string(),
            diagnostics: msg,
        }),
    }
}

/// Files one parameter's outcome: a used one for the `self` link; a not-supported one among the
/// ignored unless the search is strict; any other problem among the errors.
fn file_outcome(
    req: &mut SearchRequest,
    errors: &mut Vec<Issue>,
    name: &str,
    value: &str,
    result: Result<bool, Issue>,
    strict: bool,
) {
    match result {
        Ok(true) => req.used.push((name.to_string(), value.to_string())),
        Ok(false) => {}
        Err(issue) if issue.code == "not-supported" && !strict => req.ignored.push(issue),
        Err(issue) => errors.push(issue),
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

/// The condition that `value` of search parameter `p` with `modifier` stands for.
fn parse_condition(
    p: &SearchParam,
    modifier: Option<&str>,
    value: &str,
    base_url: &str,
) -> Result<Condition, String> {
    if modifier == Some("missing") {
        return missing_condition(p, value);
    }
    let values = checked_values(p, value)?;
    if p.code == "_id" {
        return id_condition(p, modifier, values);
    }
    if p.code == "_lastUpdated" {
        if let Some(m) = modifier {
            return unsupported(p, m);
        }
        return Ok(Condition::LastUpdated(dates_of(&values)?));
    }
    match p.kind {
        ParamType::Token | ParamType::Uri => token_condition(p, modifier, values),
        ParamType::Reference => reference_condition(p, modifier, values, base_url),
        ParamType::Date => {
            if let Some(m) = modifier {
                return unsupported(p, m);
            }
            Ok(Condition::Date {
                key: p.key.clone(),
                values: dates_of(&values)?,
            })
        }
        ParamType::String => string_condition(p, modifier, values),
    }
}

/// `:missing=true|false`: whether `p` has no value (never so for a resource-level parameter).
fn missing_condition(p: &SearchParam, value: &str) -> Result<Condition, String> {
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
    Ok(Condition::Missing {
        key: p.key.clone(),
        kind: p.kind,
        missing,
    })
}

/// The values of `value` (OR), refused when too many, empty or longer than any stored value.
fn checked_values(p: &SearchParam, value: &str) -> Result<Vec<String>, String> {
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
    Ok(values)
}

/// The refusal of modifier `m` on `p`.
fn unsupported<T>(p: &SearchParam, m: &str) -> Result<T, String> {
    Err(format!(
        "modifier ':{m}' is not supported on {} ({})",
        p.code,
        p.kind.as_str()
    ))
}

/// `_id`, or `_id:not`: the resource ids.
fn id_condition(
    p: &SearchParam,
    modifier: Option<&str>,
    ids: Vec<String>,
) -> Result<Condition, String> {
    let not = match modifier {
        None => false,
        Some("not") => true,
        Some(m) => return unsupported(p, m),
    };
    Ok(Condition::Id { not, ids })
}

/// The date ranges (with their prefixes) of date search values.
fn dates_of(values: &[String]) -> Result<Vec<(Prefix, i64, i64)>, String> {
    values.iter().map(|v| parse_date(v)).collect()
}

/// A token (`code`, `system|code`; `:not` negates) or uri condition.
fn token_condition(
    p: &SearchParam,
    modifier: Option<&str>,
    values: Vec<String>,
) -> Result<Condition, String> {
    let not = match modifier {
        None => false,
        Some("not") if p.kind == ParamType::Token => true,
        Some(m) => return unsupported(p, m),
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
    Ok(Condition::Token {
        key: p.key.clone(),
        not,
        values,
    })
}

/// A reference condition; a type modifier (`:Patient`) must be one of `p`'s targets and types
/// every value.
fn reference_condition(
    p: &SearchParam,
    modifier: Option<&str>,
    values: Vec<String>,
    base_url: &str,
) -> Result<Condition, String> {
    let type_modifier = match modifier {
        None => None,
        Some(m) if m.starts_with(|c: char| c.is_ascii_uppercase()) => {
            if !p.targets.is_empty() && !p.targets.iter().any(|t| t == m) {
                return Err(format!("{} cannot refer to {m}", p.code));
            }
            Some(m.to_string())
        }
        Some(m) => return unsupported(p, m),
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
    Ok(Condition::Reference {
        key: p.key.clone(),
        values: refs,
    })
}

/// A string condition: starts with (normalised), `:exact`, or `:contains` (normalised).
fn string_condition(
    p: &SearchParam,
    modifier: Option<&str>,
    values: Vec<String>,
) -> Result<Condition, String> {
    let mode = match modifier {
        None => StringMatch::Prefix,
        Some("exact") => StringMatch::Exact,
        Some("contains") => StringMatch::Contains,
        Some(m) => return unsupported(p, m),
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
    Ok(Condition::Str {
        key: p.key.clone(),
        mode,
        values,
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
