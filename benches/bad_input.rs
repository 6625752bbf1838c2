//! Memory under bad input (not a test): posts a corpus of bad bodies to a Courier server running in
//! a child process and prints the server's resident memory before, at its peak and after.
//!
//!   cargo bench --bench bad_input                       # 500 bodies, 16 at a time
//!   cargo bench --bench bad_input -- --bodies 2000 --concurrency 64
//!
//! The corpus cycles through bodies made to cost the parser the most per byte — arrays of a
//! million tiny numbers, objects of many one-letter keys, deep nesting, long strings, invalid
//! UTF-8, truncated JSON, declared lengths larger than the body — each as large as the endpoint
//! takes (a resource: 1 MiB; a Bundle: ~13 MiB, the Binary limit in base64), sent with a valid
//! token (without one nothing is read). Every answer must be a 4xx; the server must stay up.
//! Peak RSS is the child's `VmHWM` from /proc (Linux).

use courier::auth::tokens::Grant;
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "common.rs"]
mod common;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The child: a Courier on a fresh SQLite store; prints "PORT TOKEN" and serves until killed.
fn serve(dir: &str) {
    actix_web::rt::System::new().block_on(async {
        let settings = Settings {
            listen: "127.0.0.1:0".into(),
            base_url: "http://127.0.0.1:0".into(),
            data_dir: dir.into(),
            database_url: format!("sqlite://{dir}/bench.db"),
            master_key: Some(
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                    .to_string()
                    .into(),
            ),
            log: "error".into(),
            sqlite_synchronous: "NORMAL".into(),
            ..Settings::default()
        };
        let app = Application::build(settings).unwrap();
        let port = app.port();
        let client_id = clients::add(
            &app.store,
            "bad-input benchmark",
            clients::KeySource::Document(common::bench_jwks()),
            "system/*.cruds",
        )
        .unwrap();
        let token = app
            .tokens
            .issue(&Grant {
                client_id,
                scopes: scopes::parse_all("system/*.cruds").unwrap(),
                ..Default::default()
            })
            .unwrap()
            .access_token;
        println!("{port} {token}");
        app.run_until_stopped().await.unwrap();
    });
}

/// (path, content type, body) of bad body number `i`.
fn bad_body(i: usize) -> (&'static str, &'static str, Vec<u8>) {
    const MIB: usize = 1024 * 1024;
    const BUNDLE: usize = 13 * MIB; // below the Bundle limit (10 MB of Binary in base64 + slack)
    let resource = |filler: &dyn Fn(usize) -> String, size: usize| {
        let head = r#"{"resourceType":"Communication","status":"completed","extension":[{"url":"http://x","valueString":"x"}],"note":[{"text":"x"}],"x":"#;
        let mut b = head.to_string();
        b.push_str(&filler(size - head.len() - 2));
        b.push('}');
        b.into_bytes()
    };
    let bundle = |filler: &dyn Fn(usize) -> String, size: usize| {
        let head = r#"{"resourceType":"Bundle","type":"transaction","entry":"#;
        let mut b = head.to_string();
        b.push_str(&filler(size - head.len() - 2));
        b.push('}');
        b.into_bytes()
    };
    let zeros = |n: usize| {
        let mut s = String::with_capacity(n);
        s.push('[');
        while s.len() + 2 < n {
            s.push_str("0,");
        }
        s.push_str("0]");
        s
    };
    let keys = |n: usize| {
        let mut s = String::with_capacity(n);
        s.push('{');
        let mut k = 0usize;
        while s.len() + 24 < n {
            s.push_str(&format!("\"{k:x}\":0,"));
            k += 1;
        }
        s.push_str("\"z\":0}");
        s
    };
    let empties = |n: usize| {
        let mut s = String::with_capacity(n);
        s.push('[');
        while s.len() + 3 < n {
            s.push_str("{},");
        }
        s.push_str("{}]");
        s
    };
    let deep = |n: usize| "[".repeat(n / 2) + &"]".repeat(n / 2);
    let long = |n: usize| format!("\"{}\"", "A".repeat(n - 2));
    match i % 10 {
        0 => (
            "Communication",
            "application/fhir+json",
            resource(&zeros, MIB - 64),
        ),
        1 => (
            "Communication",
            "application/fhir+json",
            resource(&keys, MIB - 64),
        ),
        2 => (
            "Communication",
            "application/fhir+json",
            resource(&empties, MIB - 64),
        ),
        3 => ("", "application/fhir+json", bundle(&zeros, BUNDLE)),
        4 => ("", "application/fhir+json", bundle(&keys, BUNDLE)),
        5 => ("", "application/fhir+json", bundle(&empties, BUNDLE)),
        6 => ("", "application/fhir+json", bundle(&deep, BUNDLE)),
        7 => (
            "Communication",
            "application/fhir+json",
            resource(&long, MIB - 64),
        ),
        8 => {
            // Invalid UTF-8 and truncated JSON.
            let mut b = resource(&zeros, MIB - 64);
            b.truncate(b.len() / 2);
            b[100] = 0xff;
            ("Communication", "application/fhir+json", b)
        }
        _ => {
            let head = r#"{"resourceType":"Binary","contentType":"text/plain","data":"#;
            let mut b = head.to_string();
            b.push_str(&keys(BUNDLE - head.len() - 2));
            b.push('}');
            ("Binary", "application/fhir+json", b.into_bytes())
        }
    }
}

fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (kib("VmRSS:"), kib("VmHWM:"))
}

fn main() {
    match std::env::var("COURIER_BAD_INPUT_SERVE") {
        Ok(dir) => serve(&dir),
        Err(_) => tokio::runtime::Runtime::new().unwrap().block_on(attack()),
    }
}

/// The server child, killed however the benchmark ends.
struct Server(std::process::Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn attack() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let bodies = arg("--bodies", 500);
    let concurrency = arg("--concurrency", 16);
    let tmp = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .env("COURIER_BAD_INPUT_SERVE", tmp.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = child.stdout.take().unwrap();
    let _server = Server(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let (port, token) = line.trim().split_once(' ').unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    // Warm up with a few good requests, then read the baseline.
    for _ in 0..20 {
        http.get(format!("{base}/Communication"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, _) = rss(pid);
    let next = Arc::new(AtomicUsize::new(0));
    let statuses = Arc::new(parking_lot::Mutex::new(std::collections::BTreeMap::<
        u16,
        usize,
    >::new()));
    let started = Instant::now();
    let mut tasks = vec![];
    for _ in 0..concurrency {
        let (http, base, token, next, statuses) = (
            http.clone(),
            base.clone(),
            token.to_string(),
            next.clone(),
            statuses.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= bodies {
                    return;
                }
                let (path, ct, body) = bad_body(i);
                let r = http
                    .post(format!("{base}/{path}"))
                    .bearer_auth(&token)
                    .header("content-type", ct)
                    .body(body)
                    .send()
                    .await;
                let s = r.map(|r| r.status().as_u16()).unwrap_or(0);
                *statuses.lock().entry(s).or_default() += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let (_, hwm) = rss(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (after, _) = rss(pid);
    let alive = http
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200);
    let mib = |k: u64| k as f64 / 1024.0;
    println!(
        "{bodies} bad bodies, {concurrency} at a time, in {:.1} s; answers {:?}",
        elapsed.as_secs_f64(),
        statuses.lock()
    );
    println!(
        "server RSS: {:.0} MiB before, {:.0} MiB peak (VmHWM), {:.0} MiB 2 s after; still serving: {alive}",
        mib(before),
        mib(hwm),
        mib(after)
    );
}
