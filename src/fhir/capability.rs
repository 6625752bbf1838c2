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
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dates::format_instant(dates::now_micros()),
        "publisher": "Courier",
        "kind": "instance",
        "software": {"name": "Courier", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": "Courier FHIR R4 secure-messaging server", "url": state.settings.base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }]
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
