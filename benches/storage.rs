//! Storage benchmark (issue 24; not a test): bytes stored per message and per audited read.
//!
//!   cargo bench --bench storage                              # SQLite, 5,000 messages, 2 rounds
//!   cargo bench --bench storage -- --messages 20000 --rounds 3
//!   COURIER_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench storage -- --backend postgres
//!
//! Each round makes two fresh stores side by side, one with bodies compressed before sealing
//! (the default) and one without (`COURIER_STORE_COMPRESS=false`), in alternating order. Into
//! each it creates `--messages` ~350-byte Communications over HTTP (a system token, 8 clients;
//! each create writes the message, its AuditEvent, their index rows and the event), then reads
//! each one back once with a user token (each read writes its own AuditEvent). After each phase:
//! SQLite checkpoints the write-ahead log and sums `dbstat` (the pages every table and index
//! uses); PostgreSQL sums `pg_total_relation_size` of the schema's tables (with their indexes
//! and TOAST). Prints bytes per message (with its create AuditEvent and index rows) and per
//! audited read, and the objects that grew most.

#[path = "common.rs"]
mod common;
use common::bench_jwks;

use courier::auth::tokens::Grant;
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use serde_json::json;
use std::sync::Arc;

struct Args {
    backend: String,
    messages: usize,
    rounds: usize,
    clients: usize,
}

fn args() -> Args {
    let mut a = Args {
        backend: "sqlite".into(),
        messages: 5_000,
        rounds: 2,
        clients: 8,
    };
    common::parse_args(|k, v| {
        match k {
            "--backend" => a.backend = v,
            "--messages" => a.messages = v.parse().unwrap(),
            "--rounds" => a.rounds = v.parse().unwrap(),
            "--clients" => a.clients = v.parse().unwrap(),
            _ => return false,
        }
        true
    });
    a
}

#[derive(QueryableByName)]
struct Size {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

/// Bytes used now, per table or index.
fn sizes(store: &courier::store::Store, postgres: bool) -> Vec<(String, i64)> {
    let rows: Vec<Size> = if postgres {
        store
            .query(
                "SELECT c.relname::text AS name, pg_total_relation_size(c.oid)::bigint AS bytes FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'",
                vec![],
            )
            .unwrap()
    } else {
        store
            .execute("PRAGMA wal_checkpoint(TRUNCATE)", vec![])
            .ok();
        store
            .query(
                "SELECT name, CAST(SUM(pgsize) AS BIGINT) AS bytes FROM dbstat GROUP BY name",
                vec![],
            )
            .unwrap()
    };
    rows.into_iter().map(|r| (r.name, r.bytes)).collect()
}

fn total(s: &[(String, i64)]) -> i64 {
    s.iter().map(|(_, b)| b).sum()
}

/// The objects that grew most between two measurements, as "name +bytes/unit".
fn growth(before: &[(String, i64)], after: &[(String, i64)], per: usize) -> String {
    let mut g: Vec<(String, i64)> = after
        .iter()
        .map(|(n, b)| {
            let was = before.iter().find(|(m, _)| m == n).map_or(0, |(_, b)| *b);
            (n.clone(), b - was)
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    g.sort_by_key(|(_, d)| -d);
    g.iter()
        .take(24)
        .map(|(n, d)| format!("{n} {:.0}", *d as f64 / per as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Server {
    base: String,
    store: Arc<courier::store::Store>,
    system: reqwest::Client,
    user: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn server(a: &Args, compress: bool) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let database_url = match a.backend.as_str() {
        "postgres" => {
            let base = std::env::var("COURIER_BENCH_POSTGRES_URL")
                .expect("COURIER_BENCH_POSTGRES_URL for --backend postgres");
            use diesel::{Connection, PgConnection, RunQueryDsl};
            let schema = format!("bench_storage_{}", uuid::Uuid::new_v4().simple());
            let mut c = PgConnection::establish(&base).unwrap();
            diesel::sql_query(format!("CREATE SCHEMA {schema}"))
                .execute(&mut c)
                .unwrap();
            let sep = if base.contains('?') { '&' } else { '?' };
            format!("{base}{sep}options=-csearch_path%3D{schema}")
        }
        _ => String::new(),
    };
    let settings = Settings {
        db_pool_size: 16,
        store_compress: compress,
        ..common::settings(
            dir.path(),
            (a.backend == "postgres").then_some(database_url),
        )
    };
    let app = Application::build(settings).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let (store, tokens) = (app.store.clone(), app.tokens.clone());
    tokio::spawn(app.run_until_stopped());
    let client_id = clients::add(
        &store,
        "storage benchmark",
        clients::KeySource::Document(bench_jwks()),
        "system/Communication.cruds",
    )
    .unwrap();
    let issue = |scope: &str, user: Option<&str>| {
        tokens
            .issue(&Grant {
                client_id: client_id.clone(),
                scopes: scopes::parse_all(scope).unwrap(),
                fhir_user: user.map(String::from),
                ..Default::default()
            })
            .unwrap()
            .access_token
    };
    Server {
        base,
        system: common::bearer_client(&issue("system/Communication.cruds", None)),
        user: common::bearer_client(&issue(
            "user/Communication.rs",
            Some("Practitioner/bench-sender"),
        )),
        store,
        _dir: dir,
    }
}

fn patient(i: usize) -> String {
    // Shaped like the ids Courier assigns a linked person (`courier_store::ids::random_id`: 22
    // base62 digits; a 36-character UUID before issue 24's fifth step).
    format!(
        "Patient/{}",
        courier_store::ids::base62(
            0x0193_7000_0000_7000_8000_0000_0000_0000 + i as u128 * 0x9E37_79B9_7F4A_7C15
        )
    )
}

/// `n` creates (or reads of `ids`) at `clients` concurrency; the ids created.
async fn run(s: &Server, n: usize, clients: usize, ids: Option<Arc<Vec<String>>>) -> Vec<String> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = vec![];
    for _ in 0..clients {
        let (sys, user, base, next, ids) = (
            s.system.clone(),
            s.user.clone(),
            s.base.clone(),
            next.clone(),
            ids.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut made = vec![];
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if k >= n {
                    break;
                }
                match &ids {
                    Some(ids) => {
                        let r = user
                            .get(format!("{base}/Communication/{}", ids[k]))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 200);
                    }
                    None => {
                        // About 350 bytes, as in the issue's workload.
                        let body = json!({"resourceType": "Communication", "status": "completed",
                            "subject": {"reference": patient(k % 500)},
                            "recipient": [{"reference": patient(k % 500)}],
                            "sender": {"reference": "Practitioner/bench-sender"}, "sent": "2026-12-06T10:00:00Z",
                            "priority": "routine", "topic": {"text": "Follow-up"},
                            "payload": [{"contentString": format!("Benchmark message {k}: your results are in, please book a follow-up visit.")}]});
                        let r = sys
                            .post(format!("{base}/Communication"))
                            .json(&body)
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 201);
                        let v: serde_json::Value = r.json().await.unwrap();
                        made.push(v["id"].as_str().unwrap().to_string());
                    }
                }
            }
            made
        }));
    }
    let mut out = vec![];
    for t in tasks {
        out.extend(t.await.unwrap());
    }
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let postgres = a.backend == "postgres";
    let mut per_message = [vec![], vec![]];
    let mut per_read = [vec![], vec![]];
    for round in 0..a.rounds {
        // Which kind goes first alternates, so that neither gains from the order.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for compress in order {
            let s = server(&a, compress).await;
            run(&s, 200, a.clients, None).await; // warm-up: keys, first pages
            let before = sizes(&s.store, postgres);
            let ids = run(&s, a.messages, a.clients, None).await;
            let created = sizes(&s.store, postgres);
            let ids = Arc::new(ids);
            run(&s, a.messages, a.clients, Some(ids)).await;
            let read = sizes(&s.store, postgres);
            let m = (total(&created) - total(&before)) as f64 / a.messages as f64;
            let r = (total(&read) - total(&created)) as f64 / a.messages as f64;
            let k = usize::from(!compress);
            per_message[k].push(m);
            per_read[k].push(r);
            println!(
                "round {}: {} bodies: {m:.0} B per message [{}]; {r:.0} B per audited read [{}]",
                round + 1,
                if compress { "compressed" } else { "plain" },
                growth(&before, &created, a.messages),
                growth(&created, &read, a.messages),
            );
        }
    }
    let (mc, mp) = (
        median(per_message[0].clone()),
        median(per_message[1].clone()),
    );
    let (rc, rp) = (median(per_read[0].clone()), median(per_read[1].clone()));
    println!(
        "{} {} messages, {} rounds, medians: {mc:.0} B per message compressed, {mp:.0} plain ({:+.1}%); \
         {rc:.0} B per audited read compressed, {rp:.0} plain ({:+.1}%)",
        a.backend,
        a.messages,
        a.rounds,
        (mc - mp) / mp * 100.0,
        (rc - rp) / rp * 100.0
    );
}
