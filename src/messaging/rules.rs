//! Messaging rules applied to every write body, whatever the path (REST create, update, patch,
//! Bundle entry), before the access policy:
//! - an attachment (`Binary`) must have one of the configured content types;
//! - a patient's new conversation (a message with no `partOf`) carries a category, and a patient's
//!   message stays within the configured length (patient-portal guardrails; that a patient cannot address another patient is the access policy's).

use crate::auth::{Principal, SubjectKind};
use crate::config::Settings;
use crate::fhir::outcome::FhirError;
use actix_web::http::StatusCode;
use serde_json::Value;

/// The Courier CodeSystem of message categories offered to patients.
pub const CATEGORY_SYSTEM: &str = "https://courier.example.org/fhir/CodeSystem/message-category";

/// The categories the web app offers patients (any coding satisfies the rule).
pub const PATIENT_CATEGORIES: &[(&str, &str)] = &[
    ("question", "A question for my care team"),
    ("appointment", "Appointments"),
    ("prescription", "Prescriptions and refills"),
    ("results", "Test results"),
    ("billing", "Billing and insurance"),
    ("other", "Something else"),
];

pub fn check(
    settings: &Settings,
    p: &Principal,
    res_type: &str,
    body: &Value,
) -> Result<(), FhirError> {
    if res_type == "Communication" {
        own_sender(settings, p, body)?;
    }
    match res_type {
        "Binary" => attachment_type(settings, body),
        "Communication" if p.kind() == SubjectKind::Patient => patient_message(settings, body),
        _ => Ok(()),
    }
}

/// A user writes messages as themself: `sender`, when given, is the signed-in user. (Receipts
/// and drafts belong to the sender, so a sender nobody checked would hand them to anyone.)
fn own_sender(settings: &Settings, p: &Principal, body: &Value) -> Result<(), FhirError> {
    let (Some(me), Some(sender)) = (&p.fhir_user, body["sender"]["reference"].as_str()) else {
        return Ok(());
    };
    if p.kind() == SubjectKind::System || super::hub::local_ref(sender, &settings.base_url) == *me {
        return Ok(());
    }
    Err(FhirError::at(
        StatusCode::FORBIDDEN,
        "forbidden",
        "Communication.sender",
        format!("a message is sent as the signed-in user: sender must be {me}"),
    ))
}

fn attachment_type(settings: &Settings, body: &Value) -> Result<(), FhirError> {
    let declared = body["contentType"].as_str().unwrap_or_default();
    let essence = declared
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if settings.attachment_types.contains(&essence) {
        return Ok(());
    }
    Err(FhirError::at(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "not-supported",
        "Binary.contentType",
        format!(
            "attachments of type '{essence}' are not accepted; accepted types: {}",
            settings.attachment_types.join(", ")
        ),
    ))
}

fn patient_message(settings: &Settings, body: &Value) -> Result<(), FhirError> {
    // A new conversation says what it is about (for triage); a reply belongs to its thread.
    let starts_thread = body["partOf"].as_array().is_none_or(|a| a.is_empty());
    let has_category = !starts_thread
        || body["category"].as_array().is_some_and(|c| {
            c.iter().any(|cc| {
                cc["coding"].as_array().is_some_and(|x| !x.is_empty()) || cc["text"].is_string()
            })
        });
    if !has_category {
        return Err(FhirError::at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "required",
            "Communication.category",
            "a conversation started by a patient needs a category (what it is about)",
        ));
    }
    let mut total = 0usize;
    for (i, part) in body["payload"].as_array().into_iter().flatten().enumerate() {
        if let Some(text) = part["contentString"].as_str() {
            total += text.chars().count();
            if total > settings.patient_max_message_chars {
                return Err(FhirError::at(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "too-long",
                    format!("Communication.payload[{i}].contentString"),
                    format!(
                        "a message from a patient may be at most {} characters long",
                        settings.patient_max_message_chars
                    ),
                ));
            }
        }
    }
    Ok(())
}
