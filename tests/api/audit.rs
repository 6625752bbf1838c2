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

/// The audit chain: sealed by the leader, verified by `courier audit verify`, broken by an edit
/// made directly in the database (which verify names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_holds_until_a_row_is_edited_in_the_database() {
    use courier::audit::chain::{verify, Verdict};
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    for i in 0..5 {
        app.create(&message(
            "Patient/p1",
            "2026-11-01T10:00:00Z",
            &format!("m{i}"),
        ))
        .await;
    }
    app.get_json("AuditEvent?_count=5").await;
    // Sealed within a couple of seconds.
    let mut links = 0;
    for _ in 0..50 {
        if let Verdict::Intact {
            links: l,
            unsealed: 0,
        } = verify(&app.store).unwrap()
        {
            if l >= 6 {
                links = l;
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(links >= 6, "the trail is sealed");
    let cli = |app: &TestApp| {
        std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["audit", "verify"])
            .env("COURIER_DATA_DIR", app.dir.path())
            .env("COURIER_DATABASE_URL", &app.database_url)
            .env(
                "COURIER_MASTER_KEY",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            )
            .env("COURIER_LOG", "error")
            .output()
            .unwrap()
    };
    let out = cli(&app);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));
    // Someone with database access swaps one sealed AuditEvent's stored body for another's (each
    // a valid ciphertext of its own) — or edits it in any other way.
    #[derive(diesel::QueryableByName)]
    struct V {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        vid: i64,
        #[diesel(sql_type = diesel::sql_types::Text)]
        audit_id: String,
    }
    let sealed: Vec<V> = app
        .store
        .query(
            "SELECT vid, audit_id FROM audit_chain ORDER BY seq LIMIT 4",
            vec![],
        )
        .unwrap();
    let (victim, donor) = (&sealed[2], &sealed[3]);
    app.store
        .execute(
            "UPDATE resource_versions SET body = (SELECT body FROM resource_versions WHERE vid = ?) WHERE vid = ?",
            vec![donor.vid.into(), victim.vid.into()],
        )
        .unwrap();
    match verify(&app.store).unwrap() {
        Verdict::Broken { audit_id, .. } => {
            assert_eq!(audit_id, victim.audit_id, "the first broken link is named")
        }
        other => panic!("verify missed the edit: {other:?}"),
    }
    let out = cli(&app);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BROKEN") && text.contains(&victim.audit_id),
        "{text}"
    );
}
