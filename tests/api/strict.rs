//! Bad input gets a 4xx OperationOutcome naming the element, and changes nothing.

use crate::both_backends;
use crate::helpers::*;
use serde_json::{json, Value};

/// Posts `body` as text and asserts: `status`, an OperationOutcome whose first issue's expression is
/// `expression` (when given), and unchanged row counts.
pub(crate) async fn rejected(
    app: &TestApp,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
    status: u16,
    expression: Option<&str>,
) {
    let before = app.row_counts();
    let req = match method {
        "PUT" => app.client.put(app.url(path)),
        _ => app.client.post(app.url(path)),
    };
    let r = req
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), status, "{method} {path} {body}");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/fhir+json"));
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome", "{oo}");
    assert_eq!(oo["issue"][0]["severity"], "error");
    if let Some(e) = expression {
        let exprs: Vec<&str> = oo["issue"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["expression"][0].as_str())
            .collect();
        assert!(exprs.contains(&e), "expected {e} in {oo}");
    }
    assert_eq!(
        before,
        app.row_counts(),
        "rejected input changed the database"
    );
}

both_backends! {
    async fn invalid_resources_are_rejected_naming_the_element(app: TestApp) {
        let cases: Vec<(Value, &str)> = vec![
            (json!({"resourceType": "Communication", "status": "completed", "foo": 1}), "Communication.foo"),
            (json!({"resourceType": "Communication", "status": "completed", "payload": [{"contentString": "x", "contentBoolean": true}]}), "Communication.payload[0].contentBoolean"),
            (json!({"resourceType": "CommunicationRequest", "status": "active", "occurrenceDateTime": "not-a-date"}), "CommunicationRequest.occurrenceDateTime"),
            (json!({"resourceType": "Communication", "status": "completed", "extension": [{"url": "http://x", "valueBoolean": "yes"}]}), "Communication.extension[0].valueBoolean"),
            (json!({"resourceType": "Communication", "status": "bogus"}), "Communication.status"),
            (json!({"resourceType": "Communication", "status": "completed", "sent": "2024-13-45"}), "Communication.sent"),
            (json!({"resourceType": "Communication", "status": "completed", "sent": 20240101}), "Communication.sent"),
            (json!({"resourceType": "Communication", "status": "completed", "recipient": {"reference": "Patient/1"}}), "Communication.recipient"),
            (json!({"resourceType": "Communication", "status": "completed", "note": []}), "Communication.note"),
            (json!({"resourceType": "Communication", "status": "completed", "note": [{"text": null}]}), "Communication.note[0].text"),
            (json!({"resourceType": "Communication", "id": "bad id!", "status": "completed"}), "Communication.id"),
            (json!({"resourceType": "Communication"}), "Communication"),
        ];
        for (body, expr) in cases {
            let rt = body["resourceType"].as_str().unwrap().to_string();
            rejected(&app, "POST", &rt, FHIR_JSON, &body.to_string(), 400, Some(expr)).await;
        }
    }

    async fn mismatched_types_and_ids_are_rejected(app: TestApp) {
        let c = json!({"resourceType": "CommunicationRequest", "status": "active"});
        rejected(&app, "POST", "Communication", FHIR_JSON, &c.to_string(), 400, Some("resourceType")).await;
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let mut body = message("Patient/p1", "2024-01-01", "x");
        body["id"] = json!("other-id");
        rejected(&app, "PUT", &format!("Communication/{id}"), FHIR_JSON, &body.to_string(), 400, Some("Communication.id")).await;
        let body = message("Patient/p1", "2024-01-01", "x");
        rejected(&app, "PUT", &format!("Communication/{id}"), FHIR_JSON, &body.to_string(), 400, Some("Communication.id")).await;
    }

    async fn malformed_bodies_and_formats_are_rejected(app: TestApp) {
        rejected(&app, "POST", "Communication", FHIR_JSON, "{\"resourceType\": \"Communication\",", 400, None).await;
        rejected(&app, "POST", "Communication", FHIR_JSON, "[1, 2]", 400, None).await;
        rejected(&app, "POST", "Communication", FHIR_JSON, "{\"resourceType\":\"Communication\",\"status\":\"completed\",\"status\":\"completed\"}", 400, None).await;
        rejected(&app, "POST", "Communication", "application/fhir+xml", "<Communication xmlns=\"http://hl7.org/fhir\"/>", 415, None).await;
        rejected(&app, "POST", "Communication", "text/plain", "hello", 415, None).await;
        let r = app.client.get(app.url("Communication")).header("accept", "application/fhir+xml").send().await.unwrap();
        assert_eq!(r.status(), 406);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(app.get("Communication?_format=xml").await.status(), 406);
        assert_eq!(app.get("Communication?_format=json").await.status(), 200);
        let r = app.client.get(app.url("Communication")).header("accept", "application/json").send().await.unwrap();
        assert_eq!(r.status(), 200);
        // application/json is accepted for bodies too.
        let r = app.client.post(app.url("Communication")).header("content-type", "application/json")
            .body(message("Patient/p1", "2024-01-01", "x").to_string()).send().await.unwrap();
        assert_eq!(r.status(), 201);
    }
}

#[tokio::test]
async fn bodies_over_the_size_limit_get_413_and_change_nothing() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.max_resource_bytes = 2000)
        .await
        .unwrap();
    let big = message("Patient/p1", "2024-01-01", &"x".repeat(3000));
    rejected(
        &app,
        "POST",
        "Communication",
        FHIR_JSON,
        &big.to_string(),
        413,
        None,
    )
    .await;
}

both_backends! {
    async fn review_edge_cases_are_4xx_and_change_nothing(app: TestApp) {
        // A key repeated inside a nested object would be stored ambiguously: refused.
        rejected(&app, "POST", "Communication", FHIR_JSON,
            r#"{"resourceType":"Communication","status":"completed","subject":{"reference":"Patient/evil","reference":"Patient/1"}}"#, 400, None).await;
        // An If-None-Exist that narrows nothing would match any resource: refused.
        let before = app.row_counts();
        let r = app.client.post(app.url("Communication")).header("content-type", FHIR_JSON).header("if-none-exist", "_count=1")
            .body(message("Patient/p1", "2024-01-01", "x").to_string()).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(before, app.row_counts());
        // Paging and value limits.
        assert_eq!(app.get("Communication?_offset=9223372036854775808").await.status(), 400);
        let many = vec!["a"; 101].join(",");
        assert_eq!(app.get(&format!("Communication?_id={many}")).await.status(), 400);
        // DELETE with If-Match on something that does not exist: 412, not 204.
        let r = app.client.delete(app.url("Communication/nothing-here")).header("if-match", "W/\"1\"").send().await.unwrap();
        assert_eq!(r.status(), 412);
        // A transaction writing one resource twice is ambiguous: refused, nothing written.
        let mut c = message("Patient/p1", "2024-01-01", "x");
        c["id"] = serde_json::json!("twice");
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": c.clone(), "request": {"method": "PUT", "url": "Communication/twice"}},
            {"resource": c, "request": {"method": "PUT", "url": "Communication/twice"}}]});
        let r = app.post("", &tx).await;
        assert_eq!(r.status(), 400);
        assert_eq!(before, app.row_counts());
    }
}
