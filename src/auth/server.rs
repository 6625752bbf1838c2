//! The authorization server's endpoints: token (SMART Backend Services: `client_credentials` with a
//! `private_key_jwt` assertion), introspection (RFC 7662), revocation (RFC 7009), Courier's JWKS,
//! and discovery (`/.well-known/smart-configuration`).

use super::clients::{self, Refused};
use super::policy;
use super::scopes::{self, Context};
use super::tokens::Grant;
use super::Principal;
use crate::api::audit_context;
use crate::api::AppState;
use crate::audit;
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

pub const TOKEN_PATH: &str = "/auth/token";
pub const INTROSPECT_PATH: &str = "/auth/introspect";
pub const REVOKE_PATH: &str = "/auth/revoke";
pub const JWKS_PATH: &str = "/auth/jwks";
/// Courier's public client keys for the EHRs it connects to (each EHR registers this URL).
pub const EHR_JWKS_PATH: &str = "/smart/jwks";
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(TOKEN_PATH, web::post().to(token))
        .route(INTROSPECT_PATH, web::post().to(introspect))
        .route(REVOKE_PATH, web::post().to(revoke))
        .route(JWKS_PATH, web::get().to(jwks))
        .route(EHR_JWKS_PATH, web::get().to(ehr_jwks))
        .route(
            "/.well-known/smart-configuration",
            web::get().to(smart_configuration),
        );
}

/// The endpoint URLs, as published in discovery and the CapabilityStatement.
pub fn endpoint(state: &AppState, path: &str) -> String {
    format!("{}{path}", state.settings.base_url)
}

/// An RFC 6749 §5.2 error. `invalid_client` is 401, the others 400.
fn oauth_error(error: &str, description: &str) -> HttpResponse {
    let status = if error == "invalid_client" {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::BAD_REQUEST
    };
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::PRAGMA, "no-cache"))
        .json(json!({"error": error, "error_description": description}))
}

fn no_store_json(v: Value) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::PRAGMA, "no-cache"))
        .json(v)
}

/// Form parameters; a parameter given twice is an error (RFC 6749 §3.2).
#[allow(clippy::result_large_err)] // the error is the finished response, built once per refusal
fn form(req: &HttpRequest, body: &[u8]) -> Result<Vec<(String, String)>, HttpResponse> {
    if crate::api::media_type(req) != "application/x-www-form-urlencoded" {
        return Err(oauth_error(
            "invalid_request",
            "send the parameters as application/x-www-form-urlencoded",
        ));
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(body).into_owned().collect();
    let mut names = std::collections::HashSet::new();
    if let Some((k, _)) = pairs.iter().find(|(k, _)| !names.insert(k.as_str())) {
        return Err(oauth_error(
            "invalid_request",
            &format!(
                "the parameter '{}' is given more than once",
                truncate(k, 40)
            ),
        ));
    }
    Ok(pairs)
}

/// At most `n` characters of client-supplied text, for error messages and the audit trail.
pub fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `POST /auth/token`: SMART Backend Services.
pub async fn token(state: web::Data<AppState>, req: HttpRequest, body: web::Bytes) -> HttpResponse {
    let mut ctx = audit_context(&req, &state);
    let result = token_inner(&state, &req, &body, &mut ctx).await;
    let failure = result.as_ref().err().map(|(_, d)| truncate(d, 300));
    let audited = match failure.as_deref() {
        Some(why) => {
            crate::auth::abuse::record_failure(&state, &req, &ctx, why).await;
            Ok(())
        }
        None => crate::api::record_event_checked(&state, audit::authentication(&ctx, None)).await,
    };
    match (result, audited) {
        // No token is handed out whose issue is not in the audit trail.
        (Ok(_), Err(e)) => actix_web::ResponseError::error_response(&e),
        (Ok(r), Ok(())) => r,
        (Err((r, _)), _) => r,
    }
}

async fn token_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    body: &[u8],
    ctx: &mut audit::Context,
) -> Result<HttpResponse, (HttpResponse, String)> {
    let fail = |e: &str, d: &str| (oauth_error(e, d), format!("{e}: {d}"));
    if body.len() > 16 * 1024 {
        return Err(fail("invalid_request", "the request is too large"));
    }
    let pairs = form(req, body).map_err(|r| (r, "invalid_request".to_string()))?;
    match param(&pairs, "grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(fail(
                "unsupported_grant_type",
                &format!("grant_type '{other}' is not supported; use client_credentials"),
            ))
        }
        None => return Err(fail("invalid_request", "grant_type is required")),
    }
    match param(&pairs, "client_assertion_type") {
        Some(JWT_BEARER) => {}
        Some(_) => {
            return Err(fail(
                "invalid_client",
                &format!("client_assertion_type must be {JWT_BEARER}"),
            ))
        }
        None => return Err(fail(
            "invalid_client",
            "client authentication is required: send client_assertion_type and client_assertion",
        )),
    }
    let Some(assertion) = param(&pairs, "client_assertion") else {
        return Err(fail("invalid_client", "client_assertion is required"));
    };
    let token_url = endpoint(state, TOKEN_PATH);
    let client = clients::authenticate(&state.store, &state.jwks, &token_url, assertion)
        .await
        .map_err(|Refused(d)| fail("invalid_client", &d))?;
    ctx.client_id = Some(client.client_id.clone());
    let Some(requested) = param(&pairs, "scope") else {
        return Err(fail("invalid_scope", "scope is required"));
    };
    let requested = scopes::parse_all(requested).map_err(|e| fail("invalid_scope", &e))?;
    let registry = &state.store.registry;
    let base = &state.settings.base_url;
    // Backend services act for no user or patient: only system scopes can be granted.
    let granted: Vec<_> = scopes::grant(&requested, &clients::registered_scopes(&client))
        .into_iter()
        .filter(|s| s.context == Context::System)
        .filter(|s| policy::scope_query_supported(s, registry, base))
        .collect();
    if granted.is_empty() {
        return Err(fail(
            "invalid_scope",
            "none of the requested scopes is registered for this client (backend services get system/ scopes)",
        ));
    }
    let grant = Grant {
        client_id: client.client_id.clone(),
        scopes: granted,
        ..Default::default()
    };
    let issued = state.tokens.issue(&grant).map_err(|e| {
        tracing::error!(error = %e, "could not issue a token");
        (
            HttpResponse::InternalServerError().finish(),
            "server_error".to_string(),
        )
    })?;
    Ok(no_store_json(json!({
        "access_token": issued.access_token,
        "token_type": "bearer",
        "expires_in": issued.expires_in,
        "scope": issued.claims.scope,
    })))
}

/// The caller of introspection and revocation: a bearer token of this server.
async fn caller(state: &web::Data<AppState>, req: &HttpRequest) -> Result<Principal, HttpResponse> {
    let unauthorized = || {
        HttpResponse::Unauthorized()
            .insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"courier\""))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(json!({"error": "invalid_token", "error_description": "authenticate with a bearer access token of this server"}))
    };
    let token = super::guard::bearer(req)
        .ok_or_else(unauthorized)?
        .to_string();
    let st = state.clone();
    let checked = web::block(move || {
        let p = st.tokens.verify(&token).ok()?;
        st.tokens.still_valid(&p).ok()?.then_some(p)
    })
    .await;
    match checked {
        Ok(Some(p)) => Ok(p),
        _ => Err(unauthorized()),
    }
}

/// What introspection and revocation take: the authenticated caller, the form, and its `token`.
async fn token_operation(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    body: &[u8],
) -> Result<(Principal, Vec<(String, String)>, String), HttpResponse> {
    let who = caller(state, req).await?;
    let pairs = form(req, body)?;
    let token = param(&pairs, "token")
        .map(String::from)
        .ok_or_else(|| oauth_error("invalid_request", "token is required"))?;
    Ok((who, pairs, token))
}

/// `POST /auth/introspect` (RFC 7662). A client may introspect only its own tokens; any other
/// token is reported inactive.
pub async fn introspect(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    // RFC 7662 asks the caller to authenticate. One that sends no credentials at all learns
    // nothing: every token is inactive to it (as the SMART App Launch test kit expects).
    if req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .is_none()
    {
        return HttpResponse::Ok()
            .insert_header((actix_web::http::header::CACHE_CONTROL, "no-store"))
            .json(json!({"active": false}));
    }
    let (who, _, token) = match token_operation(&state, &req, &body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let st = state.clone();
    let answer = web::block(move || {
        let Ok(p) = st.tokens.verify(&token) else {
            return json!({"active": false});
        };
        if p.client_id != who.client_id || !st.tokens.still_valid(&p).unwrap_or(false) {
            return json!({"active": false});
        }
        let mut v = json!({
            "active": true,
            "scope": p.scope_text(),
            "client_id": p.client_id,
            "exp": p.exp,
            "token_type": "Bearer",
            "iss": st.tokens.issuer(),
            "aud": st.tokens.issuer(),
            "sub": p.fhir_user.clone().unwrap_or_else(|| p.client_id.clone()),
            "jti": p.jti,
        });
        if let Some(u) = &p.fhir_user {
            v["fhirUser"] = json!(u);
        }
        if let Some(pt) = &p.patient {
            v["patient"] = json!(pt);
        }
        if let Some(e) = &p.encounter {
            v["encounter"] = json!(e);
        }
        v
    })
    .await
    .unwrap_or_else(|_| json!({"active": false}));
    no_store_json(answer)
}

/// `POST /auth/revoke` (RFC 7009): a client revokes one of its own tokens; it stops working at
/// once. Unknown or foreign tokens are answered 200 all the same, as the RFC says.
pub async fn revoke(
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let (who, pairs, token) = match token_operation(&state, &req, &body).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    if matches!(param(&pairs, "token_type_hint"), Some(h) if h != "access_token" && h != "refresh_token")
    {
        return oauth_error("unsupported_token_type", "only access tokens exist here");
    }
    let st = state.clone();
    let done = web::block(move || match st.tokens.verify(&token) {
        Ok(p) if p.client_id == who.client_id => st.tokens.revoke(&p).map(|_| ()),
        _ => Ok(()),
    })
    .await;
    match done {
        Ok(Ok(())) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .finish(),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// `GET /auth/jwks`: Courier's public token-signing keys.
pub async fn jwks(state: web::Data<AppState>) -> HttpResponse {
    let st = state.clone();
    match web::block(move || st.tokens.jwks()).await {
        Ok(set) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
            .json(set),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// `GET /smart/jwks`: Courier's public client keys, one per registered EHR.
pub async fn ehr_jwks(state: web::Data<AppState>) -> HttpResponse {
    let store = state.store.clone();
    match web::block(move || crate::smart::registry::jwks(&store)).await {
        Ok(Ok(set)) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
            .json(set),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// The SMART configuration document (also used for the CapabilityStatement's security section).
pub fn smart_configuration_document(state: &AppState) -> Value {
    json!({
        "issuer": state.settings.base_url,
        "jwks_uri": endpoint(state, JWKS_PATH),
        "token_endpoint": endpoint(state, TOKEN_PATH),
        "introspection_endpoint": endpoint(state, INTROSPECT_PATH),
        "revocation_endpoint": endpoint(state, REVOKE_PATH),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": [
            "system/Communication.cruds", "system/CommunicationRequest.cruds", "system/Binary.cr",
            "system/AuditEvent.rs", "system/*.cruds",
            "patient/Communication.cruds", "patient/CommunicationRequest.cruds", "patient/AuditEvent.rs",
            "user/Communication.cruds", "user/CommunicationRequest.cruds", "user/AuditEvent.rs",
            "patient/*.cruds", "user/*.cruds", "patient/*.read", "user/*.read", "system/*.read"
        ],
        "capabilities": [
            "client-confidential-asymmetric",
            "permission-v1",
            "permission-v2"
        ],
        "code_challenge_methods_supported": ["S256"],
    })
}

/// `GET /.well-known/smart-configuration`.
pub async fn smart_configuration(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "public, max-age=300"))
        .json(smart_configuration_document(&state))
}
