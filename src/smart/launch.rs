//! SMART App Launch with Courier as a confidential asymmetric client of the EHR.
//!
//! - `GET /launch?iss=…&launch=…`: the EHR launch. An `iss` that is not a registered EHR is refused
//!   with a page and never followed.
//! - `GET /smart/launch?ehr=NAME`: the standalone launch a patient portal links to (asks for
//!   `launch/patient`).
//! - `GET /smart/callback`: the EHR's redirect. The state (128 bits, single use, 10 minutes) is
//!   looked up, the code exchanged with its PKCE verifier and a `private_key_jwt` assertion, the
//!   `id_token` verified (signature by the EHR's JWKS, `iss`, `aud`, `exp`, `nonce`), the user
//!   (`fhirUser`) and the patient in context read from the EHR with the user's token and mapped to
//!   Courier identities, and a Courier user token — the same token type integrators get — handed to
//!   the web app in the body of a no-store page (into `sessionStorage`), never in a URL, so it
//!   reaches no log, no history and no Referer. Every outcome is audited.
//!
//! The session that follows (refresh while active, idle log-off, logout) is `session`'s.

use super::identity;
use super::registry::{self, Ehr};
use crate::api::audit_context;
use crate::api::AppState;
use crate::audit;
use crate::auth::scopes;
use crate::auth::tokens::Grant;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, CsrfToken, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The OAuth client Courier's own web app holds tokens as (registered at start-up, no keys: it
/// cannot use the token endpoint; its tokens come only from a launch).
pub const WEB_APP_CLIENT: &str = "courier-web-app";
const STATE_TTL_SECS: i64 = 600;
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/launch", web::get().to(ehr_launch))
        .route("/smart/launch", web::get().to(standalone_launch))
        .route("/smart/callback", web::get().to(callback));
}

/// The launch context fields of a SMART token response.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SmartFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<String>,
    /// A boolean in SMART; some EHRs send `"true"`/`"false"`, which is taken too (one mistyped
    /// hint must not fail the sign-in).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient_bool"
    )]
    pub need_patient_banner: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smart_style_url: Option<String>,
    #[serde(
        default,
        rename = "fhirContext",
        skip_serializing_if = "Option::is_none"
    )]
    pub fhir_context: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}
impl oauth2::ExtraTokenFields for SmartFields {}

/// A boolean, or what EHRs send for one: the strings "true"/"false", "yes"/"no", "1"/"0", or the
/// numbers 1/0; anything else is no value.
fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    let word = |s: &str| match s.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" => Some(true),
        "false" | "no" | "0" => Some(false),
        _ => None,
    };
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => Some(b),
        Value::String(s) => word(&s),
        Value::Number(n) if n.as_u64() == Some(1) => Some(true),
        Value::Number(n) if n.as_u64() == Some(0) => Some(false),
        _ => None,
    })
}

/// What a failed code exchange tells the person and the log: never the EHR's own
/// `error_description` (free text from another system, which may name a patient or its
/// internals), only its error code.
fn token_exchange_error<E: std::error::Error + 'static>(
    e: &oauth2::RequestTokenError<E, BasicErrorResponse>,
) -> String {
    use oauth2::RequestTokenError as R;
    match e {
        R::ServerResponse(r) => format!(
            "the EHR refused the sign-in code ({})",
            r.error().as_ref()
        ),
        R::Request(_) => "the EHR's token endpoint could not be reached".into(),
        R::Parse(_, _) => "the EHR's answer to the sign-in code could not be read (not a token response, or a field of it is not what SMART defines); the code may be used up".into(),
        R::Other(_) => "the EHR's token endpoint answered in a way Courier does not understand".into(),
    }
}

type SmartClient = oauth2::Client<
    BasicErrorResponse,
    StandardTokenResponse<SmartFields, BasicTokenType>,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
>;

fn redirect_uri(state: &AppState) -> String {
    format!("{}/smart/callback", state.settings.base_url)
}

/// A page for people (errors end here), escaped, never cached, never leaking a Referer.
pub(crate) fn page(status: actix_web::http::StatusCode, title: &str, text: &str) -> HttpResponse {
    page_with(status, title, text, None, None)
}

/// [`page`] with a link onward (a path on Courier) and the request's reference.
pub(crate) fn page_with(
    status: actix_web::http::StatusCode,
    title: &str,
    text: &str,
    link: Option<(&str, &str)>,
    reference: Option<&str>,
) -> HttpResponse {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CONTENT_SECURITY_POLICY, "default-src 'none'; base-uri 'none'; style-src 'unsafe-inline'"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .content_type("text/html; charset=utf-8")
        .body(format!(
            "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{t} — Courier</title>\
             <main style=\"font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em\"><h1>{t}</h1><p>{x}</p>{l}{r}</main></html>",
            t = esc(title),
            x = esc(text),
            l = link
                .filter(|(href, _)| {
                    href.starts_with('/') && !href.starts_with("//") && !href.contains('\\')
                })
                .map(|(href, label)| format!("<p><a href=\"{}\">{}</a></p>", esc(href), esc(label)))
                .unwrap_or_default(),
            r = reference
                .filter(|r| !r.is_empty())
                .map(|r| format!("<p style=\"color:#555\">Reference: {}</p>", esc(r)))
                .unwrap_or_default(),
        ))
}

pub(crate) async fn audit_login(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    user: Option<String>,
    failure: Option<&str>,
) {
    let mut ctx = audit_context(req, state);
    ctx.client_id = Some(WEB_APP_CLIENT.into());
    ctx.user = user;
    match failure {
        Some(why) => crate::auth::abuse::record_failure(state, req, &ctx, why).await,
        None => crate::api::record_event(state, audit::authentication(&ctx, None)).await,
    }
}

async fn refuse(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    status: u16,
    title: &str,
    text: &str,
) -> HttpResponse {
    audit_login(state, req, None, Some(&format!("{title}: {text}"))).await;
    page_with(
        actix_web::http::StatusCode::from_u16(status).unwrap_or_default(),
        title,
        text,
        None,
        Some(&reference(req)),
    )
}

/// The request's id, which the server log carries on every line of it: what a person can give
/// their administrator.
fn reference(req: &HttpRequest) -> String {
    actix_web::HttpMessage::extensions(req)
        .get::<crate::api::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

/// The page when Courier's own database cannot be reached mid-launch.
async fn unavailable(state: &web::Data<AppState>, req: &HttpRequest) -> HttpResponse {
    refuse(
        state,
        req,
        503,
        "Courier is unavailable",
        "Try again in a moment.",
    )
    .await
}

/// The longest `launch`, `iss`, `state`, `code` (any parameter) these endpoints take, and the
/// longest query string: what is stored per launch stays small (a flood cannot fill the disk).
pub const MAX_PARAM_BYTES: usize = 4096;
const MAX_QUERY_BYTES: usize = 16 * 1024;

/// Is any parameter (or the query string) longer than the endpoints take?
fn oversized(req: &HttpRequest, q: &[(String, String)]) -> bool {
    req.query_string().len() > MAX_QUERY_BYTES
        || q.iter()
            .any(|(k, v)| k.len() > MAX_PARAM_BYTES || v.len() > MAX_PARAM_BYTES)
}

async fn refuse_oversized(state: &web::Data<AppState>, req: &HttpRequest) -> HttpResponse {
    refuse(
        state,
        req,
        400,
        "Cannot start Courier",
        &format!("A parameter of the request is longer than {MAX_PARAM_BYTES} bytes."),
    )
    .await
}

fn query(req: &HttpRequest) -> Vec<(String, String)> {
    crate::api::query_pairs(req.query_string())
}

fn param<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

/// `GET /launch?iss=…&launch=…` (EHR launch).
pub async fn ehr_launch(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let q = query(&req);
    if oversized(&req, &q) {
        return refuse_oversized(&state, &req).await;
    }
    let (Some(iss), Some(launch)) = (param(&q, "iss"), param(&q, "launch")) else {
        return refuse(
            &state,
            &req,
            400,
            "Cannot start Courier",
            "The EHR's launch request must carry iss and launch.",
        )
        .await;
    };
    let store = state.store.clone();
    let iss2 = iss.to_string();
    let ehr =
        match web::block(move || registry::by_iss(&store, &iss2)).await {
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => return refuse(
                &state,
                &req,
                400,
                "Unknown EHR",
                "This EHR is not registered with Courier. Ask your administrator to register it.",
            )
            .await,
            _ => return unavailable(&state, &req).await,
        };
    authorize(&state, &req, ehr, Some(launch.to_string())).await
}

/// `GET /smart/launch?ehr=NAME` (standalone launch from a patient portal).
pub async fn standalone_launch(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let q = query(&req);
    if oversized(&req, &q) {
        return refuse_oversized(&state, &req).await;
    }
    let Some(name) = param(&q, "ehr").map(String::from) else {
        return refuse(
            &state,
            &req,
            400,
            "Cannot start Courier",
            "The link must name the EHR (?ehr=…).",
        )
        .await;
    };
    let store = state.store.clone();
    match web::block(move || registry::get(&store, &name)).await {
        Ok(Ok(Some(e))) => authorize(&state, &req, e, None).await,
        Ok(Ok(None)) => {
            refuse(
                &state,
                &req,
                400,
                "Unknown EHR",
                "This EHR is not registered with Courier.",
            )
            .await
        }
        _ => unavailable(&state, &req).await,
    }
}

/// Sends the browser to the EHR's authorization endpoint.
async fn authorize(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    ehr: Ehr,
    launch: Option<String>,
) -> HttpResponse {
    let endpoints = match state.ehrs.discovery().endpoints(&ehr.iss).await {
        Ok(e) => e,
        Err(e) => {
            // Why, for the administrator (an address the outbound rules refuse reads as
            // "unreachable" on the page; the walk-through's log said nothing).
            tracing::warn!(ehr = %ehr.name, error = %e, "cannot read the EHR's SMART configuration");
            return refuse(
                state,
                req,
                502,
                "The EHR cannot be reached",
                "Courier could not read the EHR's SMART configuration. Try again later.",
            )
            .await;
        }
    };
    let Some(auth_url) = endpoints.authorization.clone() else {
        return refuse(
            state,
            req,
            502,
            "The EHR does not support app launch",
            "Its SMART configuration names no authorization endpoint.",
        )
        .await;
    };
    let (Ok(auth), Ok(redirect)) = (
        AuthUrl::new(auth_url),
        RedirectUrl::new(redirect_uri(state)),
    ) else {
        return refuse(
            state,
            req,
            502,
            "The EHR's configuration is invalid",
            "Its authorization endpoint is not a URL.",
        )
        .await;
    };
    let client = SmartClient::new(ClientId::new(ehr.client_id.clone()))
        .set_auth_uri(auth)
        .set_redirect_uri(redirect);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let nonce = CsrfToken::new_random().secret().clone();
    // An EHR launch asks for `launch` (the EHR supplies the context); a standalone launch for
    // `launch/patient` (the user picks the patient) and must not ask for `launch`.
    let (ask, drop) = if launch.is_some() {
        ("launch", "launch/patient")
    } else {
        ("launch/patient", "launch")
    };
    let mut wanted: Vec<String> = ehr
        .launch_scopes
        .split_whitespace()
        .filter(|s| *s != drop && *s != ask)
        .map(String::from)
        .collect();
    wanted.push(ask.into());
    let wanted = in_the_ehrs_syntax(wanted, &endpoints.capabilities);
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(wanted.into_iter().map(Scope::new))
        .set_pkce_challenge(challenge)
        .add_extra_param("aud", ehr.iss.clone())
        .add_extra_param("nonce", nonce.clone());
    if let Some(l) = &launch {
        request = request.add_extra_param("launch", l.clone());
    }
    let (url, csrf) = request.url();
    // A standalone launch starts in the user's own browser window: bind its state to that browser
    // with a first-party cookie, so a callback link made by someone else (login CSRF) fails.
    let binding = launch
        .is_none()
        .then(|| CsrfToken::new_random().secret().clone());
    let binding_hash = binding.as_deref().map(binding_hash);
    let store = state.store.clone();
    let saved = web::block(move || {
        let now = crate::clock::now_micros() / 1_000_000;
        store.execute("DELETE FROM launch_states WHERE expires_at < ?", vec![now.into()])?;
        store.execute(
            "INSERT INTO launch_states (state, ehr, verifier, nonce, launch, expires_at, browser_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
            vec![
                csrf.secret().clone().into(),
                ehr.name.clone().into(),
                verifier.secret().clone().into(),
                nonce.into(),
                launch.into(),
                (now + STATE_TTL_SECS).into(),
                binding_hash.into(),
            ],
        )
    })
    .await;
    if !matches!(saved, Ok(Ok(_))) {
        return unavailable(state, req).await;
    }
    let mut res = HttpResponse::Found();
    res.insert_header((header::LOCATION, url.to_string()))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if let Some(b) = binding {
        let secure = if state.settings.base_url.starts_with("https://") {
            "; Secure"
        } else {
            ""
        };
        res.insert_header((
            header::SET_COOKIE,
            format!("{BINDING_COOKIE}={b}; Path={}; HttpOnly; SameSite=Lax; Max-Age={STATE_TTL_SECS}{secure}", callback_path(state)),
        ));
    }
    res.finish()
}

const BINDING_COOKIE: &str = "courier_launch";

/// The callback's path under the base URL (the binding cookie is sent there only).
fn callback_path(state: &AppState) -> String {
    reqwest::Url::parse(&redirect_uri(state))
        .map(|u| u.path().to_string())
        .unwrap_or_else(|_| "/smart/callback".into())
}

fn binding_hash(b: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(b.as_bytes()))
}

#[derive(diesel::QueryableByName)]
struct PendingRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    ehr: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    verifier: String,
    #[diesel(sql_type = diesel::sql_types::Text)]
    nonce: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    expires_at: i64,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    browser_hash: Option<String>,
}

/// `GET /smart/callback?code=…&state=…` (or `?error=…&state=…`).
pub async fn callback(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let q = query(&req);
    if oversized(&req, &q) {
        return refuse_oversized(&state, &req).await;
    }
    let Some(csrf) = param(&q, "state").map(String::from) else {
        return refuse(
            &state,
            &req,
            400,
            "Sign-in failed",
            "The EHR's answer carries no state.",
        )
        .await;
    };
    // Single use: the row is deleted as it is read.
    let store = state.store.clone();
    let pending = web::block(move || {
        store.query::<PendingRow>(
            "DELETE FROM launch_states WHERE state = ? RETURNING ehr, verifier, nonce, expires_at, browser_hash",
            vec![csrf.into()],
        )
    })
    .await;
    let pending = match pending {
        Ok(Ok(rows)) => rows.into_iter().next(),
        _ => return unavailable(&state, &req).await,
    };
    let Some(pending) = pending.filter(|p| p.expires_at >= crate::clock::now_micros() / 1_000_000)
    else {
        // Most often the Back button after signing in: the tab may still hold its session.
        audit_login(
            &state,
            &req,
            None,
            Some("Sign-in failed: expired or already used"),
        )
        .await;
        return page_with(
            actix_web::http::StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "This sign-in has expired or was already used. If you have just signed in, Courier may \
             already be open in this tab. Otherwise start again from your EHR or your patient portal.",
            Some(("/app/", "Go to Courier")),
            Some(&reference(&req)),
        );
    };
    if let Some(expected) = &pending.browser_hash {
        let cookie = req
            .headers()
            .get_all(header::COOKIE)
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|c| c.trim().strip_prefix(BINDING_COOKIE)?.strip_prefix('='))
            .map(binding_hash);
        if cookie.as_ref() != Some(expected) {
            return refuse(
                &state,
                &req,
                400,
                "Sign-in failed",
                "This sign-in was started in another browser. Start again from your portal.",
            )
            .await;
        }
    }
    if let Some(error) = param(&q, "error") {
        // The EHR's code (RFC 6749 §4.1.2.1), named and said in plain words: a fault in the set-up
        // is for an administrator, a passing one is worth another try (an outside probe found
        // every code shown as "refused", and none in the page, the log or the audit trail).
        let code: String = error
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(64)
            .collect();
        let (status, title, why) = match code.as_str() {
            "access_denied" => (
                403,
                "Sign-in cancelled",
                "Sign-in was declined at your health record system (your patient portal or your EHR). To use Courier, start again there and allow access.".to_string(),
            ),
            "temporarily_unavailable" | "server_error" => (
                503,
                "Sign-in failed",
                format!("The EHR could not sign you in just now ({code}). Try again in a moment."),
            ),
            "invalid_scope" | "invalid_request" | "unauthorized_client" | "unsupported_response_type" => (
                502,
                "Sign-in failed",
                format!("The EHR refused Courier's request ({code}): Courier's registration at the EHR needs attention. Tell your administrator; trying again will not help."),
            ),
            _ => (403, "Sign-in failed", format!("The EHR refused the sign-in ({code}).")),
        };
        tracing::warn!(error = %code, "the EHR answered the authorization request with an error");
        return refuse(&state, &req, status, title, &why).await;
    }
    let Some(code) = param(&q, "code").map(String::from) else {
        return refuse(
            &state,
            &req,
            400,
            "Sign-in failed",
            "The EHR's answer carries no code.",
        )
        .await;
    };
    let store = state.store.clone();
    let name = pending.ehr.clone();
    let Ok(Ok(Some(ehr))) = web::block(move || registry::get(&store, &name)).await else {
        return refuse(
            &state,
            &req,
            400,
            "Unknown EHR",
            "This EHR is no longer registered with Courier.",
        )
        .await;
    };
    match complete(&state, &ehr, &code, &pending).await {
        Ok(signin) => {
            // The Login is recorded there, once the policy's second factor (if any) has passed.
            match crate::mfa::step_up(&state, &req, &ehr, signin).await {
                Ok(page) => page,
                Err(why) => {
                    tracing::warn!(ehr = %ehr.name, reason = %why, "launch failed");
                    page_with(
                        actix_web::http::StatusCode::BAD_GATEWAY,
                        "Sign-in failed",
                        &why,
                        None,
                        Some(&reference(&req)),
                    )
                }
            }
        }
        Err(why) => {
            tracing::warn!(ehr = %ehr.name, reason = %why, "launch failed");
            let text = format!(
                "Courier could not complete the sign-in with your EHR: {why}. Try again from your \
                 EHR; if it keeps failing, give your administrator the reference below."
            );
            refuse(&state, &req, 502, "Sign-in failed", &text).await
        }
    }
}

/// The code exchange, the id_token check, identity mapping and the Courier token.
async fn complete(
    state: &web::Data<AppState>,
    ehr: &Ehr,
    code: &str,
    pending: &PendingRow,
) -> Result<SignIn, String> {
    let endpoints = state.ehrs.discovery().endpoints(&ehr.iss).await?;
    let assertion = ehr
        .client_assertion(&state.store, &endpoints.token)
        .map_err(|e| format!("cannot sign the client assertion: {e}"))?;
    let client = SmartClient::new(ClientId::new(ehr.client_id.clone()))
        .set_token_uri(TokenUrl::new(endpoints.token.clone()).map_err(|e| e.to_string())?)
        .set_redirect_uri(RedirectUrl::new(redirect_uri(state)).map_err(|e| e.to_string())?)
        .set_auth_type(AuthType::RequestBody);
    let http = state.ehrs.discovery().http().clone();
    let send = move |r: oauth2::HttpRequest| {
        let http = http.clone();
        async move { super::backend::send(&http, r).await }
    };
    let res = client
        .exchange_code(AuthorizationCode::new(code.to_string()))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
        .add_extra_param("client_assertion_type", JWT_BEARER)
        .add_extra_param("client_assertion", assertion)
        .request_async(&send)
        .await
        .map_err(|e| token_exchange_error(&e))?;
    bearer_only(res.token_type())?;
    let extra = res.extra_fields().clone();
    let id_token = extra
        .id_token
        .clone()
        .ok_or("the EHR sent no id_token (Courier asks for openid fhirUser)")?;
    let jwks_uri = endpoints
        .jwks_uri
        .as_deref()
        .ok_or("the EHR publishes no jwks_uri to check its id_token")?;
    let issuer = endpoints.issuer.as_deref().unwrap_or(&ehr.iss);
    let claims = verify_id_token(
        &state.jwks,
        jwks_uri,
        issuer,
        &ehr.client_id,
        &id_token,
        &pending.nonce,
    )
    .await?;
    let fhir_user = claims["fhirUser"]
        .as_str()
        .or_else(|| claims["profile"].as_str())
        .ok_or("the id_token names no fhirUser")?
        .to_string();
    let ehr_token = res.access_token().secret().clone();
    // Who the user and the patient in context are, in Courier's terms.
    let user_ref = relative(&fhir_user, &ehr.iss)
        .ok_or("the fhirUser is not a Patient, Practitioner or RelatedPerson of this EHR")?;
    let (user, user_shown) = map_identity(
        state,
        ehr,
        &ehr_token,
        &user_ref,
        Some(as_the_id_token_says(&user_ref, &claims)),
    )
    .await?;
    let (patient, patient_shown) = match &extra.patient {
        Some(id) if !fhir_codec::is_valid_id(id) => {
            return Err("the EHR's patient context is not a valid id".into())
        }
        Some(id) => {
            let reference = format!("Patient/{id}");
            let minimal = json!({"resourceType": "Patient", "id": id});
            let (r, shown) =
                map_identity(state, ehr, &ehr_token, &reference, Some(minimal)).await?;
            (Some(r), shown)
        }
        None if user.starts_with("Patient/") => (Some(user.clone()), user_shown.clone()),
        None => (None, Value::Null),
    };
    // Whom the patient may pick to write to: their care team as the EHR lists it (best effort,
    // bounded: a launch never waits on it for more than 5 s, and a refusal changes nothing).
    if let Some(courier_patient) = &patient {
        let ehr_patient = match &extra.patient {
            Some(id) => Some(id.clone()),
            None => user_ref.strip_prefix("Patient/").map(String::from),
        };
        if let Some(ehr_patient) = ehr_patient {
            let refresh = refresh_care_team(state, ehr, &ehr_token, &ehr_patient, courier_patient);
            if tokio::time::timeout(std::time::Duration::from_secs(5), refresh)
                .await
                .is_err()
            {
                tracing::info!(ehr = %ehr.name, "the EHR's care team was not read within 5 s");
            }
        }
    }
    let scope = web_app_scope(&user);
    // The EHR's FHIR origin, and the EHR screens the operator names (COURIER_FRAME_ANCESTORS:
    // an EHR's UI often lives on another origin than its FHIR base).
    let frame_origin = reqwest::Url::parse(&ehr.iss)
        .ok()
        .map(|u| u.origin().ascii_serialization())
        .map(|o| match state.settings.frame_ancestors.trim() {
            "" | "'none'" | "'self'" => o,
            more => format!("{o} {more}"),
        });
    let session = json!({
        "fhirUser": user,
        "patient": patient,
        "ehr": ehr.name,
        // Signed in through the EHR's portal (a standalone launch): the app's signed-out screen
        // links back to `/smart/launch?ehr=…`; an EHR launch can only be started again from it.
        "portal": pending.browser_hash.is_some(),
        // Without the hint (or with one that cannot be read) the app shows whose record this
        // is to anyone but the patient themselves: a clinician (or a relative) must see which
        // patient they write about; only the EHR's "no" hides it. A patient in their own portal
        // is named in the header already, and on a phone the banner would take the room of
        // their messages.
        "need_patient_banner": extra
            .need_patient_banner
            .unwrap_or(patient.as_deref() != Some(user.as_str())),
        // For the app's header and patient banner only (they are the EHR's own data).
        "user_display": user_shown,
        "patient_display": patient_shown,
        "smart_style_url": extra.smart_style_url,
        // Fetched here, so the app itself never connects anywhere but Courier.
        "smart_style": match &extra.smart_style_url {
            Some(url) => fetch_style(state, url).await,
            None => Value::Null,
        },
        "intent": extra.intent,
        "tenant": extra.tenant,
        "fhirContext": extra.fhir_context,
        "encounter": extra.encounter,
    });
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .take(16)
                    .map(|x| x.chars().take(32).collect())
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(SignIn {
        ehr: ehr.name.clone(),
        portal: pending.browser_hash.is_some(),
        frame_origin,
        user,
        patient: patient
            .as_ref()
            .and_then(|p| p.strip_prefix("Patient/"))
            .map(String::from),
        scope: scope.to_string(),
        ehr_access_token: ehr_token,
        ehr_refresh_token: res.refresh_token().map(|r| r.secret().clone()),
        ehr_expires_at: crate::clock::now_micros() / 1_000_000
            + res.expires_in().map_or(300, |d| d.as_secs() as i64),
        ehr_amr: strings(&claims["amr"]),
        ehr_acr: claims["acr"]
            .as_str()
            .map(|a| a.chars().take(256).collect()),
        session,
    })
}

/// What the web app's tokens may do: a practitioner reads and writes the messages they take part
/// in, and their own PractitionerRole (their out-of-office: the policy confines it to
/// `practitioner` = them); a patient or their representative, the patient's compartment.
pub fn web_app_scope(user: &str) -> &'static str {
    if user.starts_with("Practitioner/") {
        "user/Communication.cruds user/CommunicationRequest.cruds user/Binary.cr user/PractitionerRole.crus"
    } else {
        "patient/Communication.cruds patient/CommunicationRequest.crs patient/Binary.cr"
    }
}

/// A sign-in the EHR has vouched for: everything Courier needs to start the session, kept (sealed)
/// while the person shows a second factor when the policy asks for one.
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct SignIn {
    pub ehr: String,
    /// A standalone (portal) launch rather than an EHR launch.
    pub portal: bool,
    /// The EHR's origin: the only other page that may frame Courier's pages for this sign-in.
    pub frame_origin: Option<String>,
    /// The Courier identity signing in.
    pub user: String,
    /// The Courier patient id in context.
    pub patient: Option<String>,
    pub scope: String,
    pub ehr_access_token: String,
    pub ehr_refresh_token: Option<String>,
    /// When the EHR's access token expires (Unix seconds): a second factor may take minutes.
    pub ehr_expires_at: i64,
    /// The id_token's `amr` (RFC 8176) and `acr`, as the EHR asserted them.
    pub ehr_amr: Vec<String>,
    pub ehr_acr: Option<String>,
    /// What the web app is told besides its token (names, context, style).
    pub session: Value,
}

/// Starts the session of a sign-in and hands the web app its first Courier token; `amr` is how the
/// person authenticated (the EHR's methods, and Courier's own second factor when one was used).
pub async fn finish(
    state: &web::Data<AppState>,
    s: SignIn,
    amr: Vec<String>,
) -> Result<HttpResponse, String> {
    let issued = state
        .tokens
        .issue_with_amr(
            &Grant {
                client_id: WEB_APP_CLIENT.into(),
                scopes: scopes::parse_all(&s.scope).map_err(|e| e.to_string())?,
                fhir_user: Some(s.user.clone()),
                patient: s.patient.clone(),
                // The EHR's encounter id is not a Courier id: it goes to the app, not into the token.
                encounter: None,
            },
            &amr,
            crate::auth::tokens::session_lifetime(state.settings.idle_timeout_secs),
        )
        .map_err(|e| format!("cannot issue a Courier token: {e}"))?;
    let signed = super::session::Signed {
        ehr: s.ehr.clone(),
        fhir_user: s.user.clone(),
        patient: s.patient.clone(),
        encounter: None,
        scope: s.scope.clone(),
        ehr_access_token: s.ehr_access_token.clone(),
        ehr_refresh_token: s.ehr_refresh_token.clone(),
        ehr_expires_in: s.ehr_expires_at - crate::clock::now_micros() / 1_000_000,
        first_token: (issued.claims.jti.clone(), issued.claims.exp),
        amr: amr.clone(),
    };
    let st = state.clone();
    let handle = web::block(move || super::session::start(&st, &signed))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start the session: {e}"))?;
    let mut session = s.session;
    session["access_token"] = json!(issued.access_token);
    session["expires_in"] = json!(issued.expires_in);
    session["session"] = json!(handle);
    session["amr"] = json!(amr);
    Ok(framed_by(handoff(&session), s.frame_origin.as_deref()))
}

/// Lets the EHR that launched Courier (and no one else) frame a page of the sign-in; with no EHR
/// origin, only Courier's own pages may.
pub fn framed_by(mut page: HttpResponse, origin: Option<&str>) -> HttpResponse {
    let csp = page
        .headers()
        .get(header::CONTENT_SECURITY_POLICY)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    if let Some(csp) = csp {
        let ancestors = match origin {
            Some(o) => format!("'self' {o}"),
            None => "'self'".to_string(),
        };
        if let Ok(v) = header::HeaderValue::from_str(&format!("{csp}; frame-ancestors {ancestors}"))
        {
            page.headers_mut()
                .insert(header::CONTENT_SECURITY_POLICY, v);
        }
    }
    page
}

/// The launch scopes in the syntax the EHR speaks. Courier's are SMART v2 (`user/Patient.rs`);
/// an EHR whose discovery does not advertise `permission-v2` gets them as SMART v1
/// (`user/Patient.read`): one that lists only `permission-v1`, and one that lists neither — an
/// EHR built before SMART 2, or found through its CapabilityStatement alone (an outside probe's
/// v1 EHR of that kind ignored the v2 scopes, answered every read 403, and the clinician was
/// signed in with an unnamed patient). A v2 scope with a query has no v1 form and is sent
/// unchanged.
pub fn in_the_ehrs_syntax(scopes: Vec<String>, capabilities: &[String]) -> Vec<String> {
    if capabilities.iter().any(|x| x == "permission-v2") {
        return scopes;
    }
    scopes
        .into_iter()
        .map(|s| {
            let Some((head, perms)) = s.rsplit_once('.') else {
                return s;
            };
            let clinical = ["patient/", "user/", "system/"]
                .iter()
                .any(|c| head.starts_with(c));
            if !clinical || perms.is_empty() || !perms.chars().all(|c| "cruds".contains(c)) {
                return s;
            }
            let reads = perms.contains('r') || perms.contains('s');
            let writes = perms.contains('c') || perms.contains('u') || perms.contains('d');
            let v1 = match (reads, writes) {
                (true, true) => "*",
                (true, false) => "read",
                _ => "write",
            };
            format!("{head}.{v1}")
        })
        .collect()
}

/// `Type/id` of a reference to this EHR (relative, or absolute under its base).
fn relative(reference: &str, iss: &str) -> Option<String> {
    let r = reference
        .strip_prefix(iss)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(reference);
    let (t, id) = r.split_once('/')?;
    (identity::KINDS.contains(&t) && fhir_codec::is_valid_id(id)).then(|| format!("{t}/{id}"))
}

/// Reads `reference` from the EHR with the user's token and links it to a Courier identity.
///
/// An EHR that granted less than Courier asked for (no read of this kind of record) answers 401 or
/// 403: with a `fallback` (the record as the id_token describes it), the person is linked by their
/// EHR reference alone and named as the id_token names them — a summary from an earlier, fuller
/// launch is kept — instead of failing the sign-in.
async fn map_identity(
    state: &web::Data<AppState>,
    ehr: &Ehr,
    token: &str,
    reference: &str,
    fallback: Option<Value>,
) -> Result<(String, Value), String> {
    let res = state
        .ehrs
        .discovery()
        .http()
        .get(&format!("{}/{reference}", ehr.iss))
        .map_err(|e| format!("cannot read {reference} from the EHR: {e}"))?
        .bearer_auth(token)
        .header("accept", "application/fhir+json")
        .send()
        .await
        .map_err(|e| format!("cannot read {reference} from the EHR: {}", e.without_url()))?;
    let refused = matches!(res.status().as_u16(), 401 | 403);
    if refused && fallback.is_some() {
        tracing::info!(ehr = %ehr.name, status = res.status().as_u16(),
            "the EHR's grant does not read this record: linked by reference");
        return link_as_granted(state, ehr, fallback.unwrap_or_default()).await;
    }
    if !res.status().is_success() {
        return Err(format!(
            "the EHR answered {} to {reference}",
            res.status().as_u16()
        ));
    }
    let resource: Value = res
        .json()
        .await
        .map_err(|_| format!("the EHR's {reference} is not JSON"))?;
    let answered = format!(
        "{}/{}",
        resource["resourceType"].as_str().unwrap_or_default(),
        resource["id"].as_str().unwrap_or_default()
    );
    if answered != reference {
        return Err(format!(
            "the EHR answered {reference} with another resource"
        ));
    }
    let store = state.store.clone();
    let iss = ehr.iss.clone();
    let ehr2 = ehr.clone();
    let shown = identity::summary_of(&resource);
    let kept = shown.clone();
    web::block(move || {
        let (r, how) = identity::link(&store, &iss, &|s| ehr2.trusts(s), &resource)?;
        // Refreshed at every launch: the app names people as their EHR does today.
        identity::remember(&store, &r, &kept)?;
        // …and notices reach the email address their record gives today.
        crate::notify::remember_contacts(&store, &r, &resource)?;
        Ok::<_, identity::LinkError>((r, how))
    })
    .await
    .map_err(|_| "internal error".to_string())?
    .map(|(r, _)| (r, shown))
    .map_err(link_failure)
}

/// Links a person the EHR's grant does not let Courier read, by their EHR reference alone (no
/// identifiers: never joined to another EHR's record by guess), keeping any summary Courier has.
async fn link_as_granted(
    state: &web::Data<AppState>,
    ehr: &Ehr,
    minimal: Value,
) -> Result<(String, Value), String> {
    let store = state.store.clone();
    let iss = ehr.iss.clone();
    let shown = identity::summary_of(&minimal);
    web::block(move || {
        let (r, _) = identity::link(&store, &iss, &|_| false, &minimal)?;
        let known = identity::summaries(&store, std::slice::from_ref(&r))?;
        let shown = match known.get(&r) {
            Some(k) => k.clone(),
            None => {
                identity::remember(&store, &r, &shown)?;
                shown
            }
        };
        Ok::<_, identity::LinkError>((r, shown))
    })
    .await
    .map_err(|_| "internal error".to_string())?
    .map_err(link_failure)
}

/// What the sign-in page says when a person cannot be linked. The details of a conflict are for
/// the administrator (`courier identity conflicts`), not this page.
fn link_failure(e: identity::LinkError) -> String {
    match e {
        identity::LinkError::Conflict(_) => "Courier could not match this person to its records safely; an administrator has been notified".to_string(),
        other => other.to_string(),
    }
}

/// The record the id_token describes: its kind and id, and the name in its OpenID Connect
/// `name` (or `given_name` / `family_name`) claims, when the EHR sends them.
fn as_the_id_token_says(reference: &str, claims: &Value) -> Value {
    let (kind, id) = reference.split_once('/').unwrap_or_default();
    let mut v = json!({"resourceType": kind, "id": id});
    let name = claims["name"].as_str().map(String::from).or_else(|| {
        let parts: Vec<&str> = [
            claims["given_name"].as_str(),
            claims["family_name"].as_str(),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    });
    if let Some(n) = name {
        v["name"] = json!([{"text": n}]);
    }
    v
}

/// At most this many care-team members are read from the EHR at a launch.
const MAX_CARE_TEAM: usize = 12;

/// Reads the patient's active CareTeams from the EHR and keeps their practitioners (linked to
/// Courier identities, with their summaries) as the patient's care team. Nothing is changed when
/// the EHR refuses or answers something else (no scope for CareTeam, not supported).
async fn refresh_care_team(
    state: &web::Data<AppState>,
    ehr: &Ehr,
    token: &str,
    ehr_patient: &str,
    courier_patient: &str,
) {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("patient", ehr_patient)
        .append_pair("status", "active")
        .append_pair("_count", "20")
        .finish();
    let url = format!("{}/CareTeam?{query}", ehr.iss.trim_end_matches('/'));
    let Ok(req) = state.ehrs.discovery().http().get(&url) else {
        return;
    };
    let res = req
        .bearer_auth(token)
        .header("accept", "application/fhir+json")
        .send()
        .await;
    let Ok(res) = res else { return };
    if !res.status().is_success() {
        tracing::info!(ehr = %ehr.name, status = res.status().as_u16(), "the EHR did not give the patient's care team");
        return;
    }
    let Ok(bundle) = res.json::<Value>().await else {
        return;
    };
    let mut members: Vec<String> = vec![];
    for e in bundle["entry"].as_array().into_iter().flatten() {
        if e["resource"]["resourceType"] != "CareTeam" {
            continue;
        }
        for part in e["resource"]["participant"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(r) = part["member"]["reference"]
                .as_str()
                .and_then(|r| relative(r, &ehr.iss))
                .filter(|r| r.starts_with("Practitioner/"))
            {
                if !members.contains(&r) && members.len() < MAX_CARE_TEAM {
                    members.push(r);
                }
            }
        }
    }
    let mut mapped = vec![];
    for m in members {
        match map_identity(state, ehr, token, &m, None).await {
            Ok((r, _)) => mapped.push(r),
            Err(e) => {
                tracing::info!(ehr = %ehr.name, error = %e, "a care-team member was not mapped")
            }
        }
    }
    let store = state.store.clone();
    let patient = courier_patient.to_string();
    let kept = web::block(move || identity::set_care_team(&store, &patient, &mapped)).await;
    if !matches!(kept, Ok(Ok(()))) {
        tracing::warn!(ehr = %ehr.name, "the patient's care team could not be kept");
    }
}

/// The EHR's SMART style sheet (`smart_style_url`): https (http on loopback only), at most 16 KB,
/// only the known keys with plain values (a colour, a length, a font list). Anything else, or an
/// EHR that does not answer within 3 s, gives the app's default look.
async fn fetch_style(state: &web::Data<AppState>, url: &str) -> Value {
    const KEYS: &[&str] = &[
        "color_background",
        "color_error",
        "color_highlight",
        "color_modal_backdrop",
        "color_success",
        "color_text",
        "dim_border_radius",
        "dim_font_size",
        "dim_spacing_size",
        "font_family_body",
        "font_family_heading",
    ];
    if crate::auth::clients::check_jwks_url(url).is_err() {
        return Value::Null;
    }
    let got = state
        .ehrs
        .discovery()
        .http()
        .get(url)
        .map(|r| r.timeout(std::time::Duration::from_secs(3)).send());
    let Ok(got) = got else { return Value::Null };
    let got = got.await;
    let Ok(res) = got else { return Value::Null };
    if !res.status().is_success() || res.content_length().is_some_and(|n| n > 16 * 1024) {
        return Value::Null;
    }
    let Ok(bytes) = res.bytes().await else {
        return Value::Null;
    };
    if bytes.len() > 16 * 1024 {
        return Value::Null;
    }
    let Ok(Value::Object(all)) = serde_json::from_slice::<Value>(&bytes) else {
        return Value::Null;
    };
    let plain = |v: &str| {
        v.len() <= 100
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || " #,.%'\"-".contains(c))
    };
    Value::Object(
        all.into_iter()
            .filter(|(k, v)| KEYS.contains(&k.as_str()) && v.as_str().is_some_and(plain))
            .collect(),
    )
}

/// At most this many keys of a JWKS are tried for an id_token without `kid`.
const MAX_KEYS_TRIED: usize = 4;
/// How far ahead of Courier's clock an id_token's `iat` may be (clocks drift; more is a wrong clock).
const MAX_FUTURE_IAT_SECS: i64 = 300;

/// Can `key` verify a signature made with `alg`? (Its type and curve fit, it is not an
/// encryption key, and an `alg` it names is this one.)
fn key_fits(key: &jsonwebtoken::jwk::Jwk, alg: jsonwebtoken::Algorithm) -> bool {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, PublicKeyUse};
    use jsonwebtoken::Algorithm;
    if matches!(key.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return false;
    }
    if let Some(a) = key.common.key_algorithm {
        if format!("{a:?}") != format!("{alg:?}") {
            return false;
        }
    }
    match (&key.algorithm, alg) {
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384) => true,
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        _ => false,
    }
}

/// Checks an id_token: signature by a key in the EHR's JWKS (RS256/RS384/ES256/ES384), issuer,
/// audience (Courier's client id), expiry (60 s of clock skew allowed either way), and the nonce
/// of this sign-in.
///
/// The key: the one the id_token's `kid` names. Without a `kid` (OpenID Connect Core §10.1 asks
/// for one only when the JWKS holds several keys; the SMART App Launcher signs without one), each
/// key that fits the `alg` is tried, at most [`MAX_KEYS_TRIED`]; the JWKS is fetched again once
/// when none fits or verifies (the EHR may have rotated its keys).
pub async fn verify_id_token(
    jwks: &crate::auth::clients::JwksCache,
    jwks_uri: &str,
    issuer: &str,
    client_id: &str,
    id_token: &str,
    nonce: &str,
) -> Result<Value, String> {
    use jsonwebtoken::errors::ErrorKind;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let header = jsonwebtoken::decode_header(id_token).map_err(|_| "the id_token is not a JWT")?;
    if !matches!(
        header.alg,
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::ES256 | Algorithm::ES384
    ) {
        return Err(format!("the id_token is signed with {:?}", header.alg));
    }
    crate::auth::clients::check_jwks_url(jwks_uri).map_err(|e| e.to_string())?;
    let mut v = Validation::new(header.alg);
    v.set_issuer(&[issuer]);
    v.set_audience(&[client_id]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.leeway = 60;
    let mut why = String::new();
    for refresh in [false, true] {
        let set = jwks.set(jwks_uri, refresh).await.map_err(|e| e.0)?;
        let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
            Some(kid) => set
                .keys
                .iter()
                .filter(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
                .collect(),
            None => set
                .keys
                .iter()
                .filter(|k| key_fits(k, header.alg))
                .take(MAX_KEYS_TRIED)
                .collect(),
        };
        why = match (&header.kid, candidates.len()) {
            (Some(_), 0) => "the id_token's kid is not in the EHR's JWKS".into(),
            (None, 0) => format!(
                "the id_token names no kid and the EHR's JWKS has no {:?} key",
                header.alg
            ),
            _ => String::new(),
        };
        for key in candidates {
            if header.kid.is_some() && !key_fits(key, header.alg) {
                return Err("the id_token's alg does not match its key".into());
            }
            let Ok(decoding) = DecodingKey::from_jwk(key) else {
                why = "the EHR's key is unusable".into();
                continue;
            };
            match jsonwebtoken::decode::<Value>(id_token, &decoding, &v) {
                Ok(data) => {
                    if data.claims["nonce"].as_str() != Some(nonce) {
                        return Err("the id_token's nonce does not match this sign-in".into());
                    }
                    // The party it was issued to (OpenID Connect Core 1.0 §3.1.3.7 as of errata
                    // set 1, items 4–5): an id_token for several audiences must name this client
                    // as azp, and an azp present is checked whatever the audience. (Errata set 2
                    // drops item 4 and refuses any audience the client does not trust; Courier
                    // takes other audiences beside its own only with azp naming it, as EHRs that
                    // list every app of a project in aud send them.)
                    let audiences = data.claims["aud"].as_array().map_or(1, |a| a.len());
                    match data.claims["azp"].as_str() {
                        Some(azp) if azp != client_id => {
                            return Err("the id_token was issued to another app (its azp is not Courier's client id at the EHR)".into())
                        }
                        None if audiences > 1 => {
                            return Err("the id_token names several audiences but not which app it was issued to (azp)".into())
                        }
                        _ => {}
                    }
                    // Issued far "in the future" (OpenID Connect Core §3.1.3.7: iat may reject
                    // tokens issued too far from now): a clock is wrong.
                    let now = chrono::Utc::now().timestamp();
                    if data.claims["iat"]
                        .as_f64()
                        .is_some_and(|iat| iat > (now + MAX_FUTURE_IAT_SECS) as f64)
                    {
                        return Err(format!("the id_token was issued more than {} minutes ahead of Courier's clock: the EHR's clock or Courier's is wrong", MAX_FUTURE_IAT_SECS / 60));
                    }
                    return Ok(data.claims);
                }
                // Another key may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    why = if header.kid.is_some() {
                        "the id_token's signature does not verify with the key its kid names".into()
                    } else {
                        format!("the id_token names no kid and its signature verifies with none of the EHR's {:?} keys (at most {MAX_KEYS_TRIED} tried)", header.alg)
                    };
                }
                Err(e) => return Err(id_token_invalid(e.kind())),
            }
        }
    }
    Err(why)
}

/// SMART's token responses are `token_type: Bearer` (any case): Courier sends the EHR's token as
/// a bearer token (RFC 6750), so another type (`MAC`, a proof-of-possession scheme) would fail
/// at every use; refused at sign-in, named.
pub fn bearer_only(t: &oauth2::basic::BasicTokenType) -> Result<(), String> {
    match t {
        oauth2::basic::BasicTokenType::Bearer => Ok(()),
        other => Err(format!(
            "the EHR issued a token of type '{}': Courier uses bearer tokens only, as SMART requires",
            other.as_ref()
        )),
    }
}

/// Why a verified id_token is refused, in words an administrator can act on (the library's own
/// names, such as `InvalidAudience`, are not shown).
fn id_token_invalid(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => {
            "the id_token has expired (its exp is past, beyond a minute of clock difference)".into()
        }
        K::ImmatureSignature => {
            "the id_token is not valid yet (its nbf is ahead of Courier's clock)".into()
        }
        K::InvalidIssuer => {
            "the id_token was issued by another server than the EHR (its iss is not the EHR's)"
                .into()
        }
        K::InvalidAudience => {
            "the id_token is for another app (its aud is not Courier's client id at the EHR)".into()
        }
        K::InvalidSubject => "the id_token names no valid user (sub)".into(),
        K::MissingRequiredClaim(c) => format!("the id_token lacks the {c} claim"),
        K::InvalidAlgorithm | K::InvalidAlgorithmName => {
            "the id_token's alg does not match its key".into()
        }
        K::Json(_) | K::Utf8(_) | K::Base64(_) | K::InvalidToken => {
            "the id_token cannot be read (not a well-formed JWT)".into()
        }
        _ => "the id_token is not valid".into(),
    }
}

/// The page that hands the session to the web app: the token travels in this no-store body into
/// `sessionStorage`, then the app loads — no URL ever carries it.
fn handoff(session: &Value) -> HttpResponse {
    let data = script_json(session);
    script_page(&format!(
        "const n={data};\
         try{{const o=JSON.parse(sessionStorage.getItem(\"courier.session\")||\"null\");if(o&&o.session&&o.session!==n.session)navigator.sendBeacon(\"/smart/logout\",new URLSearchParams({{session:o.session}}));}}catch(e){{}}\
         sessionStorage.removeItem(\"courier.mfa\");sessionStorage.removeItem(\"courier.left\");sessionStorage.setItem(\"courier.session\", JSON.stringify(n));location.replace(\"/app/\");"
    ))
}

/// JSON to put inside a `<script>`: no `</` or line separator can end or break it.
pub(crate) fn script_json(v: &Value) -> String {
    v.to_string()
        .replace('<', "\\u003c")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// A page of the sign-in that only runs `script` (under its own nonce: nothing else runs) and
/// moves on: never cached, no Referer, beacons to Courier only.
pub(crate) fn script_page(script: &str) -> HttpResponse {
    let nonce = CsrfToken::new_random().secret().clone();
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CONTENT_SECURITY_POLICY, format!("default-src 'none'; base-uri 'none'; connect-src 'self'; script-src 'nonce-{nonce}'")))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .content_type("text/html; charset=utf-8")
        .body(format!(
            "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><title>Courier</title>\
             <script nonce=\"{nonce}\">{script}</script><noscript>Courier needs JavaScript.</noscript></html>"
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EHR's refusal is told by its error code only: its free-text description (which may
    /// name a patient or the EHR's internals) reaches neither the page nor the log.
    #[test]
    fn a_refused_code_exchange_shows_the_error_code_not_the_ehrs_description() {
        let refused: oauth2::RequestTokenError<std::io::Error, BasicErrorResponse> =
            oauth2::RequestTokenError::ServerResponse(BasicErrorResponse::new(
                oauth2::basic::BasicErrorResponseType::InvalidGrant,
                Some("Patient Alice Testpatient MRN1001 db=ORA-PRD-03".into()),
                None,
            ));
        let said = token_exchange_error(&refused);
        assert!(said.contains("invalid_grant"), "{said}");
        assert!(!said.contains("Alice") && !said.contains("ORA"), "{said}");
        let odd: oauth2::RequestTokenError<std::io::Error, BasicErrorResponse> =
            oauth2::RequestTokenError::Other("Patient Alice".into());
        assert!(!token_exchange_error(&odd).contains("Alice"));
    }

    #[test]
    fn a_banner_hint_sent_as_a_string_is_taken() {
        let f: SmartFields = serde_json::from_str(r#"{"need_patient_banner":"false"}"#).unwrap();
        assert_eq!(f.need_patient_banner, Some(false));
        let f: SmartFields = serde_json::from_str(r#"{"need_patient_banner":1}"#).unwrap();
        assert_eq!(f.need_patient_banner, Some(true));
        let f: SmartFields = serde_json::from_str(r#"{"need_patient_banner":"No"}"#).unwrap();
        assert_eq!(f.need_patient_banner, Some(false));
        let f: SmartFields = serde_json::from_str(r#"{"need_patient_banner":2}"#).unwrap();
        assert_eq!(f.need_patient_banner, None);
    }
}
