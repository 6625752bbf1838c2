//! Staff-only conversations: the HL7 security label `NOPAT` ("no disclosure to patient, family or
//! caregivers") on messages that no patient takes part in.
//!
//! A clinician who writes to a colleague *about* a patient puts the patient in `subject`, and R4's
//! Patient compartment would then show the message to that patient. So, on every write of a
//! Communication or CommunicationRequest, whatever the path (REST, Bundle entry, scheduled send):
//! - a message whose participants — sender and recipients (a CommunicationRequest: also its
//!   requester), Groups and CareTeams expanded to their members — include no Patient and no
//!   RelatedPerson is **staff-only** and is labelled `NOPAT` in `meta.security` (a client may set
//!   the label itself);
//! - a message `partOf` (or `inResponseTo`) a staff-only message inherits the label, and a new
//!   version of a labelled message keeps it;
//! - a labelled message that names a patient or RelatedPerson as a participant is refused (422):
//!   a staff-only thread cannot be opened to a patient; start a new thread.
//!
//! The access policy (`auth::policy`) hides labelled resources from patient and RelatedPerson
//! tokens on every path; this module only decides the label.

use crate::store::{Store, StoreError};
use serde_json::{json, Value};

/// The HL7 v3 ActCode system of the `NOPAT` label.
pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
pub const NOPAT: &str = "NOPAT";

/// Does `v` carry the `NOPAT` label?
pub fn is_labelled(v: &Value) -> bool {
    v["meta"]["security"].as_array().is_some_and(|a| {
        a.iter()
            .any(|c| c["system"] == ACT_CODE && c["code"] == NOPAT)
    })
}

/// Adds the `NOPAT` label to `v` (once).
pub fn add_label(v: &mut Value) {
    if is_labelled(v) {
        return;
    }
    let label = json!({"system": ACT_CODE, "code": NOPAT,
        "display": "no disclosure to patient, family or caregivers without attending provider's authorization"});
    if !v["meta"].is_object() {
        v["meta"] = json!({});
    }
    match v["meta"]["security"].as_array_mut() {
        Some(a) => a.push(label),
        None => v["meta"]["security"] = json!([label]),
    }
}

/// The resource type a reference names (`Patient` in `Patient/1`, `https://ehr/fhir/Patient/1`,
/// or `{"type": "Patient", "identifier": …}`), if it names one.
pub fn referenced_type(r: &Value) -> Option<String> {
    if let Some(s) = r["reference"].as_str() {
        let s = s.split(['?', '#']).next().unwrap_or_default();
        let parts: Vec<&str> = s.trim_end_matches('/').rsplit('/').collect();
        // `Type/id` or `…/Type/id` or `…/Type/id/_history/n`.
        let t = match parts.as_slice() {
            [_, "_history", _, t, ..] => Some(*t),
            [_, t, ..] => Some(*t),
            _ => None,
        };
        if let Some(t) = t.filter(|t| t.chars().next().is_some_and(|c| c.is_ascii_uppercase())) {
            return Some(t.to_string());
        }
    }
    r["type"].as_str().map(String::from)
}

/// The participants of a message: its sender and recipients (a CommunicationRequest's requester
/// too), as the reference elements written.
pub fn participants<'a>(res_type: &str, v: &'a Value) -> Vec<(String, &'a Value)> {
    let mut out = vec![];
    if !v["sender"].is_null() {
        out.push((format!("{res_type}.sender"), &v["sender"]));
    }
    if res_type == "CommunicationRequest" && !v["requester"].is_null() {
        out.push((format!("{res_type}.requester"), &v["requester"]));
    }
    for (i, r) in v["recipient"].as_array().into_iter().flatten().enumerate() {
        out.push((format!("{res_type}.recipient[{i}]"), r));
    }
    out
}

/// A person on the patient's side: a Patient or a RelatedPerson.
pub fn is_patient_side(res_type: &str) -> bool {
    matches!(res_type, "Patient" | "RelatedPerson")
}

/// Everyone a message reaches on the patient's side, as `Type/id` (local references; a Group or
/// CareTeam expanded one level), with the element that names them. Blocking.
pub fn patient_side_participants(
    store: &Store,
    res_type: &str,
    v: &Value,
) -> Result<Vec<(String, String)>, StoreError> {
    let base = &store.base_url;
    let mut out = vec![];
    for (path, r) in participants(res_type, v) {
        let Some(t) = referenced_type(r) else {
            continue;
        };
        let local = r["reference"]
            .as_str()
            .map(|s| super::hub::local_ref(s, base))
            .unwrap_or_else(|| format!("{t}/?"));
        if is_patient_side(&t) {
            out.push((path, local));
        } else if matches!(t.as_str(), "Group" | "CareTeam") {
            for m in super::groups::members(store, &local)? {
                if m.split_once('/').is_some_and(|(mt, _)| is_patient_side(mt)) {
                    out.push((path.clone(), m));
                }
            }
        }
    }
    Ok(out)
}

/// Why a message could not be labelled: the element and a sentence for the OperationOutcome.
#[derive(Debug)]
pub struct Refused {
    pub expression: String,
    pub message: String,
}

/// Decides the label of a Communication or CommunicationRequest about to be written, and adds it
/// when the message is staff-only. `inherited`: the thread it belongs to, or the version it
/// replaces, is staff-only. Blocking (a Group recipient is expanded from the store). The inner
/// `Err` is a refusal for the writer; the outer one a store failure.
pub fn label(
    store: &Store,
    res_type: &str,
    v: &mut Value,
    inherited: bool,
) -> Result<Result<(), Refused>, StoreError> {
    if !matches!(res_type, "Communication" | "CommunicationRequest") {
        return Ok(Ok(()));
    }
    let patients = patient_side_participants(store, res_type, v)?;
    let staff_only = inherited || is_labelled(v) || patients.is_empty();
    if !staff_only {
        return Ok(Ok(()));
    }
    if let Some((path, _)) = patients.first() {
        let why = if inherited {
            "this message belongs to a staff-only conversation (security label NOPAT), which cannot include a patient or RelatedPerson: start a new conversation with them"
        } else {
            "a message labelled staff-only (NOPAT) cannot include a patient or RelatedPerson"
        };
        return Ok(Err(Refused {
            expression: path.clone(),
            message: why.into(),
        }));
    }
    add_label(v);
    Ok(Ok(()))
}

/// Labels a message Courier writes itself (a scheduled send, an away reply or forward, an
/// escalation) from `source`, the message or request it comes from: staff-only when the source
/// is, or when no patient takes part. Never refuses: a derived message that cannot be told apart
/// is labelled (hidden from patients) rather than shown. Blocking.
pub fn label_derived(store: &Store, res_type: &str, v: &mut Value, source: &Value) {
    if is_labelled(source) {
        add_label(v);
        return;
    }
    match label(store, res_type, v, false) {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => add_label(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn referenced_types_are_read_from_relative_absolute_and_typed_references() {
        for (r, t) in [
            (json!({"reference": "Patient/1"}), Some("Patient")),
            (
                json!({"reference": "https://ehr.example/fhir/RelatedPerson/9"}),
                Some("RelatedPerson"),
            ),
            (
                json!({"reference": "Practitioner/1/_history/2"}),
                Some("Practitioner"),
            ),
            (
                json!({"type": "Patient", "identifier": {"value": "x"}}),
                Some("Patient"),
            ),
            (json!({"display": "someone"}), None),
        ] {
            assert_eq!(referenced_type(&r).as_deref(), t, "{r}");
        }
    }

    #[test]
    fn the_label_is_added_once_beside_other_labels() {
        let mut v = json!({"resourceType": "Communication", "meta": {"security": [{"system": "x", "code": "R"}]}});
        add_label(&mut v);
        add_label(&mut v);
        assert!(is_labelled(&v));
        assert_eq!(v["meta"]["security"].as_array().unwrap().len(), 2);
    }
}
