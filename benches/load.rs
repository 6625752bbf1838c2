//! Courier load benchmark (not a test): create throughput and inbox-search latency over HTTP.
//!
//!   cargo bench --bench load                         # SQLite, 1,000,000 messages
//!   COURIER_BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test cargo bench --bench load -- --backend postgres
//!   cargo bench --bench load -- --messages 100000     # a smaller store
//!   cargo bench --bench load -- --sync NORMAL         # SQLite synchronous=NORMAL (default FULL)
//!   cargo bench --bench load -- --keep /var/tmp/b1m  # SQLite: keep the store in that directory;
//!                                                     # a later run with the same directory skips the
//!                                                     # creates and the seed and only searches
//!   cargo bench --bench load -- --trace /tmp/t.tsv   # also write each search's start and latency
//!   cargo bench --bench load -- --clients 64         # the concurrent phases with 64 clients (default 32)
//!   cargo bench --bench load -- --resident-mb 16384  # COURIER_SQLITE_RESIDENT_MB: keep the file in memory
//!   cargo bench --bench load -- --keep DIR --idle 900  # the server idles 15 minutes before the searches
//!
//! Prints: creates/s at 1 and at 32 concurrent clients (each create authorized, strictly checked,
//! indexed, encrypted and audited in one transaction), with the process's CPU time per create
//! and, on SQLite, the bytes it wrote per create and the creates per group commit (figures that
//! swing less than throughput with this machine's speed); then inbox search
//! `recipient=…&_sort=-sent&_count=50` p50/p99 over a store of N Communications (seeded through
//! the same store write path, 500 per transaction, each with its AuditEvent), and two inboxes
//! merged (`recipient=a,b`); then an auditor's AuditEvent searches by patient, with and without
//! a `subtype` (which is checked on the bodies).
//!
//! Every request carries a bearer token. The cost of authorization is reported three ways: the
//! per-request token check measured in-process, creates/s with a user token (whose writes are
//! checked against the user's compartment) beside the system token, and the inbox search with the
//! recipient's own user token (the search then also carries the compartment condition).

#[path = "common.rs"]
mod common;
use common::bench_jwks;

use courier::audit;
use courier::auth::tokens::Grant;
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use courier::store::{Incoming, WriteOp};
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    backend: String,
    sync: String,
    messages: usize,
    recipients: usize,
    creates: usize,
    searches: usize,
    clients: usize,
    resident_mb: u64,
    idle_secs: u64,
    keep: Option<std::path::PathBuf>,
    trace: Option<std::path::PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        backend: "sqlite".into(),
        sync: "FULL".into(),
        messages: 1_000_000,
        recipients: 1_000,
        creates: 20_000,
        searches: 2_000,
        clients: 32,
        resident_mb: 0,
        idle_secs: 0,
        keep: None,
        trace: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--backend" => a.backend = val(),
            "--sync" => a.sync = val(),
            "--messages" => a.messages = val().parse().expect("--messages N"),
            "--recipients" => a.recipients = val().parse().expect("--recipients N"),
            "--creates" => a.creates = val().parse().expect("--creates N"),
            "--searches" => a.searches = val().parse().expect("--searches N"),
            "--clients" => a.clients = val().parse().expect("--clients N"),
            "--resident-mb" => a.resident_mb = val().parse().expect("--resident-mb N"),
            "--idle" => a.idle_secs = val().parse().expect("--idle SECONDS"),
            "--keep" => a.keep = Some(val().into()),
            "--trace" => a.trace = Some(val().into()),
            _ => {} // cargo passes --bench
        }
        i += if argv[i].starts_with("--") && !matches!(argv[i].as_str(), "--bench") {
            2
        } else {
            1
        };
    }
    a
}

fn message(recipient: usize, day: usize, minute: usize) -> serde_json::Value {
    json!({
        "resourceType": "Communication",
        "status": "completed",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "notification"}]}],
        "subject": {"reference": format!("Patient/pat-{}", recipient % 5000)},
        "sender": {"reference": "Practitioner/sender-1"},
        "recipient": [{"reference": format!("Practitioner/dr-{recipient}")}],
        "sent": format!("2024-{:02}-{:02}T{:02}:{:02}:00Z", day % 12 + 1, day % 28 + 1, minute / 60 % 24, minute % 60),
        "payload": [{"contentString": "Your lab results are ready. Please log in to the portal to review them."}]
    })
}

/// This process's CPU time (user + system, the load generator's included) and the bytes it has
/// caused to be written to storage, from `/proc/self`: a phase's cost per create, next to its
/// throughput, which this machine's speed swings by 2× between days. Zero where `/proc` is absent.
#[derive(Clone, Copy)]
struct Usage {
    cpu_secs: f64,
    written: u64,
    /// CPU of the local PostgreSQL server's processes (every process named `postgres` this user
    /// may read): it shares the machine's cores with Courier, so a create costs both.
    postgres_cpu_secs: f64,
}

/// utime + stime of a `/proc/<pid>/stat`, in seconds (100 ticks/s).
fn cpu_of(stat: &str) -> f64 {
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // fields[0] is the state (field 3), so utime (14) is at 11 and stime (15) at 12.
    (ticks(11) + ticks(12)) / 100.0
}

fn postgres_cpu_secs() -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "postgres")
        })
        .map(|e| cpu_of(&std::fs::read_to_string(e.path().join("stat")).unwrap_or_default()))
        .sum()
}

impl Usage {
    fn now() -> Usage {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let io = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
        let written = io
            .lines()
            .find_map(|l| l.strip_prefix("write_bytes: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        Usage {
            cpu_secs: cpu_of(&stat),
            written,
            postgres_cpu_secs: postgres_cpu_secs(),
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = args();
    let tmp = tempfile::tempdir().unwrap();
    let dir = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).unwrap();
    // --keep DIR with a store already in it: search that store, skip the creates and the seed.
    let reuse = a.keep.is_some() && a.backend != "postgres" && dir.join("bench.db").exists();
    let database_url = match a.backend.as_str() {
        "postgres" => {
            let url = std::env::var("COURIER_BENCH_POSTGRES_URL")
                .expect("set COURIER_BENCH_POSTGRES_URL for --backend postgres");
            use diesel::{Connection, PgConnection, RunQueryDsl};
            let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
            let mut c = PgConnection::establish(&url).unwrap();
            diesel::sql_query(format!("CREATE SCHEMA {schema}"))
                .execute(&mut c)
                .unwrap();
            eprintln!("(PostgreSQL schema {schema}; drop it afterwards)");
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}options=-csearch_path%3D{schema}")
        }
        _ => format!("sqlite://{}", dir.join("bench.db").display()),
    };
    let settings = Settings {
        listen: "127.0.0.1:0".into(),
        base_url: "http://127.0.0.1:0".into(),
        data_dir: dir.clone(),
        database_url,
        master_key: Some(
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                .to_string()
                .into(),
        ),
        db_pool_size: 16,
        log: "warn".into(),
        sqlite_synchronous: a.sync.clone(),
        sqlite_resident_mb: a.resident_mb,
        // COURIER_WORKERS=N: the HTTP server's worker threads (default one per core).
        workers: std::env::var("COURIER_WORKERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..Settings::default()
    };
    let sync = settings.sqlite_synchronous.clone();
    let app = Application::build(settings).unwrap();
    let base = format!("http://127.0.0.1:{}", app.port());
    let store = app.store.clone();
    let tokens = app.tokens.clone();
    tokio::spawn(app.run_until_stopped());
    let jwks = bench_jwks();
    let client_id = clients::add(
        &store,
        "load benchmark",
        clients::KeySource::Document(jwks),
        "system/Communication.cruds user/Communication.cruds",
    )
    .unwrap();
    let token = |scope: &str, user: Option<String>| {
        tokens
            .issue(&Grant {
                client_id: client_id.clone(),
                scopes: scopes::parse_all(scope).unwrap(),
                fhir_user: user,
                ..Default::default()
            })
            .unwrap()
            .access_token
    };
    let http = |token: String| {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            // Below the server's keep-alive (5 s): a connection it is closing is never reused
            // (each user-token client of the search phase idles ~200 searches between uses).
            .pool_idle_timeout(Duration::from_secs(2))
            .default_headers(h)
            .build()
            .unwrap()
    };
    let client = http(token("system/Communication.cruds", None));
    // The sender of every benchmark message, as a user: its creates are compartment-checked.
    let sender = http(token(
        "user/Communication.cruds",
        Some("Practitioner/sender-1".into()),
    ));
    let backend = if a.backend == "postgres" {
        "postgres".to_string()
    } else {
        match a.resident_mb {
            0 => format!("sqlite (synchronous={sync})"),
            mb => format!("sqlite (synchronous={sync}, resident up to {mb} MiB)"),
        }
    };
    println!(
        "Courier load benchmark — backend {backend}, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // ---- the per-request token check, in-process ----
    {
        let t = token("system/Communication.cruds", None);
        let fresh: Vec<String> = (0..200)
            .map(|_| token("system/Communication.cruds", None))
            .collect();
        let mut uncached: Vec<Duration> = fresh
            .iter()
            .map(|t| {
                let s = Instant::now();
                tokens.verify(t).unwrap();
                s.elapsed()
            })
            .collect();
        let p = tokens.verify(&t).unwrap();
        let mut cached = Vec::new();
        let mut db = Vec::new();
        for _ in 0..2000 {
            let s = Instant::now();
            tokens.verify(&t).unwrap();
            cached.push(s.elapsed());
            let s = Instant::now();
            assert!(tokens.still_valid(&p).unwrap());
            db.push(s.elapsed());
        }
        for v in [&mut uncached, &mut cached, &mut db] {
            v.sort();
        }
        let us = |v: &[Duration]| percentile(v, 0.5).as_secs_f64() * 1e6;
        println!(
            "token check per request (median): signature {:.0} µs on first use, {:.1} µs cached; revocation/client lookup {:.0} µs",
            us(&uncached),
            us(&cached),
            us(&db)
        );
    }

    // ---- creates ----
    let phases = if reuse {
        println!(
            "reusing the store in {} (creates and seed skipped)",
            dir.display()
        );
        vec![]
    } else {
        vec![
            (1usize, "system"),
            (a.clients, "system"),
            (a.clients, "user"),
        ]
    };
    for (clients, who) in phases {
        let client = if who == "user" {
            sender.clone()
        } else {
            client.clone()
        };
        let total = if clients == 1 {
            a.creates / 4
        } else {
            a.creates
        };
        let next = Arc::new(AtomicUsize::new(0));
        let before = Usage::now();
        let groups_before = store.group_commit_stats().0;
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (client, base, next) = (client.clone(), base.clone(), next.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let r = client
                        .post(format!("{base}/Communication"))
                        .header("content-type", "application/fhir+json")
                        .header("prefer", "return=minimal")
                        .body(message(i % 1000, i, i).to_string())
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let after = Usage::now();
        // Each create is one job of a group commit (both backends). The bytes written are this
        // process's on SQLite only (PostgreSQL's are its server's).
        let groups = store.group_commit_stats().0 - groups_before;
        let per_group = format!(
            "; {:.1} creates per group commit",
            total as f64 / groups.max(1) as f64
        );
        let sqlite = if a.backend == "postgres" {
            format!(
                "; PostgreSQL server {:.0} µs CPU per create{per_group}",
                (after.postgres_cpu_secs - before.postgres_cpu_secs) * 1e6 / total as f64
            )
        } else {
            format!(
                ", {:.1} KiB written{per_group}",
                (after.written - before.written) as f64 / 1024.0 / total as f64,
            )
        };
        println!(
            "creates: {clients:>2} client(s), {who} token: {:>7.0} creates/s ({total} creates in {secs:.1} s; per create {:.0} µs CPU of the process, load generator included{sqlite})",
            total as f64 / secs,
            (after.cpu_secs - before.cpu_secs) * 1e6 / total as f64,
        );
    }

    if !reuse {
        // One process holds the server and the load generator, so this is an upper bound on the
        // server's resident size (issue 24's aim: ≤ 150 MB after 100,000 creates).
        let created = 2 * a.creates + a.creates / 4;
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        println!(
            "resident size after {created} creates: {:.0} MiB (server and load generator, one process)",
            rss_kib as f64 / 1024.0
        );
    }

    // ---- seed to N messages through the store's write path ---- (not when searching a kept store)
    if !reuse {
        let have = 2 * a.creates + a.creates / 4;
        let started = Instant::now();
        let ctx = audit::Context {
            request_id: "bench-seed".into(),
            client_address: "127.0.0.1".into(),
            base_url: base.clone(),
            ..Default::default()
        };
        // Four seeders at once: both backends group-commit them (PostgreSQL on two writers).
        let seeded = Arc::new(AtomicUsize::new(have));
        let mut seeders = Vec::new();
        for _ in 0..4 {
            let (store, ctx, seeded) = (store.clone(), ctx.clone(), seeded.clone());
            let (total, recipients) = (a.messages, a.recipients);
            seeders.push(tokio::task::spawn_blocking(move || loop {
                let i = seeded.fetch_add(500, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let n = (total - i).min(500);
                let ops: Vec<WriteOp> = (i..i + n)
                    .map(|k| WriteOp::Create {
                        res_type: "Communication".into(),
                        id: uuid::Uuid::now_v7().to_string(),
                        resource: Incoming::from_value(message(k % recipients, k, k / 7)),
                        if_none_exist: None,
                    })
                    .collect();
                store.write(ops, &ctx).unwrap();
                if (i + n) % 100_000 < 500 {
                    eprintln!(
                        "  seeded {} messages ({:.0}/s)",
                        i + n,
                        (i + n - have) as f64 / started.elapsed().as_secs_f64()
                    );
                }
            }));
        }
        for s in seeders {
            s.await.unwrap();
        }
        println!(
            "seeded {} Communications (+ their AuditEvents) in {:.0} s",
            a.messages,
            started.elapsed().as_secs_f64()
        );
    }

    // --idle N: the server sits idle before the searches, as a store does between bursts of use
    // (a host that reclaims idle file pages has dropped some of its cache by then).
    if a.idle_secs > 0 {
        tokio::time::sleep(Duration::from_secs(a.idle_secs)).await;
        println!(
            "idled {} s before the searches (database file kept resident: {} MiB)",
            a.idle_secs,
            store.resident_bytes() >> 20
        );
    }
    // ---- inbox search: with the system token, then with each recipient's own user token ----
    // (fresh tokens: seeding a large store takes longer than a token lives)
    let client = http(token("system/Communication.cruds", None));
    // "two": two recipients' inboxes merged (`recipient=a,b`), system token, a quarter of the searches.
    for who in ["system", "user", "two"] {
        let searches = if who == "two" {
            a.searches / 4
        } else {
            a.searches
        };
        let mut lat = Vec::with_capacity(searches);
        let phase = Instant::now();
        // --trace FILE: every timed search as "token, start (ms into the phase), latency (ms)"
        let mut trace = a.trace.as_ref().map(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("--trace FILE")
        });
        let mut entries = 0usize;
        let users: Vec<reqwest::Client> = if who == "user" {
            (0..a.recipients.min(200))
                .map(|r| {
                    http(token(
                        "user/Communication.cruds",
                        Some(format!("Practitioner/dr-{r}")),
                    ))
                })
                .collect()
        } else {
            vec![]
        };
        for k in 0..searches + 50 {
            let r = (k * 7919)
                % a.recipients
                    .min(if who == "user" { 200 } else { usize::MAX });
            let client = if who == "user" { &users[r] } else { &client };
            let t = Instant::now();
            let recipients = if who == "two" {
                format!(
                    "Practitioner/dr-{r},Practitioner/dr-{}",
                    (r + a.recipients / 2) % a.recipients
                )
            } else {
                format!("Practitioner/dr-{r}")
            };
            let resp = client
                .get(format!(
                    "{base}/Communication?recipient={recipients}&_sort=-sent&_count=50"
                ))
                .send()
                .await
                .unwrap();
            if resp.status() != 200 {
                panic!(
                    "search answered {}: {}",
                    resp.status(),
                    resp.text().await.unwrap()
                );
            }
            let body = resp.bytes().await.unwrap();
            if k >= 50 {
                let took = t.elapsed();
                lat.push(took);
                if let Some(f) = trace.as_mut() {
                    use std::io::Write;
                    writeln!(
                        f,
                        "{who}\t{:.1}\t{:.3}",
                        (t - phase).as_secs_f64() * 1000.0,
                        took.as_secs_f64() * 1000.0
                    )
                    .expect("--trace FILE");
                }
                entries += body.windows(9).filter(|w| w == b"\"search\":").count();
            }
        }
        lat.sort();
        let (what, token) = if who == "two" {
            ("two inboxes merged (recipient=a,b", "system")
        } else {
            ("inbox search (recipient=…", who)
        };
        println!(
            "{what}&_sort=-sent&_count=50), {token} token, ~{} messages per recipient, {} entries/page avg, over {} Communications: p50 {:.2} ms, p99 {:.2} ms ({searches} requests, 1 client)",
            a.messages / a.recipients,
            entries / searches.max(1),
            a.messages,
            percentile(&lat, 0.50).as_secs_f64() * 1000.0,
            percentile(&lat, 0.99).as_secs_f64() * 1000.0,
        );
    }
    // ---- an auditor's searches: a patient's trail, and its creates (`subtype` is checked on
    // each candidate's body: search::UNSTORED) ----
    let auditor = http(token("system/AuditEvent.rs", None));
    for (what, extra) in [
        ("patient=…", ""),
        ("patient=…&subtype=create", "&subtype=create"),
    ] {
        let mut lat = Vec::with_capacity(a.searches);
        let mut entries = 0usize;
        for k in 0..a.searches + 50 {
            let p = (k * 7919) % a.recipients.min(5000);
            let t = Instant::now();
            let resp = auditor
                .get(format!(
                    "{base}/AuditEvent?patient=Patient/pat-{p}{extra}&_sort=-date&_count=50"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200, "AuditEvent search");
            let body = resp.bytes().await.unwrap();
            if k >= 50 {
                lat.push(t.elapsed());
                entries += body.windows(9).filter(|w| w == b"\"search\":").count();
            }
        }
        lat.sort();
        println!(
            "AuditEvent search ({what}&_sort=-date&_count=50), system token, {} entries/page avg: p50 {:.2} ms, p99 {:.2} ms ({} requests, 1 client)",
            entries / a.searches.max(1),
            percentile(&lat, 0.50).as_secs_f64() * 1000.0,
            percentile(&lat, 0.99).as_secs_f64() * 1000.0,
            a.searches,
        );
    }
}
