//! `GET /ws`: the web app's real-time channel.
//!
//! Protocol (JSON text frames):
//! - client → `{"type":"auth","token":"<Courier access token>","since":<seq>}` within 10 s of
//!   connecting (the token never travels in a URL). `since` is the last event seq the client
//!   has seen; without it, delivery starts now. Later `auth` frames swap in a refreshed token of
//!   the same user and client. A `seq` is an opaque token (sealed, see `fhir::paging`: in the
//!   clear it counted every event Courier records, which let a patient watch others' activity);
//!   a `since` Courier did not issue gets `resync`.
//! - server → `{"type":"event","seq":…,"event":"create|update|delete|receipt", "resourceType",
//!   "id", "versionId", "at", "resource"?, "receipt"?}` for every change the token may see,
//!   first the ones missed since `since` (catch-up), then live, in seq order, each once.
//! - server → `{"type":"ready","seq":…}` when catch-up is done; `{"type":"resync","seq":…}`
//!   instead when the client was too far behind (reload, then carry on from `seq`).
//! - server → `{"type":"error","code":…,"message":…}` and a close (4401 expired, revoked or invalid
//!   token; 4400 protocol error) — the client refreshes its token and reconnects with `since`;
//!   1013 `unavailable` when the token or the audit cannot be checked or written now — the client
//!   reconnects later with the same token.
//!
//! Each event passes the socket principal's access decision (`auth::policy`, the same one as
//! every read and search); a receipt goes only to the message's sender and the recipient it
//! belongs to.

use super::events::Kind;
use super::hub::{Event, Hub, MAX_CATCH_UP};
use crate::api::audit_context;
use crate::api::AppState;
use crate::auth::policy::{self, Access};
use crate::auth::scopes::Perm;
use crate::auth::{Principal, SubjectKind};
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
const CHECK_EVERY: Duration = Duration::from_secs(30);

pub async fn socket(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, actix_web::Error> {
    let (res, session, stream) = actix_ws::handle(&req, body)?;
    let ctx = audit_context(&req, &state);
    // Failed authentications are counted per address like the bearer checks' (see `abuse`).
    let source = Source::of(&req, &state);
    actix_web::rt::spawn(run(state, ctx, source, session, stream));
    Ok(res)
}

/// What one socket's principal may see.
struct Viewer {
    principal: Principal,
    communication: Option<Access>,
    request: Option<Access>,
    /// Revoked tokens and removed clients, as last read (see `revocations`).
    revocations: tokio::sync::watch::Receiver<Arc<super::revocations::Snapshot>>,
}

impl Viewer {
    fn new(state: &AppState, p: Principal) -> Viewer {
        let decide = |t: &str| {
            policy::decide(
                &p,
                &state.store.registry,
                &state.settings.base_url,
                t,
                Perm::Read,
            )
            .ok()
        };
        Viewer {
            communication: decide("Communication"),
            request: decide("CommunicationRequest"),
            revocations: state.hub.revocations.subscribe(),
            principal: p,
        }
    }

    /// Has the socket's token been revoked (or its client removed)?
    fn revoked(&self) -> bool {
        self.revocations
            .borrow()
            .ends(Some(&self.principal.jti), &self.principal.client_id)
    }

    fn sees(&self, e: &Event) -> bool {
        let access = match e.res_type.as_str() {
            "Communication" => &self.communication,
            "CommunicationRequest" => &self.request,
            _ => &None,
        };
        let admitted = match access {
            None => false,
            Some(Access::All) => true,
            Some(Access::Only(c)) => policy::admits(c, &e.entries),
        };
        if !admitted {
            return false;
        }
        if e.kind == Kind::Receipt && self.principal.kind() != SubjectKind::System {
            let me = self.principal.fhir_user.as_ref();
            return me.is_some() && (me == e.sender.as_ref() || me == e.recipient.as_ref());
        }
        true
    }
}

#[derive(serde::Deserialize)]
struct AuthFrame {
    #[serde(rename = "type")]
    kind: String,
    token: String,
    /// The last `seq` the client got (a token Courier issued), or 0 for the start.
    since: Option<Value>,
}

enum Stop {
    Close(Option<CloseReason>),
    Gone,
}

/// Event number `seq` as the socket shows it: sealed (see `fhir::paging`).
fn sealed(state: &AppState, seq: i64) -> Option<String> {
    crate::fhir::paging::seal_seq(&state.store, seq).ok()
}

async fn send(session: &mut actix_ws::Session, v: &Value) -> Result<(), Stop> {
    session.text(v.to_string()).await.map_err(|_| Stop::Gone)
}

fn close(code: u16, why: &str) -> Stop {
    Stop::Close(Some(CloseReason {
        code: CloseCode::Other(code),
        description: Some(why.to_string()),
    }))
}

async fn refuse(session: &mut actix_ws::Session, code: u16, error: &str, why: &str) -> Stop {
    let _ = send(
        session,
        &json!({"type": "error", "code": error, "message": why}),
    )
    .await;
    close(code, why)
}

/// Verifies a token as the HTTP guard does (signature, expiry, revocation, client removal).
/// `Err(None)`: it could not be checked now (the database failing) — not the client's fault, so
/// neither a failed authentication nor a reason to refresh the token.
async fn verify(state: &web::Data<AppState>, token: String) -> Result<Principal, Option<String>> {
    let st = state.clone();
    web::block(move || {
        let mut p = st.tokens.verify(&token).map_err(Some)?;
        match st.tokens.still_valid(&p) {
            Ok(true) => {
                p.groups =
                    super::groups::of(&st.store, p.fhir_user.as_deref()).map_err(|_| None)?;
                Ok(p)
            }
            Ok(false) => Err(Some(
                "the access token has been revoked or its client removed".into(),
            )),
            Err(_) => Err(None),
        }
    })
    .await
    .unwrap_or(Err(None))
}

/// 1013 "try again later": the token could not be checked now.
async fn unchecked(session: &mut actix_ws::Session) -> Stop {
    refuse(
        session,
        1013,
        "unavailable",
        "the access token could not be checked now; retry later",
    )
    .await
}

/// Where a socket comes from, for the aggregated audit and the rate limit of failed logins.
pub(crate) struct Source {
    pub(crate) abuse: Option<web::Data<crate::auth::abuse::Abuse>>,
    pub(crate) ip: Option<std::net::IpAddr>,
}

impl Source {
    /// Where the socket asked for by `req` comes from.
    pub(crate) fn of(req: &HttpRequest, state: &AppState) -> Source {
        Source {
            abuse: req
                .app_data::<web::Data<crate::auth::abuse::Abuse>>()
                .cloned(),
            ip: crate::auth::abuse::client_ip(req, &state.settings),
        }
    }
}

async fn run(
    state: web::Data<AppState>,
    ctx: crate::audit::Context,
    source: Source,
    mut session: actix_ws::Session,
    stream: actix_ws::MessageStream,
) {
    let mut stream = stream.max_frame_size(64 * 1024).aggregate_continuations();
    let mut told = Disclosures::default();
    let stop = serve(&state, ctx, &source, &mut session, &mut stream, &mut told).await;
    told.record(&state).await;
    if let Stop::Close(reason) = stop {
        let _ = session.close(reason).await;
    }
}

/// What a socket has sent, for its AuditEvents: whose data, how many events, which seqs. A
/// catch-up replays up to `MAX_CATCH_UP` whole resources, and live events carry them too: each is
/// a disclosure to the socket's user, which the patients concerned must find in their
/// accounting (`AuditEvent?patient=`; an outside probe found only the socket's login there).
/// Recorded after a catch-up, every `CHECK_EVERY` while events flow, and when the socket ends.
#[derive(Default)]
struct Disclosures {
    /// The socket's session, once authenticated (user, client, token).
    ctx: Option<crate::audit::Context>,
    patients: std::collections::BTreeSet<String>,
    events: usize,
    seqs: Option<(i64, i64)>,
}

impl Disclosures {
    fn note(&mut self, e: &Event) {
        self.events += 1;
        self.seqs = Some(
            self.seqs
                .map_or((e.seq, e.seq), |(a, b)| (a.min(e.seq), b.max(e.seq))),
        );
        self.patients.extend(patients_in(e));
    }

    async fn record(&mut self, state: &AppState) {
        let (Some(ctx), Some((from, to))) = (&self.ctx, self.seqs) else {
            return;
        };
        let mut ctx = ctx.clone();
        ctx.request_id = uuid::Uuid::new_v4().to_string();
        ctx.disclosed = std::mem::take(&mut self.patients).into_iter().collect();
        let mut event =
            crate::audit::event(&ctx, crate::audit::Interaction::Operation, None, None, None);
        event["outcomeDesc"] = json!(format!(
            "sent {} events ({from}-{to}) with their resources over the WebSocket",
            self.events
        ));
        self.events = 0;
        self.seqs = None;
        crate::api::record_event_after(state, event).await;
    }
}

/// The patients an event's resource concerns (every Patient it refers to).
fn patients_in(e: &Event) -> impl Iterator<Item = String> + '_ {
    e.entries.iter().filter_map(|x| match x {
        crate::search::index::Entry::Ref {
            target_type: Some(t),
            target_id: Some(id),
            url: None,
            ..
        } if t == "Patient" => Some(format!("Patient/{id}")),
        _ => None,
    })
}

async fn next_text(
    stream: &mut actix_ws::AggregatedMessageStream,
    session: &mut actix_ws::Session,
) -> Result<String, Stop> {
    loop {
        match stream.next().await {
            Some(Ok(actix_ws::AggregatedMessage::Text(t))) => return Ok(t.to_string()),
            Some(Ok(actix_ws::AggregatedMessage::Ping(b))) => {
                session.pong(&b).await.map_err(|_| Stop::Gone)?
            }
            Some(Ok(actix_ws::AggregatedMessage::Pong(_))) => {}
            Some(Ok(actix_ws::AggregatedMessage::Binary(_))) => {
                return Err(close(4400, "binary frames are not part of this protocol"))
            }
            Some(Ok(actix_ws::AggregatedMessage::Close(_))) => return Err(Stop::Close(None)),
            Some(Err(_)) => return Err(close(4400, "malformed frame")),
            None => return Err(Stop::Gone),
        }
    }
}

fn parse_auth(text: &str) -> Result<AuthFrame, String> {
    let f: AuthFrame = serde_json::from_str(text)
        .map_err(|_| "expected {\"type\":\"auth\",\"token\":…,\"since\":…}".to_string())?;
    if f.kind != "auth" {
        return Err(format!("unexpected frame type '{}'", f.kind));
    }
    Ok(f)
}

async fn serve(
    state: &web::Data<AppState>,
    ctx: crate::audit::Context,
    source: &Source,
    session: &mut actix_ws::Session,
    stream: &mut actix_ws::AggregatedMessageStream,
    told: &mut Disclosures,
) -> Stop {
    let hub: Arc<Hub> = state.hub.clone();
    let first = match tokio::time::timeout(AUTH_TIMEOUT, next_text(stream, session)).await {
        Ok(Ok(t)) => t,
        Ok(Err(stop)) => return stop,
        Err(_) => return refuse(session, 4401, "login", "no auth frame within 10 s").await,
    };
    let frame = match parse_auth(&first) {
        Ok(f) => f,
        Err(why) => return refuse(session, 4400, "invalid", &why).await,
    };
    let principal = match verify(state, frame.token).await {
        Ok(p) => p,
        Err(None) => return unchecked(session).await,
        Err(Some(why)) => {
            // One AuditEvent per source and window, with the count (as for bearer checks).
            let throttled = crate::auth::abuse::socket_failure(
                state,
                source.abuse.as_ref(),
                source.ip,
                &ctx,
                &why,
            )
            .await;
            if throttled {
                return refuse(
                    session,
                    4429,
                    "throttled",
                    "too many failed authentications from this address; try again later",
                )
                .await;
            }
            return refuse(session, 4401, "login", &why).await;
        }
    };
    // The socket is a session of its own: its start is audited (who, which client, which token).
    let mut opened = ctx.clone();
    opened.client_id = Some(principal.client_id.clone());
    opened.user = principal.fhir_user.clone();
    opened.token_id = Some(principal.jti.clone());
    if crate::api::record_event_checked(state, crate::audit::authentication(&opened, None))
        .await
        .is_err()
    {
        // Nothing is served unaudited: 1013 "try again later".
        return refuse(
            session,
            1013,
            "unavailable",
            "the audit trail cannot be written now; retry later",
        )
        .await;
    }
    told.ctx = Some(opened);
    let mut exp = principal.exp;
    let mut viewer = Viewer::new(state, principal);
    let (mut rx, head) = hub.subscribe();
    // A `since` Courier did not issue: the client is told to resync (load afresh), from now.
    // A number is taken only as 0 ("from the start"): any other would let a client bisect the
    // global event number from what a catch-up returns (an outside probe did).
    let since = match &frame.since {
        Some(Value::String(t)) => crate::fhir::paging::open_seq(&state.store, t).ok_or(()),
        Some(v) if v.as_i64() == Some(0) => Ok(0),
        Some(_) => Err(()),
        None => Ok(head),
    };
    if since.is_err() {
        if let Err(stop) = send(
            session,
            &json!({"type": "resync", "seq": sealed(state, head)}),
        )
        .await
        {
            return stop;
        }
    }
    let mut last = since.unwrap_or(head).min(head).max(0);
    // Catch-up from the log, then live from the channel (events up to `head` are in the log;
    // the channel holds everything after it, and anything already sent is skipped by seq).
    let caught = catch_up(&hub, &viewer, session, last, head, told).await;
    told.record(state).await;
    match caught {
        Ok(Some(seq)) => last = seq,
        Ok(None) => {
            if let Err(stop) = send(
                session,
                &json!({"type": "resync", "seq": sealed(state, head)}),
            )
            .await
            {
                return stop;
            }
            last = head;
        }
        Err(stop) => return stop,
    }
    if let Err(stop) = send(
        session,
        &json!({"type": "ready", "seq": sealed(state, last)}),
    )
    .await
    {
        return stop;
    }
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.tick().await;
    let mut stopping = hub.stopping.subscribe();
    if *stopping.borrow_and_update() {
        return close(1012, "restarting");
    }
    loop {
        let expires = tokio::time::sleep(Duration::from_secs(
            (exp - chrono::Utc::now().timestamp()).max(0) as u64,
        ));
        tokio::select! {
            msg = next_text(stream, session) => {
                let text = match msg { Ok(t) => t, Err(stop) => return stop };
                let frame = match parse_auth(&text) {
                    Ok(f) => f,
                    Err(why) => return refuse(session, 4400, "invalid", &why).await,
                };
                match verify(state, frame.token).await {
                    Ok(p) if p.fhir_user == viewer.principal.fhir_user
                        && p.client_id == viewer.principal.client_id => {
                        exp = p.exp;
                        viewer = Viewer::new(state, p);
                    }
                    Ok(_) => return refuse(session, 4401, "login", "a refreshed token must be the same user's").await,
                    Err(Some(why)) => return refuse(session, 4401, "login", &why).await,
                    Err(None) => return unchecked(session).await,
                }
            }
            got = rx.recv() => match got {
                Ok(e) => {
                    if e.seq <= last { continue; }
                    last = e.seq;
                    if viewer.revoked() {
                        return refuse(session, 4401, "revoked", "the access token has been revoked").await;
                    }
                    if viewer.sees(&e) {
                        if session.text(e.text.clone()).await.is_err() {
                            return Stop::Gone;
                        }
                        told.note(&e);
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    // Too slow for the channel: what was dropped is read back from the log.
                    let upto = hub.head();
                    match catch_up(&hub, &viewer, session, last, upto, told).await {
                        Ok(Some(seq)) => last = seq,
                        Ok(None) => {
                            if let Err(stop) = send(session, &json!({"type": "resync", "seq": sealed(state, upto)})).await {
                                return stop;
                            }
                            last = upto;
                        }
                        Err(stop) => return stop,
                    }
                }
                Err(RecvError::Closed) => return close(1012, "restarting"),
            },
            Ok(()) = stopping.changed() => return close(1012, "restarting"),
            Ok(()) = viewer.revocations.changed() => {
                if viewer.revoked() {
                    return refuse(session, 4401, "revoked", "the access token has been revoked").await;
                }
            }
            _ = expires => {
                return refuse(session, 4401, "expired", "the access token has expired: refresh it and reconnect").await;
            }
            _ = check.tick() => {
                told.record(state).await;
                // Still valid? And group memberships as they are now (a member removed from a
                // care team stops hearing of its messages within this interval).
                let st = state.clone();
                let mut p = viewer.principal.clone();
                let fresh = web::block(move || -> Result<Option<Principal>, crate::store::StoreError> {
                    if !st.tokens.still_valid(&p)? {
                        return Ok(None);
                    }
                    p.groups = super::groups::of(&st.store, p.fhir_user.as_deref())?;
                    Ok(Some(p))
                })
                .await;
                match fresh {
                    Ok(Ok(Some(p))) => viewer = Viewer::new(state, p),
                    Ok(Ok(None)) => return refuse(session, 4401, "revoked", "the access token has been revoked").await,
                    _ => return unchecked(session).await,
                }
                if session.ping(b"").await.is_err() {
                    return Stop::Gone;
                }
            }
        }
    }
}

/// Sends the visible events in (`from`, `upto`], read from the log. `None` when there are more
/// than [`MAX_CATCH_UP`] (the client reloads instead).
async fn catch_up(
    hub: &Arc<Hub>,
    viewer: &Viewer,
    session: &mut actix_ws::Session,
    from: i64,
    upto: i64,
    told: &mut Disclosures,
) -> Result<Option<i64>, Stop> {
    if upto - from > MAX_CATCH_UP as i64 {
        return Ok(None);
    }
    let mut last = from;
    while last < upto {
        let h = hub.clone();
        let after = last;
        let (batch, raw_last) = tokio::task::spawn_blocking(move || h.load_after(after, 500))
            .await
            .map_err(|_| close(1011, "catch-up failed"))?
            .map_err(|_| close(1011, "catch-up failed"))?;
        let Some(end) = raw_last else {
            break;
        };
        for e in batch.iter().filter(|e| e.seq <= upto) {
            if viewer.revoked() {
                return Err(close(4401, "the access token has been revoked"));
            }
            if viewer.sees(e) {
                session.text(e.text.clone()).await.map_err(|_| Stop::Gone)?;
                told.note(e);
            }
        }
        last = end.min(upto);
        if end >= upto {
            break;
        }
    }
    Ok(Some(upto.max(last)))
}
