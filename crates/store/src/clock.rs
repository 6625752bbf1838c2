//! The clock: every "now" in Courier, as microseconds since the Unix epoch (UTC) — the unit every
//! stored time has (`last_updated`, leases, receipts, audit times).

/// Now, in microseconds since the Unix epoch (UTC).
pub fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}
