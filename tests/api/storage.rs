//! The write path's mechanics. SQLite: group commit by the writer thread with the WAL's fsync
//! made by the syncer thread (or the writer when nothing else waits), the background
//! checkpointer, and SQLite's process-wide settings. PostgreSQL: group commit of plain creates
//! and AuditEvents by its writers.

use crate::helpers::*;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn sqlite_app(synchronous: &str) -> TestApp {
    let synchronous = synchronous.to_string();
    spawn_app_with(Backend::Sqlite, move |s| s.sqlite_synchronous = synchronous)
        .await
        .expect("SQLite needs no set-up")
}

/// `n` creates at once: their ids, each answered 201.
async fn create_together(app: &TestApp, n: usize) -> Vec<String> {
    let bodies: Vec<Value> = (0..n)
        .map(|i| {
            message(
                "Patient/p1",
                "2026-11-28T10:00:00Z",
                &format!("grouped {i}"),
            )
        })
        .collect();
    let posts = bodies.iter().map(|b| app.post("Communication", b));
    let mut ids = Vec::new();
    for r in futures::future::join_all(posts).await {
        assert_eq!(r.status(), 201);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ids
}

/// The number one query of the store's database answers (as `n`).
fn number(app: &TestApp, sql: &str) -> i64 {
    let r: Vec<courier::store::rows::CountRow> = app.store.query(sql, vec![]).unwrap();
    r[0].n
}

/// Each of `ids` reads back as a Communication whose text starts with `prefix`.
async fn assert_readable(app: &TestApp, ids: &[String], prefix: &str) {
    for id in ids {
        let m = app.get_json(&format!("Communication/{id}")).await;
        assert!(m["payload"][0]["contentString"]
            .as_str()
            .unwrap()
            .starts_with(prefix));
    }
}

/// Waits (up to 5 s) until every group commit made so far has been made durable by an fsync;
/// the commits, those made durable, and the fsyncs.
async fn settled_stats(app: &TestApp) -> (u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (commits, durable, syncs) = app.store.group_commit_stats();
        if commits == durable || Instant::now() > deadline {
            return (commits, durable, syncs);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_synchronous_full_every_group_commit_is_made_durable_by_a_wal_fsync() {
    let app = sqlite_app("FULL").await;
    let (c0, d0, s0) = settled_stats(&app).await;
    let ids = create_together(&app, 40).await;
    let (c1, d1, s1) = settled_stats(&app).await;
    assert!(c1 > c0, "the creates were committed by the group commit");
    assert!(
        c1 - c0 <= 40 + 40,
        "grouped: at most one commit per create (and per read's audit)"
    );
    // SQLite's FULL is NORMAL plus an fsync of the WAL after each commit; Courier makes that
    // fsync itself, in the syncer thread, before the jobs are answered: one fsync covers every
    // group committed before it.
    assert_eq!(d1 - d0, c1 - c0, "every group commit was made durable");
    assert!(
        s1 > s0 && s1 - s0 <= c1 - c0,
        "between one fsync and one per group commit: {} fsyncs for {} commits",
        s1 - s0,
        c1 - c0
    );
    assert_readable(&app, &ids, "grouped ").await;
    // Messages about one patient written in one group commit share their scope's one data key
    // (looked up once per transaction, made once).
    assert_eq!(
        number(
            &app,
            "SELECT COUNT(*) AS n FROM data_keys WHERE patient = 'Patient/p1'"
        ),
        1
    );
    // The pooled connection the group commit used (NORMAL meanwhile) is back at FULL: the pool is
    // LIFO, so the next query runs on it.
    assert_eq!(
        number(&app, "SELECT synchronous AS n FROM pragma_synchronous"),
        2,
        "a pooled connection was left at synchronous=NORMAL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_synchronous_normal_courier_adds_no_fsyncs() {
    let app = sqlite_app("NORMAL").await;
    create_together(&app, 10).await;
    let (commits, durable, syncs) = app.store.group_commit_stats();
    assert!(commits > 0);
    assert_eq!(durable, 0);
    assert_eq!(
        syncs, 0,
        "NORMAL leaves durability of the last commits to SQLite's checkpoints"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_ahead_log_is_checkpointed_in_the_background() {
    let app = sqlite_app("NORMAL").await;
    let file = app.dir.path().join("courier.db");
    let before = std::fs::metadata(&file).unwrap().len();
    create_together(&app, 30).await;
    // SQLite would checkpoint by itself only after 16,000 pages of log; these writes are ~1,000.
    // The checkpointer copies them into the database file within about 100 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(&file).unwrap().len() <= before {
        assert!(
            Instant::now() < deadline,
            "the database file did not grow: nothing checkpointed the WAL"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_keeps_no_memory_statistics() {
    let app = sqlite_app("NORMAL").await;
    create_together(&app, 5).await;
    // With statistics on (SQLite's default) every allocation by every connection takes one
    // process-wide mutex, which the single writer then waits on behind the readers.
    // SAFETY: a plain read of SQLite's counter.
    let used = unsafe { libsqlite3_sys::sqlite3_memory_used() };
    assert_eq!(
        used, 0,
        "SQLite counts its memory: SQLITE_CONFIG_MEMSTATUS was not switched off"
    );
}

/// The SQLite writer and syncer threads hold the store only while they work: when its last user
/// lets go, the store (its connections, its files' locks) is released and both threads end. A
/// writer that kept the store for ever would leak one open database per store opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writer_threads_let_the_store_go() {
    let dir = tempfile::tempdir().unwrap();
    let settings = courier::config::Settings {
        data_dir: dir.path().to_path_buf(),
        database_url: format!("sqlite://{}", dir.path().join("w.db").display()),
        master_key: Some(
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                .to_string()
                .into(),
        ),
        sqlite_synchronous: "FULL".into(),
        ..courier::config::Settings::default()
    };
    let store = courier::startup::open_store(&settings).unwrap();
    let ctx = courier::audit::Context {
        request_id: "writer-test".into(),
        client_address: "127.0.0.1".into(),
        base_url: "http://127.0.0.1".into(),
        ..Default::default()
    };
    // Writes from blocking threads (sync) and from async tasks, at once: all committed and
    // answered only once durable.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (store, ctx) = (store.clone(), ctx.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            store.write(vec![create_op(i)], &ctx).map(|r| r.len())
        }));
    }
    for i in 8..16 {
        let (store, ctx) = (store.clone(), ctx.clone());
        tasks.push(tokio::spawn(async move {
            store
                .write_async(vec![create_op(i)], &ctx)
                .await
                .map(|r| r.len())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    let (commits, durable, syncs) = store.group_commit_stats();
    assert!((1..=16).contains(&commits), "{commits} group commits");
    assert_eq!(
        durable, commits,
        "every group was made durable before its answer"
    );
    assert!(syncs >= 1 && syncs <= commits);
    let weak = std::sync::Arc::downgrade(&store);
    drop(store);
    let deadline = Instant::now() + Duration::from_secs(5);
    while weak.upgrade().is_some() {
        assert!(
            Instant::now() < deadline,
            "the store is still held after its last user let go"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn create_op(i: usize) -> courier::store::WriteOp {
    courier::store::WriteOp::Create {
        res_type: "Communication".into(),
        id: format!("writer-{i}"),
        resource: courier::store::Incoming::from_value(message(
            "Patient/p1",
            "2026-11-29T10:00:00Z",
            &format!("writer {i}"),
        )),
        if_none_exist: None,
    }
}

/// `COURIER_SQLITE_RESIDENT_MB`: the database file is mapped and faulted in at start (so a host
/// that reclaims idle file pages leaves it in memory), up to the limit, and the store works as
/// before around the mapping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_file_can_be_kept_in_memory() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.sqlite_resident_mb = 64)
        .await
        .unwrap();
    let file = app.dir.path().join("courier.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.store.resident_bytes() == 0 {
        assert!(Instant::now() < deadline, "nothing was mapped");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The first pass mapped the whole file as it was then (the checkpointer may have grown it
    // since: the next pass maps that).
    let size = std::fs::metadata(&file).unwrap().len();
    let kept = app.store.resident_bytes();
    assert!(kept > 0 && kept <= size, "kept {kept} of {size}");
    // Writes grow the file past the mapping; reads and writes go on as before.
    let ids = create_together(&app, 30).await;
    for id in ids.iter().take(3) {
        let r = app.get(&format!("/Communication/{id}")).await;
        assert_eq!(r.status(), 200);
    }
    // Off by default.
    let plain = sqlite_app("NORMAL").await;
    assert_eq!(plain.store.resident_bytes(), 0);
}

/// PostgreSQL's group commit (issue 24): plain creates waiting together are committed in one
/// transaction (one commit, one turn of the event lock, one INSERT per table); a create that
/// fails inside its group is answered alone with its error, and the others are committed, each
/// with its event and its AuditEvent. That holds both for a failure that names its job (a notice
/// of its own) and for one in the group's shared INSERT (its version row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_commits_waiting_creates_together_and_a_failing_one_alone() {
    use diesel::{Connection, PgConnection, RunQueryDsl};
    let Some(app) = spawn_app_with(Backend::Postgres, |_| {}).await else {
        return;
    };
    let mut outside = PgConnection::establish(&app.database_url).unwrap();
    // A notice for `Group/poison` cannot be inserted: the create that names it fails in the middle
    // of its group, after its own rows are written.
    for sql in [
        "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.person = 'Group/poison' THEN RAISE EXCEPTION 'poisoned'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER poison BEFORE INSERT ON notices FOR EACH ROW EXECUTE FUNCTION poison()",
        // A version sealed under Patient/poison's data key cannot be inserted: the group's
        // one INSERT of version rows fails, and no job is named.
        "CREATE FUNCTION poison_version() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.key_n IN (SELECT n FROM data_keys WHERE patient = 'Patient/poison') \
         THEN RAISE EXCEPTION 'poisoned version'; END IF; RETURN NEW; END $$",
        "CREATE TRIGGER poison_version BEFORE INSERT ON resource_versions FOR EACH ROW EXECUTE FUNCTION poison_version()",
        // The event lock, held from outside: each writer's group waits at its first event, and
        // the creates sent meanwhile queue up behind them.
        "SELECT pg_advisory_lock(hashtext('courier.events.' || current_schema()))",
    ] {
        diesel::sql_query(sql).execute(&mut outside).unwrap();
    }
    let (c0, _, _) = app.store.group_commit_stats();
    let mut bodies: Vec<Value> = (0..30)
        .map(|i| {
            message(
                "Patient/p1",
                "2026-11-28T10:00:00Z",
                &format!("together {i}"),
            )
        })
        .collect();
    bodies.insert(
        17,
        message("Group/poison", "2026-11-28T10:00:00Z", "poisoned"),
    );
    bodies.insert(
        23,
        message("Patient/poison", "2026-11-28T10:00:00Z", "poisoned version"),
    );
    // Released once both writers wait for it (and a moment more for the rest to queue).
    let release = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: Vec<courier::store::rows::CountRow> = diesel::sql_query(
                "SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
            )
            .load(&mut outside)
            .unwrap();
            if waiting[0].n >= 2 || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        diesel::sql_query("SELECT pg_advisory_unlock_all()")
            .execute(&mut outside)
            .unwrap();
    });
    let answers =
        futures::future::join_all(bodies.iter().map(|b| app.post("Communication", b))).await;
    release.await.unwrap();
    let mut ids = Vec::new();
    for (i, r) in answers.into_iter().enumerate() {
        if i == 17 || i == 23 {
            assert!(
                r.status().is_server_error(),
                "the poisoned create failed: {}",
                r.status()
            );
            continue;
        }
        assert_eq!(r.status(), 201);
        ids.push(
            r.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (c1, _, _) = app.store.group_commit_stats();
    assert!(
        c1 > c0 && c1 - c0 < 30,
        "30 creates waiting together were committed by the group commit, in fewer transactions: {}",
        c1 - c0
    );
    assert_readable(&app, &ids, "together ").await;
    for id in &ids {
        let audit = app
            .get_json(&format!(
                "AuditEvent?entity=Communication/{id}&subtype=create"
            ))
            .await;
        assert_eq!(audit["total"], 1, "its create's AuditEvent: {audit}");
    }
    assert_eq!(
        number(
            &app,
            "SELECT COUNT(*) AS n FROM events WHERE kind = 'create' AND res_type = 'Communication'"
        ),
        30,
        "one event per committed create, none for the failed ones"
    );
    for who in ["Group/poison", "Patient/poison"] {
        let poisoned = app
            .get_json(&format!("Communication?recipient={who}&_total=accurate"))
            .await;
        assert_eq!(poisoned["total"], 0, "nothing of a failed create was kept");
    }
}

/// Killed mid-write (SIGKILL) while PostgreSQL group commits run: every create that was answered
/// 201 is there whole (its body, its AuditEvent, its event), and nothing is there in part (every
/// stored message has its AuditEvent and its event, whether or not its answer got out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_group_commits_keep_every_answered_create_through_a_kill() {
    let Some(app) = spawn_app_with(Backend::Postgres, |_| {}).await else {
        return;
    };
    let port = free_port();
    // A second instance on the same database, in a process of its own, taking the writes.
    let mut child = serve_command(&app, port)
        .env("COURIER_BASE_URL", &app.base)
        .spawn()
        .expect("courier serve starts");
    let base = format!("http://127.0.0.1:{port}");
    started(&app, &base).await;
    let answered = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..32 {
        let (client, base, answered, stop) = (
            app.client.clone(),
            base.clone(),
            answered.clone(),
            stop.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let body = message("Patient/p1", "2026-12-06T10:00:00Z", &format!("w{w} n{i}"));
                let Ok(r) = client
                    .post(format!("{base}/Communication"))
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await
                else {
                    break;
                };
                // Killed: no answer at all. An answer is a 201, or a failure the test must see.
                assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
                let Ok(v) = r.json::<Value>().await else {
                    break;
                };
                answered.lock().push(v["id"].as_str().unwrap().to_string());
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    child.kill().unwrap(); // SIGKILL, with writes in flight
    child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let answered = answered.lock().clone();
    eprintln!("{} creates answered before the kill", answered.len());
    assert!(
        answered.len() > 50,
        "the instance took writes before it was killed: {}",
        answered.len()
    );
    let messages = number(
        &app,
        "SELECT COUNT(*) AS n FROM resources WHERE res_type = 'Communication'",
    );
    assert!(messages >= answered.len() as i64);
    assert_eq!(
        number(
            &app,
            "SELECT COUNT(*) AS n FROM events WHERE kind = 'create' AND res_type = 'Communication'"
        ),
        messages,
        "every stored message has its event, and no event is without its message"
    );
    assert_eq!(
        number(&app, "SELECT COUNT(*) AS n FROM resource_versions v JOIN resources r ON r.rid = v.rid WHERE r.res_type = 'Communication'"),
        messages,
        "every stored message has its version"
    );
    assert_readable(&app, &answered, "w").await;
    // Each stored message's create AuditEvent (the answered ones and any whose answer was lost).
    let created = app
        .get_json("AuditEvent?subtype=create&_count=1&_total=accurate")
        .await;
    assert_eq!(
        created["total"], messages,
        "one create AuditEvent per stored message"
    );
}

/// Whether `id` has the shape of the ids Courier assigns now (`courier_store::ids`).
fn compact(id: &str) -> bool {
    id.len() == 22 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

crate::both_backends! {
    // Issue 24: the ids Courier assigns are 22 base62 digits, not 36-character UUIDs (each id is
    // stored several times); a resource that kept a UUID id beside them reads, searches and
    // updates as before.
    async fn the_ids_courier_assigns_are_22_letters_and_digits(app: TestApp) {
        let id = app.create(&message("Patient/p1", "2026-12-06T10:00:00Z", "hello")).await;
        assert!(compact(&id), "{id}");
        let audits = app
            .get_json(&format!("AuditEvent?entity=Communication/{id}"))
            .await;
        let audit_ids = ids(&audits);
        assert!(!audit_ids.is_empty(), "{audits}");
        assert!(audit_ids.iter().all(|a| compact(a)), "{audit_ids:?}");
        #[derive(diesel::QueryableByName)]
        struct Key {
            #[diesel(sql_type = diesel::sql_types::Text)]
            key_id: String,
        }
        let keys: Vec<Key> = app
            .store
            .query("SELECT DISTINCT k.key_id FROM resource_versions v JOIN data_keys k ON k.n = v.key_n", vec![])
            .unwrap();
        assert!(!keys.is_empty());
        assert!(
            keys.iter()
                .all(|k| k.key_id.strip_prefix("dk-").is_some_and(compact)),
            "{:?}",
            keys.iter().map(|k| &k.key_id).collect::<Vec<_>>()
        );
        // A person first seen in an EHR gets a random id of the same shape.
        let (person, _) = courier::smart::identity::link(
            &app.store,
            "https://ehr.example",
            &|_| true,
            &serde_json::json!({"resourceType": "Patient", "id": "mrn-1"}),
        )
        .unwrap();
        let pid = person.strip_prefix("Patient/").unwrap();
        assert!(compact(pid), "{person}");
        // An id of the old shape beside the new ones.
        let old = "01a24c36-757e-73f9-b1bb-9c29fd3026e7";
        let mut m = message("Patient/p1", "2026-12-06T09:00:00Z", "old shape");
        m["id"] = old.into();
        let r = app.put(&format!("Communication/{old}"), &m).await;
        assert_eq!(r.status(), 201);
        let found = app.get_json("Communication?recipient=Patient/p1&_sort=sent").await;
        assert_eq!(ids(&found), vec![old.to_string(), id.clone()]);
        m["payload"][0]["contentString"] = "updated".into();
        assert_eq!(app.put(&format!("Communication/{old}"), &m).await.status(), 200);
        let read = app.get_json(&format!("Communication/{old}")).await;
        assert_eq!(read["payload"][0]["contentString"], "updated");
        assert_eq!(read["meta"]["versionId"], "2");
    }

    // Many updates of one resource at once (a SQLite group commit may hold several of them):
    // its index rows are those of its last version only. Rows of an earlier version in the same
    // group would let a search (and the access policy, which reads the same rows) find the
    // message by a recipient it no longer has.
    async fn updates_of_one_resource_in_one_group_leave_only_the_last_versions_index_rows(app: TestApp) {
        let r = app
            .post("Communication", &message("Patient/first", "2026-12-06T09:00:00Z", "moved"))
            .await;
        assert_eq!(r.status(), 201);
        let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        let n = 24;
        let bodies: Vec<Value> = (0..n)
            .map(|i| {
                let mut m = message(&format!("Patient/moved-{i}"), "2026-12-06T09:00:00Z", "moved");
                m["id"] = id.clone().into();
                m
            })
            .collect();
        let path = format!("Communication/{id}");
        for r in futures::future::join_all(bodies.iter().map(|b| app.put(&path, b))).await {
            assert_eq!(r.status(), 200);
        }
        let now = app.get_json(&path).await;
        assert_eq!(now["meta"]["versionId"], (n + 1).to_string());
        let last = now["recipient"][0]["reference"].as_str().unwrap().to_string();
        for who in (0..n).map(|i| format!("Patient/moved-{i}")).chain(["Patient/first".to_string()]) {
            let found = app.get_json(&format!("Communication?recipient={who}")).await;
            let expected = if who == last { vec![id.clone()] } else { vec![] };
            assert_eq!(ids(&found), expected, "searched by {who}; the message is now to {last}");
        }
        assert_eq!(
            number(
                &app,
                &format!(
                    "SELECT COUNT(*) AS n FROM idx_ref x JOIN resources r ON r.rid = x.rid \
                     WHERE r.res_type = 'Communication' AND r.fhir_id = '{id}'"
                )
            ),
            // recipient and sender
            2
        );
    }
}
