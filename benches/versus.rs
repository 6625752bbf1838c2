//! Courier beside Medplum's FHIR router (issue 24; not a test):
//!
//!   cargo bench --bench versus                     # 10 s phases, 2 rounds, 5,000-message inboxes
//!   cargo bench --bench versus -- --secs 5 --rounds 3 --seed 20000
//!
//! Needs Node.js and `tests/ehr`'s npm packages (`scripts/test --no-run` installs them). Runs the
//! same workloads, alternately, against:
//! - **Courier**: SQLite `synchronous=FULL`, every request with a bearer token, authorized,
//!   strictly checked, encrypted at rest and audited in the same transaction;
//! - **the router**: `@medplum/fhir-router` over the test EHR's in-memory repository with R4
//!   validation of writes, behind a bare HTTP server (`tests/ehr/router-bench-server.mjs`): no
//!   authorization, no audit, no encryption, no disk.
//!
//! Workloads: first `--seed` messages into each fresh store (to 100 recipients) and the inbox
//! search `recipient=…&_sort=-sent&_count=50` from 8 clients; then creates of a ~350-byte
//! Communication (subject, sender, recipient, sent, priority, one text payload) from 1 and from
//! 32 concurrent clients, `--secs` per phase, alternated. Prints each phase and the ratios.

#[path = "common.rs"]
mod common;
use common::bench_jwks;

use courier::auth::tokens::Grant;
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use serde_json::json;
use std::io::BufRead;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    secs: u64,
    rounds: usize,
    seed: usize,
    searches: usize,
}

fn args() -> Args {
    let mut a = Args {
        secs: 10,
        rounds: 2,
        seed: 5_000,
        searches: 2_000,
    };
    common::parse_args(|k, v| {
        match k {
            "--secs" => a.secs = v.parse().unwrap(),
            "--rounds" => a.rounds = v.parse().unwrap(),
            "--seed" => a.seed = v.parse().unwrap(),
            "--searches" => a.searches = v.parse().unwrap(),
            _ => return false,
        }
        true
    });
    a
}

/// One system under test: its FHIR base and a client (with Courier's token, or none).
#[derive(Clone)]
struct Target {
    name: &'static str,
    base: String,
    client: reqwest::Client,
}

fn message(k: usize) -> serde_json::Value {
    let p = format!("Patient/{:08}-0000-4000-8000-000000000000", k % 100);
    json!({"resourceType": "Communication", "status": "completed",
        "subject": {"reference": p}, "recipient": [{"reference": p}],
        "sender": {"reference": "Practitioner/bench-sender"},
        "sent": format!("2026-12-{:02}T{:02}:{:02}:00Z", 1 + k % 28, k % 24, k % 60),
        "priority": "routine",
        "payload": [{"contentString": format!("Benchmark message {k}: your results are in, please book a follow-up visit at the clinic.")}]})
}

/// Creates from `clients` concurrent clients for `secs`: creates/s.
async fn creates(t: &Target, clients: usize, secs: u64, offset: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = vec![];
    for c in 0..clients {
        let (t, stop, done) = (t.clone(), stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = offset + c * 1_000_000;
            while !stop.load(Ordering::Relaxed) {
                let r = t
                    .client
                    .post(format!("{}/Communication", t.base))
                    .header("content-type", "application/fhir+json")
                    .json(&message(k))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    r.status(),
                    201,
                    "{}: {}",
                    t.name,
                    r.text().await.unwrap_or_default()
                );
                let _ = r.bytes().await;
                done.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// The inbox search from 8 clients, `n` in all: (p50, p99) in ms.
async fn searches(t: &Target, n: usize) -> (f64, f64) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = vec![];
    for _ in 0..8 {
        let (t, next) = (t.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = vec![];
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= n {
                    break;
                }
                let url = format!(
                    "{}/Communication?recipient=Patient/{:08}-0000-4000-8000-000000000000&_sort=-sent&_count=50",
                    t.base,
                    k % 100
                );
                let s = Instant::now();
                let r = t.client.get(url).send().await.unwrap();
                assert_eq!(r.status(), 200, "{}", t.name);
                let b: serde_json::Value = r.json().await.unwrap();
                assert!(b["entry"].as_array().is_some_and(|e| !e.is_empty()), "{}: empty inbox", t.name);
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut all = vec![];
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    let ms =
        |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)].as_secs_f64() * 1000.0;
    (ms(0.5), ms(0.99))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    // Courier.
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        sqlite_synchronous: "FULL".into(),
        ..common::settings(dir.path(), None)
    };
    let app = Application::build(settings).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let (store, tokens) = (app.store.clone(), app.tokens.clone());
    tokio::spawn(app.run_until_stopped());
    let client_id = clients::add(
        &store,
        "versus benchmark",
        clients::KeySource::Document(bench_jwks()),
        "system/Communication.cruds",
    )
    .unwrap();
    let token = tokens
        .issue(&Grant {
            client_id,
            scopes: scopes::parse_all("system/Communication.cruds").unwrap(),
            ..Default::default()
        })
        .unwrap()
        .access_token;
    let courier = Target {
        name: "Courier",
        base,
        client: common::bearer_client(&token),
    };
    // The router.
    let ehr_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ehr");
    let mut node = std::process::Command::new("node")
        .arg("router-bench-server.mjs")
        .current_dir(&ehr_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect(
            "node runs (Node.js 20+, and `scripts/test --no-run` installed tests/ehr's packages)",
        );
    let mut line = String::new();
    std::io::BufReader::new(node.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).expect("the router server started");
    let router = Target {
        name: "router",
        base: ready["base"].as_str().unwrap().to_string(),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .unwrap(),
    };
    // Inboxes first, on fresh stores (the router's search is a scan of everything it holds, and
    // the create phases below add far more): the same seed into each over HTTP, then searches.
    for t in [&courier, &router] {
        let next = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![];
        for _ in 0..16 {
            let (t, next, n) = (t.clone(), next.clone(), a.seed);
            tasks.push(tokio::spawn(async move {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= n {
                        break;
                    }
                    let r = t
                        .client
                        .post(format!("{}/Communication", t.base))
                        .header("content-type", "application/fhir+json")
                        .json(&message(k))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    }
    let mut p = vec![];
    for t in [&courier, &router] {
        let (p50, p99) = searches(t, a.searches).await;
        println!(
            "inbox search, 8 clients, {} searches: {:>7} p50 {p50:.1} ms, p99 {p99:.1} ms",
            a.searches, t.name
        );
        p.push(p50);
    }
    println!("inbox search p50: router / Courier = {:.1}", p[1] / p[0]);
    // Warm-up: both JITs / caches, keys.
    for t in [&courier, &router] {
        creates(t, 8, 2, 900_000_000).await;
    }
    let mut rates: std::collections::BTreeMap<(usize, &str), Vec<f64>> = Default::default();
    for round in 0..a.rounds {
        for clients in [1usize, 32] {
            // Which goes first alternates.
            let order = if round % 2 == 0 {
                [&courier, &router]
            } else {
                [&router, &courier]
            };
            for t in order {
                let r = creates(t, clients, a.secs, (round * 2 + clients) * 10_000_000).await;
                println!(
                    "round {}: {:>7} creates, {clients:>2} client(s): {r:.0}/s",
                    round + 1,
                    t.name
                );
                rates.entry((clients, t.name)).or_default().push(r);
            }
        }
    }
    for clients in [1usize, 32] {
        let c = median(rates[&(clients, "Courier")].clone());
        let r = median(rates[&(clients, "router")].clone());
        println!("creates, {clients:>2} client(s), medians: Courier {c:.0}/s, router {r:.0}/s: Courier / router = {:.2}", c / r);
    }
    let _ = node.kill();
}
