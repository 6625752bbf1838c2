//! People by name, for the web app: so that every thread names the patient it is about and every
//! message its sender, and so that a patient picks whom to write to instead of typing a reference.
//!
//! - `GET /Communication/$participants?reference=Patient/…&reference=Practitioner/…` (at most 100):
//!   the summary Courier keeps of each person (name; for a patient birth date, gender and MRN; for
//!   a practitioner the role), read from the EHR at launch (`smart::identity::summary_of`).
//! - `GET /Communication/$recipients[?patient=Patient/…]`: whom the user may write to about a
//!   patient: the clinic's shared inboxes (`COURIER_MESSAGE_POOLS`), the patient's care team as
//!   their EHR lists it, and the clinicians who have written with the patient.
//!
//! A person is named to a caller only when the caller could learn of them anyway: themself, the
//! patient in the token's context, a shared inbox, the patient's care team, a message or request
//! the caller may search that names them as subject, sender, recipient or requester, and — for a
//! staff user — any practitioner (the staff directory). Anyone else is left out of the answer
//! exactly as an unknown reference is, so the answer tells nothing of who exists. A staff-only
//! message (NOPAT) is never searchable by the patient's side, so it names no one to them.

use crate::api::AppState;
use crate::api::{audited_answer, blocking, Res};
use crate::audit::Interaction;
use crate::auth::policy::{self, Access};
use crate::auth::scopes::Perm;
use crate::auth::{Principal, SubjectKind};
use crate::fhir::access;
use crate::fhir::outcome::FhirError;
use crate::search::query::SearchRequest;
use crate::smart::identity;
use crate::store::{Store, StoreError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// At most this many references per `$participants` call.
pub const MAX_REFS: usize = 100;
/// At most this many messages are read to find a patient's correspondents.
const CORRESPONDENTS_SCANNED: usize = 300;
/// The kinds of reference `$participants` answers for.
const KINDS: &[&str] = &[
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "Group",
    "CareTeam",
];

fn invalid(text: impl Into<String>) -> FhirError {
    FhirError::new(StatusCode::BAD_REQUEST, "invalid", text)
}

fn query(req: &HttpRequest) -> Vec<(String, String)> {
    crate::api::query_pairs(req.query_string())
}

/// `Type/id` of a reference given in a query (relative, or absolute under this server).
fn local_ref(value: &str, base: &str) -> Option<String> {
    let v = super::hub::local_ref(value.trim(), base.trim_end_matches('/'));
    let (t, id) = v.split_once('/')?;
    (KINDS.contains(&t) && fhir_codec::is_valid_id(id)).then(|| format!("{t}/{id}"))
}

/// What the caller may search of messages and requests.
fn accesses(state: &AppState, p: &Principal) -> Vec<(&'static str, Access)> {
    ["Communication", "CommunicationRequest"]
        .into_iter()
        .filter_map(|t| {
            access::decide(state, p, t, Perm::Search)
                .ok()
                .map(|a| (t, a))
        })
        .collect()
}

/// Does a message or request the caller may search name `target` as a party?
fn named_in_visible(
    store: &Store,
    accesses: &[(&str, Access)],
    target: &str,
) -> Result<bool, StoreError> {
    for (t, a) in accesses {
        let Some(m) = policy::mentions(&store.registry, t, target) else {
            continue;
        };
        // A draft is its author's alone: writing one proves no acquaintance (else a draft about
        // any id would reveal that person's name).
        let mut conditions = vec![m, not_a_draft(store, t)];
        if let Access::Only(c) = a {
            conditions.push(c.clone());
        }
        if !store
            .search(t, &SearchRequest::of(conditions, 1))?
            .matches
            .is_empty()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `status:not=preparation`.
fn not_a_draft(store: &Store, res_type: &str) -> crate::search::query::Condition {
    crate::search::query::Condition::Token {
        key: store
            .registry
            .get(res_type, "status")
            .map(|p| p.key.clone())
            .unwrap_or_default(),
        not: true,
        values: vec![crate::search::query::TokenValue::Code("preparation".into())],
    }
}

/// The patient the caller's side is about: a patient user themself, a RelatedPerson's or a
/// launch's patient in context.
fn patient_in_context(p: &Principal) -> Option<String> {
    p.patient
        .as_ref()
        .map(|id| format!("Patient/{id}"))
        .or_else(|| p.fhir_user.clone().filter(|u| u.starts_with("Patient/")))
}

fn is_staff(p: &Principal) -> bool {
    p.kind() == SubjectKind::Practitioner
}

fn person(
    reference: &str,
    summary: Option<&Value>,
    pool: Option<&str>,
    source: Option<&str>,
) -> Value {
    let mut part = vec![json!({"name": "reference", "valueReference": {"reference": reference}})];
    let s = summary.cloned().unwrap_or(Value::Null);
    let name = pool
        .map(String::from)
        .or_else(|| s["name"].as_str().map(String::from));
    if let Some(n) = name {
        part.push(json!({"name": "name", "valueString": n}));
    }
    if let Some(d) = s["birthDate"].as_str() {
        part.push(json!({"name": "birthDate", "valueDate": d}));
    }
    if let Some(g) = s["gender"].as_str() {
        part.push(json!({"name": "gender", "valueCode": g}));
    }
    if let Some(m) = s["mrn"].as_str() {
        part.push(json!({"name": "mrn", "valueString": m}));
    }
    let role = if pool.is_some() {
        Some("Shared inbox".to_string())
    } else {
        s["role"].as_str().map(String::from)
    };
    if let Some(r) = role {
        part.push(json!({"name": "role", "valueString": r}));
    }
    if let Some(src) = source {
        part.push(json!({"name": "source", "valueCode": src}));
    }
    json!({"name": "person", "part": part})
}

use crate::api::parameters;

/// A practitioner out of office now says so where they are named (`away`, `awayUntil`,
/// `awayReply`: their own automatic reply), so that whoever writes to them knows before sending,
/// not only from the automatic reply after (an outside walk-through's patient was told "replies
/// within 2 business days" while writing to someone away for a week).
fn mark_away(store: &Store, person: &mut Value, now: i64) -> Result<(), StoreError> {
    let Some(r) = person["part"][0]["valueReference"]["reference"]
        .as_str()
        .filter(|r| r.starts_with("Practitioner/"))
    else {
        return Ok(());
    };
    let Some(away) = super::away::away(store, r, now)? else {
        return Ok(());
    };
    if let Some(part) = person["part"].as_array_mut() {
        part.push(json!({"name": "away", "valueBoolean": true}));
        if let Some(until) = away.until {
            part.push(json!({"name": "awayUntil", "valueDateTime": until}));
        }
        part.push(json!({"name": "awayReply", "valueString": away.reply}));
    }
    Ok(())
}

/// The people of an answer, each marked when away.
fn marked(store: &Store, people: Vec<Value>) -> Result<Vec<Value>, StoreError> {
    let now = crate::clock::now_micros();
    people
        .into_iter()
        .map(|mut v| mark_away(store, &mut v, now).map(|_| v))
        .collect()
}

/// `GET /Communication/$participants`
pub async fn participants(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let result = participants_inner(&state, &req).await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        "Communication/$participants".into(),
        result,
    )
    .await
}

async fn participants_inner(state: &web::Data<AppState>, req: &HttpRequest) -> Res {
    let p = access::principal(req)?;
    let mut refs: Vec<String> = vec![];
    for (k, v) in query(req) {
        if k != "reference" {
            return Err(invalid(format!(
                "unknown parameter '{k}': $participants takes only 'reference'"
            )));
        }
        for one in v.split(',').filter(|x| !x.trim().is_empty()) {
            let r = local_ref(one, &state.settings.base_url).ok_or_else(|| {
                invalid(format!(
                    "'{one}' is not a reference to a Patient, Practitioner, PractitionerRole, RelatedPerson, Group or CareTeam (Type/id)"
                ))
            })?;
            if !refs.contains(&r) {
                refs.push(r);
            }
        }
    }
    if refs.len() > MAX_REFS {
        return Err(invalid(format!(
            "at most {MAX_REFS} references at once (got {})",
            refs.len()
        )));
    }
    let accesses = accesses(state, &p);
    if accesses.is_empty() {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not search messages, so it is told no one's name",
        ));
    }
    let store = state.store.clone();
    let pools = state.settings.message_pools.clone();
    let params = blocking(move || {
        let me = p.fhir_user.clone();
        let context = patient_in_context(&p);
        let team: BTreeSet<String> = match &context {
            Some(pt) => identity::care_team(&store, pt)?.into_iter().collect(),
            None => BTreeSet::new(),
        };
        let mut allowed = vec![];
        for r in &refs {
            let pool = pools.iter().find(|(_, g)| g == r).map(|(l, _)| l.as_str());
            // The patient's side learns no other patient or relative by name, whatever message
            // names them (a broadcast to several patients, say): only themself and their patient.
            let other_person = r.starts_with("Patient/") || r.starts_with("RelatedPerson/");
            if !is_staff(&p)
                && other_person
                && me.as_deref() != Some(r.as_str())
                && context.as_deref() != Some(r.as_str())
            {
                continue;
            }
            let ok = me.as_deref() == Some(r.as_str())
                || context.as_deref() == Some(r.as_str())
                || pool.is_some()
                || team.contains(r)
                || (is_staff(&p)
                    && (r.starts_with("Practitioner/") || r.starts_with("PractitionerRole/")))
                || named_in_visible(&store, &accesses, r)?;
            if ok {
                allowed.push((r.clone(), pool.map(String::from)));
            }
        }
        let keys: Vec<String> = allowed.iter().map(|(r, _)| r.clone()).collect();
        let summaries = identity::summaries(&store, &keys)?;
        Ok::<_, FhirError>(marked(
            &store,
            allowed
                .iter()
                .filter(|(r, pool)| pool.is_some() || summaries.contains_key(r))
                .map(|(r, pool)| person(r, summaries.get(r), pool.as_deref(), None))
                .collect(),
        )?)
    })
    .await?;
    Ok(parameters(params))
}

/// `GET /Communication/$recipients`
pub async fn recipients(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let result = recipients_inner(&state, &req).await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        "Communication/$recipients".into(),
        result,
    )
    .await
}

async fn recipients_inner(state: &web::Data<AppState>, req: &HttpRequest) -> Res {
    let p = access::principal(req)?;
    let mut asked: Option<String> = None;
    for (k, v) in query(req) {
        match k.as_str() {
            "patient" => {
                let r = local_ref(&v, &state.settings.base_url)
                    .filter(|r| r.starts_with("Patient/"))
                    .ok_or_else(|| invalid(format!("'{v}' is not a Patient reference")))?;
                asked = Some(r);
            }
            _ => {
                return Err(invalid(format!(
                    "unknown parameter '{k}': $recipients takes only 'patient'"
                )))
            }
        }
    }
    let context = patient_in_context(&p);
    // The patient's side writes about its own patient only.
    let patient_side = !is_staff(&p) && p.fhir_user.is_some();
    if patient_side && asked.is_some() && asked != context {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the patient's side asks only about its own patient",
        ));
    }
    let patient = asked.or(context.clone());
    let accesses = accesses(state, &p);
    if accesses.is_empty() {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this token may not search messages",
        ));
    }
    let store = state.store.clone();
    let pools = state.settings.message_pools.clone();
    let params = blocking(move || {
        let me = p.fhir_user.clone().unwrap_or_default();
        // A shared inbox is offered only when it reaches someone: a pool whose Group Courier
        // does not hold (or holds without members) would take a patient's message and show
        // "Sent" while no one could read it (an outside walk-through; the start logs it).
        let mut out: Vec<(String, Option<String>, &'static str)> = vec![];
        for (label, r) in &pools {
            if !super::groups::members(&store, r)?.is_empty() {
                out.push((r.clone(), Some(label.clone()), "pool"));
            }
        }
        // A staff user learns another patient's care team only for a patient they could see.
        let knows_patient = match &patient {
            Some(pt) => {
                context.as_deref() == Some(pt.as_str()) || named_in_visible(&store, &accesses, pt)?
            }
            None => false,
        };
        if let (Some(pt), true) = (&patient, knows_patient) {
            for m in identity::care_team(&store, pt)? {
                if m != me && !out.iter().any(|(r, _, _)| *r == m) {
                    out.push((m, None, "care-team"));
                }
            }
            for m in correspondents(&store, &accesses, pt)? {
                if m != me && !out.iter().any(|(r, _, _)| *r == m) {
                    out.push((m, None, "correspondent"));
                }
            }
        }
        let keys: Vec<String> = out.iter().map(|(r, _, _)| r.clone()).collect();
        let summaries = identity::summaries(&store, &keys)?;
        Ok::<_, FhirError>(marked(
            &store,
            out.iter()
                .map(|(r, pool, src)| person(r, summaries.get(r), pool.as_deref(), Some(src)))
                .collect(),
        )?)
    })
    .await?;
    Ok(parameters(params))
}

/// Practitioners who sent or received the caller-visible messages about `patient`.
fn correspondents(
    store: &Store,
    accesses: &[(&str, Access)],
    patient: &str,
) -> Result<Vec<String>, StoreError> {
    let mut found: Vec<String> = vec![];
    for (t, a) in accesses.iter().filter(|(t, _)| *t == "Communication") {
        let Some(m) = policy::mentions(&store.registry, t, patient) else {
            continue;
        };
        let mut conditions = vec![m];
        if let Access::Only(c) = a {
            conditions.push(c.clone());
        }
        let page = store.search(t, &SearchRequest::of(conditions, CORRESPONDENTS_SCANNED))?;
        for s in &page.matches {
            let Some(body) = s.body.as_deref() else {
                continue;
            };
            let Ok(v) = serde_json::from_slice::<Value>(body) else {
                continue;
            };
            let parties = std::iter::once(&v["sender"])
                .chain(v["recipient"].as_array().into_iter().flatten());
            for r in parties.filter_map(|x| x["reference"].as_str()) {
                let r = local_ref(r, &store.base_url);
                if let Some(r) = r.filter(|r| {
                    r.starts_with("Practitioner/") || r.starts_with("PractitionerRole/")
                }) {
                    if !found.contains(&r) {
                        found.push(r);
                    }
                }
            }
        }
    }
    Ok(found)
}
