//! When a scheduled CommunicationRequest is due: one instant (`occurrenceDateTime`), or the
//! occurrences of a repeating schedule (medication schedules): `occurrencePeriod` bounds it and the
//! extension `schedule-timing` (a FHIR `Timing`) says how it repeats, in the time zone of the core
//! extension `tz-code` (IANA, e.g. `Europe/Berlin`; UTC when absent), so "08:00 every day" stays
//! 08:00 local across daylight-saving changes.
//!
//! Supported `Timing.repeat`:
//! - `timeOfDay` (one or more local times), every `period` days (`periodUnit` `d`, default 1) or
//!   weeks (`wk`), on the `dayOfWeek`s given (all days when absent);
//! - or `frequency` times per `period` `periodUnit` (`min`, `h`, `d`, `wk`) from the start;
//! - `count` caps the occurrences; the period's `end` (or `count`) is required; at most
//!   [`MAX_OCCURRENCES`]. Anything else is refused with a 4xx naming the element.

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveTime, TimeZone, Utc};
use chrono_tz::Tz;
use fhir_codec::Issue;
use serde_json::Value;

pub const EXT_TIMING: &str = "https://courier.example.org/fhir/StructureDefinition/schedule-timing";
pub const EXT_TZ: &str = "http://hl7.org/fhir/StructureDefinition/tz-code";
pub const MAX_OCCURRENCES: usize = 1000;

fn issue(expression: &str, diagnostics: impl Into<String>) -> Vec<Issue> {
    vec![Issue {
        code: "not-supported",
        expression: expression.into(),
        diagnostics: diagnostics.into(),
    }]
}

fn extension<'a>(v: &'a Value, url: &str) -> Option<&'a Value> {
    v["extension"].as_array()?.iter().find(|e| e["url"] == url)
}

fn instant(s: &str, tz: Tz, expression: &str) -> Result<i64, Vec<Issue>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_micros());
    }
    // A date alone: its midnight in the schedule's time zone.
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").map_err(|_| {
        issue(
            expression,
            "a full date or an instant with its offset is needed",
        )
    })?;
    local(tz, d, NaiveTime::MIN).ok_or_else(|| issue(expression, "not a time in the zone"))
}

/// A local date and time in `tz` as an instant (the earlier one when ambiguous; in a DST gap,
/// an hour later).
fn local(tz: Tz, d: NaiveDate, t: NaiveTime) -> Option<i64> {
    let naive = d.and_time(t);
    tz.from_local_datetime(&naive)
        .earliest()
        .or_else(|| {
            tz.from_local_datetime(&(naive + Duration::hours(1)))
                .earliest()
        })
        .map(|x| x.with_timezone(&Utc).timestamp_micros())
}

/// The due instants of a CommunicationRequest: `None` if it is not scheduled; one instant for
/// `occurrenceDateTime` (or a period without timing: its start); the occurrences of a repeating
/// schedule. `Err` names what is not supported.
pub fn occurrences(cr: &Value) -> Result<Option<Vec<i64>>, Vec<Issue>> {
    let tz = time_zone(cr)?;
    if let Some(s) = cr["occurrenceDateTime"].as_str() {
        return Ok(crate::search::dates::range(s).map(|(lo, _)| vec![lo]));
    }
    let Some(period) = cr.get("occurrencePeriod") else {
        return Ok(None);
    };
    let (start, end) = period_bounds(period, tz)?;
    let Some(timing) = extension(cr, EXT_TIMING) else {
        return Ok(Some(vec![start]));
    };
    let repeat = supported_repeat(timing)?;
    let span = schedule_span(repeat, start, end)?;
    let period_n = repeat_period(repeat)?;
    let unit = repeat["periodUnit"].as_str().unwrap_or("d");
    let out = match repeat["timeOfDay"].as_array() {
        Some(times) => times_of_day_occurrences(repeat, times, period_n, unit, tz, &span)?,
        None => frequency_occurrences(repeat, period_n, unit, &span)?,
    };
    within_limits(out).map(Some)
}

/// Where `Timing.repeat` is, for the issues about it.
const REPEAT: &str = "CommunicationRequest.extension('schedule-timing').valueTiming.repeat";

/// Where a repeating schedule runs: from `start` to `end` (both included), at most `cap` of them.
struct Span {
    start: i64,
    end: i64,
    cap: usize,
}

/// The schedule's time zone: the `tz-code` extension's IANA zone, UTC when absent.
fn time_zone(cr: &Value) -> Result<Tz, Vec<Issue>> {
    Ok(match extension(cr, EXT_TZ) {
        Some(e) => e["valueCode"]
            .as_str()
            .and_then(|z| z.parse().ok())
            .ok_or_else(|| {
                issue(
                    "CommunicationRequest.extension('tz-code')",
                    "an IANA time zone such as Europe/Berlin is needed",
                )
            })?,
        None => Tz::UTC,
    })
}

/// The `occurrencePeriod`'s start (required) and end, if any; a date alone as the end covers
/// that whole day.
fn period_bounds(period: &Value, tz: Tz) -> Result<(i64, Option<i64>), Vec<Issue>> {
    let start = period["start"]
        .as_str()
        .ok_or_else(|| {
            issue(
                "CommunicationRequest.occurrencePeriod.start",
                "a scheduled period needs a start",
            )
        })
        .and_then(|s| instant(s, tz, "CommunicationRequest.occurrencePeriod.start"))?;
    let end = match period["end"].as_str() {
        Some(s) if s.len() == 10 => {
            let next = NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .ok()
                .and_then(|d| d.succ_opt())
                .and_then(|d| local(tz, d, NaiveTime::MIN))
                .ok_or_else(|| issue("CommunicationRequest.occurrencePeriod.end", "not a date"))?;
            Some(next - 1)
        }
        Some(s) => Some(instant(s, tz, "CommunicationRequest.occurrencePeriod.end")?),
        None => None,
    };
    Ok((start, end))
}

/// The timing's `repeat`, refused when absent or when it has an element schedules do not support.
fn supported_repeat(timing: &Value) -> Result<&Value, Vec<Issue>> {
    let repeat = &timing["valueTiming"]["repeat"];
    if !repeat.is_object() {
        return Err(issue(REPEAT, "the timing needs a repeat"));
    }
    for k in repeat
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, _)| k.as_str())
    {
        if !matches!(
            k,
            "timeOfDay" | "dayOfWeek" | "frequency" | "period" | "periodUnit" | "count"
        ) {
            return Err(issue(
                &format!("{REPEAT}.{k}"),
                format!("repeat.{k} is not supported in schedules"),
            ));
        }
    }
    Ok(repeat)
}

/// How far a repeating schedule runs: to the period's end and at most `count` occurrences, one of
/// them required (the cap stops one past [`MAX_OCCURRENCES`], so that too many is noticed).
fn schedule_span(repeat: &Value, start: i64, end: Option<i64>) -> Result<Span, Vec<Issue>> {
    let count = repeat["count"].as_u64().map(|c| c as usize);
    if end.is_none() && count.is_none() {
        return Err(issue(
            "CommunicationRequest.occurrencePeriod.end",
            "a repeating schedule needs occurrencePeriod.end or repeat.count",
        ));
    }
    Ok(Span {
        start,
        end: end.unwrap_or(i64::MAX),
        cap: count
            .unwrap_or(MAX_OCCURRENCES + 1)
            .min(MAX_OCCURRENCES + 1),
    })
}

/// The repeat's `period` (default 1), which must be positive.
fn repeat_period(repeat: &Value) -> Result<f64, Vec<Issue>> {
    let period_n = repeat["period"].as_f64().unwrap_or(1.0);
    if period_n <= 0.0 {
        return Err(issue(
            &format!("{REPEAT}.period"),
            "the period must be positive",
        ));
    }
    Ok(period_n)
}

/// The occurrences at local times of day (`times`), every `period_n` days or weeks, on the
/// repeat's `dayOfWeek`s.
fn times_of_day_occurrences(
    repeat: &Value,
    times: &[Value],
    period_n: f64,
    unit: &str,
    tz: Tz,
    span: &Span,
) -> Result<Vec<i64>, Vec<Issue>> {
    let mut times = times_of_day(times)?;
    if !matches!(unit, "d" | "wk") {
        return Err(issue(
            &format!("{REPEAT}.periodUnit"),
            "with timeOfDay the period is in days (d) or weeks (wk)",
        ));
    }
    if period_n.fract() != 0.0 {
        return Err(issue(
            &format!("{REPEAT}.period"),
            "with timeOfDay the period is a whole number",
        ));
    }
    let days: Vec<&str> = repeat["dayOfWeek"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let first = Utc
        .timestamp_micros(span.start)
        .single()
        .map(|t| t.with_timezone(&tz).date_naive());
    let Some(first_day) = first else {
        return Err(issue(
            "CommunicationRequest.occurrencePeriod.start",
            "out of range",
        ));
    };
    times.sort();
    let rule = DailyRule {
        times,
        days,
        weekly: unit == "wk",
        every: period_n as i64,
        first_day,
    };
    Ok(daily_occurrences(&rule, tz, span))
}

/// The repeat's `timeOfDay`s as local times (`hh:mm:ss`).
fn times_of_day(times: &[Value]) -> Result<Vec<NaiveTime>, Vec<Issue>> {
    times
        .iter()
        .map(|t| {
            t.as_str()
                .and_then(|t| NaiveTime::parse_from_str(t, "%H:%M:%S").ok())
        })
        .collect::<Option<_>>()
        .ok_or_else(|| issue(&format!("{REPEAT}.timeOfDay"), "times of day are hh:mm:ss"))
}

/// A schedule at local times of day: on which days, and at what (sorted) times.
struct DailyRule<'a> {
    times: Vec<NaiveTime>,
    /// `mon` … `sun`; every day when empty.
    days: Vec<&'a str>,
    /// Every `every` weeks (else days).
    weekly: bool,
    every: i64,
    /// The start's local date, from which days and weeks are counted.
    first_day: NaiveDate,
}

impl DailyRule<'_> {
    /// Whether `day` is one of the schedule's: every n-th day, or every day of every n-th week
    /// (weeks counted from the start's Monday), and one of its days of the week.
    fn includes(&self, day: NaiveDate) -> bool {
        let since = (day - self.first_day).num_days();
        let dow = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
            [day.weekday().num_days_from_monday() as usize];
        let in_step = if self.weekly {
            ((since + self.first_day.weekday().num_days_from_monday() as i64) / 7) % self.every == 0
        } else {
            !self.days.is_empty() || since % self.every == 0
        };
        in_step && (self.days.is_empty() || self.days.contains(&dow))
    }
}

/// The instants of `rule`, day by day (for at most 20 years) from the span's start until past its
/// end or its cap.
fn daily_occurrences(rule: &DailyRule, tz: Tz, span: &Span) -> Vec<i64> {
    let mut out = vec![];
    let mut day = rule.first_day;
    'days: for _ in 0..(366 * 20) {
        if rule.includes(day) {
            for t in &rule.times {
                let Some(i) = local(tz, day, *t) else {
                    continue;
                };
                if i < span.start {
                    continue;
                }
                if i > span.end || out.len() >= span.cap {
                    break 'days;
                }
                out.push(i);
            }
        }
        day += Duration::days(1);
    }
    out
}

/// The occurrences `frequency` times per `period_n` `unit`s from the span's start, at least a
/// minute apart.
fn frequency_occurrences(
    repeat: &Value,
    period_n: f64,
    unit: &str,
    span: &Span,
) -> Result<Vec<i64>, Vec<Issue>> {
    let freq = repeat["frequency"].as_u64().unwrap_or(1).max(1) as f64;
    let unit_micros: f64 = match unit {
        "min" => 60e6,
        "h" => 3600e6,
        "d" => 86_400e6,
        "wk" => 7.0 * 86_400e6,
        _ => {
            return Err(issue(
                &format!("{REPEAT}.periodUnit"),
                "the period unit is min, h, d or wk",
            ))
        }
    };
    let step = (period_n * unit_micros / freq) as i64;
    if step < 60_000_000 {
        return Err(issue(
            &format!("{REPEAT}.frequency"),
            "occurrences at least a minute apart",
        ));
    }
    let mut out = vec![];
    let mut t = Some(span.start);
    while let Some(at) = t.filter(|at| *at <= span.end && out.len() < span.cap) {
        out.push(at);
        t = at.checked_add(step);
    }
    Ok(out)
}

/// The occurrences, refused when more than [`MAX_OCCURRENCES`] or none.
fn within_limits(out: Vec<i64>) -> Result<Vec<i64>, Vec<Issue>> {
    if out.len() > MAX_OCCURRENCES {
        return Err(issue(
            REPEAT,
            format!("at most {MAX_OCCURRENCES} occurrences per request"),
        ));
    }
    if out.is_empty() {
        return Err(issue(
            REPEAT,
            "the schedule has no occurrence in its period",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::dates::format_instant;
    use serde_json::json;

    fn plan(extra: Value) -> Vec<String> {
        let mut cr = json!({"resourceType": "CommunicationRequest", "status": "active",
            "extension": [{"url": EXT_TZ, "valueCode": "Europe/Berlin"}]});
        for (k, v) in extra.as_object().unwrap() {
            if k == "timing" {
                cr["extension"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"url": EXT_TIMING, "valueTiming": {"repeat": v}}));
            } else {
                cr[k] = v.clone();
            }
        }
        occurrences(&cr)
            .unwrap()
            .unwrap()
            .into_iter()
            .map(format_instant)
            .collect()
    }

    #[test]
    fn daily_local_times_keep_their_wall_clock_across_daylight_saving() {
        // Berlin leaves summer time on 2026-10-25: 08:00 local is 06:00Z before, 07:00Z after.
        let t = plan(
            json!({"occurrencePeriod": {"start": "2026-10-24", "end": "2026-10-26T23:59:59+01:00"},
            "timing": {"timeOfDay": ["08:00:00", "20:00:00"], "period": 1, "periodUnit": "d"}}),
        );
        let expect: Vec<String> = [
            "2026-10-24T06:00:00Z",
            "2026-10-24T18:00:00Z",
            "2026-10-25T07:00:00Z",
            "2026-10-25T19:00:00Z",
            "2026-10-26T07:00:00Z",
            "2026-10-26T19:00:00Z",
        ]
        .iter()
        .map(|s| normal(s))
        .collect();
        assert_eq!(t, expect);
    }

    fn normal(s: &str) -> String {
        format_instant(DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros())
    }

    #[test]
    fn weekdays_count_and_hourly_frequency() {
        // A date as the end covers that day.
        let t = plan(
            json!({"occurrencePeriod": {"start": "2026-11-30", "end": "2026-12-01"},
            "timing": {"timeOfDay": ["09:00:00", "21:00:00"]}}),
        );
        assert_eq!(t.len(), 4);
        let t = plan(json!({"occurrencePeriod": {"start": "2026-11-30"},
            "timing": {"timeOfDay": ["09:00:00"], "dayOfWeek": ["mon", "thu"], "count": 3}}));
        assert_eq!(
            t,
            vec![
                normal("2026-11-30T08:00:00Z"),
                normal("2026-12-03T08:00:00Z"),
                normal("2026-12-07T08:00:00Z")
            ]
        );
        let t = plan(
            json!({"occurrencePeriod": {"start": "2026-11-30T08:00:00Z", "end": "2026-11-30T20:00:00Z"},
            "timing": {"frequency": 1, "period": 6, "periodUnit": "h"}}),
        );
        assert_eq!(t.len(), 3);
        let t = plan(
            json!({"occurrencePeriod": {"start": "2026-11-30T08:00:00Z", "end": "2026-12-02T08:00:00Z"},
            "timing": {"frequency": 3, "period": 1, "periodUnit": "d"}}),
        );
        assert_eq!(t.len(), 7, "every 8 hours, both ends included");
    }

    #[test]
    fn unsupported_or_unbounded_schedules_are_refused_naming_the_element() {
        let bad = |extra: Value| {
            let mut cr = json!({"resourceType": "CommunicationRequest", "status": "active", "extension": []});
            for (k, v) in extra.as_object().unwrap() {
                if k == "timing" {
                    cr["extension"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"url": EXT_TIMING, "valueTiming": {"repeat": v}}));
                } else if k == "tz" {
                    cr["extension"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"url": EXT_TZ, "valueCode": v}));
                } else {
                    cr[k] = v.clone();
                }
            }
            occurrences(&cr).unwrap_err()[0].expression.clone()
        };
        assert!(bad(json!({"occurrencePeriod": {"start": "2026-11-30"}, "timing": {"timeOfDay": ["09:00:00"]}})).ends_with("occurrencePeriod.end"));
        assert!(bad(json!({"occurrencePeriod": {"start": "2026-11-30", "end": "2027-01-01"}, "timing": {"timeOfDay": ["09:00:00"], "when": ["MORN"]}})).ends_with("repeat.when"));
        assert!(bad(json!({"occurrencePeriod": {"start": "2026-11-30", "end": "2030-01-01"}, "timing": {"frequency": 1, "period": 1, "periodUnit": "h"}})).ends_with("repeat"));
        assert!(
            bad(json!({"tz": "Mars/Olympus", "occurrenceDateTime": "2026-11-30"}))
                .contains("tz-code")
        );
        assert!(bad(json!({"occurrencePeriod": {"start": "2026-11-30", "end": "2027-01-01"}, "timing": {"timeOfDay": ["9am"]}})).ends_with("timeOfDay"));
    }
}
