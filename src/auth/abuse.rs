//! Abuse without credentials: what an anonymous client can make Courier do is bounded.
//!
//! - **Client address.** The TCP peer; `X-Forwarded-For` only when the peer is one of the
//!   configured `trusted_proxies` (then the right-most address in it that is not a trusted proxy).
//!   IPv6 clients are keyed by their /64, which one host usually holds whole.
//! - **Rate limits** (GCRA, `governor`), per client address, `rate_limit_per_minute` each with a
//!   burst of the same size: requests to the unauthenticated endpoints (token, launch, callback),
//!   and failed bearer checks. Over the limit: 429 with `Retry-After` and an OperationOutcome.
//!   A request with a valid token is never counted nor refused.
//! - **Failed authentications are audited per source and window**: the first failure from an
//!   address is recorded at once; the ones that follow within the window (60 s by default) are
//!   counted and recorded as one AuditEvent with the count (`entity.detail` `failedAttempts`,
//!   `period`, `outcomeDesc` "N failed attempts …") when the window ends. The trail misses no
//!   attempt and grows by at most one event per source per window.

use crate::audit;
use crate::config::Settings;
use crate::fhir::outcome::FhirError;
use crate::store::Store;
use actix_web::http::{header, StatusCode};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use chrono::{DateTime, SecondsFormat, Utc};
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sources tracked at once by the failure aggregation; beyond, failures from new sources are
/// counted together under "many sources" (the map stays bounded under address rotation).
const MAX_SOURCES: usize = 50_000;

/// The client's address: the TCP peer, or — when the peer is a trusted proxy — the right-most
/// `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(req: &HttpRequest, settings: &Settings) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip();
    let peer = canonical(peer);
    if settings.trusted_proxies.is_empty() || !settings.trusted_proxies.contains(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse::<IpAddr>().ok())
        .map(canonical)
        .collect();
    Some(
        forwarded
            .into_iter()
            .rev()
            .find(|a| !settings.trusted_proxies.contains(a))
            .unwrap_or(peer),
    )
}

/// IPv4-mapped IPv6 addresses as IPv4 (a dual-stack listener sees those).
fn canonical(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(a, IpAddr::V4),
        v4 => v4,
    }
}

/// The rate-limit key: an IPv4 address, or an IPv6 address's /64.
fn key(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Paths anyone may call that write or cost something: rate limited per address.
pub fn is_limited_path(path: &str) -> bool {
    matches!(
        path,
        "/auth/token"
            | "/auth/introspect"
            | "/auth/revoke"
            | "/launch"
            | "/smart/launch"
            | "/smart/callback"
    ) || (path.starts_with("/smart/mfa/") && path != "/smart/mfa/complete")
}

struct Window {
    /// When the last event for this source was written.
    written: Instant,
    /// Failures since, not yet written.
    pending: u64,
    first: Option<DateTime<Utc>>,
    last: DateTime<Utc>,
    last_why: String,
    last_ctx: Option<audit::Context>,
}

pub struct Abuse {
    open: Option<DefaultKeyedRateLimiter<IpAddr>>,
    failed: Option<DefaultKeyedRateLimiter<IpAddr>>,
    window: Duration,
    sources: Mutex<HashMap<Option<IpAddr>, Window>>,
}

impl Abuse {
    pub fn new(settings: &Settings) -> Abuse {
        let limiter = || {
            NonZeroU32::new(settings.rate_limit_per_minute)
                .map(|n| DefaultKeyedRateLimiter::keyed(Quota::per_minute(n)))
        };
        Abuse {
            open: limiter(),
            failed: limiter(),
            window: Duration::from_secs(settings.auth_failure_audit_window_secs),
            sources: Mutex::new(HashMap::new()),
        }
    }

    fn check(
        limiter: &Option<DefaultKeyedRateLimiter<IpAddr>>,
        ip: Option<IpAddr>,
    ) -> Result<(), Duration> {
        let (Some(l), Some(ip)) = (limiter, ip) else {
            return Ok(());
        };
        l.check_key(&key(ip))
            .map_err(|not_until| not_until.wait_time_from(l.clock().now()))
    }

    /// May this address make another request to an unauthenticated endpoint?
    pub fn check_open(&self, ip: Option<IpAddr>) -> Result<(), Duration> {
        Self::check(&self.open, ip)
    }

    /// May this address fail another bearer check (and be told why)?
    pub fn check_failed(&self, ip: Option<IpAddr>) -> Result<(), Duration> {
        Self::check(&self.failed, ip)
    }

    /// A failed authentication from `ctx`'s address: the AuditEvent to record now, if any (the
    /// first of a window); the others are counted and written by [`Abuse::due`].
    pub fn failure(&self, ip: Option<IpAddr>, ctx: &audit::Context, why: &str) -> Option<Value> {
        if self.window.is_zero() {
            return Some(audit::authentication(ctx, Some(why)));
        }
        let now = Instant::now();
        let mut sources = self.sources.lock();
        let k = if sources.len() >= MAX_SOURCES && !sources.contains_key(&ip.map(key)) {
            None
        } else {
            ip.map(key)
        };
        match sources.get_mut(&k) {
            Some(w) if now.duration_since(w.written) < self.window => {
                w.pending += 1;
                w.first.get_or_insert_with(Utc::now);
                w.last = Utc::now();
                w.last_why = why.to_string();
                w.last_ctx = Some(ctx.clone());
                None
            }
            Some(w) => {
                // The window is over: this failure and those pending go out in one event.
                let n = w.pending + 1;
                let first = w.first.take().unwrap_or_else(Utc::now);
                w.pending = 0;
                w.written = now;
                w.last_ctx = None;
                Some(counted(ctx, k.is_none(), why, n, first, Utc::now()))
            }
            None => {
                sources.insert(
                    k,
                    Window {
                        written: now,
                        pending: 0,
                        first: None,
                        last: Utc::now(),
                        last_why: String::new(),
                        last_ctx: None,
                    },
                );
                Some(counted(ctx, k.is_none(), why, 1, Utc::now(), Utc::now()))
            }
        }
    }

    /// The counted events whose window is over (all of them with `all`, at shutdown); forgets
    /// quiet sources and the rate limiters' idle keys.
    pub fn due(&self, all: bool) -> Vec<Value> {
        let now = Instant::now();
        let mut out = vec![];
        let mut sources = self.sources.lock();
        sources.retain(|k, w| {
            let over = now.duration_since(w.written) >= self.window;
            if w.pending > 0 && (over || all) {
                if let (Some(ctx), Some(first)) = (w.last_ctx.take(), w.first.take()) {
                    out.push(counted(
                        &ctx,
                        k.is_none(),
                        &w.last_why,
                        w.pending,
                        first,
                        w.last,
                    ));
                }
                w.pending = 0;
                w.written = now;
                return true;
            }
            w.pending > 0 || !over
        });
        drop(sources);
        for l in [&self.open, &self.failed].into_iter().flatten() {
            l.retain_recent();
            l.shrink_to_fit();
        }
        out
    }

    /// Writes the counted events as their windows end (every few seconds, for the server's life).
    pub fn spawn(self: &Arc<Self>, store: Arc<Store>) {
        if self.window.is_zero() && self.open.is_none() {
            return;
        }
        let me = Arc::downgrade(self);
        let tick = self
            .window
            .clamp(Duration::from_millis(200), Duration::from_secs(5));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(me) = me.upgrade() else { return };
                for event in me.due(false) {
                    if let Err(e) = store.record_audit_async(event).await {
                        tracing::error!(error = %e, "could not record AuditEvent");
                    }
                }
            }
        });
    }
}

/// An authentication-failure AuditEvent standing for `n` attempts between `first` and `last`.
fn counted(
    ctx: &audit::Context,
    many_sources: bool,
    why: &str,
    n: u64,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
) -> Value {
    let mut ctx = ctx.clone();
    if many_sources {
        ctx.client_address = "many sources".into();
    }
    let mut ev = audit::authentication(&ctx, Some(why));
    if n > 1 {
        let ts = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        ev["outcomeDesc"] = json!(format!(
            "{n} failed attempts from {} between {} and {}; the last: {why}",
            ctx.client_address,
            ts(first),
            ts(last)
        ));
        ev["period"] = json!({"start": ts(first), "end": ts(last)});
        let detail = json!([{"type": "failedAttempts", "valueString": n.to_string()}]);
        match ev["entity"].as_array_mut().and_then(|a| a.first_mut()) {
            Some(e) => e["detail"] = detail,
            None => ev["entity"] = json!([{"detail": detail}]),
        }
    }
    ev
}

/// 429 Too Many Requests, with `Retry-After` (whole seconds, at least 1) and an OperationOutcome.
pub fn too_many(wait: Duration) -> HttpResponse {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    let mut res = FhirError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "throttled",
        format!("too many requests from this address; try again in {secs} s"),
    )
    .error_response();
    res.headers_mut().insert(
        header::RETRY_AFTER,
        header::HeaderValue::from_str(&secs.to_string()).expect("digits"),
    );
    res
}

/// Audits a failed authentication the aggregated way (the token endpoint, a launch, a WebSocket).
pub async fn record_failure(
    state: &crate::api::AppState,
    req: &HttpRequest,
    ctx: &audit::Context,
    why: &str,
) {
    let event = match req.app_data::<actix_web::web::Data<Abuse>>() {
        Some(abuse) => abuse.failure(client_ip(req, &state.settings), ctx, why),
        None => Some(audit::authentication(ctx, Some(why))),
    };
    if let Some(event) = event {
        crate::api::record_event(state, event).await;
    }
}

/// Audits a failed socket login (`/ws`, `/subscriptions/ws`) the aggregated way, and tells whether
/// its source is now over the failed-authentication limit (the socket then closes "throttled").
pub async fn socket_failure(
    state: &crate::api::AppState,
    abuse: Option<&actix_web::web::Data<Abuse>>,
    ip: Option<IpAddr>,
    ctx: &audit::Context,
    why: &str,
) -> bool {
    let event = match abuse {
        Some(a) => a.failure(ip, ctx, why),
        None => Some(audit::authentication(ctx, Some(why))),
    };
    if let Some(event) = event {
        crate::api::record_event(state, event).await;
    }
    abuse.is_some_and(|a| a.check_failed(ip).is_err())
}

/// Request bodies held in memory at once, server-wide: a request that declares a body over
/// [`BodyBudget::SMALL`] (or sends one without a length) takes its size from a shared budget —
/// four of the largest bodies the server takes — before anything of it is read, and gives it back
/// when answered. Beyond the budget, requests wait (their bodies stay in the clients' sockets) up
/// to 30 s, then 503 with `Retry-After`. Small requests never wait.
pub struct BodyBudget {
    kib: Arc<tokio::sync::Semaphore>,
    largest: usize,
}

impl BodyBudget {
    pub const SMALL: usize = 64 * 1024;

    pub fn new(settings: &Settings) -> BodyBudget {
        // The largest body any endpoint takes (a Bundle: one largest Binary and a resource's worth
        // of other entries) — the same formula the endpoints use.
        let largest = crate::fhir::limits::bundle_body_limit(settings);
        BodyBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(4 * largest.div_ceil(1024))),
            largest,
        }
    }
}

pub async fn body_budget(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody>,
) -> Result<
    actix_web::dev::ServiceResponse<actix_web::body::EitherBody<impl actix_web::body::MessageBody>>,
    actix_web::Error,
> {
    let Some(budget) = req.app_data::<actix_web::web::Data<BodyBudget>>().cloned() else {
        return next.call(req).await.map(|r| r.map_into_left_body());
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = req
        .headers()
        .get(header::TRANSFER_ENCODING)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
    let size = match (declared, chunked) {
        (_, true) => budget.largest,
        (Some(n), false) => n.min(budget.largest),
        (None, false) => 0,
    };
    if size <= BodyBudget::SMALL {
        return next.call(req).await.map(|r| r.map_into_left_body());
    }
    let kib = u32::try_from(size.div_ceil(1024)).unwrap_or(u32::MAX);
    let permit = tokio::time::timeout(
        Duration::from_secs(30),
        budget.kib.clone().acquire_many_owned(kib),
    )
    .await;
    let Ok(Ok(permit)) = permit else {
        let mut res = FhirError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the server is receiving too many large requests; try again shortly",
        )
        .error_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return Ok(req.into_response(res).map_into_right_body());
    };
    let res = next.call(req).await;
    drop(permit);
    res.map(|r| r.map_into_left_body())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn req(peer: &str, xff: Option<&str>) -> HttpRequest {
        let mut r = TestRequest::default().peer_addr(peer.parse().unwrap());
        if let Some(x) = xff {
            r = r.insert_header(("x-forwarded-for", x));
        }
        r.to_http_request()
    }

    #[test]
    fn x_forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let mut s = Settings::default();
        // No trusted proxy: the peer, whatever the header says.
        assert_eq!(
            client_ip(&req("198.51.100.7:5000", Some("10.0.0.1")), &s),
            Some("198.51.100.7".parse().unwrap())
        );
        s.trusted_proxies = vec!["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()];
        // From the proxy: the right-most address that is not a trusted proxy (a client can
        // prepend anything it likes; it cannot append).
        let r = req("10.0.0.2:5000", Some("1.2.3.4, 203.0.113.9, 10.0.0.3"));
        assert_eq!(client_ip(&r, &s), Some("203.0.113.9".parse().unwrap()));
        // From someone else: the header is ignored.
        assert_eq!(
            client_ip(&req("203.0.113.50:1", Some("1.2.3.4")), &s),
            Some("203.0.113.50".parse().unwrap())
        );
        // From the proxy without the header: the proxy.
        assert_eq!(
            client_ip(&req("10.0.0.2:1", None), &s),
            Some("10.0.0.2".parse().unwrap())
        );
        // IPv4-mapped IPv6 peers count as IPv4; IPv6 clients are limited per /64.
        assert_eq!(
            client_ip(&req("[::ffff:192.0.2.1]:1", None), &Settings::default()),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            key("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn failures_from_one_source_make_one_event_per_window_with_the_count() {
        let s = Settings {
            auth_failure_audit_window_secs: 3600,
            ..Settings::default()
        };
        let a = Abuse::new(&s);
        let ip: Option<IpAddr> = Some("192.0.2.1".parse().unwrap());
        let ctx = audit::Context {
            client_address: "192.0.2.1".into(),
            ..Default::default()
        };
        assert!(a.failure(ip, &ctx, "bad").is_some(), "the first at once");
        for _ in 0..9 {
            assert!(a.failure(ip, &ctx, "bad").is_none());
        }
        // Another source is not held back by the first.
        assert!(a
            .failure(Some("192.0.2.2".parse().unwrap()), &ctx, "bad")
            .is_some());
        assert!(a.due(false).is_empty(), "the window is not over");
        let flushed = a.due(true);
        assert_eq!(flushed.len(), 1);
        assert_eq!(flushed[0]["entity"][0]["detail"][0]["valueString"], "9");
        assert!(a.due(true).is_empty(), "counted once");
    }
}
