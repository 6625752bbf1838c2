//! Issue 19 H and I: fail closed. A read whose AuditEvent cannot be recorded is not served;
//! `/readyz` says not ready while writes fail; a full disk answers 503 with `Retry-After`; a
//! start on a directory that cannot be written fails naming it. A revoked token's WebSocket
//! closes at once; a restarted instance sends what it had claimed before it died at once.
//!
//! A full disk is made real on SQLite with `PRAGMA max_page_count` (the database cannot grow:
//! SQLITE_FULL, SQLite's own disk-full path) on every pooled connection, and on PostgreSQL with a
//! trigger that raises `disk_full` (SQLSTATE 53100) with PostgreSQL's own message on every insert.

use crate::both_backends;
use crate::helpers::*;
use diesel::connection::SimpleConnection;
use serde_json::{json, Value};

/// Makes the database "full": no write that needs new space succeeds.
fn fill_disk(app: &TestApp) {
    match &app.store.db {
        courier::store::db::Db::Sqlite(pool, ..) => {
            // Every pooled connection (held together, so each is a different one).
            let conns: Vec<_> = (0..pool.max_size()).map(|_| pool.get().unwrap()).collect();
            for mut c in conns {
                // Below the current size means "the current size".
                c.batch_execute("PRAGMA max_page_count = 1").unwrap();
            }
        }
        courier::store::db::Db::Postgres(_) => {
            use diesel::Connection;
            let mut c = diesel::PgConnection::establish(&app.database_url).unwrap();
            c.batch_execute(
                r#"CREATE OR REPLACE FUNCTION test_disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
                   BEGIN
                     RAISE EXCEPTION USING ERRCODE = 'disk_full',
                       MESSAGE = 'could not extend file "base/16384/16402": No space left on device',
                       HINT = 'Check free disk space.';
                   END $$;
                   DO $$ DECLARE t text; BEGIN
                     FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() LOOP
                       EXECUTE format('CREATE TRIGGER test_disk_full BEFORE INSERT ON %I FOR EACH ROW EXECUTE FUNCTION test_disk_full()', t);
                     END LOOP;
                   END $$;"#,
            )
            .unwrap();
        }
    }
}

/// Frees the space again.
fn free_disk(app: &TestApp) {
    match &app.store.db {
        courier::store::db::Db::Sqlite(pool, ..) => {
            let conns: Vec<_> = (0..pool.max_size()).map(|_| pool.get().unwrap()).collect();
            for mut c in conns {
                c.batch_execute("PRAGMA max_page_count = 1073741823").unwrap();
            }
        }
        courier::store::db::Db::Postgres(_) => {
            use diesel::Connection;
            let mut c = diesel::PgConnection::establish(&app.database_url).unwrap();
            c.batch_execute(
                r#"DO $$ DECLARE t text; BEGIN
                     FOR t IN SELECT tablename FROM pg_tables WHERE schemaname = current_schema() LOOP
                       EXECUTE format('DROP TRIGGER IF EXISTS test_disk_full ON %I', t);
                     END LOOP;
                   END $$;"#,
            )
            .unwrap();
        }
    }
}

/// A 503 OperationOutcome with `Retry-After`, `transient`, that says why.
async fn assert_unavailable(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), 503, "{what}");
    assert!(
        r.headers().get("retry-after").is_some(),
        "{what}: no Retry-After"
    );
    let oo: Value = r.json().await.unwrap();
    assert_eq!(oo["resourceType"], "OperationOutcome", "{what}: {oo}");
    assert_eq!(oo["issue"][0]["code"], "transient", "{what}: {oo}");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("full"),
        "{what}: {oo}"
    );
}

/// The request ids the AuditEvents record.
async fn audited_request_ids(app: &TestApp) -> Vec<String> {
    let b = app.get_json("AuditEvent?_count=1000").await;
    b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["resource"]["entity"].as_array().cloned().unwrap_or_default())
        .filter(|en| en["type"]["code"] == "XrequestId")
        .filter_map(|en| en["what"]["identifier"]["value"].as_str().map(String::from))
        .collect()
}

both_backends! {
    async fn a_read_whose_audit_cannot_be_recorded_is_not_served(app: TestApp) {
        let id = app.create(&message("Patient/p1", "2026-01-01T10:00:00Z", "lab results")).await;
        assert_eq!(app.anonymous.get(app.url("readyz")).send().await.unwrap().status(), 200);
        fill_disk(&app);
        // Every read answered 200 has its AuditEvent; once the audit cannot be written, the read,
        // the search and the history answer 503 and carry no PHI.
        let mut served = Vec::new();
        let mut refused = false;
        for i in 0..300 {
            let r = app.get(&format!("Communication/{id}")).await;
            let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
            if r.status() == 200 {
                served.push(rid);
                continue;
            }
            assert_unavailable(r, &format!("read {i}")).await;
            refused = true;
            break;
        }
        assert!(refused, "300 reads were served with the database full");
        let r = app.get("Communication?recipient=Patient/p1").await;
        assert_unavailable(r, "search").await;
        let r = app.get(&format!("Communication/{id}/_history")).await;
        assert_unavailable(r, "history").await;
        // A write answers 503 too (not 500 `exception`), and so does the readiness probe.
        let r = app.post("Communication", &message("Patient/p1", "2026-01-01T11:00:00Z", "x")).await;
        assert_unavailable(r, "create").await;
        let r = app.anonymous.get(app.url("readyz")).send().await.unwrap();
        assert_eq!(r.status(), 503, "readyz with the database full");
        assert!(r.headers().get("retry-after").is_some());
        let oo: Value = r.json().await.unwrap();
        assert!(oo["issue"][0]["diagnostics"].as_str().unwrap().contains("full"), "{oo}");

        free_disk(&app);
        // Ready again once a write succeeds (the probe), and reads are served.
        let mut ready = false;
        for _ in 0..20 {
            if app.anonymous.get(app.url("readyz")).send().await.unwrap().status() == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
        assert!(ready, "readyz stayed 503 after the space was freed");
        assert_eq!(app.get(&format!("Communication/{id}")).await.status(), 200);
        let audited = audited_request_ids(&app).await;
        for rid in &served {
            assert!(audited.contains(rid), "read {rid} was served without its AuditEvent");
        }
    }
}

/// `courier migrate` (the same start as `serve`) on a directory that cannot be used.
fn start_fails_naming(dir: &std::path::Path) -> String {
    let (ok, _, stderr) = run_cli(dir, &["migrate"]);
    assert!(!ok, "started on {}", dir.display());
    let error = stderr
        .lines()
        .rfind(|l| l.starts_with("Error"))
        .unwrap_or_else(|| panic!("no error in {stderr}"))
        .to_string();
    assert!(error.contains(&dir.display().to_string()), "{stderr}");
    error
}

#[test]
fn a_start_on_a_directory_that_cannot_be_written_fails_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Missing, and impossible to create (its parent is a file): the same answer every time.
    let file = tmp.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let missing = file.join("data");
    let first = start_fails_naming(&missing);
    assert!(first.contains("cannot use the data directory"), "{first}");
    assert!(first.contains("Not a directory"), "{first}");
    assert_eq!(first, start_fails_naming(&missing));
    // Read-only (meaningless as root, who writes anyway: then only the missing case is checked).
    let ro = tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("probe"), "x").is_err() {
        let first = start_fails_naming(&ro);
        assert!(first.contains("cannot write a file in it"), "{first}");
        assert!(first.contains("ermission denied"), "{first}");
        assert_eq!(first, start_fails_naming(&ro));
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
}
