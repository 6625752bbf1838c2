use crate::both_backends;
use crate::helpers::*;
use serde_json::Value;

both_backends! {
    async fn health_readiness_and_request_ids(app: TestApp) {
        assert_eq!(app.get("healthz").await.status(), 200);
        assert_eq!(app.get("readyz").await.status(), 200);
        let r = app.get("metadata").await;
        assert!(!r.headers()["x-request-id"].to_str().unwrap().is_empty());
        // An unsafe incoming id is replaced, not echoed.
        let r = app.client.get(app.url("metadata")).header("x-request-id", "bad id <script>").send().await.unwrap();
        assert_ne!(r.headers()["x-request-id"], "bad id <script>");
        let r = app.get("no/such/endpoint/at/all").await;
        assert_eq!(r.status(), 404);
        assert_eq!(r.json::<Value>().await.unwrap()["resourceType"], "OperationOutcome");
    }

    async fn capability_statement_lists_what_is_supported(app: TestApp) {
        let cs = app.get_json("metadata").await;
        assert_eq!(cs["resourceType"], "CapabilityStatement");
        assert_eq!(cs["fhirVersion"], "4.0.1");
        let resources = cs["rest"][0]["resource"].as_array().unwrap();
        let comm = resources.iter().find(|r| r["type"] == "Communication").unwrap();
        let params: Vec<(&str, &str)> = comm["searchParam"].as_array().unwrap().iter().map(|p| (p["name"].as_str().unwrap(), p["type"].as_str().unwrap())).collect();
        for expected in [("recipient", "reference"), ("sent", "date"), ("category", "token"), ("priority", "token"), ("topic", "token"), ("in-response-to", "reference"), ("_id", "token"), ("_lastUpdated", "date"), ("instantiates-uri", "uri"), ("_security", "token")] {
            assert!(params.contains(&expected), "{expected:?} missing from {params:?}");
        }
        assert_eq!(params.len(), 22);
        let cr = resources.iter().find(|r| r["type"] == "CommunicationRequest").unwrap();
        assert_eq!(cr["searchParam"].as_array().unwrap().len(), 20);
        let binary = resources.iter().find(|r| r["type"] == "Binary").unwrap();
        assert!(binary.get("searchParam").is_none());
        let audit = resources.iter().find(|r| r["type"] == "AuditEvent").unwrap();
        let interactions: Vec<&str> = audit["interaction"].as_array().unwrap().iter().map(|i| i["code"].as_str().unwrap()).collect();
        assert!(!interactions.contains(&"create"));
    }

    async fn message_text_is_encrypted_at_rest(app: TestApp) {
        let secret = "CANARY-7f3a9 chest pain since Tuesday";
        app.create(&message("Patient/p1", "2024-01-01", secret)).await;
        // Also through a transaction and an update.
        let id = app.create(&message("Patient/p1", "2024-01-01", "v1")).await;
        let mut v = app.get_json(&format!("Communication/{id}")).await;
        v["payload"][0]["contentString"] = Value::String(format!("{secret} (updated)"));
        assert_eq!(app.put(&format!("Communication/{id}"), &v).await.status(), 200);
        match app.backend {
            Backend::Sqlite => {
                // Every file of the database (main file, WAL, shared memory).
                for entry in std::fs::read_dir(app.dir.path()).unwrap() {
                    let path = entry.unwrap().path();
                    let bytes = std::fs::read(&path).unwrap();
                    assert!(!bytes.windows(12).any(|w| w == b"CANARY-7f3a9"), "plaintext in {}", path.display());
                }
            }
            Backend::Postgres => {
                use diesel::RunQueryDsl;
                #[derive(diesel::QueryableByName)]
                struct Hit { #[diesel(sql_type = diesel::sql_types::BigInt)] n: i64 }
                let courier::store::db::Db::Postgres(pool) = &app.store.db else { panic!() };
                let mut c = pool.get().unwrap();
                let hits: Vec<Hit> = diesel::sql_query(
                    "SELECT COUNT(*) AS n FROM resource_versions WHERE position(convert_to('CANARY-7f3a9', 'UTF8') in body) > 0")
                    .load(&mut **c).unwrap();
                assert_eq!(hits[0].n, 0);
                for t in ["idx_token", "idx_ref", "idx_string"] {
                    let hits: Vec<Hit> = diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {t} x WHERE CAST(x AS TEXT) LIKE '%CANARY%'")).load(&mut **c).unwrap();
                    assert_eq!(hits[0].n, 0, "{t}");
                }
            }
        }
        // And it reads back.
        assert_eq!(app.get_json(&format!("Communication/{id}")).await["payload"][0]["contentString"], format!("{secret} (updated)"));
    }
}

#[tokio::test]
async fn a_database_refuses_a_different_master_key() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    app.create(&message("Patient/p1", "2024-01-01", "x")).await;
    let mut settings = courier::config::Settings {
        database_url: format!("sqlite://{}", app.dir.path().join("courier.db").display()),
        master_key: Some(
            "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
                .to_string()
                .into(),
        ),
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    settings.base_url = "http://127.0.0.1:0".into();
    let err = courier::startup::Application::build(settings)
        .err()
        .expect("must refuse");
    assert!(err.to_string().contains("master key"), "{err}");
}
