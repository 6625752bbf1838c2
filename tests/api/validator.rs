//! Every kind of body Courier emits, checked by an independent validator (PyPI `fhir.resources`,
//! R4B models) in `tests/validate/validate_fhir.py`.

use crate::helpers::*;
use serde_json::{json, Value};
use std::io::Write;
use std::process::{Command, Stdio};

fn python() -> String {
    std::env::var("COURIER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn validator_available() -> bool {
    let ok = Command::new(python())
        .args(["-c", "import fhir.resources.R4B"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but the validator (python3 with fhir.resources) is not installed");
    }
    ok
}

#[tokio::test]
async fn every_response_kind_validates_with_an_independent_validator() {
    if !validator_available() {
        eprintln!("skipped: python3 with fhir.resources is not installed");
        return;
    }
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let mut docs: Vec<Value> = Vec::new();
    let mut body = message("Patient/p1", "2024-01-01T10:00:00Z", "hello");
    body["category"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "notification"}]}]);
    let r = app.post("Communication", &body).await;
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    docs.push(created.clone());
    let thread = app
        .create(&json!({"resourceType": "Communication", "status": "in-progress"}))
        .await;
    let mut reply = message("Practitioner/dr-1", "2024-01-02T10:00:00Z", "reply");
    reply["partOf"] = json!([{"reference": format!("Communication/{thread}")}]);
    reply["inResponseTo"] = json!([{"reference": format!("Communication/{id}")}]);
    docs.push(
        app.post("Communication", &reply)
            .await
            .json()
            .await
            .unwrap(),
    );
    docs.push(app.post("CommunicationRequest", &json!({"resourceType": "CommunicationRequest", "status": "active", "occurrenceDateTime": "2025-01-01T09:00:00Z", "payload": [{"contentString": "Reminder"}]})).await.json().await.unwrap());
    let bin = app
        .client
        .post(app.url("Binary"))
        .header("content-type", "image/png")
        .body(b"\x89PNG\r\n\x1a\n\x01\x02\x03".to_vec())
        .send()
        .await
        .unwrap();
    let bin: Value = bin.json().await.unwrap();
    docs.push(
        app.client
            .get(app.url(&format!("Binary/{}", bin["id"].as_str().unwrap())))
            .header("accept", FHIR_JSON)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    let mut updated = created.clone();
    updated["status"] = json!("entered-in-error");
    docs.push(
        app.put(&format!("Communication/{id}"), &updated)
            .await
            .json()
            .await
            .unwrap(),
    );
    // Bundles: searchset (with include and outcome entries), history, transaction-response, batch-response.
    docs.push(app.get_json(&format!("Communication?_id={id},{thread}&_revinclude=Communication:in-response-to&_total=accurate&bogus=1")).await);
    docs.push(app.get_json("Communication?_count=1").await);
    docs.push(app.get_json(&format!("Communication/{id}/_history")).await);
    let del = app
        .create(&message("Patient/p1", "2024-01-01", "to delete"))
        .await;
    app.client
        .delete(app.url(&format!("Communication/{del}")))
        .send()
        .await
        .unwrap();
    docs.push(app.get_json("Communication/_history").await);
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a", "resource": {"resourceType": "Communication", "status": "completed"}, "request": {"method": "POST", "url": "Communication"}},
        {"request": {"method": "GET", "url": format!("Communication/{id}")}}]});
    docs.push(app.post("", &tx).await.json().await.unwrap());
    let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Communication", "status": "bogus"}, "request": {"method": "POST", "url": "Communication"}},
        {"request": {"method": "GET", "url": "Communication?status=completed"}},
        {"request": {"method": "DELETE", "url": format!("Communication/{id}")}}]});
    docs.push(app.post("", &batch).await.json().await.unwrap());
    docs.push(app.get_json("metadata").await);
    // OperationOutcomes: invalid resource, 404, 410, 412, 406.
    docs.push(
        app.post(
            "Communication",
            &json!({"resourceType": "Communication", "status": "x"}),
        )
        .await
        .json()
        .await
        .unwrap(),
    );
    docs.push(app.get("Communication/missing").await.json().await.unwrap());
    docs.push(
        app.get(&format!("Communication/{del}"))
            .await
            .json()
            .await
            .unwrap(),
    );
    docs.push(
        app.client
            .get(app.url("Communication"))
            .header("accept", "application/fhir+xml")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    docs.push(
        app.client
            .post(app.url("Communication"))
            .header("content-type", FHIR_JSON)
            .header("prefer", "return=OperationOutcome")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    // Authorization answers: 401 without a token, 403 for a type outside the token's scopes.
    docs.push(
        app.anonymous
            .get(app.url("Communication"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    let narrow = client_with_token(&issue(
        &app.tokens,
        &app.admin_client_id,
        "system/CommunicationRequest.rs",
        None,
        None,
    ));
    docs.push(
        narrow
            .get(app.url("Communication"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap(),
    );
    // Messaging: receipts and unread counts (Parameters), a Subscription, its $status and
    // $events Bundles, and a subscription notification's shape.
    let patient = client_with_token(&issue(
        &app.tokens,
        &app.admin_client_id,
        "patient/Communication.rus",
        Some("Patient/p9"),
        Some("p9"),
    ));
    let to_p9 = app
        .create(&message("Patient/p9", "2024-01-03T10:00:00Z", "for p9"))
        .await;
    for (method, path) in [
        ("POST", format!("Communication/{to_p9}/$mark-read")),
        ("GET", format!("Communication/{to_p9}/$receipts")),
        ("GET", "Communication/$unread".to_string()),
    ] {
        let r = if method == "POST" {
            patient.post(app.url(&path)).send().await.unwrap()
        } else {
            patient.get(app.url(&path)).send().await.unwrap()
        };
        assert!(r.status().is_success(), "{path}");
        docs.push(r.json().await.unwrap());
    }
    let sub = json!({"resourceType": "Subscription", "status": "requested", "reason": "validator",
        "criteria": courier::messaging::subscriptions::TOPIC_COMMUNICATION,
        "_criteria": {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-filter-criteria", "valueString": "Communication?recipient=Patient/p9"}]},
        "channel": {"type": "websocket", "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content", "valueCode": "full-resource"}]}}});
    let created_sub: Value = app.post("Subscription", &sub).await.json().await.unwrap();
    let sub_id = created_sub["id"]
        .as_str()
        .expect("a subscription")
        .to_string();
    docs.push(created_sub);
    app.create(&message("Patient/p9", "2024-01-04T10:00:00Z", "notify me"))
        .await;
    let mut events = Value::Null;
    for _ in 0..50 {
        events = app
            .get_json(&format!("Subscription/{sub_id}/$events"))
            .await;
        if events["entry"].as_array().is_some_and(|e| e.len() > 1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(events["entry"].as_array().unwrap().len() > 1, "{events}");
    docs.push(events);
    docs.push(
        app.get_json(&format!("Subscription/{sub_id}/$status"))
            .await,
    );
    docs.push(app.get_json("Subscription").await);
    docs.push(app.get_json("Patient/p9/$everything").await);
    // The compliance operations' answers: a legal hold, an erasure, an emergency-access grant (whose
    // BTG AuditEvents are among those validated below).
    let hold = |action: &str| {
        json!({"resourceType": "Parameters", "parameter": [
        {"name": "action", "valueCode": action}, {"name": "reason", "valueString": "matter 1"}]})
    };
    for action in ["place", "release"] {
        let r = app
            .client
            .post(app.url("Patient/p8/$legal-hold"))
            .json(&hold(action))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        docs.push(r.json().await.unwrap());
    }
    let r = app
        .client
        .post(app.url("Patient/p8/$erase"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    docs.push(r.json().await.unwrap());
    let glass = client_with_token(&issue(
        &app.tokens,
        &app.admin_client_id,
        "user/Communication.rs",
        Some("Practitioner/dr-7"),
        None,
    ));
    let r = glass
        .post(app.url("Patient/p9/$emergency-access"))
        .json(&json!({"resourceType": "Parameters", "parameter": [{"name": "reason", "valueString": "covering the night shift"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    docs.push(r.json().await.unwrap());
    glass
        .get(app.url("Communication?recipient=Patient/p9"))
        .send()
        .await
        .unwrap();
    // A user's request, so its AuditEvents carry a user agent with the token id.
    let user = client_with_token(&issue(
        &app.tokens,
        &app.admin_client_id,
        "user/Communication.rs",
        Some("Practitioner/dr-1"),
        None,
    ));
    user.get(app.url("Communication")).send().await.unwrap();
    // AuditEvents of every kind recorded so far (create, read, update, delete, search, failures,
    // and the failed authentications).
    let audits = app.get_json("AuditEvent?_count=500").await;
    let kinds: std::collections::BTreeSet<String> = audits["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            e["resource"]["subtype"][0]["code"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for k in [
        "create",
        "read",
        "update",
        "delete",
        "search-type",
        "history-instance",
        "transaction",
        "batch",
        "110122",
    ] {
        assert!(kinds.contains(k), "no {k} AuditEvent in {kinds:?}");
    }
    docs.push(audits);

    let kinds: std::collections::BTreeSet<String> = docs
        .iter()
        .map(|d| match d["type"].as_str() {
            Some(t) if d["resourceType"] == "Bundle" => format!("Bundle/{t}"),
            _ => d["resourceType"].as_str().unwrap().to_string(),
        })
        .collect();
    for k in [
        "Communication",
        "CommunicationRequest",
        "Binary",
        "OperationOutcome",
        "CapabilityStatement",
        "Bundle/searchset",
        "Bundle/history",
        "Bundle/transaction-response",
        "Bundle/batch-response",
    ] {
        assert!(kinds.contains(k), "{k} not covered");
    }
    let mut child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/validate/validate_fhir.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&docs).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "validator rejected Courier's output:\n{report}"
    );
}
