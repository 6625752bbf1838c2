//! The web app (`smart-launch/`), compiled into the binary and served at `/app/`: the page the
//! launch hand-off opens. Static files, public (the app authenticates its API calls with the
//! token the hand-off put in `sessionStorage`), under a strict Content-Security-Policy: scripts
//! and styles only from this origin, so even a message that slipped past escaping could not run.

use crate::api::AppState;
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use serde_json::json;

const INDEX: &str = include_str!("../../smart-launch/index.html");
const SCRIPT: &str = include_str!("../../smart-launch/app.js");
const STYLE: &str = include_str!("../../smart-launch/app.css");
const WORKER: &str = include_str!("../../smart-launch/sw.js");

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/app",
        web::get().to(|| async {
            HttpResponse::MovedPermanently()
                .insert_header((header::LOCATION, "/app/"))
                .finish()
        }),
    )
    .route("/app/", web::get().to(index))
    .route(
        "/app/app.js",
        web::get().to(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
    )
    .route(
        "/app/app.css",
        web::get().to(|| async { asset("text/css; charset=utf-8", STYLE) }),
    )
    .route(
        "/app/sw.js",
        // The service worker that shows web push notices (scope /app/).
        web::get().to(|| async { asset("text/javascript; charset=utf-8", WORKER) }),
    )
    .route("/app/config.json", web::get().to(config));
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type.to_string())
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

async fn index(state: web::Data<AppState>) -> HttpResponse {
    // The EHR frames the app (frame-ancestors is configuration). The app talks to Courier only
    // (its API and its WebSocket): no token can be sent anywhere else.
    let ws = state
        .settings
        .base_url
        .replacen("https://", "wss://", 1)
        .replacen("http://", "ws://", 1);
    let csp = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; \
         connect-src 'self' {ws}; form-action 'self'; base-uri 'none'; frame-ancestors {}",
        state.settings.frame_ancestors
    );
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CONTENT_SECURITY_POLICY, csp))
        .body(INDEX)
}

/// What the app needs to know of the configuration: the patient guardrails and limits.
async fn config(state: web::Data<AppState>) -> HttpResponse {
    let s = &state.settings;
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .json(json!({
            "patient_max_message_chars": s.patient_max_message_chars,
            "expected_response_notice": s.expected_response_notice,
            "emergency_number": s.emergency_number,
            // The app signs out on its own after this long without activity.
            "idle_timeout_secs": s.idle_timeout_secs,
            "attachment_max_bytes": s.max_binary_bytes,
            "attachment_types": s.attachment_types,
            "category_system": super::rules::CATEGORY_SYSTEM,
            "categories": super::rules::PATIENT_CATEGORIES
                .iter()
                .map(|(code, display)| json!({"code": code, "display": display}))
                .collect::<Vec<_>>(),
        }))
}
