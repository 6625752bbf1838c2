//! GDPR / HIPAA right of access: everything Courier holds about one patient, as one FHIR Bundle.
//!
//! `GET /Patient/{id}/$everything` (the patient's own token, or a system client allowed to read
//! every messaging type and the audit trail) and `courier export --patient ID` (operators):
//! - the Communications and CommunicationRequests in the patient's compartment (subject, sender,
//!   recipient, requester — the same compartment the access policy uses);
//! - the Binaries they attach;
//! - the receipts on those messages, as a Parameters resource;
//! - the AuditEvents about the patient: who read or changed their data, when, from where;
//! - how Courier reaches them outside the app (email address, mobile number, choices, the number
//!   of browsers with push turned on, each notice sent or not), as a Parameters resource.
//!
//! What each caller gets ([`Viewer`]):
//! - **The patient's own call** gets what their token could read anyway, type by type: a type
//!   its scopes do not grant is left out (a `patient/Binary.cr` token gets no messages and no
//!   audit trail), staff-only (`NOPAT`) messages are left out as everywhere else, and the
//!   AuditEvents are cut down to who accessed what and when — no client ids, network addresses,
//!   token ids, queries, nor entities the patient cannot see.
//! - **An administrator** (a system client with the export scopes, or the `courier export` CLI)
//!   gets everything in the compartment, staff-only messages included and labelled `NOPAT`, so
//!   the privacy officer who answers a right-of-access request can review them before release.
//!
//! The Bundle is a `collection`; the export is itself audited (an operation on the patient).

use crate::api::AppState;
use crate::api::{audit_context, audited_operation, blocking, Res};
use crate::auth::policy::{self, Access};
use crate::auth::scopes::Perm;
use crate::auth::{Principal, SubjectKind};
use crate::clock::now_micros;
use crate::fhir::outcome::{FhirError, FHIR_JSON};
use crate::search::dates::format_instant;
use crate::search::query::{Condition, SearchRequest};
use crate::store::{Store, StoreError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::collections::BTreeSet;

const TYPES: [&str; 3] = ["Communication", "CommunicationRequest", "AuditEvent"];
/// The scopes an administrator's token must carry to export anyone's data.
const ADMIN_NEEDS: [(&str, Perm); 4] = [
    ("Communication", Perm::Search),
    ("CommunicationRequest", Perm::Search),
    ("Binary", Perm::Read),
    ("AuditEvent", Perm::Search),
];

/// Who the export is for.
#[derive(Clone, Copy)]
pub enum Viewer<'a> {
    /// An operator or a system client with the export scopes: the whole compartment.
    Administrator,
    /// The patient's own token: what it may read, with a minimal audit trail.
    Patient(&'a Principal),
}

/// What `viewer` may reach of `t` within `patient`'s compartment, or `None` for nothing.
fn reach(store: &Store, viewer: Viewer, patient: &str, t: &str) -> Option<Vec<Condition>> {
    let compartment = policy::patient_compartment(&store.registry, t, patient)?;
    match viewer {
        Viewer::Administrator => Some(vec![compartment]),
        // The audit trail, when the token's scopes name it, cut down by `minimal_audit`.
        Viewer::Patient(p) if t == "AuditEvent" => p
            .scopes
            .iter()
            .any(|s| s.names(t) && (s.allows(Perm::Search) || s.allows(Perm::Read)))
            .then(|| vec![compartment]),
        Viewer::Patient(p) => {
            match policy::decide(p, &store.registry, &store.base_url, t, Perm::Search)
                .or_else(|_| policy::decide(p, &store.registry, &store.base_url, t, Perm::Read))
            {
                Ok(Access::All) => Some(vec![compartment]),
                Ok(Access::Only(c)) => Some(vec![compartment, c]),
                Err(_) => None,
            }
        }
    }
}

/// Runs a search of `t` under `conditions` through all its pages, calling `f` with each match's
/// id and parsed body.
fn each_match(
    store: &Store,
    t: &str,
    conditions: Vec<Condition>,
    mut f: impl FnMut(&str, Value) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut req = SearchRequest::of(conditions, 500);
    loop {
        let page = store.search(t, &req)?;
        for s in &page.matches {
            let Some(body) = s.body.as_deref() else {
                continue;
            };
            let v: Value = serde_json::from_slice(body).map_err(|e| StoreError::Other(e.into()))?;
            f(&s.id, v)?;
        }
        if !page.has_next || page.matches.is_empty() {
            return Ok(());
        }
        req.offset += page.matches.len();
        req.snapshot = Some(page.snapshot);
    }
}

/// Everything Courier holds about `patient`, as `viewer` may have it. Blocking.
pub fn everything(store: &Store, patient: &str, viewer: Viewer) -> Result<Value, StoreError> {
    let base = &store.base_url;
    let mut entries = vec![];
    let mut messages = vec![];
    let mut visible = BTreeSet::from([format!("Patient/{patient}")]);
    let mut binaries = BTreeSet::new();
    // What the patient's side may not learn of, not even that it was accessed: staff-only
    // messages and requests about the patient, and their attachments.
    let mut staff_only = match viewer {
        Viewer::Administrator => BTreeSet::new(),
        Viewer::Patient(_) => staff_only_items(store, patient)?,
    };
    for t in TYPES {
        let Some(conditions) = reach(store, viewer, patient, t) else {
            continue;
        };
        each_match(store, t, conditions, |id, mut v| {
            if t == "Communication" {
                messages.push(id.to_string());
            }
            if t != "AuditEvent" {
                visible.insert(format!("{t}/{id}"));
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
            if t == "AuditEvent" {
                if let Viewer::Patient(_) = viewer {
                    // A message deleted since is no longer in the compartment: its last
                    // content tells whether it was staff-only.
                    for what in named_messages(&v, base) {
                        if !visible.contains(&what)
                            && !staff_only.contains(&what)
                            && was_staff_only(store, &what)?
                        {
                            staff_only.insert(what);
                        }
                    }
                    if names_any(&v, &staff_only, base) {
                        return Ok(());
                    }
                    v = minimal_audit(&v, &visible, base);
                }
            }
            entries.push(json!({"fullUrl": format!("{base}/{t}/{id}"), "resource": v}));
            Ok(())
        })?;
    }
    let binaries_granted = match viewer {
        Viewer::Administrator => true,
        Viewer::Patient(p) => p
            .scopes
            .iter()
            .any(|s| s.names("Binary") && s.allows(Perm::Read)),
    };
    for id in binaries.into_iter().filter(|_| binaries_granted) {
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
    // How Courier reaches the patient outside the app: contacts, choices, browsers, notices.
    // (For the patient's own call only when their token may read their messages: a token
    // scoped to attachments, say, gets no contact details.)
    let notices_granted = match viewer {
        Viewer::Administrator => true,
        Viewer::Patient(p) => p
            .scopes
            .iter()
            .any(|s| s.names("Communication") && s.allows(Perm::Read)),
    };
    let notices = match notices_granted {
        true => crate::notify::export_of(store, &format!("Patient/{patient}"))?,
        false => None,
    };
    if let Some(p) = notices {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            "resource": p,
        }));
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

/// The staff-only (`NOPAT`) Communications and CommunicationRequests in `patient`'s compartment
/// and the Binaries they attach, as `Type/id`. Blocking.
fn staff_only_items(store: &Store, patient: &str) -> Result<BTreeSet<String>, StoreError> {
    let mut out = BTreeSet::new();
    for t in ["Communication", "CommunicationRequest"] {
        let Some(mut conditions) = reach(store, Viewer::Administrator, patient, t) else {
            continue;
        };
        // Only the labelled ones, found by the index (nothing else is decrypted).
        let Some(label) = store.registry.get(t, "_security") else {
            continue;
        };
        conditions.push(Condition::Token {
            key: label.key.clone(),
            not: false,
            values: vec![crate::search::query::TokenValue::SystemCode(
                Some(super::staff_only::ACT_CODE.into()),
                Some(super::staff_only::NOPAT.into()),
            )],
        });
        each_match(store, t, conditions, |id, v| {
            out.insert(format!("{t}/{id}"));
            for p in v["payload"].as_array().into_iter().flatten() {
                if let Some(u) = p["contentAttachment"]["url"].as_str() {
                    let u = super::hub::local_ref(u, &store.base_url);
                    if u.starts_with("Binary/") {
                        out.insert(u);
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// The messages and requests (`Type/id`) the AuditEvent `ev` names as entities.
fn named_messages(ev: &Value, base: &str) -> Vec<String> {
    ev["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["what"]["reference"].as_str())
        .map(|r| super::hub::local_ref(r, base))
        .map(|r| r.split("/_history").next().unwrap_or_default().to_string())
        .filter(|r| r.starts_with("Communication/") || r.starts_with("CommunicationRequest/"))
        .collect()
}

/// Was the message or request `what` (`Type/id`) staff-only in its last stored content (it may
/// have been deleted since)? Blocking.
fn was_staff_only(store: &Store, what: &str) -> Result<bool, StoreError> {
    let Some((t, id)) = what.split_once('/') else {
        return Ok(false);
    };
    let versions = match store.history(t, Some(id), None, 100, 0, None, None) {
        Ok((v, _, _)) => v,
        Err(StoreError::NotFound(..)) => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(versions
        .iter()
        .find_map(|s| s.body.as_deref())
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .is_some_and(|v| super::staff_only::is_labelled(&v)))
}

/// Does the AuditEvent `ev` name (as an entity) one of `items`?
fn names_any(ev: &Value, items: &BTreeSet<String>, base: &str) -> bool {
    ev["entity"].as_array().into_iter().flatten().any(|e| {
        e["what"]["reference"].as_str().is_some_and(|r| {
            let r = super::hub::local_ref(r, base);
            items.contains(r.split("/_history").next().unwrap_or_default())
        })
    })
}

/// An AuditEvent as its patient receives it: who accessed what and when. Kept: type, subtype,
/// action, recorded, outcome; the people (Practitioner, PractitionerRole, Patient, RelatedPerson)
/// among the agents; the entities the patient can see. Dropped: client ids, network addresses,
/// token ids (`agent.policy`), search queries, and every detail.
pub fn minimal_audit(ev: &Value, visible: &BTreeSet<String>, base: &str) -> Value {
    let mut out = json!({"resourceType": "AuditEvent"});
    for k in [
        "id", "type", "subtype", "action", "period", "recorded", "outcome",
    ] {
        if let Some(v) = ev.get(k) {
            out[k] = v.clone();
        }
    }
    let person = |r: &str| {
        matches!(
            r.split('/').next(),
            Some("Practitioner" | "PractitionerRole" | "Patient" | "RelatedPerson")
        )
    };
    let mut agents: Vec<Value> = ev["agent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let who = a["who"]["reference"]
                .as_str()
                .map(|r| super::hub::local_ref(r, base))?;
            person(&who).then(|| {
                json!({"who": {"reference": who}, "requestor": a["requestor"].as_bool().unwrap_or(false)})
            })
        })
        .collect();
    if agents.is_empty() {
        agents.push(json!({"who": {"display": "an authorised application"}, "requestor": true}));
    }
    out["agent"] = json!(agents);
    out["source"] = json!({"observer": {"display": "Courier"}});
    let entities: Vec<Value> = ev["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let what = e["what"]["reference"]
                .as_str()
                .map(|r| super::hub::local_ref(r, base))?;
            let what = what
                .split("/_history")
                .next()
                .unwrap_or_default()
                .to_string();
            visible.contains(&what).then(|| {
                let mut x = json!({"what": {"reference": what}});
                if let Some(t) = e.get("type") {
                    x["type"] = t.clone();
                }
                if let Some(r) = e.get("role") {
                    x["role"] = r.clone();
                }
                x
            })
        })
        .collect();
    if !entities.is_empty() {
        out["entity"] = json!(entities);
    }
    out
}

/// May `p` export `patient`'s data: the patient themself, or a system client that may read all of
/// it anyway.
fn allowed<'a>(p: &'a Principal, patient: &str, state: &AppState) -> Option<Viewer<'a>> {
    if p.kind() == SubjectKind::Patient {
        return (p.fhir_user.as_deref() == Some(&format!("Patient/{patient}")))
            .then_some(Viewer::Patient(p));
    }
    policy::is_administrator(
        p,
        &state.store.registry,
        &state.settings.base_url,
        &ADMIN_NEEDS,
    )
    .then_some(Viewer::Administrator)
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
        let Some(viewer) = allowed(&p, &id, &state) else {
            return Err(FhirError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "a patient exports their own data; an administrator needs system read access to every messaging type and the audit trail",
            ));
        };
        let store = state.store.clone();
        let pid = id.clone();
        let admin = matches!(viewer, Viewer::Administrator);
        let who = p.clone();
        let bundle = blocking(move || {
            let viewer = if admin {
                Viewer::Administrator
            } else {
                Viewer::Patient(&who)
            };
            Ok(everything(&store, &pid, viewer)?)
        })
        .await?;
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
