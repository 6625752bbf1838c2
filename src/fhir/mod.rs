//! The FHIR R4 REST layer: routes, content negotiation, and the interactions.

pub mod access;
pub mod bundle;
pub mod capability;
pub mod outcome;
pub mod rest;

use crate::auth::clients::JwksCache;
use crate::auth::tokens::Tokens;
use crate::config::Settings;
use crate::store::Store;
use actix_web::web;
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
}

/// What the server does with each resource type; the CapabilityStatement is generated from this.
pub struct TypeSupport {
    pub name: &'static str,
    pub interactions: &'static [&'static str],
    pub writable: bool,
    pub searchable: bool,
    pub conditional_create: bool,
}

/// Everything the messaging resources support.
const MESSAGING_INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
];

pub const TYPES: &[TypeSupport] = &[
    TypeSupport {
        name: "Communication",
        interactions: MESSAGING_INTERACTIONS,
        writable: true,
        searchable: true,
        conditional_create: true,
    },
    TypeSupport {
        name: "CommunicationRequest",
        interactions: MESSAGING_INTERACTIONS,
        writable: true,
        searchable: true,
        conditional_create: true,
    },
    TypeSupport {
        name: "Group",
        interactions: MESSAGING_INTERACTIONS,
        writable: true,
        searchable: true,
        conditional_create: true,
    },
    TypeSupport {
        name: "CareTeam",
        interactions: MESSAGING_INTERACTIONS,
        writable: true,
        searchable: true,
        conditional_create: true,
    },
    TypeSupport {
        name: "PractitionerRole",
        interactions: MESSAGING_INTERACTIONS,
        writable: true,
        searchable: true,
        conditional_create: true,
    },
    TypeSupport {
        name: "Binary",
        interactions: &["read", "vread", "create"],
        writable: true,
        searchable: false,
        conditional_create: false,
    },
    TypeSupport {
        name: "AuditEvent",
        interactions: &["read", "vread", "search-type"],
        writable: false,
        searchable: true,
        conditional_create: false,
    },
];

pub fn support(res_type: &str) -> Option<&'static TypeSupport> {
    TYPES.iter().find(|t| t.name == res_type)
}

/// Registers the FHIR routes at the root of the service.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metadata", web::get().to(capability::metadata))
        .route("/", web::post().to(bundle::batch_or_transaction))
        .route(
            "/Communication/{id}/$file-to-chart",
            web::post().to(crate::smart::chart::file_to_chart),
        )
        .route("/{type}", web::get().to(rest::search_get))
        .route("/{type}", web::post().to(rest::create))
        .route("/{type}/_search", web::post().to(rest::search_post))
        .route("/{type}/_history", web::get().to(rest::type_history))
        .route("/{type}/{id}", web::get().to(rest::read))
        .route("/{type}/{id}", web::put().to(rest::update))
        .route("/{type}/{id}", web::patch().to(rest::patch))
        .route("/{type}/{id}", web::delete().to(rest::delete))
        .route(
            "/{type}/{id}/_history",
            web::get().to(rest::instance_history),
        )
        .route("/{type}/{id}/_history/{vid}", web::get().to(rest::vread));
}
