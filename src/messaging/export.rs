//! GDPR right of access: everything Courier holds about one patient, as one FHIR Bundle.
//!
//! `GET /Patient/{id}/$everything` (the patient's own token, or a system client allowed to read
//! every messaging type and the audit trail) and `courier export --patient ID` (operators):
//! - the Communications and CommunicationRequests in the patient's compartment (subject, sender,
//!   recipient, requester — the same compartment the access policy uses);
//! - the Binaries they attach;
//! - the receipts on those messages, as a Parameters resource;
//! - the AuditEvents about the patient: who read or changed their data, when, from where.
//!
//! The Bundle is a `collection`; the export is itself audited (an operation on the patient).

use crate::auth::policy::{self, Access};
use crate::auth::scopes::{self, Perm};
use crate::auth::{Principal, SubjectKind};
use crate::fhir::outcome::{FhirError, FHIR_JSON};
use crate::fhir::rest::{audit_context, audited_operation, blocking, Res};
use crate::fhir::AppState;
use crate::search::dates::{format_instant, now_micros};
use crate::search::query::SearchRequest;
use crate::store::{Store, StoreError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

const TYPES: [&str; 3] = ["Communication", "CommunicationRequest", "AuditEvent"];
/// The scopes an administrator's token must carry to export anyone's data.
const ADMIN_NEEDS: [(&str, Perm); 4] = [
    ("Communication", Perm::Search),
    ("CommunicationRequest", Perm::Search),
    ("Binary", Perm::Read),
    ("AuditEvent", Perm::Search),
];

/// The patient's compartment, as the access policy defines it.
fn compartment_of(patient: &str) -> Principal {
    Principal {
        client_id: "courier-export".into(),
        jti: String::new(),
        exp: i64::MAX,
        scopes: scopes::parse_all("patient/*.rs patient/AuditEvent.rs").unwrap_or_default(),
        fhir_user: Some(format!("Patient/{patient}")),
        patient: Some(patient.to_string()),
        encounter: None,
        groups: vec![],
        emergency: vec![],
    }
}

/// Everything Courier holds about `patient`. Blocking.
pub fn everything(store: &Store, patient: &str) -> Result<Value, StoreError> {
    let who = compartment_of(patient);
    let base = &store.base_url;
    let mut entries = vec![];
    let mut messages = vec![];
    let mut binaries = std::collections::BTreeSet::new();
    for t in TYPES {
        let Ok(Access::Only(cond)) = policy::decide(&who, &store.registry, base, t, Perm::Search)
        else {
            continue;
        };
        let mut req = SearchRequest::of(vec![cond], 500);
        loop {
            let page = store.search(t, &req)?;
            for s in &page.matches {
                let Some(body) = s.body.as_deref() else {
                    continue;
                };
                let v: Value =
                    serde_json::from_slice(body).map_err(|e| StoreError::Other(e.into()))?;
                if t == "Communication" {
                    messages.push(s.id.clone());
                }
                for p in v["payload"].as_array().into_iter().flatten() {
                    if let Some(id) = p["contentAttachment"]["url"]
                        .as_str()
                        .map(|u| super::hub::local_ref(u, base))
                        .and_then(|u| u.strip_prefix("Binary/").map(String::from))
                    {
                        binaries.insert(id);
                    }
                }
                entries.push(json!({"fullUrl": format!("{base}/{t}/{}", s.id), "resource": v}));
            }
            if !page.has_next || page.matches.is_empty() {
                break;
            }
            req.offset += page.matches.len();
            req.snapshot = Some(page.snapshot);
        }
    }
    for id in binaries {
        if let Ok(s) = store.read("Binary", &id) {
            if let Some(v) = s
                .body
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
            {
                entries.push(json!({"fullUrl": format!("{base}/Binary/{id}"), "resource": v}));
            }
        }
    }
    // Receipts on the patient's messages (theirs and others'), one part per receipt.
    let mut receipts = vec![];
    for chunk in messages.chunks(200) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let rows: Vec<super::receipts::Receipt> = store.query(
            &format!("SELECT comm_id, recipient, delivered_at, read_at FROM receipts WHERE comm_id IN ({marks}) ORDER BY comm_id, recipient"),
            chunk.iter().map(|c| c.clone().into()).collect(),
        )?;
        for r in rows {
            let mut part = vec![
                json!({"name": "communication", "valueReference": {"reference": format!("Communication/{}", r.comm_id)}}),
                json!({"name": "recipient", "valueReference": {"reference": r.recipient}}),
            ];
            if let Some(t) = r.delivered_at {
                part.push(json!({"name": "delivered", "valueInstant": format_instant(t)}));
            }
            if let Some(t) = r.read_at {
                part.push(json!({"name": "read", "valueInstant": format_instant(t)}));
            }
            receipts.push(json!({"name": "receipt", "part": part}));
        }
    }
    if !receipts.is_empty() {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": {"resourceType": "Parameters", "parameter": receipts},
        }));
    }
    Ok(json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "collection",
        "timestamp": format_instant(now_micros()),
        "entry": entries,
    }))
}

/// May `p` export `patient`'s data: the patient themself, or a system client that may read all of
/// it anyway.
fn allowed(p: &Principal, patient: &str, state: &AppState) -> bool {
    if p.kind() == SubjectKind::Patient {
        return p.fhir_user.as_deref() == Some(&format!("Patient/{patient}"));
    }
    policy::is_administrator(
        p,
        &state.store.registry,
        &state.settings.base_url,
        &ADMIN_NEEDS,
    )
}

pub async fn patient_everything(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result: Res = async {
        let p = crate::fhir::access::principal(&req)?;
        if !fhir_codec::is_valid_id(&id) {
            return Err(FhirError::bad_request("not a valid Patient id"));
        }
        if !allowed(&p, &id, &state) {
            return Err(FhirError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a patient exports their own data; an administrator needs system read access to every messaging type and the audit trail",
            ));
        }
        let store = state.store.clone();
        let pid = id.clone();
        let bundle = blocking(move || Ok(everything(&store, &pid)?)).await?;
        Ok(HttpResponse::Ok()
            .content_type(FHIR_JSON)
            .insert_header(("Cache-Control", "no-store"))
            .body(bundle.to_string()))
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
