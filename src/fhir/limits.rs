//! What one request body may cost to parse. A JSON value in memory (`serde_json::Value`, keys kept
//! in order) takes ~80 bytes and more for an object's table, so a body of tiny values — `[0,0,…]`,
//! `{"a":0,…}`, `[{},{},…]` — grows 40 times and more when parsed: one 13 MB Bundle of zeros was
//! half a gigabyte. The values of a body are counted in one pass over its bytes, before anything
//! is parsed, and a body with more than [`MAX_JSON_VALUES`] is refused (413).

use super::outcome::FhirError;
use actix_web::http::StatusCode;

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
