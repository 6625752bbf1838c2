//! Notices benchmark (issue 23; not a test):
//!
//!   cargo bench --bench notices                                  # 10,000 messages, 1,000 patients
//!   cargo bench --bench notices -- --messages 2000 --patients 200 --rounds 3
//!
//! Needs `python3 -m aiosmtpd` (PyPI `aiosmtpd`): a real SMTP server (its Sink handler) on loopback.
//!
//! Prints:
//! 1. **the cost to the create path**, measured interleaved on one SQLite store with no mail
//!    server configured (so nothing is sent while creates run): phases of creates, at 32
//!    concurrent clients, to patients *with* an email address (each create also writes its notice
//!    row) and to patients *without* one (the per-recipient lookup only), alternated `--rounds`
//!    times; creates/s per phase and the median of each kind;
//! 2. **delivery**: `--messages` messages to `--patients` patients with email addresses on a store
//!    with the SMTP server configured and the unread delay 0; the time from the first create until
//!    every notice has been accepted by the SMTP server, and notices/s.

#[path = "common.rs"]
mod common;
use common::bench_jwks;

use courier::auth::tokens::Grant;
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    messages: usize,
    patients: usize,
    clients: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut a = Args {
        messages: 10_000,
        patients: 1_000,
        clients: 32,
        rounds: 3,
    };
    common::parse_args(|k, v| {
        match k {
            "--messages" => a.messages = v.parse().unwrap(),
            "--patients" => a.patients = v.parse().unwrap(),
            "--clients" => a.clients = v.parse().unwrap(),
            "--rounds" => a.rounds = v.parse().unwrap(),
            _ => return false,
        }
        true
    });
    a
}

struct Server {
    base: String,
    store: Arc<courier::store::Store>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn server(smtp: Option<u16>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        base_url: "http://127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        master_key: Some(
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                .to_string()
                .into(),
        ),
        db_pool_size: 16,
        log: "warn".into(),
        smtp_url: smtp.map(|p| format!("smtp://127.0.0.1:{p}").into()),
        notify_after_secs: 0,
        clinic_name: "Benchmark Clinic".into(),
        ..Settings::default()
    };
    let app = Application::build(settings).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let store = app.store.clone();
    let tokens = app.tokens.clone();
    tokio::spawn(app.run_until_stopped());
    let client_id = clients::add(
        &store,
        "notices benchmark",
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
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .default_headers(h)
        .build()
        .unwrap();
    Server {
        base,
        store,
        client,
        _dir: dir,
    }
}

fn patient(prefix: &str, i: usize) -> String {
    format!("Patient/{prefix}{i:08}-0000-4000-8000-000000000000")
}

fn with_email(store: &courier::store::Store, prefix: &str, n: usize) {
    for i in 0..n {
        courier::notify::remember_contacts(
            store,
            &patient(prefix, i),
            &json!({"telecom": [{"system": "email", "value": format!("p{i}@bench.example")}]}),
        )
        .unwrap();
    }
}

/// `n` creates at `clients` concurrency to the patients `prefix…`; creates/s.
async fn creates(s: &Server, prefix: &str, patients: usize, n: usize, clients: usize) -> f64 {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = vec![];
    for _ in 0..clients {
        let (c, url, next, prefix) = (
            s.client.clone(),
            format!("{}/Communication", s.base),
            next.clone(),
            prefix.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if k >= n {
                    break;
                }
                let body = json!({"resourceType": "Communication", "status": "completed",
                    "recipient": [{"reference": patient(&prefix, k % patients)}],
                    "sender": {"reference": "Practitioner/bench-sender"}, "sent": "2026-12-06T10:00:00Z",
                    "priority": "routine", "payload": [{"contentString": format!("Benchmark message {k} with some text of ordinary length")}]});
                let r = c.post(&url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn sent(store: &courier::store::Store) -> i64 {
    courier::notify::status(store)
        .unwrap()
        .into_iter()
        .filter(|r| r.state == "sent")
        .map(|r| r.n)
        .sum()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    // 1. The cost to the create path, interleaved.
    let s = server(None).await;
    with_email(&s.store, "a", a.patients);
    let per_phase = (a.messages / (2 * a.rounds)).max(200);
    creates(&s, "w", a.patients, 500, a.clients).await; // warm-up
    let (mut with, mut without) = (vec![], vec![]);
    for round in 0..a.rounds {
        // Which kind goes first alternates, so that neither gains from the order.
        let (w, o) = if round % 2 == 0 {
            let w = creates(&s, "a", a.patients, per_phase, a.clients).await;
            (w, creates(&s, "b", a.patients, per_phase, a.clients).await)
        } else {
            let o = creates(&s, "b", a.patients, per_phase, a.clients).await;
            (creates(&s, "a", a.patients, per_phase, a.clients).await, o)
        };
        println!("round {}: {w:.0} creates/s to patients with an email address (notice written), {o:.0} without", round + 1);
        with.push(w);
        without.push(o);
    }
    let (mw, mo) = (median(with), median(without));
    println!(
        "create path, {} clients, {} creates per phase, {} rounds: median {mw:.0} creates/s with notices, {mo:.0} without: {:+.1}%",
        a.clients,
        per_phase,
        a.rounds,
        (mw / mo - 1.0) * 100.0
    );

    // 2. Delivery to a real SMTP server.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut smtp = std::process::Command::new("python3")
        .args([
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            &format!("127.0.0.1:{port}"),
            "-c",
            "aiosmtpd.handlers.Sink",
        ])
        .spawn()
        .expect("python3 -m aiosmtpd (pip install aiosmtpd)");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = server(Some(port)).await;
    with_email(&s.store, "d", a.patients);
    let start = Instant::now();
    let rate = creates(&s, "d", a.patients, a.messages, a.clients).await;
    let created = start.elapsed();
    loop {
        if sent(&s.store) >= a.messages as i64 {
            break;
        }
        if start.elapsed() > Duration::from_secs(1800) {
            panic!(
                "only {} of {} notices sent after 30 minutes",
                sent(&s.store),
                a.messages
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let all = start.elapsed();
    println!(
        "delivery: {} messages to {} patients created in {:.1} s ({rate:.0}/s while sending); every notice accepted by the SMTP server {:.1} s after the first create ({:.0} notices/s)",
        a.messages,
        a.patients,
        created.as_secs_f64(),
        all.as_secs_f64(),
        a.messages as f64 / all.as_secs_f64()
    );
    let _ = smtp.kill();
}
