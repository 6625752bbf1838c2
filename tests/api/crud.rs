use crate::both_backends;
use crate::helpers::*;
use base64::Engine;
use serde_json::{json, Value};

both_backends! {
    // From an outside probe's bad-input round: each of these was accepted (or answered with
    // Rust debug text); now a clear 400 that changes nothing.
    async fn bad_references_and_unsupported_history_parameters_are_refused(app: TestApp) {
        let before = app.row_counts();
        for (body, at) in [
            (json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": "Binary/x"}]}), "Communication.recipient[0].reference"),
            (json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Communication/y"}}), "Communication.sender.reference"),
            (json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": "#nobody"}]}), "Communication.recipient[0].reference"),
            // Year 0000 is no FHIR date (0001–9999), though the time types parse it.
            (json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": "Practitioner/d1"}], "sent": "0000-01-01T00:00:00Z"}), "Communication.sent"),
            (json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": "Practitioner/d1"}], "received": "0000-06-01"}), "Communication.received"),
        ] {
            let r = app.post("Communication", &body).await;
            assert_eq!(r.status(), 400, "{body}");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["issue"][0]["expression"][0], at, "{oo}");
        }
        let r = app.post("", &json!({"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Communication", "status": "completed"}}]})).await;
        assert_eq!(r.status(), 400);
        let said = r.text().await.unwrap();
        assert!(said.contains("not 'collection'") && !said.contains("Some("), "{said}");
        for q in ["Communication/_history?_at=2026-01-01", "Communication/_history?_list=x"] {
            assert_eq!(app.get(q).await.status(), 400, "{q}");
        }
        assert_eq!(app.row_counts(), before, "nothing written");
        // Year 1 is a year, whatever its zone makes of it in UTC.
        assert_eq!(app.post("Communication", &json!({"resourceType": "Communication", "status": "completed",
            "recipient": [{"reference": "Practitioner/d1"}], "sent": "0001-01-01T00:00:00+14:00"})).await.status(), 201);
        // A `#` in text is text.
        assert_eq!(app.post("Communication", &json!({"resourceType": "Communication", "status": "completed",
            "recipient": [{"reference": "Practitioner/d1"}], "payload": [{"contentString": "#urgent call me"}]})).await.status(), 201);
    }

    async fn create_read_update_delete_lifecycle(app: TestApp) {
        let body = message("Patient/p1", "2024-05-01T10:00:00Z", "hello");
        let r = app.post("Communication", &body).await;
        assert_eq!(r.status(), 201);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(location.starts_with(&format!("{}/Communication/", app.base)) && location.ends_with("/_history/1"), "{location}");
        assert_eq!(r.headers()["etag"], "W/\"1\"");
        assert!(r.headers().contains_key("last-modified"));
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/fhir+json"));
        let created: Value = r.json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_string();
        assert_eq!(created["meta"]["versionId"], "1");
        assert_eq!(created["payload"][0]["contentString"], "hello");

        let read = app.get(&format!("Communication/{id}")).await;
        assert_eq!(read.status(), 200);
        assert_eq!(read.headers()["etag"], "W/\"1\"");
        let read: Value = read.json().await.unwrap();
        assert_eq!(read, created);
        // HEAD: the read's status and ETag, no body; an unknown id is 404 as for GET.
        let head = app.client.head(app.url(&format!("Communication/{id}"))).send().await.unwrap();
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["etag"], "W/\"1\"");
        assert!(head.bytes().await.unwrap().is_empty());
        let head = app.client.head(app.url("Communication/no-such-id")).send().await.unwrap();
        assert_eq!(head.status(), 404);
        // Not a FHIR type and id: no endpoint (and no AuditEvent), as before.
        let audits = app.get_json("AuditEvent?_summary=count").await["total"].as_i64().unwrap();
        for path in ["app/app.js", "Communication/$unread", "Communication/_history"] {
            let head = app.client.head(app.url(path)).send().await.unwrap();
            assert_eq!(head.status(), 404, "{path}");
        }
        // One more: the first count's own AuditEvent.
        assert_eq!(app.get_json("AuditEvent?_summary=count").await["total"], audits + 1);

        let mut changed = created.clone();
        changed["status"] = json!("entered-in-error");
        let r = app.put(&format!("Communication/{id}"), &changed).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "W/\"2\"");
        let updated: Value = r.json().await.unwrap();
        assert_eq!(updated["meta"]["versionId"], "2");
        assert_eq!(updated["status"], "entered-in-error");

        let v1: Value = app.get_json(&format!("Communication/{id}/_history/1")).await;
        assert_eq!(v1["status"], "completed");
        assert_eq!(app.get(&format!("Communication/{id}/_history/9")).await.status(), 404);

        let r = app.client.delete(app.url(&format!("Communication/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let gone = app.get(&format!("Communication/{id}")).await;
        assert_eq!(gone.status(), 410);
        let oo: Value = gone.json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(app.get("Communication/never-existed").await.status(), 404);

        let hist = app.get_json(&format!("Communication/{id}/_history")).await;
        assert_eq!(hist["type"], "history");
        let methods: Vec<&str> = hist["entry"].as_array().unwrap().iter().map(|e| e["request"]["method"].as_str().unwrap()).collect();
        assert_eq!(methods, vec!["DELETE", "PUT", "POST"]);
        assert!(hist["entry"][0].get("resource").is_none());
        // `_count=0`: a history bundle with no entries (it was clamped to one).
        let none = app.get_json(&format!("Communication/{id}/_history?_count=0")).await;
        assert_eq!(none["type"], "history");
        assert!(none["entry"].as_array().is_none_or(|e| e.is_empty()), "{none}");
        // Deleted resources leave search results.
        assert!(app.search_ids("Communication?recipient=Patient/p1").await.is_empty());
    }

    async fn type_history_lists_every_version_newest_first(app: TestApp) {
        let a = app.create(&message("Patient/p1", "2024-01-01", "a")).await;
        let b = app.create(&message("Patient/p1", "2024-01-02", "b")).await;
        let hist = app.get_json("Communication/_history").await;
        let urls: Vec<String> = hist["entry"].as_array().unwrap().iter().map(|e| e["fullUrl"].as_str().unwrap().to_string()).collect();
        assert_eq!(urls, vec![format!("{}/Communication/{b}", app.base), format!("{}/Communication/{a}", app.base)]);
        let page = app.get_json("Communication/_history?_count=1").await;
        assert_eq!(page["entry"].as_array().unwrap().len(), 1);
        assert!(page["link"].as_array().unwrap().iter().any(|l| l["relation"] == "next"));
        assert_eq!(app.get("Communication/nope/_history").await.status(), 404);
    }

    async fn put_with_client_id_creates_then_updates(app: TestApp) {
        let mut body = message("Patient/p1", "2024-01-01", "x");
        body["id"] = json!("client-chosen-1");
        let r = app.put("Communication/client-chosen-1", &body).await;
        assert_eq!(r.status(), 201);
        assert!(r.headers()["location"].to_str().unwrap().ends_with("/Communication/client-chosen-1/_history/1"));
        let r = app.put("Communication/client-chosen-1", &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["etag"], "W/\"2\"");
    }

    async fn if_match_rejects_stale_versions(app: TestApp) {
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let mut body: Value = app.get_json(&format!("Communication/{id}")).await;
        body["status"] = json!("in-progress");
        let put = |etag: &'static str, body: Value| {
            let app = &app;
            let id = id.clone();
            async move {
                app.client.put(app.url(&format!("Communication/{id}"))).header("content-type", FHIR_JSON)
                    .header("if-match", etag).body(body.to_string()).send().await.unwrap()
            }
        };
        assert_eq!(put("W/\"1\"", body.clone()).await.status(), 200);
        let stale = put("W/\"1\"", body.clone()).await;
        assert_eq!(stale.status(), 412);
        let oo: Value = stale.json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let r = app.client.delete(app.url(&format!("Communication/{id}"))).header("if-match", "W/\"1\"").send().await.unwrap();
        assert_eq!(r.status(), 412);
        assert_eq!(app.get(&format!("Communication/{id}")).await.status(), 200);
    }

    async fn conditional_create_returns_the_existing_match(app: TestApp) {
        let mut body = message("Patient/p1", "2024-01-01", "x");
        body["identifier"] = json!([{"system": "urn:ehr", "value": "m-1"}]);
        let send = || app.client.post(app.url("Communication")).header("content-type", FHIR_JSON)
            .header("if-none-exist", "identifier=urn:ehr|m-1").body(body.to_string()).send();
        let first = send().await.unwrap();
        assert_eq!(first.status(), 201);
        let first: Value = first.json().await.unwrap();
        let second = send().await.unwrap();
        assert_eq!(second.status(), 200);
        let second: Value = second.json().await.unwrap();
        assert_eq!(first["id"], second["id"]);
        assert_eq!(app.search_ids("Communication?identifier=urn:ehr|m-1").await.len(), 1);
        // Two matches: 412.
        app.create(&body).await;
        assert_eq!(send().await.unwrap().status(), 412);
        // An unknown parameter in If-None-Exist would match everything: refused.
        let r = app.client.post(app.url("Communication")).header("content-type", FHIR_JSON)
            .header("if-none-exist", "bogus=1").body(body.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 400);
    }

    async fn prefer_controls_the_response_body(app: TestApp) {
        let body = message("Patient/p1", "2024-01-01", "x");
        let send = |prefer: &'static str| app.client.post(app.url("Communication")).header("content-type", FHIR_JSON)
            .header("prefer", prefer).body(body.to_string()).send();
        let minimal = send("return=minimal").await.unwrap();
        assert_eq!(minimal.status(), 201);
        assert!(minimal.headers().contains_key("location"));
        assert!(minimal.bytes().await.unwrap().is_empty());
        let oo: Value = send("return=OperationOutcome").await.unwrap().json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let rep: Value = send("return=representation").await.unwrap().json().await.unwrap();
        assert_eq!(rep["resourceType"], "Communication");
    }

    async fn json_patch_updates_and_is_checked_strictly(app: TestApp) {
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let patch = |doc: Value, ct: &'static str| app.client.patch(app.url(&format!("Communication/{id}")))
            .header("content-type", ct).body(doc.to_string()).send();
        let r = patch(json!([{"op": "replace", "path": "/status", "value": "in-progress"}]), "application/json-patch+json").await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "in-progress");
        assert_eq!(v["meta"]["versionId"], "2");
        // A patch producing an invalid resource is refused and changes nothing.
        let r = patch(json!([{"op": "add", "path": "/bogus", "value": 1}]), "application/json-patch+json").await.unwrap();
        assert_eq!(r.status(), 400);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["expression"][0], "Communication.bogus");
        let r = patch(json!([{"op": "replace", "path": "/status", "value": "nonsense"}]), "application/json-patch+json").await.unwrap();
        assert_eq!(r.status(), 400);
        // A failed `test` op: 422; wrong content type: 415.
        let r = patch(json!([{"op": "test", "path": "/status", "value": "completed"}]), "application/json-patch+json").await.unwrap();
        assert_eq!(r.status(), 422);
        let r = patch(json!([{"op": "replace", "path": "/status", "value": "completed"}]), "application/json").await.unwrap();
        assert_eq!(r.status(), 415);
        let current: Value = app.get_json(&format!("Communication/{id}")).await;
        assert_eq!(current["meta"]["versionId"], "2");
    }

    async fn communication_request_supports_the_same_interactions(app: TestApp) {
        let body = json!({"resourceType": "CommunicationRequest", "status": "active", "priority": "urgent",
            "subject": {"reference": "Patient/p9"}, "occurrenceDateTime": "2025-03-01T09:00:00Z",
            "payload": [{"contentString": "Your appointment is tomorrow"}]});
        let id = app.create(&body).await;
        let got = app.get_json(&format!("CommunicationRequest/{id}")).await;
        assert_eq!(got["priority"], "urgent");
        assert_eq!(app.search_ids("CommunicationRequest?priority=urgent&patient=p9").await, vec![id.clone()]);
        assert_eq!(app.search_ids("CommunicationRequest?occurrence=2025-03-01").await, vec![id]);
    }

    // From an outside walk-through: a patient uploaded a Windows executable declared
    // `application/pdf` and attached it as "lab-report\u{202E}fdp.exe", which the clinician's
    // app showed as "lab-report…exe.pdf". A Binary's bytes must be what its type says, and a file
    // name has no text-direction controls; nothing refused is stored.
    async fn an_attachment_is_what_its_type_and_name_say(app: TestApp) {
        let before = app.row_counts();
        for (ct, bytes) in [
            ("application/pdf", b"MZ\x90\x00\x03\x00\x00\x00".to_vec()),
            ("image/png", b"MZ\x90\x00".to_vec()),
            ("image/jpeg", b"%PDF-1.7".to_vec()),
            ("image/gif", b"\x89PNG\r\n\x1a\n".to_vec()),
            ("image/webp", b"RIFF\x00\x00\x00\x00WAVE".to_vec()),
            ("image/heic", b"\x00\x00\x00\x18ftypisom".to_vec()),
            ("text/plain", b"PK\x03\x04\x00\x00zip".to_vec()),
            ("text/plain", vec![0xff, 0xfe, 0x00]),
        ] {
            let r = app.client.post(app.url("Binary")).header("content-type", ct).body(bytes.clone()).send().await.unwrap();
            assert_eq!(r.status(), 415, "{ct}: {bytes:?}");
            let oo: Value = r.json().await.unwrap();
            assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains(ct), "{oo}");
            // As FHIR JSON too.
            let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
            let r = app.post("Binary", &json!({"resourceType": "Binary", "contentType": ct, "data": data})).await;
            assert_eq!(r.status(), 415, "{ct} as JSON");
            // … also wrapped and unpadded, as a lenient decoder reads it.
            let wrapped: String = data.trim_end_matches('=').chars().collect::<Vec<_>>().chunks(4).map(|c| c.iter().collect::<String>()).collect::<Vec<_>>().join("\n");
            let r = app.post("Binary", &json!({"resourceType": "Binary", "contentType": ct, "data": wrapped})).await;
            assert!(r.status() == 415 || r.status() == 400, "{ct} wrapped: {}", r.status());
        }
        assert_eq!(before, app.row_counts(), "nothing refused is stored");
        for (ct, bytes) in [
            ("application/pdf", b"%PDF-1.7\n%\xe2\xe3".to_vec()),
            ("image/png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR".to_vec()),
            ("image/jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF".to_vec()),
            ("image/gif", b"GIF89a\x01\x00".to_vec()),
            ("image/webp", b"RIFF\x24\x00\x00\x00WEBPVP8 ".to_vec()),
            ("image/heic", b"\x00\x00\x00\x18ftypheic\x00\x00".to_vec()),
            ("text/plain; charset=utf-8", "Blood pressure 140/90 — الضغط".as_bytes().to_vec()),
        ] {
            let r = app.client.post(app.url("Binary")).header("content-type", ct).body(bytes).send().await.unwrap();
            assert_eq!(r.status(), 201, "{ct}");
        }
        let bin = app.create(&json!({"resourceType": "Binary", "contentType": "application/pdf", "data": "JVBERi0xLjc="})).await;
        let with_title = |title: &str| json!({"resourceType": "Communication", "status": "completed",
            "recipient": [{"reference": "Practitioner/dr-1"}],
            "payload": [{"contentAttachment": {"contentType": "application/pdf", "url": format!("Binary/{bin}"), "title": title}}]});
        let before = app.row_counts();
        for title in ["lab-report\u{202E}fdp.exe", "\u{2067}exe.pdf\u{2069}", "a\u{202A}b.pdf"] {
            let r = app.post("Communication", &with_title(title)).await;
            assert_eq!(r.status(), 422, "{title:?}");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["issue"][0]["expression"][0], "Communication.payload[0].contentAttachment.title", "{oo}");
        }
        assert_eq!(before, app.row_counts());
        // A name in a right-to-left script is a name; direction marks are not.
        assert_eq!(app.post("Communication", &with_title("تقرير المختبر.pdf")).await.status(), 201);
        for title in ["report\u{200F}.exe.pdf", "a\u{200E}b.pdf", "a\u{061C}b.pdf"] {
            assert_eq!(app.post("Communication", &with_title(title)).await.status(), 422, "{title:?}");
        }
        // An attachment inside the message is held to a Binary's rules: inline bytes, the
        // declared type, a contained Binary.
        let before = app.row_counts();
        let inline = |ct: &str, data: &str| json!({"resourceType": "Communication", "status": "completed",
            "recipient": [{"reference": "Practitioner/dr-1"}],
            "payload": [{"contentAttachment": {"contentType": ct, "data": data, "title": "file"}}]});
        let r = app.post("Communication", &inline("application/pdf", "TVqQAAMAAAA=")).await;
        assert_eq!(r.status(), 415);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["expression"][0], "Communication.payload[0].contentAttachment.data", "{oo}");
        assert_eq!(app.post("Communication", &inline("application/x-msdownload", "TVqQAAMAAAA=")).await.status(), 415);
        let by_url = json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": "Practitioner/dr-1"}],
            "payload": [{"contentAttachment": {"contentType": "text/html", "url": format!("Binary/{bin}")}}]});
        assert_eq!(app.post("Communication", &by_url).await.status(), 415, "an attachment's declared type is checked");
        let contained = json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": "Practitioner/dr-1"}],
            "contained": [{"resourceType": "Binary", "id": "b", "contentType": "application/pdf", "data": "TVqQAAMAAAA="}],
            "payload": [{"contentAttachment": {"contentType": "application/pdf", "url": "#b"}}]});
        assert_eq!(app.post("Communication", &contained).await.status(), 415);
        assert_eq!(before, app.row_counts());
        assert_eq!(app.post("Communication", &inline("application/pdf", "JVBERi0xLjc=")).await.status(), 201);
    }

    async fn binary_stores_raw_content_and_enforces_its_size_limit(app: TestApp) {
        let png = b"\x89PNG\r\n\x1a\n\x00\x01\x02\x03\xff".to_vec();
        let r = app.client.post(app.url("Binary")).header("content-type", "image/png").body(png.clone()).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(v["contentType"], "image/png");
        let raw = app.client.get(app.url(&format!("Binary/{id}"))).header("accept", "image/png").send().await.unwrap();
        assert_eq!(raw.status(), 200);
        assert_eq!(raw.headers()["content-type"], "image/png");
        assert_eq!(raw.headers()["x-content-type-options"], "nosniff");
        assert_eq!(raw.bytes().await.unwrap().to_vec(), png);
        let as_fhir = app.client.get(app.url(&format!("Binary/{id}"))).header("accept", FHIR_JSON).send().await.unwrap();
        let as_fhir: Value = as_fhir.json().await.unwrap();
        assert_eq!(as_fhir["resourceType"], "Binary");
        // FHIR JSON form.
        let id2 = app.create(&json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="})).await;
        let raw = app.client.get(app.url(&format!("Binary/{id2}"))).send().await.unwrap();
        assert_eq!(raw.bytes().await.unwrap().to_vec(), b"hello");
        // Binary has no search, update or delete.
        assert_eq!(app.get("Binary").await.status(), 405);
    }

    async fn audit_events_are_read_only(app: TestApp) {
        let r = app.post("AuditEvent", &json!({"resourceType": "AuditEvent"})).await;
        assert_eq!(r.status(), 405);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["resourceType"], "OperationOutcome");
        assert_eq!(app.get("Patient/1").await.status(), 404);
    }

    async fn paths_and_methods_the_server_lacks_are_404_operation_outcomes(app: TestApp) {
        let id = app.create(&json!({"resourceType": "Communication", "status": "completed"})).await;
        let before = app.row_counts();
        let body = json!({"resourceType": "Communication", "status": "completed"}).to_string();
        for (method, path) in [
            (reqwest::Method::PUT, "Communication".to_string()),
            (reqwest::Method::DELETE, "Communication".to_string()),
            (reqwest::Method::POST, format!("Communication/{id}")),
            (reqwest::Method::POST, format!("Communication/{id}/_history")),
            (reqwest::Method::GET, format!("Communication/{id}/_nothing")),
            (reqwest::Method::GET, "Communication/a/b/c/d".to_string()),
        ] {
            let r = app.client.request(method.clone(), app.url(&path))
                .header("content-type", "application/fhir+json").body(body.clone()).send().await.unwrap();
            assert_eq!(r.status(), 404, "{method} {path}");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome", "{method} {path}");
            assert_eq!(oo["issue"][0]["diagnostics"], "no such endpoint", "{method} {path}");
        }
        assert_eq!(app.row_counts(), before, "nothing written");
        // The static paths and the operations still win over the FHIR type and instance routes.
        assert_eq!(app.get("metadata").await.json::<Value>().await.unwrap()["resourceType"], "CapabilityStatement");
        let sub = app.get("Subscription").await;
        assert_eq!(sub.status(), 200);
        assert_eq!(app.get(&format!("Communication/{id}")).await.status(), 200);
        let receipts = app.get(&format!("Communication/{id}/$receipts")).await;
        assert_eq!(receipts.status(), 200);
    }
}

#[tokio::test]
async fn binary_over_the_limit_is_refused_with_413() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.max_binary_bytes = 1000)
        .await
        .unwrap();
    let before = app.row_counts();
    let r = app
        .client
        .post(app.url("Binary"))
        .header("content-type", "application/pdf")
        .body([&b"%PDF-"[..], &[7u8; 996]].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    let ok = app
        .client
        .post(app.url("Binary"))
        .header("content-type", "application/pdf")
        .body([&b"%PDF-"[..], &[7u8; 995]].concat())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    // The refused upload changed nothing (the accepted one did).
    assert_ne!(before, app.row_counts());
}

both_backends! {
    async fn concurrent_writers_each_get_their_own_outcome(app: TestApp) {
        // On SQLite these land in shared group commits; a failing job must not take others with it.
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let current: Value = app.get_json(&format!("Communication/{id}")).await;
        let before = app.row_counts();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let client = app.client.clone();
            let base = app.base.clone();
            let (id, current) = (id.clone(), current.clone());
            tasks.push(tokio::spawn(async move {
                if i % 4 == 0 {
                    // Stale If-Match: must fail alone.
                    client.put(format!("{base}/Communication/{id}")).header("content-type", FHIR_JSON)
                        .header("if-match", "W/\"99\"").body(current.to_string()).send().await.unwrap().status().as_u16()
                } else {
                    client.post(format!("{base}/Communication")).header("content-type", FHIR_JSON)
                        .body(message("Patient/concurrent", "2024-01-01", &format!("m{i}")).to_string()).send().await.unwrap().status().as_u16()
                }
            }));
        }
        let mut statuses = Vec::new();
        for t in tasks {
            statuses.push(t.await.unwrap());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 412).count(), 10);
        assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 30);
        let b = app.get_json("Communication?recipient=Patient/concurrent&_summary=count").await;
        assert_eq!(b["total"], 30);
        let after = app.row_counts();
        assert_eq!(after[0].1, before[0].1 + 30, "resources");
        assert_eq!(app.get_json(&format!("Communication/{id}")).await["meta"]["versionId"], "1");
    }
}

/// No answer that can hold PHI may be kept by a browser's or a proxy's cache (a disk cache
/// outlives sign-out): reads, versions, searches, history, a Binary's raw bytes, the app's API
/// and errors say `Cache-Control: no-store`. The app's own files keep their own rule.
#[tokio::test]
async fn answers_that_can_hold_phi_are_never_cached() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let id = app
        .create(
            &json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": "Patient/p1"}, "recipient": [{"reference": "Patient/p1"}],
            "payload": [{"contentString": "private"}]}),
        )
        .await;
    let bin = app
        .client
        .post(app.url("Binary"))
        .header("content-type", "image/png")
        .body(b"\x89PNG\r\n\x1a\n\x01\x02\x03".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(bin.status(), 201);
    let bin: Value = bin.json().await.unwrap();
    let bin = bin["id"].as_str().unwrap().to_string();
    for path in [
        format!("Communication/{id}"),
        format!("Communication/{id}/_history/1"),
        format!("Communication/{id}/_history"),
        "Communication?subject=Patient/p1".to_string(),
        format!("Binary/{bin}"),
        "Communication/no-such-id".to_string(),
        "Communication?unknown-param=1".to_string(),
        "Communication/$unread".to_string(),
    ] {
        let r = app.get(&path).await;
        assert_eq!(
            r.headers()
                .get("cache-control")
                .map(|v| v.to_str().unwrap()),
            Some("no-store"),
            "{path} ({})",
            r.status()
        );
    }
    let js = app.client.get(app.url("app/app.js")).send().await.unwrap();
    assert_eq!(js.headers()["cache-control"], "no-cache");
}
