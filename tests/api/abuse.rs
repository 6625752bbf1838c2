//! Abuse without credentials (issue 19 F and part of I): rate limits per client address, failed
//! authentications audited with a count, capped launch values, bounded request bodies, the
//! metrics behind a token, private data files, and PUT telling nobody which ids exist.

use crate::both_backends;
use crate::both_backends_with;
use crate::helpers::*;
use actix_web::{web, App, HttpResponse, HttpServer};
use serde_json::{json, Value};

const FAILURES: &str =
    "AuditEvent?type=http://dicom.nema.org/resources/ontology/DCM|110114&outcome=4&_count=200";

async fn failure_events(app: &TestApp) -> Vec<Value> {
    app.get_json(FAILURES).await["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

/// A fake EHR that publishes a SMART configuration (so a launch gets as far as storing its state).
fn fake_ehr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!(
        "http://127.0.0.1:{}/fhir",
        listener.local_addr().unwrap().port()
    );
    let b2 = base.clone();
    let server = HttpServer::new(move || {
        let b = b2.clone();
        App::new().route(
            "/fhir/.well-known/smart-configuration",
            web::get().to(move || {
                let b = b.clone();
                async move {
                    HttpResponse::Ok().json(json!({
                        "authorization_endpoint": format!("{b}/oauth/authorize"),
                        "token_endpoint": format!("{b}/oauth/token"),
                        "capabilities": ["launch-ehr", "client-confidential-asymmetric"]
                    }))
                }
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    base
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

async fn assert_throttled(r: reqwest::Response) {
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome");
    assert_eq!(oo["issue"][0]["code"], "throttled");
}

both_backends_with! {
    |s| { s.rate_limit_per_minute = 5; }

    async fn failed_bearer_checks_are_rate_limited_per_address_and_valid_tokens_never(app: TestApp) {
        let bad = client_with_token("not-a-token");
        for i in 0..5 {
            assert_eq!(bad.get(app.url("Communication")).send().await.unwrap().status(), 401, "attempt {i}");
        }
        assert_throttled(bad.get(app.url("Communication")).send().await.unwrap()).await;
        assert_throttled(app.anonymous.get(app.url("Communication")).send().await.unwrap()).await;
        // The same address with a valid token: never limited.
        for _ in 0..30 {
            assert_eq!(app.get("Communication").await.status(), 200);
        }
    }

    async fn the_token_endpoint_and_the_launch_are_rate_limited_per_address(app: TestApp) {
        let form = |c: &reqwest::Client| {
            c.post(app.url("auth/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials")
        };
        for _ in 0..5 {
            assert_ne!(form(&app.anonymous).send().await.unwrap().status(), 429);
        }
        assert_throttled(form(&app.anonymous).send().await.unwrap()).await;
        // The limit is per address, across the unauthenticated endpoints.
        assert_throttled(no_redirects().get(app.url("launch?iss=https://x.example/fhir&launch=l")).send().await.unwrap()).await;
        assert_throttled(no_redirects().get(app.url("smart/callback?state=s&code=c")).send().await.unwrap()).await;
        // Authenticated FHIR calls go on.
        assert_eq!(app.get("Communication").await.status(), 200);
    }
}

both_backends_with! {
    |s| { s.rate_limit_per_minute = 0; s.auth_failure_audit_window_secs = 1; }

    async fn repeated_failed_authentications_are_audited_once_per_source_and_window_with_a_count(app: TestApp) {
        let bad = client_with_token("not-a-token");
        for _ in 0..50 {
            assert_eq!(bad.get(app.url("Communication")).send().await.unwrap().status(), 401);
        }
        // The first at once, with its reason.
        let events = failure_events(&app).await;
        assert_eq!(events.len(), 1, "one event at once, not {}", events.len());
        assert_eq!(events[0]["agent"][0]["network"]["address"], "127.0.0.1");
        // The other 49 as one event with the count, once the window is over.
        let mut events = vec![];
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            events = failure_events(&app).await;
            if events.len() > 1 {
                break;
            }
        }
        assert_eq!(events.len(), 2, "{events:?}");
        let counted = events.iter().find(|e| e["period"].is_object()).expect("the counted event");
        let detail = &counted["entity"][0]["detail"][0];
        assert_eq!(detail["type"], "failedAttempts");
        assert_eq!(detail["valueString"], "49");
        let desc = counted["outcomeDesc"].as_str().unwrap();
        assert!(desc.starts_with("49 failed attempts from 127.0.0.1"), "{desc}");
        assert!(!counted.to_string().contains("not-a-token"));
        // Its shape is BALP's authentication event's.
        assert_eq!(counted["type"]["code"], "110114");
        assert_eq!(counted["subtype"][0]["code"], "110122");
        assert_eq!(counted["outcome"], "4");
    }
}

both_backends! {
    async fn a_launch_value_over_4_kb_is_refused_and_nothing_is_stored(app: TestApp) {
        let iss = fake_ehr();
        courier::smart::registry::add(&app.store, &crate::ehr::new_ehr("big", &iss, "ES384")).unwrap();
        let c = no_redirects();
        // A normal launch is stored (and goes to the EHR).
        let r = c.get(app.url(&format!("launch?iss={iss}&launch=abc"))).send().await.unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(count(&app, "SELECT COUNT(*) AS n FROM launch_states", vec![]), 1);
        let big = "x".repeat(30 * 1024);
        let r = c.get(app.url(&format!("launch?iss={iss}&launch={big}"))).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let r = c.get(app.url(&format!("launch?iss={iss}&launch={}", "y".repeat(4097)))).send().await.unwrap();
        assert_eq!(r.status(), 400);
        let r = c.get(app.url(&format!("smart/callback?code=c&state={big}"))).send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(count(&app, "SELECT COUNT(*) AS n FROM launch_states", vec![]), 1, "nothing more stored");
        // Up to 4 KB is taken (an EHR's launch or code may be long: RFC 6749 §4.1.2).
        let r = c.get(app.url(&format!("launch?iss={iss}&launch={}", "z".repeat(4096)))).send().await.unwrap();
        assert_eq!(r.status(), 302);
    }

    async fn anonymous_metrics_are_refused(app: TestApp) {
        let r = app.anonymous.get(app.url("metrics")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let user = client_with_token(&issue(&app.tokens, &app.admin_client_id, "user/Communication.rs", Some("Practitioner/d1"), None));
        assert_eq!(user.get(app.url("metrics")).send().await.unwrap().status(), 403);
        assert_eq!(app.get("metrics").await.status(), 200, "a system client's token");
    }

    async fn a_user_put_to_an_unused_id_answers_as_for_a_hidden_one(app: TestApp) {
        let hidden = app.create(&json!({"resourceType": "Communication", "status": "completed",
            "sender": {"reference": "Patient/p2"}, "recipient": [{"reference": "Practitioner/d2"}]})).await;
        let unused = uuid::Uuid::new_v4().to_string();
        for (user, patient) in [("Patient/p1", Some("p1")), ("Practitioner/d1", None)] {
            let scope = if patient.is_some() { "patient/Communication.cruds" } else { "user/Communication.cruds" };
            let c = client_with_token(&issue(&app.tokens, &app.admin_client_id, scope, Some(user), patient));
            let before = app.row_counts();
            let mut answers = vec![];
            for id in [&hidden, &unused] {
                let body = json!({"resourceType": "Communication", "id": id, "status": "completed",
                    "sender": {"reference": user}, "recipient": [{"reference": "Practitioner/d1"}], "category": [{"text": "question"}]});
                let r = c.put(app.url(&format!("Communication/{id}"))).header("content-type", FHIR_JSON)
                    .body(body.to_string()).send().await.unwrap();
                let status = r.status().as_u16();
                let oo: Value = r.json().await.unwrap();
                answers.push((status, oo["issue"][0]["code"].clone()));
                // With If-Match as well: no 412 for the unused id.
                let r = c.put(app.url(&format!("Communication/{id}"))).header("content-type", FHIR_JSON)
                    .header("if-match", "W/\"1\"").body(body.to_string()).send().await.unwrap();
                assert_eq!(r.status(), 404, "{user} If-Match PUT {id}");
            }
            assert_eq!(answers[0].0, 404, "{user}: {answers:?}");
            assert_eq!(answers[0], answers[1], "{user}: the hidden and the unused id answer alike");
            assert_eq!(app.row_counts(), before, "{user}: nothing stored");
        }
        // A system token still creates with a client-assigned id.
        let r = app.put(&format!("Communication/{unused}"), &json!({"resourceType": "Communication", "id": unused, "status": "completed"})).await;
        assert_eq!(r.status(), 201);
    }
}

both_backends_with! {
    |s| {
        // A data directory Courier makes itself, holding the SQLite database and the master key.
        let data = s.data_dir.join("data");
        if s.database_url.starts_with("sqlite://") {
            s.database_url = format!("sqlite://{}", data.join("courier.db").display());
        }
        s.data_dir = data;
        s.master_key = None;
    }

    async fn the_data_directory_is_0700_and_every_file_in_it_0600(app: TestApp) {
        use std::os::unix::fs::PermissionsExt;
        app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let dir = app.dir.path().join("data");
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(files.iter().any(|f| f.ends_with("master.key")), "{files:?}");
        if app.backend == Backend::Sqlite {
            assert!(files.iter().any(|f| f.to_string_lossy().ends_with("courier.db-wal")), "{files:?}");
        }
        for f in files {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
    }
}

both_backends! {
    async fn bodies_that_would_cost_too_much_memory_are_refused_before_they_are_parsed(app: TestApp) {
        let before = app.row_counts();
        // ~420 KB of tiny values: under the byte limit, but some 200,000 values (~16 MB parsed).
        let zeros = format!("[{}0]", "0,".repeat(210_000));
        let resource = format!(r#"{{"resourceType":"Communication","status":"completed","note":[{{"text":"x"}}],"x":{zeros}}}"#);
        let empties = format!("[{}{{}}]", "{},".repeat(210_000));
        let bundle = format!(r#"{{"resourceType":"Bundle","type":"transaction","entry":{empties}}}"#);
        for (path, body) in [("Communication", &resource), ("", &bundle)] {
            let r = app.client.post(app.url(path)).header("content-type", FHIR_JSON).body(body.clone()).send().await.unwrap();
            assert_eq!(r.status(), 413, "POST /{path}");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["issue"][0]["code"], "too-costly", "{oo}");
        }
        assert_eq!(app.row_counts(), before, "nothing stored");

        // A body declared larger than the limit is refused from its Content-Length, unread.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let token = issue(&app.tokens, &app.admin_client_id, ADMIN_SCOPES, None, None);
        let mut s = tokio::net::TcpStream::connect(app.base.trim_start_matches("http://")).await.unwrap();
        s.write_all(format!("POST /Communication HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: 100000000\r\n\r\n{{").as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(std::time::Duration::from_secs(20), s.read(&mut buf)).await.expect("answered without the body").unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    }
}
