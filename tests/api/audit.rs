use crate::both_backends;
use crate::helpers::*;
use base64::Engine;
use serde_json::{json, Value};

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

    // Issue 24: an AuditEvent is one row of its own (store::audit_rows), its id derived from its
    // row; every way to read and search it works as for any resource.
    async fn audit_events_have_rows_of_their_own_and_read_and_search_as_before(app: TestApp) {
        let made: Vec<String> = vec![
            app.create(&message("Patient/r1", "2026-11-01T10:00:00Z", "one")).await,
            app.create(&message("Patient/r1", "2026-11-01T10:00:01Z", "two")).await,
            app.create(&message("Patient/r1", "2026-11-01T10:00:02Z", "three")).await,
        ];
        app.get_json(&format!("Communication/{}", made[0])).await;
        let n = |sql: &str| -> i64 { app.store.query::<courier::store::rows::CountRow>(sql, vec![]).unwrap()[0].n };
        assert_eq!(n("SELECT COUNT(*) AS n FROM resources WHERE res_type = 'AuditEvent'"), 0);
        assert_eq!(n("SELECT COUNT(*) AS n FROM resource_versions WHERE res_type = 'AuditEvent'"), 0);
        assert!(n("SELECT COUNT(*) AS n FROM audit_events") >= 4);
        assert_eq!(n("SELECT COUNT(*) AS n FROM audit_events WHERE fhir_id IS NOT NULL"), 0, "ids are derived, not stored");

        let first = audit_events(&app, &format!("entity=Communication/{}", made[0])).await;
        assert_eq!(first.len(), 2, "its create and its read");
        let id = first[0]["id"].as_str().unwrap().to_string();
        assert!(id.len() == 22 && id.bytes().all(|b| b.is_ascii_alphanumeric()), "{id}");
        assert_eq!(app.get_json(&format!("AuditEvent/{id}")).await["id"], id.as_str());
        assert_eq!(app.get_json(&format!("AuditEvent/{id}/_history/1")).await["id"], id.as_str());
        assert_eq!(app.get(&format!("AuditEvent/{id}/_history/2")).await.status(), 404);
        // An id of the same shape that names no event, and one that is not Courier's at all.
        let other = courier_store::ids::new_id();
        assert_eq!(app.get(&format!("AuditEvent/{other}")).await.status(), 404);
        assert_eq!(app.get("AuditEvent/no-such-event").await.status(), 404);

        // By id, and sorted by id (most are not stored: sorted as they read).
        let mut trail: Vec<String> = Vec::new();
        for m in &made {
            trail.extend(audit_events(&app, &format!("entity=Communication/{m}")).await.iter().map(|e| e["id"].as_str().unwrap().to_string()));
        }
        assert_eq!(trail.len(), 4);
        let two = format!("{},{}", trail[1], trail[3]);
        let mut got = ids(&app.get_json(&format!("AuditEvent?_id={two}")).await);
        got.sort();
        let mut want = vec![trail[1].clone(), trail[3].clone()];
        want.sort();
        assert_eq!(got, want);
        let sorted = ids(&app.get_json("AuditEvent?patient=Patient/r1&subtype=create,read&_sort=_id&_count=50").await);
        assert!(sorted.len() >= 4 && sorted.windows(2).all(|w| w[0] < w[1]), "{sorted:?}");
        let desc = ids(&app.get_json("AuditEvent?patient=Patient/r1&subtype=create,read&_sort=-_id&_count=50").await);
        assert_eq!(desc, sorted.iter().rev().cloned().collect::<Vec<_>>());

        // By date, on the row's columns: the instant it was recorded, before and after it.
        let ev = app.get_json(&format!("AuditEvent/{}", trail[2])).await;
        let at = ev["recorded"].as_str().unwrap().to_string();
        let scope = "patient=Patient/r1&_count=50";
        assert!(ids(&app.get_json(&format!("AuditEvent?{scope}&date={at}")).await).contains(&trail[2]));
        assert!(!ids(&app.get_json(&format!("AuditEvent?{scope}&date=lt{at}")).await).contains(&trail[2]));
        assert!(ids(&app.get_json(&format!("AuditEvent?{scope}&date=ge{at}")).await).contains(&trail[2]));
        assert!(!ids(&app.get_json(&format!("AuditEvent?{scope}&date=ne{at}")).await).contains(&trail[2]));
        assert!(ids(&app.get_json(&format!("AuditEvent?date={at}&_count=50")).await).contains(&trail[2]), "the date alone");
        // (Each search adds its own event about r1: the reads and creates alone compare.)
        let recorded = |b: Value| -> Vec<String> {
            b["entry"].as_array().unwrap().iter().map(|e| e["resource"]["recorded"].as_str().unwrap().to_string()).collect()
        };
        let newest_first = recorded(app.get_json(&format!("AuditEvent?{scope}&subtype=create,read&_sort=-date")).await);
        let oldest_first = recorded(app.get_json(&format!("AuditEvent?{scope}&subtype=create,read&_sort=date")).await);
        assert_eq!(newest_first.len(), 4);
        assert!(newest_first.windows(2).all(|w| w[0] >= w[1]), "{newest_first:?}");
        assert!(oldest_first.windows(2).all(|w| w[0] <= w[1]), "{oldest_first:?}");
        assert_eq!(app.get_json("AuditEvent?date:missing=true&_summary=count").await["total"], 0);
        let with_entity = app.get_json(&format!("AuditEvent?{scope}&subtype=create,read&entity:missing=false&_summary=count")).await["total"].clone();
        assert_eq!(with_entity, 4);
        assert_eq!(app.get_json(&format!("AuditEvent?{scope}&subtype=create,read&entity:missing=true&_summary=count")).await["total"], 0);

        // Included both ways.
        let b = app.get_json(&format!("Communication?_id={}&_revinclude=AuditEvent:entity", made[0])).await;
        let included: Vec<&str> = b["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "include").map(|e| e["resource"]["id"].as_str().unwrap()).collect();
        assert_eq!(included.len(), 2, "{b}");
        let b = app.get_json(&format!("AuditEvent?entity=Communication/{}&_include=AuditEvent:entity", made[1])).await;
        let included: Vec<&str> = b["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "include").map(|e| e["resource"]["id"].as_str().unwrap()).collect();
        assert_eq!(included, vec![made[1].as_str()], "{b}");

        // AuditEvents that name AuditEvents (a read of one names it as its entity), both ways.
        let b = app.get_json(&format!("AuditEvent?_id={id}&_revinclude=AuditEvent:entity")).await;
        let readers: Vec<&Value> = b["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "include").collect();
        assert!(!readers.is_empty() && readers.iter().all(|e| e["resource"]["entity"].to_string().contains(&id)), "{b}");
        let b = app.get_json(&format!("AuditEvent?entity=AuditEvent/{id}&_include=AuditEvent:entity")).await;
        let included: Vec<&str> = b["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "include").map(|e| e["resource"]["id"].as_str().unwrap()).collect();
        assert!(included.contains(&id.as_str()), "{b}");
        // A row number is not an id: `_id` takes ids only.
        for not_an_id in ["%231", "%23%31", "!"] {
            assert_eq!(app.get_json(&format!("AuditEvent?_id={not_an_id}")).await["entry"].as_array().map_or(0, |e| e.len()), 0, "{not_an_id}");
        }
        // A body stored uncompressed carries its id too (it is drafted before its row exists).
        app.store.compress_bodies.store(false, std::sync::atomic::Ordering::Relaxed);
        let plain = app.create(&message("Patient/r1", "2026-11-01T10:00:03Z", "four")).await;
        app.store.compress_bodies.store(true, std::sync::atomic::Ordering::Relaxed);
        let ev = audit_events(&app, &format!("entity=Communication/{plain}")).await;
        let ev_id = ev[0]["id"].as_str().unwrap();
        assert_eq!(ev_id.len(), 22, "{}", ev[0]);
        assert_eq!(app.get_json(&format!("AuditEvent/{ev_id}")).await["id"], ev_id);

        // Paged one by one: every event once.
        let pages = all_pages(&app.client, app.url("AuditEvent?patient=Patient/r1&_count=1")).await;
        let paged: Vec<String> = pages.iter().flat_map(ids).collect();
        let mut unique = paged.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), paged.len());
        assert!(trail.iter().all(|t| paged.contains(t)));
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

/// Issue 24: AuditEvents written before they had rows of their own (a SQLite database made by
/// the build before, `tests/fixtures/before-audit-events`: 4 messages, their reads, 3 refused
/// requests, 12 AuditEvents, all sealed) move to `audit_events` on upgrade, keep their ids, are
/// found by every search they were found by, and their chain verifies unchanged; new events get
/// derived ids and seal onto it. (It replaces the test of the earlier chain compaction, whose
/// down migration needs AuditEvents in the generic tables.)
#[tokio::test]
async fn audit_events_stored_before_move_to_their_own_rows_on_upgrade() {
    use courier::audit::chain::{seal, verify, Verdict};
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/before-audit-events");
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("courier.db");
    let mut gz =
        flate2::read::GzDecoder::new(std::fs::File::open(fixture.join("courier.db.gz")).unwrap());
    std::io::copy(&mut gz, &mut std::fs::File::create(&db).unwrap()).unwrap();
    let key = std::fs::read_to_string(fixture.join("master.key"))
        .unwrap()
        .trim()
        .to_string();
    let url = format!("sqlite://{}", db.display());
    let app = spawn_app_with(Backend::Sqlite, move |s| {
        s.database_url = url;
        s.master_key = Some(key.into());
    })
    .await
    .unwrap();
    let n = |sql: &str| -> i64 {
        app.store
            .query::<courier::store::rows::CountRow>(sql, vec![])
            .unwrap()[0]
            .n
    };
    assert_eq!(
        n("SELECT COUNT(*) AS n FROM resources WHERE res_type = 'AuditEvent'"),
        0,
        "none left in the generic tables"
    );
    let old: Vec<String> = std::fs::read_to_string(fixture.join("audit-events.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(old.len(), 12);
    match verify(&app.store).unwrap() {
        Verdict::Intact { links, .. } => assert!(links >= 12, "{links} links"),
        v => panic!("the moved trail does not verify: {v:?}"),
    }
    // Each reads by its id, and the whole trail lists them.
    for id in &old {
        let ev = app.get_json(&format!("AuditEvent/{id}")).await;
        assert_eq!(ev["id"], id.as_str(), "{ev}");
    }
    let listed = ids(&app.get_json("AuditEvent?_count=200").await);
    assert!(old.iter().all(|i| listed.contains(i)), "{listed:?}");
    // By patient, resource and outcome, as before: each message's create and read name it.
    let messages: Vec<String> = std::fs::read_to_string(fixture.join("communications.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    for m in &messages {
        let about = ids(&app
            .get_json(&format!("AuditEvent?entity=Communication/{m}&_count=50"))
            .await);
        assert_eq!(
            about.iter().filter(|i| old.contains(i)).count(),
            2,
            "{m}: {about:?}"
        );
    }
    let p1 = ids(&app
        .get_json("AuditEvent?patient=Patient/p1&_sort=-date&_count=50")
        .await);
    // p1's two messages (create, read), the refused PUT of Patient/p1 and the search that
    // disclosed p1's trail.
    assert_eq!(p1.iter().filter(|i| old.contains(i)).count(), 6, "{p1:?}");
    let refused = ids(&app.get_json("AuditEvent?outcome:not=0&_count=50").await);
    assert_eq!(
        refused.iter().filter(|i| old.contains(i)).count(),
        3,
        "{refused:?}"
    );
    assert_eq!(
        ids(&app.get_json(&format!("AuditEvent?_id={}", old[5])).await),
        vec![old[5].clone()]
    );
    // New events: an id derived from their row, none stored; sealed onto the moved chain.
    let created = app
        .create(&message("Patient/p1", "2026-11-01T10:00:00Z", "after"))
        .await;
    let mine = ids(&app
        .get_json(&format!("AuditEvent?entity=Communication/{created}"))
        .await);
    assert_eq!(mine.len(), 1);
    assert!(!old.contains(&mine[0]));
    assert_eq!(
        n("SELECT COUNT(*) AS n FROM audit_events WHERE fhir_id IS NULL") as usize,
        n("SELECT COUNT(*) AS n FROM audit_events") as usize - old.len()
    );
    let mut sealed = 0;
    for _ in 0..100 {
        let _ = seal(&app.store);
        if let Verdict::Intact { links, unsealed: 0 } = verify(&app.store).unwrap() {
            sealed = links;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(sealed > 12, "{:?}", verify(&app.store).unwrap());
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
            "SELECT c.vid, COALESCE(a.fhir_id, '') AS audit_id FROM audit_chain c JOIN audit_events a ON a.rid = c.vid \
             ORDER BY c.seq LIMIT 4",
            vec![],
        )
        .unwrap()
        .into_iter()
        .map(|v: V| V { audit_id: app.store.audit_ids().id(v.vid), ..v })
        .collect();
    let (victim, donor) = (&sealed[2], &sealed[3]);
    // The row given another id (its own is derived from its row): the id is in the hash.
    app.store
        .execute(
            "UPDATE audit_events SET fhir_id = ? WHERE rid = ?",
            vec![donor.audit_id.clone().into(), victim.vid.into()],
        )
        .unwrap();
    match verify(&app.store).unwrap() {
        Verdict::Broken { audit_id, why, .. } => {
            assert_eq!(audit_id, donor.audit_id, "named by the id it carries now");
            assert!(why.contains("changed after it was sealed"), "{why}");
        }
        other => panic!("verify missed the new id: {other:?}"),
    }
    app.store
        .execute(
            "UPDATE audit_events SET fhir_id = NULL WHERE rid = ?",
            vec![victim.vid.into()],
        )
        .unwrap();
    assert!(matches!(
        verify(&app.store).unwrap(),
        Verdict::Intact { .. }
    ));
    app.store
        .execute(
            "UPDATE audit_events SET body = (SELECT body FROM audit_events WHERE rid = ?) WHERE rid = ?",
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

/// Every AuditEvent `query` finds (all pages), by id.
async fn audit_ids(app: &TestApp, client: &reqwest::Client, query: &str) -> Vec<String> {
    all_pages(client, app.url(&format!("AuditEvent?{query}")))
        .await
        .iter()
        .flat_map(|b| b["entry"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["search"]["mode"] == "match")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

/// The ids each of `queries` finds (with `extra`), sorted.
async fn sorted_answers(app: &TestApp, queries: &[&str], extra: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    for q in queries {
        let mut got = audit_ids(app, &app.client, &format!("{q}&{extra}&_count=50")).await;
        got.sort();
        out.push(got);
    }
    out
}

fn strs<'a>(v: &'a Value, path: &[&str]) -> Vec<&'a str> {
    let mut at: Vec<&Value> = vec![v];
    for k in path {
        at = at
            .into_iter()
            .flat_map(|x| match &x[*k] {
                Value::Array(a) => a.iter().collect::<Vec<_>>(),
                Value::Null => vec![],
                o => vec![o],
            })
            .collect();
    }
    at.into_iter().filter_map(Value::as_str).collect()
}

both_backends! {
    // Issue 24: an AuditEvent's codes and names have no index rows (search::UNSTORED); a search
    // checks them on the bodies of the candidates its other conditions select. Each query here
    // is held to the same filter applied to the AuditEvents themselves, beside the stored
    // conditions and under a patient's access condition, through pages, counts, sorts and
    // `_include`.
    async fn audit_codes_without_index_rows_are_searched_on_the_bodies(app: TestApp) {
        let mut made = Vec::new();
        for (i, p) in ["q1", "q1", "q2"].iter().enumerate() {
            made.push(app.create(&message(&format!("Patient/{p}"), "2024-01-01", &format!("m{i}"))).await);
        }
        let dr = client_with_token(&crate::messaging::user_token(&app, "user/AuditEvent.rs user/Communication.rs", "Practitioner/dr-1", None));
        assert_eq!(dr.get(app.url(&format!("Communication/{}", made[0]))).send().await.unwrap().status(), 200);
        assert_eq!(app.get(&format!("Communication/{}", made[2])).await.status(), 200);
        assert_eq!(app.get("Communication/nope").await.status(), 404);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let before = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        let until = format!("date=lt{}", before.replace('+', "%2B"));

        // The AuditEvents so far, read whole (searches from here on are later).
        let all: Vec<Value> = {
            let b = app.get_json(&format!("AuditEvent?{until}&_count=1000")).await;
            b["entry"].as_array().unwrap().iter().map(|e| e["resource"].clone()).collect()
        };
        assert!(all.len() >= 6, "three creates, two reads and a failed read: {}", all.len());
        let id = |e: &Value| e["id"].as_str().unwrap().to_string();
        let about_q1 = |e: &Value| strs(e, &["agent", "who", "reference"]).into_iter().chain(strs(e, &["entity", "what", "reference"])).any(|r| r == "Patient/q1");
        let subtypes = |e: &Value| strs(e, &["subtype", "code"]).into_iter().map(String::from).collect::<Vec<_>>();
        type Filter = Box<dyn Fn(&Value) -> bool>;
        let cases: Vec<(&str, Filter)> = vec![
            ("type=rest", Box::new(|e| e["type"]["code"] == "rest")),
            ("type=http://terminology.hl7.org/CodeSystem/audit-event-type|rest", Box::new(|e| e["type"]["code"] == "rest")),
            ("type=http://other|rest", Box::new(|_| false)),
            ("subtype=read", Box::new(move |e| subtypes(e).contains(&"read".to_string()))),
            ("subtype=create,read", Box::new(move |e| subtypes(e).iter().any(|s| s == "create" || s == "read"))),
            ("subtype:not=read", Box::new(move |e| !subtypes(e).contains(&"read".to_string()))),
            ("action=R", Box::new(|e| e["action"] == "R")),
            ("action=R&outcome=4", Box::new(|e| e["action"] == "R" && e["outcome"] == "4")),
            // A success has no outcome row (search::SPARSE): each form still matches exactly.
            ("outcome=0", Box::new(|e| e["outcome"] == "0")),
            ("outcome=|0", Box::new(|e| e["outcome"] == "0")),
            ("outcome=http://hl7.org/fhir/audit-event-outcome|0", Box::new(|_| false)),
            ("outcome=4", Box::new(|e| e["outcome"] == "4")),
            ("outcome=0,4", Box::new(|e| e["outcome"] == "0" || e["outcome"] == "4")),
            ("outcome:not=0", Box::new(|e| e["outcome"] != "0")),
            ("outcome:not=4", Box::new(|e| e["outcome"] != "4")),
            ("outcome:not=0,4", Box::new(|e| e["outcome"] != "0" && e["outcome"] != "4")),
            ("outcome:missing=true", Box::new(|e| e.get("outcome").is_none())),
            ("outcome:missing=false", Box::new(|e| e.get("outcome").is_some())),
            ("outcome=0&subtype=read", Box::new(move |e| e["outcome"] == "0" && subtypes(e).contains(&"read".to_string()))),
            ("entity-type=XrequestId", Box::new(|e| strs(e, &["entity", "type", "code"]).contains(&"XrequestId"))),
            ("entity-role=1", Box::new(|e| strs(e, &["entity", "role", "code"]).contains(&"1"))),
            ("agent-name=cour", Box::new(|e| strs(e, &["agent", "name"]).iter().any(|n| n.to_lowercase().starts_with("cour")))),
            ("agent-name:exact=Courier", Box::new(|e| strs(e, &["agent", "name"]).contains(&"Courier"))),
            ("agent-name:exact=courier", Box::new(|_| false)),
            ("agent-name:contains=ouri", Box::new(|e| strs(e, &["agent", "name"]).iter().any(|n| n.to_lowercase().contains("ouri")))),
            ("address=127", Box::new(|e| strs(e, &["agent", "network", "address"]).iter().any(|a| a.starts_with("127")))),
            ("policy:missing=true", Box::new(|e| strs(e, &["agent", "policy"]).is_empty())),
            ("subtype=read&patient=Patient/q1", Box::new(move |e| about_q1(e) && strs(e, &["subtype", "code"]).contains(&"read"))),
        ];
        for (query, keep) in &cases {
            let mut want: Vec<String> = all.iter().filter(|e| keep(e)).map(id).collect();
            want.sort();
            let mut got = audit_ids(&app, &app.client, &format!("{query}&{until}&_count=2")).await;
            got.sort();
            assert_eq!(got, want, "{query}");
            let counted = app.get_json(&format!("AuditEvent?{query}&{until}&_summary=count&_count=1")).await;
            assert_eq!(counted["total"], want.len(), "{query}: count");
            assert!(counted["link"].as_array().unwrap().iter().all(|l| l["relation"] != "next"), "{query}: a count has no next page");
            let first = app.get_json(&format!("AuditEvent?{query}&{until}&_total=accurate&_count=1")).await;
            assert_eq!(first["total"], want.len(), "{query}: _total");
        }
        // Some of them match something, and something else.
        for q in ["subtype=read", "subtype:not=read", "entity-role=1", "action=R&outcome=4", "outcome=0", "outcome:not=0"] {
            let keep = &cases.iter().find(|(c, _)| *c == q).unwrap().1;
            let n = all.iter().filter(|e| keep(e)).count();
            assert!(n > 0 && n < all.len(), "{q}: {n} of {}", all.len());
        }

        // A user sees only what they did, whatever the body's codes say.
        let by_dr = |e: &Value| strs(e, &["agent", "who", "reference"]).contains(&"Practitioner/dr-1");
        let mut want: Vec<String> = all.iter().filter(|e| by_dr(e) && subtypes(e).iter().any(|s| s == "create" || s == "read")).map(id).collect();
        want.sort();
        assert_eq!(want.len(), 1, "the read by Practitioner/dr-1: {want:?}");
        let mut got = audit_ids(&app, &dr, &format!("subtype=create,read&{until}&_count=1")).await;
        got.sort();
        assert_eq!(got, want);

        // Sorted by a code on the body: each event's lowest (or highest) subtype, none last.
        for (sort, descending) in [("subtype", false), ("-subtype", true)] {
            let got = audit_ids(&app, &app.client, &format!("_sort={sort}&{until}&_count=3")).await;
            assert_eq!(got.len(), all.len());
            let key = |i: &String| {
                let e = all.iter().find(|e| id(e) == *i).unwrap();
                let s = subtypes(e);
                if descending { s.into_iter().max() } else { s.into_iter().min() }
            };
            let keys: Vec<Option<String>> = got.iter().map(key).collect();
            for w in keys.windows(2) {
                match (&w[0], &w[1]) {
                    (Some(a), Some(b)) => assert!(if descending { a >= b } else { a <= b }, "{sort}: {keys:?}"),
                    (None, Some(_)) => panic!("{sort}: an event without a subtype before one with: {keys:?}"),
                    _ => {}
                }
            }
        }

        // `_include` from a page checked on the bodies.
        let b = app.get_json(&format!("AuditEvent?subtype=read&entity-role=4&{until}&_include=AuditEvent:entity")).await;
        let included: Vec<&str> = b["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "include").map(|e| e["resource"]["id"].as_str().unwrap()).collect();
        assert!(included.contains(&made[0].as_str()) && included.contains(&made[2].as_str()), "{included:?}");

        // A token whose scope filters by a code without an index (SMART v2 `?subtype=read`) is
        // refused rather than having every AuditEvent's body checked for it: the cost, and a
        // "too costly" answer, would depend on events it cannot see. (The token endpoint does not
        // grant such a scope; this one is issued directly.) One filtered by `outcome`, which has
        // an index, applies.
        let reader = courier::auth::clients::add(&app.store, "audit reader", courier::auth::clients::KeySource::Document(es384_key().1.to_string()),
            "system/Communication.rs system/AuditEvent.rs").unwrap();
        let reads_only = client_with_token(&issue(&app.tokens, &reader, "system/Communication.rs system/AuditEvent.rs?subtype=read", None, None));
        let r = reads_only.get(app.url(&format!("AuditEvent?{until}"))).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let oo: Value = r.json().await.unwrap();
        assert!(oo.to_string().contains("cannot apply as an access condition"), "{oo}");
        let r = reads_only.get(app.url(&format!("Communication?_id={}&_revinclude=AuditEvent:entity", made[0]))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert!(b["entry"].as_array().unwrap().iter().all(|e| e["search"]["mode"] != "include"), "no AuditEvent through _revinclude: {b}");
        let failures_only = client_with_token(&issue(&app.tokens, &reader, "system/AuditEvent.rs?outcome=4", None, None));
        let mut want: Vec<String> = all.iter().filter(|e| e["outcome"] == "4").map(id).collect();
        want.sort();
        assert!(!want.is_empty());
        let mut got = audit_ids(&app, &failures_only, &format!("subtype=read&{until}&_count=1")).await;
        got.sort();
        let mut failed_reads: Vec<String> = all.iter().filter(|e| e["outcome"] == "4" && subtypes(e).contains(&"read".to_string())).map(id).collect();
        failed_reads.sort();
        assert_eq!(got, failed_reads, "the scope's outcome, and the search's subtype on the bodies");

        // A search that would check more candidates on their bodies than the store allows is
        // refused as too costly, naming the parameter; one whose page fills first is answered.
        app.store.body_candidates.store(3, std::sync::atomic::Ordering::Relaxed);
        for query in ["type=110100", "type=rest&_summary=count", "_sort=subtype", "subtype=read&_total=accurate"] {
            let r = app.get(&format!("AuditEvent?{query}")).await;
            assert_eq!(r.status(), 400, "{query}");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["issue"][0]["code"], "too-costly", "{query}: {oo}");
            let code = query.split(['=', '&']).next().unwrap().trim_start_matches("_sort");
            let named = if code.is_empty() { "subtype" } else { code };
            assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains(named), "{query}: {oo}");
        }
        assert_eq!(app.get("AuditEvent?type=rest&_count=1").await.status(), 200);
        // The outcome sorts in SQL (its missing rows read as 0): never too costly.
        assert_eq!(app.get("AuditEvent?_sort=-outcome&_count=2").await.status(), 200);
        assert_eq!(audit_ids(&app, &app.client, &format!("patient=Patient/q2&subtype=create&{until}")).await.len(), 1);
        app.store.body_candidates.store(courier::store::BODY_CANDIDATES, std::sync::atomic::Ordering::Relaxed);

        // None of these codes has an index row; the outcome keeps its own.
        let n = |sql: &str| -> i64 {
            let r: Vec<courier::store::rows::CountRow> = app.store.query(sql, vec![]).unwrap();
            r[0].n
        };
        // (AuditEvents' rows are their own tables: store::audit_rows.)
        assert_eq!(n("SELECT COUNT(*) AS n FROM audit_tokens WHERE param IN ('1', '5', '6', '10', '11', '14', '15', '17', '18')"), 0);
        assert_eq!(n("SELECT COUNT(*) AS n FROM idx_string WHERE param IN ('2', '4', '9')"), 0);
        // A success has none (search::SPARSE); a failure has its row.
        assert_eq!(n("SELECT COUNT(*) AS n FROM audit_tokens WHERE param = '12' AND code = '0'"), 0);
        let failures = all.iter().filter(|e| e["outcome"] != "0").count() as i64;
        assert!(failures > 0 && n("SELECT COUNT(*) AS n FROM audit_tokens WHERE param = '12'") >= failures);

        // Sorted by outcome (a success's missing row sorts as 0), also where bodies may not be
        // checked one by one.
        for (sort, descending) in [("outcome", false), ("-outcome", true)] {
            let got = audit_ids(&app, &app.client, &format!("_sort={sort}&{until}&_count=3")).await;
            assert_eq!(got.len(), all.len());
            let codes: Vec<String> = got.iter().map(|i| all.iter().find(|e| id(e) == *i).unwrap()["outcome"].as_str().unwrap().to_string()).collect();
            assert!(codes.windows(2).all(|w| if descending { w[0] >= w[1] } else { w[0] <= w[1] }), "{sort}: {codes:?}");
        }

        // Each outcome condition answers what the bodies say.
        let outcome_cases = ["outcome=0", "outcome=4", "outcome=0,4", "outcome:not=0", "outcome:missing=false"];
        let before = sorted_answers(&app, &outcome_cases, &until).await;
        for (q, got) in outcome_cases.iter().zip(&before) {
            let keep = &cases.iter().find(|(c, _)| c == q).unwrap().1;
            let mut want: Vec<String> = all.iter().filter(|e| keep(e)).map(id).collect();
            want.sort();
            assert_eq!(got, &want, "{q}");
        }
    }
}

both_backends! {
    // From an outside probe: a clinician's search that named no patient
    // (`Communication?status=completed`), and a socket's catch-up that replayed every message
    // the user may see, disclosed patients' messages without a trace in those patients'
    // accounting (`AuditEvent?patient=`). Each now names every patient whose data it carried.
    async fn every_patient_whose_data_was_disclosed_finds_it_in_their_audit_trail(app: TestApp) {
        let to = |p: &str, text: &str| json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": format!("Patient/{p}")}, "sender": {"reference": "Practitioner/dr-1"},
            "recipient": [{"reference": format!("Patient/{p}")}, {"reference": "Practitioner/dr-2"}],
            "sent": "2026-12-01T10:00:00Z", "payload": [{"contentString": text}]});
        app.create(&to("d1", "for d1")).await;
        app.create(&to("d2", "for d2")).await;
        app.create(&to("d3", "for d3")).await;
        let mut third = to("d3", "not for dr-2");
        third["recipient"] = json!([{"reference": "Patient/d3"}]);
        app.create(&third).await;
        let dr2 = client_with_token(&crate::messaging::user_token(&app, "user/Communication.rs", "Practitioner/dr-2", None));
        let count = |q: String| {
            let app = &app;
            async move { app.get_json(&format!("AuditEvent?{q}&_summary=count")).await["total"].as_i64().unwrap() }
        };
        // dr-2's events in each patient's trail (the counts themselves are another client's).
        let trail = |p: &str| format!("agent=Practitioner/dr-2&patient=Patient/{p}");
        let before = [count(trail("d1")).await, count(trail("d2")).await, count(trail("d3")).await];

        // A search that names no patient.
        let r = dr2.get(app.url("Communication?status=completed")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["entry"].as_array().unwrap().len(), 3, "d1's, d2's and d3's first message: {b}");
        let after = [count(trail("d1")).await, count(trail("d2")).await, count(trail("d3")).await];
        assert_eq!([after[0] - before[0], after[1] - before[1], after[2] - before[2]], [1, 1, 1], "one search event in each trail");
        let ev = &app.get_json("AuditEvent?patient=Patient/d1&agent=Practitioner/dr-2&subtype=search-type&_sort=-date&_count=1").await["entry"][0]["resource"];
        let named: Vec<&str> = strs(ev, &["entity", "what", "reference"]);
        for p in ["Patient/d1", "Patient/d2", "Patient/d3"] {
            assert!(named.contains(&p), "{p} in {ev}");
        }
        assert!(!ev.to_string().contains("PatientQuery"), "three patients: not BALP's one-patient profile: {ev}");
        // A message to two patients discloses both; a batch of reads and a history name whom
        // they disclosed too.
        let mut two = to("d4", "for d4 and d5");
        two.as_object_mut().unwrap().remove("subject");
        two["recipient"] = json!([{"reference": "Patient/d4"}, {"reference": format!("{}/Patient/d5", app.base)}, {"reference": "Practitioner/dr-2"}]);
        let both = app.create(&two).await;
        let batch = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": format!("Communication/{both}")}},
            {"request": {"method": "GET", "url": "Communication?subject=Patient/d4"}}]});
        let r = dr2.post(app.url("")).json(&batch).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(count(format!("{}&subtype=batch", trail("d5"))).await, 1, "the batch is in d5's trail");
        assert_eq!(count(format!("{}&subtype=batch", trail("d4"))).await, 1);
        assert_eq!(dr2.get(app.url("Communication/_history?_count=50")).send().await.unwrap().status(), 200);
        assert_eq!(count(format!("{}&subtype=history-type", trail("d5"))).await, 1, "the history is in d5's trail");
        // A photo a patient's message carries is that patient's: its read names them.
        let photo = app.create(&json!({"resourceType": "Binary", "contentType": "image/png", "data": "iVBORw0KGgo="})).await;
        let mut with_photo = to("d6", "a photo");
        with_photo["payload"] = json!([{"contentAttachment": {"contentType": "image/png", "url": format!("Binary/{photo}")}}]);
        app.create(&with_photo).await;
        let dr2_all = client_with_token(&crate::messaging::user_token(&app, "user/Communication.rs user/Binary.r", "Practitioner/dr-2", None));
        let r = dr2_all.get(app.url(&format!("Binary/{photo}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(count(format!("{}&subtype=read", trail("d6"))).await, 1, "the photo's read is in d6's trail");
        // A search with nothing found names no one.
        let d1 = count(trail("d1")).await;
        let r = dr2.get(app.url("Communication?status=entered-in-error")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(count(trail("d1")).await, d1);

        // A socket's catch-up: the messages it replayed, by patient, when it ends.
        let token = crate::messaging::user_token(&app, "user/Communication.rs", "Practitioner/dr-2", None);
        let (ws, events, _) = crate::messaging::Ws::open(&app, &token, Some(serde_json::json!(0))).await;
        assert!(events.len() >= 3, "{}", events.len());
        drop(ws);
        let mut by_socket = 0;
        for _ in 0..50 {
            let b = app.get_json("AuditEvent?patient=Patient/d2&agent=Practitioner/dr-2&subtype=operation&_count=50").await;
            by_socket = b["entry"].as_array().map_or(0, |a| a.iter().filter(|e| e["resource"]["outcomeDesc"].as_str().unwrap_or("").contains("over the WebSocket")).count());
            if by_socket > 0 { break; }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(by_socket, 1, "the catch-up is in d2's trail");
        let ev = app.get_json("AuditEvent?patient=Patient/d2&agent=Practitioner/dr-2&subtype=operation&_sort=-date&_count=1").await;
        let ev = &ev["entry"][0]["resource"];
        assert!(strs(ev, &["agent", "who", "reference"]).contains(&"Practitioner/dr-2"), "{ev}");
        let named = strs(ev, &["entity", "what", "reference"]);
        assert!(["Patient/d1", "Patient/d2", "Patient/d3"].iter().all(|p| named.contains(p)), "{ev}");
    }
}
