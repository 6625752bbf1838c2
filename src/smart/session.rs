//! Signed-in users after a SMART launch.
//!
//! The launch creates a session and hands the web app a random handle (128 bits; only its SHA-256
//! is stored) beside its first Courier token. While the user is active the app trades the handle
//! for a fresh Courier token (`POST /smart/session/refresh`); Courier refreshes the EHR's token
//! first when it is about to expire, so the EHR session stays alive exactly as long as the user is.
//! A session ends after the configured idle time (automatic log-off), on `POST /smart/logout`, or
//! when the EHR refuses to refresh it. Every end is audited (DICOM 110123 Logout).

use super::registry::{self, Ehr};
use crate::api::AppState;
use crate::auth::scopes;
use crate::auth::tokens::Grant;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use oauth2::{AuthType, ClientId, RefreshToken, TokenResponse, TokenUrl};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The EHR's token is refreshed when it has less than this left.
const REFRESH_MARGIN_SECS: i64 = 60;
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Courier tokens of one session alive at once, at most: the app refreshes at most every 15 s
/// (a token lives 300 s), so 30 is twice what it ever holds; beyond, a refresh is refused with
/// 429 until the oldest expires (a probe: a refresh loop grew the session's row without bound).
const MAX_LIVE_TOKENS: usize = 30;
/// A token is kept in the session's list this long past its expiry (verification allows 5 s).
const EXPIRED_KEPT_SECS: i64 = 60;
/// The verifier's leeway on expiry (`auth::tokens`): a token counts as valid this long after.
const VERIFY_LEEWAY_SECS: i64 = 5;
/// The columns of [`Row`].
const ROW_COLUMNS: &str = "handle_hash, ehr, fhir_user, patient, encounter, scope, key_id, ehr_tokens, ehr_expires_at, last_active, amr, token_jtis";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/smart/session/refresh", web::post().to(refresh))
        .route("/smart/logout", web::post().to(logout));
}

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

fn hash(handle: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(handle.as_bytes()))
}

fn aad(handle_hash: &str) -> String {
    format!("ehr-session/{handle_hash}")
}

/// What a session carries over to each new Courier token.
pub struct Signed {
    pub ehr: String,
    pub fhir_user: String,
    pub patient: Option<String>,
    pub encounter: Option<String>,
    pub scope: String,
    pub ehr_access_token: String,
    pub ehr_refresh_token: Option<String>,
    pub ehr_expires_in: i64,
    /// The first Courier token's `jti` and expiry.
    pub first_token: (String, i64),
    /// How the person authenticated (RFC 8176), carried into every token of the session.
    pub amr: Vec<String>,
}

/// Starts a session; returns the handle for the web app.
pub fn start(state: &AppState, s: &Signed) -> anyhow::Result<String> {
    let handle = oauth2::CsrfToken::new_random().secret().clone();
    let h = hash(&handle);
    // Sessions idle past the limit are gone for good (their sealed EHR tokens with them).
    end_where(
        &state.store,
        "last_active < ?",
        vec![(now() - state.settings.idle_timeout_secs).into()],
    )?;
    let tokens = json!({"access_token": s.ehr_access_token, "refresh_token": s.ehr_refresh_token});
    let (key_id, sealed) = state
        .store
        .keys
        .seal(tokens.to_string().as_bytes(), &aad(&h));
    let t = now();
    state.store.execute(
        "INSERT INTO ehr_sessions (handle_hash, ehr, fhir_user, patient, encounter, scope, key_id, ehr_tokens, ehr_expires_at, last_active, created_at, token_jtis, amr) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        vec![
            h.into(),
            s.ehr.clone().into(),
            s.fhir_user.clone().into(),
            s.patient.clone().into(),
            s.encounter.clone().into(),
            s.scope.clone().into(),
            key_id.into(),
            sealed.into(),
            (t + s.ehr_expires_in).into(),
            t.into(),
            t.into(),
            format!("{}:{}", s.first_token.0, s.first_token.1).into(),
            s.amr.join(" ").into(),
        ],
    )?;
    Ok(handle)
}

#[derive(QueryableByName)]
struct JtiRow {
    #[diesel(sql_type = Text)]
    handle_hash: String,
    #[diesel(sql_type = Text)]
    token_jtis: String,
}

#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = Text)]
    handle_hash: String,
    #[diesel(sql_type = Text)]
    ehr: String,
    #[diesel(sql_type = Text)]
    fhir_user: String,
    #[diesel(sql_type = Nullable<Text>)]
    patient: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    encounter: Option<String>,
    #[diesel(sql_type = Text)]
    scope: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    ehr_tokens: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    ehr_expires_at: i64,
    #[diesel(sql_type = BigInt)]
    last_active: i64,
    #[diesel(sql_type = Text)]
    amr: String,
    #[diesel(sql_type = Text)]
    token_jtis: String,
}

/// An entry's (`jti:exp`) expiry, when it can be read.
fn expiry(entry: &str) -> Option<i64> {
    entry.split_once(':')?.1.parse().ok()
}

/// The entries (`jti:exp`) of a session's token list that may still be presented: expired ones
/// (past the verifier's leeway, with a margin) need no revocation and are dropped.
fn live_entries(token_jtis: &str, t: i64) -> Vec<&str> {
    token_jtis
        .split_whitespace()
        .filter(|entry| expiry(entry).is_none_or(|exp| exp + EXPIRED_KEPT_SECS >= t))
        .collect()
}

/// When a session's list already holds [`MAX_LIVE_TOKENS`] tokens still valid: the seconds until
/// the first of them is not (a refresh then is refused with 429 and this `Retry-After`).
fn crowded(token_jtis: &str, t: i64) -> Option<i64> {
    let valid: Vec<i64> = live_entries(token_jtis, t)
        .iter()
        .map(|entry| expiry(entry).unwrap_or(i64::MAX / 4))
        .filter(|exp| exp + VERIFY_LEEWAY_SECS >= t)
        .collect();
    (valid.len() >= MAX_LIVE_TOKENS).then(|| {
        let soonest = valid.iter().min().copied().unwrap_or(t);
        (soonest + VERIFY_LEEWAY_SECS + 1 - t).clamp(1, 3600)
    })
}

fn slow_down(wait: i64) -> HttpResponse {
    HttpResponse::TooManyRequests()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::RETRY_AFTER, wait.to_string()))
        .json(json!({"error": "slow_down", "error_description": crowded_words(wait)}))
}

fn crowded_words(wait: i64) -> String {
    format!("this session has {MAX_LIVE_TOKENS} tokens still valid; try again in {wait} s")
}

/// What became of a token a refresh issued.
enum Recorded {
    /// In the session's list: it may be handed out.
    Yes,
    /// The session ended meanwhile: the token was revoked.
    Ended,
    /// The list filled meanwhile: the token was revoked; try again after this many seconds.
    Crowded(i64),
    /// The list kept changing (refreshes racing on one session): the token was revoked.
    Busy,
}

/// Adds a token's entry (` jti:exp`) to an active session's list, dropping entries long expired,
/// unless the list is full of valid ones. The list is rewritten only if it is still the one read
/// (read again otherwise, a few times; then the refresh is refused as busy: appending without the
/// check would let a burst of parallel refreshes pass the limit). Only to a session still active:
/// one being ended is marked idle first (`end_where`). A token not recorded is revoked.
fn record_token(
    store: &crate::store::Store,
    handle_hash: &str,
    mut read: String,
    (jti, exp): (&str, i64),
    t: i64,
    idle: i64,
) -> Result<Recorded, crate::store::StoreError> {
    let entry = format!(" {jti}:{exp}");
    let active = t - idle;
    let mut outcome = None;
    for _ in 0..5 {
        if let Some(wait) = crowded(&read, t) {
            outcome = Some(Recorded::Crowded(wait));
            break;
        }
        let pruned = format!(" {}{entry}", live_entries(&read, t).join(" "));
        let n = store.execute(
            "UPDATE ehr_sessions SET token_jtis = ? WHERE handle_hash = ? AND token_jtis = ? AND last_active >= ?",
            vec![pruned.into(), handle_hash.into(), read.into(), active.into()],
        )?;
        if n == 1 {
            return Ok(Recorded::Yes);
        }
        let again: Vec<JtiRow> = store.query(
            "SELECT handle_hash, token_jtis FROM ehr_sessions WHERE handle_hash = ? AND last_active >= ?",
            vec![handle_hash.into(), active.into()],
        )?;
        match again.into_iter().next() {
            Some(r) => read = r.token_jtis,
            None => {
                outcome = Some(Recorded::Ended);
                break;
            }
        }
    }
    let outcome = outcome.unwrap_or(Recorded::Busy);
    crate::auth::tokens::revoke_in(store, jti, exp)?;
    Ok(outcome)
}

fn handle_of(body: &[u8]) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "session")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn ended(why: &str) -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"error": "session_ended", "error_description": why}))
}

async fn audit_logout(state: &web::Data<AppState>, req: &HttpRequest, user: &str, why: &str) {
    let mut ctx = crate::api::audit_context(req, state);
    ctx.client_id = Some(super::launch::WEB_APP_CLIENT.into());
    crate::api::record_event(state, logout_event(ctx, user, why)).await;
}

/// The AuditEvent of `user`'s session ending (DICOM 110123 Logout), for `why`.
fn logout_event(mut ctx: crate::audit::Context, user: &str, why: &str) -> Value {
    ctx.user = Some(user.to_string());
    let mut event = crate::audit::authentication(&ctx, None);
    event["subtype"] = json!([{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110123", "display": "Logout"}]);
    event["outcomeDesc"] = json!(why);
    event
}

#[derive(QueryableByName)]
struct IdleRow {
    #[diesel(sql_type = Text)]
    handle_hash: String,
    #[diesel(sql_type = Text)]
    fhir_user: String,
}

/// Ends the sessions idle past `idle` seconds (a background pass every 30 s): their Courier
/// tokens revoked, the EHR's tokens they held dropped, each audited as an automatic log-off —
/// whether or not anyone asks for a refresh again (a probe: an abandoned session ended only at
/// its next refresh, and kept its EHR tokens, sealed, until then). Blocking; at most 200 a pass.
/// Returns the sessions ended.
pub fn sweep(store: &crate::store::Store, idle: i64) -> Result<usize, crate::store::StoreError> {
    if idle <= 0 {
        return Ok(0);
    }
    let cutoff = now() - idle;
    let rows: Vec<IdleRow> = store.query(
        "SELECT handle_hash, fhir_user FROM ehr_sessions WHERE last_active < ? LIMIT 200",
        vec![cutoff.into()],
    )?;
    let mut ended = 0;
    for row in rows {
        // Still idle when ended (a refresh in between keeps it).
        let n = end_where(
            store,
            "handle_hash = ? AND last_active < ?",
            vec![row.handle_hash.into(), cutoff.into()],
        )?;
        if n > 0 {
            ended += n;
            let ctx = crate::audit::Context::job(&store.base_url, "sessions");
            let event = logout_event(ctx, &row.fhir_user, "automatic log-off after inactivity");
            if let Err(e) = store.record_audit(event) {
                // The session is over either way; the rest of the pass goes on.
                tracing::error!(error = %e, "an automatic log-off could not be audited");
            }
        }
    }
    Ok(ended)
}

/// The session a handle names; an error when the database could not say.
async fn load(state: &web::Data<AppState>, handle: &str) -> Result<Option<Row>, ()> {
    let store = state.store.clone();
    let h = hash(handle);
    match web::block(move || row_of(&store, &h)).await {
        Ok(Ok(row)) => Ok(row),
        _ => Err(()),
    }
}

/// The session whose handle hashes to `handle_hash`. Blocking.
fn row_of(
    store: &crate::store::Store,
    handle_hash: &str,
) -> Result<Option<Row>, crate::store::StoreError> {
    let rows: Vec<Row> = store.query(
        &format!("SELECT {ROW_COLUMNS} FROM ehr_sessions WHERE handle_hash = ?"),
        vec![handle_hash.into()],
    )?;
    Ok(rows.into_iter().next())
}

/// Marks a session active at `t`, if it still is (one being ended is marked idle first). Blocking.
fn touch(
    store: &crate::store::Store,
    handle_hash: &str,
    t: i64,
    idle: i64,
) -> Result<usize, crate::store::StoreError> {
    store.execute(
        "UPDATE ehr_sessions SET last_active = ? WHERE handle_hash = ? AND last_active >= ?",
        vec![t.into(), handle_hash.into(), (t - idle).into()],
    )
}

/// 503 for a session that was to end but could not be ended now: not "signed out" (the next
/// refresh tries again).
fn not_ended() -> HttpResponse {
    unavailable(
        json!({"error": "temporarily_unavailable", "error_description": "Courier could not end the session now; try again shortly"}),
    )
}

/// 503: Courier could not do what was asked now; the app tries again.
fn unavailable(body: Value) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::RETRY_AFTER, "5"))
        .json(body)
}

/// A live session (not idle past the limit), as `POST /smart/mfa/step-up` needs it.
pub struct Current {
    pub handle_hash: String,
    pub ehr: String,
    pub fhir_user: String,
    pub scope: String,
    pub amr: Vec<String>,
}

pub async fn current(state: &web::Data<AppState>, handle: &str) -> Option<Current> {
    let row = load(state, handle).await.ok().flatten()?;
    (now() - row.last_active <= state.settings.idle_timeout_secs).then(|| Current {
        handle_hash: row.handle_hash,
        ehr: row.ehr,
        fhir_user: row.fhir_user,
        scope: row.scope,
        amr: row.amr.split_whitespace().map(String::from).collect(),
    })
}

/// After a step-up: the session's scope and authentication methods change, and a token with
/// them is issued (and recorded, so that ending the session revokes it). Returns what the app
/// stores: `access_token`, `expires_in`, `amr`.
pub async fn upgrade(
    state: &web::Data<AppState>,
    handle_hash: &str,
    scope: &str,
    amr: &[String],
) -> Result<Value, String> {
    let store = state.store.clone();
    let h = handle_hash.to_string();
    let row = web::block(move || row_of(&store, &h))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("your session has ended: sign in again")?;
    let issued = state
        .tokens
        .issue_with_amr(
            &Grant {
                client_id: super::launch::WEB_APP_CLIENT.into(),
                scopes: scopes::parse_all(scope).map_err(|e| e.to_string())?,
                fhir_user: Some(row.fhir_user.clone()),
                patient: row.patient.clone(),
                encounter: row.encounter.clone(),
            },
            amr,
            crate::auth::tokens::session_lifetime(state.settings.idle_timeout_secs),
        )
        .map_err(|e| e.to_string())?;
    let store = state.store.clone();
    let (h, scope, joined) = (row.handle_hash.clone(), scope.to_string(), amr.join(" "));
    let idle = state.settings.idle_timeout_secs;
    let (jti, exp) = (issued.claims.jti.clone(), issued.claims.exp);
    // The new token goes into the session's list under the same limit as a refresh's; then the
    // session takes the new scope, unless it ended meanwhile (the token is revoked then).
    let recorded = web::block(move || {
        let t = now();
        let recorded = record_token(&store, &h, row.token_jtis, (&jti, exp), t, idle)?;
        if matches!(recorded, Recorded::Yes) {
            let n = store.execute(
                "UPDATE ehr_sessions SET scope = ?, amr = ?, last_active = ? WHERE handle_hash = ? AND last_active >= ?",
                vec![scope.into(), joined.into(), t.into(), h.into(), (t - idle).into()],
            )?;
            if n == 0 {
                crate::auth::tokens::revoke_in(&store, &jti, exp)?;
                return Ok(Recorded::Ended);
            }
        }
        Ok::<_, crate::store::StoreError>(recorded)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    match recorded {
        Recorded::Yes => {}
        Recorded::Ended => return Err("your session has ended: sign in again".into()),
        Recorded::Crowded(wait) => return Err(crowded_words(wait)),
        Recorded::Busy => return Err("this session is busy: try again".into()),
    }
    Ok(json!({"access_token": issued.access_token, "expires_in": issued.expires_in, "amr": amr}))
}

/// Ends a session: the row goes, and every Courier token it was given is revoked at once.
/// Ends one session; false when it could not be ended now (the database failing): the caller
/// must not say it has.
/// `Some(n)`: ended, `n` = 1 if this call ended it, 0 if it had ended already (the sweep, another
/// request: that one audited it).
async fn end(state: &web::Data<AppState>, handle_hash: &str) -> Option<usize> {
    let st = state.clone();
    let h = handle_hash.to_string();
    match web::block(move || end_where(&st.store, "handle_hash = ?", vec![h.into()])).await {
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not end a session");
            None
        }
        Err(_) => None,
    }
}

/// Ends every session matching `condition` (logout, idle, a removed EHR): their Courier tokens are
/// revoked, then the rows deleted. The one way a session ends. First each row is marked idle since
/// ever (`last_active` 0), so no refresh after that adds a token to it (a refresh appends only to
/// a session still active, and revokes its token otherwise); then a row is deleted only as it was
/// read, so a token a refresh appended before the mark is read and revoked too (a review: the
/// token of a refresh racing a sign-out stayed valid for its five minutes; a probe: refreshes in a
/// loop could outrun the re-reads).
pub fn end_where(
    store: &crate::store::Store,
    condition: &str,
    binds: Vec<crate::store::db::Bind>,
) -> Result<usize, crate::store::StoreError> {
    store.execute(
        &format!("UPDATE ehr_sessions SET last_active = 0 WHERE {condition}"),
        binds.clone(),
    )?;
    let rows: Vec<JtiRow> = store.query(
        &format!("SELECT handle_hash, token_jtis FROM ehr_sessions WHERE {condition}"),
        binds,
    )?;
    let mut ended = 0;
    for mut row in rows {
        for _ in 0..5 {
            for pair in row.token_jtis.split_whitespace() {
                if let Some((jti, exp)) = pair.split_once(':') {
                    crate::auth::tokens::revoke_in(
                        store,
                        jti,
                        exp.parse().unwrap_or(i64::MAX / 4),
                    )?;
                }
            }
            let n = store.execute(
                "DELETE FROM ehr_sessions WHERE handle_hash = ? AND token_jtis = ?",
                vec![
                    row.handle_hash.clone().into(),
                    row.token_jtis.clone().into(),
                ],
            )?;
            if n > 0 {
                ended += n;
                break;
            }
            // Changed meanwhile (a token appended), or gone: read it again.
            let again: Vec<JtiRow> = store.query(
                "SELECT handle_hash, token_jtis FROM ehr_sessions WHERE handle_hash = ?",
                vec![row.handle_hash.clone().into()],
            )?;
            match again.into_iter().next() {
                Some(r) => row = r,
                None => break,
            }
        }
    }
    Ok(ended)
}

/// `POST /smart/session/refresh` (form: `session=<handle>`): a fresh Courier token while the user
/// is active.
pub async fn refresh(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let Some(handle) = handle_of(&body) else {
        return ended("no session handle");
    };
    let row = match load(&state, &handle).await {
        Ok(Some(row)) => row,
        Ok(None) => return ended("no such session: sign in again from the EHR"),
        Err(()) => {
            return unavailable(
                json!({"error": "temporarily_unavailable", "error_description": "Courier could not read the session; try again shortly"}),
            )
        }
    };
    let t = now();
    let idle = state.settings.idle_timeout_secs;
    // A refresh the app asks for without the person having done anything since the last one (its
    // socket's token ran out, a background call met 401) renews the token but is not activity: the
    // session still ends at the idle limit (a probe: an open tab kept an idle session alive for
    // good by refreshing at each socket expiry), and its token lives no longer than that.
    let background = form_urlencoded::parse(&body).any(|(k, v)| k == "background" && v == "1");
    if t - row.last_active > idle {
        match end(&state, &row.handle_hash).await {
            None => return not_ended(),
            // Ended by the sweep meanwhile, which audited it.
            Some(0) => {}
            Some(_) => {
                audit_logout(
                    &state,
                    &req,
                    &row.fhir_user,
                    "automatic log-off after inactivity",
                )
                .await
            }
        }
        return ended("signed out after a period of inactivity");
    }
    if let Some(wait) = crowded(&row.token_jtis, t) {
        // Refused before the EHR is asked; not activity. The app keeps its current token.
        return slow_down(wait);
    }
    // Keep the EHR session alive with the user's.
    let mut ehr_tokens: Option<Value> = None;
    if row.ehr_expires_at - t < REFRESH_MARGIN_SECS {
        match refresh_at_ehr(&state, &row).await {
            Ok((tokens, expires_in)) => ehr_tokens = Some(json!([tokens, expires_in])),
            Err((true, why)) => {
                tracing::warn!(ehr = %row.ehr, reason = %why, "the EHR refused to refresh a session");
                match end(&state, &row.handle_hash).await {
                    None => return not_ended(),
                    Some(0) => {}
                    Some(_) => {
                        audit_logout(&state, &req, &row.fhir_user, "the EHR ended the session")
                            .await
                    }
                }
                return ended("the EHR ended the session: sign in again");
            }
            Err((false, why)) => {
                // Unreachable or failing EHR: the session stays, and counts as active (the person
                // is; a review: a clinician pressing "Stay signed in" while the EHR was down was
                // signed out a minute later); the app may try again.
                tracing::warn!(ehr = %row.ehr, reason = %why, "could not refresh a session at the EHR");
                if !background {
                    let (store, h) = (state.store.clone(), row.handle_hash.clone());
                    let _ = web::block(move || touch(&store, &h, t, idle)).await;
                }
                return HttpResponse::ServiceUnavailable()
                    .insert_header((header::CACHE_CONTROL, "no-store"))
                    .insert_header((header::RETRY_AFTER, "10"))
                    .json(json!({"error": "temporarily_unavailable", "error_description": "the EHR cannot be reached; try again shortly"}));
            }
        }
    }
    let amr: Vec<String> = row.amr.split_whitespace().map(String::from).collect();
    let issued = state.tokens.issue_with_amr(
        &Grant {
            client_id: super::launch::WEB_APP_CLIENT.into(),
            scopes: scopes::parse_all(&row.scope).unwrap_or_default(),
            fhir_user: Some(row.fhir_user.clone()),
            patient: row.patient.clone(),
            encounter: row.encounter.clone(),
        },
        &amr,
        if background {
            // Until the idle limit, counted from the person's last activity.
            (row.last_active + idle - t)
                .min(crate::auth::tokens::session_lifetime(idle))
                .max(1)
        } else {
            crate::auth::tokens::session_lifetime(idle)
        },
    );
    let Ok(issued) = issued else {
        return HttpResponse::InternalServerError().finish();
    };
    let store = state.store.clone();
    let h = row.handle_hash.clone();
    let (store2, h2, jti, exp, read) = (
        store.clone(),
        h.clone(),
        issued.claims.jti.clone(),
        issued.claims.exp,
        row.token_jtis.clone(),
    );
    let recorded = web::block(move || record_token(&store2, &h2, read, (&jti, exp), t, idle)).await;
    match recorded {
        Ok(Ok(Recorded::Yes)) => {}
        Ok(Ok(Recorded::Ended)) => return ended("the session has ended: sign in again"),
        Ok(Ok(Recorded::Crowded(wait))) => return slow_down(wait),
        Ok(Ok(Recorded::Busy)) => return slow_down(1),
        _ => {
            return unavailable(
                json!({"error": "temporarily_unavailable", "error_description": "Courier could not record the new token; try again shortly"}),
            )
        }
    }
    let _ = web::block(move || {
        if let Some(v) = ehr_tokens {
            let (key_id, sealed) = store.keys.seal(v[0].to_string().as_bytes(), &aad(&h));
            store.execute(
                "UPDATE ehr_sessions SET key_id = ?, ehr_tokens = ?, ehr_expires_at = ? WHERE handle_hash = ? AND last_active >= ?",
                vec![key_id.into(), sealed.into(), (t + v[1].as_i64().unwrap_or(300)).into(), h.clone().into(), (t - idle).into()],
            )?;
        }
        // A background refresh leaves the last activity as it is (never moved back).
        if background {
            Ok(0)
        } else {
            touch(&store, &h, t, idle)
        }
    })
    .await;
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"access_token": issued.access_token, "token_type": "bearer", "expires_in": issued.expires_in}))
}

/// Refreshes the EHR's token with the session's refresh token (authenticated by private_key_jwt).
/// An error says whether the EHR refused (the session is over) or could not answer (try again).
async fn refresh_at_ehr(
    state: &web::Data<AppState>,
    row: &Row,
) -> Result<(Value, i64), (bool, String)> {
    refresh_inner(state, row).await.map_err(|e| match e {
        Refusal::Refused(m) => (true, m),
        Refusal::Unavailable(m) => (false, m),
    })
}

enum Refusal {
    Refused(String),
    Unavailable(String),
}

impl From<String> for Refusal {
    fn from(m: String) -> Self {
        Refusal::Unavailable(m)
    }
}

async fn refresh_inner(state: &web::Data<AppState>, row: &Row) -> Result<(Value, i64), Refusal> {
    // Tokens that cannot be read now never will be (a destroyed key, a damaged row): the session
    // ends, rather than answering "try again" for ever (a probe: each such 503 counted as activity,
    // so the session never idled out).
    let tokens: Value = serde_json::from_slice(
        &state
            .store
            .open_sealed(&row.key_id, &row.ehr_tokens, &aad(&row.handle_hash))
            .map_err(|e| {
                Refusal::Refused(format!("the session's EHR tokens cannot be read: {e}"))
            })?,
    )
    .map_err(|e| Refusal::Refused(format!("the session's EHR tokens cannot be read: {e}")))?;
    let refresh = tokens["refresh_token"]
        .as_str()
        .ok_or_else(|| Refusal::Refused("the EHR gave no refresh token".into()))?
        .to_string();
    let store = state.store.clone();
    let name = row.ehr.clone();
    let ehr: Ehr = web::block(move || registry::get(&store, &name))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .ok_or_else(|| Refusal::Refused("the EHR is no longer registered".into()))?;
    let endpoints = state.ehrs.discovery().endpoints(&ehr.iss).await?;
    let assertion = ehr
        .client_assertion(&state.store, &endpoints.token)
        .map_err(|e| e.to_string())?;
    let client = oauth2::basic::BasicClient::new(ClientId::new(ehr.client_id.clone()))
        .set_token_uri(TokenUrl::new(endpoints.token.clone()).map_err(|e| e.to_string())?)
        .set_auth_type(AuthType::RequestBody);
    let http = state.ehrs.discovery().http().clone();
    let send = move |r: oauth2::HttpRequest| {
        let http = http.clone();
        async move { super::backend::send(&http, r).await }
    };
    let res = client
        .exchange_refresh_token(&RefreshToken::new(refresh.clone()))
        .add_extra_param("client_assertion_type", JWT_BEARER)
        .add_extra_param("client_assertion", assertion)
        .request_async(&send)
        .await
        .map_err(|e| match e {
            // An OAuth error is the EHR's answer, not its absence: the session ends — except the
            // two that say "later" (RFC 6749 names them for the authorization endpoint; token
            // endpoints use them too).
            oauth2::RequestTokenError::ServerResponse(r) => match r.error() {
                oauth2::basic::BasicErrorResponseType::Extension(code)
                    if code == "temporarily_unavailable" || code == "server_error" =>
                {
                    Refusal::Unavailable(format!("the EHR answered {code}"))
                }
                other => Refusal::Refused(format!("refresh refused: {other}")),
            },
            other => Refusal::Unavailable(other.to_string()),
        })?;
    super::launch::bearer_only(res.token_type()).map_err(Refusal::Refused)?;
    let new_refresh = res
        .refresh_token()
        .map(|r| r.secret().clone())
        .unwrap_or(refresh);
    let expires_in = res.expires_in().map_or(300, |d| d.as_secs() as i64);
    Ok((
        json!({"access_token": res.access_token().secret(), "refresh_token": new_refresh}),
        expires_in,
    ))
}

/// `POST /smart/logout` (form: `session=<handle>`; with the bearer token, which is revoked too).
pub async fn logout(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let mut done = true;
    if let Some(token) = crate::auth::guard::bearer(&req).map(String::from) {
        let st = state.clone();
        let revoked = web::block(move || match st.tokens.verify(&token) {
            Ok(p) => st.tokens.revoke(&p).map_err(|e| e.to_string()),
            Err(_) => Ok(()),
        })
        .await;
        done &= matches!(revoked, Ok(Ok(())));
    }
    if let Some(handle) = handle_of(&body) {
        match load(&state, &handle).await {
            Ok(Some(row)) => match end(&state, &row.handle_hash).await {
                Some(0) => {}
                Some(_) => audit_logout(&state, &req, &row.fhir_user, "logout").await,
                None => done = false,
            },
            Ok(None) => {}
            Err(()) => done = false,
        }
    }
    if !done {
        // Not "signed out" when it is not so: the app keeps trying (it retries a 5xx).
        return unavailable(
            json!({"signed_out": false, "error": "temporarily_unavailable", "error_description": "the sign-out could not be completed; try again"}),
        );
    }
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({"signed_out": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's token list keeps what may still be presented (and so must be revoked when the
    /// session ends) and drops what has expired past the verifier's leeway.
    #[test]
    fn the_token_list_keeps_live_tokens_and_drops_long_expired_ones() {
        let t = 10_000;
        let list = format!(
            " old:{} edge:{} live:{} odd:x",
            t - EXPIRED_KEPT_SECS - 1,
            t - EXPIRED_KEPT_SECS,
            t + 300
        );
        // An entry whose expiry cannot be read is kept (revoked at the end, to be safe).
        assert_eq!(
            live_entries(&list, t),
            vec![
                format!("edge:{}", t - EXPIRED_KEPT_SECS),
                format!("live:{}", t + 300),
                "odd:x".to_string()
            ]
        );
        assert!(live_entries("", t).is_empty());
    }

    /// Full means 30 tokens still valid (expiry plus the verifier's 5 s); expired ones kept in
    /// the list for their margin do not count, and the wait is until the first valid one is not.
    #[test]
    fn a_session_is_full_at_thirty_valid_tokens() {
        let t = 10_000;
        let list = |valid: usize, expired: usize| {
            let mut s = String::new();
            for i in 0..valid {
                s.push_str(&format!(" v{i}:{}", t + 100 + i as i64));
            }
            for i in 0..expired {
                s.push_str(&format!(" e{i}:{}", t - 30));
            }
            s
        };
        assert_eq!(crowded(&list(29, 10), t), None);
        assert_eq!(crowded(&list(30, 0), t), Some(106));
        // One at the edge of its leeway still counts; one past it does not.
        let edge = format!("{} x:{}", list(29, 0), t - VERIFY_LEEWAY_SECS);
        assert_eq!(crowded(&edge, t), Some(1));
        let past = format!("{} x:{}", list(29, 0), t - VERIFY_LEEWAY_SECS - 1);
        assert_eq!(crowded(&past, t), None);
    }
}
