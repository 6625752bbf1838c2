use crate::both_backends;
use crate::helpers::*;
use serde_json::{json, Value};

both_backends! {
    async fn transaction_resolves_urn_uuid_references_between_entries(app: TestApp) {
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
             "resource": {"resourceType": "Communication", "status": "in-progress", "topic": {"text": "Lab results"}},
             "request": {"method": "POST", "url": "Communication"}},
            {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
             "resource": {"resourceType": "Communication", "status": "completed",
                          "partOf": [{"reference": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}],
                          "payload": [{"contentString": "Your results are ready"}]},
             "request": {"method": "POST", "url": "Communication"}},
            {"resource": {"resourceType": "CommunicationRequest", "id": "reminder-1", "status": "active"},
             "request": {"method": "PUT", "url": "CommunicationRequest/reminder-1"}}
        ]});
        let r = app.post("", &tx).await;
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["type"], "transaction-response");
        let entries = b["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0]["response"]["status"], "201 Created");
        assert_eq!(entries[2]["response"]["status"], "201 Created");
        let thread_id = entries[0]["resource"]["id"].as_str().unwrap();
        let msg_id = entries[1]["resource"]["id"].as_str().unwrap();
        let msg = app.get_json(&format!("Communication/{msg_id}")).await;
        assert_eq!(msg["partOf"][0]["reference"], format!("Communication/{thread_id}"));
        assert_eq!(app.search_ids(&format!("Communication?part-of=Communication/{thread_id}")).await, vec![msg_id.to_string()]);
        assert!(entries[1]["response"]["location"].as_str().unwrap().contains(msg_id));
    }

    async fn a_failing_transaction_changes_nothing(app: TestApp) {
        let existing = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let before = app.row_counts();
        // Second entry is invalid: nothing of the first may remain.
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": message("Patient/p1", "2024-01-02", "y"), "request": {"method": "POST", "url": "Communication"}},
            {"resource": {"resourceType": "Communication", "status": "bogus"}, "request": {"method": "POST", "url": "Communication"}}
        ]});
        let r = app.post("", &tx).await;
        assert_eq!(r.status(), 400);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["expression"][0], "Bundle.entry[1].resource.Communication.status");
        assert_eq!(before, app.row_counts());
        // A failure found only inside the database transaction (stale If-Match) rolls back the rest.
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": message("Patient/p1", "2024-01-02", "y"), "request": {"method": "POST", "url": "Communication"}},
            {"request": {"method": "DELETE", "url": format!("Communication/{existing}"), "ifMatch": "W/\"7\""}}
        ]});
        let r = app.post("", &tx).await;
        assert_eq!(r.status(), 412);
        assert_eq!(before, app.row_counts());
        assert_eq!(app.get(&format!("Communication/{existing}")).await.status(), 200);
    }

    async fn batch_answers_each_entry_on_its_own(app: TestApp) {
        let existing = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": message("Patient/p1", "2024-01-02", "y"), "request": {"method": "POST", "url": "Communication"}},
            {"resource": {"resourceType": "Communication", "status": "bogus"}, "request": {"method": "POST", "url": "Communication"}},
            {"request": {"method": "GET", "url": format!("Communication/{existing}")}},
            {"request": {"method": "GET", "url": "Communication?recipient=Patient/p1"}},
            {"request": {"method": "DELETE", "url": format!("Communication/{existing}")}},
            {"request": {"method": "GET", "url": "Communication/missing"}}
        ]});
        let r = app.post("", &batch).await;
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["type"], "batch-response");
        let status: Vec<&str> = b["entry"].as_array().unwrap().iter().map(|e| e["response"]["status"].as_str().unwrap()).collect();
        assert_eq!(status, vec!["201 Created", "400 Bad Request", "200 OK", "200 OK", "204 No Content", "404 Not Found"]);
        assert_eq!(b["entry"][1]["response"]["outcome"]["resourceType"], "OperationOutcome");
        assert_eq!(b["entry"][3]["resource"]["type"], "searchset");
        assert_eq!(app.get(&format!("Communication/{existing}")).await.status(), 410);
    }

    async fn bundles_of_the_wrong_kind_are_rejected(app: TestApp) {
        let before = app.row_counts();
        let r = app.post("", &json!({"resourceType": "Bundle", "type": "collection"})).await;
        assert_eq!(r.status(), 400);
        let r = app.post("", &json!({"resourceType": "Communication", "status": "completed"})).await;
        assert_eq!(r.status(), 400);
        let r = app.post("", &json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}}]})).await;
        assert_eq!(r.status(), 400);
        assert_eq!(before, app.row_counts());
    }
}
