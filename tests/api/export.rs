//! GDPR right of access: everything Courier holds about a patient, to the patient and to an
//! administrator, through the API and the command line.

use crate::both_backends;
use crate::helpers::*;
use courier::auth::clients;
use serde_json::{json, Value};

fn token(app: &TestApp, scope: &str, user: Option<&str>, patient: Option<&str>) -> reqwest::Client {
    let id = clients::add(
        &app.store,
        "export test",
        clients::KeySource::Document(es384_key().1.to_string()),
        "system/*.rs",
    )
    .unwrap();
    client_with_token(&issue(&app.tokens, &id, scope, user, patient))
}

fn resources(bundle: &Value, t: &str) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .filter(|r| r["resourceType"] == t)
        .collect()
}

both_backends! {
    async fn a_patient_gets_everything_held_about_them_and_nothing_else(app: TestApp) {
        let bin = app.create(&json!({"resourceType": "Binary", "contentType": "image/png", "data": "iVBORw0KGgo="})).await;
        let mut to_p1 = message("Patient/p1", "2026-11-01T10:00:00Z", "Your scan is attached");
        to_p1["payload"] = json!([{"contentString": "Your scan is attached"}, {"contentAttachment": {"contentType": "image/png", "url": format!("Binary/{bin}")}}]);
        let to_p1 = app.create(&to_p1).await;
        let from_p1 = app.create(&json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Patient/p1"},
            "recipient": [{"reference": "Practitioner/dr-1"}], "payload": [{"contentString": "Thanks"}]})).await;
        let to_p2 = app.create(&message("Patient/p2", "2026-11-01T11:00:00Z", "Private to p2")).await;
        // The patient's own request is theirs; a clinician's, not sent yet, is not (what reaches
        // the patient is the message it becomes).
        let request = app.create(&json!({"resourceType": "CommunicationRequest", "status": "active", "subject": {"reference": "Patient/p1"},
            "requester": {"reference": "Patient/p1"},
            "recipient": [{"reference": "Practitioner/dr-1"}], "payload": [{"contentString": "Please renew my prescription"}]})).await;
        let scheduled = app.create(&json!({"resourceType": "CommunicationRequest", "status": "active", "subject": {"reference": "Patient/p1"},
            "requester": {"reference": "Practitioner/dr-1"}, "occurrenceDateTime": "2099-01-01T09:00:00Z",
            "recipient": [{"reference": "Patient/p1"}], "payload": [{"contentString": "Fasting from midnight"}]})).await;
        // The audit trail is the patient's to see when the token's scopes name AuditEvent.
        let p1 = token(&app, "patient/*.rs patient/Communication.u patient/AuditEvent.rs", Some("Patient/p1"), Some("p1"));
        assert_eq!(p1.post(app.url(&format!("Communication/{to_p1}/$mark-read"))).send().await.unwrap().status(), 200);
        // A clinician reads p1's message: that access is p1's to see.
        let dr = token(&app, "user/*.rs", Some("Practitioner/dr-1"), None);
        assert_eq!(dr.get(app.url(&format!("Communication/{from_p1}"))).send().await.unwrap().status(), 200);

        let r = p1.get(app.url("Patient/p1/$everything")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["type"], "collection");
        let mut comms: Vec<String> = resources(&b, "Communication").iter().map(|r| r["id"].as_str().unwrap().to_string()).collect();
        comms.sort();
        let mut expect = vec![to_p1.clone(), from_p1.clone()];
        expect.sort();
        assert_eq!(comms, expect);
        let requests = resources(&b, "CommunicationRequest");
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0]["id"], request.as_str());
        assert!(!b.to_string().contains(&scheduled) && !b.to_string().contains("Fasting"));
        assert_eq!(resources(&b, "Binary")[0]["id"], bin.as_str());
        let receipts = resources(&b, "Parameters");
        assert!(receipts[0].to_string().contains(&to_p1) && receipts[0].to_string().contains("\"read\""));
        let audits = resources(&b, "AuditEvent");
        assert!(audits.iter().any(|a| a.to_string().contains("Practitioner/dr-1") && a.to_string().contains(&from_p1)),
            "the clinician's read of p1's message is in p1's export");
        let text = b.to_string();
        assert!(!text.contains(&to_p2) && !text.contains("Private to p2"), "nothing about another patient");

        // Another patient may not; an administrator with full read access may; a narrow system token may not.
        let p2 = token(&app, "patient/*.rs", Some("Patient/p2"), Some("p2"));
        assert_eq!(p2.get(app.url("Patient/p1/$everything")).send().await.unwrap().status(), 403);
        let narrow = token(&app, "system/Communication.rs", None, None);
        assert_eq!(narrow.get(app.url("Patient/p1/$everything")).send().await.unwrap().status(), 403);
        let admin: Value = app.client.get(app.url("Patient/p1/$everything")).send().await.unwrap().json().await.unwrap();
        assert_eq!(resources(&admin, "Communication").len(), 2);
        // The export itself is audited, about p1.
        let trail = app.get_json("AuditEvent?patient=Patient/p1&subtype=operation&_count=50").await;
        assert!(trail["entry"].as_array().unwrap().len() >= 2, "{trail}");

        // The same from the command line (SQLite: the test's own data directory).
        if app.backend == Backend::Sqlite {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
                .args(["export", "--patient", "p1"])
                .env("COURIER_DATA_DIR", app.dir.path())
                .env("COURIER_DATABASE_URL", &app.database_url)
                .env("COURIER_MASTER_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
                .env("COURIER_BASE_URL", &app.base)
                .env("COURIER_LOG", "error")
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(resources(&cli, "Communication").len(), 2);
            assert!(!cli.to_string().contains("Private to p2"));
        }
    }
}
