//! Emergency access ("break the glass", HIPAA §164.312(a)(2)(ii)).
//!
//! A clinician who must read a patient's messages outside their own compartment (covering a
//! colleague in an emergency) asks for it with a reason: `POST /Patient/{id}/$emergency-access`
//! (Parameters `reason`). The grant is for that user and that patient only, read-only, and lasts
//! `COURIER_EMERGENCY_ACCESS_MINUTES` (default 60). The grant and everything the user does while
//! it lasts are audited with purpose `BTG` (HL7 v3 ActReason); `courier emergency list` shows the
//! grants for the privacy officer's review. Patients and backend services cannot break the glass
//! (a patient has their own compartment; a system client is not confined to one).

use crate::api::AppState;
use crate::api::{audit_context, audited_operation, blocking, Res};
use crate::auth::policy::{self, Access};
use crate::auth::scopes::Perm;
use crate::auth::{Principal, SubjectKind};
use crate::clock::now_micros;
use crate::fhir::outcome::{FhirError, FHIR_JSON};
use crate::search::dates::format_instant;
use crate::store::{Store, StoreError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};

/// Shortest reason accepted: a word or two is not a justification.
const MIN_REASON_CHARS: usize = 10;

#[derive(Debug, Clone)]
pub struct Grant {
    pub user_ref: String,
    pub patient: String,
    pub reason: String,
    pub granted_at: i64,
    pub expires_at: i64,
}

#[derive(QueryableByName)]
struct GrantRow {
    #[diesel(sql_type = Text)]
    user_ref: String,
    #[diesel(sql_type = Text)]
    patient: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    reason: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    granted_at: i64,
    #[diesel(sql_type = BigInt)]
    expires_at: i64,
}

fn aad(user: &str, patient: &str, at: i64) -> String {
    format!("emergency_access/{user}/{patient}/{at}")
}

#[derive(QueryableByName)]
struct PatientRow {
    #[diesel(sql_type = Text)]
    patient: String,
}

/// The patients `p` holds an active grant for (practitioners only).
pub fn active(store: &Store, p: &Principal) -> Result<Vec<String>, StoreError> {
    active_on(store, &mut store.db.get()?, p)
}

/// [`active`] on a connection the caller holds.
pub fn active_on(
    store: &Store,
    c: &mut crate::store::db::PooledConn,
    p: &Principal,
) -> Result<Vec<String>, StoreError> {
    if p.kind() != SubjectKind::Practitioner {
        return Ok(vec![]);
    }
    let Some(user) = &p.fhir_user else {
        return Ok(vec![]);
    };
    let rows: Vec<PatientRow> = store.query_on(
        c,
        "SELECT DISTINCT patient FROM emergency_access WHERE user_ref = ? AND expires_at > ?",
        vec![user.clone().into(), now_micros().into()],
    )?;
    Ok(rows.into_iter().map(|r| r.patient).collect())
}

/// Grants `user` read access to `patient` for `minutes`; returns when it ends.
pub fn grant(
    store: &Store,
    user: &str,
    patient: &str,
    reason: &str,
    minutes: i64,
) -> Result<i64, StoreError> {
    let now = now_micros();
    let until = now + minutes * 60_000_000;
    let (key_id, sealed) = store.keys.seal(reason.as_bytes(), &aad(user, patient, now));
    store.execute(
        "INSERT INTO emergency_access (user_ref, patient, key_id, reason, granted_at, expires_at) VALUES (?, ?, ?, ?, ?, ?)",
        vec![user.into(), patient.into(), key_id.into(), crate::store::db::Bind::Blob(sealed), now.into(), until.into()],
    )?;
    Ok(until)
}

/// Every grant since `since` (microseconds), newest first.
pub fn list(store: &Store, since: i64) -> Result<Vec<Grant>, StoreError> {
    let rows: Vec<GrantRow> = store.query(
        "SELECT user_ref, patient, key_id, reason, granted_at, expires_at FROM emergency_access WHERE granted_at >= ? ORDER BY granted_at DESC",
        vec![since.into()],
    )?;
    rows.into_iter()
        .map(|r| {
            let reason = store
                .open_sealed(
                    &r.key_id,
                    &r.reason,
                    &aad(&r.user_ref, &r.patient, r.granted_at),
                )
                .map_err(StoreError::Other)?;
            Ok(Grant {
                reason: String::from_utf8_lossy(&reason).into_owned(),
                user_ref: r.user_ref,
                patient: r.patient,
                granted_at: r.granted_at,
                expires_at: r.expires_at,
            })
        })
        .collect()
}

pub async fn request(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> HttpResponse {
    let id = path.into_inner();
    let mut ctx = audit_context(&req, &state);
    // The grant itself is the first act under it.
    ctx.emergency = true;
    let result: Res = async {
        let p = crate::fhir::access::principal(&req)?;
        let reads_messages = matches!(
            policy::decide(&p, &state.store.registry, &state.settings.base_url, "Communication", Perm::Read),
            Ok(Access::Only(_))
        );
        if p.kind() != SubjectKind::Practitioner || !reads_messages {
            return Err(FhirError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "emergency access is for clinicians (a practitioner's token that reads Communication)",
            ));
        }
        if !fhir_codec::is_valid_id(&id) {
            return Err(FhirError::bad_request("not a valid Patient id"));
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|_| FhirError::bad_request("the body must be a Parameters resource (JSON)"))?;
        let reason = (v["resourceType"] == "Parameters")
            .then(|| {
                v["parameter"].as_array().and_then(|ps| {
                    ps.iter()
                        .find(|p| p["name"] == "reason")
                        .and_then(|p| p["valueString"].as_str())
                })
            })
            .flatten()
            .map(str::trim)
            .unwrap_or_default()
            .to_string();
        if reason.chars().count() < MIN_REASON_CHARS {
            return Err(FhirError::new(
                StatusCode::BAD_REQUEST,
                "required",
                format!("Parameters.reason (valueString, at least {MIN_REASON_CHARS} characters) must say why emergency access is needed"),
            ));
        }
        let user = p.fhir_user.clone().unwrap_or_default();
        let (store, pid, minutes) = (state.store.clone(), id.clone(), state.settings.emergency_access_minutes);
        let until = blocking(move || Ok(grant(&store, &user, &pid, &reason, minutes)?)).await?;
        let body = json!({
            "resourceType": "Parameters",
            "parameter": [
                {"name": "patient", "valueReference": {"reference": format!("Patient/{id}")}},
                {"name": "expires", "valueInstant": format_instant(until)},
            ]
        });
        Ok(HttpResponse::Ok().content_type(FHIR_JSON).body(body.to_string()))
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
