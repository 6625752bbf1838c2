//! Key management: data-key and master-key rotation under load without a failed read, the
//! background re-wrap that lets the old master key retire, and the `courier keys` commands.

use crate::helpers::*;
use courier::store::crypto::MasterKey;
use serde_json::Value;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

const NEW_KEY: &str = "bmV3LW1hc3Rlci1rZXktZm9yLXJvdGF0aW9uLXRlc3Q=";

fn patient_message(i: usize) -> Value {
    message(
        &format!("Patient/k{}", i % 7),
        "2026-11-20T10:00:00Z",
        &format!("rotation load {i}"),
    )
}

async fn rotation_under_load(backend: Backend) {
    let Some(app) = spawn_app(backend).await else {
        return;
    };
    let old_master = app.store.keys.master_key_id();
    let mut ids = vec![];
    for i in 0..30 {
        ids.push(app.create(&patient_message(i)).await);
    }
    let ids = Arc::new(parking_lot::Mutex::new(ids));
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // What failed, for the assertion's message (it failed once in a full run, never alone).
    let failed: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
    let mut load = vec![];
    // Two readers (reads and inbox searches) and a writer (new patients' keys made during it).
    for r in 0..2 {
        let (client, base, ids, stop, reads, failures, failed) = (
            app.client.clone(),
            app.base.clone(),
            ids.clone(),
            stop.clone(),
            reads.clone(),
            failures.clone(),
            failed.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut n = r;
            while !stop.load(Ordering::Relaxed) {
                let id = {
                    let v = ids.lock();
                    v[n % v.len()].clone()
                };
                n += 7;
                let url = if n % 3 == 0 {
                    format!(
                        "{base}/Communication?recipient=Patient/k{}&_count=20",
                        n % 7
                    )
                } else {
                    format!("{base}/Communication/{id}")
                };
                let r = client.get(&url).send().await.unwrap();
                let s = r.status();
                reads.fetch_add(1, Ordering::Relaxed);
                if s != 200 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    let body = r.text().await.unwrap_or_default();
                    failed.lock().push(format!(
                        "GET {url}: {s} {}",
                        body.chars().take(300).collect::<String>()
                    ));
                }
            }
        }));
    }
    {
        let (client, base, ids, stop, failures, failed) = (
            app.client.clone(),
            app.base.clone(),
            ids.clone(),
            stop.clone(),
            failures.clone(),
            failed.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut i = 1000;
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .post(format!("{base}/Communication"))
                    .json(&patient_message(i))
                    .send()
                    .await
                    .unwrap();
                if r.status() != 201 {
                    failures.fetch_add(1, Ordering::Relaxed);
                    let s = r.status();
                    let body = r.text().await.unwrap_or_default();
                    failed.lock().push(format!(
                        "POST: {s} {}",
                        body.chars().take(300).collect::<String>()
                    ));
                } else {
                    let v: Value = r.json().await.unwrap();
                    ids.lock().push(v["id"].as_str().unwrap().to_string());
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    // Rotate twice under load: data keys alone, then the master key with them.
    let store = app.store.clone();
    let rotated_at = courier::clock::now_micros();
    let (retired, rewrapped) = tokio::task::spawn_blocking(move || {
        let retired = store.retire_data_keys().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        store.keys.promote(MasterKey::from_base64(NEW_KEY).unwrap());
        store.retire_data_keys().unwrap();
        (retired, store.rewrap_all().unwrap())
    })
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    assert!(
        retired >= 7,
        "every patient's key and the system key were retired ({retired})"
    );
    assert!(
        rewrapped >= retired,
        "every data key moved to the new master key ({rewrapped})"
    );
    assert!(
        reads.load(Ordering::Relaxed) > 50,
        "the readers ran ({})",
        reads.load(Ordering::Relaxed)
    );
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no read or write failed during rotation: {:?}",
        failed.lock()
    );

    // Every data key is wrapped by the new master key: the old one can retire.
    let status = app.store.key_status().unwrap();
    assert_ne!(status.current_master, old_master);
    assert!(status.pending.is_empty(), "{:?}", status.pending);
    assert_eq!(status.retirable, vec![old_master.clone()]);
    // New writes use keys made after the rotation.
    let fresh = app.create(&patient_message(3)).await;
    #[derive(diesel::QueryableByName)]
    struct Made {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        created_at: i64,
    }
    let made: Vec<Made> = app.store.query(
        "SELECT k.created_at FROM data_keys k JOIN resource_versions v ON v.key_n = k.n JOIN resources r ON r.rid = v.rid WHERE r.fhir_id = ?",
        vec![fresh.into()],
    ).unwrap();
    assert!(made[0].created_at >= rotated_at);

    // A restart with only the new master key reads everything; one with only the old key is refused.
    let url = app.database_url.clone();
    let after = spawn_app_with(backend, move |s| {
        s.database_url = url;
        s.master_key = Some(NEW_KEY.to_string().into());
    })
    .await
    .unwrap();
    let all = ids.lock().clone();
    for id in &all {
        assert_eq!(
            after.get(&format!("Communication/{id}")).await.status(),
            200,
            "{id}"
        );
    }
    let url = app.database_url.clone();
    let old_only = std::panic::AssertUnwindSafe(spawn_app_with(backend, move |s| {
        s.database_url = url;
        s.master_key = Some(
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
                .to_string()
                .into(),
        );
    }));
    use futures::FutureExt;
    assert!(
        old_only.catch_unwind().await.is_err(),
        "an unknown master key is refused at start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_under_load_without_a_failed_read_sqlite() {
    rotation_under_load(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_under_load_without_a_failed_read_postgres() {
    rotation_under_load(Backend::Postgres).await;
}

/// The operator's path on the embedded set-up: `courier keys rotate --master` while Courier runs,
/// the running server picks the new key up from the key file, and the old key is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_keys_commands_rotate_the_master_key_in_the_key_file_while_courier_runs() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.master_key = None)
        .await
        .unwrap();
    let dir = app.dir.path().to_path_buf();
    let key_file = dir.join("master.key");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        1
    );
    let before = app.create(&patient_message(1)).await;

    let (ok, out, err) = run_cli(&dir, &["keys", "rotate", "--master"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("re-wrapped") && out.contains("is current"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        2,
        "the old key stays as a previous key"
    );
    // The running server still reads and writes, learns the new key from the file, and re-wraps
    // what it wrapped with the old one meanwhile (its 30-second task; run here at once).
    assert_eq!(
        app.get(&format!("Communication/{before}")).await.status(),
        200
    );
    let during = app.create(&patient_message(2)).await;
    app.store.reload_master_keys();
    app.store.rewrap_all().unwrap();
    let (ok, out, _) = run_cli(&dir, &["keys", "status"]);
    assert!(ok && out.contains("can be retired"), "{out}");
    let (ok, out, err) = run_cli(&dir, &["keys", "forget-previous"]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        std::fs::read_to_string(&key_file).unwrap().lines().count(),
        1
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Restarted on the new key alone, everything reads.
    let url = app.database_url.clone();
    let d = dir.clone();
    let after = spawn_app_with(Backend::Sqlite, move |s| {
        s.database_url = url;
        s.master_key = None;
        s.data_dir = d;
    })
    .await
    .unwrap();
    for id in [&before, &during] {
        assert_eq!(
            after.get(&format!("Communication/{id}")).await.status(),
            200
        );
    }
    // `rotate --master` is refused when the key comes from the environment, with the procedure.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["keys", "rotate", "--master"])
        .env("COURIER_DATA_DIR", &dir)
        .env("COURIER_MASTER_KEY", NEW_KEY)
        .env("COURIER_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("COURIER_PREVIOUS_MASTER_KEYS"));
}

crate::both_backends! {
    // Issue 24: a version names its data key by the key's number (`data_keys.n`), not its text
    // id. A store written before (the migration undone: text ids in the version rows again) is
    // converted on upgrade: every message still opens, the audit chain (whose hash covers the
    // text id) still verifies, and new keys are numbered.
    async fn versions_name_their_data_key_by_number_after_an_upgrade(app: TestApp) {
        use courier::audit::chain::{seal, verify, Verdict};
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(app.create(&patient_message(i)).await);
        }
        let _ = seal(&app.store);
        let down = match app.backend {
            Backend::Sqlite => include_str!("../../migrations/sqlite/2026-12-11-000100_data_key_numbers/down.sql"),
            Backend::Postgres => include_str!("../../migrations/postgres/2026-12-11-000100_data_key_numbers/down.sql"),
        };
        run_script(&app, down);
        #[derive(diesel::QueryableByName)]
        struct Named {
            #[diesel(sql_type = diesel::sql_types::Text)]
            key_id: String,
        }
        let old: Vec<Named> = app
            .store
            .query("SELECT key_id FROM resource_versions", vec![])
            .unwrap();
        assert!(!old.is_empty() && old.iter().all(|o| o.key_id.starts_with("dk-")), "down.sql restores text ids");
        assert_eq!(
            app.store
                .execute("DELETE FROM __diesel_schema_migrations WHERE version = '20261211000100'", vec![])
                .unwrap(),
            1
        );
        let upgraded = spawn_instance_on(&app).await.unwrap();
        for (i, id) in ids.iter().enumerate() {
            let m = upgraded.get_json(&format!("Communication/{id}")).await;
            assert_eq!(m["payload"][0]["contentString"], format!("rotation load {i}"), "{m}");
        }
        let unnamed = upgraded.store.query::<courier::store::rows::CountRow>(
            "SELECT COUNT(*) AS n FROM resource_versions v LEFT JOIN data_keys k ON k.n = v.key_n WHERE k.key_id IS NULL",
            vec![],
        );
        assert_eq!(unnamed.unwrap()[0].n, 0, "every version's key number names a key");
        let _ = seal(&upgraded.store);
        assert!(
            matches!(verify(&upgraded.store).unwrap(), Verdict::Intact { .. }),
            "{:?}",
            verify(&upgraded.store).unwrap()
        );
        // A new patient's first message makes a new data key, numbered after the others.
        let before = upgraded.store.query::<courier::store::rows::CountRow>(
            "SELECT COALESCE(MAX(n), 0) AS n FROM data_keys",
            vec![],
        );
        let before = before.unwrap()[0].n;
        let fresh = upgraded
            .create(&message("Patient/new-after-upgrade", "2026-11-20T10:00:00Z", "fresh"))
            .await;
        assert_eq!(
            upgraded.get_json(&format!("Communication/{fresh}")).await["payload"][0]["contentString"],
            "fresh"
        );
        let unnumbered = upgraded.store.query::<courier::store::rows::CountRow>(
            "SELECT COUNT(*) AS n FROM data_keys WHERE n IS NULL",
            vec![],
        );
        assert_eq!(unnumbered.unwrap()[0].n, 0, "every key has a number");
        let newest = upgraded.store.query::<courier::store::rows::CountRow>(
            "SELECT MIN(n) AS n FROM data_keys WHERE patient = 'Patient/new-after-upgrade'",
            vec![],
        );
        assert!(newest.unwrap()[0].n > before, "numbered after every key before it");
        let distinct = upgraded.store.query::<courier::store::rows::CountRow>(
            "SELECT COUNT(*) - COUNT(DISTINCT n) AS n FROM data_keys",
            vec![],
        );
        assert_eq!(distinct.unwrap()[0].n, 0, "numbers are unique");
    }
}

/// A store started without its master key (the key file lost or misplaced) refuses to start, and
/// leaves no new key file behind to be mistaken for the right one (an outside fault probe found
/// one created before the refusal).
#[tokio::test]
async fn a_start_without_the_master_key_refuses_and_creates_no_key_file() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    app.create(
        &serde_json::json!({"resourceType": "Communication", "status": "completed",
        "subject": {"reference": "Patient/p1"}, "recipient": [{"reference": "Patient/p1"}]}),
    )
    .await;
    let key_file = app.dir.path().join("master.key");
    assert!(
        !key_file.exists(),
        "the test app's key is configured, not in a file"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("migrate")
        .env("COURIER_DATA_DIR", app.dir.path())
        .env("COURIER_DATABASE_URL", &app.database_url)
        .env_remove("COURIER_MASTER_KEY")
        .env("COURIER_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success(), "started without its key");
    assert!(!key_file.exists(), "a stray key file was left");
}
