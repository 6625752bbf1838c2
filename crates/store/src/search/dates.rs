//! FHIR date/dateTime/instant values as ranges of microseconds since the epoch (UTC). A value with
//! less precision covers its whole period: `2024-03` is all of March. Times without a zone are UTC.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc};

pub const MIN: i64 = i64::MIN / 2;
pub const MAX: i64 = i64::MAX / 2;

/// `(lo, hi)` inclusive, or `None` when `s` is not a FHIR date/dateTime/instant.
pub fn range(s: &str) -> Option<(i64, i64)> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 4 || !b[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let year: i32 = s[..4].parse().ok()?;
    match b.len() {
        4 => {
            let lo = day_start(NaiveDate::from_ymd_opt(year, 1, 1)?);
            let hi = day_start(NaiveDate::from_ymd_opt(year + 1, 1, 1)?) - 1;
            Some((lo, hi))
        }
        7 if b[4] == b'-' => {
            let month: u32 = s[5..7].parse().ok()?;
            let first = NaiveDate::from_ymd_opt(year, month, 1)?;
            let next = if month == 12 {
                NaiveDate::from_ymd_opt(year + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(year, month + 1, 1)?
            };
            Some((day_start(first), day_start(next) - 1))
        }
        10 => {
            let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
            Some((day_start(d), day_start(d.succ_opt()?) - 1))
        }
        _ if b.len() > 10 && b[10] == b'T' => date_time(s),
        _ => None,
    }
}

fn day_start(d: NaiveDate) -> i64 {
    Utc.from_utc_datetime(&d.and_time(NaiveTime::MIN))
        .timestamp_micros()
}

fn date_time(s: &str) -> Option<(i64, i64)> {
    // Split off the zone: `Z`, `+hh:mm`, `-hh:mm`, or none (UTC).
    let (local, zone) = if let Some(x) = s.strip_suffix('Z') {
        (x, "+00:00")
    } else if s.len() > 16
        && (s.as_bytes()[s.len() - 6] == b'+' || s.as_bytes()[s.len() - 6] == b'-')
    {
        (&s[..s.len() - 6], &s[s.len() - 6..])
    } else {
        (s, "+00:00")
    };
    let (fmt, precision_us): (&str, i64) = match local.len() {
        16 => ("%Y-%m-%dT%H:%M", 60_000_000),
        19 => ("%Y-%m-%dT%H:%M:%S", 1_000_000),
        n if n > 20 && local.as_bytes()[19] == b'.' => {
            let digits = (n - 20).min(6) as u32;
            ("%Y-%m-%dT%H:%M:%S%.f", 10i64.pow(6 - digits))
        }
        _ => return None,
    };
    let naive = NaiveDateTime::parse_from_str(local, fmt).ok()?;
    let with_zone = format!("{}{}", naive.format("%Y-%m-%dT%H:%M:%S%.f"), zone);
    let dt = DateTime::parse_from_str(&with_zone, "%Y-%m-%dT%H:%M:%S%.f%:z").ok()?;
    let lo = dt.timestamp_micros();
    Some((lo, lo + precision_us - 1))
}

/// An instant for `meta.lastUpdated`: `2024-01-02T03:04:05.678901Z`.
pub fn format_instant(micros: i64) -> String {
    let dt = Utc.timestamp_micros(micros).single().unwrap_or_default();
    dt.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// HTTP-date for `Last-Modified`.
pub fn format_http(micros: i64) -> String {
    let dt = Utc.timestamp_micros(micros).single().unwrap_or_default();
    dt.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

pub use crate::clock::now_micros;

/// Years are in range for the index (guards against `year 0001` style oddities in comparisons).
pub fn plausible(micros: i64) -> bool {
    Utc.timestamp_micros(micros)
        .single()
        .is_some_and(|d| d.year() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_dates_cover_their_period() {
        let (lo, hi) = range("2024").unwrap();
        assert_eq!(format_instant(lo), "2024-01-01T00:00:00.000000Z");
        assert_eq!(format_instant(hi), "2024-12-31T23:59:59.999999Z");
        let (lo, hi) = range("2024-02").unwrap();
        assert_eq!(format_instant(lo), "2024-02-01T00:00:00.000000Z");
        assert_eq!(format_instant(hi), "2024-02-29T23:59:59.999999Z");
        let (lo, hi) = range("2024-02-10T10:00:00+02:00").unwrap();
        assert_eq!(format_instant(lo), "2024-02-10T08:00:00.000000Z");
        assert_eq!(hi - lo, 999_999);
        let (lo, hi) = range("2024-02-10T10:00:00.5Z").unwrap();
        assert_eq!(hi - lo, 99_999);
        assert!(range("2024-13").is_none());
        assert!(range("yesterday").is_none());
        assert!(range("2024-02-30").is_none());
    }
}
