//! Strict FHIR R4 JSON checking, kept in its own crate so that fhir-sdk's large serde code is
//! monomorphised here once and never in the application crate (a release rebuild of the app then
//! takes seconds instead of minutes).
//!
//! fhir-sdk's R4B model is a parser, not a validator: it rejects wrong JSON types, unknown codes and
//! bad dates in plain fields, but silently drops unknown elements, invalid choice-type values and the
//! second of two choice variants. [`check`] therefore parses with the model *and* compares what was
//! sent with what the model kept; every element the model did not keep is reported by its path.
//! Callers store the JSON exactly as received, never the model's re-serialisation.

use serde_json::Value;

/// One problem found in a resource, addressed by a FHIRPath-like `expression`
/// (`Communication.payload[0].contentString`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    /// The FHIR issue-type code (`structure`, `value`, `required`, `invalid`, `not-supported`).
    pub code: &'static str,
    pub expression: String,
    pub diagnostics: String,
}

impl Issue {
    fn new(code: &'static str, expression: String, diagnostics: impl Into<String>) -> Self {
        Issue {
            code,
            expression,
            diagnostics: diagnostics.into(),
        }
    }
}

macro_rules! supported_types {
    ($($name:ident),* $(,)?) => {
        /// Resource types this crate can check strictly.
        pub const SUPPORTED_TYPES: &[&str] = &[$(stringify!($name)),*];

        fn roundtrip(resource_type: &str, value: &Value) -> Result<Value, Issue> {
            match resource_type {
                $(stringify!($name) => roundtrip_as::<fhir_sdk::r4b::resources::$name>(resource_type, value),)*
                other => Err(Issue::new(
                    "not-supported",
                    "resourceType".into(),
                    format!("resource type '{other}' is not supported by this server"),
                )),
            }
        }
    };
}

supported_types!(
    Communication,
    CommunicationRequest,
    Binary,
    AuditEvent,
    SearchParameter,
    Subscription,
    Patient,
    Practitioner,
    PractitionerRole,
    RelatedPerson,
    CareTeam,
    Group,
    Encounter,
    Organization,
);

/// Checks `value` as a FHIR R4 resource of its declared `resourceType`.
/// Returns every element that is malformed or that the model would not keep.
pub fn check(value: &Value) -> Result<(), Vec<Issue>> {
    let Some(obj) = value.as_object() else {
        return Err(vec![Issue::new(
            "structure",
            String::new(),
            "a resource must be a JSON object",
        )]);
    };
    let resource_type = match obj.get("resourceType") {
        Some(Value::String(s)) => s.as_str(),
        Some(_) => {
            return Err(vec![Issue::new(
                "structure",
                "resourceType".into(),
                "resourceType must be a string",
            )])
        }
        None => {
            return Err(vec![Issue::new(
                "required",
                "resourceType".into(),
                "resourceType is missing",
            )])
        }
    };
    let mut issues = Vec::new();
    check_json_shape(resource_type, value, &mut issues);
    if let Some(id) = obj.get("id") {
        match id.as_str() {
            Some(s) if is_valid_id(s) => {}
            _ => issues.push(Issue::new(
                "value",
                format!("{resource_type}.id"),
                "id must be 1-64 characters of A-Z, a-z, 0-9, '-' and '.'",
            )),
        }
    }
    check_contained(resource_type, obj, &mut issues);
    if !issues.is_empty() {
        return Err(issues);
    }
    let kept = roundtrip(resource_type, value).map_err(|e| vec![e])?;
    diff(resource_type.to_string(), value, &kept, &mut issues);
    if issues.is_empty() {
        Ok(())
    } else {
        Err(issues)
    }
}

/// FHIR logical id syntax: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn roundtrip_as<T>(resource_type: &str, value: &Value) -> Result<Value, Issue>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let parsed: T = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let expression = if path == "." || path.is_empty() {
            resource_type.to_string()
        } else {
            format!("{resource_type}.{path}")
        };
        let inner = e.into_inner().to_string();
        let code = if inner.starts_with("missing field") {
            "required"
        } else {
            "value"
        };
        Issue::new(code, expression, clean_serde_message(&inner))
    })?;
    serde_json::to_value(&parsed).map_err(|e| {
        Issue::new(
            "exception",
            resource_type.into(),
            format!("could not re-encode resource: {e}"),
        )
    })
}

/// serde's messages name Rust types; keep them readable for a FHIR user. They never repeat the
/// client's value (it may be message text, and the message goes to the audit trail and logs):
/// `invalid type: string "…", expected …` keeps only the kinds, `Unknown value: …` the fact.
fn clean_serde_message(msg: &str) -> String {
    let msg = msg.split(" at line ").next().unwrap_or(msg);
    if msg.starts_with("Unknown value") {
        return "not one of the element's codes".to_string();
    }
    for kind in ["string \"", "character `", "bytes ", "variant `"] {
        if let Some(i) = msg.find(kind) {
            let tail = msg.rfind(", expected").filter(|&j| j > i);
            let rest = tail.map_or("", |j| &msg[j..]);
            return format!(
                "{}{}{rest}",
                &msg[..i],
                kind.trim_end_matches([' ', '"', '`'])
            );
        }
    }
    msg.to_string()
}

/// FHIR JSON rules that serde cannot see: no nulls (outside primitive-extension arrays), no empty
/// objects, arrays or strings, no leading/trailing whitespace-only strings.
fn check_json_shape(path: &str, value: &Value, issues: &mut Vec<Issue>) {
    match value {
        Value::Null => issues.push(Issue::new(
            "structure",
            path.to_string(),
            "null is not allowed in FHIR JSON",
        )),
        Value::String(s) if s.trim().is_empty() => issues.push(Issue::new(
            "value",
            path.to_string(),
            "empty strings are not allowed in FHIR JSON",
        )),
        Value::String(s) if has_control_chars(s) => issues.push(Issue::new(
            "value",
            path.to_string(),
            "control characters are not allowed in FHIR strings (only tab, carriage return and line feed)",
        )),
        Value::Array(items) => {
            if items.is_empty() {
                issues.push(Issue::new(
                    "structure",
                    path.to_string(),
                    "empty arrays are not allowed in FHIR JSON",
                ));
            }
            let primitive_ext = path
                .rsplit('.')
                .next()
                .is_some_and(|last| last.starts_with('_'));
            for (i, item) in items.iter().enumerate() {
                if primitive_ext && item.is_null() {
                    continue;
                }
                check_json_shape(&format!("{path}[{i}]"), item, issues);
            }
        }
        Value::Object(map) => {
            if map.is_empty() {
                issues.push(Issue::new(
                    "structure",
                    path.to_string(),
                    "empty objects are not allowed in FHIR JSON",
                ));
            }
            for (k, v) in map {
                // Contained / nested resources restart the path at their type, as FHIRPath does.
                let p = format!("{path}.{k}");
                if k == "contentType" {
                    if let Value::String(s) = v {
                        if !has_control_chars(s) && !is_mime_type(s) {
                            issues.push(Issue::new(
                                "value",
                                p.clone(),
                                "contentType must be a MIME type: type/subtype, optionally followed by ;name=value parameters",
                            ));
                        }
                    }
                }
                check_json_shape(&p, v, issues);
            }
        }
        _ => {}
    }
}

/// FHIR `string` (R4: regex `[ \r\n\t\S]+`, and "strings SHOULD not contain Unicode character
/// points below 32, except for u0009, u000D and u000A"): Courier refuses every Unicode control
/// character (C0, DEL and C1) other than tab, CR and LF, in every JSON string of a resource. (No
/// FHIR primitive — code, uri, id, base64Binary, markdown — may hold one either.)
pub fn has_control_chars(s: &str) -> bool {
    s.chars()
        .any(|c| c.is_control() && !matches!(c, '\t' | '\r' | '\n'))
}

/// An RFC 9110 media type: `type "/" subtype *( OWS ";" OWS parameter )`, where a parameter is
/// `token "=" ( token / quoted-string )`; ASCII only, at most 255 bytes. What an HTTP
/// `Content-Type` header can carry as it is (Courier serves `Binary.contentType` as one).
pub fn is_mime_type(s: &str) -> bool {
    fn tchar(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
    }
    fn token(b: &[u8], mut i: usize) -> usize {
        while i < b.len() && tchar(b[i]) {
            i += 1;
        }
        i
    }
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 255 {
        return false;
    }
    let ows = |mut i: usize| {
        while i < b.len() && (b[i] == b' ' || b[i] == b'\t') {
            i += 1;
        }
        i
    };
    // type "/" subtype
    let i = token(b, 0);
    if i == 0 || b.get(i) != Some(&b'/') {
        return false;
    }
    let j = token(b, i + 1);
    if j == i + 1 {
        return false;
    }
    let mut i = j;
    loop {
        i = ows(i);
        if i == b.len() {
            return true;
        }
        if b[i] != b';' {
            return false;
        }
        i = ows(i + 1);
        if i == b.len() {
            return true; // a trailing ';' is tolerated by RFC 9110's grammar (empty parameter)
        }
        let n = token(b, i);
        if n == i || b.get(n) != Some(&b'=') {
            return false;
        }
        i = n + 1;
        if b.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match b.get(i) {
                    None => return false,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => match b.get(i + 1) {
                        Some(&c) if c == b'\t' || (0x20..0x7f).contains(&c) => i += 2,
                        _ => return false,
                    },
                    Some(&c) if c == b'\t' || (0x20..0x7f).contains(&c) => i += 1,
                    Some(_) => return false,
                }
            }
        } else {
            let v = token(b, i);
            if v == i {
                return false;
            }
            i = v;
        }
    }
}

/// dom-2 (a contained resource SHALL NOT contain resources) and dom-3 (every contained resource
/// SHALL be referenced from elsewhere in the resource by `#id`, or itself refer to its container
/// with `#`). References are looked for in every string of the resource, whatever its element, so
/// canonical and uri references count as the invariant says; the check never refuses a resource the
/// invariant accepts.
fn check_contained(
    resource_type: &str,
    obj: &serde_json::Map<String, Value>,
    issues: &mut Vec<Issue>,
) {
    // ref-1: a reference to a contained resource names one that is there (`#` alone is the
    // container itself). Only `reference` elements: a `#` in text is text.
    fn reference_values<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    match (k.as_str(), x) {
                        ("reference", Value::String(s)) => out.push((format!("{at}.reference"), s)),
                        ("contained", _) => {}
                        _ => reference_values(x, format!("{at}.{k}"), out),
                    }
                }
            }
            Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, x)| reference_values(x, format!("{at}[{i}]"), out)),
            _ => {}
        }
    }
    let none = Vec::new();
    let all = match obj.get("contained") {
        Some(Value::Array(a)) => a,
        _ => &none,
    };
    let ids: std::collections::HashSet<&str> = all
        .iter()
        .filter_map(|c| c.get("id").and_then(Value::as_str))
        .collect();
    let mut named = Vec::new();
    for (k, v) in obj {
        if k != "contained" {
            reference_values(v, format!("{resource_type}.{k}"), &mut named);
        }
    }
    for (at, r) in named {
        if let Some(id) = r.strip_prefix('#') {
            if !id.is_empty() && !ids.contains(id) {
                issues.push(Issue::new(
                    "invariant",
                    at,
                    format!("ref-1: '#{id}' names no contained resource"),
                ));
            }
        }
    }
    let Some(Value::Array(contained)) = obj.get("contained") else {
        return;
    };
    fn local_refs<'a>(v: &'a Value, out: &mut std::collections::HashSet<&'a str>) {
        match v {
            Value::String(s) if s.starts_with('#') => {
                out.insert(s.as_str());
            }
            Value::Array(a) => a.iter().for_each(|x| local_refs(x, out)),
            Value::Object(o) => o.values().for_each(|x| local_refs(x, out)),
            _ => {}
        }
    }
    let mut refs = std::collections::HashSet::new();
    for v in obj.values() {
        local_refs(v, &mut refs);
    }
    for (i, c) in contained.iter().enumerate() {
        let path = format!("{resource_type}.contained[{i}]");
        if c.get("contained").is_some() {
            issues.push(Issue::new(
                "invariant",
                format!("{path}.contained"),
                "dom-2: a contained resource cannot contain resources",
            ));
        }
        let Some(id) = c.get("id").and_then(Value::as_str) else {
            issues.push(Issue::new(
                "invariant",
                format!("{path}.id"),
                "a contained resource needs an id, and a reference to it (#id) from the resource (dom-3)",
            ));
            continue;
        };
        let mut own = std::collections::HashSet::new();
        local_refs(c, &mut own);
        if !refs.contains(format!("#{id}").as_str()) && !own.contains("#") {
            issues.push(Issue::new(
                "invariant",
                path,
                format!("dom-3: contained resource '#{id}' is not referenced from elsewhere in the resource"),
            ));
        }
    }
}

/// Reports every element of `sent` that is absent or different in `kept`.
fn diff(path: String, sent: &Value, kept: &Value, issues: &mut Vec<Issue>) {
    match (sent, kept) {
        (Value::Object(s), Value::Object(k)) => {
            for (key, sv) in s {
                let p = format!("{path}.{key}");
                match k.get(key) {
                    Some(kv) => diff(p, sv, kv, issues),
                    None => issues.push(Issue::new(
                        "structure",
                        p,
                        format!("unknown element '{key}', or a value that is not valid for it"),
                    )),
                }
            }
        }
        (Value::Array(s), Value::Array(k)) => {
            if s.len() != k.len() {
                issues.push(Issue::new(
                    "structure",
                    path.clone(),
                    "some items of this list are not valid",
                ));
            }
            for (i, (sv, kv)) in s.iter().zip(k.iter()).enumerate() {
                diff(format!("{path}[{i}]"), sv, kv, issues);
            }
        }
        (Value::Number(a), Value::Number(b)) => {
            if a != b && a.as_f64() != b.as_f64() {
                issues.push(Issue::new(
                    "value",
                    path,
                    "number out of range or not representable",
                ));
            }
        }
        (Value::String(a), Value::String(b)) => {
            if a != b && !same_instant(a, b) {
                issues.push(Issue::new(
                    "value",
                    path,
                    "value is not valid for this element",
                ));
            }
        }
        (a, b) if a == b => {}
        _ => issues.push(Issue::new(
            "value",
            path,
            "value is not valid for this element",
        )),
    }
}

/// The model normalises instants (`.000+00:00` → `Z`); both spellings are the same value.
fn same_instant(a: &str, b: &str) -> bool {
    match (
        chrono::DateTime::parse_from_rfc3339(a),
        chrono::DateTime::parse_from_rfc3339(b),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn exprs(v: Value) -> Vec<String> {
        check(&v)
            .err()
            .unwrap_or_default()
            .into_iter()
            .map(|i| i.expression)
            .collect()
    }

    #[test]
    fn serde_messages_do_not_repeat_the_clients_value() {
        assert_eq!(
            clean_serde_message("invalid type: string \"Dear Dr, expected results\", expected struct Foo at line 1 column 2"),
            "invalid type: string, expected struct Foo"
        );
        assert_eq!(
            clean_serde_message("Unknown value: secret"),
            "not one of the element's codes"
        );
        assert_eq!(
            clean_serde_message("unknown variant `secret`, expected `a` or `b`"),
            "unknown variant, expected `a` or `b`"
        );
        assert_eq!(
            clean_serde_message("missing field `status`"),
            "missing field `status`"
        );
    }

    #[test]
    fn accepts_a_valid_communication() {
        let v = json!({"resourceType":"Communication","status":"completed",
            "sent":"2024-01-01T10:00:00.000+00:00",
            "recipient":[{"reference":"Patient/1"}],"payload":[{"contentString":"hi"}]});
        assert_eq!(check(&v), Ok(()));
    }

    #[test]
    fn names_unknown_elements() {
        let v = json!({"resourceType":"Communication","status":"completed","foo":1});
        assert_eq!(exprs(v), vec!["Communication.foo"]);
    }

    #[test]
    fn names_invalid_choice_values() {
        let v = json!({"resourceType":"CommunicationRequest","status":"active","occurrenceDateTime":"not-a-date"});
        assert_eq!(exprs(v), vec!["CommunicationRequest.occurrenceDateTime"]);
    }

    #[test]
    fn names_bad_codes_and_types() {
        assert_eq!(
            exprs(json!({"resourceType":"Communication","status":"bogus"})),
            vec!["Communication.status"]
        );
        assert_eq!(
            exprs(json!({"resourceType":"Communication","status":"completed","sent":12})),
            vec!["Communication.sent"]
        );
        assert_eq!(
            exprs(json!({"resourceType":"Communication"})),
            vec!["Communication"]
        );
    }

    #[test]
    fn rejects_bad_ids_and_nulls() {
        assert_eq!(
            exprs(json!({"resourceType":"Communication","id":"a b","status":"completed"})),
            vec!["Communication.id"]
        );
        assert_eq!(
            exprs(json!({"resourceType":"Communication","status":"completed","note":null})),
            vec!["Communication.note"]
        );
    }

    // ----- strict input (control characters and the like) -----

    #[test]
    fn control_characters_are_refused_except_tab_cr_lf() {
        for bad in ["a\u{0}b", "a\u{1}", "\u{1b}[31m", "x\u{7f}", "x\u{85}"] {
            let v = json!({"resourceType":"Communication","status":"completed",
                "identifier":[{"system":"http://x.org","value":bad}]});
            assert_eq!(
                exprs(v),
                vec!["Communication.identifier[0].value"],
                "{bad:?}"
            );
        }
        let v = json!({"resourceType":"Communication","status":"completed",
            "payload":[{"contentString":"line 1\r\n\tline 2"}]});
        assert_eq!(check(&v), Ok(()));
    }

    #[test]
    fn mime_types() {
        for ok in [
            "text/plain",
            "text/plain; charset=utf-8",
            "application/fhir+json;charset=\"utf-8\"",
            "multipart/form-data; boundary=\"a;b\"",
            "image/png",
        ] {
            assert!(is_mime_type(ok), "{ok}");
        }
        for bad in [
            "text/plain;\nX: 1",
            "text",
            "text/",
            "/plain",
            "text/plain x",
            "text/plain; a",
            "text/plain; a=",
            "text/pl\u{e9}in",
            "text/plain; a=\"open",
            "text / plain",
        ] {
            assert!(!is_mime_type(bad), "{bad:?}");
        }
        let v = json!({"resourceType":"Binary","contentType":"text/plain; x y"});
        assert_eq!(exprs(v), vec!["Binary.contentType"]);
        let v = json!({"resourceType":"Binary","contentType":"text/plain;\nX: 1"});
        assert_eq!(exprs(v), vec!["Binary.contentType"]);
    }

    #[test]
    fn a_reference_to_a_contained_resource_names_one_that_is_there() {
        let v = json!({"resourceType":"Communication","status":"completed",
            "recipient":[{"reference":"#nobody"}],"payload":[{"contentString":"#hashtag is text"}]});
        assert_eq!(exprs(v), vec!["Communication.recipient[0].reference"]);
        let ok = json!({"resourceType":"Communication","status":"completed",
            "contained":[{"resourceType":"Patient","id":"p"}],"subject":{"reference":"#p"}});
        assert!(check(&ok).is_ok());
    }

    #[test]
    fn contained_resources_must_be_referenced() {
        let unreferenced = json!({"resourceType":"Communication","status":"completed",
            "contained":[{"resourceType":"Patient","id":"p"}]});
        assert_eq!(exprs(unreferenced), vec!["Communication.contained[0]"]);
        let referenced = json!({"resourceType":"Communication","status":"completed",
            "contained":[{"resourceType":"Patient","id":"p"}],
            "subject":{"reference":"#p"}});
        assert_eq!(check(&referenced), Ok(()));
        let to_container = json!({"resourceType":"Communication","status":"completed",
            "contained":[{"resourceType":"Group","id":"g","type":"person","actual":true,
                "member":[{"entity":{"reference":"#"}}]}]});
        assert_eq!(check(&to_container), Ok(()));
        let nested = json!({"resourceType":"Communication","status":"completed",
            "contained":[{"resourceType":"Patient","id":"p",
                "contained":[{"resourceType":"Patient","id":"q"}]}],
            "subject":{"reference":"#p"}, "recipient":[{"reference":"#q"}]});
        let found = exprs(nested);
        assert!(
            found.contains(&"Communication.contained[0].contained".to_string()),
            "{found:?}"
        );
    }
}

#[cfg(test)]
mod decimal_tests {
    use super::*;
    #[test]
    fn accepts_decimals_the_model_normalises() {
        let text = r#"{"resourceType":"Communication","status":"completed","extension":[{"url":"http://x.org/e","valueDecimal":1.50}]}"#;
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(check(&v), Ok(()));
    }
}
