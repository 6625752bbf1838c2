//! "File to chart": a clinician files a thread — its header Communication and every message that
//! is `partOf` it — to the EHR(s) that know its patient, as Communication resources, through the
//! write-back outbox (translated to the EHR's references; filing twice adds nothing).
//!
//! `POST /Communication/{id}/$file-to-chart[?ehr=NAME]`

use crate::api::AppState;
use crate::api::{audited_answer, blocking, Res};
use crate::audit::{self, Interaction};
use crate::auth::SubjectKind;
use crate::fhir::access;
use crate::fhir::outcome::{self, FhirError, FHIR_JSON};
use crate::fhir::rest::parse_search;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use diesel::sql_types::Text;
use serde_json::Value;

#[derive(diesel::QueryableByName)]
struct NameRow {
    #[diesel(sql_type = Text)]
    name: String,
}

pub async fn file_to_chart(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = file(&state, &req, &id).await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        format!("Communication/{id}"),
        result,
    )
    .await
}

async fn file(state: &web::Data<AppState>, req: &HttpRequest, id: &str) -> Res {
    let p = access::principal(req)?;
    if p.kind() != SubjectKind::Practitioner {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only a clinician may file a thread to the chart",
        ));
    }
    // Filing writes to the patient's record: it takes the right to write messages (a session
    // that reads only, before its second factor, cannot).
    access::decide(
        state,
        &p,
        "Communication",
        crate::auth::scopes::Perm::Create,
    )?;
    let thread = access::read(state, &p, "Communication", id, None).await?;
    let header: Value = serde_json::from_slice(thread.body.as_deref().unwrap_or_default())
        .map_err(|_| FhirError::internal())?;
    // The chart is the thread's subject's: no subject, no chart (never a guess from context).
    let Some(patient) = header["subject"]["reference"]
        .as_str()
        .filter(|r| r.starts_with("Patient/"))
        .map(String::from)
    else {
        return Err(FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "the thread names no patient (subject), so there is no chart to file it to",
        ));
    };
    // Every message of the thread the clinician can see, page by page; only those about the same
    // patient (a message about someone else does not go into this chart).
    let mut items = vec![("Communication".to_string(), id.to_string())];
    // Staff-only messages are filed with their label (NOPAT), and the clinician is told so.
    let mut staff_only = usize::from(crate::messaging::staff_only::is_labelled(&header));
    let mut offset = 0usize;
    loop {
        let pairs = vec![
            ("part-of".to_string(), format!("Communication/{id}")),
            ("_count".to_string(), "500".to_string()),
            ("_offset".to_string(), offset.to_string()),
        ];
        let search = parse_search(state, "Communication", &pairs, true)?;
        let page = access::search(state, &p, "Communication", search).await?;
        for s in &page.matches {
            let body: Value = serde_json::from_slice(s.body.as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            if audit::patient_of(&body).as_deref() == Some(patient.as_str()) {
                items.push(("Communication".to_string(), s.id.clone()));
                staff_only += usize::from(crate::messaging::staff_only::is_labelled(&body));
            }
        }
        if !page.has_next || page.matches.is_empty() {
            break;
        }
        offset += page.matches.len();
    }
    let wanted = form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "ehr")
        .map(|(_, v)| v.into_owned());
    let clinician = p.fhir_user.clone().unwrap_or_default();
    let store = state.store.clone();
    let n = items.len();
    let filed_to = blocking(move || {
        // Only EHRs that know both the patient and the clinician: a thread goes to the chart of an
        // organisation the clinician works in, not to every EHR that has seen the patient.
        let ehrs: Vec<NameRow> = store.query(
            "SELECT DISTINCT e.name AS name FROM identity_links l JOIN ehrs e ON e.iss = l.iss \
             JOIN identity_links u ON u.iss = l.iss AND u.courier_ref = ? \
             WHERE l.courier_ref = ? ORDER BY e.name",
            vec![clinician.into(), patient.into()],
        )?;
        let names: Vec<String> = ehrs
            .into_iter()
            .map(|r| r.name)
            .filter(|n| wanted.as_ref().is_none_or(|w| w == n))
            .collect();
        if names.is_empty() {
            return Err(FhirError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "processing",
                "no EHR knows both this patient and you (or not the one named)",
            ));
        }
        for name in &names {
            crate::smart::outbox::enqueue_filing(&store, name, &items)?;
        }
        Ok(names)
    })
    .await?;
    Ok(HttpResponse::Accepted().content_type(FHIR_JSON).body(
        outcome::information(&format!(
            "{n} Communications queued for filing to {}{}",
            filed_to.join(", "),
            match staff_only {
                0 => String::new(),
                k => format!(
                    "; {k} of them staff-only, filed with the security label NOPAT (no disclosure to the patient). \
                     A copy the EHR already holds from an earlier filing is left as it is: one filed before \
                     Courier kept labels in the chart may lack it"
                ),
            }
        ))
        .to_string(),
    ))
}
