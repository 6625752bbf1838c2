//! Messaging: the event log and real-time hub, the WebSocket channel, and receipts.
//!
//! - [`away`]     out-of-office: automatic replies and copies to a delegate (PractitionerRole)
//! - [`events`]   the event log written in every messaging change's own transaction
//! - [`export`]   everything Courier holds about a patient (GDPR right of access)
//! - [`groups`]   Group and CareTeam membership (who a message to a group reaches)
//! - [`hub`]      tails the log (all instances), loads each event once, fans it out
//! - [`ws`]       `GET /ws`: authenticated, access-filtered, catch-up from the last seq seen
//! - [`receipts`] per-recipient delivered/read receipts and unread counts
//! - [`rules`]    attachment types and patient-portal guardrails on every write
//! - [`subscriptions`] topic-based Subscriptions (R5 Backport IG): REST, `$status`, `$events`
//! - [`dispatch`] the leader's matching and rest-hook delivery; the subscription websocket
//! - [`escalation`] reminders and escalation of unread urgent messages (CommunicationRequests)
//! - [`staff_only`] the NOPAT label on messages no patient takes part in (hidden from patients)
//! - [`schedule`] scheduled messages: active CommunicationRequests sent at their occurrenceDateTime
//! - [`webapp`]   the web app (`smart-launch/`) served at `/app/`

pub mod away;
pub mod dispatch;
pub mod escalation;
pub mod events;
pub mod export;
pub mod groups;
pub mod hub;
pub mod people;
pub mod receipts;
pub mod revocations;
pub mod rules;
pub mod schedule;
pub mod staff_only;
pub mod subscriptions;
pub mod timing;
pub mod webapp;
pub mod ws;

use actix_web::web;

/// The messaging routes with static paths (registered before the FHIR type routes, see
/// [`crate::fhir::type_routes`]).
pub fn routes(cfg: &mut web::ServiceConfig) {
    webapp::routes(cfg);
    cfg.route("/ws", web::get().to(ws::socket))
        .route("/Communication/$unread", web::get().to(receipts::unread))
        .route(
            "/Communication/$participants",
            web::get().to(people::participants),
        )
        .route(
            "/Communication/$recipients",
            web::get().to(people::recipients),
        )
        .route("/subscriptions/ws", web::get().to(dispatch::socket))
        .route("/Subscription", web::post().to(subscriptions::create))
        .route("/Subscription", web::get().to(subscriptions::search));
}

/// The messaging routes on an instance (`/Subscription/{id}`, `/Communication/{id}/$mark-read`,
/// …): registered after the FHIR type routes and before the FHIR instance routes, over which
/// they win (see [`crate::fhir::type_routes`]).
pub fn operation_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/Communication/{id}/$mark-read",
        web::post().to(receipts::mark_read),
    )
    .route(
        "/Communication/{id}/$mark-unread",
        web::post().to(receipts::mark_unread),
    )
    .route(
        "/Communication/{id}/$mark-delivered",
        web::post().to(receipts::mark_delivered),
    )
    .route(
        "/Communication/{id}/$receipts",
        web::get().to(receipts::list),
    )
    .route(
        "/Patient/{id}/$everything",
        web::get().to(export::patient_everything),
    )
    .route(
        "/Patient/{id}/$erase",
        web::post().to(crate::compliance::api::erase),
    )
    .route(
        "/Patient/{id}/$emergency-access",
        web::post().to(crate::compliance::emergency::request),
    )
    .route(
        "/Patient/{id}/$legal-hold",
        web::post().to(crate::compliance::api::legal_hold),
    )
    .route(
        "/Communication/{id}/$legal-hold",
        web::post().to(crate::compliance::api::legal_hold),
    )
    .route("/Subscription/{id}", web::get().to(subscriptions::read))
    .route(
        "/Subscription/{id}",
        web::delete().to(subscriptions::delete),
    )
    .route(
        "/Subscription/{id}/$status",
        web::get().to(subscriptions::status),
    )
    .route(
        "/Subscription/{id}/$events",
        web::get().to(subscriptions::events),
    )
    .route(
        "/Subscription/{id}/$get-ws-binding-token",
        web::get().to(subscriptions::binding_token),
    )
    .route(
        "/Subscription/{id}/$get-ws-binding-token",
        web::post().to(subscriptions::binding_token),
    );
}

/// `{res_type}?{name}={value}&…` as a store condition (all must match): what makes a derived
/// write (a scheduled send, an escalation request) happen once — written with `if_none_exist`
/// on its identifier (and what else marks it as Courier's), a retry after a crash finds the
/// first instead of writing a second.
pub(crate) fn condition(
    store: &crate::store::Store,
    res_type: &str,
    pairs: &[(&str, &str)],
) -> Result<crate::search::query::SearchRequest, crate::store::StoreError> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let limits = crate::search::query::Limits {
        default_count: 2,
        max_count: 2,
        strict: true,
    };
    crate::search::query::parse(&store.registry, res_type, &pairs, &store.base_url, &limits)
        .map_err(|_| {
            crate::store::StoreError::Other(anyhow::anyhow!("{res_type} identifier query"))
        })
}
