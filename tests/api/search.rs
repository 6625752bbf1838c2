use crate::both_backends;
use crate::helpers::*;
use serde_json::{json, Value};

fn comm(extra: Value) -> Value {
    let mut c = json!({"resourceType": "Communication", "status": "completed"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// What `patient_is_read_from_its_bases_rows_of_type_patient` expects of every `patient` search.
async fn patient_searches(app: &TestApp, m: &[String; 7]) {
    let [a, b, ext, g, none, cr, crg] = m;
    let q = |s: &str| format!("Communication?{s}");
    assert_eq!(app.search_ids(&q("patient=pa")).await, vec![a.clone()]);
    assert_eq!(
        app.search_ids(&q("patient=Patient/pa")).await,
        vec![a.clone()]
    );
    assert_eq!(
        app.search_ids(&q(&format!("patient={}/Patient/pb", app.base)))
            .await,
        vec![b.clone()]
    );
    assert_eq!(
        app.search_ids(&q("patient=https://other.example/fhir/Patient/pa"))
            .await,
        vec![ext.clone()]
    );
    assert_eq!(
        app.search_ids(&q("patient=Group/pa")).await,
        Vec::<String>::new()
    );
    assert_eq!(
        app.search_ids(&q("patient:Patient=pb")).await,
        vec![b.clone()]
    );
    assert_eq!(
        sorted(app.search_ids(&q("patient=pa,pb")).await),
        sorted(vec![a.clone(), b.clone()])
    );
    assert_eq!(
        app.search_ids(&q("patient=pa,pb&_sort=-sent")).await,
        vec![b.clone(), a.clone()]
    );
    assert_eq!(
        sorted(app.search_ids(&q("patient:missing=true")).await),
        sorted(vec![g.clone(), none.clone()])
    );
    assert_eq!(
        sorted(app.search_ids(&q("patient:missing=false")).await),
        sorted(vec![a.clone(), b.clone(), ext.clone()])
    );
    assert_eq!(
        app.get_json(&q("patient=pa,pb&_summary=count")).await["total"],
        2
    );
    // Beside another condition that drives the search, and as the driver of a sort.
    assert_eq!(
        app.search_ids(&q("sent=ge2024-01-15&patient=pb")).await,
        vec![b.clone()]
    );
    // `_include` of an alias runs (Courier stores no Patient to include).
    let inc = app
        .get(&q(&format!("_id={a}&_include=Communication:patient")))
        .await;
    assert_eq!(inc.status(), 200);
    assert_eq!(
        app.search_ids("CommunicationRequest?patient=pa").await,
        vec![cr.clone()]
    );
    assert_eq!(
        app.search_ids("CommunicationRequest?requester=Practitioner/rq&patient:missing=true")
            .await,
        vec![crg.clone()]
    );
    // AuditEvent: an agent or an entity that is a Patient. Each create above by the
    // system token has its AuditEvent name the message's patient (subject, else a
    // recipient) as an entity.
    let created = app
        .get_json("AuditEvent?patient=pa&subtype=create&_summary=count")
        .await;
    assert_eq!(created["total"], 3, "the creates of {a}, {none} and {cr}");
    assert_eq!(
        app.get_json("AuditEvent?patient=Patient/pz&type=110100&_summary=count")
            .await["total"],
        1
    );
    assert_eq!(
        app.get_json("AuditEvent?agent=pz&type=110100&_summary=count")
            .await["total"],
        2
    );
    assert_eq!(
        app.get(&format!(
            "AuditEvent?patient=pz&_include=AuditEvent:patient"
        ))
        .await
        .status(),
        200
    );
}

both_backends! {
    async fn token_search_supports_system_code_forms_not_and_missing(app: TestApp) {
        let a = app.create(&comm(json!({"category": [{"coding": [{"system": "http://s1", "code": "alert"}]}], "medium": [{"coding": [{"system": "http://m", "code": "WRITTEN"}]}]}))).await;
        let b = app.create(&comm(json!({"category": [{"coding": [{"system": "http://s2", "code": "alert"}]}]}))).await;
        let c = app.create(&comm(json!({"category": [{"coding": [{"code": "alert"}]}], "status": "in-progress"}))).await;
        assert_eq!(sorted(app.search_ids("Communication?category=alert").await), sorted(vec![a.clone(), b.clone(), c.clone()]));
        assert_eq!(app.search_ids("Communication?category=http://s1|alert").await, vec![a.clone()]);
        assert_eq!(app.search_ids("Communication?category=|alert").await, vec![c.clone()]);
        assert_eq!(app.search_ids("Communication?category=http://s2|").await, vec![b.clone()]);
        assert_eq!(sorted(app.search_ids("Communication?status:not=completed").await), vec![c.clone()]);
        assert_eq!(sorted(app.search_ids("Communication?medium:missing=true").await), sorted(vec![b.clone(), c.clone()]));
        assert_eq!(app.search_ids("Communication?medium:missing=false").await, vec![a.clone()]);
        // OR within a parameter, AND across repeats.
        assert_eq!(sorted(app.search_ids("Communication?category=http://s1|alert,http://s2|alert").await), sorted(vec![a.clone(), b.clone()]));
        assert_eq!(app.search_ids("Communication?category=alert&status=in-progress").await, vec![c.clone()]);
        assert_eq!(sorted(app.search_ids(&format!("Communication?_id={a},{c}")).await), sorted(vec![a.clone(), c.clone()]));
        // Values of different forms at once (each its own index range, see tests/api/plans.rs).
        assert_eq!(sorted(app.search_ids("Communication?category=|alert,http://s2|").await), sorted(vec![b.clone(), c.clone()]));
        assert_eq!(sorted(app.search_ids("Communication?category=http://s1|alert,alert").await), sorted(vec![a.clone(), b.clone(), c.clone()]));
        assert_eq!(app.search_ids("Communication?category:not=http://s1|alert,|alert").await, vec![b.clone()]);
        // Courier's own parameters: priority and topic.
        let p = app.create(&comm(json!({"priority": "stat", "topic": {"coding": [{"system": "http://t", "code": "lab"}]}}))).await;
        assert_eq!(app.search_ids("Communication?priority=stat").await, vec![p.clone()]);
        assert_eq!(app.search_ids("Communication?topic=http://t|lab").await, vec![p]);
    }

    async fn reference_search_accepts_type_id_bare_id_and_absolute_urls(app: TestApp) {
        let a = app.create(&comm(json!({"subject": {"reference": "Patient/p1"}, "recipient": [{"reference": "Practitioner/d1"}]}))).await;
        let abs = format!("{}/Patient/p2", app.base);
        let b = app.create(&comm(json!({"subject": {"reference": abs}}))).await;
        let ext = app.create(&comm(json!({"subject": {"reference": "https://other.example/fhir/Patient/p1"}}))).await;
        let g = app.create(&comm(json!({"subject": {"reference": "Group/p1"}}))).await;
        assert_eq!(app.search_ids("Communication?subject=Patient/p1").await, vec![a.clone()]);
        assert_eq!(sorted(app.search_ids("Communication?subject=p1").await), sorted(vec![a.clone(), g.clone()]));
        assert_eq!(app.search_ids("Communication?subject:Patient=p1").await, vec![a.clone()]);
        assert_eq!(app.search_ids(&format!("Communication?subject={}/Patient/p1", app.base)).await, vec![a.clone()]);
        assert_eq!(app.search_ids("Communication?subject=Patient/p2").await, vec![b.clone()]);
        assert_eq!(app.search_ids("Communication?subject=https://other.example/fhir/Patient/p1").await, vec![ext.clone()]);
        assert_eq!(app.search_ids("Communication?patient=p1").await, vec![a.clone()]);
        assert_eq!(app.search_ids("Communication?recipient=Practitioner/d1").await, vec![a.clone()]);
        assert_eq!(sorted(app.search_ids("Communication?recipient:missing=true").await), sorted(vec![b.clone(), ext.clone(), g.clone()]));
        // Several values of different forms: OR, each resource once, in counts too.
        let several = "Communication?subject=Patient/p1,https://other.example/fhir/Patient/p1,p2";
        assert_eq!(sorted(app.search_ids(several).await), sorted(vec![a.clone(), b.clone(), ext.clone()]));
        let both = app.create(&comm(json!({"sent": "2024-06-01", "subject": {"reference": "Patient/p9"}, "recipient": [{"reference": "Practitioner/d9"}, {"reference": "Practitioner/d8"}, {"reference": "Practitioner/d9"}]}))).await;
        assert_eq!(app.search_ids("Communication?recipient=Practitioner/d9,d8,Practitioner/d1&_sort=-sent").await, vec![both.clone(), a.clone()]);
        let counted: serde_json::Value = app.get("Communication?recipient=Practitioner/d9,d8,Practitioner/d1&_summary=count").await.json().await.unwrap();
        assert_eq!(counted["total"], 2);
        assert_eq!(app.get("Communication?subject=not a reference!").await.status(), 400);
    }

    async fn date_search_supports_every_prefix_and_partial_dates(app: TestApp) {
        let jan = app.create(&comm(json!({"sent": "2024-01-15T10:00:00Z"}))).await;
        let feb = app.create(&comm(json!({"sent": "2024-02-15T10:00:00Z"}))).await;
        let mar = app.create(&comm(json!({"sent": "2024-03-15T10:00:00+02:00"}))).await;
        let day = app.create(&comm(json!({"sent": "2024-02"}))).await;
        let q = |s: &str| format!("Communication?sent={s}");
        assert_eq!(sorted(app.search_ids(&q("2024-02")).await), sorted(vec![feb.clone(), day.clone()]));
        assert_eq!(app.search_ids(&q("2024-01-15")).await, vec![jan.clone()]);
        assert_eq!(app.search_ids(&q("eq2024-03-15T08:00:00Z")).await, vec![mar.clone()]);
        assert_eq!(sorted(app.search_ids(&q("ne2024-02")).await), sorted(vec![jan.clone(), mar.clone()]));
        assert_eq!(sorted(app.search_ids(&q("gt2024-02")).await), vec![mar.clone()]);
        assert_eq!(sorted(app.search_ids(&q("ge2024-02")).await), sorted(vec![feb.clone(), mar.clone(), day.clone()]));
        assert_eq!(sorted(app.search_ids(&q("lt2024-02")).await), vec![jan.clone()]);
        assert_eq!(sorted(app.search_ids(&q("le2024-02")).await), sorted(vec![jan.clone(), feb.clone(), day.clone()]));
        assert_eq!(sorted(app.search_ids(&q("sa2024-02-20")).await), vec![mar.clone()]);
        assert_eq!(sorted(app.search_ids(&q("eb2024-02-01")).await), vec![jan.clone()]);
        assert!(app.search_ids(&q("ap2024-02-15")).await.contains(&feb));
        assert!(!app.search_ids(&q("ap2019-02-15")).await.contains(&feb));
        // Range: AND of two prefixes.
        assert_eq!(app.search_ids("Communication?sent=ge2024-01-01&sent=lt2024-02-01").await, vec![jan.clone()]);
        assert_eq!(app.get(&q("yesterday")).await.status(), 400);
        assert_eq!(app.get(&q("xx2024")).await.status(), 400);
        // _lastUpdated is a date too.
        assert_eq!(app.search_ids("Communication?_lastUpdated=lt2000-01-01").await.len(), 0);
        assert_eq!(app.search_ids("Communication?_lastUpdated=gt2000-01-01").await.len(), 4);
    }

    async fn string_and_uri_search(app: TestApp) {
        let a = app.create(&comm(json!({"instantiatesUri": ["http://protocols.example/p1"]}))).await;
        assert_eq!(app.search_ids("Communication?instantiates-uri=http://protocols.example/p1").await, vec![a]);
        assert!(app.search_ids("Communication?instantiates-uri=http://protocols.example").await.is_empty());
        // AuditEvent.agent.name (string): prefix, case-insensitive, :exact and :contains.
        let n = |q: &'static str| app.get_json(q);
        let total = |b: Value| b["entry"].as_array().map_or(0, |a| a.len());
        assert!(total(n("AuditEvent?agent-name=cour").await) > 0);
        assert!(total(n("AuditEvent?agent-name:exact=Courier").await) > 0);
        assert_eq!(total(n("AuditEvent?agent-name:exact=courier").await), 0);
        assert!(total(n("AuditEvent?agent-name:contains=URIE").await) > 0);
        assert_eq!(total(n("AuditEvent?agent-name=nobody").await), 0);
        // The prefix is a range of the normalised form: its ends, and several values.
        assert!(total(n("AuditEvent?agent-name=courier").await) > 0);
        assert!(total(n("AuditEvent?agent-name=COURIER").await) > 0);
        assert_eq!(total(n("AuditEvent?agent-name=courieq").await), 0);
        assert_eq!(total(n("AuditEvent?agent-name=couriers").await), 0);
        assert_eq!(total(n("AuditEvent?agent-name=couriez").await), 0);
        // (Each search audits itself, so a later search may find more.)
        let one = total(n("AuditEvent?agent-name=cour").await);
        assert!(one > 0 && total(n("AuditEvent?agent-name=nobody,cour").await) >= one);
        let one = total(n("AuditEvent?agent-name:exact=Courier").await);
        assert!(one > 0 && total(n("AuditEvent?agent-name:exact=nobody,Courier").await) >= one);
    }

    async fn sort_count_total_and_summary(app: TestApp) {
        let a = app.create(&comm(json!({"sent": "2024-01-01", "status": "completed"}))).await;
        let b = app.create(&comm(json!({"sent": "2024-03-01", "status": "completed"}))).await;
        let c = app.create(&comm(json!({"sent": "2024-02-01", "status": "in-progress"}))).await;
        let d = app.create(&comm(json!({"status": "completed"}))).await;
        assert_eq!(app.search_ids("Communication?_sort=sent").await, vec![a.clone(), c.clone(), b.clone(), d.clone()]);
        assert_eq!(app.search_ids("Communication?_sort=-sent").await, vec![b.clone(), c.clone(), a.clone(), d.clone()]);
        assert_eq!(app.search_ids("Communication?_sort=-status,sent").await, vec![c.clone(), a.clone(), b.clone(), d.clone()]);
        assert_eq!(app.search_ids("Communication?_sort=-sent&_count=2").await, vec![b.clone(), c.clone()]);
        let bundle = app.get_json("Communication?_count=1&_total=accurate").await;
        assert_eq!(bundle["total"], 4);
        assert_eq!(bundle["entry"].as_array().unwrap().len(), 1);
        let count = app.get_json("Communication?status=completed&_summary=count").await;
        assert_eq!(count["total"], 3);
        assert!(count.get("entry").is_none());
        assert_eq!(app.get("Communication?_sort=-bogus").await.status(), 400);
        assert_eq!(app.get("Communication?_count=abc").await.status(), 400);
    }

    async fn paging_links_stay_correct_while_messages_arrive(app: TestApp) {
        let mut all = Vec::new();
        for i in 0..5 {
            all.push(app.create(&message("Patient/inbox", &format!("2024-01-0{}", i + 1), "m")).await);
        }
        let first = app.get_json("Communication?recipient=Patient/inbox&_sort=-sent&_count=2").await;
        let mut seen = ids(&first);
        let mut next = next_link(&first);
        // A new, newest message arrives while the client pages.
        let late = app.create(&message("Patient/inbox", "2024-12-31", "late")).await;
        let mut saw_previous = false;
        while let Some(url) = next {
            let page: Value = app.client.get(&url).send().await.unwrap().json().await.unwrap();
            saw_previous |= page["link"].as_array().unwrap().iter().any(|l| l["relation"] == "previous");
            seen.extend(ids(&page));
            next = next_link(&page);
        }
        assert!(saw_previous);
        all.reverse();
        assert_eq!(seen, all, "pages skipped or repeated a message");
        // A new search sees the new message first.
        assert_eq!(app.search_ids("Communication?recipient=Patient/inbox&_sort=-sent&_count=1").await, vec![late.clone()]);

        // The pinned view travels sealed: the link's `_snapshot` is not the store's row counter
        // (which would show any client the whole service's activity), two links to the same view
        // do not compare equal, and a `_snapshot` Courier did not issue changes nothing and is a 400.
        let snapshot_of = |b: &Value| -> String {
            let url = url::Url::parse(&next_link(b).expect("a next link")).unwrap();
            url.query_pairs().find(|(k, _)| k == "_snapshot").expect("_snapshot").1.into_owned()
        };
        let q = "Communication?recipient=Patient/inbox&_sort=-sent&_count=2";
        let (one, two) = (app.get_json(q).await, app.get_json(q).await);
        let (s1, s2) = (snapshot_of(&one), snapshot_of(&two));
        assert_ne!(s1, s2, "two links to one view are not linkable");
        assert!(s1.parse::<i64>().is_err() && s1.len() >= 40, "sealed, not a number: {s1}");
        let mut forged = s1.clone().into_bytes();
        forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        for bad in ["0", "999999", "", forged.as_str()] {
            let r = app.get(&format!("{q}&_offset=2&_snapshot={bad}")).await;
            assert_eq!(r.status(), 400, "_snapshot={bad}");
            let o: Value = r.json().await.unwrap();
            assert_eq!(o["resourceType"], "OperationOutcome");
            assert!(o["issue"][0]["diagnostics"].as_str().unwrap().contains("paging link"), "{o}");
        }
        // The same in a POSTed search and a batch's search entry, and in history.
        let r = app.client.post(app.url("Communication/_search"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("recipient=Patient/inbox&_offset=2&_snapshot=12").send().await.unwrap();
        assert_eq!(r.status(), 400);
        let hist = app.get_json(&format!("Communication/{late}/_history?_count=1")).await;
        assert!(next_link(&hist).is_none());
        let hist = app.get_json("Communication/_history?_count=2").await;
        let hs = snapshot_of(&hist);
        assert!(hs.parse::<i64>().is_err(), "history's link is sealed too: {hs}");
        let page2: Value = app.client.get(next_link(&hist).unwrap()).send().await.unwrap().json().await.unwrap();
        assert_eq!(page2["entry"].as_array().unwrap().len(), 2, "a sealed history link pages");
        assert_eq!(app.get("Communication/_history?_offset=2&_snapshot=7").await.status(), 400);
        // A sealed link still pins the view: page 2 of the first search is what it was.
        let page2: Value = app.client.get(next_link(&one).unwrap()).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids(&page2).len(), 2);
    }

    async fn include_revinclude_and_iterate(app: TestApp) {
        let thread = app.create(&comm(json!({"status": "in-progress", "topic": {"text": "thread"}}))).await;
        let m1 = app.create(&comm(json!({"partOf": [{"reference": format!("Communication/{thread}")}]}))).await;
        let m2 = app.create(&comm(json!({"partOf": [{"reference": format!("Communication/{thread}")}], "inResponseTo": [{"reference": format!("Communication/{m1}")}]}))).await;
        let req = app.create(&json!({"resourceType": "CommunicationRequest", "status": "active"})).await;
        let based = app.create(&comm(json!({"basedOn": [{"reference": format!("CommunicationRequest/{req}")}]}))).await;

        let included = |b: &Value| -> Vec<String> {
            let mut v: Vec<String> = b["entry"].as_array().unwrap().iter().filter(|e| e["search"]["mode"] == "include")
                .map(|e| format!("{}/{}", e["resource"]["resourceType"].as_str().unwrap(), e["resource"]["id"].as_str().unwrap())).collect();
            v.sort();
            v
        };
        let b = app.get_json(&format!("Communication?_id={m2}&_include=Communication:part-of")).await;
        assert_eq!(included(&b), vec![format!("Communication/{thread}")]);
        let b = app.get_json(&format!("Communication?_id={m2}&_include=Communication:in-response-to")).await;
        assert_eq!(included(&b), vec![format!("Communication/{m1}")]);
        let b = app.get_json(&format!("Communication?_id={based}&_include=Communication:based-on")).await;
        assert_eq!(included(&b), vec![format!("CommunicationRequest/{req}")]);
        let b = app.get_json(&format!("Communication?_id={thread}&_revinclude=Communication:part-of")).await;
        assert_eq!(included(&b), sorted(vec![format!("Communication/{m1}"), format!("Communication/{m2}")]));
        // :iterate follows in-response-to from m2 to m1, then part-of from both to the thread.
        let b = app.get_json(&format!("Communication?_id={m2}&_include:iterate=Communication:in-response-to&_include:iterate=Communication:part-of")).await;
        assert_eq!(included(&b), sorted(vec![format!("Communication/{m1}"), format!("Communication/{thread}")]));
        assert_eq!(app.get("Communication?_include=Communication:status").await.status(), 400);
    }

    async fn post_search_and_unknown_parameter_handling(app: TestApp) {
        let a = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let r = app.client.post(app.url("Communication/_search")).header("content-type", "application/x-www-form-urlencoded")
            .body("recipient=Patient%2Fp1").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(ids(&b), vec![a.clone()]);
        // Lenient (default): ignored and reported in an OperationOutcome entry.
        let b = app.get_json("Communication?recipient=Patient/p1&bogus=1").await;
        assert_eq!(ids(&b), vec![a.clone()]);
        let outcome = b["entry"].as_array().unwrap().iter().find(|e| e["search"]["mode"] == "outcome").expect("outcome entry");
        assert_eq!(outcome["resource"]["resourceType"], "OperationOutcome");
        assert_eq!(outcome["resource"]["issue"][0]["expression"][0], "bogus");
        assert!(!b["link"][0]["url"].as_str().unwrap().contains("bogus"));
        // Strict: 400.
        let r = app.client.get(app.url("Communication?recipient=Patient/p1&bogus=1")).header("prefer", "handling=strict").send().await.unwrap();
        assert_eq!(r.status(), 400);
        let oo: Value = r.json().await.unwrap();
        assert_eq!(oo["issue"][0]["expression"][0], "bogus");
        // Unknown modifiers are always errors.
        assert_eq!(app.get("Communication?status:fuzzy=x").await.status(), 400);
    }

    async fn inbox_search_matches_the_benchmark_query(app: TestApp) {
        for i in 0..3 {
            app.create(&message("Practitioner/dr-9", &format!("2024-05-0{}T08:00:00Z", i + 1), "m")).await;
        }
        app.create(&message("Practitioner/other", "2024-05-09T08:00:00Z", "m")).await;
        let b = app.get_json("Communication?recipient=Practitioner/dr-9&_sort=-sent&_count=50").await;
        let sent: Vec<&str> = b["entry"].as_array().unwrap().iter().map(|e| e["resource"]["sent"].as_str().unwrap()).collect();
        assert_eq!(sent, vec!["2024-05-03T08:00:00Z", "2024-05-02T08:00:00Z", "2024-05-01T08:00:00Z"]);
        assert_eq!(b["total"], 3);
    }
}

/// Issue 24: on SQLite the reference index table is keyed by (rid, param, n) (`WITHOUT ROWID`),
/// so its rows are stored twice, not three times. A store written before (the migration undone)
/// is converted on upgrade: every reference row is kept, numbered within its resource, and
/// searches, includes and a resource's update (which replaces its rows) work as before.
#[tokio::test]
async fn reference_rows_are_keyed_by_resource_after_an_upgrade() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let to = |who: &[&str]| {
        let recipients: Vec<Value> = who.iter().map(|w| json!({"reference": w})).collect();
        comm(
            json!({"recipient": recipients, "sender": {"reference": "Practitioner/dr-1"}, "sent": "2024-02-01"}),
        )
    };
    let both = app
        .create(&to(&[
            "Patient/k1",
            "Patient/k2",
            "https://other.example/fhir/Patient/k3",
        ]))
        .await;
    let one = app.create(&to(&["Patient/k1"])).await;
    let table_sql = |s: &courier::store::Store| {
        #[derive(diesel::QueryableByName)]
        struct Sql {
            #[diesel(sql_type = diesel::sql_types::Text)]
            sql: String,
        }
        let r: Vec<Sql> = s
            .query(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'idx_ref'",
                vec![],
            )
            .unwrap();
        r[0].sql.clone()
    };
    assert!(table_sql(&app.store).contains("WITHOUT ROWID"));
    let count = |s: &courier::store::Store, sql: &str| {
        s.query::<courier::store::rows::CountRow>(sql, vec![])
            .unwrap()[0]
            .n
    };
    let rows = count(&app.store, "SELECT COUNT(*) AS n FROM idx_ref");
    run_script(
        &app,
        include_str!("../../migrations/sqlite/2026-12-12-000100_reference_rows_keyed/down.sql"),
    );
    assert!(
        !table_sql(&app.store).contains("WITHOUT ROWID"),
        "down.sql restores the rowid table"
    );
    assert_eq!(
        app.store
            .execute(
                "DELETE FROM __diesel_schema_migrations WHERE version = '20261212000100'",
                vec![]
            )
            .unwrap(),
        1
    );
    let upgraded = spawn_instance_on(&app).await.unwrap();
    assert!(table_sql(&upgraded.store).contains("WITHOUT ROWID"));
    assert_eq!(
        count(&upgraded.store, "SELECT COUNT(*) AS n FROM idx_ref"),
        rows,
        "every reference row is kept"
    );
    assert_eq!(
        count(&upgraded.store, "SELECT COUNT(*) AS n FROM (SELECT rid, COUNT(*) AS c, MIN(n) AS lo, MAX(n) AS hi FROM idx_ref GROUP BY rid) WHERE lo <> 0 OR hi <> c - 1"),
        0,
        "each resource's reference rows are numbered 0, 1, …"
    );
    let mut expected = vec![one.clone(), both.clone()];
    assert_eq!(
        upgraded
            .search_ids("Communication?recipient=Patient/k1&_sort=-_lastUpdated")
            .await,
        expected
    );
    assert_eq!(
        upgraded
            .search_ids("Communication?recipient=Patient/k2")
            .await,
        vec![both.clone()]
    );
    assert_eq!(
        upgraded
            .search_ids("Communication?recipient=https://other.example/fhir/Patient/k3")
            .await,
        vec![both.clone()]
    );
    // The per-resource lookup (a second condition checked on each match) reads the keyed table.
    assert_eq!(
        upgraded
            .search_ids("Communication?recipient=Patient/k2&sender=Practitioner/dr-1")
            .await,
        vec![both.clone()]
    );
    // An update replaces the resource's rows, numbered afresh, beside converted ones.
    let mut changed = to(&["Patient/k2"]);
    changed["id"] = json!(one);
    assert_eq!(
        upgraded
            .put(&format!("Communication/{one}"), &changed)
            .await
            .status(),
        200
    );
    expected.retain(|i| i != &one);
    assert_eq!(
        upgraded
            .search_ids("Communication?recipient=Patient/k1")
            .await,
        expected
    );
    assert_eq!(
        sorted(
            upgraded
                .search_ids("Communication?recipient=Patient/k2")
                .await
        ),
        sorted(vec![one.clone(), both.clone()])
    );
    let fresh = upgraded.create(&to(&["Patient/k1", "Patient/k1b"])).await;
    assert_eq!(
        upgraded
            .search_ids("Communication?recipient=Patient/k1b")
            .await,
        vec![fresh]
    );
}

#[tokio::test]
async fn count_is_capped_at_the_configured_maximum() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.max_count = 2)
        .await
        .unwrap();
    for _ in 0..3 {
        app.create(&message("Patient/p", "2024-01-01", "x")).await;
    }
    assert_eq!(app.search_ids("Communication?_count=100").await.len(), 2);
}

both_backends! {
    // A reference-driven search sorted by the resource's principal date (the inbox) sorts by the
    // date its reference rows carry; it must give exactly the order of the general sort, which
    // reads `idx_date`: partial dates by their range's end (descending) or start (ascending),
    // undated last, ties by creation, after updates and deletes, for several values at once.
    async fn sort_by_principal_date_through_a_reference_matches_the_general_sort(app: TestApp) {
        let to = |who: &[&str], sent: Option<&str>| {
            let mut c = comm(json!({"recipient": who.iter().map(|w| json!({"reference": w})).collect::<Vec<_>>()}));
            if let Some(s) = sent {
                c["sent"] = json!(s);
            }
            c
        };
        let noon = app.create(&to(&["Patient/sx"], Some("2024-06-01T12:00:00Z"))).await;
        let year = app.create(&to(&["Patient/sx"], Some("2024"))).await;
        let undated = app.create(&to(&["Patient/sx"], None)).await;
        let tie = app.create(&to(&["Patient/sx"], Some("2024-06-01T14:00:00+02:00"))).await; // = noon UTC
        let twice = app.create(&to(&["Patient/sx", "Patient/sx"], Some("2024-03-01"))).await;
        let other = app.create(&to(&["Patient/other"], Some("2025-01-01"))).await;
        let both = app.create(&to(&["Patient/other", "Patient/sx"], Some("2023-07-01"))).await;

        // The general sort (no reference drives it) restricted to the recipient's messages.
        let general = |order: &str, keep: Vec<String>| {
            let app = &app;
            let order = order.to_string();
            async move {
                app.search_ids(&format!("Communication?_sort={order}&_count=100"))
                    .await
                    .into_iter()
                    .filter(|id| keep.contains(id))
                    .collect::<Vec<_>>()
            }
        };
        let mine = vec![noon.clone(), year.clone(), undated.clone(), tie.clone(), twice.clone(), both.clone()];
        let desc = app.search_ids("Communication?recipient=Patient/sx&_sort=-sent").await;
        assert_eq!(desc, vec![year.clone(), noon.clone(), tie.clone(), twice.clone(), both.clone(), undated.clone()]);
        assert_eq!(desc, general("-sent", mine.clone()).await);
        let asc = app.search_ids("Communication?recipient=Patient/sx&_sort=sent").await;
        assert_eq!(asc, vec![both.clone(), year.clone(), twice.clone(), noon.clone(), tie.clone(), undated.clone()]);
        assert_eq!(asc, general("sent", mine.clone()).await);
        // A second key after the date, and paging through the sorted matches.
        assert_eq!(app.search_ids("Communication?recipient=Patient/sx&_sort=-sent,-status").await, desc);
        assert_eq!(app.search_ids("Communication?recipient=Patient/sx&_sort=-sent&_count=2").await, vec![year.clone(), noon.clone()]);
        let page2 = app.get_json("Communication?recipient=Patient/sx&_sort=-sent&_count=2").await;
        let next = next_link(&page2).unwrap();
        let p2: Value = app.client.get(&next).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids(&p2), vec![tie.clone(), twice.clone()]);
        // Several values: either recipient.
        let either = app.search_ids("Communication?recipient=Patient/sx,Patient/other&_sort=-sent").await;
        assert_eq!(either, vec![other.clone(), year.clone(), noon.clone(), tie.clone(), twice.clone(), both.clone(), undated.clone()]);

        // An update moves the message; a delete removes it; a date added later counts.
        let mut moved = to(&["Patient/sx"], Some("2023-01-01"));
        moved["id"] = json!(noon);
        assert_eq!(app.put(&format!("Communication/{noon}"), &moved).await.status(), 200);
        let mut dated = to(&["Patient/sx"], Some("2030-01-01"));
        dated["id"] = json!(undated);
        assert_eq!(app.put(&format!("Communication/{undated}"), &dated).await.status(), 200);
        let gone = app.client.delete(app.url(&format!("Communication/{tie}"))).send().await.unwrap();
        assert!(gone.status().is_success());
        let mine = vec![noon.clone(), year.clone(), undated.clone(), twice.clone(), both.clone()];
        let desc = app.search_ids("Communication?recipient=Patient/sx&_sort=-sent").await;
        assert_eq!(desc, vec![undated.clone(), year.clone(), twice.clone(), both.clone(), noon.clone()]);
        assert_eq!(desc, general("-sent", mine.clone()).await);
        assert_eq!(app.search_ids("Communication?recipient=Patient/sx&_sort=sent").await, general("sent", mine).await);

        // CommunicationRequest's principal date is `authored`.
        let req = |authored: &str| json!({"resourceType": "CommunicationRequest", "status": "active",
            "requester": {"reference": "Practitioner/rq"}, "authoredOn": authored});
        let r1 = app.create(&req("2024-01-02")).await;
        let r2 = app.create(&req("2024-05-02")).await;
        assert_eq!(app.search_ids("CommunicationRequest?requester=Practitioner/rq&_sort=-authored").await, vec![r2.clone(), r1.clone()]);
        assert_eq!(app.search_ids("CommunicationRequest?requester=Practitioner/rq&_sort=authored").await, vec![r1, r2]);
    }

    // A store made before migrations 000019 and 000020 gets its reference rows' dates, and its
    // URL index, on upgrade: both are undone (their down.sql, newest first, and diesel forgets
    // they ran), and a restart runs them again. The short index names (2026-12-09) are undone
    // first and redone after them, so this is also an upgrade of a store with long names.
    async fn principal_date_migration_backfills_an_existing_store(app: TestApp) {
        let to = |sent: Option<&str>| {
            let mut c = comm(json!({"recipient": [{"reference": "Patient/mig"}, {"reference": "https://other.example/fhir/Patient/mig"}]}));
            if let Some(s) = sent {
                c["sent"] = json!(s);
            }
            c
        };
        let jan = app.create(&to(Some("2024-01-01"))).await;
        let mar = app.create(&to(Some("2024-03-01"))).await;
        let undated = app.create(&to(None)).await;
        let downs = match app.backend {
            Backend::Sqlite => [
                include_str!("../../migrations/sqlite/2026-12-09-000100_short_index_names/down.sql"),
                include_str!("../../migrations/sqlite/2026-11-29-000020_reference_url_partial_index/down.sql"),
                include_str!("../../migrations/sqlite/2026-11-29-000019_reference_sort_date/down.sql"),
            ],
            Backend::Postgres => [
                include_str!("../../migrations/postgres/2026-12-09-000100_short_index_names/down.sql"),
                include_str!("../../migrations/postgres/2026-11-29-000020_reference_url_partial_index/down.sql"),
                include_str!("../../migrations/postgres/2026-11-29-000019_reference_sort_date/down.sql"),
            ],
        };
        for down in downs {
            run_script(&app, down);
        }
        let forgotten = app.store.execute("DELETE FROM __diesel_schema_migrations WHERE version IN ('20261129000019', '20261129000020', '20261209000100')", vec![]).unwrap();
        assert_eq!(forgotten, 3, "the migrations' versions as diesel records them");
        let upgraded = spawn_instance_on(&app).await.unwrap();
        assert_eq!(upgraded.search_ids("Communication?recipient=Patient/mig&_sort=-sent").await, vec![mar.clone(), jan.clone(), undated.clone()]);
        assert_eq!(upgraded.search_ids("Communication?recipient=Patient/mig&_sort=sent").await, vec![jan.clone(), mar.clone(), undated.clone()]);
        let by_url = "Communication?recipient=https://other.example/fhir/Patient/mig&_sort=-sent";
        assert_eq!(upgraded.search_ids(by_url).await, vec![mar, jan, undated]);
    }

    // Several conditions at once: whichever drives, the others (checked per match) select the
    // same as each alone. Every kind beside a reference, and beside each other.
    async fn combined_conditions_select_exactly_their_intersection(app: TestApp) {
        let m = |to: &str, status: &str, cat: Option<&str>, sent: Option<&str>, medium: bool| {
            let mut c = comm(json!({"status": status, "recipient": [{"reference": to}]}));
            if let Some(cat) = cat {
                c["category"] = json!([{"coding": [{"system": "http://s", "code": cat}]}]);
            }
            if let Some(s) = sent {
                c["sent"] = json!(s);
            }
            if medium {
                c["medium"] = json!([{"coding": [{"system": "http://m", "code": "WRITTEN"}]}]);
            }
            c
        };
        let a = app.create(&m("Practitioner/d1", "completed", Some("alert"), Some("2024-07-01"), true)).await;
        let b = app.create(&m("Practitioner/d1", "completed", Some("notice"), Some("2024-05-01"), false)).await;
        let c = app.create(&m("Practitioner/d1", "stopped", None, Some("2024-06-01"), false)).await;
        let d = app.create(&m("Practitioner/d1", "completed", Some("alert"), None, false)).await;
        let e = app.create(&m("Practitioner/d2", "completed", Some("alert"), Some("2024-07-01"), true)).await;
        let mut f = m("Practitioner/d1", "completed", None, Some("2024-08-01"), false);
        f["identifier"] = json!([{"system": "http://ids", "value": "f-1"}]);
        let f = app.create(&f).await;
        let q = |s: &str| format!("Communication?{s}");
        for (query, want) in [
            ("status=completed&recipient=Practitioner/d1", vec![&a, &b, &d, &f]),
            ("recipient=Practitioner/d1&status=completed", vec![&a, &b, &d, &f]),
            ("recipient=Practitioner/d1&sent=ge2024-06-01", vec![&a, &c, &f]),
            ("recipient=Practitioner/d1&sent=ne2024-06-01", vec![&a, &b, &f]),
            ("recipient=Practitioner/d1&sent=lt2024-06,gt2024-07-15", vec![&b, &f]),
            ("recipient=Practitioner/d1&category:not=alert", vec![&b, &c, &f]),
            ("recipient=Practitioner/d1&category=http://s|alert,notice&status=completed", vec![&a, &b, &d]),
            ("recipient=Practitioner/d1&medium:missing=false", vec![&a]),
            ("recipient=Practitioner/d1,Practitioner/d2&category=alert&sent=ge2024-07-01", vec![&a, &e]),
            ("category=alert&identifier=http://ids|f-1", vec![]),
            ("status=completed&identifier=http://ids|f-1", vec![&f]),
            ("sent=lt2024-06-15&status=completed", vec![&b]),
            ("status=completed,stopped&sent=ge2024-06-01&category:not=notice", vec![&a, &c, &e, &f]),
        ] {
            let mut want: Vec<String> = want.into_iter().cloned().collect();
            want.sort();
            assert_eq!(sorted(app.search_ids(&q(query)).await), want, "{query}");
            let counted = app.get_json(&q(&format!("{query}&_summary=count"))).await;
            assert_eq!(counted["total"], want.len(), "{query}: count");
        }
        // Paging through a driven search with a per-match condition: same set, each once.
        let mut seen = Vec::new();
        let mut next = Some(app.url(&q("recipient=Practitioner/d1&status=completed&_count=2")));
        while let Some(url) = next {
            let b: serde_json::Value = app.client.get(&url).send().await.unwrap().json().await.unwrap();
            seen.extend(b["entry"].as_array().into_iter().flatten().map(|e| e["resource"]["id"].as_str().unwrap().to_string()));
            next = next_link(&b);
        }
        assert_eq!(sorted(seen), sorted(vec![a, b, d, f]));
    }

    // `patient` has no index rows of its own (issue 24: they repeated `subject`'s, and an
    // AuditEvent's agent's or entity's): it reads its bases' rows that point at a Patient, in
    // every form a search can take, and the migration that dropped the old rows can be undone
    // and redone with the same answers.
    async fn patient_is_read_from_its_bases_rows_of_type_patient(app: TestApp) {
        let a = app.create(&comm(json!({"subject": {"reference": "Patient/pa"}, "sent": "2024-01-01"}))).await;
        let b = app.create(&comm(json!({"subject": {"reference": format!("{}/Patient/pb", app.base)}, "sent": "2024-02-01"}))).await;
        let ext = app.create(&comm(json!({"subject": {"reference": "https://other.example/fhir/Patient/pa"}}))).await;
        let g = app.create(&comm(json!({"subject": {"reference": "Group/pa"}}))).await;
        let none = app.create(&comm(json!({"recipient": [{"reference": "Patient/pa"}]}))).await;
        let cr = app.create(&json!({"resourceType": "CommunicationRequest", "status": "active",
            "subject": {"reference": "Patient/pa"}, "requester": {"reference": "Practitioner/rq"}})).await;
        let crg = app.create(&json!({"resourceType": "CommunicationRequest", "status": "active",
            "subject": {"reference": "Group/pa"}, "requester": {"reference": "Practitioner/rq"}})).await;
        // An AuditEvent whose patient is only an agent, and one whose Practitioner agent has the same id.
        let audit = |who: &str| json!({"resourceType": "AuditEvent", "recorded": "2024-03-01T00:00:00Z",
            "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110100"},
            "agent": [{"who": {"reference": who}, "requestor": true}],
            "source": {"observer": {"display": "test"}}});
        app.store.record_audit(audit("Patient/pz")).unwrap();
        app.store.record_audit(audit("Practitioner/pz")).unwrap();

        let made = [a, b, ext, g, none, cr, crg];
        patient_searches(&app, &made).await;
        let stored = |app: &TestApp| {
            let r: Vec<courier::store::rows::CountRow> = app.store
                .query("SELECT COUNT(*) AS n FROM idx_ref WHERE param IN ('13', '32', '51')", vec![])
                .unwrap();
            r[0].n
        };
        assert_eq!(stored(&app), 0, "no index rows are stored for an alias");

        // The migration undone (its rows made again from their bases) and redone on a restart.
        let down = match app.backend {
            Backend::Sqlite => include_str!("../../migrations/sqlite/2026-12-10-000100_patient_alias_rows/down.sql"),
            Backend::Postgres => include_str!("../../migrations/postgres/2026-12-10-000100_patient_alias_rows/down.sql"),
        };
        // The later migrations that changed the reference rows are undone first (newest first)
        // and redone after it: their types' short names, and on SQLite the keyed table.
        run_script(&app, match app.backend {
            Backend::Sqlite => include_str!("../../migrations/sqlite/2026-12-13-000100_reference_type_names/down.sql"),
            Backend::Postgres => include_str!("../../migrations/postgres/2026-12-13-000100_reference_type_names/down.sql"),
        });
        let mut versions = "'20261210000100', '20261213000100'";
        if app.backend == Backend::Sqlite {
            run_script(&app, include_str!("../../migrations/sqlite/2026-12-12-000100_reference_rows_keyed/down.sql"));
            versions = "'20261210000100', '20261212000100', '20261213000100'";
        }
        run_script(&app, down);
        // a, b, ext, cr (AuditEvents' references are rows of their own since, `audit_refs`,
        // which these migrations do not touch: their searches are checked after the upgrade).
        assert!(stored(&app) >= 4, "down.sql restores the rows: {}", stored(&app));
        let forgotten = app.store.execute(&format!("DELETE FROM __diesel_schema_migrations WHERE version IN ({versions})"), vec![]).unwrap();
        assert_eq!(forgotten, versions.split(',').count());
        let upgraded = spawn_instance_on(&app).await.unwrap();
        assert_eq!(stored(&upgraded), 0, "the migration drops them again");
        patient_searches(&upgraded, &made).await;
    }

    // Reference rows name their target's type by a short name (issue 24: a row is stored twice,
    // and most name a Patient, a Practitioner or a Communication); a type without one keeps its
    // name. Searches by every reference form, `_include` and `_revinclude` answer the same before
    // and after the migration that converts the stored rows, undone and redone.
    async fn reference_rows_name_types_by_short_names_across_an_upgrade(app: TestApp) {
        let parent = app.create(&comm(json!({"subject": {"reference": "Patient/t1"}, "recipient": [{"reference": "Patient/t1"}]}))).await;
        let child = app.create(&comm(json!({
            "subject": {"reference": "Patient/t1"},
            "recipient": [{"reference": "Practitioner/t2"}, {"reference": "Patient/t1"}],
            "partOf": [{"reference": format!("Communication/{parent}")}],
            "basedOn": [{"reference": "Basic/b1"}]}))).await;
        let other = app.create(&comm(json!({"recipient": [{"reference": "Practitioner/t1"}]}))).await;
        let types = |app: &TestApp| {
            #[derive(diesel::QueryableByName)]
            struct T {
                #[diesel(sql_type = diesel::sql_types::Text)]
                t: String,
            }
            let rows: Vec<T> = app.store
                .query("SELECT DISTINCT target_type AS t FROM idx_ref WHERE target_type IS NOT NULL ORDER BY 1", vec![])
                .unwrap();
            rows.into_iter().map(|r| r.t).collect::<Vec<_>>()
        };
        let searches = |app: TestApp| {
            let (parent, child, other) = (parent.clone(), child.clone(), other.clone());
            async move {
                for (query, want) in [
                    ("Communication?recipient=Practitioner/t2".to_string(), vec![&child]),
                    ("Communication?recipient=Practitioner/t1".to_string(), vec![&other]),
                    ("Communication?recipient=Patient/t1".to_string(), vec![&child, &parent]),
                    ("Communication?recipient:Practitioner=t1".to_string(), vec![&other]),
                    ("Communication?recipient=t1".to_string(), vec![&child, &other, &parent]),
                    ("Communication?subject=Patient/t1".to_string(), vec![&child, &parent]),
                    ("Communication?patient=t1".to_string(), vec![&child, &parent]),
                    ("Communication?based-on=Basic/b1".to_string(), vec![&child]),
                    (format!("Communication?part-of=Communication/{parent}"), vec![&child]),
                    (format!("Communication?part-of:Communication={parent}"), vec![&child]),
                ] {
                    let mut want: Vec<String> = want.into_iter().cloned().collect();
                    want.sort();
                    assert_eq!(sorted(app.search_ids(&query).await), want, "{query}");
                }
                let all = |b: serde_json::Value| {
                    let mut v: Vec<(String, String)> = b["entry"].as_array().unwrap().iter()
                        .map(|e| (e["resource"]["id"].as_str().unwrap().to_string(), e["search"]["mode"].as_str().unwrap().to_string()))
                        .collect();
                    v.sort();
                    v
                };
                let mut want = vec![(child.clone(), "match".to_string()), (parent.clone(), "include".to_string())];
                want.sort();
                assert_eq!(all(app.get_json(&format!("Communication?_id={child}&_include=Communication:part-of")).await), want);
                let mut want = vec![(parent.clone(), "match".to_string()), (child.clone(), "include".to_string())];
                want.sort();
                assert_eq!(all(app.get_json(&format!("Communication?_id={parent}&_revinclude=Communication:part-of")).await), want);
                app
            }
        };
        assert_eq!(types(&app), ["1", "2", "5", "Basic"], "short names, a type without one in full");
        let app = searches(app).await;

        run_script(&app, match app.backend {
            Backend::Sqlite => include_str!("../../migrations/sqlite/2026-12-13-000100_reference_type_names/down.sql"),
            Backend::Postgres => include_str!("../../migrations/postgres/2026-12-13-000100_reference_type_names/down.sql"),
        });
        assert_eq!(types(&app), ["Basic", "Communication", "Patient", "Practitioner"], "down.sql names them in full");
        let forgotten = app.store.execute("DELETE FROM __diesel_schema_migrations WHERE version = '20261213000100'", vec![]).unwrap();
        assert_eq!(forgotten, 1);
        let upgraded = spawn_instance_on(&app).await.unwrap();
        assert_eq!(types(&upgraded), ["1", "2", "5", "Basic"], "the upgrade converts the stored rows");
        searches(upgraded).await;
    }

    async fn ne_does_not_match_resources_without_a_value(app: TestApp) {
        let dated = app.create(&comm(json!({"sent": "2024-01-15"}))).await;
        let _undated = app.create(&comm(json!({}))).await;
        assert_eq!(app.search_ids("Communication?sent=ne2024-02-01").await, vec![dated]);
    }
}
