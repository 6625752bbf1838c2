//! Input the strict parser let through (issue 19, item G): size limits inside Bundles, values too
//! long (or with NUL) for PostgreSQL's index, control characters, duplicate fullUrls, empty
//! parameters in entry URLs, unreferenced contained resources, and Binary content types. Each is a
//! 4xx OperationOutcome naming the element, the same on SQLite and PostgreSQL, and stores nothing.

use crate::both_backends;
use crate::helpers::*;
use crate::strict::rejected;
use serde_json::{json, Value};

fn tx(kind: &str, entries: Vec<Value>) -> String {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries}).to_string()
}

/// `n` characters that do not compress (PostgreSQL compresses a long index row before it gives
/// up on it, so `"x".repeat(3000)` would fit where real identifiers do not).
fn noise(n: usize) -> String {
    let mut s = String::with_capacity(n + 32);
    while s.len() < n {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(n);
    s
}

fn post_entry(resource: Value) -> Value {
    let rt = resource["resourceType"].as_str().unwrap().to_string();
    json!({"resource": resource, "request": {"method": "POST", "url": rt}})
}

fn with_identifier(system: &str, value: &str) -> Value {
    let mut m = message("Patient/p1", "2024-01-01", "x");
    m["identifier"] = json!([{"system": system, "value": value}]);
    m
}

both_backends! {
    async fn a_transaction_entry_over_the_resource_limit_gets_413_naming_the_entry(app: TestApp) {
        // Just over the 1 MiB default: alone it is refused, and so it must be inside a Bundle.
        let big = message("Patient/p1", "2024-01-01", &"x".repeat(1024 * 1024 + 10));
        rejected(&app, "POST", "Communication", FHIR_JSON, &big.to_string(), 413, None).await;
        let small = message("Patient/p1", "2024-01-01", "fine");
        let body = tx("transaction", vec![post_entry(small.clone()), post_entry(small.clone()), post_entry(big.clone())]);
        rejected(&app, "POST", "", FHIR_JSON, &body, 413, Some("Bundle.entry[2].resource")).await;
        // In a batch the entry fails on its own; the others are written.
        let before = app.row_counts();
        let r = app.client.post(app.url("")).header("content-type", FHIR_JSON)
            .body(tx("batch", vec![post_entry(big), post_entry(small)])).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert!(b["entry"][0]["response"]["status"].as_str().unwrap().starts_with("413"), "{b}");
        assert_eq!(b["entry"][0]["response"]["outcome"]["issue"][0]["expression"][0], "Bundle.entry[0].resource");
        assert!(b["entry"][1]["response"]["status"].as_str().unwrap().starts_with("201"));
        assert_ne!(before, app.row_counts());
    }

    async fn values_too_long_for_the_index_are_400_on_both_backends(app: TestApp) {
        let long = noise(2700);
        let body = with_identifier("http://ids.example", &long);
        rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.identifier[0].value")).await;
        let body = with_identifier(&format!("http://ids.example/{}", noise(3000)), "1");
        rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.identifier[0].system")).await;
        let far = format!("https://elsewhere.example/fhir/{}", noise(3000));
        let body = message(&far, "2024-01-01", "x");
        rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.recipient[0].reference")).await;
        let body = message(&format!("Patient/{}", noise(3000)), "2024-01-01", "x");
        rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.recipient[0].reference")).await;
        let body = tx("transaction", vec![post_entry(with_identifier("http://ids.example", &long))]);
        rejected(&app, "POST", "", FHIR_JSON, &body, 400, Some("Bundle.entry[0].resource.Communication.identifier[0].value")).await;
        // An update is held to the same rule.
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let mut body = with_identifier("http://ids.example", &long);
        body["id"] = json!(id);
        rejected(&app, "PUT", &format!("Communication/{id}"), FHIR_JSON, &body.to_string(), 400, Some("Communication.identifier[0].value")).await;
        // At the limit (1,024 bytes each) a value is stored and found.
        let at = noise(1024);
        let r = app.post("Communication", &with_identifier(&format!("http://{}", noise(1017)), &at)).await;
        assert_eq!(r.status(), 201);
        let found = app.search_ids(&format!("Communication?identifier={at}")).await;
        assert_eq!(found.len(), 1);
        // Search values longer than anything stored, or holding NUL, are 400 too.
        for q in [
            format!("Communication?identifier={long}"),
            "Communication?identifier=a%00b".to_string(),
            "Communication?identifier=http://x%7Ca%00b".to_string(),
            format!("Communication?recipient={far}"),
            "Communication?status%00=completed".to_string(),
        ] {
            let r = app.get(&q).await;
            assert_eq!(r.status(), 400, "{}", &q[..q.len().min(80)]);
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome");
        }
    }

    async fn control_characters_in_strings_are_400_naming_the_element(app: TestApp) {
        for bad in ["a\u{0}b", "\u{1}", "\u{1b}[2J", "del\u{7f}"] {
            let body = with_identifier("http://ids.example", bad);
            rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.identifier[0].value")).await;
            let body = with_identifier(&format!("http://ids.example/{bad}"), "1");
            rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.identifier[0].system")).await;
            let body = message("Patient/p1", "2024-01-01", bad);
            rejected(&app, "POST", "Communication", FHIR_JSON, &body.to_string(), 400, Some("Communication.payload[0].contentString")).await;
            let body = tx("transaction", vec![post_entry(message("Patient/p1", "2024-01-01", bad))]);
            rejected(&app, "POST", "", FHIR_JSON, &body, 400, Some("Bundle.entry[0].resource.Communication.payload[0].contentString")).await;
        }
        // Outside the resources too: an entry URL.
        let body = tx("transaction", vec![post_entry(message("Patient/p1", "2024-01-01", "x")),
            json!({"request": {"method": "GET", "url": "Communication?identifier=a\u{0}b"}})]);
        rejected(&app, "POST", "", FHIR_JSON, &body, 400, Some("Bundle.entry[1].request.url")).await;
        // Through PATCH.
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let before = app.row_counts();
        let r = app.client.patch(app.url(&format!("Communication/{id}"))).header("content-type", "application/json-patch+json")
            .body(json!([{"op": "add", "path": "/note", "value": [{"text": "bell\u{7}"}]}]).to_string()).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["expression"][0], "Communication.note[0].text");
        assert_eq!(before, app.row_counts());
        // Tab, carriage return and line feed are text.
        let r = app.post("Communication", &message("Patient/p1", "2024-01-01", "one\r\n\ttwo")).await;
        assert_eq!(r.status(), 201);
    }

    async fn a_duplicate_full_url_in_a_bundle_is_400(app: TestApp) {
        let a = message("Patient/p1", "2024-01-01", "first");
        let b = message("Patient/p1", "2024-01-01", "second");
        let mut reply = message("Patient/p1", "2024-01-02", "reply");
        reply["inResponseTo"] = json!([{"reference": "urn:uuid:7d1e4a8e-0000-4000-8000-000000000001"}]);
        let entries = vec![
            json!({"fullUrl": "urn:uuid:7d1e4a8e-0000-4000-8000-000000000001", "resource": a, "request": {"method": "POST", "url": "Communication"}}),
            json!({"fullUrl": "urn:uuid:7d1e4a8e-0000-4000-8000-000000000001", "resource": b, "request": {"method": "POST", "url": "Communication"}}),
            post_entry(reply),
        ];
        rejected(&app, "POST", "", FHIR_JSON, &tx("transaction", entries.clone()), 400, Some("Bundle.entry[1].fullUrl")).await;
        rejected(&app, "POST", "", FHIR_JSON, &tx("batch", entries), 400, Some("Bundle.entry[1].fullUrl")).await;
    }

    async fn a_bundle_of_more_than_1000_entries_is_413(app: TestApp) {
        let get = json!({"request": {"method": "GET", "url": "Communication?_id=1"}});
        let write = post_entry(message("Patient/p1", "2024-01-01", "x"));
        let mut entries = vec![write];
        entries.extend(std::iter::repeat_n(get.clone(), 1000));
        rejected(&app, "POST", "", FHIR_JSON, &tx("transaction", entries), 413, Some("Bundle.entry")).await;
        let r = app.client.post(app.url("")).header("content-type", FHIR_JSON)
            .body(tx("batch", vec![get; 1000])).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn a_key_repeated_inside_a_bundle_entry_is_400(app: TestApp) {
        let body = r#"{"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Communication"},
            "resource":{"resourceType":"Communication","status":"completed","subject":{"reference":"Patient/evil","reference":"Patient/p1"}}}]}"#;
        rejected(&app, "POST", "", FHIR_JSON, body, 400, Some("Bundle")).await;
    }

    async fn a_patch_cannot_grow_a_resource_past_the_limit(app: TestApp) {
        // A patch read within the limit builds something far bigger: 300 copies of a 4 KB payload
        // (a valid message of 1.2 MB), or `copy` of a list into itself, doubling it each time.
        let id = app.create(&message("Patient/p1", "2024-01-01", &"x".repeat(4000))).await;
        let ops: Vec<Value> = (0..9).map(|_| json!({"op": "copy", "from": "/payload", "path": "/payload/-"})).collect();
        let grow: Vec<Value> = (0..300).map(|_| json!({"op": "copy", "from": "/payload/0", "path": "/payload/-"})).collect();
        let before = app.row_counts();
        for patch in [Value::Array(grow), Value::Array(ops)] {
            let r = app.client.patch(app.url(&format!("Communication/{id}"))).header("content-type", "application/json-patch+json")
                .body(patch.to_string()).send().await.unwrap();
            assert_eq!(r.status(), 413);
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome");
        }
        assert_eq!(before, app.row_counts());
    }

    async fn empty_parameters_in_entry_and_conditional_urls_are_400(app: TestApp) {
        let write = post_entry(message("Patient/p1", "2024-01-01", "x"));
        for url in ["Communication?_id=1&&&", "Communication?", "Communication?&_id=1", "Communication?=1"] {
            let body = tx("transaction", vec![write.clone(), json!({"request": {"method": "GET", "url": url}})]);
            rejected(&app, "POST", "", FHIR_JSON, &body, 400, Some("Bundle.entry[1].request.url")).await;
        }
        let conditional = json!({"resource": message("Patient/p1", "2024-01-01", "x"),
            "request": {"method": "POST", "url": "Communication", "ifNoneExist": "identifier=a&&"}});
        rejected(&app, "POST", "", FHIR_JSON, &tx("transaction", vec![conditional]), 400, Some("Bundle.entry[0].request.ifNoneExist")).await;
        let before = app.row_counts();
        let r = app.client.post(app.url("Communication")).header("content-type", FHIR_JSON).header("if-none-exist", "identifier=a&")
            .body(message("Patient/p1", "2024-01-01", "x").to_string()).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(before, app.row_counts());
        // A well-formed one still works.
        let body = tx("transaction", vec![json!({"request": {"method": "GET", "url": "Communication?_id=1"}})]);
        let r = app.client.post(app.url("")).header("content-type", FHIR_JSON).body(body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn unreferenced_contained_resources_are_400(app: TestApp) {
        let mut m = message("Patient/p1", "2024-01-01", "x");
        m["contained"] = Value::Array((0..50).map(|i| json!({"resourceType": "Patient", "id": format!("c{i}")})).collect());
        rejected(&app, "POST", "Communication", FHIR_JSON, &m.to_string(), 400, Some("Communication.contained[0]")).await;
        rejected(&app, "POST", "", FHIR_JSON, &tx("transaction", vec![post_entry(m)]), 400, Some("Bundle.entry[0].resource.Communication.contained[0]")).await;
        // Referenced from the resource: accepted.
        let mut m = message("Patient/p1", "2024-01-01", "x");
        m["contained"] = json!([{"resourceType": "Patient", "id": "c0"}]);
        m["subject"] = json!({"reference": "#c0"});
        assert_eq!(app.post("Communication", &m).await.status(), 201);
    }

    async fn a_binary_content_type_that_is_not_a_mime_type_is_400(app: TestApp) {
        for ct in ["text/plain;\nX: 1", "text/plain; x y", "text", "text/plain\u{0}"] {
            let b = json!({"resourceType": "Binary", "contentType": ct, "data": "aGk="});
            rejected(&app, "POST", "Binary", FHIR_JSON, &b.to_string(), 400, Some("Binary.contentType")).await;
            rejected(&app, "POST", "", FHIR_JSON, &tx("transaction", vec![post_entry(b)]), 400, Some("Bundle.entry[0].resource.Binary.contentType")).await;
        }
        // A raw upload's Content-Type header is held to the same grammar.
        rejected(&app, "POST", "Binary", "text/plain; charset", "hi", 400, Some("Binary.contentType")).await;
        let ok = app.post("Binary", &json!({"resourceType": "Binary", "contentType": "text/plain; charset=utf-8", "data": "aGk="})).await;
        assert_eq!(ok.status(), 201);
    }

    async fn a_request_naming_a_value_too_long_to_index_is_still_audited(app: TestApp) {
        // The AuditEvent of `GET /Aaaa…/1` refers to `Aaaa…/1`; PostgreSQL's index could not hold
        // that reference, so the event was lost. Now the value is left out of the index instead.
        let count = |b: Value| b["total"].as_i64().unwrap();
        let before = count(app.get_json("AuditEvent?_summary=count").await);
        let r = app.get(&format!("A{}/1", noise(3000))).await;
        assert_eq!(r.status(), 404);
        let after = count(app.get_json("AuditEvent?_summary=count").await);
        // The first count's own search, and the refused request.
        assert_eq!(after - before, 2);
    }

    async fn a_stored_odd_content_type_is_served_as_octet_stream_not_500(app: TestApp) {
        // As written before contentType was checked: straight into the store.
        let v = json!({"resourceType": "Binary", "contentType": "text/plain;\nX: 1", "data": "aGk="});
        let ctx = courier::audit::Context::default();
        let op = courier::store::WriteOp::Create {
            res_type: "Binary".into(),
            id: "odd-ct".into(),
            resource: courier::store::Incoming::from_value(v),
            if_none_exist: None,
        };
        app.store.write(vec![op], &ctx).unwrap();
        let r = app.client.get(app.url("Binary/odd-ct")).header("accept", "*/*").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/octet-stream");
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"hi");
    }
}

#[tokio::test]
async fn binary_entries_follow_the_binary_limit() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let Some(app) = spawn_app_with(backend, |s| {
            s.max_binary_bytes = 1000;
            s.max_resource_bytes = 2000;
        })
        .await
        else {
            continue;
        };
        use base64::Engine;
        let b64 = |n: usize| {
            base64::engine::general_purpose::STANDARD
                .encode([&b"%PDF-"[..], &vec![7u8; n - 5]].concat())
        };
        let bin = |n: usize| json!({"resourceType": "Binary", "contentType": "application/pdf", "data": b64(n)});
        // Over the Binary limit: 413 alone, as an entry, and as a raw upload.
        rejected(
            &app,
            "POST",
            "Binary",
            FHIR_JSON,
            &bin(1001).to_string(),
            413,
            None,
        )
        .await;
        let body = tx(
            "transaction",
            vec![post_entry(bin(10)), post_entry(bin(1001))],
        );
        rejected(
            &app,
            "POST",
            "",
            FHIR_JSON,
            &body,
            413,
            Some("Bundle.entry[1].resource"),
        )
        .await;
        // At the Binary limit a Binary may be bigger than a resource: accepted either way.
        let body = tx("transaction", vec![post_entry(bin(1000))]);
        let r = app
            .client
            .post(app.url(""))
            .header("content-type", FHIR_JSON)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{backend:?}");
        assert_eq!(app.post("Binary", &bin(1000)).await.status(), 201);
        // A message over the resource limit next to one is not (the Bundle itself is under its
        // limit: one largest Binary plus one largest resource).
        let body = tx(
            "transaction",
            vec![
                post_entry(bin(500)),
                post_entry(message("Patient/p1", "2024-01-01", &"x".repeat(1900))),
            ],
        );
        rejected(
            &app,
            "POST",
            "",
            FHIR_JSON,
            &body,
            413,
            Some("Bundle.entry[1].resource"),
        )
        .await;
    }
}
