//! The FHIR R4 REST layer: routes, content negotiation, and the interactions.

pub mod access;
pub mod bundle;
pub mod capability;
pub mod limits;
pub mod outcome;
pub mod paging;
pub mod rest;

use actix_web::web;

pub use crate::api::AppState;

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

/// The base and type-level FHIR routes: registered after every static path of the service (a
/// one-segment static path such as `/metadata` or `/Subscription` must win over `/{type}`) and
/// before the operations. Actix tries each route's pattern in registration order, a dynamic one
/// with a regular expression; most requests are creates and searches, so they come first (before,
/// a create ran ~17 pattern matches before it found its route).
pub fn type_routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metadata", web::get().to(capability::metadata))
        .route("/", web::post().to(bundle::batch_or_transaction))
        .service(
            web::resource("/{type}")
                .route(web::get().to(rest::search_get))
                .route(web::post().to(rest::create))
                .default_service(web::to(no_such_endpoint)),
        );
}

/// The instance-level FHIR routes: after the operations (`/Subscription/{id}` must win over
/// `/{type}/{id}`).
pub fn instance_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/Communication/{id}/$file-to-chart",
        web::post().to(crate::smart::chart::file_to_chart),
    )
    .route("/{type}/_search", web::post().to(rest::search_post))
    .route("/{type}/_history", web::get().to(rest::type_history))
    .service(
        web::resource("/{type}/{id}")
            .route(web::get().to(rest::read))
            // HEAD: the read's status and headers (ETag, Last-Modified), no body.
            .route(web::head().to(rest::head))
            .route(web::put().to(rest::update))
            .route(web::patch().to(rest::patch))
            .route(web::delete().to(rest::delete))
            .default_service(web::to(no_such_endpoint)),
    )
    .route(
        "/{type}/{id}/_history",
        web::get().to(rest::instance_history),
    )
    .route("/{type}/{id}/_history/{vid}", web::get().to(rest::vread));
}

/// What a path or method the service does not have is answered with (as the app's default).
pub async fn no_such_endpoint() -> actix_web::HttpResponse {
    use actix_web::ResponseError;
    outcome::FhirError::not_found("no such endpoint").error_response()
}
