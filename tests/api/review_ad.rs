//! An outside review of items A-D of issue 19 (staff-only conversations, authorship, `$everything`
//! scopes, groups and threads): each test is one attack, written as the behaviour that must hold.

use crate::both_backends;
use crate::helpers::*;
use crate::messaging::{clinician_token, msg, patient_token, user_token, Ws};
use crate::staff_only::{about, labelled, send, ACT_CODE};
use courier::auth::clients;
use serde_json::{json, Value};
use std::time::Duration;

/// A token for an app launched in `patient`'s context with no user signed in (no fhirUser).
fn patient_app_token(app: &TestApp, scope: &str, patient: &str) -> String {
    let client_id = clients::add(
        &app.store,
        "patient app",
        clients::KeySource::Document(es384_key().1.to_string()),
        "system/*.cruds",
    )
    .unwrap();
    issue(&app.tokens, &client_id, scope, None, Some(patient))
}

both_backends! {
    async fn a_patient_app_without_a_user_cannot_write_in_a_clinicians_name(app: TestApp) {
        let ada_app = client_with_token(&patient_app_token(&app, "patient/*.cruds", "ada"));
        let before = app.row_counts();
        // A message "from dr2" to dr1, copying Ada so that it is not staff-only.
        let forged = about("ada", "Practitioner/dr2", &["Practitioner/dr1", "Patient/ada"], "Stop the warfarin - dr2");
        let (s, v) = send(&ada_app, &app, "POST", "Communication", Some(&forged)).await;
        assert!(s == 403 || s == 422, "a patient app wrote a message as Practitioner/dr2: {s} {v}");
        // The same, scheduled.
        let cr = json!({"resourceType": "CommunicationRequest", "status": "active", "subject": {"reference": "Patient/ada"},
            "requester": {"reference": "Practitioner/dr2"}, "sender": {"reference": "Practitioner/dr2"},
            "recipient": [{"reference": "Practitioner/dr1"}, {"reference": "Patient/ada"}],
            "occurrenceDateTime": "2099-01-01T09:00:00Z", "payload": [{"contentString": "Stop the warfarin - dr2"}]});
        let (s, v) = send(&ada_app, &app, "POST", "CommunicationRequest", Some(&cr)).await;
        assert!(s == 403 || s == 422, "a patient app scheduled a message as Practitioner/dr2: {s} {v}");
        assert_eq!(app.row_counts(), before);
    }

    async fn a_patient_app_without_a_user_cannot_rewrite_or_delete_a_clinicians_message(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Take 5 mg daily"))).await;
        assert_eq!(s, 201, "{v}");
        let id = v["id"].as_str().unwrap().to_string();
        let ada_app = client_with_token(&patient_app_token(&app, "patient/*.cruds", "ada"));
        let mut changed = v.clone();
        changed["payload"] = json!([{"contentString": "Take 50 mg daily"}]);
        let (s, oo) = send(&ada_app, &app, "PUT", &format!("Communication/{id}"), Some(&changed)).await;
        assert!(s == 403 || s == 404, "a patient app rewrote dr1's message: {s} {oo}");
        let (s, oo) = send(&ada_app, &app, "DELETE", &format!("Communication/{id}"), None).await;
        assert!(s == 403 || s == 404, "a patient app deleted dr1's message: {s} {oo}");
        let now = app.get_json(&format!("Communication/{id}")).await;
        assert_eq!(now["payload"][0]["contentString"], "Take 5 mg daily");
        assert_eq!(now["meta"]["versionId"], "1");
    }

    async fn the_patients_audit_trail_does_not_betray_a_staff_only_conversation(app: TestApp) {
        // Only staff-only activity about Ada: dr1 writes to dr2, dr2 reads it.
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let dr2 = client_with_token(&clinician_token(&app, "dr2"));
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Is she drinking again?"))).await;
        assert_eq!(s, 201);
        assert!(labelled(&v));
        let id = v["id"].as_str().unwrap();
        assert_eq!(send(&dr2, &app, "GET", &format!("Communication/{id}"), None).await.0, 200);
        let ada = client_with_token(&user_token(&app, "patient/*.rs patient/AuditEvent.rs", "Patient/ada", Some("ada")));
        let (s, b) = send(&ada, &app, "GET", "Patient/ada/$everything", None).await;
        assert_eq!(s, 200, "{b}");
        let staff_events: Vec<&Value> = b["entry"].as_array().unwrap().iter().map(|e| &e["resource"])
            .filter(|r| r["resourceType"] == "AuditEvent")
            .filter(|r| r.to_string().contains("Practitioner/dr1") || r.to_string().contains("Practitioner/dr2"))
            .collect();
        assert!(staff_events.is_empty(), "Ada learns that dr1 wrote and dr2 read something about her: {staff_events:?}");
    }

    async fn a_patients_socket_catch_up_skips_staff_only_messages(app: TestApp) {
        let ada_token = patient_token(&app, "ada");
        let (ws, _, seq) = Ws::open(&app, &ada_token, None).await;
        drop(ws);
        let staff = app.create(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Staff only")).await;
        let visible = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Hello Ada")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut ws, events, _) = Ws::open(&app, &ada_token, Some(seq)).await;
        let text = serde_json::to_string(&events).unwrap();
        assert!(text.contains(&visible), "the catch-up has the message to Ada: {text}");
        assert!(!text.contains(&staff), "the catch-up shows a staff-only message: {text}");
        assert!(ws.next_within(Duration::from_millis(300)).await.is_none());
        // From the very beginning too.
        let (_, events, _) = Ws::open(&app, &ada_token, Some(json!(0))).await;
        assert!(!serde_json::to_string(&events).unwrap().contains(&staff));
    }

    async fn a_patients_subscription_events_skip_staff_only_messages(app: TestApp) {
        let ada = client_with_token(&patient_token(&app, "ada"));
        let mut channel = json!({"type": "websocket", "payload": "application/fhir+json"});
        channel["_payload"] = json!({"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content", "valueCode": "full-resource"}]});
        let sub = json!({"resourceType": "Subscription", "status": "requested", "reason": "portal",
            "criteria": courier::messaging::subscriptions::TOPIC_COMMUNICATION, "channel": channel});
        let (s, v) = send(&ada, &app, "POST", "Subscription", Some(&sub)).await;
        assert_eq!(s, 201, "{v}");
        let sid = v["id"].as_str().unwrap().to_string();
        let staff = app.create(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Staff only note")).await;
        let visible = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Hello Ada")).await;
        let mut text = String::new();
        for _ in 0..50 {
            let (s, b) = send(&ada, &app, "GET", &format!("Subscription/{sid}/$events?content=full-resource"), None).await;
            assert_eq!(s, 200, "{b}");
            text = b.to_string();
            if text.contains(&visible) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(text.contains(&visible), "{text}");
        assert!(!text.contains(&staff) && !text.contains("Staff only note"), "{text}");
    }

    async fn a_staff_only_message_keeps_its_label_through_put_and_patch(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Staff only"))).await;
        assert_eq!(s, 201);
        let id = v["id"].as_str().unwrap().to_string();
        let mut dropped = v.clone();
        dropped.as_object_mut().unwrap().remove("meta");
        let (s, v2) = send(&dr1, &app, "PUT", &format!("Communication/{id}"), Some(&dropped)).await;
        assert_eq!(s, 200, "{v2}");
        assert!(labelled(&v2), "a PUT without meta.security unlabelled it: {v2}");
        let patch = json!([{"op": "remove", "path": "/meta/security"}]);
        let (s, v3) = send(&dr1, &app, "PATCH", &format!("Communication/{id}"), Some(&patch)).await;
        assert!(s == 200 || s >= 400, "{s} {v3}");
        let now = app.get_json(&format!("Communication/{id}")).await;
        assert!(labelled(&now), "a PATCH removed the label: {now}");
        let ada = client_with_token(&patient_token(&app, "ada"));
        assert_eq!(send(&ada, &app, "GET", &format!("Communication/{id}"), None).await.0, 404);
    }

    async fn a_staff_only_message_deleted_and_recreated_under_its_id_keeps_its_history_hidden(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let id = "staff-thread-1";
        let (s, v) = send(&dr1, &app, "PUT", &format!("Communication/{id}"), Some(&{
            let mut m = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "She is non-compliant, flag her");
            m["id"] = json!(id);
            m
        })).await;
        if s != 201 {
            // Users may not choose ids: nothing to attack here.
            return;
        }
        assert!(labelled(&v));
        assert_eq!(send(&dr1, &app, "DELETE", &format!("Communication/{id}"), None).await.0, 204);
        let mut to_ada = about("ada", "Practitioner/dr1", &["Patient/ada"], "Please book a review");
        to_ada["id"] = json!(id);
        let (s, v) = send(&dr1, &app, "PUT", &format!("Communication/{id}"), Some(&to_ada)).await;
        if s == 404 || s == 403 || s == 410 {
            // A deleted id cannot be taken again by a user: nothing to attack.
            return;
        }
        assert!(s == 200 || s == 201, "{s} {v}");
        let ada = client_with_token(&patient_token(&app, "ada"));
        let (s, _) = send(&ada, &app, "GET", &format!("Communication/{id}/_history/1"), None).await;
        assert_eq!(s, 404, "Ada reads the staff-only first version");
        let (_, h) = send(&ada, &app, "GET", &format!("Communication/{id}/_history"), None).await;
        assert!(!h.to_string().contains("non-compliant"), "{h}");
        let (_, h) = send(&ada, &app, "GET", "Communication/_history", None).await;
        assert!(!h.to_string().contains("non-compliant"), "{h}");
    }

    async fn a_message_that_becomes_staff_only_hides_its_new_version(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Draft to Ada"))).await;
        assert_eq!(s, 201);
        let id = v["id"].as_str().unwrap().to_string();
        let mut v2 = v.clone();
        v2["recipient"] = json!([{"reference": "Practitioner/dr2"}]);
        v2["payload"] = json!([{"contentString": "Actually: biopsy is malignant"}]);
        // A person cannot rewrite a sent message any more (422); an integrator may (it mirrors
        // an EHR's record), and its new version is then staff-only and hidden from Ada.
        assert_eq!(send(&dr1, &app, "PUT", &format!("Communication/{id}"), Some(&v2)).await.0, 422);
        let (s, v2) = send(&app.client, &app, "PUT", &format!("Communication/{id}"), Some(&v2)).await;
        assert_eq!(s, 200, "{v2}");
        assert!(labelled(&v2), "{v2}");
        let ada = client_with_token(&patient_token(&app, "ada"));
        let mut seen = String::new();
        for path in [format!("Communication/{id}"), format!("Communication/{id}/_history/2"), format!("Communication/{id}/_history"),
            "Communication/_history".into(), "Communication?_count=50".into(), "Patient/ada/$everything".into()] {
            let (_, b) = send(&ada, &app, "GET", &path, None).await;
            seen.push_str(&b.to_string());
        }
        assert!(!seen.contains("malignant"), "{seen}");
    }

    async fn a_transaction_cannot_open_a_staff_only_thread_to_the_patient(app: TestApp) {
        let before = app.row_counts();
        let header = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Critical K+, send to ED");
        let mut reply = about("ada", "Practitioner/dr1", &["Patient/ada"], "Please go to the ED");
        reply["partOf"] = json!([{"reference": "urn:uuid:8d5c5b7e-0000-4000-8000-000000000001"}]);
        // The reply comes first: an integrator loading a thread out of order.
        for (who, c, entries) in [
            ("clinician, header first", client_with_token(&clinician_token(&app, "dr1")), vec![
                json!({"fullUrl": "urn:uuid:8d5c5b7e-0000-4000-8000-000000000001", "resource": header, "request": {"method": "POST", "url": "Communication"}}),
                json!({"resource": reply, "request": {"method": "POST", "url": "Communication"}})]),
            ("system, reply first", app.client.clone(), vec![
                json!({"resource": reply, "request": {"method": "POST", "url": "Communication"}}),
                json!({"fullUrl": "urn:uuid:8d5c5b7e-0000-4000-8000-000000000001", "resource": header, "request": {"method": "POST", "url": "Communication"}})]),
        ] {
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
            let (s, b) = send(&c, &app, "POST", "", Some(&tx)).await;
            assert_eq!(s, 422, "{who}: a reply to the patient joined a staff-only thread: {b}");
        }
        assert_eq!(app.row_counts(), before);
    }

    async fn a_thread_reference_in_any_form_is_checked(app: TestApp) {
        let header = app.create(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Staff only thread")).await;
        let ada_thread = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Ada's thread")).await;
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let bob = client_with_token(&patient_token(&app, "bob"));
        let before = app.row_counts();
        // A reply to the patient into the staff-only thread, with the thread named in other forms.
        for r in [header.clone(), format!("{}/Communication/{header}", app.base), format!("Communication/{header}/_history/1")] {
            let mut m = about("ada", "Practitioner/dr1", &["Patient/ada"], "Looping Ada in");
            m["partOf"] = json!([{"reference": r}]);
            let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&m)).await;
            assert!(s == 422 || s == 403, "partOf {r}: {s} {v}");
        }
        // Bob into Ada's thread.
        for r in [ada_thread.clone(), format!("Communication/{ada_thread}/_history/1")] {
            let mut m = msg("Patient/bob", &["Practitioner/dr1"], "Me too");
            m["partOf"] = json!([{"reference": r}]);
            let (s, v) = send(&bob, &app, "POST", "Communication", Some(&m)).await;
            assert_eq!(s, 403, "Bob into Ada's thread as {r}: {v}");
        }
        assert_eq!(app.row_counts(), before);
    }

    async fn batch_and_conditional_create_do_not_reveal_a_staff_only_message(app: TestApp) {
        let mut m = about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Staff only");
        m["identifier"] = json!([{"system": "urn:x", "value": "secret-1"}]);
        let staff = app.create(&m).await;
        let ada = client_with_token(&patient_token(&app, "ada"));
        let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": format!("Communication/{staff}")}},
            {"request": {"method": "GET", "url": "Communication?identifier=urn:x|secret-1&_total=accurate"}},
            {"request": {"method": "GET", "url": format!("Communication/{staff}/_history")}}]});
        let (s, r) = send(&ada, &app, "POST", "", Some(&b)).await;
        assert_eq!(s, 200, "{r}");
        assert!(!r.to_string().contains("Staff only"), "{r}");
        assert_eq!(r["entry"][0]["response"]["status"].as_str().unwrap_or_default().split(' ').next(), Some("404"), "{r}");
        // If-None-Exist matching the hidden message creates Ada's own.
        let mut mine = msg("Patient/ada", &["Practitioner/dr1"], "Question");
        mine["category"] = json!([{"text": "question"}]);
        let r = ada.post(app.url("Communication")).header("content-type", FHIR_JSON).header("if-none-exist", "identifier=urn:x|secret-1")
            .body(mine.to_string()).send().await.unwrap();
        let s = r.status().as_u16();
        let t = r.text().await.unwrap();
        assert!(s == 201 || s == 400, "{s} {t}");
        assert!(!t.contains(&staff) && !t.contains("Staff only"), "{t}");
    }

    async fn a_message_between_a_clinician_and_another_patient_is_not_shown_to_its_subject(app: TestApp) {
        // Dr1 writes to Bob (Ada's husband, himself a patient) about Ada's care. Since issue 20
        // such a message cannot be written at all (a message about one patient is never sent to
        // another: Bob as Ada's representative is a RelatedPerson); and Ada sees nothing of it.
        let r = app.post("Communication", &about("ada", "Practitioner/dr1", &["Patient/bob"], "Bob, your own HIV result is back; about Ada's visit...")).await;
        assert_eq!(r.status(), 422, "a message about Ada to another patient is refused");
        let ada = client_with_token(&patient_token(&app, "ada"));
        let (_, b) = send(&ada, &app, "GET", "Communication?_total=accurate", None).await;
        assert_eq!(b["total"], 0, "{b}");
    }

    async fn a_nested_group_reaches_no_other_patient(app: TestApp) {
        let inner = app.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/bob"}}]})).await;
        let outer = app.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": format!("Group/{inner}")}}, {"entity": {"reference": "Practitioner/dr1"}}]})).await;
        let ada = client_with_token(&patient_token(&app, "ada"));
        let mut m = msg("Patient/ada", &[&format!("Group/{outer}")], "Hello all");
        m["category"] = json!([{"text": "question"}]);
        let (_s, _) = send(&ada, &app, "POST", "Communication", Some(&m)).await;
        let bob = client_with_token(&patient_token(&app, "bob"));
        let (_, b) = send(&bob, &app, "GET", "Communication?_total=accurate", None).await;
        assert_eq!(b["total"], 0, "Bob reads Ada's message through a nested group: {b}");
    }

    async fn a_related_person_sees_no_staff_only_message_and_cannot_export(app: TestApp) {
        let staff = app.create(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Staff only")).await;
        let mother = client_with_token(&user_token(&app, "patient/*.cruds", "RelatedPerson/ada-mother", Some("ada")));
        let mut seen = String::new();
        for path in [format!("Communication/{staff}"), "Communication?_total=accurate".into(), "Communication/$unread".into(),
            "Patient/ada/$everything".into(), format!("Communication/{staff}/$receipts")] {
            let (s, b) = send(&mother, &app, "GET", &path, None).await;
            // A 404 names the id asked for: that is no disclosure.
            if s != 404 {
                seen.push_str(&b.to_string());
            }
        }
        assert!(!seen.contains(&staff) && !seen.contains("Staff only"), "{seen}");
        let app_only = client_with_token(&patient_app_token(&app, "patient/*.rs", "ada"));
        let (s, b) = send(&app_only, &app, "GET", "Patient/ada/$everything", None).await;
        assert!(s == 403 || !b.to_string().contains(&staff), "{s} {b}");
        let (_, b) = send(&app_only, &app, "GET", "Communication?_total=accurate", None).await;
        assert!(!b.to_string().contains(&staff), "{b}");
    }
}

both_backends! {
    async fn a_patient_app_without_a_user_obeys_the_patient_limits(app: TestApp) {
        let ada_app = client_with_token(&patient_app_token(&app, "patient/*.cruds", "ada"));
        let before = app.row_counts();
        let mut long = msg("Patient/ada", &["Practitioner/dr1"], &"x".repeat(5013));
        long["category"] = json!([{"text": "question"}]);
        let (s, v) = send(&ada_app, &app, "POST", "Communication", Some(&long)).await;
        assert_eq!(s, 422, "a patient app sent 5,013 characters: {v}");
        let cr = json!({"resourceType": "CommunicationRequest", "status": "active", "requester": {"reference": "Patient/ada"},
            "category": [{"text": "question"}],
            "recipient": [{"reference": "Practitioner/dr1"}], "occurrenceDateTime": "2099-01-01T09:00:00Z",
            "payload": [{"contentString": "x".repeat(5013)}]});
        let (s, v) = send(&ada_app, &app, "POST", "CommunicationRequest", Some(&cr)).await;
        assert_eq!(s, 422, "a patient app scheduled 5,013 characters: {v}");
        assert_eq!(v["issue"][0]["expression"][0], "CommunicationRequest.payload[0].contentString", "{v}");
        assert_eq!(app.row_counts(), before);
    }
}

both_backends! {
    async fn a_patients_socket_hears_nothing_of_a_message_that_became_staff_only(app: TestApp) {
        let ada_token = patient_token(&app, "ada");
        let (mut ws, _, _) = Ws::open(&app, &ada_token, None).await;
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Hello Ada"))).await;
        assert_eq!(s, 201);
        let id = v["id"].as_str().unwrap().to_string();
        let e = ws.next().await.expect("Ada hears of the message to her");
        assert_eq!(e["id"], id.as_str(), "{e}");
        let mut v2 = v.clone();
        v2["recipient"] = json!([{"reference": "Practitioner/dr2"}]);
        v2["payload"] = json!([{"contentString": "Between us: prognosis is poor"}]);
        assert_eq!(send(&dr1, &app, "PUT", &format!("Communication/{id}"), Some(&v2)).await.0, 422, "a sent message is frozen for people");
        let (s, v2) = send(&app.client, &app, "PUT", &format!("Communication/{id}"), Some(&v2)).await;
        assert_eq!(s, 200, "{v2}");
        while let Some(e) = ws.next_within(Duration::from_millis(700)).await {
            assert!(!e.to_string().contains("prognosis"), "Ada's socket carried the staff-only version: {e}");
        }
        let (_, events, _) = Ws::open(&app, &ada_token, Some(json!(0))).await;
        assert!(!serde_json::to_string(&events).unwrap().contains("prognosis"));
    }

    async fn reverse_chains_and_has_do_not_reveal_a_staff_only_reply(app: TestApp) {
        let visible = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Your results")).await;
        let mut remark = about("ada", "Practitioner/dr2", &["Practitioner/dr1"], "Worrying trend");
        remark["inResponseTo"] = json!([{"reference": format!("Communication/{visible}")}]);
        app.create(&remark).await;
        let plain = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Unrelated")).await;
        let ada = client_with_token(&patient_token(&app, "ada"));
        for q in [
            "Communication?_has:Communication:in-response-to:sender=Practitioner/dr2".to_string(),
            format!("Communication?_has:Communication:in-response-to:_security={ACT_CODE}|NOPAT"),
            "Communication?_has:Communication:in-response-to:_id:missing=false".to_string(),
            format!("Communication?in-response-to:Communication._security={ACT_CODE}|NOPAT"),
        ] {
            let (s, b) = send(&ada, &app, "GET", &q, None).await;
            if s == 200 {
                let got = ids(&b);
                // Either both of Ada's messages match (the parameter was ignored) or neither.
                assert!(got.is_empty() || (got.contains(&visible) && got.contains(&plain)), "{q}: {b}");
            } else {
                assert_eq!(s, 400, "{q}: {b}");
            }
        }
    }

    async fn a_patient_app_without_a_user_cannot_make_a_group_or_care_team(app: TestApp) {
        let ada_app = client_with_token(&patient_app_token(&app, "patient/*.cruds", "ada"));
        // Ada's care team in the EHR, and what her clinicians send to it.
        let real = app.create(&json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/ada"},
            "participant": [{"member": {"reference": "Patient/ada"}}, {"member": {"reference": "Practitioner/dr1"}}]})).await;
        let to_team = app.create(&msg("Practitioner/dr2", &[&format!("CareTeam/{real}")], "Ada's biopsy result")).await;
        let before = app.row_counts();
        let joined = json!({"resourceType": "CareTeam", "id": real, "status": "active", "subject": {"reference": "Patient/ada"},
            "participant": [{"member": {"reference": "Patient/ada"}}, {"member": {"reference": "Practitioner/dr1"}}, {"member": {"reference": "Practitioner/nosy"}}]});
        let (s, v) = send(&ada_app, &app, "PUT", &format!("CareTeam/{real}"), Some(&joined)).await;
        assert_eq!(s, 403, "a patient app added someone to Ada's care team: {v}");
        let nosy = client_with_token(&clinician_token(&app, "nosy"));
        assert_eq!(send(&nosy, &app, "GET", &format!("Communication/{to_team}"), None).await.0, 404);
        let team = json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": "Patient/ada"},
            "participant": [{"member": {"reference": "Patient/ada"}}, {"member": {"reference": "Practitioner/nosy"}}]});
        let (s, v) = send(&ada_app, &app, "POST", "CareTeam", Some(&team)).await;
        assert_eq!(s, 403, "a patient app made a CareTeam: {v}");
        let group = json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/ada"}}, {"entity": {"reference": "Practitioner/nosy"}}]});
        let (s, v) = send(&ada_app, &app, "POST", "Group", Some(&group)).await;
        assert_eq!(s, 403, "a patient app made a Group: {v}");
        assert_eq!(app.row_counts(), before);
    }
}

both_backends! {
    async fn includes_never_bring_the_audit_trail_or_a_staff_only_thread_to_the_patient(app: TestApp) {
        let visible = app.create(&about("ada", "Practitioner/dr1", &["Patient/ada"], "Your results")).await;
        let mut remark = about("ada", "Practitioner/dr2", &["Practitioner/dr1"], "Worrying trend");
        remark["inResponseTo"] = json!([{"reference": format!("Communication/{visible}")}]);
        let hidden = app.create(&remark).await;
        let dr2 = client_with_token(&clinician_token(&app, "dr2"));
        assert_eq!(send(&dr2, &app, "GET", &format!("Communication/{hidden}"), None).await.0, 200);
        for token in [patient_token(&app, "ada"), user_token(&app, "patient/*.cruds", "RelatedPerson/ada-mother", Some("ada")),
            patient_app_token(&app, "patient/*.rs", "ada")] {
            let c = client_with_token(&token);
            for q in [
                format!("Communication?_id={visible}&_revinclude=AuditEvent:entity"),
                format!("Communication?_id={visible}&_revinclude:iterate=Communication:in-response-to&_revinclude:iterate=AuditEvent:entity"),
                format!("Communication?_id={visible}&_revinclude=*"),
                "AuditEvent?patient=Patient/ada".to_string(),
            ] {
                let (s, b) = send(&c, &app, "GET", &q, None).await;
                let text = b.to_string();
                assert!(s == 200 || s == 400 || s == 403, "{q}: {s} {b}");
                assert!(!text.contains(&hidden) && !text.contains("\"AuditEvent\""), "{q}: {b}");
            }
        }
    }
}

both_backends! {
    async fn the_patients_audit_trail_does_not_betray_a_deleted_staff_only_message(app: TestApp) {
        let dr1 = client_with_token(&clinician_token(&app, "dr1"));
        let dr2 = client_with_token(&clinician_token(&app, "dr2"));
        let (s, v) = send(&dr1, &app, "POST", "Communication", Some(&about("ada", "Practitioner/dr1", &["Practitioner/dr2"], "Is she drinking again?"))).await;
        assert_eq!(s, 201);
        let id = v["id"].as_str().unwrap();
        assert_eq!(send(&dr2, &app, "GET", &format!("Communication/{id}"), None).await.0, 200);
        assert_eq!(send(&dr1, &app, "DELETE", &format!("Communication/{id}"), None).await.0, 204);
        let ada = client_with_token(&user_token(&app, "patient/*.rs patient/AuditEvent.rs", "Patient/ada", Some("ada")));
        let (s, b) = send(&ada, &app, "GET", "Patient/ada/$everything", None).await;
        assert_eq!(s, 200, "{b}");
        let staff_events: Vec<&Value> = b["entry"].as_array().unwrap().iter().map(|e| &e["resource"])
            .filter(|r| r["resourceType"] == "AuditEvent")
            .filter(|r| r.to_string().contains("Practitioner/dr1") || r.to_string().contains("Practitioner/dr2"))
            .collect();
        assert!(staff_events.is_empty(), "Ada learns that dr1 wrote, dr2 read and dr1 deleted something about her: {staff_events:?}");
    }
}
