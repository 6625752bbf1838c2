//! Messaging rules applied to every write body, whatever the path (REST create, update, patch,
//! Bundle entry), before the access policy:
//! - an attachment (`Binary`) must have one of the configured content types;
//! - a user writes as themself: `Communication.sender`, `CommunicationRequest.requester` and
//!   `.sender`, when given, are the signed-in user (a system client excepted); a user's
//!   CommunicationRequest without either gets the user as requester, so the scheduler later sends
//!   it as the author verified here;
//! - a patient's new conversation (a message with no `partOf`, or a scheduled message, which is
//!   sent as a new conversation) carries a category, and a patient's message — sent now or
//!   scheduled — stays within the configured length (patient-portal guardrails; that a patient
//!   cannot address another patient is the access policy's).
//!
//! [`prepare`] then checks what a message points at and labels it (see [`super::staff_only`]), and
//! keeps Courier's own identifiers (a scheduled send's, a reminder's) out of clients' hands:
//! a thread (`partOf`, `inResponseTo`) must be one the writer can see; a Group or CareTeam a patient
//! writes to must not reach another patient; a staff-only thread stays staff-only.

use crate::api::blocking;
use crate::api::AppState;
use crate::auth::policy;
use crate::auth::scopes::Perm;
use crate::auth::{Principal, SubjectKind};
use crate::config::Settings;
use crate::fhir::access;
use crate::fhir::outcome::FhirError;
use actix_web::http::StatusCode;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;

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
    match res_type {
        "Communication" => own_reference(settings, p, body, res_type, "sender")?,
        "CommunicationRequest" => {
            own_reference(settings, p, body, res_type, "requester")?;
            own_reference(settings, p, body, res_type, "sender")?;
        }
        _ => {}
    }
    // An app in a patient's context with no user writes for the patient, under the same rules.
    let patient_side = matches!(p.kind(), SubjectKind::Patient | SubjectKind::RelatedPerson)
        || (p.kind() == SubjectKind::System && policy::patient_bound(p, res_type).is_some());
    if matches!(res_type, "Communication" | "CommunicationRequest") {
        reference_types(settings, res_type, body)?;
        attachment_titles(res_type, body)?;
        inline_attachments(settings, res_type, body)?;
    }
    match res_type {
        "PractitionerRole" => {
            super::away::check_delegate(body, &settings.base_url).map_err(|at| {
                FhirError::at(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "business-rule",
                    at,
                    "an out-of-office delegate must be a Practitioner or PractitionerRole of this server: the delegate is sent a copy of every message to the one away",
                )
            })?;
            super::away::check_size(body).map_err(|(at, why)| {
                FhirError::at(StatusCode::UNPROCESSABLE_ENTITY, "business-rule", at, why)
            })
        }
        "Binary" => {
            attachment_type(settings, body)?;
            attachment_content(body)
        }
        "Communication" if patient_side => patient_message(settings, body),
        "CommunicationRequest" if patient_side => patient_request(settings, body),
        _ => Ok(()),
    }
}

/// The parties of a message name what R4 allows them to (a `recipient` that is a `Binary` or a
/// `Communication` is no one to send to: an outside probe's was accepted). 400 naming the element.
fn reference_types(settings: &Settings, res_type: &str, body: &Value) -> Result<(), FhirError> {
    const PEOPLE: &[&str] = &[
        "Device",
        "Organization",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
    ];
    let allowed = |element: &str| -> Vec<&str> {
        let mut t = PEOPLE.to_vec();
        match element {
            "subject" => return vec!["Patient", "Group"],
            "recipient" => t.extend(["Group", "CareTeam", "HealthcareService"]),
            "sender" => t.push("HealthcareService"),
            _ => {}
        }
        t
    };
    let elements: &[&str] = match res_type {
        "CommunicationRequest" => &["subject", "sender", "recipient", "requester"],
        _ => &["subject", "sender", "recipient"],
    };
    for element in elements {
        let refs: Vec<(String, &Value)> = match &body[*element] {
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("{res_type}.{element}[{i}]"), r))
                .collect(),
            Value::Null => vec![],
            r => vec![(format!("{res_type}.{element}"), r)],
        };
        for (at, r) in refs {
            let Some(parts) = r["reference"]
                .as_str()
                .and_then(|s| crate::search::index::parse_reference(s, &settings.base_url))
            else {
                continue;
            };
            if let Some(t) = parts.target_type.as_deref() {
                let ok = allowed(element);
                if !ok.contains(&t) {
                    return Err(FhirError::at(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        format!("{at}.reference"),
                        format!("{at} may name a {}, not a {t}", ok.join(", ")),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Whom `p` writes `res_type` as: the signed-in user; for an app in a patient's context with no
/// user (no fhirUser) that writes only from the patient's side, the patient (`Patient/` alone,
/// matching no one, when no patient is known); `None` for a system client, which may write in
/// anyone's name.
pub fn acting_as(p: &Principal, res_type: &str) -> Option<String> {
    if let Some(u) = &p.fhir_user {
        return Some(u.clone());
    }
    policy::patient_bound(p, res_type).map(|pt| format!("Patient/{pt}"))
}

/// A user writes messages as themself: `element` (`sender`, `requester`), when given, is the
/// signed-in user. (Receipts, drafts and scheduled sends belong to their author, so an author
/// nobody checked would hand them to anyone, or put words in a colleague's name.)
fn own_reference(
    settings: &Settings,
    p: &Principal,
    body: &Value,
    res_type: &str,
    element: &str,
) -> Result<(), FhirError> {
    let Some(me) = acting_as(p, res_type) else {
        return Ok(());
    };
    if body.get(element).is_none() {
        return Ok(());
    }
    let given = body[element]["reference"].as_str();
    if given.is_some_and(|r| super::hub::local_ref(r, &settings.base_url) == me) {
        return Ok(());
    }
    Err(FhirError::at(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{res_type}.{element}"),
        format!("a user writes as themself: {element} must be {me}"),
    ))
}

/// A content type's essence (`image/png` of `Image/PNG; charset=binary`).
fn essence(body: &Value) -> String {
    let declared = body["contentType"].as_str().unwrap_or_default();
    declared
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

fn attachment_type(settings: &Settings, body: &Value) -> Result<(), FhirError> {
    let essence = essence(body);
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

/// What a withdrawn message loses: every element that can carry its words (an outside probe
/// read a withdrawn message's topic, notes, reasons and narrative after the payload was gone).
/// What a withdrawn message keeps: who, when, which thread, how urgent — nothing that holds
/// words. Everything else goes (payload, notes, topic, reasons, narrative, contained copies, and
/// also extensions, displays, texts and identifiers, where an outside probe still read the
/// words after the first version of this rule).
const KEPT_WHEN_WITHDRAWN: &[&str] = &[
    "resourceType",
    "id",
    "meta",
    "identifier",
    "status",
    "statusReason",
    "category",
    "priority",
    "medium",
    "subject",
    "sender",
    "recipient",
    "partOf",
    "inResponseTo",
    "basedOn",
    "encounter",
    "sent",
    "received",
    "extension",
];

/// `body` as withdrawn: only [`KEPT_WHEN_WITHDRAWN`], and of those only what holds no words —
/// references without display, identifier or extension; codes without text or display;
/// labels as system and code; Courier's own identifiers and its own extensions that are not
/// text. Its author and compliance keep the earlier versions.
pub(crate) fn recall(body: &mut Value) {
    /// `v`'s members `keys` that it has (none: `None`).
    fn pick(v: &Value, keys: &[&str]) -> Option<Value> {
        let o: serde_json::Map<String, Value> = keys
            .iter()
            .filter_map(|k| v.get(*k).map(|x| (k.to_string(), x.clone())))
            .collect();
        (!o.is_empty()).then_some(Value::Object(o))
    }
    fn reference(v: &Value) -> Option<Value> {
        pick(v, &["reference"])
    }
    fn codes(v: &Value) -> Option<Value> {
        let codings: Vec<Value> = v["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| pick(c, &["system", "code"]))
            .collect();
        (!codings.is_empty()).then(|| json!({"coding": codings}))
    }
    fn each(v: &Value, f: fn(&Value) -> Option<Value>) -> Option<Value> {
        let kept: Vec<Value> = v.as_array()?.iter().filter_map(f).collect();
        (!kept.is_empty()).then_some(Value::Array(kept))
    }
    let Some(o) = body.as_object_mut() else {
        return;
    };
    o.retain(|k, _| KEPT_WHEN_WITHDRAWN.contains(&k.as_str()));
    let keys: Vec<String> = o.keys().cloned().collect();
    for k in keys {
        let v = o[&k].clone();
        let kept = match k.as_str() {
            "resourceType" | "id" | "status" | "priority" | "sent" | "received" => Some(v),
            "subject" | "sender" | "encounter" => reference(&v),
            "recipient" | "partOf" | "inResponseTo" | "basedOn" => each(&v, reference),
            "statusReason" => codes(&v),
            "category" | "medium" => each(&v, codes),
            "identifier" => each(&v, |i| {
                let own = [
                    super::schedule::IDENTIFIER_SYSTEM,
                    super::escalation::IDENTIFIER_SYSTEM,
                ];
                own.contains(&i["system"].as_str().unwrap_or(""))
                    .then(|| pick(i, &["system", "value"]))
                    .flatten()
            }),
            "extension" => each(&v, |e| {
                let own = e["url"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("https://courier.example.org/"));
                let wordless = e.as_object().is_some_and(|x| {
                    x.iter().all(|(k, v)| {
                        k == "url"
                            || (k.starts_with("value")
                                && !matches!(k.as_str(), "valueString" | "valueMarkdown")
                                && !v.is_object()
                                && !v.is_array())
                    })
                });
                (own && wordless).then(|| e.clone())
            }),
            "meta" => {
                let mut m = serde_json::Map::new();
                for key in ["versionId", "lastUpdated", "profile"] {
                    if let Some(x) = v.get(key) {
                        m.insert(key.into(), x.clone());
                    }
                }
                for key in ["security", "tag"] {
                    let labels: Vec<Value> = v[key]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|c| pick(c, &["system", "code"]))
                        .collect();
                    if !labels.is_empty() {
                        m.insert(key.into(), Value::Array(labels));
                    }
                }
                (!m.is_empty()).then_some(Value::Object(m))
            }
            _ => None,
        };
        match kept {
            Some(x) => {
                o.insert(k, x);
            }
            None => {
                o.remove(&k);
            }
        }
    }
}

/// Text-direction controls (embeddings, overrides, isolates) that make a file name read
/// otherwise than it is: `report\u{202E}fdp.exe` shows as `reportexe.pdf` (an outside
/// walk-through sent one, and the clinician's app offered an executable as a PDF).
const DIRECTION_CONTROLS: &[char] = &[
    '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}',
    '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}',
];

/// An attachment's file name has no text-direction controls.
fn attachment_titles(res_type: &str, body: &Value) -> Result<(), FhirError> {
    for (i, p) in body["payload"].as_array().into_iter().flatten().enumerate() {
        let title = p["contentAttachment"]["title"].as_str().unwrap_or_default();
        if title.contains(DIRECTION_CONTROLS) {
            return Err(FhirError::at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "value",
                format!("{res_type}.payload[{i}].contentAttachment.title"),
                "a file name may not contain text-direction control characters (U+202A–U+202E, U+2066–U+2069, U+200E, U+200F, U+061C): they make it read as another name",
            ));
        }
    }
    Ok(())
}

/// What the bytes of an attachment of `essence` start with, for the types whose format says so;
/// `None` for a type that has no such mark (or is not known here).
fn content_matches(essence: &str, data: &[u8]) -> Option<bool> {
    Some(match essence {
        "application/pdf" => data.starts_with(b"%PDF-"),
        "image/png" => data.starts_with(b"\x89PNG\r\n\x1a\n"),
        "image/jpeg" => data.starts_with(&[0xFF, 0xD8, 0xFF]),
        "image/gif" => data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a"),
        "image/webp" => data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP",
        "image/heic" => {
            data.len() >= 12
                && &data[4..8] == b"ftyp"
                && [
                    &b"heic"[..],
                    b"heix",
                    b"hevc",
                    b"hevx",
                    b"heim",
                    b"heis",
                    b"mif1",
                    b"msf1",
                ]
                .contains(&&data[8..12])
        }
        // Text: UTF-8 without NUL bytes (an executable or an archive is neither).
        "text/plain" => std::str::from_utf8(data).is_ok_and(|t| !t.contains('\0')),
        _ => return None,
    })
}

/// An attachment inside a message is held to a Binary's rules: its declared type one of the
/// accepted ones, its inline bytes what that type says; a contained Binary is a Binary (an
/// outside probe sent an executable inline as `application/pdf`, one as
/// `application/x-msdownload`, and a contained Binary, all accepted).
fn inline_attachments(settings: &Settings, res_type: &str, body: &Value) -> Result<(), FhirError> {
    for (i, p) in body["payload"].as_array().into_iter().flatten().enumerate() {
        let a = &p["contentAttachment"];
        if !a.is_object() {
            continue;
        }
        let at = format!("{res_type}.payload[{i}].contentAttachment");
        if let Some(ct) = a["contentType"].as_str() {
            attachment_type(settings, &json!({"contentType": ct}))
                .map_err(|e| e.at_path(&format!("{at}.contentType")))?;
        }
        if a.get("data").is_some() {
            let ct = a["contentType"].as_str().unwrap_or_default();
            if ct.is_empty() {
                return Err(FhirError::at(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "required",
                    format!("{at}.contentType"),
                    "an attachment with data says what type it is",
                ));
            }
            attachment_content(&json!({"contentType": ct, "data": a["data"]}))
                .map_err(|e| e.at_path(&format!("{at}.data")))?;
        }
    }
    for (i, c) in body["contained"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if c["resourceType"] == "Binary" {
            attachment_type(settings, c)
                .and_then(|()| attachment_content(c))
                .map_err(|e| e.at_path(&format!("{res_type}.contained[{i}]")))?;
        }
    }
    Ok(())
}

/// A Binary's bytes are what its content type says (an outside walk-through sent a Windows
/// executable declared `application/pdf`, and a PNG that was not one).
fn attachment_content(body: &Value) -> Result<(), FhirError> {
    let Some(data) = body["data"].as_str() else {
        return Ok(());
    };
    let essence = essence(body);
    // As any decoder reading it later would: line breaks and missing padding allowed (an
    // executable wrapped at 76 columns must not pass as "not base64, so not checked").
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let Ok(bytes) = lenient.decode(compact.as_bytes()) else {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "value",
            "Binary.data",
            "data is not base64",
        ));
    };
    if content_matches(&essence, &bytes) == Some(false) {
        return Err(FhirError::at(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "Binary.data",
            format!("the content is not {essence}, as its contentType says: send the file as its own type"),
        ));
    }
    Ok(())
}

fn patient_message(settings: &Settings, body: &Value) -> Result<(), FhirError> {
    // A new conversation says what it is about (for triage); a reply belongs to its thread.
    let starts_thread = body["partOf"].as_array().is_none_or(|a| a.is_empty());
    if starts_thread {
        categorised("Communication", body)?;
    }
    patient_text(settings, "Communication", body)
}

/// A patient's scheduled message: the scheduler sends it as a new conversation (it has no
/// thread), so an active one says what it is about, as a new conversation sent at once must
/// (revoking or holding an older request without one stays possible).
fn patient_request(settings: &Settings, body: &Value) -> Result<(), FhirError> {
    if body["status"] == "active" {
        categorised("CommunicationRequest", body)?;
    }
    patient_text(settings, "CommunicationRequest", body)
}

/// A category with a coding or a text (any system: for triage).
fn categorised(res_type: &str, body: &Value) -> Result<(), FhirError> {
    let has_category = body["category"].as_array().is_some_and(|c| {
        c.iter().any(|cc| {
            cc["coding"].as_array().is_some_and(|x| !x.is_empty()) || cc["text"].is_string()
        })
    });
    if has_category {
        return Ok(());
    }
    Err(FhirError::at(
        StatusCode::UNPROCESSABLE_ENTITY,
        "required",
        format!("{res_type}.category"),
        "a conversation started by a patient needs a category (what it is about)",
    ))
}

/// A patient's message text, sent now or scheduled, stays within the configured length.
fn patient_text(settings: &Settings, res_type: &str, body: &Value) -> Result<(), FhirError> {
    let mut total = 0usize;
    for (i, part) in body["payload"].as_array().into_iter().flatten().enumerate() {
        if let Some(text) = part["contentString"].as_str() {
            total += text.chars().count();
            if total > settings.patient_max_message_chars {
                return Err(FhirError::at(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "too-long",
                    format!("{res_type}.payload[{i}].contentString"),
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

/// The version an update replaces, as the writer may see it (`None` when they may not: then
/// the access guard answers 404, so nothing here says anything about a hidden version). A
/// failure to read (503) is the write's.
async fn replaced_version(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    id: &str,
) -> Result<Option<Value>, FhirError> {
    match access::read(state, p, res_type, id, None).await {
        Ok(s) => Ok(serde_json::from_slice(s.body.as_deref().unwrap_or_default()).ok()),
        Err(e) if e.status.is_client_error() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Courier's own identifiers on the stored version, for a system client that may update what
/// it cannot read: compared with what is stored.
async fn stored_marks(
    state: &AppState,
    res_type: &str,
    id: &str,
) -> Result<Vec<(String, String)>, FhirError> {
    let (store, rt, id) = (state.store.clone(), res_type.to_string(), id.to_string());
    let stored = match blocking(move || Ok(store.read(&rt, &id))).await? {
        Ok(s) => s,
        Err(crate::store::StoreError::NotFound(..) | crate::store::StoreError::Gone(..)) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e.into()),
    };
    Ok(
        serde_json::from_slice::<Value>(stored.body.as_deref().unwrap_or_default())
            .map(|v| courier_marks(&v))
            .unwrap_or_default(),
    )
}

/// The identifiers in Courier's own systems (a scheduled send's, a reminder's), sorted.
fn courier_marks(body: &Value) -> Vec<(String, String)> {
    let mut marks: Vec<(String, String)> = body["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            let system = i["system"].as_str()?;
            [
                super::schedule::IDENTIFIER_SYSTEM,
                super::escalation::IDENTIFIER_SYSTEM,
            ]
            .contains(&system)
            .then(|| {
                (
                    system.to_string(),
                    i["value"].as_str().unwrap_or_default().to_string(),
                )
            })
        })
        .collect();
    marks.sort();
    marks
}

/// What else a person's message could say of who wrote or approved it, taken out (an attacker
/// probe: a patient's message carried `note.authorReference` to a clinician with "approved by me –
/// stop warfarin", an on-behalf-of extension and a narrative, and filing it to the chart wrote
/// them into the EHR's record for that clinician): the narrative (`text`; Courier's readers show
/// the payload), a note's author, extensions but Courier's own and the time zone, and the
/// `display` of every reference (Courier names people and resources from its own records).
fn unclaimed(body: &mut Value) {
    let Some(o) = body.as_object_mut() else {
        return;
    };
    o.remove("text");
    for note in o
        .get_mut("note")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
    {
        note.retain(|k, _| !k.starts_with("author") && k != "_authorString");
    }
    // Everywhere but in contained resources (checked as resources of their own).
    fn walk(v: &mut Value) {
        match v {
            Value::Object(m) => {
                if m.contains_key("reference") {
                    m.remove("display");
                    m.remove("_display");
                }
                if let Some(ext) = m.get_mut("extension").and_then(Value::as_array_mut) {
                    ext.retain(|e| {
                        e["url"].as_str().is_some_and(|u| {
                            u.starts_with("https://courier.example.org/")
                                || u == crate::messaging::timing::EXT_TZ
                        })
                    });
                    if ext.is_empty() {
                        m.remove("extension");
                    }
                }
                for (k, x) in m.iter_mut() {
                    if k != "contained" {
                        walk(x);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(body);
}

/// A message (or request) about a patient is never sent to or from another patient: every
/// Patient among its parties is its subject. (Addressed to the wrong patient, it would put one
/// patient's matter — and, through the app, their name and MRN — in another's portal.)
fn about_one_patient(body: &Value, base: &str) -> Result<(), FhirError> {
    let Some(subject) = body["subject"]["reference"]
        .as_str()
        .map(|r| super::hub::local_ref(r, base))
        .filter(|r| r.starts_with("Patient/"))
    else {
        return Ok(());
    };
    let parties = std::iter::once(&body["sender"])
        .chain(std::iter::once(&body["requester"]))
        .chain(body["recipient"].as_array().into_iter().flatten());
    for party in parties {
        let Some(r) = party["reference"]
            .as_str()
            .map(|r| super::hub::local_ref(r, base))
        else {
            continue;
        };
        if r.starts_with("Patient/") && r != subject {
            return Err(FhirError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                format!("this message is about {subject}; it cannot be sent to or from another patient ({r})"),
            ));
        }
    }
    Ok(())
}

/// Checks what a Communication or CommunicationRequest about to be written points at, and
/// labels it (see [`super::staff_only`]); called after [`check`] and the access policy on every
/// REST and Bundle write of a message. `replaces`: the id of the version an update replaces.
/// `fresh`: messages written earlier in the same transaction, with whether each is staff-only.
pub async fn prepare(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    body: &mut Value,
    replaces: Option<&str>,
    fresh: &HashMap<String, bool>,
) -> Result<(), FhirError> {
    if !matches!(res_type, "Communication" | "CommunicationRequest") {
        return Ok(());
    }
    let base = &state.settings.base_url;
    // A user's request without an author is theirs: the scheduler sends as the author.
    if res_type == "CommunicationRequest"
        && p.kind() != SubjectKind::System
        && body.get("requester").is_none()
        && body.get("sender").is_none()
    {
        if let Some(me) = &p.fhir_user {
            body["requester"] = json!({"reference": me});
        }
    }
    // A patient's (or RelatedPerson's) message is from them.
    let patient_user = matches!(p.kind(), SubjectKind::Patient | SubjectKind::RelatedPerson);
    if res_type == "Communication" && patient_user && body.get("sender").is_none() {
        if let Some(me) = &p.fhir_user {
            body["sender"] = json!({"reference": me});
        }
    }
    // … and says no more than that of who wrote it: a display or an extension on the sender is
    // the writer's own claim ("Dr. Smith, Cardiology", "on behalf of" a clinician: an outside
    // probe and walk-through stored both), which another client would show as fact. So is a
    // clinician's (a probe's clinician labelled their message "Dr Vera Victim"): a person's
    // message names its author by reference only; Courier names people from its own records.
    let writes_as_person =
        p.kind() != SubjectKind::System || policy::patient_bound(p, res_type).is_some();
    if writes_as_person {
        for element in ["sender", "requester"] {
            if let Some(o) = body.get_mut(element).and_then(Value::as_object_mut) {
                o.retain(|k, _| k == "reference");
            }
            if let Some(o) = body.as_object_mut() {
                o.remove(&format!("_{element}"));
            }
        }
        unclaimed(body);
    }
    about_one_patient(body, base)?;
    let mut inherited = false;
    // The thread: a message may belong only to a conversation its writer can see.
    let unconfined = matches!(
        access::decide(state, p, "Communication", Perm::Read),
        Ok(access::Access::All)
    );
    for element in ["partOf", "inResponseTo"] {
        for (i, r) in body[element].as_array().into_iter().flatten().enumerate() {
            // Read the reference as the search index does (`Communication/x/_history/1` and a
            // bare `x` both put the message in thread `x`), so no spelling escapes the check.
            let Some(parts) = r["reference"]
                .as_str()
                .and_then(|s| crate::search::index::parse_reference(s, base))
            else {
                continue;
            };
            let (None, Some("Communication") | None, Some(id)) = (
                &parts.url,
                parts.target_type.as_deref(),
                parts.target_id.as_deref(),
            ) else {
                continue;
            };
            let local = format!("Communication/{id}");
            if let Some(staff_only) = fresh.get(id) {
                inherited |= *staff_only;
                continue;
            }
            match access::read(state, p, "Communication", id, None).await {
                Ok(s) => {
                    let v: Value = serde_json::from_slice(s.body.as_deref().unwrap_or_default())
                        .unwrap_or(Value::Null);
                    inherited |= super::staff_only::is_labelled(&v);
                    // A conversation is about one patient: a person's message about another
                    // cannot join it (it would sit, and be filed to the chart, under the wrong
                    // patient). An integrator's writes are its own to get right, as their order
                    // is (it may load an EHR's threads as they are).
                    let person = p.kind() != SubjectKind::System;
                    let mine = patient_named(body, base).filter(|_| person);
                    let theirs = patient_named(&v, base);
                    if let (Some(mine), Some(theirs)) = (&mine, &theirs) {
                        if mine != theirs {
                            return Err(FhirError::at(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "business-rule",
                            format!("{res_type}.{element}[{i}]"),
                            format!("this message is about {mine}, but the conversation it joins ({local}) is about another patient: start a new conversation"),
                            ));
                        }
                    }
                }
                // An integrator that reaches every message may load a thread out of order.
                Err(_) if unconfined => {}
                Err(_) => {
                    return Err(FhirError::at(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!("{res_type}.{element}[{i}]"),
                        format!("{local} is not a conversation this token can see: a message may only belong to one the writer takes part in"),
                    ))
                }
            }
        }
    }
    // A new version of a staff-only message stays staff-only (when the writer may see it at
    // all: otherwise the write is refused as not found by the access guard).
    let replaced = match replaces {
        Some(id) => replaced_version(state, p, res_type, id).await?,
        None => None,
    };
    if let Some(v) = &replaced {
        inherited |= super::staff_only::is_labelled(v);
    }
    // Withdrawing a message (`entered-in-error`) recalls its content: the new version carries no
    // payload, so no reader, search, socket or subscription gets it from here on (an outside
    // walk-through's recipient still read a withdrawn message's text through the API). The
    // versions before stay in the record for its author and for compliance (`fhir::access`
    // keeps them from everyone else).
    // … for good: a withdrawn message put back would show its earlier versions again (an outside
    // probe PATCHed one back to completed). A correction goes as a new message.
    if res_type == "Communication"
        && p.kind() != SubjectKind::System
        && replaced
            .as_ref()
            .is_some_and(|v| v["status"] == "entered-in-error")
        && body["status"] != "entered-in-error"
    {
        return Err(FhirError::at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "Communication.status",
            "this message was withdrawn, and a withdrawn message stays withdrawn: send a new message instead",
        ));
    }
    // Sent is sent: a person's message out of `preparation` does not become a draft again (a
    // review: through a draft, a sent and read message could be rewritten and re-addressed,
    // and counted as sent anew by the out-of-office job).
    if res_type == "Communication"
        && (p.kind() != SubjectKind::System || policy::patient_bound(p, res_type).is_some())
        && replaced
            .as_ref()
            .is_some_and(|v| v["status"] != "preparation")
        && body["status"] == "preparation"
    {
        return Err(FhirError::at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "Communication.status",
            "this message was sent and may have been read: it cannot become a draft again. Send a correction as a new message, or withdraw it",
        ));
    }
    // Courier's own mark of a message it wrote for someone out of office: nobody else's to put
    // on a message (the app shows it as "Automatic reply"), kept on the messages that have it.
    if res_type == "Communication"
        && super::away::is_automatic(body)
        && !replaced.as_ref().is_some_and(super::away::is_automatic)
    {
        return Err(FhirError::at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            "Communication.extension",
            "the automatic extension marks messages Courier writes for someone out of office; a client may not set it",
        ));
    }
    // Nor is the note that a recipient covers for a colleague away (the app shows "X (covering
    // for Y)" beside the message box): a client may keep or drop the notes Courier wrote, not
    // add one or change whom it names. Nor on a scheduled message's request, whose recipients
    // its messages copy.
    if matches!(res_type, "Communication" | "CommunicationRequest")
        && super::away::extensions_of(body, super::away::EXT_COVERING) > 0
    {
        let before = replaced
            .as_ref()
            .and_then(super::away::covering_notes)
            .unwrap_or_default();
        let kept = super::away::covering_notes(body)
            .is_some_and(|notes| notes.iter().all(|n| before.contains(n)));
        if !kept {
            return Err(FhirError::at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                format!("{res_type}.recipient.extension"),
                "the covering-for extension says whom Courier added to cover for a colleague out of office; a client may not set it",
            ));
        }
    }
    // Nor is an escalation's mark (a reminder of an unread urgent message, paging its backup):
    // a client's request may not carry one, and an update keeps Courier's as it is, or drops it.
    if res_type == "CommunicationRequest" {
        let marks = super::escalation::marks(body);
        let before = replaced
            .as_ref()
            .map(super::escalation::marks)
            .unwrap_or_default();
        if !marks.is_empty() && marks != before {
            return Err(FhirError::at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                "CommunicationRequest.category",
                format!(
                    "the escalation extension and the category system {} mark Courier's reminders of unread urgent messages; a client may not set them",
                    super::escalation::CATEGORY_SYSTEM
                ),
            ));
        }
    }
    // A sent message is what its readers read: a person may withdraw it, not rewrite it (an
    // outside probe's patient turned "mild chest pain", read by the clinician, into "crushing
    // chest pain", and re-addressed a read message to another patient, keeping its time and
    // read receipt). A correction goes as a new message. An integrator's updates are its own
    // (it may mirror an EHR's record).
    if res_type == "Communication"
        && (p.kind() != SubjectKind::System || policy::patient_bound(p, res_type).is_some())
        && body["status"] != "entered-in-error"
    {
        // Its author's (anyone else is refused by the authorship check, as not found).
        let me = acting_as(p, res_type);
        let authored = |v: &Value| {
            v["sender"]["reference"]
                .as_str()
                .map(|r| super::hub::local_ref(r, base))
                == me
        };
        // Any status but a draft's: a message out of `preparation` is shown to its readers
        // (a code review: one sent as `in-progress` could otherwise be rewritten).
        if let Some(v) = replaced
            .as_ref()
            .filter(|v| v["status"] != "preparation" && authored(v))
        {
            // Both as a person's write is stored now (a version stored before `unclaimed` may
            // hold displays and extensions that this one, stripped, no longer carries).
            let content = |x: &Value| {
                let mut x = x.clone();
                unclaimed(&mut x);
                if let Some(o) = x.as_object_mut() {
                    for k in [
                        "meta",
                        "sent",
                        "_sent",
                        "received",
                        "_received",
                        "text",
                        "status",
                        "_status",
                    ] {
                        o.remove(k);
                    }
                }
                x
            };
            if content(v) != content(body) {
                return Err(FhirError::at(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "business-rule",
                    "Communication",
                    "this message was sent and may have been read: it cannot be changed. Send a correction as a new message, or withdraw it",
                ));
            }
        }
    }
    if res_type == "Communication" && body["status"] == "entered-in-error" {
        // A person's withdrawal is of the message as it was: made from the stored version, so
        // that it cannot also move it to other recipients or another thread.
        if p.kind() != SubjectKind::System || policy::patient_bound(p, res_type).is_some() {
            if let Some(v) = &replaced {
                let id = body.get("id").cloned();
                *body = v.clone();
                body["status"] = json!("entered-in-error");
                if let Some(id) = id {
                    body["id"] = id;
                }
            }
        }
        recall(body);
    }
    // A person's message is sent when Courier takes it: its `sent` is Courier's time, not the
    // writer's (an outside walk-through's message without one came out oldest in its thread; an
    // outside probe's patient backdated one to 1900 and dated another 2099, and the app shows
    // `sent` as fact). Set when it is sent (created completed, or a draft completed now); a later
    // change keeps the time it had. `received` is its recipients' to have, not its writer's: kept
    // as stored. An integrator's messages are as it gives them (it may load history).
    if res_type == "Communication"
        && (p.kind() != SubjectKind::System || policy::patient_bound(p, res_type).is_some())
    {
        let was_sent = replaced.as_ref().filter(|v| v["status"] == "completed");
        let stored = |k: &str| replaced.as_ref().and_then(|v| v.get(k)).cloned();
        if let Some(o) = body.as_object_mut() {
            if o.get("status").and_then(Value::as_str) == Some("completed") {
                match was_sent {
                    Some(v) => match v.get("sent") {
                        Some(t) => o.insert("sent".into(), t.clone()),
                        None => o.remove("sent"),
                    },
                    None => o.insert(
                        "sent".into(),
                        json!(crate::search::dates::format_instant(
                            crate::clock::now_micros()
                        )),
                    ),
                };
            } else if let Some(t) = stored("sent") {
                o.insert("sent".into(), t);
            } else {
                o.remove("sent");
            }
            o.remove("_sent");
            match stored("received") {
                Some(t) => o.insert("received".into(), t),
                None => o.remove("received"),
            };
            o.remove("_received");
        }
    }
    // Courier's own identifiers on it: as the writer sees it, or as stored for a system client
    // that may update what it cannot read.
    let system = p.kind() == SubjectKind::System && policy::patient_bound(p, res_type).is_none();
    let stored_marks = match (replaces, &replaced) {
        (_, Some(v)) => courier_marks(v),
        (Some(id), None) if system => stored_marks(state, res_type, id).await?,
        _ => Vec::new(),
    };
    // Courier's own identifiers say "the scheduler sent this" and "this is the reminder for
    // that": written by a client, one would stop a scheduled message or a reminder from being
    // sent (Courier finds the marker and takes it as done). No client writes one; an update
    // keeps the stored version's as they are.
    let marks = courier_marks(body);
    if marks != stored_marks {
        return Err(FhirError::at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "business-rule",
            format!("{res_type}.identifier"),
            format!(
                "identifiers in {} and {} are Courier's own (they mark what its scheduler and reminders wrote); a client cannot add, change or remove one",
                super::schedule::IDENTIFIER_SYSTEM,
                super::escalation::IDENTIFIER_SYSTEM
            ),
        ));
    }
    let store = state.store.clone();
    let rt = res_type.to_string();
    let mut v = std::mem::take(body);
    let patient_bound = policy::patient_bound(p, res_type);
    let patient_side = patient_user || (p.kind() == SubjectKind::System && patient_bound.is_some());
    let person = p.kind() != SubjectKind::System || patient_bound.is_some();
    let (v, outcome) = blocking(move || {
        // A patient's message to a Group or CareTeam reaches its members: none may be another
        // patient (as for a message addressed to them directly).
        if let Some(me) = &patient_bound {
            let reached = super::staff_only::patient_side_participants(&store, &rt, &v)?;
            if let Some((path, _)) = reached
                .iter()
                .find(|(_, who)| who.starts_with("Patient/") && *who != format!("Patient/{me}"))
            {
                let e = FhirError::at(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    path.clone(),
                    "a patient cannot address another patient (a Group or CareTeam recipient reaches each of its members)",
                );
                return Ok((v, Err(e)));
            }
        }
        // A message reaches one patient at most, with a Patient subject or none (an outside probe sent one clinician's message to two patients by leaving the
        // subject out, or making it a Group): the subject, else the first patient it names, and
        // no other among its parties or the members of a Group or CareTeam it is sent to (see
        // `about_one_patient` for the parties of a message with a Patient subject).
        let subject = v["subject"]["reference"]
            .as_str()
            .map(|r| super::hub::local_ref(r, &store.base_url))
            .filter(|r| r.starts_with("Patient/"));
        let reached = super::staff_only::patient_side_participants(&store, &rt, &v)?;
        // Without a Patient subject, for people's writes (users, patient apps): an integrator's
        // messages are its own to get right (it may load an EHR's as they are).
        let named = subject.clone().or_else(|| {
            reached
                .iter()
                .find(|(_, who)| who.starts_with("Patient/"))
                .map(|(_, who)| who.clone())
                .filter(|_| person)
        });
        if let Some(named) = &named {
            if let Some((path, who)) = reached
                .iter()
                .find(|(_, who)| who.starts_with("Patient/") && **who != **named)
            {
                let said = match &subject {
                    Some(subject) => format!("this message is about {subject}; it cannot reach another patient ({who}) through a Group or CareTeam"),
                    None => format!("a message reaches one patient at most: it names {named} and {who} (directly or through a Group or CareTeam); send each patient their own"),
                };
                let e = FhirError::at(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "business-rule",
                    path.clone(),
                    said,
                );
                return Ok((v, Err(e)));
            }
            // … and is about that patient: a message without a subject that reaches one patient
            // (directly, or as a member of a Group or CareTeam) is given them as its subject. The
            // patient's side reads what reaches it through a group only when it is about them
            // (`auth::policy`), so a member added later does not read what was sent before.
            if v.get("subject").is_none() {
                v["subject"] = json!({"reference": named});
            }
        } else if v.get("subject").is_none() {
            // An integrator's message without a subject that reaches exactly one patient, and
            // only as a member of a Group or CareTeam, is about that patient too: otherwise that
            // patient would never read it (a second outside probe: 201, and not delivered).
            let patients: std::collections::BTreeSet<&String> = reached
                .iter()
                .filter(|(_, who)| who.starts_with("Patient/"))
                .map(|(_, who)| who)
                .collect();
            let direct = |who: &str| {
                v["recipient"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .chain([&v["sender"], &v["requester"]])
                    .filter_map(|r| r["reference"].as_str())
                    .any(|r| super::hub::local_ref(r, &store.base_url) == who)
            };
            if let [only] = patients.into_iter().collect::<Vec<_>>()[..] {
                if !direct(only) {
                    v["subject"] = json!({"reference": only});
                }
            }
        }
        let mut r = super::staff_only::label(&store, &rt, &mut v, inherited)?.map_err(|r| {
            FhirError::at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                r.expression,
                r.message,
            )
        });
        // The patient's side never writes what it could not read back.
        if r.is_ok() && patient_side && super::staff_only::is_labelled(&v) {
            r = Err(FhirError::at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                format!("{rt}.recipient"),
                "a message from the patient's side includes the patient (as sender or recipient); it cannot be staff-only",
            ));
        }
        Ok((v, r))
    })
    .await?;
    *body = v;
    outcome
}

/// The patient a message is about, as the search index reads its references (relative or under
/// this server's base): its subject, else a Patient among its recipients, else its sender.
fn patient_named(v: &Value, base: &str) -> Option<String> {
    for field in ["subject", "recipient", "sender"] {
        let refs: Vec<&Value> = match &v[field] {
            Value::Array(a) => a.iter().collect(),
            x => vec![x],
        };
        for r in refs {
            let Some(p) = r["reference"]
                .as_str()
                .and_then(|s| crate::search::index::parse_reference(s, base))
            else {
                continue;
            };
            if p.url.is_none() && p.target_type.as_deref() == Some("Patient") {
                return p.target_id.map(|id| format!("Patient/{id}"));
            }
        }
    }
    None
}
