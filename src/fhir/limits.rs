//! Size limits, in one place: a resource (`COURIER_MAX_RESOURCE_BYTES`), a Binary's content
//! (`COURIER_MAX_BINARY_BYTES`, counted in decoded bytes however the Binary arrives: a raw body, a
//! FHIR JSON Binary, or a Bundle entry), and a whole batch/transaction Bundle.
//!
//! And what one request body may cost to parse. A JSON value in memory (`serde_json::Value`, keys kept
//! in order) takes ~80 bytes and more for an object's table, so a body of tiny values — `[0,0,…]`,
//! `{"a":0,…}`, `[{},{},…]` — grows 40 times and more when parsed: one 13 MB Bundle of zeros was
//! half a gigabyte. The values of a body are counted in one pass over its bytes, before anything
//! is parsed, and a body with more than [`MAX_JSON_VALUES`] is refused (413).

use super::outcome::FhirError;
use crate::config::Settings;
use actix_web::http::StatusCode;
use serde_json::Value;

/// The base64 length of `n` bytes (with padding).
pub fn base64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// The number of bytes base64 text decodes to (padding and whitespace are not data).
pub fn base64_decoded_len(s: &str) -> usize {
    let chars = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .count();
    chars / 4 * 3 + (chars % 4).saturating_sub(1)
}

/// Refuses (413) a Binary of `n` decoded bytes over the Binary limit.
pub fn check_binary_bytes(
    settings: &Settings,
    n: usize,
    expression: &str,
) -> Result<(), FhirError> {
    if n > settings.max_binary_bytes {
        return Err(FhirError::at(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            expression,
            format!(
                "the Binary is larger than the limit of {} bytes",
                settings.max_binary_bytes
            ),
        ));
    }
    Ok(())
}

/// The body limit of a FHIR JSON Binary: its largest base64 content plus a resource's worth of
/// everything else.
pub fn binary_json_body_limit(settings: &Settings) -> usize {
    base64_len(settings.max_binary_bytes).saturating_add(settings.max_resource_bytes)
}

/// The body limit of a batch/transaction Bundle: one largest Binary plus a resource's worth of
/// other entries (with the defaults about 14.3 MB). Each entry is then held to its own limit
/// ([`check_entry_size`]).
pub fn bundle_body_limit(settings: &Settings) -> usize {
    binary_json_body_limit(settings)
}

/// The most entries one batch/transaction Bundle may have: each is a write (in a transaction, all
/// in one database transaction) or a search, so the work a single request asks for stays bounded
/// even when its entries are tiny.
pub const MAX_BUNDLE_ENTRIES: usize = 1000;

/// Refuses (413) a Bundle with more than [`MAX_BUNDLE_ENTRIES`] entries.
pub fn check_entry_count(n: usize) -> Result<(), FhirError> {
    if n > MAX_BUNDLE_ENTRIES {
        return Err(FhirError::at(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            "Bundle.entry",
            format!("a Bundle may have at most {MAX_BUNDLE_ENTRIES} entries"),
        ));
    }
    Ok(())
}

/// A resource (given as its JSON value) of type `res_type` obeys its limit: a Binary's decoded
/// `data` the Binary limit (and the rest of it the resource limit), anything else its compact JSON
/// size the resource limit. 413 naming `expression`.
pub fn check_resource_size(
    settings: &Settings,
    res_type: &str,
    value: &Value,
    expression: &str,
) -> Result<(), FhirError> {
    if res_type == "Binary" {
        let data = value.get("data").and_then(Value::as_str).unwrap_or("");
        check_binary_bytes(settings, base64_decoded_len(data), expression)?;
        let rest = json_size(value).saturating_sub(data.len());
        return check_bytes(settings, rest, expression);
    }
    check_bytes(settings, json_size(value), expression)
}

fn check_bytes(settings: &Settings, n: usize, expression: &str) -> Result<(), FhirError> {
    if n > settings.max_resource_bytes {
        return Err(FhirError::at(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            expression,
            format!(
                "the resource is larger than the limit of {} bytes",
                settings.max_resource_bytes
            ),
        ));
    }
    Ok(())
}

/// Applies a JSON Patch to `doc` without letting it grow past the resource limit on the way:
/// `copy` can double a document with every operation, so a patch small enough to be read could
/// otherwise build a document of any size in memory. A running estimate (additions counted with
/// their path, removals subtracted) is an upper bound of the document's size; the result is then
/// held to [`check_resource_size`] by the caller. 422 when an operation cannot be applied, 413 when
/// the document would grow too large.
pub fn apply_patch(
    settings: &Settings,
    doc: &mut Value,
    patch: &json_patch::Patch,
) -> Result<(), FhirError> {
    use json_patch::PatchOperation as Op;
    let size_at = |doc: &Value, p: &str| doc.pointer(p).map_or(0, json_size);
    let mut estimate = json_size(doc);
    for op in &patch.0 {
        match op {
            Op::Add(a) => {
                estimate += json_size(&a.value) + a.path.as_str().len() + 4;
            }
            Op::Replace(r) => {
                estimate = estimate.saturating_sub(size_at(doc, r.path.as_str()));
                estimate += json_size(&r.value);
            }
            Op::Copy(c) => {
                estimate += size_at(doc, c.from.as_str()) + c.path.as_str().len() + 4;
            }
            Op::Move(m) => estimate += m.path.as_str().len() + 4,
            Op::Remove(r) => {
                estimate = estimate.saturating_sub(size_at(doc, r.path.as_str()));
            }
            Op::Test(_) => {}
        }
        if estimate > settings.max_resource_bytes {
            return Err(FhirError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-costly",
                format!(
                    "the patched resource would be larger than the limit of {} bytes",
                    settings.max_resource_bytes
                ),
            ));
        }
        json_patch::patch_unsafe(doc, std::slice::from_ref(op)).map_err(|e| {
            FhirError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                format!("the patch cannot be applied: {e}"),
            )
        })?;
    }
    Ok(())
}

/// The compact JSON size of `v`, counted without building the text.
pub fn json_size(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, v)
        .map(|()| c.0)
        .unwrap_or(usize::MAX)
}

/// The most JSON values (each object, array, string, number, literal and object key) one body may
/// hold. A transaction of a thousand messages holds some 50,000; a Binary's base64 is one.
pub const MAX_JSON_VALUES: usize = 200_000;

/// Counts the values of a JSON text (roughly: brackets, commas and colons outside strings, plus
/// one), stopping as soon as there are more than `max`. Malformed JSON is the parser's to refuse.
pub fn json_values_over(bytes: &[u8], max: usize) -> bool {
    let mut n = 1usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' | b',' | b':' => {
                n += 1;
                if n > max {
                    return true;
                }
            }
            _ => {}
        }
    }
    false
}

/// 413 if the body holds more JSON values than one request may.
pub fn check_json_cost(bytes: &[u8]) -> Result<(), FhirError> {
    if json_values_over(bytes, MAX_JSON_VALUES) {
        return Err(FhirError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!(
                "the body holds more than {MAX_JSON_VALUES} JSON values, the most one request may"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn decoded_length_is_exact() {
        for n in 0..20 {
            let data = vec![7u8; n];
            let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
            assert_eq!(base64_decoded_len(&b64), n);
            assert_eq!(base64_len(n), b64.len());
        }
    }

    #[test]
    fn json_size_is_the_compact_length() {
        let v = serde_json::json!({"a": [1, "x\u{e9}"], "b": null});
        assert_eq!(json_size(&v), v.to_string().len());
    }
}

#[cfg(test)]
mod cost_tests {
    use super::*;

    #[test]
    fn values_are_counted_outside_strings_only() {
        assert!(!json_values_over(br#"{"a":[1,2,3],"b":"x,y:{["}"#, 8));
        assert!(json_values_over(br#"{"a":[1,2,3],"b":"x,y:{["}"#, 6));
        assert!(!json_values_over(br#"{"a":"\",,,,,,,,,,,,"}"#, 3));
        let zeros = format!("[{}0]", "0,".repeat(1000));
        assert!(json_values_over(zeros.as_bytes(), 1000));
        assert!(!json_values_over(zeros.as_bytes(), 1002));
    }
}
