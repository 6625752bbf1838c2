//! `GET /metadata`: the CapabilityStatement, generated from what the server really supports — the
//! type table in `fhir::TYPES` and the search-parameter registry.

use super::outcome::FHIR_JSON;
use super::rest::check_accept;
use super::{AppState, TYPES};
use crate::search::dates;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

pub fn capability_statement(state: &AppState) -> Value {
    let registry = &state.store.registry;
    let resources: Vec<Value> = TYPES
        .iter()
        .map(|t| {
            let mut r = json!({
                "type": t.name,
                "profile": format!("http://hl7.org/fhir/StructureDefinition/{}", t.name),
                "interaction": t.interactions.iter().map(|i| json!({"code": i})).collect::<Vec<_>>(),
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": t.interactions.contains(&"update"),
                "conditionalCreate": t.conditional_create,
                "conditionalRead": "not-supported",
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
            });
            if t.interactions.contains(&"update") {
                r["documentation"] = json!("Update as create (a client-assigned id) is for system (backend-service) tokens; a user's PUT to an id that does not exist is 404, as for one they cannot see.");
            }
            if t.searchable {
                r["searchParam"] = registry
                    .all_for(t.name)
                    .iter()
                    .map(|p| json!({"name": p.code, "definition": p.url, "type": p.kind.as_str(), "documentation": p.description}))
                    .collect();
                let refs: Vec<String> = registry
                    .all_for(t.name)
                    .iter()
                    .filter(|p| p.kind == crate::search::ParamType::Reference && !p.is_resource_level())
                    .map(|p| format!("{}:{}", t.name, p.code))
                    .collect();
                if !refs.is_empty() {
                    r["searchInclude"] = json!(refs);
                    r["searchRevInclude"] = json!(refs);
                }
            }
            if t.writable {
                r["referencePolicy"] = json!(["literal", "logical"]);
            }
            r
        })
        .collect();
    let mut resources = resources;
    resources.push(subscription_support());
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dates::format_instant(crate::clock::now_micros()),
        "publisher": "Courier",
        "kind": "instance",
        "software": {"name": "Courier", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Courier FHIR R4 secure-messaging server", "url": state.settings.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "security": security(state),
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            // The retention classes in force (CodeSystem retention-class; README § Retention).
            "extension": state.store.retention.extension(),
            "operation": [
                {"name": "erase", "definition": "https://courier.example.org/fhir/OperationDefinition/Patient-erase"},
                {"name": "legal-hold", "definition": "https://courier.example.org/fhir/OperationDefinition/legal-hold"},
                {"name": "emergency-access", "definition": "https://courier.example.org/fhir/OperationDefinition/Patient-emergency-access"},
            ],
        }]
    })
}

/// Topic-based Subscriptions (R5 Backport IG for R4): the topics, the operations.
fn subscription_support() -> Value {
    use crate::messaging::subscriptions::TOPICS;
    const IG: &str = "http://hl7.org/fhir/uv/subscriptions-backport";
    json!({
        "type": "Subscription",
        "profile": "http://hl7.org/fhir/StructureDefinition/Subscription",
        "supportedProfile": [format!("{IG}/StructureDefinition/backport-subscription")],
        "interaction": [{"code": "create"}, {"code": "read"}, {"code": "delete"}, {"code": "search-type"}],
        "extension": TOPICS.iter().map(|(t, _)| json!({
            "url": format!("{IG}/StructureDefinition/capabilitystatement-subscriptiontopic-canonical"),
            "valueCanonical": t,
        })).collect::<Vec<_>>(),
        "operation": [
            {"name": "status", "definition": format!("{IG}/OperationDefinition/backport-subscription-status")},
            {"name": "events", "definition": format!("{IG}/OperationDefinition/backport-subscription-events")},
            {"name": "get-ws-binding-token", "definition": format!("{IG}/OperationDefinition/backport-subscription-get-ws-binding-token")},
        ],
        "documentation": "Topic-based subscriptions (Subscriptions R5 Backport IG 1.1): rest-hook (handshake before active, heartbeats when a period is given, retried; channel.header values sent on every POST and never shown in reads; signed with HMAC-SHA256 only when the subscriber gives a secret in https://courier.example.org/fhir/StructureDefinition/subscription-hmac-secret) and websocket channels; payload content empty, id-only or full-resource; filters (backport-filter-criteria) on token and reference parameters. Stricter than the IG: rest-hook endpoints must be https (http only on loopback when the operator allows it) and public addresses; criteria extensions other than backport-filter-criteria are refused. A subscription belongs to the client that created it and hears only of what that client may read."
    })
}

/// SMART on FHIR: the service coding and the OAuth endpoints (the `oauth-uris` extension, which
/// some clients read instead of `/.well-known/smart-configuration`).
fn security(state: &AppState) -> Value {
    use crate::auth::server::{endpoint, INTROSPECT_PATH, REVOKE_PATH, TOKEN_PATH};
    json!({
        "cors": true,
        "service": [{
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
            "text": "OAuth2 using SMART-on-FHIR profile (see http://docs.smarthealthit.org)"
        }],
        "extension": [{
            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [
                {"url": "token", "valueUri": endpoint(state, TOKEN_PATH)},
                {"url": "introspect", "valueUri": endpoint(state, INTROSPECT_PATH)},
                {"url": "revoke", "valueUri": endpoint(state, REVOKE_PATH)}
            ]
        }],
        "description": "Every endpoint but /metadata needs a bearer access token from the token endpoint (SMART Backend Services: client_credentials with a private_key_jwt assertion, RS384 or ES384). Scopes: SMART v2 (v1 accepted)."
    })
}

pub async fn metadata(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    if let Err(e) = check_accept(&req) {
        return e.error_response();
    }
    HttpResponse::Ok()
        .content_type(FHIR_JSON)
        .body(capability_statement(&state).to_string())
}
