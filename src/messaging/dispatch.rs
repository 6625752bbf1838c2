//! The subscription dispatcher, run by exactly one instance at a time (the leader), and the
//! websocket channel, served by whichever instance holds the socket.
//!
//! The leader reads the event log from its cursor, numbers each event for every subscription it
//! reaches (topic, filters, the owner's grant), and delivers rest-hook notifications: a handshake
//! first, then events in order (at most `max-count` per Bundle), heartbeats while idle. A failed
//! POST is retried with exponential backoff (1 s, 2 s, 4 s … capped at 5 min); after
//! [`MAX_ATTEMPTS`] failures the subscription goes to `error` and stops. Every notification is
//! signed: `X-Courier-Signature: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
//!
//! Leadership: on PostgreSQL a session advisory lock held on a dedicated connection (keyed by the
//! schema, so databases sharing a server do not share a leader); when that instance dies its
//! connection closes and another instance takes over within a second. On SQLite, one instance
//! owns the file and leads.

use super::hub::Hub;
use super::subscriptions::{self, bundle, numbered, SubRow, SIGNATURE_HEADER, SUB_COLUMNS};
use crate::api::AppState;
use crate::auth::policy;
use crate::auth::scopes::Perm;
use crate::clock::now_micros;
use crate::store::db::Conn;
use crate::store::{Store, StoreError};
use crate::with_conn;
use actix_web::{web, HttpRequest, HttpResponse};
use diesel::sql_types::{BigInt, Bool, Text};
use diesel::QueryableByName;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failed deliveries (or handshakes) in a row before a subscription goes to `error`.
pub const MAX_ATTEMPTS: i64 = 8;
/// Failed handshakes in a row (about 3 s) before a new rest-hook subscription goes to `error`.
pub const HANDSHAKE_ATTEMPTS: i64 = 3;
const CURSOR: &str = "subscriptions";

fn now_secs() -> i64 {
    now_micros() / 1_000_000
}

// ----- leadership ---------------------------------------------------------------------------------

pub struct Leader {
    postgres_url: Option<String>,
    held: parking_lot::Mutex<Option<(diesel::PgConnection, Instant)>>,
}

#[derive(QueryableByName)]
struct Got {
    #[diesel(sql_type = Bool)]
    ok: bool,
}

impl Leader {
    pub fn new(postgres_url: Option<String>) -> Leader {
        Leader {
            postgres_url,
            held: parking_lot::Mutex::new(None),
        }
    }

    /// Is this instance the leader (taking the lead if nobody has it)? Blocking.
    pub fn lead(&self) -> bool {
        use diesel::{Connection, RunQueryDsl};
        let Some(url) = &self.postgres_url else {
            return true;
        };
        let mut held = self.held.lock();
        if let Some((c, checked)) = held.as_mut() {
            if checked.elapsed() < Duration::from_secs(1) {
                return true;
            }
            if diesel::sql_query("SELECT 1").execute(c).is_ok() {
                *checked = Instant::now();
                return true;
            }
            *held = None; // the connection (and with it the lock) is gone
        }
        let Ok(mut c) = diesel::PgConnection::establish(&crate::store::db::with_liveness(url))
        else {
            return false;
        };
        let got: Vec<Got> = diesel::sql_query(
            "SELECT pg_try_advisory_lock(hashtext('courier.dispatch.' || current_schema())) AS ok",
        )
        .load(&mut c)
        .unwrap_or_default();
        if got.first().is_some_and(|g| g.ok) {
            *held = Some((c, Instant::now()));
            true
        } else {
            false
        }
    }
}

// ----- matching -----------------------------------------------------------------------------------

fn active(store: &Store, channel: Option<&str>) -> Result<Vec<SubRow>, StoreError> {
    let now = crate::clock::now_micros();
    let mut binds: Vec<crate::store::db::Bind> = vec![now.into()];
    let extra = match channel {
        Some(c) => {
            binds.push(c.into());
            " AND channel = ?"
        }
        None => "",
    };
    store.query(
        &format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE status IN ('requested', 'active') AND (end_at IS NULL OR end_at > ?){extra} ORDER BY created_at"),
        binds,
    )
}

/// Subscriptions past their `end` are turned off (FHIR R4 `Subscription.end`). Read first: a
/// write on every tick would queue behind the writes of the whole service (docs/architecture.md).
fn turn_off_ended(store: &Store, now: i64) -> Result<(), StoreError> {
    const ENDED: &str = "end_at IS NOT NULL AND end_at <= ? AND status <> 'off'";
    let due: Vec<crate::store::rows::CountRow> = store.query(
        &format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM subscriptions WHERE {ENDED}"),
        vec![now.into()],
    )?;
    if due.first().is_some_and(|d| d.n > 0) {
        store.execute(
            &format!("UPDATE subscriptions SET status = 'off' WHERE {ENDED}"),
            vec![now.into()],
        )?;
    }
    Ok(())
}

/// Numbers the new events of the log for the subscriptions they reach. Returns how many events
/// were read. Blocking.
pub fn record_matches(store: &Store, hub: &Hub) -> Result<usize, StoreError> {
    // On its first run the job starts at the end of the log: subscriptions hear of what happens
    // from now.
    let cursor = super::events::cursor(store, CURSOR)?;
    // Once per tick (`active` skips them meanwhile).
    turn_off_ended(store, crate::clock::now_micros())?;
    let candidates = active(store, None)?;
    // Nothing before the oldest subscription's start concerns anyone: with no subscription,
    // nothing is read (or written) at all.
    let Some(oldest) = candidates.iter().map(|s| s.start_seq).min() else {
        return Ok(0);
    };
    let (events, last) = hub.load_after(cursor.max(oldest), 500)?;
    let Some(last) = last else {
        return Ok(0);
    };
    // The subscriptions as they are now, after the events were read: one created meanwhile
    // starts after all of them (its start_seq is at least their seq), so it misses none.
    drop(candidates);
    let mut subs = vec![];
    for s in active(store, None)? {
        if crate::auth::clients::get(store, &s.owner_client)?.is_none() {
            // The owner is no longer a client: its subscriptions stop.
            store.execute(
                "UPDATE subscriptions SET status = 'off', last_error = 'the owning client was removed' WHERE id = ?",
                vec![s.id.clone().into()],
            )?;
            continue;
        }
        let Some(res_type) = subscriptions::topic_type(&s.topic) else {
            continue;
        };
        let owner = s.owner();
        let access = policy::decide(
            &owner,
            &store.registry,
            &store.base_url,
            res_type,
            Perm::Read,
        )
        .ok();
        let body = s.resource(store)?;
        let criteria: Vec<String> = body["_criteria"]["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["valueString"].as_str().map(String::from))
            .collect();
        let filters =
            subscriptions::filters_in(&store.registry, &store.base_url, res_type, &criteria)
                .unwrap_or_else(|_| vec![crate::search::query::Condition::AnyOf(vec![])]);
        subs.push((s, res_type, access, filters));
    }
    let mut inserts: Vec<(String, i64, i64)> = vec![];
    for e in events
        .iter()
        .filter(|e| e.kind != super::events::Kind::Receipt)
    {
        for (s, res_type, access, filters) in subs.iter_mut() {
            if *res_type != e.res_type || e.seq <= s.start_seq {
                continue;
            }
            if subscriptions::matches(access, filters, &e.entries) {
                s.events_since_start += 1;
                inserts.push((s.id.clone(), s.events_since_start, e.seq));
            }
        }
    }
    let _writer = store.exclusive_writer();
    let mut c = store.db.get().map_err(StoreError::Other)?;
    with_conn!(c, |c| {
        c.write_tx(|c| -> Result<(), StoreError> {
        for (sub, number, seq) in &inserts {
            c.execute(
                "INSERT INTO subscription_events (sub_id, number, event_seq) VALUES (?, ?, ?)",
                vec![sub.clone().into(), (*number).into(), (*seq).into()],
            )?;
        }
        for (s, ..) in &subs {
            c.execute(
                "UPDATE subscriptions SET events_since_start = ? WHERE id = ? AND events_since_start < ?",
                vec![s.events_since_start.into(), s.id.clone().into(), s.events_since_start.into()],
            )?;
        }
        c.execute(
            "UPDATE job_cursors SET seq = ? WHERE name = ?",
            vec![last.into(), CURSOR.into()],
        )?;
        Ok(())
    })
    })?;
    Ok(events.len())
}

// ----- rest-hook delivery -------------------------------------------------------------------------

/// Signs `body` for `secret` at time `t`: the value of [`SIGNATURE_HEADER`].
pub fn signature(secret: &[u8], t: i64, body: &str) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={hex}")
}

async fn post(
    http: &crate::outbound::Outbound,
    sub: &SubRow,
    body: &Value,
    secret: &[u8],
) -> Result<(), String> {
    let endpoint = body_endpoint(body)?;
    let text = body["__notification"].to_string();
    let mut req = http
        .post(&endpoint)?
        .header("content-type", payload_type(body))
        .timeout(Duration::from_secs(timeout_of(body)));
    // Signed only when the subscriber gave a secret (Courier's extension; optional).
    if !secret.is_empty() {
        req = req.header(SIGNATURE_HEADER, signature(secret, now_secs(), &text));
    }
    for h in body["channel"]["header"].as_array().into_iter().flatten() {
        if let Some((n, v)) = h.as_str().and_then(|h| h.split_once(':')) {
            req = req.header(n.trim(), v.trim());
        }
    }
    let res = req.body(text).send().await.map_err(|e| {
        format!(
            "the endpoint could not be reached: {}",
            crate::outbound::why(e)
        )
    })?;
    if res.status().is_success() {
        Ok(())
    } else {
        let _ = &sub.id;
        Err(format!("the endpoint answered {}", res.status().as_u16()))
    }
}

/// The notification's Content-Type: the subscription's `channel.payload` (the IG: the server
/// SHALL use it), `application/fhir+json` when it names none.
fn payload_type(body: &Value) -> &'static str {
    match body["channel"]["payload"].as_str() {
        Some("application/json") => "application/json",
        _ => "application/fhir+json",
    }
}

fn body_endpoint(body: &Value) -> Result<String, String> {
    body["channel"]["endpoint"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| "no endpoint".to_string())
}

fn timeout_of(body: &Value) -> u64 {
    body["channel"]["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| {
            e["url"]
                == "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-timeout"
        })
        .and_then(|e| e["valueUnsignedInt"].as_u64())
        .unwrap_or(10)
        .clamp(1, 30)
}

/// At most this many rest-hook POSTs are in flight at once.
const MAX_CONCURRENT_DELIVERIES: usize = 16;

/// The rest-hook deliveries under way (one per subscription at a time) and their cap.
#[derive(Clone)]
pub struct Deliveries {
    in_flight: Arc<parking_lot::Mutex<std::collections::HashSet<String>>>,
    limit: Arc<tokio::sync::Semaphore>,
}

impl Default for Deliveries {
    fn default() -> Self {
        Deliveries {
            in_flight: Arc::default(),
            limit: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_DELIVERIES)),
        }
    }
}

/// One pass over the rest-hook subscriptions: handshakes, due deliveries, heartbeats. Each POST
/// runs on a task of its own and is not waited for, so a slow endpoint delays only its own
/// subscription (which is skipped until its delivery finishes).
pub async fn deliver(
    store: &Arc<Store>,
    http: &crate::outbound::Outbound,
    deliveries: &Deliveries,
) {
    let s = store.clone();
    let subs = match web::block(move || active(&s, Some("rest-hook"))).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    for sub in subs {
        let now = now_secs();
        let due = sub.status == "requested"
            || sub.delivered < sub.events_since_start
            || (sub.heartbeat_secs > 0 && now - sub.last_sent_at >= sub.heartbeat_secs);
        if sub.next_attempt_at > now || !due || !deliveries.in_flight.lock().insert(sub.id.clone())
        {
            continue;
        }
        let (store, http, d) = (store.clone(), http.clone(), deliveries.clone());
        tokio::spawn(async move {
            let id = sub.id.clone();
            if let Ok(_permit) = d.limit.clone().acquire_owned().await {
                deliver_one(&store, &http, sub, now).await;
            }
            d.in_flight.lock().remove(&id);
        });
    }
}

/// What one delivery sends: its kind, the event number it reaches, the notification Bundle and the
/// body's bytes (None: nothing to send).
type Delivery = Option<(&'static str, i64, Value, Vec<u8>)>;

async fn deliver_one(store: &Arc<Store>, http: &crate::outbound::Outbound, sub: SubRow, now: i64) {
    let s = store.clone();
    let row = sub.clone();
    // What to send, built off the async threads (it reads and decrypts).
    let plan = web::block(move || -> Result<Delivery, StoreError> {
        let secret = row.secret(&s).unwrap_or_default();
        let mut body = row.resource(&s)?;
        let (kind, upto, notification) = if row.status == "requested" {
            (
                "handshake",
                row.delivered,
                bundle(&s, &row, "handshake", &[], "empty"),
            )
        } else if row.delivered < row.events_since_start {
            let upto = (row.delivered + row.max_count).min(row.events_since_start);
            let evs = numbered(&s, &row.id, row.delivered + 1, upto)?;
            (
                "event-notification",
                upto,
                bundle(&s, &row, "event-notification", &evs, &row.content),
            )
        } else if row.heartbeat_secs > 0 && now - row.last_sent_at >= row.heartbeat_secs {
            (
                "heartbeat",
                row.delivered,
                bundle(&s, &row, "heartbeat", &[], "empty"),
            )
        } else {
            return Ok(None);
        };
        body["__notification"] = notification;
        Ok(Some((kind, upto, body, secret)))
    })
    .await;
    let Ok(Ok(Some((kind, upto, body, secret)))) = plan else {
        return;
    };
    let outcome = post(http, &sub, &body, &secret).await;
    let disclosed = super::subscriptions::patients_in(&body["__notification"], &store.base_url);
    let s = store.clone();
    let id = sub.id.clone();
    let attempts = sub.attempts;
    let _ = web::block(move || -> Result<(), StoreError> {
        match outcome {
            Ok(()) => {
                s.execute(
                    // Not one turned off meanwhile (its end, its client removed).
                    "UPDATE subscriptions SET status = 'active', delivered = ?, attempts = 0, next_attempt_at = 0, last_sent_at = ?, last_error = NULL WHERE id = ? AND status <> 'off'",
                    vec![upto.into(), now.into(), id.into()],
                )?;
                if kind == "event-notification" {
                    audit_disclosure(&s, &sub, sub.delivered + 1, upto, disclosed);
                }
            }
            Err(why) => {
                tracing::warn!(subscription = %id, kind, error = %why, "notification failed");
                // An endpoint that answered took the notification, whatever it answered: the
                // disclosure is recorded (an outside probe's endpoint answered 500 to each of
                // four deliveries of a patient's message, and none was in the trail).
                if kind == "event-notification" && why.starts_with("the endpoint answered") {
                    audit_disclosure(&s, &sub, sub.delivered + 1, upto, disclosed.clone());
                }
                let attempts = attempts + 1;
                // A handshake someone is waiting on gives up sooner (requested → error).
                let limit = if kind == "handshake" { HANDSHAKE_ATTEMPTS } else { MAX_ATTEMPTS };
                if attempts >= limit {
                    s.execute(
                        "UPDATE subscriptions SET status = 'error', attempts = ?, last_error = ? WHERE id = ? AND status <> 'off'",
                        vec![attempts.into(), why.into(), id.into()],
                    )?;
                } else {
                    let backoff = (1i64 << (attempts - 1).min(9)).min(300);
                    s.execute(
                        "UPDATE subscriptions SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                        vec![attempts.into(), (now + backoff).into(), why.into(), id.into()],
                    )?;
                }
            }
        }
        Ok(())
    })
    .await;
}

/// The `subscriptions` background task (leader only): match new events and deliver every 100 ms
/// (every second while there is no subscription). Started by [`crate::background::start`].
pub fn spawn(
    store: Arc<Store>,
    hub: Arc<Hub>,
    leader: Arc<Leader>,
    http: crate::outbound::Outbound,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let deliveries = Deliveries::default();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let l = leader.clone();
            if !web::block(move || l.lead()).await.unwrap_or(false) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let (s, h) = (store.clone(), hub.clone());
            match web::block(move || record_matches(&s, &h)).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "subscription matching failed"),
                Err(_) => continue,
                _ => {}
            }
            deliver(&store, &http, &deliveries).await;
            // Without subscriptions, look again in a second rather than ten times a second.
            let s = store.clone();
            if let Ok(Ok(none)) = web::block(move || active(&s, None).map(|a| a.is_empty())).await {
                if none {
                    tokio::time::sleep(Duration::from_millis(900)).await;
                }
            }
        }
    })
}

/// Records that notifications `from..=to` went to the subscription's owner: an AuditEvent per
/// delivery (the subscription, the owner's client, how many events and the content level, and
/// the patients whose resources it carried, so that their accounting of disclosures shows it).
/// Failures are logged, never fatal to delivery.
fn audit_disclosure(store: &Store, sub: &SubRow, from: i64, to: i64, disclosed: Vec<String>) {
    // The recipient of the disclosure is the owner's client (and user).
    let mut ctx = crate::audit::Context::job(&store.base_url, "subscription delivery");
    ctx.user = sub.owner_user.clone();
    ctx.client_id = Some(sub.owner_client.clone());
    ctx.disclosed = disclosed;
    let what = format!("Subscription/{}", sub.id);
    let mut event = crate::audit::event(
        &ctx,
        crate::audit::Interaction::Operation,
        Some(&what),
        None,
        None,
    );
    event["outcomeDesc"] = serde_json::json!(format!(
        "notified events {from}-{to} ({}) over {}",
        sub.content, sub.channel
    ));
    if let Err(e) = store.record_audit(event) {
        tracing::warn!(subscription = %sub.id, error = %e, "could not audit a notification");
    }
}

// ----- the websocket channel ----------------------------------------------------------------------

#[derive(QueryableByName, Clone)]
struct BindingRow {
    #[diesel(sql_type = Text)]
    sub_id: String,
    #[diesel(sql_type = Text)]
    owner_client: String,
    #[diesel(sql_type = BigInt)]
    expires_at: i64,
    /// The access token that asked for the binding: its revocation closes the socket.
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    jti: Option<String>,
}

/// `GET /subscriptions/ws`: `bind-with-token <token>` (from `$get-ws-binding-token`), then a
/// handshake Bundle, event notifications as they are numbered, and heartbeats.
pub async fn socket(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let (res, session, stream) = actix_ws::handle(&req, body)?;
    // A failed bind is a failed authentication: audited per source and window, rate limited.
    let ctx = crate::api::audit_context(&req, &state);
    let source = super::ws::Source::of(&req, &state);
    actix_web::rt::spawn(channel(state, session, stream, ctx, source));
    Ok(res)
}

/// Refuses a bind: audited the aggregated way; over the limit the socket closes 4429.
async fn refuse_bind(
    state: &AppState,
    session: actix_ws::Session,
    ctx: &crate::audit::Context,
    source: &super::ws::Source,
    why: &str,
) {
    let throttled =
        crate::auth::abuse::socket_failure(state, source.abuse.as_ref(), source.ip, ctx, why).await;
    let mut session = session;
    if throttled {
        let why = "too many failed authentications from this address; try again later";
        let _ = session.text(format!("error: {why}")).await;
        let _ = session
            .close(Some(actix_ws::CloseReason {
                code: actix_ws::CloseCode::Other(4429),
                description: Some(why.into()),
            }))
            .await;
        return;
    }
    let _ = session.text(format!("error: {why}")).await;
    let _ = session.close(None).await;
}

/// The socket's first text frame (pings and pongs before it are skipped), within 10 s.
async fn first_text(stream: &mut actix_ws::AggregatedMessageStream) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(actix_ws::AggregatedMessage::Text(t))) => return Some(t.to_string()),
                Some(Ok(
                    actix_ws::AggregatedMessage::Ping(_) | actix_ws::AggregatedMessage::Pong(_),
                )) => continue,
                _ => return None,
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Takes a binding token (single use) and finds the active websocket subscription it binds, if
/// the token is known, unexpired and its access token not revoked. Blocking.
fn take_binding(store: &Store, token: &str) -> Result<Option<(SubRow, BindingRow)>, StoreError> {
    let h = subscriptions::token_hash(token);
    let rows: Vec<BindingRow> = store.query(
        "SELECT sub_id, owner_client, expires_at, jti FROM ws_binding_tokens WHERE token_hash = ?",
        vec![h.clone().into()],
    )?;
    // Single use: of two binds racing with one token, only the one that deletes it wins.
    let taken = store.execute(
        "DELETE FROM ws_binding_tokens WHERE token_hash = ?",
        vec![h.into()],
    )?;
    let Some(b) = rows.into_iter().next().filter(|_| taken == 1) else {
        return Ok(None);
    };
    if b.expires_at < now_secs()
        || super::revocations::ends_now(store, b.jti.as_deref(), &b.owner_client)?
    {
        return Ok(None);
    }
    let sub = subscriptions::load(store, &b.sub_id)?;
    Ok(sub
        .filter(|s| {
            s.owner_client == b.owner_client && s.status == "active" && s.channel == "websocket"
        })
        .map(|s| (s, b)))
}

/// A notification Bundle of `kind` for `row`, with its events `from..=to` (none when `to < from`).
async fn notification(
    s: &Arc<Store>,
    row: &SubRow,
    kind: &'static str,
    from: i64,
    to: i64,
) -> Result<Result<Value, StoreError>, actix_web::error::BlockingError> {
    let (s, row) = (s.clone(), row.clone());
    web::block(move || -> Result<Value, StoreError> {
        let evs = if to >= from {
            numbered(&s, &row.id, from, to)?
        } else {
            vec![]
        };
        let content = if kind == "event-notification" {
            row.content.as_str()
        } else {
            "empty"
        };
        Ok(bundle(&s, &row, kind, &evs, content))
    })
    .await
}

async fn channel(
    state: web::Data<AppState>,
    mut session: actix_ws::Session,
    stream: actix_ws::MessageStream,
    ctx: crate::audit::Context,
    source: super::ws::Source,
) {
    let mut stream = stream.max_frame_size(16 * 1024).aggregate_continuations();
    let first = first_text(&mut stream).await;
    let token = first
        .as_deref()
        .and_then(|t| t.strip_prefix("bind-with-token "))
        .map(|t| t.trim().to_string());
    let Some(token) = token else {
        refuse_bind(
            &state,
            session,
            &ctx,
            &source,
            "expected 'bind-with-token <token>'",
        )
        .await;
        return;
    };
    let store = state.store.clone();
    let bound = web::block(move || take_binding(&store, &token)).await;
    let Ok(Ok(Some((sub, binding)))) = bound else {
        refuse_bind(
            &state,
            session,
            &ctx,
            &source,
            "the binding token is unknown, used or expired",
        )
        .await;
        return;
    };
    let Ok(Ok(handshake)) = notification(&state.store, &sub, "handshake", 1, 0).await else {
        return;
    };
    if session.text(handshake.to_string()).await.is_err() {
        return;
    }
    let mut last = sub.events_since_start;
    let mut last_sent = Instant::now();
    // The subscription's row is read when the event log moved (its events are numbered by the
    // leader shortly after), and every few seconds regardless.
    let mut seen_head = state.hub.head();
    let mut dirty_until = Instant::now();
    let mut last_read = Instant::now();
    let heartbeat = Duration::from_secs(sub.heartbeat_secs.max(0) as u64);
    let mut poll = tokio::time::interval(Duration::from_millis(250));
    let mut revocations = state.hub.revocations.subscribe();
    loop {
        tokio::select! {
            Ok(()) = revocations.changed() => {
                if revocations.borrow().ends(binding.jti.as_deref(), &binding.owner_client) {
                    let _ = session.text("error: the access token that bound this socket has been revoked").await;
                    let _ = session.close(None).await;
                    return;
                }
            }
            msg = stream.next() => match msg {
                Some(Ok(actix_ws::AggregatedMessage::Ping(b))) if session.pong(&b).await.is_err() => return,
                Some(Ok(actix_ws::AggregatedMessage::Close(_))) | None | Some(Err(_)) => { let _ = session.close(None).await; return; }
                _ => {}
            },
            _ = poll.tick() => {
                let head = state.hub.head();
                if head != seen_head {
                    seen_head = head;
                    dirty_until = Instant::now() + Duration::from_secs(2);
                }
                let heartbeat_due = !heartbeat.is_zero() && last_sent.elapsed() >= heartbeat;
                if Instant::now() > dirty_until && last_read.elapsed() < Duration::from_secs(5) && !heartbeat_due {
                    continue;
                }
                last_read = Instant::now();
                let (s, id) = (state.store.clone(), sub.id.clone());
                let Ok(Ok(Some(row))) = web::block(move || subscriptions::load(&s, &id)).await else {
                    let _ = session.close(None).await; // deleted
                    return;
                };
                if row.status != "active" {
                    let _ = session.close(None).await;
                    return;
                }
                if last < row.events_since_start {
                    // Checked as of now, before anything is sent: nothing reaches a socket whose
                    // token was revoked before the events were.
                    let (s, b) = (state.store.clone(), binding.clone());
                    let ended = web::block(move || super::revocations::ends_now(&s, b.jti.as_deref(), &b.owner_client)).await;
                    if !matches!(ended, Ok(Ok(false))) {
                        let _ = session.text("error: the access token that bound this socket has been revoked").await;
                        let _ = session.close(None).await;
                        return;
                    }
                }
                while last < row.events_since_start {
                    let to = (last + row.max_count).min(row.events_since_start);
                    let Ok(Ok(b)) = notification(&state.store, &row, "event-notification", last + 1, to).await else { return };
                    if session.text(b.to_string()).await.is_err() { return; }
                    let (s, r, from, disclosed) = (state.store.clone(), row.clone(), last + 1, super::subscriptions::patients_in(&b, &state.store.base_url));
                    let _ = web::block(move || audit_disclosure(&s, &r, from, to, disclosed)).await;
                    last = to;
                    last_sent = Instant::now();
                }
                if !heartbeat.is_zero() && last_sent.elapsed() >= heartbeat {
                    let Ok(Ok(b)) = notification(&state.store, &row, "heartbeat", 1, 0).await else { return };
                    if session.text(b.to_string()).await.is_err() { return; }
                    last_sent = Instant::now();
                }
            }
        }
    }
}
