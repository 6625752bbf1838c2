//! Emergency access ("break the glass"): a clinician reads a patient's messages outside their
//! compartment for a limited time, with a reason, read-only, audited as BTG, listed for review.

use crate::both_backends;
use crate::helpers::*;
use courier::auth::clients;
use serde_json::{json, Value};

fn token(app: &TestApp, scope: &str, user: &str, patient: Option<&str>) -> reqwest::Client {
    let id = clients::add(
        &app.store,
        "emergency test",
        clients::KeySource::Document(es384_key().1.to_string()),
        scope,
    )
    .unwrap();
    client_with_token(&issue(&app.tokens, &id, scope, Some(user), patient))
}

fn reason(text: &str) -> Value {
    json!({"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": text}]})
}

both_backends! {
    async fn a_clinician_breaks_the_glass_to_read_one_patient_for_a_limited_time(app: TestApp) {
        let to_p1 = app.create(&message("Patient/p1", "2026-11-01T10:00:00Z", "p1's results")).await;
        let to_p2 = app.create(&message("Patient/p2", "2026-11-01T10:00:00Z", "p2's results")).await;
        let dr2 = token(&app, "user/*.cruds", "Practitioner/dr-2", None);
        // Not dr-2's: invisible.
        assert_eq!(dr2.get(app.url(&format!("Communication/{to_p1}"))).send().await.unwrap().status(), 404);

        // A reason is required; patients and backend services cannot break the glass.
        let r = dr2.post(app.url("Patient/p1/$emergency-access")).json(&reason("urgent")).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let patient = token(&app, "patient/*.rs", "Patient/p2", Some("p2"));
        assert_eq!(patient.post(app.url("Patient/p1/$emergency-access")).json(&reason("I want to see it")).send().await.unwrap().status(), 403);
        assert_eq!(app.client.post(app.url("Patient/p1/$emergency-access")).json(&reason("system client asking")).send().await.unwrap().status(), 403);

        let r = dr2.post(app.url("Patient/p1/$emergency-access"))
            .json(&reason("Covering for dr-1: patient in the emergency department")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let granted: Value = r.json().await.unwrap();
        assert!(granted.to_string().contains("expires"));
        // Now p1's messages read and search; p2's still do not; nothing may be written.
        assert_eq!(dr2.get(app.url(&format!("Communication/{to_p1}"))).send().await.unwrap().status(), 200);
        let found: Value = dr2.get(app.url("Communication?recipient=Patient/p1")).send().await.unwrap().json().await.unwrap();
        assert_eq!(found["entry"].as_array().map_or(0, |e| e.len()), 1, "{found}");
        assert_eq!(dr2.get(app.url(&format!("Communication/{to_p2}"))).send().await.unwrap().status(), 404);
        let mut edited = app.get_json(&format!("Communication/{to_p1}")).await;
        edited["status"] = json!("entered-in-error");
        let w = dr2.put(app.url(&format!("Communication/{to_p1}"))).json(&edited).send().await.unwrap().status();
        assert!(w == 403 || w == 404, "read-only: {w}");

        // Audited as break-the-glass: the grant and the reads under it.
        let trail = app.get_json("AuditEvent?agent=Practitioner/dr-2&_count=100").await;
        let btg = trail["entry"].as_array().unwrap().iter()
            .filter(|e| e["resource"]["purposeOfEvent"].to_string().contains("BTG")).count();
        assert!(btg >= 3, "the grant and the reads are BTG-audited ({btg}): {trail}");
        // Listed for review.
        let grants = courier::compliance::emergency::list(&app.store, 0).unwrap();
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].user_ref, "Practitioner/dr-2");
        assert!(grants[0].reason.contains("Covering for dr-1"));

        // When it expires, access ends.
        app.store.execute("UPDATE emergency_access SET expires_at = 0", vec![]).unwrap();
        assert_eq!(dr2.get(app.url(&format!("Communication/{to_p1}"))).send().await.unwrap().status(), 404);
    }
}
