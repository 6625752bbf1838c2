//! The administrator operations of the compliance module:
//! - `POST /Patient/{id}/$erase`: erase one patient's messaging data (GDPR Art. 17); 409 while a
//!   legal hold covers them; answers a Parameters resource with the counts.
//! - `POST /Patient/{id}/$legal-hold`, `POST /Communication/{id}/$legal-hold` (a thread): place or
//!   release a hold (Parameters `action` = `place` | `release`, `reason`).
//!
//! Both take an administrator: a system client (no user) allowed to delete every messaging type.
//! Anyone else gets 403 and learns nothing about the patient. Both are audited.

use super::purge::{self, EraseError};
use crate::api::AppState;
use crate::api::{audit_context, audited_operation, blocking, Res};
use crate::auth::policy;
use crate::auth::scopes::Perm;
use crate::auth::Principal;
use crate::fhir::outcome::{FhirError, FHIR_JSON};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

const ADMIN_NEEDS: [(&str, Perm); 3] = [
    ("Communication", Perm::Delete),
    ("CommunicationRequest", Perm::Delete),
    ("Binary", Perm::Delete),
];

fn is_admin(p: &Principal, state: &AppState) -> bool {
    policy::is_administrator(
        p,
        &state.store.registry,
        &state.settings.base_url,
        &ADMIN_NEEDS,
    )
}

fn forbidden() -> FhirError {
    FhirError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "this operation takes an administrator: a system client allowed to delete Communication, CommunicationRequest and Binary",
    )
}

pub async fn erase(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result: Res = async {
        let p = crate::fhir::access::principal(&req)?;
        if !is_admin(&p, &state) {
            return Err(forbidden());
        }
        if !fhir_codec::is_valid_id(&id) {
            return Err(FhirError::bad_request("not a valid Patient id"));
        }
        let (store, pid, c) = (state.store.clone(), id.clone(), ctx.clone());
        let summary = blocking(move || match purge::erase_patient(&store, &pid, &c) {
            Ok(s) => Ok(s),
            Err(EraseError::Held(why)) => Err(FhirError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("Patient/{pid} cannot be erased while a legal hold applies: {why}"),
            )),
            Err(EraseError::Store(e)) => Err(e.into()),
        })
        .await?;
        let body = json!({
            "resourceType": "Parameters",
            "parameter": [
                {"name": "resources", "valueInteger": summary.resources()},
                {"name": "versions", "valueInteger": summary.versions},
                {"name": "keysDestroyed", "valueInteger": summary.keys_destroyed},
                {"name": "shared", "valueInteger": summary.shared},
            ]
        });
        Ok(HttpResponse::Ok()
            .content_type(FHIR_JSON)
            .insert_header(("Cache-Control", "no-store"))
            .body(body.to_string()))
    }
    .await;
    audited_operation(
        &state,
        &ctx,
        format!("Patient/{id}"),
        Some(format!("Patient/{id}")),
        result,
    )
    .await
}

fn param<'a>(body: &'a Value, name: &str) -> Option<&'a Value> {
    body["parameter"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

pub async fn legal_hold(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    // The routed path (`/%50atient/…` is the Patient route too).
    let res_type = if req.match_info().as_str().starts_with("/Patient/") {
        "Patient"
    } else {
        "Communication"
    };
    let target = format!("{res_type}/{id}");
    let ctx = audit_context(&req, &state);
    let result: Res = async {
        let p = crate::fhir::access::principal(&req)?;
        if !is_admin(&p, &state) {
            return Err(forbidden());
        }
        purge::check_target(&target).map_err(FhirError::bad_request)?;
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| FhirError::bad_request("the body must be a Parameters resource (JSON)"))?;
        if v["resourceType"] != "Parameters" {
            return Err(FhirError::bad_request(
                "the body must be a Parameters resource",
            ));
        }
        let action = param(&v, "action")
            .and_then(|p| p["valueCode"].as_str())
            .ok_or_else(|| FhirError::bad_request("Parameters.action (valueCode place | release) is required"))?
            .to_string();
        let reason = param(&v, "reason")
            .and_then(|p| p["valueString"].as_str())
            .unwrap_or_default()
            .trim()
            .to_string();
        let store = state.store.clone();
        let t = target.clone();
        let changed = match action.as_str() {
            "place" => {
                if reason.is_empty() {
                    return Err(FhirError::bad_request(
                        "Parameters.reason (valueString) is required to place a hold: a case or matter reference",
                    ));
                }
                blocking(move || Ok(purge::place_hold(&store, &t, &reason)?)).await?
            }
            "release" => blocking(move || Ok(purge::release_hold(&store, &t)?)).await?,
            other => {
                return Err(FhirError::bad_request(format!(
                    "Parameters.action must be place or release, not '{other}'"
                )))
            }
        };
        let body = json!({
            "resourceType": "Parameters",
            "parameter": [
                {"name": "target", "valueReference": {"reference": target}},
                {"name": "held", "valueBoolean": action == "place"},
                {"name": "changed", "valueBoolean": changed},
            ]
        });
        Ok(HttpResponse::Ok()
            .content_type(FHIR_JSON)
            .body(body.to_string()))
    }
    .await;
    let patient = (res_type == "Patient").then(|| target.clone());
    audited_operation(&state, &ctx, target.clone(), patient, result).await
}
