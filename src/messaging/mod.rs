//! Messaging: the event log and real-time hub, the WebSocket channel, and receipts.
//!
//! - [`events`]   the event log written in every messaging change's own transaction
//! - [`hub`]      tails the log (all instances), loads each event once, fans it out
//! - [`ws`]       `GET /ws`: authenticated, access-filtered, catch-up from the last seq seen
//! - [`receipts`] per-recipient delivered/read receipts and unread counts
//! - [`rules`]    attachment types and patient-portal guardrails on every write
//! - [`webapp`]   the web app (`smart-launch/`) served at `/app/`

pub mod events;
pub mod hub;
pub mod receipts;
pub mod rules;
pub mod webapp;
pub mod ws;

use actix_web::web;

pub fn routes(cfg: &mut web::ServiceConfig) {
    webapp::routes(cfg);
    cfg.route("/ws", web::get().to(ws::socket))
        .route("/Communication/$unread", web::get().to(receipts::unread))
        .route(
            "/Communication/{id}/$mark-read",
            web::post().to(receipts::mark_read),
        )
        .route(
            "/Communication/{id}/$mark-delivered",
            web::post().to(receipts::mark_delivered),
        )
        .route(
            "/Communication/{id}/$receipts",
            web::get().to(receipts::list),
        );
}
