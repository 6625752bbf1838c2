//! Real-time delivery benchmark (not a test): POST → WebSocket delivery latency with many sockets
//! connected, and the server's memory at that load.
//!
//!   cargo bench --bench realtime                        # 1,000 sockets, 2,000 messages
//!   cargo bench --bench realtime -- --sockets 2000 --messages 5000 --posters 8
//!
//! The server is the release `courier` binary in a process of its own (SQLite, the default
//! `synchronous=FULL`), so its RSS is read from /proc alone. Each socket is a different patient's
//! (patient/*.rs token); each message goes to one random patient, so every event is checked
//! against all sockets' grants and delivered to exactly one. Latency is from just before the POST
//! to the frame arriving at the recipient's socket: it includes the durable write (encrypt, index,
//! audit, commit), the hub's tail and the access check, not only the push.

#[path = "common.rs"]
mod common;

use courier::auth::tokens::{Grant, Tokens};
use courier::auth::{clients, scopes};
use courier::config::Settings;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let sockets = arg("--sockets", 1000);
    let messages = arg("--messages", 2000);
    let posters = arg("--posters", 4);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("rt.db").display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    // Set up the database (migrations, signing key, a client) from here, then serve it from the
    // release binary.
    let settings = Settings {
        data_dir: dir.path().to_path_buf(),
        database_url: db.clone(),
        base_url: base.clone(),
        master_key: Some(MASTER_KEY.to_string().into()),
        ..Settings::default()
    };
    let store = courier::startup::open_store(&settings).unwrap();
    let tokens = Tokens::open(store.clone(), &base).unwrap();
    let jwks = common::bench_jwks();
    let client_id = clients::add(
        &store,
        "realtime benchmark",
        clients::KeySource::Document(jwks),
        "system/Communication.cruds patient/Communication.rs",
    )
    .unwrap();
    let issue = |scope: &str, patient: Option<String>| {
        tokens
            .issue(&Grant {
                client_id: client_id.clone(),
                scopes: scopes::parse_all(scope).unwrap(),
                fhir_user: patient.as_ref().map(|p| format!("Patient/{p}")),
                patient,
                encounter: None,
            })
            .unwrap()
            .access_token
    };
    /// Kills the server however the benchmark ends.
    struct Server(std::process::Child);
    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .arg("serve")
        .env("COURIER_LISTEN", format!("127.0.0.1:{port}"))
        .env("COURIER_BASE_URL", &base)
        .env("COURIER_DATABASE_URL", &db)
        .env("COURIER_DATA_DIR", dir.path())
        .env("COURIER_MASTER_KEY", MASTER_KEY)
        .env("COURIER_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("the courier binary starts");
    let server = Server(server);
    let pid = server.0.id();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    for _ in 0..200 {
        if http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let idle_rss = rss_kib(pid);

    // Connect the sockets; each reports (tag, arrival) for every message it receives.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let started = Instant::now();
    let mut ready = vec![];
    for i in 0..sockets {
        let token = issue("patient/Communication.rs", Some(format!("p{i}")));
        let url = format!("ws://127.0.0.1:{port}/ws");
        let tx = tx.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        ready.push(ready_rx);
        tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connect");
            ws.send(Message::Text(
                json!({"type": "auth", "token": token}).to_string().into(),
            ))
            .await
            .unwrap();
            let mut ready_tx = Some(ready_tx);
            while let Some(Ok(m)) = ws.next().await {
                let Message::Text(t) = m else { continue };
                let arrived = Instant::now();
                let v: Value = serde_json::from_str(&t).unwrap();
                match v["type"].as_str() {
                    Some("ready") => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Some("event") => {
                        let tag = v["resource"]["payload"][0]["contentString"]
                            .as_str()
                            .and_then(|s| s.strip_prefix("bench "))
                            .and_then(|s| s.parse().ok());
                        if let Some(tag) = tag {
                            let _ = tx.send((tag, arrived));
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    for r in ready {
        r.await.expect("socket ready");
    }
    println!(
        "{sockets} sockets connected and authenticated in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let connected_rss = rss_kib(pid);

    // Post the messages from `posters` concurrent clients.
    let system = issue("system/Communication.cruds", None);
    let sent: Arc<parking_lot::Mutex<HashMap<usize, Instant>>> = Arc::default();
    let per = messages.div_ceil(posters);
    let mut tasks = vec![];
    let t0 = Instant::now();
    for p in 0..posters {
        let (http, base, system, sent) = (http.clone(), base.clone(), system.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            for k in 0..per {
                let tag = p * per + k;
                if tag >= messages {
                    break;
                }
                let to = (tag * 7919) % sockets;
                let body = json!({"resourceType": "Communication", "status": "completed",
                    "sender": {"reference": "Practitioner/bench"},
                    "recipient": [{"reference": format!("Patient/p{to}")}],
                    "payload": [{"contentString": format!("bench {tag}")}]});
                sent.lock().insert(tag, Instant::now());
                let r = http
                    .post(format!("{base}/Communication"))
                    .bearer_auth(&system)
                    .header("content-type", "application/fhir+json")
                    .header("prefer", "return=minimal")
                    .body(body.to_string())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    let mut latencies = Vec::with_capacity(messages);
    let deadline = Instant::now() + Duration::from_secs(120);
    while latencies.len() < messages && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((tag, arrived))) => {
                let t = sent.lock().get(&tag).copied();
                if let Some(t) = t {
                    latencies.push(arrived.duration_since(t));
                }
            }
            _ => break,
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = t0.elapsed();
    let loaded_rss = rss_kib(pid);
    drop(server);
    latencies.sort();
    println!(
        "delivered {}/{messages} messages ({posters} posters, {:.0} messages/s)",
        latencies.len(),
        messages as f64 / elapsed.as_secs_f64()
    );
    if !latencies.is_empty() {
        println!(
            "POST → WebSocket delivery with {sockets} sockets: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            percentile(&latencies, 0.50).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3,
        );
    }
    println!(
        "server RSS: {:.1} MB idle, {:.1} MB with {sockets} sockets, {:.1} MB after the run",
        idle_rss as f64 / 1024.0,
        connected_rss as f64 / 1024.0,
        loaded_rss as f64 / 1024.0
    );
}
