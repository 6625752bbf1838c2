//! The web layer every handler uses — FHIR, auth, SMART and messaging alike: the application
//! state, the request's context (request id, audit context), content negotiation, reading bodies,
//! running blocking work, and answering with an audit. It knows no FHIR interaction; the REST
//! handlers (`fhir::rest`) are one of its users.

use crate::audit::{self, Interaction};
use crate::auth::clients::JwksCache;
use crate::auth::tokens::Tokens;
use crate::auth::Principal;
use crate::config::Settings;
use crate::fhir::outcome::{self, FhirError};
use crate::store::Store;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::Value;
use std::sync::Arc;

/// Shared by every handler.
pub struct AppState {
    pub store: Arc<Store>,
    pub settings: Arc<Settings>,
    /// Courier's access tokens: issuing and checking them.
    pub tokens: Arc<Tokens>,
    /// Integrators' public keys, fetched from their JWKS URLs.
    pub jwks: Arc<JwksCache>,
    /// Backend-services connections to the registered EHRs.
    pub ehrs: Arc<crate::smart::backend::Connections>,
    /// The real-time hub (WebSocket fan-out).
    pub hub: Arc<crate::messaging::hub::Hub>,
    /// AuditEvents that could not be recorded when they happened, recorded once the store
    /// takes writes again.
    pub deferred_audit: Arc<crate::audit::deferred::Deferred>,
}

pub type Res = Result<HttpResponse, FhirError>;

/// The request id set by the request-id middleware.
#[derive(Clone)]
pub struct RequestId(pub String);

pub fn audit_context(req: &HttpRequest, state: &AppState) -> audit::Context {
    let principal = req.extensions().get::<Principal>().cloned();
    audit::Context {
        emergency: principal.as_ref().is_some_and(|p| !p.emergency.is_empty()),
        user: principal.as_ref().and_then(|p| p.fhir_user.clone()),
        client_id: principal.as_ref().map(|p| p.client_id.clone()),
        token_id: principal.map(|p| p.jti),
        request_id: req
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default(),
        client_address: crate::auth::abuse::client_ip(req, &state.settings)
            .map_or_else(|| "unknown".into(), |a| a.to_string()),
        base_url: state.settings.base_url.clone(),
        ..Default::default()
    }
}

/// The longest a request waits for its blocking store work ([`blocking`]).
pub const BLOCKING_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs blocking store work off the async executor.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FhirError> + Send + 'static,
) -> Result<T, FhirError> {
    // The request's span (its request id) follows the work onto the blocking thread.
    let span = tracing::Span::current();
    // Bounded: a database that stops answering without breaking the connection must not hold
    // the request for the whole outage (the token's check and writes wait `store::WRITE_WAIT`;
    // this, which also runs exports, erasures and transactions, longer).
    match tokio::time::timeout(BLOCKING_WAIT, web::block(move || span.in_scope(f))).await {
        Ok(done) => done.map_err(|_| FhirError::internal())?,
        Err(_) => Err(FhirError::unavailable_in_flight(
            "the database did not answer in time",
        )),
    }
}

/// Audits an operation's result (see [`audit_outcome`]) and answers with it.
/// The patients whose data an answer disclosed, as an extension of the response: its
/// AuditEvent names each (`answer_audited`), so that `AuditEvent?patient=` is that patient's
/// accounting of disclosures.
#[derive(Clone)]
pub struct Disclosed(pub Vec<String>);

pub async fn audited_answer(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    interaction: Interaction,
    what: String,
    result: Res,
) -> HttpResponse {
    let ctx = audit_context(req, state);
    answer_audited(state, &ctx, interaction, Some(what), None, result).await
}

/// Audits an operation under `ctx` (on `what`, about `patient` when it concerns one) and answers
/// with its result.
pub async fn audited_operation(
    state: &web::Data<AppState>,
    ctx: &audit::Context,
    what: String,
    patient: Option<String>,
    result: Res,
) -> HttpResponse {
    answer_audited(
        state,
        ctx,
        Interaction::Operation,
        Some(what),
        patient,
        result,
    )
    .await
}

/// Audits an interaction's result (see [`audit_outcome`]) and answers with it, or — when its
/// AuditEvent could not be recorded — with 503 instead: nothing is served unaudited
/// (HIPAA §164.312(b)).
pub async fn answer_audited(
    state: &web::Data<AppState>,
    ctx: &audit::Context,
    interaction: Interaction,
    what: Option<String>,
    patient: Option<String>,
    result: Res,
) -> HttpResponse {
    // A storage 503 met during a read changed nothing of the client's: it says so.
    let result = if interaction.reads_only() {
        result.map_err(FhirError::for_a_read)
    } else {
        result
    };
    // Whose data the answer disclosed (`Disclosed`, set by whoever built it) is named in its
    // AuditEvent.
    let with_disclosed;
    let ctx = match result
        .as_ref()
        .ok()
        .and_then(|r| r.extensions().get::<Disclosed>().cloned())
    {
        Some(d) => {
            let mut c = ctx.clone();
            c.disclosed.extend(d.0);
            with_disclosed = c;
            &with_disclosed
        }
        None => ctx,
    };
    let audited = audit_outcome(state, ctx, interaction, what, patient, &result).await;
    // What could not be recorded now is recorded once the store takes writes again (see
    // `audit::deferred`), saying what the client was answered.
    let (audited, unrecorded) = match audited {
        Ok(()) => (Ok(()), None),
        Err((e, ev)) => (Err(e), Some(ev)),
    };
    let write_stands = result.as_ref().is_ok_and(|r| r.status().is_success())
        && matches!(
            interaction,
            Interaction::Create | Interaction::Update | Interaction::Patch | Interaction::Delete
        );
    if let Some(ev) = unrecorded {
        // A change that was made has its AuditEvent in its own transaction already.
        if !write_stands {
            let late = match &result {
                // A read, search or history withheld: nothing was served.
                _ if interaction.reads_only() => Late::Withheld,
                // It ran (an operation, a bundle): its effects stand, its answer was 503.
                Ok(_) => Late::RanAnswered503,
                // It failed on its own with a 503: what the event says is what the client heard.
                Err(e) if e.status == actix_web::http::StatusCode::SERVICE_UNAVAILABLE => {
                    Late::AsItIs
                }
                // It failed on its own (400, 409 …) but the client was answered 503 (its
                // failure could not be audited): the event says both (an outside fault probe
                // found refused creates recorded as "HTTP 400" that their clients got as 503).
                Err(_) => Late::FailedAnswered503,
            };
            state.deferred_audit.push(deferred(ev, late));
        }
    }
    let answer = match (audited, result) {
        (Ok(()), result) => result,
        // A change that was made has its AuditEvent in its own transaction: it stands, and so
        // does its answer (a 503 would invite a second, duplicate change).
        (Err(_), Ok(r)) if write_stands => Ok(r),
        // A bundle's GET entries are audited only by the bundle's AuditEvent: withheld. Its
        // changes, if any, were made (each audited in its transaction).
        (Err(e), Ok(r))
            if r.status().is_success()
                && matches!(interaction, Interaction::Transaction | Interaction::Batch) =>
        {
            let mut e = e;
            e.issues[0].diagnostics = format!(
                "{}; the bundle's changes, if any, were made: read them back before retrying",
                e.issues[0]
                    .diagnostics
                    .split(';')
                    .next()
                    .unwrap_or_default()
            );
            Err(e)
        }
        // Failed, and its failure could not be audited either (the database unreachable): the
        // request's own 503 says what may have happened (a write's commit cut off may have
        // been saved), which the audit's "nothing was served or changed" would deny.
        (Err(_), Err(e)) if e.status == actix_web::http::StatusCode::SERVICE_UNAVAILABLE => Err(e),
        (Err(e), _) => Err(e),
    };
    answer.unwrap_or_else(|e| actix_web::ResponseError::error_response(&e))
}

/// Records the AuditEvent of an interaction that has none from the write path: reads, searches,
/// and every failure; durable when this returns. `Err` (503, and the event) when it could not be
/// recorded: the caller must not serve the result (see [`answer_audited`]).
pub async fn audit_outcome(
    state: &web::Data<AppState>,
    ctx: &audit::Context,
    interaction: Interaction,
    what: Option<String>,
    patient: Option<String>,
    result: &Res,
) -> Result<(), (FhirError, Value)> {
    let failure_outcome;
    let failure = match result {
        Ok(r) if r.status().is_success() || r.status().is_redirection() => None,
        Ok(r) => {
            failure_outcome = outcome::information("");
            Some(audit::Failure {
                status: r.status().as_u16(),
                outcome: &failure_outcome,
            })
        }
        Err(e) => {
            failure_outcome = e.outcome();
            Some(audit::Failure {
                status: e.status.as_u16(),
                outcome: &failure_outcome,
            })
        }
    };
    let ev = audit::event(
        ctx,
        interaction,
        what.as_deref(),
        patient.as_deref(),
        failure,
    );
    try_record(state, ev.clone()).await.map_err(|e| (e, ev))
}

/// What a late-recorded AuditEvent says of its request (see `audit::deferred`).
#[derive(Clone, Copy)]
enum Late {
    /// Refused because its AuditEvent could not be written: nothing was served or changed (a
    /// success becomes a serious failure).
    Withheld,
    /// It ran (its effects stand) but was answered 503.
    RanAnswered503,
    /// As the event says (a failure of its own, or something that happened regardless).
    AsItIs,
    /// It failed on its own, and was answered 503 instead (its failure could not be audited).
    FailedAnswered503,
}

/// `event`, to be recorded late, saying what the client was told.
fn deferred(mut event: Value, late: Late) -> Value {
    let said = match late {
        Late::Withheld => {
            if event["outcome"] == "0" {
                event["outcome"] = serde_json::json!("8");
            }
            "answered 503: the audit trail could not be written when this was requested, so nothing was served or changed; recorded once it could"
        }
        Late::RanAnswered503 => "it ran, but was answered 503 because its AuditEvent could not be written then (its changes, if any, were made); recorded once it could",
        Late::AsItIs => "recorded late: the audit trail could not be written when this happened",
        Late::FailedAnswered503 => "answered 503, not this outcome: the audit trail could not be written when this was refused (nothing was changed); recorded once it could",
    };
    event["outcomeDesc"] = match event["outcomeDesc"].as_str() {
        Some(d) if !d.is_empty() => serde_json::json!(format!("{d}; {said}")),
        _ => serde_json::json!(said),
    };
    event
}

/// Records an AuditEvent on its own (durable before this returns). A failure is logged; for
/// callers that go ahead whatever happens (a refusal, a logout).
pub async fn record_event(state: &AppState, event: Value) {
    if try_record(state, event.clone()).await.is_err() {
        // What it records happened: recorded as it is, once the store takes writes again.
        state.deferred_audit.push(deferred(event, Late::AsItIs));
    }
}

/// Records an AuditEvent on its own (durable before this returns); `Err` (503, logged with the
/// request id) when it could not be: what it records must then not happen (it is recorded later
/// as refused, see `audit::deferred`).
pub async fn record_event_checked(state: &AppState, event: Value) -> Result<(), FhirError> {
    match try_record(state, event.clone()).await {
        Ok(()) => Ok(()),
        Err(e) => {
            state.deferred_audit.push(deferred(event, Late::Withheld));
            Err(e)
        }
    }
}

/// Records an AuditEvent of something that has happened already (a disclosure over a socket):
/// now, or once the store takes writes again (`audit::deferred`), saying it is late.
pub async fn record_event_after(state: &AppState, event: Value) {
    if try_record(state, event.clone()).await.is_err() {
        state.deferred_audit.push(deferred(event, Late::AsItIs));
    }
}

async fn try_record(state: &AppState, event: Value) -> Result<(), FhirError> {
    let request_id = event["entity"]
        .as_array()
        .and_then(|es| {
            es.iter()
                .find(|e| e["type"]["code"] == "XrequestId")
                .and_then(|e| e["what"]["identifier"]["value"].as_str())
        })
        .unwrap_or_default()
        .to_string();
    state.store.record_audit_async(event).await.map_err(|e| {
        let why = crate::store::health::unavailable(&e).unwrap_or("the audit trail cannot be written");
        tracing::error!(%request_id, error = %e, "could not record AuditEvent: the request is refused");
        FhirError::unavailable(why)
    })
}

// ----- content negotiation ------------------------------------------------------------------------

/// `Accept` / `_format`: JSON is served; XML and others get 406.
pub fn check_accept(req: &HttpRequest) -> Result<(), FhirError> {
    if let Some(f) = form_urlencoded::parse(req.query_string().as_bytes())
        .into_owned()
        .collect::<Vec<(String, String)>>()
        .into_iter()
        .find(|(k, _)| k == "_format")
        .map(|(_, v)| v)
    {
        return match f.as_str() {
            "json" | "application/json" | "application/fhir+json" => Ok(()),
            _ => Err(FhirError::new(
                StatusCode::NOT_ACCEPTABLE,
                "not-supported",
                format!("_format={f} is not supported; this server speaks application/fhir+json"),
            )),
        };
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.is_empty() {
        return Ok(());
    }
    let ok = accept.split(',').any(|m| {
        let m = m.split(';').next().unwrap_or("").trim();
        matches!(
            m,
            "*/*"
                | "application/*"
                | "application/json"
                | "application/fhir+json"
                | "application/json+fhir"
        )
    });
    if ok {
        Ok(())
    } else {
        Err(FhirError::new(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            format!("cannot produce '{accept}'; this server speaks application/fhir+json"),
        ))
    }
}

/// The request's media type, lower-cased, without parameters.
pub fn media_type(req: &HttpRequest) -> String {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// A resource body must be FHIR JSON; XML is refused with 415.
pub fn check_content_type(req: &HttpRequest) -> Result<(), FhirError> {
    match media_type(req).as_str() {
        "application/fhir+json" | "application/json" | "application/json+fhir" => Ok(()),
        "" => Err(FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "Content-Type is missing; send application/fhir+json",
        )),
        other => Err(FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            format!("Content-Type '{other}' is not supported; send application/fhir+json"),
        )),
    }
}

/// Reads the body, refusing (413) anything over `limit` before buffering it.
pub async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, FhirError> {
    let too_large = || {
        FhirError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            format!("the request body is larger than the limit of {limit} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // Sized once from the declared length (growing by doubling held up to twice the body).
    let mut body = web::BytesMut::with_capacity(declared.unwrap_or(0));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|_| FhirError::bad_request("the request body could not be read"))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A query string as its decoded `(name, value)` pairs, in order.
pub fn query_pairs(q: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// A `Parameters` resource answer (operations' results), never cached.
pub fn parameters(params: Vec<Value>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(crate::fhir::outcome::FHIR_JSON)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(serde_json::json!({"resourceType": "Parameters", "parameter": params}).to_string())
}
