//! Web-app rendering benchmark (not a test): in Chromium, the inbox's first render with 500
//! threads, and opening a thread of 200 messages. Aims on the 2-core dev machine: ≤ 1 s and
//! ≤ 200 ms.
//!
//!   cargo bench --profile dev --bench app_render --no-run       # build (release takes too long here)
//!   cargo bench --profile dev --bench app_render -- --runs 5
//!   cargo bench --profile dev --bench app_render -- --runs 5 --profile   # + where the time goes
//!   options: --threads 500 --messages 200 --patients 100 --runs 7
//!
//! Courier runs in this process on a fresh temporary SQLite store. A system client seeds, in
//! parallel, `--threads` conversations of a clinician (`Practitioner/<uuid>`) with ~`--patients`
//! patients, as the web app writes them (a header: status in-progress, `topic.text`, `subject`;
//! its first message `partOf` it), half started by the clinician and half by the patient; one of
//! them gets `--messages` messages (`sent` one minute apart). Then `tests/ehr/bench-app.mjs` drives
//! Debian's Chromium (`/usr/bin/chromium` or `COURIER_CHROMIUM`) through playwright-core with the
//! clinician's session as an EHR launch hands it over (`courier-web-app` client, the clinician's
//! scopes) and prints each run, the medians and the aims. Needs `npm ci` in `tests/ehr` once.

#[path = "common.rs"]
mod common;

use courier::auth::tokens::Grant;
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use futures::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const MASTER_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
/// What an EHR launch gives a clinician (src/smart/launch.rs `complete`).
const CLINICIAN_SCOPES: &str =
    "user/Communication.cruds user/CommunicationRequest.cruds user/Binary.cr";
const CLINICIAN_NAME: &str = "Dr Ada Benchmark";
/// Requests in flight while seeding.
const SEED_CONCURRENCY: usize = 8;

fn arg(name: &str, default: usize) -> usize {
    let argv: Vec<String> = std::env::args().collect();
    argv.iter()
        .position(|a| a == name)
        .and_then(|i| argv.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn reference(r: &str, display: &str) -> Value {
    json!({"reference": r, "display": display})
}

/// POSTs a Communication with the system token; returns the stored resource.
async fn create(http: &reqwest::Client, base: &str, token: &str, body: Value) -> Value {
    for attempt in 0.. {
        let r = http
            .post(format!("{base}/Communication"))
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .header("prefer", "return=representation")
            .body(body.to_string())
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 201 => return r.json().await.expect("a Communication"),
            Ok(r) if r.status().is_server_error() && attempt < 5 => {}
            Ok(r) => panic!(
                "seeding: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) if attempt < 5 => eprintln!("seeding: {e}; again"),
            Err(e) => panic!("seeding: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let threads = arg("--threads", 500);
    let messages = arg("--messages", 200);
    let patients = arg("--patients", 100).max(1);
    let runs = arg("--runs", 7).max(1);
    let profile = std::env::args().any(|a| a == "--profile");

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ehr/bench-app.mjs");
    let modules = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/ehr/node_modules/playwright-core"
    );
    if !std::path::Path::new(modules).exists() {
        eprintln!("playwright-core is not installed: run `npm ci` in tests/ehr first");
        std::process::exit(2);
    }

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let settings = Settings {
        listen: format!("127.0.0.1:{port}"),
        // The app's CSP allows its WebSocket on this origin only.
        base_url: base.clone(),
        data_dir: dir.path().to_path_buf(),
        database_url: format!("sqlite://{}", dir.path().join("bench.db").display()),
        master_key: Some(MASTER_KEY.to_string().into()),
        log: "error".into(),
        // Seeding speed only: reads, which are measured, do not depend on it.
        sqlite_synchronous: "NORMAL".into(),
        rate_limit_per_minute: 0,
        ..Settings::default()
    };
    let app = Application::build(settings).expect("Courier starts");
    let (store, tokens) = (app.store.clone(), app.tokens.clone());
    tokio::spawn(app.run_until_stopped());
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

    // Seed as a system client (which may write in anyone's name: both sides of each thread).
    let client_id = clients::add(
        &store,
        "app_render benchmark",
        clients::KeySource::Document(common::bench_jwks()),
        "system/Communication.cruds",
    )
    .unwrap();
    let system = tokens
        .issue(&Grant {
            client_id,
            scopes: scopes::parse_all("system/Communication.cruds").unwrap(),
            ..Default::default()
        })
        .unwrap()
        .access_token;
    let clinician = format!("Practitioner/{}", uuid::Uuid::new_v4());
    let patient_refs: Vec<String> = (0..patients)
        .map(|_| format!("Patient/{}", uuid::Uuid::new_v4()))
        .collect();
    let me = reference(&clinician, CLINICIAN_NAME);
    let patient = |i: usize| {
        let p = i % patients;
        (
            patient_refs[p].clone(),
            reference(&patient_refs[p], &format!("Patient {:03}", p + 1)),
        )
    };
    // Thread i: started by the clinician (even i) or by the patient (odd i).
    let sides = |i: usize| {
        let (_, pt) = patient(i);
        if i % 2 == 0 {
            (me.clone(), pt)
        } else {
            (pt, me.clone())
        }
    };
    let start = chrono::Utc::now() - chrono::Duration::days(30);
    let t0 = Instant::now();
    let headers: Vec<Value> = futures::stream::iter(0..threads)
        .map(|i| {
            let (http, base, system) = (&http, &base, &system);
            let (subject, _) = patient(i);
            let (sender, recipient) = sides(i);
            async move {
                let body = json!({"resourceType": "Communication", "status": "in-progress",
                    "topic": {"text": format!("Conversation {:03}: follow-up on lab results and medication", i + 1)},
                    "subject": {"reference": subject},
                    "sender": sender, "recipient": [recipient]});
                create(http, base, system, body).await
            }
        })
        .buffered(SEED_CONCURRENCY)
        .collect()
        .await;
    // One message in each thread; the big thread gets `messages`. It is the newest header, so it is
    // on the list's first page whatever the page size.
    let big_i = threads - 1;
    let big = headers[big_i]["id"].as_str().unwrap().to_string();
    let mut jobs: Vec<(usize, usize)> = (0..threads).map(|i| (i, 0)).collect();
    jobs.extend((1..messages).map(|k| (big_i, k)));
    let created = futures::stream::iter(jobs)
        .map(|(i, k)| {
            let (http, base, system) = (&http, &base, &system);
            let (subject, _) = patient(i);
            let (mut sender, mut recipient) = sides(i);
            if k % 2 == 1 {
                std::mem::swap(&mut sender, &mut recipient);
            }
            let header = headers[i]["id"].as_str().unwrap().to_string();
            let sent = start + chrono::Duration::minutes((i * 10 + k) as i64);
            async move {
                let text = if k == 0 {
                    format!("Hello, this is the first message of conversation {}. The results came back and look fine; let us talk about the dose.", i + 1)
                } else {
                    format!("Message {} in this conversation: a reply of ordinary length, a sentence or two, as people write them.", k + 1)
                };
                let body = json!({"resourceType": "Communication", "status": "completed",
                    "partOf": [{"reference": format!("Communication/{header}")}],
                    "subject": {"reference": subject},
                    "sent": sent.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    "sender": sender, "recipient": [recipient],
                    "payload": [{"contentString": text}]});
                create(http, base, system, body).await
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .count()
        .await;
    println!(
        "seeded {threads} threads ({} messages, {messages} in the big one) with {patients} patients in {:.1} s",
        created,
        t0.elapsed().as_secs_f64()
    );

    // The clinician's tokens, as an EHR launch issues them: one per browser run (each lives 5 min).
    let clinician_tokens: Vec<String> = (0..runs + usize::from(profile))
        .map(|_| {
            tokens
                .issue(&Grant {
                    client_id: courier::smart::launch::WEB_APP_CLIENT.into(),
                    scopes: scopes::parse_all(CLINICIAN_SCOPES).unwrap(),
                    fhir_user: Some(clinician.clone()),
                    patient: None,
                    encounter: None,
                })
                .unwrap()
                .access_token
        })
        .collect();
    // The server's share: the requests the app makes at start and on opening the thread, timed
    // from here (median of 5, the clinician's token), so the browser's figures can be split.
    let mut timings = vec![];
    for (what, path) in [
        (
            "thread list",
            "/Communication?part-of:missing=true&_sort=-_lastUpdated&_count=100".to_string(),
        ),
        (
            "newest replies",
            "/Communication?part-of:missing=false&_sort=-_lastUpdated&_count=200".to_string(),
        ),
        ("unread counts", "/Communication/$unread".to_string()),
        (
            "the big thread's messages",
            format!("/Communication?part-of=Communication/{big}&_sort=sent&_count={messages}"),
        ),
    ] {
        let mut ms = vec![];
        for _ in 0..5 {
            let t = Instant::now();
            let r = http
                .get(format!("{base}{path}"))
                .bearer_auth(&clinician_tokens[0])
                .header("accept", "application/fhir+json")
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            r.bytes().await.unwrap();
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(f64::total_cmp);
        timings.push(format!("{what} {:.0} ms", ms[2]));
    }
    println!(
        "server alone (median of 5 requests): {}",
        timings.join(", ")
    );

    let cfg = json!({
        "base": base, "tokens": clinician_tokens, "fhir_user": clinician, "user_name": CLINICIAN_NAME,
        "threads": threads, "big_thread": big, "big_messages": messages, "runs": runs, "profile": profile,
    });
    let status = tokio::process::Command::new("node")
        .arg(script)
        .arg(cfg.to_string())
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ehr"))
        .kill_on_drop(true)
        .status()
        .await
        .expect("node runs");
    drop(dir);
    std::process::exit(status.code().unwrap_or(1));
}
