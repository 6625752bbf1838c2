//! Every FHIR endpoint but `/metadata` needs a valid bearer token: this middleware turns it into a
//! [`Principal`] in the request's extensions, or answers 401 with `WWW-Authenticate: Bearer` and an
//! OperationOutcome (and audits the refusal).

use super::abuse::{self, Abuse};
use super::Principal;
use crate::api::audit_context;
use crate::api::AppState;
use crate::fhir::outcome::FhirError;
use crate::store::db::PooledConn;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::{header, Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpRequest, ResponseError};

/// Paths anyone may call: discovery, the authorization server itself, health, CapabilityStatement.
fn is_public(path: &str) -> bool {
    matches!(path, "/metadata" | "/healthz" | "/readyz")
        || path.starts_with("/.well-known/")
        || path.starts_with("/auth/")
        // The web app's static files (its API calls carry the token).
        || path == "/app"
        || path.starts_with("/app/")
        // The second step of a sign-in: bound by its single-use ticket (src/mfa).
        || path.starts_with("/smart/mfa/")
        || matches!(path, "/smart/mfa" | "/smart/mfa.js" | "/smart/mfa.css")
        // An email notice's unsubscribe link, bound by its random token.
        || path == "/notify/unsubscribe"
        || matches!(
            path,
            "/launch"
                | "/smart/jwks"
                | "/smart/launch"
                | "/smart/callback"
                | "/smart/session/refresh"
                | "/smart/logout"
                // The WebSocket authenticates in its protocol (a browser cannot set the header).
                | "/ws"
                // Bound with a single-use token from $get-ws-binding-token.
                | "/subscriptions/ws"
        )
}

/// The token of an `Authorization: Bearer …` header.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// In a request's extensions: it carried the static metrics token.
#[derive(Clone, Copy)]
pub struct MetricsAccess;

const UNCHECKED: &str = "the access token could not be checked";

/// A verified token's principal, once checked against revocation (and its client's removal),
/// with the user's groups and emergency grants added.
fn admit(state: &AppState, mut p: Principal, c: &mut PooledConn) -> Result<Principal, String> {
    match state.tokens.still_valid_on(c, &p) {
        Ok(true) => {
            p.groups = crate::messaging::groups::of_on(&state.store, c, p.fhir_user.as_deref())
                .map_err(|_| UNCHECKED.to_string())?;
            p.emergency = crate::compliance::emergency::active_on(&state.store, c, &p)
                .map_err(|_| UNCHECKED.to_string())?;
            Ok(p)
        }
        Ok(false) => Err("the access token has been revoked or its client removed".into()),
        Err(_) => Err(UNCHECKED.into()),
    }
}

pub async fn authenticate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if req.method() == Method::OPTIONS {
        return next.call(req).await.map(|r| r.map_into_left_body());
    }
    let abuse = req
        .app_data::<web::Data<Abuse>>()
        .expect("Abuse is registered")
        .clone();
    // The path as the router matches it (percent-encoded unreserved characters decoded):
    // `/auth/%74oken` is the token endpoint and is limited like it.
    let path = req.match_info().as_str().to_string();
    if is_public(&path) {
        if abuse::is_limited_path(&path) {
            let state = req
                .app_data::<web::Data<AppState>>()
                .expect("AppState is registered");
            let ip = abuse::client_ip(req.request(), &state.settings);
            if let Err(wait) = abuse.check_open(ip) {
                return Ok(req
                    .into_response(abuse::too_many(wait))
                    .map_into_right_body());
            }
        }
        return next.call(req).await.map(|r| r.map_into_left_body());
    }
    let state = req
        .app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
        .clone();
    let token = bearer(req.request()).map(String::from);
    // A scraper's static token for the metrics (`COURIER_METRICS_TOKEN`).
    if path == "/metrics" {
        if let (Some(t), Some(want)) = (&token, &state.settings.metrics_token) {
            use secrecy::ExposeSecret;
            use sha2::{Digest, Sha256};
            // Compared as digests: no timing hint about the secret's bytes.
            if Sha256::digest(t.as_bytes()) == Sha256::digest(want.expose_secret().as_bytes()) {
                req.extensions_mut().insert(MetricsAccess);
                return next.call(req).await.map(|r| r.map_into_left_body());
            }
        }
    }
    let had_token = token.is_some();
    let verdict: Result<Principal, String> = match token {
        None => Err("an access token is required (Authorization: Bearer …)".into()),
        Some(t) => {
            // A token whose signature was checked before, on SQLite with a pooled connection
            // free: the few indexed lookups are made here, in the request's task (a hop through
            // the blocking pool and back cost more than they do). Otherwise (a token's first
            // use: a signature check, PostgreSQL: network round trips) on the blocking pool.
            let now = state
                .tokens
                .verified(&t)
                .and_then(|p| state.store.db.get_now().map(|c| (p, c)));
            match now {
                Some((p, mut c)) => admit(&state, p, &mut c),
                None => {
                    let st = state.clone();
                    let checked = web::block(move || {
                        let p = st.tokens.verify(&t)?;
                        let mut c = st.store.db.get().map_err(|_| UNCHECKED.to_string())?;
                        admit(&st, p, &mut c)
                    });
                    // Bounded: a database that stops answering is "unreachable" here too.
                    match tokio::time::timeout(crate::store::WRITE_WAIT, checked).await {
                        Ok(done) => done.unwrap_or_else(|_| Err(UNCHECKED.into())),
                        Err(_) => Err(UNCHECKED.into()),
                    }
                }
            }
        }
    };
    match verdict {
        Ok(p) => {
            req.extensions_mut().insert(p);
            next.call(req).await.map(|r| r.map_into_left_body())
        }
        // The database could not be asked (revocation, the user's groups): not the token's
        // fault, so not 401 (a client would drop a good token) and not counted as a failed
        // authentication; 503 with Retry-After, as for any storage outage.
        Err(why) if why == UNCHECKED => {
            let err = FhirError::unavailable(&format!("{UNCHECKED} (the database is unreachable)"));
            Ok(req
                .into_response(err.error_response())
                .map_into_right_body())
        }
        Err(why) => {
            let ctx = audit_context(req.request(), &state);
            let ip = abuse::client_ip(req.request(), &state.settings);
            // Audited per source and window, with a count (see `abuse`).
            if let Some(event) = abuse.failure(ip, &ctx, &why) {
                crate::api::record_event(&state, event).await;
            }
            if let Err(wait) = abuse.check_failed(ip) {
                return Ok(req
                    .into_response(abuse::too_many(wait))
                    .map_into_right_body());
            }
            let err = FhirError::new(StatusCode::UNAUTHORIZED, "login", why.clone());
            let mut res = err.error_response();
            // RFC 6750 §3.1: no error code when the request carried no token at all.
            let challenge = if had_token {
                format!(
                    "Bearer realm=\"courier\", error=\"invalid_token\", error_description=\"{}\"",
                    why.replace('"', "'")
                )
            } else {
                "Bearer realm=\"courier\"".to_string()
            };
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_str(&challenge)
                    .unwrap_or(header::HeaderValue::from_static("Bearer realm=\"courier\"")),
            );
            Ok(req.into_response(res).map_into_right_body())
        }
    }
}
