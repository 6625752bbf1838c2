use crate::both_backends;
use crate::helpers::*;
use base64::Engine;
use serde_json::Value;

async fn audit_events(app: &TestApp, query: &str) -> Vec<Value> {
    let b = app
        .get_json(&format!("AuditEvent?{query}&_count=200"))
        .await;
    b["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"].clone())
        .collect()
}

fn has_request_id(ev: &Value, id: &str) -> bool {
    ev["entity"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"]["code"] == "XrequestId" && e["what"]["identifier"]["value"] == id)
}

both_backends! {
    async fn every_interaction_is_audited_per_balp(app: TestApp) {
        let r = app.client.post(app.url("Communication")).header("content-type", FHIR_JSON).header("x-request-id", "req-create-1")
            .body(message("Patient/p7", "2024-01-01", "top secret words").to_string()).send().await.unwrap();
        assert_eq!(r.headers()["x-request-id"], "req-create-1");
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        app.client.get(app.url(&format!("Communication/{id}"))).header("x-request-id", "req-read-1").send().await.unwrap();
        app.client.get(app.url("Communication?recipient=Patient/p7")).header("x-request-id", "req-search-1").send().await.unwrap();
        app.client.get(app.url("Communication/nope")).header("x-request-id", "req-fail-1").send().await.unwrap();

        let create = audit_events(&app, "subtype=create").await;
        let create = create.iter().find(|e| has_request_id(e, "req-create-1")).expect("create audited");
        assert_eq!(create["action"], "C");
        assert_eq!(create["outcome"], "0");
        assert_eq!(create["meta"]["profile"][0], "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientCreate");
        assert_eq!(create["type"]["code"], "rest");
        assert!(create["entity"].as_array().unwrap().iter().any(|e| e["role"]["code"] == "1" && e["what"]["reference"] == "Patient/p7"));
        assert!(create["entity"].as_array().unwrap().iter().any(|e| e["what"]["reference"] == format!("Communication/{id}/_history/1")));
        let agents = create["agent"].as_array().unwrap();
        assert_eq!(agents[0]["network"]["address"], "127.0.0.1");
        assert_eq!(agents[0]["type"]["coding"][0]["code"], "110153");
        assert_eq!(agents[1]["type"]["coding"][0]["code"], "110152");
        // No message content in the audit trail.
        assert!(!create.to_string().contains("top secret"));

        let read = audit_events(&app, "subtype=read").await;
        let read = read.iter().find(|e| has_request_id(e, "req-read-1")).expect("read audited");
        assert_eq!(read["action"], "R");
        assert_eq!(read["meta"]["profile"][0], "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead");
        assert_eq!(read["agent"][0]["type"]["coding"][0]["code"], "110152");

        let search = audit_events(&app, "subtype=search-type").await;
        let search = search.iter().find(|e| has_request_id(e, "req-search-1")).expect("search audited");
        assert_eq!(search["action"], "E");
        let q = search["entity"].as_array().unwrap().iter().find(|e| e["role"]["code"] == "24").unwrap();
        let decoded = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(q["query"].as_str().unwrap()).unwrap()).unwrap();
        assert!(decoded.starts_with("GET ") && decoded.contains("recipient=Patient/p7"), "{decoded}");

        let failed = audit_events(&app, "outcome=4").await;
        let failed = failed.iter().find(|e| has_request_id(e, "req-fail-1")).expect("failed read audited");
        assert_eq!(failed["contained"][0]["resourceType"], "OperationOutcome");
        assert!(failed.get("meta").is_none() || failed["meta"].get("profile").is_none());

        // Searching AuditEvents by patient and date works.
        assert!(!audit_events(&app, "patient=Patient/p7").await.is_empty());
        assert!(!audit_events(&app, "date=ge2020-01-01").await.is_empty());
    }

    async fn a_write_and_its_audit_commit_together(app: TestApp) {
        let before = audit_events(&app, "subtype=create").await.len();
        let tx = serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": message("Patient/p1", "2024-01-02", "y"), "request": {"method": "POST", "url": "Communication"}},
            {"resource": message("Patient/p1", "2024-01-03", "z"), "request": {"method": "POST", "url": "Communication"}}
        ]});
        assert_eq!(app.post("", &tx).await.status(), 200);
        assert_eq!(audit_events(&app, "subtype=create").await.len(), before + 2);
    }
}
