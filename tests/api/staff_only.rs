//! Who sees what, who said what: staff-only conversations (the `NOPAT` label) never reach the
//! patient they are about; a scheduled message is sent only in its author's name; `$everything`
//! follows the token's scopes; a Group or a thread reaches no one it should not.

use crate::both_backends;
use crate::helpers::*;
use crate::messaging::{call, clinician_token, msg, param, patient_token, user_token, Ws};
use serde_json::{json, Value};
use std::time::Duration;

pub const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// Does `v` carry the staff-only label?
pub fn labelled(v: &Value) -> bool {
    v["meta"]["security"].as_array().is_some_and(|a| {
        a.iter()
            .any(|c| c["system"] == ACT_CODE && c["code"] == "NOPAT")
    })
}

/// One request as `c`: (status, JSON body or the text). A body goes as FHIR JSON (a JSON Patch
/// for PATCH), asking for the representation back.
pub async fn send(
    c: &reqwest::Client,
    app: &TestApp,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut r = match method {
        "PUT" => c.put(app.url(path)),
        "DELETE" => c.delete(app.url(path)),
        "POST" => c.post(app.url(path)),
        "PATCH" => c.patch(app.url(path)),
        _ => c.get(app.url(path)),
    };
    if let Some(b) = body {
        let ct = if method == "PATCH" {
            "application/json-patch+json"
        } else {
            FHIR_JSON
        };
        r = r
            .header("content-type", ct)
            .header("prefer", "return=representation")
            .body(b.to_string());
    }
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        s,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The Communications sent for a scheduled request, waiting up to 10 s for the first.
async fn sent_for(app: &TestApp, request: &str) -> Vec<String> {
    let mut sent = vec![];
    for _ in 0..100 {
        sent = ids(&app
            .get_json(&format!(
                "Communication?based-on=CommunicationRequest/{request}"
            ))
            .await);
        if !sent.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sent
}

fn first_expression(oo: &Value) -> String {
    oo["issue"][0]["expression"][0]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A message about `patient` (subject) from `sender` to `recipients`.
pub fn about(patient: &str, sender: &str, recipients: &[&str], text: &str) -> Value {
    let mut m = msg(sender, recipients, text);
    m["subject"] = json!({"reference": format!("Patient/{patient}")});
    m
}

both_backends! {
    async fn a_staff_only_conversation_about_a_patient_never_reaches_that_patient(app: TestApp) {
        // Dr 1 launched with Ada in context writes to Dr 2 about her, with an attachment.
        let dr1 = client_with_token(&user_token(&app, "user/*.cruds", "Practitioner/dr1", Some("ada")));
        let dr2 = client_with_token(&clinician_token(&app, "dr2"));
        let ada_token = patient_token(&app, "ada");
        let ada = client_with_token(&ada_token);
        let (mut ada_ws, _, _) = Ws::open(&app, &ada_token, None).await;

        let (s, bin) = send(&dr1, &app, "POST", "Binary", Some(&json!({"resourceType": "Binary", "contentType": "text/plain", "data": "ZmlsbCBoaXN0b3J5"}))).await;
        assert_eq!(s, 201, "{bin}");
        let bin = bin["id"].as_str().unwrap().to_string();
        let mut header = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "I suspect Ada is not taking her meds, can you check pharmacy fill history?");
        header["payload"].as_array_mut().unwrap().push(json!({"contentAttachment": {"contentType": "text/plain", "url": format!("Binary/{bin}")}}));
        let (s, h) = send(&dr1, &app, "POST", "Communication", Some(&header)).await;
        assert_eq!(s, 201, "{h}");
        assert!(labelled(&h), "a message no patient takes part in is labelled NOPAT: {h}");
        let header_id = h["id"].as_str().unwrap().to_string();
        // A reply in the thread inherits the label.
        let mut reply = about("ada", "Practitioner/dr2", &["Practitioner/dr1"], "Fill history shows a 40-day gap");
        reply["partOf"] = json!([{"reference": format!("Communication/{header_id}")}]);
        let (s, r) = send(&dr2, &app, "POST", "Communication", Some(&reply)).await;
        assert_eq!(s, 201, "{r}");
        assert!(labelled(&r), "{r}");
        let reply_id = r["id"].as_str().unwrap().to_string();
        // What Ada may see: a message to her; a colleague's remark about it stays staff-only.
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Please call the clinic"))).await;
        assert_eq!(s, 201);
        assert!(!labelled(&v), "a message to the patient is not staff-only: {v}");
        let visible = v["id"].as_str().unwrap().to_string();
        let mut remark = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Send her to the ED if she calls");
        remark["inResponseTo"] = json!([{"reference": format!("Communication/{visible}")}]);
        let (s, r) = send(&dr1, &app, "POST", "Communication", Some(&remark)).await;
        assert_eq!(s, 201);
        assert!(labelled(&r));
        let remark_id = r["id"].as_str().unwrap().to_string();
        let hidden = [header_id.clone(), reply_id.clone(), remark_id.clone()];

        // The clinicians see all of it.
        for id in &hidden {
            assert_eq!(send(&dr1, &app, "GET", &format!("Communication/{id}"), None).await.0, 200);
        }
        // Ada: nothing of it, on any path.
        let mut seen = String::new();
        for id in &hidden {
            for path in [format!("Communication/{id}"), format!("Communication/{id}/_history/1"), format!("Communication/{id}/_history"), format!("Communication/{id}/$receipts")] {
                let (s, _) = send(&ada, &app, "GET", &path, None).await;
                assert_eq!(s, 404, "Ada: GET {path}");
            }
        }
        // … worded as for a resource that does not exist, whatever the version asked (a vread
        // once said "Communication/<id> is not known" for a hidden one and
        // "…/_history/1 is not known" for a missing one).
        let unknown = "Abcdefghijklmnopqrstuv";
        for v in ["1", "2", "9"] {
            let (s, missing) = send(&ada, &app, "GET", &format!("Communication/{unknown}/_history/{v}"), None).await;
            assert_eq!(s, 404);
            for id in &hidden {
                let (s, b) = send(&ada, &app, "GET", &format!("Communication/{id}/_history/{v}"), None).await;
                assert_eq!(s, 404);
                assert_eq!(b.to_string().replace(id.as_str(), unknown), missing.to_string(), "version {v} of a hidden message");
            }
            let (s, b) = send(&ada, &app, "GET", &format!("Binary/{bin}/_history/{v}"), None).await;
            assert_eq!(s, 404);
            let (_, missing) = send(&ada, &app, "GET", &format!("Binary/{unknown}/_history/{v}"), None).await;
            assert_eq!(b.to_string().replace(bin.as_str(), unknown), missing.to_string(), "version {v} of a hidden Binary");
        }
        let (s, _) = send(&ada, &app, "GET", &format!("Binary/{bin}"), None).await;
        assert_eq!(s, 404, "Ada: the staff-only message's attachment");
        for path in [
            "Communication?subject=Patient/ada&_total=accurate".to_string(),
            "Communication?_total=accurate&_count=100".to_string(),
            "Communication?_summary=count".to_string(),
            format!("Communication?_id={visible}&_revinclude=Communication:in-response-to"),
            format!("Communication?_id={visible}&_revinclude=Communication:part-of&_include=Communication:part-of"),
            "Communication/_history".to_string(),
            "Communication/$unread".to_string(),
            "Patient/ada/$everything".to_string(),
        ] {
            let (s, b) = send(&ada, &app, "GET", &path, None).await;
            assert_eq!(s, 200, "Ada: GET {path}: {b}");
            if path.contains("_total") || path.contains("_summary") {
                assert_eq!(b["total"], 1, "Ada: {path} counts only what she may see: {b}");
            }
            seen.push_str(&b.to_string());
        }
        assert!(seen.contains(&visible), "Ada sees the message to her");
        for id in hidden.iter().chain([&bin]) {
            assert!(!seen.contains(id.as_str()), "Ada was shown {id}");
        }
        assert!(!seen.contains("pharmacy") && !seen.contains("ED if she calls"));
        // Her socket hears only of the message to her.
        let e = ada_ws.next().await.expect("Ada hears of the message to her");
        assert_eq!(e["id"], visible.as_str(), "{e}");
        assert!(ada_ws.next_within(Duration::from_millis(700)).await.is_none(), "nothing else");
        // An administrator's export includes the staff-only messages, labelled, for review.
        let all = app.get_json("Patient/ada/$everything").await;
        let header_in_export = all["entry"].as_array().unwrap().iter().find(|e| e["resource"]["id"] == header_id.as_str()).expect("the admin export has the staff-only thread");
        assert!(labelled(&header_in_export["resource"]));
        // The label is searchable.
        let b = app.get_json(&format!("Communication?_security={ACT_CODE}|NOPAT&subject=Patient/ada")).await;
        let mut got = ids(&b);
        got.sort();
        let mut want = hidden.to_vec();
        want.sort();
        assert_eq!(got, want);
    }

    async fn a_staff_only_thread_cannot_be_opened_to_a_patient(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let header = app.create(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Critical potassium, send him to the ED")).await;
        let team = app.create(&json!({"resourceType": "CareTeam", "status": "active",
            "participant": [{"member": {"reference": "Practitioner/dr2"}}, {"member": {"reference": "Patient/ada"}}]})).await;
        let before = app.row_counts();
        let part_of = json!([{"reference": format!("Communication/{header}")}]);
        // A reply that adds the patient, directly or through a CareTeam she is in.
        for (recipients, expression) in [
            (vec!["Practitioner/dr2", "Patient/ada"], "Communication.recipient[1]"),
            (vec![&*format!("CareTeam/{team}")], "Communication.recipient[0]"),
            (vec!["RelatedPerson/ada-mother"], "Communication.recipient[0]"),
        ] {
            let mut m = about("ada", "Practitioner/dr1", &recipients, "Looping in the patient");
            m["partOf"] = part_of.clone();
            let (s, oo) = send(&dr1, &app, "POST", "Communication", Some(&m)).await;
            assert_eq!(s, 422, "{recipients:?}: {oo}");
            assert_eq!(first_expression(&oo), expression, "{oo}");
            assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("start a new conversation"), "{oo}");
            // The same through a transaction.
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": m, "request": {"method": "POST", "url": "Communication"}}]});
            let (s, oo) = send(&dr1, &app, "POST", "", Some(&tx)).await;
            assert_eq!(s, 422, "transaction: {oo}");
        }
        // Editing the thread's first message to add her is refused too.
        let mut h = app.get_json(&format!("Communication/{header}")).await;
        h["recipient"] = json!([{"reference": "Practitioner/dr2"}, {"reference": "Patient/ada"}]);
        let (s, oo) = send(&dr1, &app, "PUT", &format!("Communication/{header}"), Some(&h)).await;
        assert_eq!(s, 422, "{oo}");
        // A client's own label is kept; a label on a message to a patient is a contradiction.
        let mut to_ada = about("ada", "Practitioner/dr1", &["Patient/ada"], "x");
        to_ada["meta"] = json!({"security": [{"system": ACT_CODE, "code": "NOPAT"}]});
        let (s, oo) = send(&app.client, &app, "POST", "Communication", Some(&to_ada)).await;
        assert_eq!(s, 422, "{oo}");
        assert_eq!(app.row_counts(), before, "refused writes change nothing");
        let mut labelled_by_client = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "x");
        labelled_by_client["meta"] = json!({"security": [{"system": ACT_CODE, "code": "NOPAT"}]});
        let (s, v) = send(&app.client, &app, "POST", "Communication", Some(&labelled_by_client)).await;
        assert_eq!(s, 201);
        assert_eq!(v["meta"]["security"].as_array().unwrap().len(), 1, "labelled once: {v}");
        // A reply that stays among staff is fine, and labelled.
        let mut ok = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "On my way");
        ok["partOf"] = part_of;
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&ok)).await;
        assert_eq!(s, 201, "{v}");
        assert!(labelled(&v));
    }

    async fn a_scheduled_message_is_sent_only_in_its_authors_name_and_within_patient_limits(app: TestApp) {
        let ada = client_with_token(&patient_token(&app, "ada"));
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        // Launched from the EHR with Ada in context: her compartment is within reach.
        let dr1_ada = client_with_token(&user_token(&app, "user/*.cruds", "Practitioner/dr1", Some("ada")));
        let soon = |secs: i64| (chrono::Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let request = |extra: Value| {
            let mut r = json!({"resourceType": "CommunicationRequest", "status": "active", "subject": {"reference": "Patient/ada"},
                "category": [{"text": "prescription"}],
                "recipient": [{"reference": "Practitioner/dr1"}], "occurrenceDateTime": soon(1),
                "payload": [{"contentString": "Please renew my prescription"}]});
            for (k, v) in extra.as_object().unwrap() {
                r[k] = v.clone();
            }
            r
        };
        let before = app.row_counts();
        for (who, c, extra, status, expression) in [
            ("patient as a doctor (sender)", &ada, json!({"sender": {"reference": "Practitioner/dr2"}}), 403, "CommunicationRequest.sender"),
            ("patient as a doctor (requester)", &ada, json!({"requester": {"reference": "Practitioner/dr2"}}), 403, "CommunicationRequest.requester"),
            ("doctor as a colleague", &dr1_ada, json!({"requester": {"reference": "Practitioner/dr2"}, "recipient": [{"reference": "Patient/ada"}]}), 403, "CommunicationRequest.requester"),
            ("patient, too long", &ada, json!({"payload": [{"contentString": "x".repeat(5013)}]}), 422, "CommunicationRequest.payload[0].contentString"),
            ("patient to another patient", &ada, json!({"recipient": [{"reference": "Patient/bob"}]}), 403, ""),
        ] {
            let (s, oo) = send(c, &app, "POST", "CommunicationRequest", Some(&request(extra))).await;
            assert_eq!(s, status, "{who}: {oo}");
            if !expression.is_empty() {
                assert_eq!(first_expression(&oo), expression, "{who}: {oo}");
            }
        }
        assert_eq!(app.row_counts(), before, "refused requests change nothing");
        // Ada's own request: she is its requester, and the message goes out from her.
        let (s, cr) = send(&ada, &app, "POST", "CommunicationRequest", Some(&request(json!({})))).await;
        assert_eq!(s, 201, "{cr}");
        assert_eq!(cr["requester"]["reference"], "Patient/ada", "{cr}");
        let id = cr["id"].as_str().unwrap();
        let sent = sent_for(&app, id).await;
        assert_eq!(sent.len(), 1, "the request was sent");
        let m = app.get_json(&format!("Communication/{}", sent[0])).await;
        assert_eq!(m["sender"]["reference"], "Patient/ada", "{m}");
        assert!(!labelled(&m), "a patient's message is not staff-only");
        // A clinician's scheduled note to a colleague about Ada is staff-only, and so is its send.
        let mut note = request(json!({"requester": {"reference": "Practitioner/dr1"}, "recipient": [{"reference": "Practitioner/dr2"}], "subject": {"reference": "Patient/ada"}}));
        note["payload"] = json!([{"contentString": "Check Ada's INR tomorrow"}]);
        let (s, cr) = send(&dr1, &app, "POST", "CommunicationRequest", Some(&note)).await;
        assert_eq!(s, 201, "{cr}");
        assert!(labelled(&cr));
        let id = cr["id"].as_str().unwrap();
        let sent = sent_for(&app, id).await;
        assert_eq!(sent.len(), 1);
        assert!(labelled(&app.get_json(&format!("Communication/{}", sent[0])).await));
        let (s, _) = send(&ada, &app, "GET", &format!("Communication/{}", sent[0]), None).await;
        assert_eq!(s, 404, "Ada does not see the scheduled staff-only note");
        let (s, _) = send(&ada, &app, "GET", &format!("CommunicationRequest/{id}"), None).await;
        assert_eq!(s, 404, "nor the request");
    }

    async fn only_the_author_changes_or_deletes_a_request(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let dr2 = client_with_token(&clinician_token(&app, "dr2"));
        let cr = json!({"resourceType": "CommunicationRequest", "status": "active",
            "requester": {"reference": "Practitioner/dr1"}, "recipient": [{"reference": "Practitioner/dr2"}],
            "occurrenceDateTime": "2099-01-01T09:00:00Z", "payload": [{"contentString": "Handover at nine"}]});
        let (s, v) = send(&dr1, &app, "POST", "CommunicationRequest", Some(&cr)).await;
        assert_eq!(s, 201);
        let id = v["id"].as_str().unwrap().to_string();
        // The recipient reads it, but cannot change or delete it.
        assert_eq!(send(&dr2, &app, "GET", &format!("CommunicationRequest/{id}"), None).await.0, 200);
        let mut changed = v.clone();
        changed["payload"] = json!([{"contentString": "Handover cancelled"}]);
        changed["requester"] = json!({"reference": "Practitioner/dr2"});
        let (s, oo) = send(&dr2, &app, "PUT", &format!("CommunicationRequest/{id}"), Some(&changed)).await;
        assert!(s == 403 || s == 404, "the recipient's edit: {s} {oo}");
        let mut as_dr1 = changed.clone();
        as_dr1["requester"] = json!({"reference": "Practitioner/dr1"});
        let (s, oo) = send(&dr2, &app, "PUT", &format!("CommunicationRequest/{id}"), Some(&as_dr1)).await;
        assert!(s == 403 || s == 404, "the recipient's edit in the author's name: {s} {oo}");
        assert_eq!(send(&dr2, &app, "DELETE", &format!("CommunicationRequest/{id}"), None).await.0, 404);
        let now = app.get_json(&format!("CommunicationRequest/{id}")).await;
        assert_eq!(now["meta"]["versionId"], "1", "unchanged: {now}");
        // The author may.
        let (s, _) = send(&dr1, &app, "PUT", &format!("CommunicationRequest/{id}"), Some(&as_dr1)).await;
        assert_eq!(s, 200);
        assert_eq!(send(&dr1, &app, "DELETE", &format!("CommunicationRequest/{id}"), None).await.0, 204);
    }

    async fn everything_follows_the_tokens_scopes_and_gives_the_patient_a_minimal_audit_trail(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let to_ada = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Your results are ready")).await;
        let staff = app.create(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Borderline result, watch it")).await;
        // A clinician reads the message: an AuditEvent about Ada with the clinician's client and address.
        assert_eq!(send(&dr1, &app, "GET", &format!("Communication/{to_ada}"), None).await.0, 200);
        assert_eq!(send(&dr1, &app, "GET", &format!("Communication/{staff}"), None).await.0, 200);
        // A token for uploads only gets no messages and no audit trail.
        let uploads = client_with_token(&user_token(&app, "patient/Binary.cr", "Patient/ada", Some("ada")));
        let (s, b) = send(&uploads, &app, "GET", "Patient/ada/$everything", None).await;
        assert_eq!(s, 200, "{b}");
        let types: Vec<&str> = b["entry"].as_array().unwrap().iter().filter_map(|e| e["resource"]["resourceType"].as_str()).collect();
        assert!(!types.iter().any(|t| ["Communication", "CommunicationRequest", "AuditEvent", "Parameters"].contains(t)), "{types:?}");
        assert_eq!(send(&uploads, &app, "GET", "AuditEvent", None).await.0, 403);
        // With the audit scope: who accessed what and when, no client ids, addresses or token ids.
        let full = client_with_token(&user_token(&app, "patient/*.rs patient/AuditEvent.rs", "Patient/ada", Some("ada")));
        let (s, b) = send(&full, &app, "GET", "Patient/ada/$everything", None).await;
        assert_eq!(s, 200, "{b}");
        let text = b.to_string();
        let audits: Vec<&Value> = b["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).filter(|r| r["resourceType"] == "AuditEvent").collect();
        assert!(!audits.is_empty(), "the audit trail is there");
        assert!(text.contains(&to_ada));
        assert!(!text.contains(&staff), "the staff-only message and the AuditEvents naming it are not shown");
        assert!(audits.iter().any(|a| a.to_string().contains("Practitioner/dr1")), "who accessed it");
        for a in &audits {
            assert!(a["recorded"].is_string());
            for agent in a["agent"].as_array().unwrap() {
                assert!(agent.get("policy").is_none() && agent.get("network").is_none(), "{agent}");
            }
            assert!(a["entity"].as_array().into_iter().flatten().all(|e| e.get("query").is_none() && e.get("detail").is_none()), "{a}");
        }
        assert!(!text.contains(&app.admin_client_id) && !text.contains("urn:courier:oauth-client"), "no client ids: {text}");
        // The full BALP records are not the patient's to search directly.
        let (s, oo) = send(&full, &app, "GET", "AuditEvent?patient=Patient/ada", None).await;
        assert_eq!(s, 403, "{oo}");
        assert!(oo.to_string().contains("$everything"), "{oo}");
    }

    async fn a_patient_reaches_no_other_patient_through_a_group_or_care_team(app: TestApp) {
        let ada = client_with_token(&patient_token(&app, "ada"));
        let group = app.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/ada"}}, {"entity": {"reference": "Patient/bob"}}]})).await;
        let team = app.create(&json!({"resourceType": "CareTeam", "status": "active",
            "participant": [{"member": {"reference": "Practitioner/dr1"}}, {"member": {"reference": "Patient/bob"}}]})).await;
        let own_team = app.create(&json!({"resourceType": "CareTeam", "status": "active",
            "participant": [{"member": {"reference": "Practitioner/dr1"}}, {"member": {"reference": "Patient/ada"}}]})).await;
        let before = app.row_counts();
        for to in [format!("Group/{group}"), format!("CareTeam/{team}")] {
            let mut m = msg("Patient/ada", &[&to], "Hello");
            m["category"] = json!([{"text": "question"}]);
            let (s, oo) = send(&ada, &app, "POST", "Communication", Some(&m)).await;
            assert_eq!(s, 403, "to {to}: {oo}");
            let cr = json!({"resourceType": "CommunicationRequest", "status": "active", "recipient": [{"reference": to}],
                "category": [{"text": "question"}],
                "occurrenceDateTime": "2099-01-01T09:00:00Z", "payload": [{"contentString": "Hello later"}]});
            let (s, oo) = send(&ada, &app, "POST", "CommunicationRequest", Some(&cr)).await;
            assert_eq!(s, 403, "scheduled to {to}: {oo}");
        }
        assert_eq!(app.row_counts(), before);
        let bob = client_with_token(&patient_token(&app, "bob"));
        let b = bob.get(app.url("Communication?_total=accurate")).send().await.unwrap().json::<Value>().await.unwrap();
        assert_eq!(b["total"], 0, "Bob received nothing");
        // Her own care team is fine.
        let mut m = msg("Patient/ada", &[&format!("CareTeam/{own_team}")], "Hello team");
        m["category"] = json!([{"text": "question"}]);
        assert_eq!(send(&ada, &app, "POST", "Communication", Some(&m)).await.0, 201);
    }

    // From an outside probe: the one-patient rule held only when the subject was a Patient (a
    // clinician's message to Ada and Bob without a subject, or with a Group as subject, reached
    // both); and a patient added to a Group later read what had been sent to it about another
    // patient. A message reaches one patient at most, is about that patient, and the patient's
    // side reads through a group only what is about them.
    async fn a_message_reaches_one_patient_and_a_member_added_later_reads_nothing_of_others(app: TestApp) {
        let dr = client_with_token(&clinician_token(&app, "dr1"));
        let before = app.row_counts();
        let mut as_group = msg("Practitioner/dr1", &["Patient/ada", "Patient/bob"], "TWO-PATIENTS");
        as_group["subject"] = json!({"reference": "Group/ward"});
        for body in [msg("Practitioner/dr1", &["Patient/ada", "Patient/bob"], "TWO-PATIENTS"), as_group] {
            let (s, oo) = send(&dr, &app, "POST", "Communication", Some(&body)).await;
            assert_eq!(s, 422, "{oo}");
            assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("one patient at most"), "{oo}");
        }
        let cr = json!({"resourceType": "CommunicationRequest", "status": "active",
            "requester": {"reference": "Practitioner/dr1"}, "recipient": [{"reference": "Patient/ada"}, {"reference": "Patient/bob"}],
            "occurrenceDateTime": "2099-01-01T09:00:00Z", "payload": [{"contentString": "TWO-PATIENTS later"}]});
        assert_eq!(send(&dr, &app, "POST", "CommunicationRequest", Some(&cr)).await.0, 422);
        assert_eq!(app.row_counts(), before, "nothing written");

        // A group of a clinician and Ada; a message to it without a subject is about Ada.
        let members = |who: &[&str]| who.iter().map(|w| json!({"entity": {"reference": w}})).collect::<Vec<_>>();
        let group = app.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": members(&["Practitioner/dr1", "Patient/ada"])})).await;
        let dr2 = client_with_token(&clinician_token(&app, "dr2"));
        let (s, made) = send(&dr2, &app, "POST", "Communication", Some(&msg("Practitioner/dr2", &[&format!("Group/{group}")], "ADA-GROUP results"))).await;
        assert_eq!(s, 201, "{made}");
        let to_group = made["id"].as_str().unwrap().to_string();
        let stored = app.get_json(&format!("Communication/{to_group}")).await;
        assert_eq!(stored["subject"]["reference"], "Patient/ada", "{stored}");
        let ada = client_with_token(&patient_token(&app, "ada"));
        assert_eq!(ada.get(app.url(&format!("Communication/{to_group}"))).send().await.unwrap().status(), 200);
        // Bob joins the group (the EHR says so): nothing sent before about Ada is his.
        let g = json!({"resourceType": "Group", "id": group, "type": "person", "actual": true,
            "member": members(&["Practitioner/dr1", "Patient/ada", "Patient/bob"])});
        assert_eq!(app.put(&format!("Group/{group}"), &g).await.status(), 200);
        let bob = client_with_token(&patient_token(&app, "bob"));
        assert_eq!(bob.get(app.url(&format!("Communication/{to_group}"))).send().await.unwrap().status(), 404);
        for path in ["Communication".to_string(), format!("Communication?recipient=Group/{group}"), "Communication/_history".into()] {
            let seen = bob.get(app.url(&path)).send().await.unwrap().text().await.unwrap();
            assert!(!seen.contains("ADA-GROUP"), "{path}: {seen}");
        }
        // Nor with user scopes (a second probe), nor his relative's.
        for token in [user_token(&app, "user/Communication.rs", "Patient/bob", None), user_token(&app, "user/Communication.rs", "RelatedPerson/rb", None)] {
            let seen = client_with_token(&token).get(app.url("Communication")).send().await.unwrap().text().await.unwrap();
            assert!(!seen.contains("ADA-GROUP"), "{seen}");
        }
        // An integrator's message to the group, before Bob: about Ada (else she never reads it).
        let g1 = app.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": members(&["Practitioner/dr1", "Patient/ada"])})).await;
        let from_ehr = app.create(&msg("Practitioner/dr2", &[&format!("Group/{g1}")], "FROM-EHR to the team")).await;
        assert_eq!(app.get_json(&format!("Communication/{from_ehr}")).await["subject"]["reference"], "Patient/ada");
        assert_eq!(ada.get(app.url(&format!("Communication/{from_ehr}"))).send().await.unwrap().status(), 200);
        // Nor does Bob learn who else is in it: the patient's side reads no Group or CareTeam.
        let team = app.create(&json!({"resourceType": "CareTeam", "status": "active",
            "participant": [{"member": {"reference": "Practitioner/dr1"}}, {"member": {"reference": "Patient/ada"}}, {"member": {"reference": "Patient/bob"}}]})).await;
        for path in [format!("CareTeam/{team}"), "CareTeam?participant=Patient/ada".to_string()] {
            assert_eq!(bob.get(app.url(&path)).send().await.unwrap().status(), 403, "{path}");
        }
        for path in [format!("Group/{group}"), "Group?member=Patient/ada".to_string(), "Group".to_string()] {
            let r = bob.get(app.url(&path)).send().await.unwrap();
            assert_eq!(r.status(), 403, "{path}");
            assert!(!r.text().await.unwrap().contains("Patient/ada"));
        }
        // And the group now reaches two patients: no message goes to it.
        let (s, _) = send(&dr2, &app, "POST", "Communication", Some(&msg("Practitioner/dr2", &[&format!("Group/{group}")], "to both"))).await;
        assert_eq!(s, 422);
    }

    // From a second outside probe: a relative (proxy) signed in for a patient could send a
    // message and never see it again, nor the clinician's reply to them.
    async fn a_relative_reads_what_they_sent_and_received_about_the_patient(app: TestApp) {
        let mother = client_with_token(&user_token(&app, "patient/*.cruds", "RelatedPerson/rb", Some("b")));
        let mut m = msg("RelatedPerson/rb", &["Practitioner/dr1"], "MOTHER asks about the rash");
        m["subject"] = json!({"reference": "Patient/b"});
        m["category"] = json!([{"text": "question"}]);
        let (s, sent) = send(&mother, &app, "POST", "Communication", Some(&m)).await;
        assert_eq!(s, 201, "{sent}");
        let id = sent["id"].as_str().unwrap().to_string();
        assert_eq!(send(&mother, &app, "GET", &format!("Communication/{id}"), None).await.0, 200, "her own message");
        // … and her own draft (a code review found it hidden from her).
        let mut d = m.clone();
        d["status"] = json!("preparation");
        d["payload"] = json!([{"contentString": "MOTHER-DRAFT half written"}]);
        let (s, draft) = send(&mother, &app, "POST", "Communication", Some(&d)).await;
        assert_eq!(s, 201, "{draft}");
        let did = draft["id"].as_str().unwrap().to_string();
        assert_eq!(send(&mother, &app, "GET", &format!("Communication/{did}"), None).await.0, 200, "her own draft");
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let mut reply = msg("Practitioner/dr1", &["RelatedPerson/rb"], "DOCTOR answers the mother");
        reply["subject"] = json!({"reference": "Patient/b"});
        reply["inResponseTo"] = json!([{"reference": format!("Communication/{id}")}]);
        let (s, r) = send(&dr1, &app, "POST", "Communication", Some(&reply)).await;
        assert_eq!(s, 201, "{r}");
        let (_, seen) = send(&mother, &app, "GET", "Communication", None).await;
        let seen = seen.to_string();
        assert!(seen.contains("MOTHER asks") && seen.contains("DOCTOR answers"), "{seen}");
        // About another of her children, in this child's context: not here.
        let mut other = msg("Practitioner/dr1", &["RelatedPerson/rb"], "ABOUT-C sibling");
        other["subject"] = json!({"reference": "Patient/c"});
        assert_eq!(send(&dr1, &app, "POST", "Communication", Some(&other)).await.0, 201);
        let (_, seen) = send(&mother, &app, "GET", "Communication", None).await;
        assert!(!seen.to_string().contains("ABOUT-C"), "{seen}");
    }

    async fn a_user_cannot_change_who_a_group_reaches(app: TestApp) {
        let group = app.create(&json!({"resourceType": "Group", "type": "practitioner", "actual": true,
            "member": [{"entity": {"reference": "Practitioner/dr2"}}]})).await;
        let to_group = app.create(&msg("Practitioner/dr3", &[&format!("Group/{group}")], "On-call roster")).await;
        let nosy = client_with_token(&user_token(&app, "user/Group.cruds user/CareTeam.cruds user/Communication.rs", "Practitioner/nosy", None));
        let before = app.row_counts();
        let g = json!({"resourceType": "Group", "id": group, "type": "practitioner", "actual": true,
            "member": [{"entity": {"reference": "Practitioner/dr2"}}, {"entity": {"reference": "Practitioner/nosy"}}]});
        let (s, oo) = send(&nosy, &app, "PUT", &format!("Group/{group}"), Some(&g)).await;
        assert_eq!(s, 403, "{oo}");
        let mut new = g.clone();
        new.as_object_mut().unwrap().remove("id");
        assert_eq!(send(&nosy, &app, "POST", "Group", Some(&new)).await.0, 403);
        let team = json!({"resourceType": "CareTeam", "status": "active", "participant": [{"member": {"reference": "Practitioner/nosy"}}]});
        assert_eq!(send(&nosy, &app, "POST", "CareTeam", Some(&team)).await.0, 403);
        assert_eq!(app.row_counts(), before);
        assert_eq!(send(&nosy, &app, "GET", &format!("Communication/{to_group}"), None).await.0, 404);
    }

    async fn a_message_cannot_join_a_thread_its_writer_cannot_see(app: TestApp) {
        let header = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "About your knee")).await;
        let before = app.row_counts();
        let bob = client_with_token(&patient_token(&app, "bob"));
        let dr3 = client_with_token(&clinician_token(&app, "dr3"));
        let mut answers = vec![];
        for target in [header.clone(), "no-such-thread".to_string()] {
            for (c, sender) in [(&bob, "Patient/bob"), (&dr3, "Practitioner/dr3")] {
                let mut m = msg(sender, &["Practitioner/dr1"], "Me too");
                m["partOf"] = json!([{"reference": format!("Communication/{target}")}]);
                let (s, oo) = send(c, &app, "POST", "Communication", Some(&m)).await;
                assert_eq!(s, 403, "{sender} into {target}: {oo}");
                assert_eq!(first_expression(&oo), "Communication.partOf[0]");
                answers.push(oo["issue"][0]["diagnostics"].as_str().unwrap().replace(&target, "X"));
            }
        }
        assert_eq!(answers[0], answers[2], "an existing and a missing thread look the same");
        assert_eq!(app.row_counts(), before);
        let ada = client_with_token(&patient_token(&app, "ada"));
        let mut m = msg("Patient/ada", &["Practitioner/dr1"], "Thanks");
        m["partOf"] = json!([{"reference": format!("Communication/{header}")}]);
        let (s, oo) = send(&ada, &app, "POST", "Communication", Some(&m)).await;
        assert_eq!(s, 201, "{oo}");
        let (_, u) = call(&client_with_token(&clinician_token(&app, "dr1")), &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 1);
    }
}
