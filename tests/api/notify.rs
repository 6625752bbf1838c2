//! Email notices of unread messages (issue 23, first part) against a real SMTP server started by
//! the test (PyPI `aiosmtpd`, its Maildir read back): what arrives (headers, link, unsubscribe),
//! that no PHI is in any of it, a message read in time is not notified, unsubscribing, a mail
//! server that is down then back, and the audit trail.

use crate::ehr::{back_with, launch_as, new_ehr, person, spawn_ehr, standalone, step};
use crate::helpers::*;
use courier::smart::registry;
use serde_json::{json, Value};
use std::time::Duration;

/// A real SMTP server (aiosmtpd) writing what it receives to a Maildir.
struct Smtp {
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl Smtp {
    fn start(port: u16, dir: tempfile::TempDir) -> Option<Smtp> {
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                &format!("127.0.0.1:{port}"),
                "-c",
                "aiosmtpd.handlers.Mailbox",
            ])
            .arg(dir.path().join("mail"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but python3 cannot start aiosmtpd (pip install aiosmtpd)");
            }
            eprintln!("skipped: no python3/aiosmtpd");
            return None;
        };
        let mut s = Smtp {
            dir,
            child: Some(child),
        };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(s);
            }
            if let Some(Ok(Some(_))) = s.child.as_mut().map(|c| c.try_wait()) {
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("CI=true but aiosmtpd is not installed (pip install aiosmtpd)");
                }
                eprintln!("skipped: aiosmtpd did not start");
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("aiosmtpd did not listen on {port}");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every message received, as (headers, body) with headers lower-cased.
    fn received(&self) -> Vec<(Vec<(String, String)>, String)> {
        let new = self.dir.path().join("mail/new");
        let mut out = vec![];
        for e in std::fs::read_dir(new).into_iter().flatten().flatten() {
            let raw = std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .replace("\r\n", "\n");
            let (head, body) = raw.split_once("\n\n").unwrap_or((&raw, ""));
            let mut headers: Vec<(String, String)> = vec![];
            for line in head.lines() {
                if line.starts_with(' ') || line.starts_with('\t') {
                    if let Some(last) = headers.last_mut() {
                        last.1.push_str(line.trim());
                    }
                } else if let Some((k, v)) = line.split_once(':') {
                    headers.push((k.trim().to_lowercase(), v.trim().to_string()));
                }
            }
            let qp = headers.iter().any(|(k, v)| {
                k == "content-transfer-encoding" && v.eq_ignore_ascii_case("quoted-printable")
            });
            out.push((
                headers,
                if qp {
                    quoted_printable(body)
                } else {
                    body.to_string()
                },
            ));
        }
        out
    }

    async fn wait(&self, n: usize) -> Vec<(Vec<(String, String)>, String)> {
        for _ in 0..200 {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{n} emails did not arrive within 20 s (got {})",
            self.received().len()
        );
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        self.stop();
    }
}

/// RFC 2045 §6.7: soft line breaks go, `=XX` is the byte XX.
fn quoted_printable(body: &str) -> String {
    let joined = body.replace("=\n", "");
    let b = joined.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' && i + 2 < b.len() + 0 && i + 2 <= b.len() - 1 {
            if let Ok(x) = u8::from_str_radix(&joined[i + 1..i + 3], 16) {
                out.push(x);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

fn h<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[derive(diesel::QueryableByName, Debug)]
struct Notice {
    #[diesel(sql_type = diesel::sql_types::Text)]
    state: String,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    reason: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Text)]
    about: String,
}

fn notices(app: &TestApp) -> Vec<Notice> {
    app.store
        .query(
            "SELECT state, reason, about FROM notices ORDER BY created_at, id",
            vec![],
        )
        .unwrap()
}

async fn wait_state(app: &TestApp, about: &str, state: &str) -> Notice {
    for _ in 0..150 {
        if let Some(n) = notices(app)
            .into_iter()
            .find(|n| n.about == about && n.state == state)
        {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no {state} notice about {about}: {:?}", notices(app));
}

mod unread_messages_are_notified_by_email_with_no_phi {
    use super::*;

    async fn app(backend: Backend, port: u16) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            s.smtp_url = Some(format!("smtp://127.0.0.1:{port}").into());
            s.notify_after_secs = 2;
            s.clinic_name = "Riverside Clinic".into();
            s.notify_from = "Riverside Clinic <no-reply@riverside.example>".into();
        })
        .await
    }

    // The mail server listens before the app starts (see `a_later_bounce_…`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let port = free_port();
        let Some(smtp) = Smtp::start(port, tempfile::tempdir().unwrap()) else {
            return;
        };
        run(app(Backend::Sqlite, port).await.unwrap(), smtp, port).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let port = free_port();
        let Some(smtp) = Smtp::start(port, tempfile::tempdir().unwrap()) else {
            return;
        };
        match app(Backend::Postgres, port).await {
            Some(a) => run(a, smtp, port).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn run(app: TestApp, mut smtp: Smtp, port: u16) {
        let Some(ehr) = spawn_ehr("ehr-a") else {
            return;
        };
        let mut ada = person("Patient", "a1", &[]);
        ada["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
        ada["telecom"] = json!([{"system": "email", "value": "old@example.org", "use": "old"}, {"system": "phone", "value": "+1 555 0100"}, {"system": "email", "value": "ada@example.org"}]);
        let mut grace = person("Practitioner", "dr-a", &[]);
        grace["name"] = json!([{"given": ["Grace"], "family": "Hopper"}]);
        grace["telecom"] = json!([{"system": "email", "value": "grace@hospital.example"}]);
        ehr.control(reqwest::Method::POST, "seed", Some(json!([ada, grace])))
            .await;
        let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r";
        registry::add(&app.store, &n).unwrap();
        ehr.register_courier(&app, "courier").await;
        // The patient signs in through the portal once (Courier learns her address), the
        // clinician through the EHR.
        ehr.control(
            reqwest::Method::POST,
            "settings",
            Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1"})),
        )
        .await;
        let (to_ehr, cookie) = standalone(&app).await;
        let (_, back, _) = step(&to_ehr).await;
        let (s, page) = back_with(&back.unwrap(), &cookie).await;
        assert_eq!(s, 200, "{page}");
        let patient_session = crate::ehr::session_of(&page);
        let clinician = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let (grace_ref, ada_ref) = (
            clinician["fhirUser"].as_str().unwrap().to_string(),
            clinician["patient"].as_str().unwrap().to_string(),
        );
        let doctor = client_with_token(clinician["access_token"].as_str().unwrap());
        let patient = client_with_token(patient_session["access_token"].as_str().unwrap());
        let write = |text: &str, topic: &str| {
            let body = json!({"resourceType": "Communication", "status": "completed",
                "subject": {"reference": ada_ref}, "sender": {"reference": grace_ref},
                "recipient": [{"reference": ada_ref}], "topic": {"text": topic},
                "payload": [{"contentString": text}]});
            let (c, url) = (doctor.clone(), app.url("Communication"));
            async move {
                let r = c
                    .post(url)
                    .header("prefer", "return=representation")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        // 1. Unread for 2 s: an email to the patient, and only to her (not to the sender).
        let first = write("Your HbA1c is 9.1%, please call us", "Diabetes follow-up").await;
        let mails = smtp.wait(1).await;
        assert_eq!(mails.len(), 1);
        let (headers, body) = &mails[0];
        assert_eq!(h(headers, "to"), Some("ada@example.org"));
        assert_eq!(
            h(headers, "from"),
            Some("\"Riverside Clinic\" <no-reply@riverside.example>").or(h(headers, "from"))
        );
        assert!(h(headers, "from")
            .unwrap()
            .contains("no-reply@riverside.example"));
        assert_eq!(
            h(headers, "subject"),
            Some("New secure message from Riverside Clinic")
        );
        let unsubscribe = h(headers, "list-unsubscribe")
            .expect("List-Unsubscribe")
            .trim_matches(|c| c == '<' || c == '>')
            .to_string();
        assert!(
            unsubscribe.starts_with(&app.url("notify/unsubscribe?t=")),
            "{unsubscribe}"
        );
        assert_eq!(
            h(headers, "list-unsubscribe-post"),
            Some("List-Unsubscribe=One-Click")
        );
        assert!(body.contains(&app.url("smart/launch?ehr=ehr-a")), "{body}");
        wait_state(&app, &format!("Communication/{first}"), "sent").await;

        // 2. Read in the app before it is due: no email.
        let second = write("Appointment moved to Tuesday", "Scheduling").await;
        let r = patient
            .post(app.url(&format!("Communication/{second}/$mark-read")))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let n = wait_state(&app, &format!("Communication/{second}"), "skipped").await;
        assert_eq!(n.reason.as_deref(), Some("read in the app"));

        // 3. The mail server is down: the notice waits and is retried; back up, it arrives once.
        smtp.stop();
        let third = write("Your prescription is ready", "Pharmacy").await;
        // The notice falls due 2 s after the message and the sender looks every 2 s: wait for its
        // first attempt (a fixed sleep raced the sender on a loaded machine), then check it waits.
        let mut pending = None;
        for _ in 0..150 {
            pending = notices(&app)
                .into_iter()
                .find(|n| n.about == format!("Communication/{third}") && n.reason.is_some());
            if pending.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pending =
            pending.unwrap_or_else(|| panic!("no attempt at {third}: {:?}", notices(&app)));
        assert_eq!(pending.state, "pending", "{pending:?}");
        assert!(
            pending
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("could not be reached")),
            "{pending:?}"
        );
        let dir = std::mem::replace(&mut smtp.dir, tempfile::tempdir().unwrap());
        let smtp = Smtp::start(port, dir).unwrap();
        let mails = smtp.wait(2).await;
        wait_state(&app, &format!("Communication/{third}"), "sent").await;
        assert_eq!(mails.len(), 2);

        // 4. Unsubscribing (the page does nothing on GET; one-click POST): no more emails.
        let page = reqwest::get(&unsubscribe)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains("Stop these emails"));
        assert_eq!(
            notices(&app)
                .iter()
                .filter(|n| n.state == "skipped")
                .count(),
            1
        );
        let r = reqwest::Client::new()
            .post(&unsubscribe)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("List-Unsubscribe=One-Click")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let fourth = write("Flu shots available", "Clinic news").await;
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert!(
            notices(&app)
                .iter()
                .all(|n| n.about != format!("Communication/{fourth}")),
            "no notice is even decided"
        );
        assert_eq!(smtp.received().len(), 2);

        // No PHI in any email: no name, no message text, no topic, no birth date, no phone.
        for (headers, body) in smtp.received() {
            let all = format!("{headers:?}\n{body}");
            for phi in [
                "Ada",
                "Lovelace",
                "Grace",
                "Hopper",
                "HbA1c",
                "9.1%",
                "Diabetes",
                "prescription",
                "Pharmacy",
                "Tuesday",
                "555 0100",
                &ada_ref,
                &grace_ref,
            ] {
                assert!(!all.contains(phi), "'{phi}' in an email: {all}");
            }
        }
        // Each sent notice is audited: who was told, about which message; never the address.
        let audits = app
            .get_json(&format!(
                "AuditEvent?subtype={}|email-notice",
                courier::notify::NOTICE_SYSTEM
            ))
            .await;
        assert_eq!(ids(&audits).len(), 2, "{audits}");
        assert!(!audits.to_string().contains("ada@example.org"));
        assert!(audits
            .to_string()
            .contains(&format!("Communication/{first}")));
        // The address is sealed at rest.
        #[derive(diesel::QueryableByName)]
        struct Sealed {
            #[diesel(sql_type = diesel::sql_types::Binary)]
            sealed: Vec<u8>,
        }
        let rows: Vec<Sealed> = app
            .store
            .query("SELECT sealed FROM notify_contacts", vec![])
            .unwrap();
        assert_eq!(rows.len(), 2, "the patient's and the clinician's");
        assert!(rows
            .iter()
            .all(|r| !String::from_utf8_lossy(&r.sealed).contains("example")));
        // Erasing the patient takes her address, choices and notices with her.
        let r = app
            .client
            .post(app.url(&format!("{ada_ref}/$erase")))
            .send()
            .await
            .unwrap();
        if r.status().is_success() {
            assert!(notices(&app)
                .iter()
                .all(|n| n.about != format!("Communication/{first}")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_cut_off_mid_send_is_never_sent_twice() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    // A row an instance claimed and then died with (its lease ran out while `sending`), and one
    // still leased by a live instance.
    let t = chrono::Utc::now().timestamp();
    for (id, lease) in [("cut-off", t - 5), ("in-flight", t + 60)] {
        app.store.execute(
            "INSERT INTO notices (id, person, kind, about, state, attempts, next_attempt_at, lease_owner, lease_until, created_at) VALUES (?, 'Patient/x', 'new-message', 'Communication/c', 'sending', 1, ?, 'gone', ?, ?)",
            vec![id.into(), t.into(), lease.into(), t.into()],
        ).unwrap();
    }
    courier::notify::run(&app.store, &courier::config::Settings::default()).unwrap();
    let states: Vec<Notice> = app
        .store
        .query(
            "SELECT state, reason, id AS about FROM notices ORDER BY id",
            vec![],
        )
        .unwrap();
    assert_eq!(states[0].about, "cut-off");
    assert_eq!(
        states[0].state, "uncertain",
        "whether it went out is unknown: never sent again"
    );
    assert!(states[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("may or may not"));
    assert_eq!(states[1].state, "sending", "a live lease is left alone");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(["notify", "status"])
        .env("COURIER_DATA_DIR", app.dir.path())
        .env("COURIER_DATABASE_URL", &app.database_url)
        .env(
            "COURIER_MASTER_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .env("COURIER_LOG", "error")
        .output()
        .unwrap();
    let (ok, out, err) = (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("uncertain\t1") && out.contains("sending\t1"),
        "{out}"
    );
}

/// An SMS provider stand-in with the Twilio Messages API shape: checks each request as the
/// provider documents it (path, HTTP Basic auth, form fields, E.164 numbers, length) and answers
/// like it: 201 with a `sid`, or 400 with `code` 21211 for a number it cannot reach.
#[derive(Clone, Default)]
struct SmsProvider {
    got: std::sync::Arc<parking_lot::Mutex<Vec<Vec<(String, String)>>>>,
    problems: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
}

/// Settings pointing Courier at the stand-in (its account, token and sending number).
fn with_sms_provider(s: &mut courier::config::Settings, url: String) {
    s.sms_url = Some(url);
    s.sms_account = "AC0123456789".into();
    s.sms_token = Some("sms-secret-token".to_string().into());
    s.sms_from = "+15557654321".into();
}

async fn sms_provider() -> (SmsProvider, String) {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    use base64::Engine;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let p = SmsProvider::default();
    let shared = p.clone();
    let server = HttpServer::new(move || {
        let p = shared.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let p = p.clone();
            async move {
                let mut bad = vec![];
                if req.method() != "POST" || req.path() != "/2010-04-01/Accounts/AC0123456789/Messages.json" {
                    bad.push(format!("wrong request {} {}", req.method(), req.path()));
                }
                let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
                let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("AC0123456789:sms-secret-token"));
                if auth != want {
                    bad.push("wrong or missing HTTP Basic auth".into());
                }
                if !req.headers().get("content-type").is_some_and(|v| v.to_str().unwrap_or("").starts_with("application/x-www-form-urlencoded")) {
                    bad.push("not a form".into());
                }
                let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
                let f = |k: &str| form.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
                let e164 = |v: &str| v.starts_with('+') && v[1..].chars().all(|c| c.is_ascii_digit()) && (9..=16).contains(&v.len());
                if !e164(&f("To")) || !e164(&f("From")) {
                    bad.push(format!("To/From not E.164: {:?}", form));
                }
                if f("Body").is_empty() || f("Body").chars().count() > 1600 {
                    bad.push("Body empty or over 1600 characters".into());
                }
                let unreachable = f("To") == "+15550000000";
                p.got.lock().push(form);
                if !bad.is_empty() {
                    p.problems.lock().extend(bad);
                    return HttpResponse::BadRequest().json(json!({"code": 20001, "message": "bad request", "status": 400}));
                }
                if unreachable {
                    return HttpResponse::BadRequest().json(json!({"code": 21211, "message": "The 'To' number +15550000000 is not a valid phone number.", "status": 400}));
                }
                HttpResponse::Created().json(json!({"sid": format!("SM{}", uuid::Uuid::new_v4().simple()), "status": "queued"}))
            }
        }))
    })
    .workers(1)
    .listen(l)
    .unwrap()
    .run();
    tokio::spawn(server);
    (p, url)
}

mod unread_messages_are_notified_by_sms_through_the_provider_api {
    use super::*;

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
            s.notify_after_secs = 1;
            s.clinic_name = "Riverside Clinic".into();
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        let Some(ehr) = spawn_ehr("ehr-a") else {
            return;
        };
        let mut ada = person("Patient", "a1", &[]);
        ada["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
        ada["telecom"] = json!([{"system": "phone", "value": "+44 20 7946 0000", "use": "home"}, {"system": "phone", "value": "+1 (555) 010-0199", "use": "mobile"}]);
        let mut bob = person("Patient", "b2", &[]);
        bob["telecom"] = json!([{"system": "sms", "value": "+1 555 000 0000"}]);
        let grace = person("Practitioner", "dr-a", &[]);
        ehr.control(
            reqwest::Method::POST,
            "seed",
            Some(json!([ada, bob, grace])),
        )
        .await;
        let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r";
        registry::add(&app.store, &n).unwrap();
        ehr.register_courier(&app, "courier").await;
        // Launches with each patient in context: Courier reads their records (and mobiles).
        let with_ada = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let with_bob = launch_as(&app, &ehr, "b2", "Practitioner/dr-a").await;
        let doctor = client_with_token(with_ada["access_token"].as_str().unwrap());
        let grace_ref = with_ada["fhirUser"].as_str().unwrap().to_string();
        let mut sent = vec![];
        for patient in [
            with_ada["patient"].as_str().unwrap(),
            with_bob["patient"].as_str().unwrap(),
        ] {
            let c = if patient == with_ada["patient"].as_str().unwrap() {
                doctor.clone()
            } else {
                client_with_token(with_bob["access_token"].as_str().unwrap())
            };
            let body = json!({"resourceType": "Communication", "status": "completed",
                "subject": {"reference": patient}, "sender": {"reference": grace_ref},
                "recipient": [{"reference": patient}], "payload": [{"contentString": "Your biopsy results are back"}]});
            let r = c
                .post(app.url("Communication"))
                .header("prefer", "return=representation")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            sent.push(
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let ok = wait_state(&app, &format!("Communication/{}", sent[0]), "sent").await;
        assert!(ok.reason.is_none());
        // The provider's 4xx for a number it cannot reach: parked with its reason, not retried.
        let parked = wait_state(&app, &format!("Communication/{}", sent[1]), "parked").await;
        assert!(
            parked.reason.as_deref().unwrap().contains("21211"),
            "{parked:?}"
        );
        assert!(
            provider.problems.lock().is_empty(),
            "{:?}",
            provider.problems.lock()
        );
        let got = provider.got.lock().clone();
        assert_eq!(
            got.len(),
            2,
            "one request each, no retry of a refusal: {got:?}"
        );
        let to_ada = got
            .iter()
            .find(|f| f.iter().any(|(k, v)| k == "To" && v == "+15550100199"))
            .expect("to Ada's mobile, not her home phone");
        let text = &to_ada.iter().find(|(k, _)| k == "Body").unwrap().1;
        assert!(
            text.starts_with("Riverside Clinic: you have a new secure message."),
            "{text}"
        );
        assert!(text.contains(&app.url("smart/launch?ehr=ehr-a")));
        for phi in ["Ada", "Lovelace", "biopsy", "results"] {
            assert!(!format!("{got:?}").contains(phi), "'{phi}' sent by SMS");
        }
        let audits = app
            .get_json(&format!(
                "AuditEvent?subtype={}|sms-notice",
                courier::notify::NOTICE_SYSTEM
            ))
            .await;
        assert_eq!(ids(&audits).len(), 2, "sent and parked are both audited");
        assert!(
            !audits.to_string().contains("5550100199"),
            "no number in the audit trail"
        );
        // A medication reminder asked for by SMS (CommunicationRequest.medium SMSWRIT): when the
        // scheduler sends it, it goes by SMS at once too, saying only that there is a reminder.
        let ada_ref = with_ada["patient"].as_str().unwrap();
        let cr = json!({"resourceType": "CommunicationRequest", "status": "active", "priority": "routine",
            "subject": {"reference": ada_ref}, "recipient": [{"reference": ada_ref}], "requester": {"reference": grace_ref},
            "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "code": "SMSWRIT"}]}],
            "payload": [{"contentString": "Take 500 mg metformin with breakfast"}],
            "occurrenceDateTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)});
        let r = doctor
            .post(app.url("CommunicationRequest"))
            .json(&cr)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let mut reminder = None;
        for _ in 0..150 {
            if let Some(f) = provider.got.lock().iter().find(|f| {
                f.iter()
                    .any(|(k, v)| k == "Body" && v.contains("a reminder"))
            }) {
                reminder = Some(f.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reminder = reminder.expect("the reminder went by SMS");
        assert!(reminder
            .iter()
            .any(|(k, v)| k == "To" && v == "+15550100199"));
        assert!(
            !format!("{reminder:?}").contains("metformin"),
            "no PHI in the reminder"
        );
        #[derive(diesel::QueryableByName)]
        struct K {
            #[diesel(sql_type = diesel::sql_types::Text)]
            kind: String,
        }
        // The provider answered; the notice is marked sent just after.
        let mut kinds: Vec<K> = vec![];
        for _ in 0..50 {
            kinds = app
                .store
                .query("SELECT kind FROM notices WHERE state = 'sent'", vec![])
                .unwrap();
            if kinds.iter().any(|k| k.kind == "reminder") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(kinds.iter().any(|k| k.kind == "reminder"));
        // The backlog and failures show on /metrics.
        let m = app
            .client
            .get(app.url("metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(m.contains("courier_notices{state=\"parked\"} 1"), "{m}");
        assert!(m.contains("courier_notices{state=\"sent\"} 2"), "{m}");
        assert!(m.contains("courier_notices_oldest_pending_seconds"), "{m}");
    }
}

mod preferences_and_quiet_hours {
    use super::*;

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
            s.notify_after_secs = 1;
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn put(c: &reqwest::Client, app: &TestApp, body: Value) -> (u16, Value) {
        let r = c
            .put(app.url("notify/preferences"))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        let Some(ehr) = spawn_ehr("ehr-a") else {
            return;
        };
        let mut ada = person("Patient", "a1", &[]);
        ada["telecom"] = json!([{"system": "sms", "value": "+1 555 010 0199"}]);
        let mut grace = person("Practitioner", "dr-a", &[]);
        grace["telecom"] = json!([{"system": "phone", "use": "mobile", "value": "+15550100277"}]);
        let mut alan = person("Practitioner", "dr-b", &[]);
        alan["telecom"] = json!([{"system": "phone", "use": "mobile", "value": "+15550100388"}]);
        ehr.control(
            reqwest::Method::POST,
            "seed",
            Some(json!([ada, grace, alan])),
        )
        .await;
        let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r";
        registry::add(&app.store, &n).unwrap();
        ehr.register_courier(&app, "courier").await;
        ehr.control(
            reqwest::Method::POST,
            "settings",
            Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1"})),
        )
        .await;
        let (to_ehr, cookie) = standalone(&app).await;
        let (_, back, _) = step(&to_ehr).await;
        let (_, page) = back_with(&back.unwrap(), &cookie).await;
        let ada_s = crate::ehr::session_of(&page);
        let grace_s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let alan_s = launch_as(&app, &ehr, "a1", "Practitioner/dr-b").await;
        let (ada_c, grace_c, alan_c) = (
            client_with_token(ada_s["access_token"].as_str().unwrap()),
            client_with_token(grace_s["access_token"].as_str().unwrap()),
            client_with_token(alan_s["access_token"].as_str().unwrap()),
        );
        let (ada_ref, grace_ref, alan_ref) = (
            ada_s["fhirUser"].as_str().unwrap().to_string(),
            grace_s["fhirUser"].as_str().unwrap().to_string(),
            alan_s["fhirUser"].as_str().unwrap().to_string(),
        );
        // What the person sees: the channels their record gives, masked; none turned off.
        let mut got: Value = ada_c
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(got["push"]["public_key"].is_string(), "{got}");
        got["push"]["public_key"] = json!("…");
        assert_eq!(
            got,
            json!({"email": {"to": null, "on": false}, "sms": {"to": "••• 0199", "on": true},
            "push": {"devices": 0, "public_key": "…"},
            "kinds": {"new-message": true, "reminder": true}, "digest_minutes": 0, "language": null,
            "quiet": null, "languages": [{"code": "en", "name": "English"}, {"code": "es", "name": "Español"}],
            "default_language": "en"})
        );
        // Bad input: 400 with an OperationOutcome, and nothing changes.
        for bad in [
            json!({"quiet": {"from": "25:00", "to": "07:00", "time_zone": "Europe/London"}}),
            json!({"quiet": {"from": "22:00", "to": "07:00", "time_zone": "Mars/Olympus"}}),
            json!({"quiet": {"from": "22:00", "to": "22:00", "time_zone": "UTC"}}),
            json!({"sms": {"on": "no"}}),
            json!({"kinds": {"sms": false}}),
            json!({"kinds": {"reminder": "off"}}),
            json!({"digest_minutes": 5000}),
        ] {
            let (s, o) = put(&ada_c, &app, bad.clone()).await;
            assert_eq!(s, 400, "{bad}: {o}");
            assert_eq!(o["resourceType"], "OperationOutcome");
        }
        let mut again: Value = ada_c
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        again["push"]["public_key"] = json!("…");
        assert_eq!(again, got);
        // An integrator's token is nobody's: no preferences.
        assert_eq!(
            app.client
                .get(app.url("notify/preferences"))
                .send()
                .await
                .unwrap()
                .status(),
            403
        );
        assert_eq!(
            app.anonymous
                .get(app.url("notify/preferences"))
                .send()
                .await
                .unwrap()
                .status(),
            401
        );

        // Quiet hours that hold now (in UTC: from an hour ago to two hours ahead), for Ada and Alan.
        let now = chrono::Utc::now();
        let hm = |d: chrono::DateTime<chrono::Utc>| d.format("%H:%M").to_string();
        let quiet = json!({"quiet": {"from": hm(now - chrono::Duration::hours(1)), "to": hm(now + chrono::Duration::hours(2)), "time_zone": "UTC"}});
        for c in [&ada_c, &alan_c] {
            let (s, v) = put(c, &app, quiet.clone()).await;
            assert_eq!(s, 200, "{v}");
            assert_eq!(v["quiet"]["time_zone"], "UTC");
        }
        let send = |c: &reqwest::Client, body: Value| {
            let (c, url) = (c.clone(), app.url("Communication"));
            async move {
                let r = c
                    .post(url)
                    .header("prefer", "return=representation")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
                r.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        // A routine message to Ada waits for the end of her quiet hours.
        let routine = send(&grace_c, json!({"resourceType": "Communication", "status": "completed", "subject": {"reference": ada_ref},
            "sender": {"reference": grace_ref}, "recipient": [{"reference": ada_ref}], "payload": [{"contentString": "Routine"}]})).await;
        // An urgent message to Alan, a clinician, breaks through his.
        let urgent = send(&grace_c, json!({"resourceType": "Communication", "status": "completed", "priority": "urgent", "subject": {"reference": ada_ref},
            "sender": {"reference": grace_ref}, "recipient": [{"reference": alan_ref}], "payload": [{"contentString": "Urgent"}]})).await;
        wait_state(&app, &format!("Communication/{urgent}"), "sent").await;
        let waiting = notices(&app)
            .into_iter()
            .find(|n| n.about == format!("Communication/{routine}"))
            .unwrap();
        assert_eq!(
            (waiting.state.as_str(), waiting.reason.as_deref()),
            ("pending", Some("quiet hours")),
            "{waiting:?}"
        );
        assert_eq!(provider.got.lock().len(), 1, "only the urgent one went out");
        assert!(provider.got.lock()[0]
            .iter()
            .any(|(k, v)| k == "To" && v == "+15550100388"));
        // Turning SMS off: a new message makes no notice at all.
        let (s, v) = put(&ada_c, &app, json!({"sms": {"on": false}, "quiet": null})).await;
        assert_eq!(s, 200);
        assert_eq!(v["sms"]["on"], false);
        assert!(v["quiet"].is_null());
        let later = send(&grace_c, json!({"resourceType": "Communication", "status": "completed", "subject": {"reference": ada_ref},
            "sender": {"reference": grace_ref}, "recipient": [{"reference": ada_ref}], "payload": [{"contentString": "Later"}]})).await;
        assert!(notices(&app)
            .iter()
            .all(|n| n.about != format!("Communication/{later}")));
    }
}

mod escalations_reach_the_on_call_phone {
    use super::*;

    const ON_CALL: &str = "Practitioner/0c0a1111-2222-4333-8444-555566667777";

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
            s.notify_after_secs = 3600;
            s.escalation_renotify_secs = 1;
            s.escalation_after_secs = 2;
            s.escalation_backup = Some(ON_CALL.into());
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        // The on-call clinician's mobile (as a launch would have read it from the EHR), and quiet
        // hours all day: an escalation breaks through them.
        courier::notify::remember_contacts(
            &app.store,
            ON_CALL,
            &json!({"telecom": [{"system": "sms", "value": "+15550100466"}]}),
        )
        .unwrap();
        app.store.execute(
            "INSERT INTO notify_prefs (person, email_off, sms_off, unsubscribe, quiet_from, quiet_to, time_zone, updated_at) VALUES (?, 0, 0, 'tok-on-call', '00:00', '23:59', 'UTC', 0)",
            vec![ON_CALL.into()],
        ).unwrap();
        let Some(ehr) = spawn_ehr("ehr-a") else {
            return;
        };
        ehr.control(
            reqwest::Method::POST,
            "seed",
            Some(json!([
                person("Patient", "a1", &[]),
                person("Practitioner", "dr-a", &[])
            ])),
        )
        .await;
        let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r";
        registry::add(&app.store, &n).unwrap();
        ehr.register_courier(&app, "courier").await;
        let s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let (grace, ada) = (
            s["fhirUser"].as_str().unwrap(),
            s["patient"].as_str().unwrap(),
        );
        let body = json!({"resourceType": "Communication", "status": "completed", "priority": "stat",
            "subject": {"reference": ada}, "sender": {"reference": grace}, "recipient": [{"reference": ada}],
            "payload": [{"contentString": "Potassium 6.8, go to the emergency department"}]});
        let r = client_with_token(s["access_token"].as_str().unwrap())
            .post(app.url("Communication"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let mut got = None;
        for _ in 0..150 {
            if let Some(f) = provider
                .got
                .lock()
                .iter()
                .find(|f| f.iter().any(|(k, v)| k == "To" && v == "+15550100466"))
            {
                got = Some(f.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sms = got.expect("the on-call clinician's phone was told");
        let text = &sms.iter().find(|(k, _)| k == "Body").unwrap().1;
        assert!(text.contains("urgent message is waiting"), "{text}");
        assert!(
            !text.contains("Potassium") && !text.contains("6.8"),
            "no PHI: {text}"
        );
        // Once per escalation, however often its request is updated with reminders.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let to_on_call = provider
            .got
            .lock()
            .iter()
            .filter(|f| f.iter().any(|(k, v)| k == "To" && v == "+15550100466"))
            .count();
        assert_eq!(to_on_call, 1);
    }
}

/// Two instances on one PostgreSQL database, both running the notice worker: every notice is
/// sent exactly once (the claim is one UPDATE … RETURNING under a lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_send_each_notice_once() {
    let (provider, url) = sms_provider().await;
    let with_sms = move |url: String| {
        move |s: &mut courier::config::Settings| {
            with_sms_provider(s, url.clone());
            s.notify_after_secs = 1;
        }
    };
    let Some(first) = spawn_app_with(Backend::Postgres, with_sms(url.clone())).await else {
        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
        return;
    };
    let db = first.database_url.clone();
    let tweak = with_sms(url);
    let second = spawn_app_with(Backend::Postgres, move |s| {
        tweak(s);
        s.database_url = db;
    })
    .await
    .unwrap();
    let patients: Vec<String> = (0..5)
        .map(|i| format!("Patient/0c0a1111-2222-4333-8444-00000000000{i}"))
        .collect();
    for (i, p) in patients.iter().enumerate() {
        courier::notify::remember_contacts(
            &first.store,
            p,
            &json!({"telecom": [{"system": "sms", "value": format!("+1555010050{i}")}]}),
        )
        .unwrap();
    }
    // 40 messages, written through both instances.
    for k in 0..40 {
        let app = if k % 2 == 0 { &first } else { &second };
        let p = &patients[k % patients.len()];
        app.create(&message(p, "2026-12-06T10:00:00Z", &format!("message {k}")))
            .await;
    }
    for _ in 0..200 {
        let sent = notices(&first).iter().filter(|n| n.state == "sent").count();
        if sent == 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states: Vec<String> = notices(&first).into_iter().map(|n| n.state).collect();
    assert_eq!(
        states.iter().filter(|s| *s == "sent").count(),
        40,
        "{states:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        provider.got.lock().len(),
        40,
        "each notice exactly once across the two instances"
    );
}

mod a_person_changes_their_number_with_a_code_sent_to_it {
    use super::*;

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn portal(app: &TestApp) -> reqwest::Client {
        let (to_ehr, cookie) = standalone(app).await;
        let (_, back, _) = step(&to_ehr).await;
        let (_, page) = back_with(&back.unwrap(), &cookie).await;
        client_with_token(
            crate::ehr::session_of(&page)["access_token"]
                .as_str()
                .unwrap(),
        )
    }

    async fn post(c: &reqwest::Client, app: &TestApp, path: &str, body: Value) -> (u16, Value) {
        let r = c.post(app.url(path)).json(&body).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        let Some(ehr) = spawn_ehr("ehr-a") else {
            return;
        };
        let mut ada = person("Patient", "a1", &[]);
        ada["telecom"] = json!([{"system": "sms", "value": "+15550100199"}]);
        ehr.control(reqwest::Method::POST, "seed", Some(json!([ada])))
            .await;
        let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch launch/patient online_access patient/Patient.r";
        registry::add(&app.store, &n).unwrap();
        ehr.register_courier(&app, "courier").await;
        ehr.control(
            reqwest::Method::POST,
            "settings",
            Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1"})),
        )
        .await;
        let ada_c = portal(&app).await;
        // Bad input: refused in words, nothing sent.
        for (body, what) in [
            (
                json!({"kind": "fax", "value": "+15550100222"}),
                "contact.kind",
            ),
            (json!({"kind": "sms", "value": "12345"}), "contact.value"),
            (
                json!({"kind": "email", "value": "not an address"}),
                "contact.value",
            ),
            (
                json!({"kind": "email", "value": "ada@example.org"}),
                "contact.kind",
            ),
        ] {
            let (s, o) = post(&ada_c, &app, "notify/contacts", body.clone()).await;
            assert_eq!(s, 400, "{body}: {o}");
            assert_eq!(o["issue"][0]["expression"][0], what, "{o}");
        }
        assert!(provider.got.lock().is_empty());
        // A new number: a code is sent to it, and the old one stays until the code comes back.
        let (s, v) = post(
            &ada_c,
            &app,
            "notify/contacts",
            json!({"kind": "sms", "value": "+1 (555) 010-0222"}),
        )
        .await;
        assert_eq!(s, 202, "{v}");
        assert_eq!(v["pending"], "••• 0222");
        let got = provider.got.lock().clone();
        assert_eq!(got.len(), 1);
        assert!(got[0].iter().any(|(k, v)| k == "To" && v == "+15550100222"));
        let body = got[0].iter().find(|(k, _)| k == "Body").unwrap().1.clone();
        let code: String = body
            .split("code is ")
            .nth(1)
            .unwrap()
            .chars()
            .take(6)
            .collect();
        let prefs: Value = ada_c
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            prefs["sms"]["to"], "••• 0199",
            "the old number until the code comes back"
        );
        let wrong = if code == "000000" { "111111" } else { "000000" };
        let (s, o) = post(
            &ada_c,
            &app,
            "notify/contacts/verify",
            json!({"kind": "sms", "code": wrong}),
        )
        .await;
        assert_eq!(s, 400, "{o}");
        let (s, v) = post(
            &ada_c,
            &app,
            "notify/contacts/verify",
            json!({"kind": "sms", "code": code}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["sms"]["to"], "••• 0222");
        // The code is used up, and the EHR's next launch does not put the old number back.
        let (s, _) = post(
            &ada_c,
            &app,
            "notify/contacts/verify",
            json!({"kind": "sms", "code": code}),
        )
        .await;
        assert_eq!(s, 400);
        let again = portal(&app).await;
        let prefs: Value = again
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(prefs["sms"]["to"], "••• 0222");
        // Guessing: five tries, then the code is gone. (A new code waits a minute after the last.)
        app.store
            .execute(
                "UPDATE notify_pending_contacts SET expires_at = expires_at - 120",
                vec![],
            )
            .unwrap();
        let (s, _) = post(
            &ada_c,
            &app,
            "notify/contacts",
            json!({"kind": "sms", "value": "+15550100333"}),
        )
        .await;
        assert_eq!(s, 202);
        let (s, _) = post(
            &ada_c,
            &app,
            "notify/contacts",
            json!({"kind": "sms", "value": "+15550100444"}),
        )
        .await;
        assert_eq!(s, 429, "one code a minute");
        let sent = provider
            .got
            .lock()
            .iter()
            .rev()
            .find(|f| f.iter().any(|(k, v)| k == "To" && v == "+15550100333"))
            .unwrap()
            .iter()
            .find(|(k, _)| k == "Body")
            .unwrap()
            .1
            .clone();
        let right: String = sent
            .split("code is ")
            .nth(1)
            .unwrap()
            .chars()
            .take(6)
            .collect();
        let wrong = if right == "000000" {
            "111111"
        } else {
            "000000"
        };
        for _ in 0..5 {
            post(
                &ada_c,
                &app,
                "notify/contacts/verify",
                json!({"kind": "sms", "code": wrong}),
            )
            .await;
        }
        let (s, o) = post(
            &ada_c,
            &app,
            "notify/contacts/verify",
            json!({"kind": "sms", "code": right}),
        )
        .await;
        assert_eq!(s, 400, "the right code after five wrong ones: {o}");
        let prefs: Value = again
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(prefs["sms"]["to"], "••• 0222");
    }
}

mod members_of_a_group_are_each_notified {
    use super::*;

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
            s.notify_after_secs = 1;
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        // The nurse line: two nurses and the doctor who writes to it.
        let (n1, n2) = (
            "Practitioner/0c0a1111-2222-4333-8444-0000000000a1",
            "Practitioner/0c0a1111-2222-4333-8444-0000000000a2",
        );
        courier::notify::remember_contacts(
            &app.store,
            n1,
            &json!({"telecom": [{"system": "sms", "value": "+15550100701"}]}),
        )
        .unwrap();
        courier::notify::remember_contacts(
            &app.store,
            n2,
            &json!({"telecom": [{"system": "sms", "value": "+15550100702"}]}),
        )
        .unwrap();
        courier::notify::remember_contacts(
            &app.store,
            "Practitioner/dr-1",
            &json!({"telecom": [{"system": "sms", "value": "+15550100703"}]}),
        )
        .unwrap();
        let group = json!({"resourceType": "Group", "id": "nurse-line", "type": "practitioner", "actual": true,
            "member": [{"entity": {"reference": n1}}, {"entity": {"reference": n2}}, {"entity": {"reference": "Practitioner/dr-1"}}]});
        let r = app.put("Group/nurse-line", &group).await;
        assert!(r.status().is_success(), "{}", r.status());
        let id = app
            .create(&message(
                "Group/nurse-line",
                "2026-12-06T10:00:00Z",
                "Please call Mrs Lovelace back",
            ))
            .await;
        for _ in 0..150 {
            if provider.got.lock().len() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let to: Vec<String> = provider
            .got
            .lock()
            .iter()
            .filter_map(|f| f.iter().find(|(k, _)| k == "To").map(|(_, v)| v.clone()))
            .collect();
        let mut sorted = to.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            ["+15550100701", "+15550100702"],
            "each member once, never the sender"
        );
        let states: Vec<Notice> = notices(&app)
            .into_iter()
            .filter(|n| n.about == format!("Communication/{id}"))
            .collect();
        assert!(states.iter().any(|n| n.state == "expanded"), "{states:?}");
        assert_eq!(
            states.iter().filter(|n| n.state == "sent").count(),
            2,
            "{states:?}"
        );
    }
}

mod digests_and_kinds_turned_off {
    use super::*;

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
            s.notify_after_secs = 2;
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        let ada = "Patient/0c0a1111-2222-4333-8444-0000000000d1";
        courier::notify::remember_contacts(
            &app.store,
            ada,
            &json!({"telecom": [{"system": "sms", "value": "+15550100801"}]}),
        )
        .unwrap();
        // As the app would set them: a digest at most once an hour, no reminders.
        let token = issue(
            &app.tokens,
            &app.admin_client_id,
            "patient/Communication.rs",
            Some(ada),
            Some(ada.strip_prefix("Patient/").unwrap()),
        );
        let c = client_with_token(&token);
        let r = c
            .put(app.url("notify/preferences"))
            .json(&json!({"digest_minutes": 60, "kinds": {"reminder": false}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["digest_minutes"].clone(), v["kinds"]["reminder"].clone()),
            (json!(60), json!(false))
        );
        for k in 0..3 {
            app.create(&message(
                ada,
                "2026-12-06T10:00:00Z",
                &format!("message {k}"),
            ))
            .await;
        }
        for _ in 0..100 {
            if !provider.got.lock().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let got = provider.got.lock().clone();
        assert_eq!(got.len(), 1, "one notice for the three: {got:?}");
        let body = &got[0].iter().find(|(k, _)| k == "Body").unwrap().1;
        assert!(body.contains("3 new secure messages"), "{body}");
        // A fourth within the hour waits for the digest.
        let fourth = app
            .create(&message(ada, "2026-12-06T10:05:00Z", "message 4"))
            .await;
        let n = {
            let mut found = None;
            for _ in 0..100 {
                found = notices(&app).into_iter().find(|n| {
                    n.about == format!("Communication/{fourth}")
                        && n.reason.as_deref() == Some("digest")
                });
                if found.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            found.expect("the fourth waits for the digest")
        };
        assert_eq!(n.state, "pending");
        assert_eq!(provider.got.lock().len(), 1);
        // Reminders turned off: a scheduled reminder by SMS makes no notice.
        let cr = json!({"resourceType": "Communication", "status": "completed", "recipient": [{"reference": ada}],
            "sender": {"reference": "Practitioner/dr-1"}, "basedOn": [{"reference": "CommunicationRequest/x"}],
            "medium": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode", "code": "SMSWRIT"}]}],
            "payload": [{"contentString": "Take your medicine"}]});
        let reminder = app.create(&cr).await;
        assert!(
            notices(&app)
                .iter()
                .all(|n| n.about != format!("Communication/{reminder}")),
            "no reminder notice"
        );
    }
}

/// A push service stand-in (RFC 8030 §5): records each push message request and answers with
/// the status set for its path (201 unless told otherwise).
#[derive(Clone, Default)]
struct PushService {
    got: std::sync::Arc<parking_lot::Mutex<Vec<(String, Vec<(String, String)>, Vec<u8>)>>>,
    answer: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<String, u16>>>,
}

async fn push_service() -> (PushService, String) {
    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
    let p = PushService::default();
    let shared = p.clone();
    let server = HttpServer::new(move || {
        let p = shared.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let p = p.clone();
            async move {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_lowercase(),
                            v.to_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect();
                let path = req.path().to_string();
                p.got.lock().push((path.clone(), headers, body.to_vec()));
                let status = p.answer.lock().get(&path).copied().unwrap_or(201);
                HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap())
                    .insert_header(("location", format!("{path}/msg/1")))
                    .finish()
            }
        }))
    })
    .workers(1)
    .listen(l)
    .unwrap()
    .run();
    tokio::spawn(server);
    (p, url)
}

/// A browser's push subscription keys (what `PushManager.subscribe` makes): its P-256 key pair
/// and 16-byte auth secret.
struct BrowserKeys {
    secret: p256::SecretKey,
    auth: [u8; 16],
}

impl BrowserKeys {
    fn new() -> BrowserKeys {
        use rand::RngCore;
        let mut auth = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut auth);
        BrowserKeys {
            secret: p256::SecretKey::random(&mut rand::rngs::OsRng),
            auth,
        }
    }

    fn public(&self) -> Vec<u8> {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    fn subscription(&self, endpoint: &str) -> Value {
        use base64::Engine;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        json!({"endpoint": endpoint, "expirationTime": null,
            "keys": {"p256dh": b.encode(self.public()), "auth": b.encode(self.auth)}})
    }

    /// Decrypts a push message body as a browser does, written here from RFC 8291 §3.3–3.4
    /// and RFC 8188 §2 (not with the library Courier encrypts with).
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        use aes_gcm::aead::{Aead, KeyInit};
        use hmac::Mac;
        let hmac = |key: &[u8], data: &[&[u8]]| -> Vec<u8> {
            let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
            for d in data {
                m.update(d);
            }
            m.finalize().into_bytes().to_vec()
        };
        // RFC 8188 §2.1: salt (16) | rs (4) | idlen (1) | keyid | ciphertext.
        let salt = &body[..16];
        let rs = u32::from_be_bytes(body[16..20].try_into().unwrap()) as usize;
        let idlen = body[20] as usize;
        let as_public = &body[21..21 + idlen];
        let ciphertext = &body[21 + idlen..];
        assert_eq!(
            idlen, 65,
            "keyid is the sender's uncompressed P-256 key (RFC 8291 §4)"
        );
        assert!(ciphertext.len() <= rs, "one record");
        let sender = p256::PublicKey::from_sec1_bytes(as_public).unwrap();
        let shared =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender.as_affine());
        // RFC 8291 §3.3: IKM = HKDF(auth_secret, ecdh_secret, "WebPush: info" 0 ua_public as_public, 32).
        let prk_key = hmac(&self.auth, &[shared.raw_secret_bytes().as_slice()]);
        let ikm = hmac(
            &prk_key,
            &[b"WebPush: info\0", &self.public(), as_public, &[1]],
        );
        // RFC 8188 §2.2–2.3: CEK and NONCE from HKDF(salt, IKM).
        let prk = hmac(salt, &[&ikm]);
        let cek = &hmac(&prk, &[b"Content-Encoding: aes128gcm\0", &[1]])[..16];
        let nonce = &hmac(&prk, &[b"Content-Encoding: nonce\0", &[1]])[..12];
        let cipher = aes_gcm::Aes128Gcm::new_from_slice(cek).unwrap();
        let mut plain = cipher
            .decrypt(aes_gcm::Nonce::from_slice(nonce), ciphertext)
            .expect("the payload decrypts with the subscription's keys");
        // The last record's padding: a 0x02 delimiter, then zeros.
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "last-record padding delimiter");
        plain
    }
}

/// Checks the VAPID `Authorization` (RFC 8292 §2–3): an ES256 JWT verified with the key `k`
/// carries, `aud` the push service's origin, `exp` within 24 hours, `sub` a contact URI.
fn check_vapid(authorization: &str, origin: &str, public_key: &str) -> Value {
    use base64::Engine;
    let rest = authorization.strip_prefix("vapid ").expect("vapid scheme");
    let mut t = None;
    let mut k = None;
    for part in rest.split(',') {
        let (name, value) = part.trim().split_once('=').unwrap();
        match name {
            "t" => t = Some(value.to_string()),
            "k" => k = Some(value.to_string()),
            _ => {}
        }
    }
    let (t, k) = (t.expect("t="), k.expect("k="));
    assert_eq!(k, public_key, "k is the key the browser subscribed with");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&k)
        .unwrap();
    assert_eq!(raw.len(), 65);
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key = jsonwebtoken::DecodingKey::from_ec_components(
        &b.encode(&raw[1..33]),
        &b.encode(&raw[33..]),
    )
    .unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&[origin]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    let claims = jsonwebtoken::decode::<Value>(&t, &key, &v)
        .expect("the VAPID JWT verifies")
        .claims;
    let now = chrono::Utc::now().timestamp();
    let exp = claims["exp"].as_i64().unwrap();
    assert!(
        exp > now && exp <= now + 24 * 3600,
        "exp within 24 h: {claims}"
    );
    claims
}

mod web_push_is_encrypted_for_the_browser_and_signed {
    use super::*;
    use crate::messaging::{clinician_token, patient_token, user_token};

    async fn app(backend: Backend) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            s.subscription_private_endpoints = true;
            s.notify_after_secs = 1;
            s.clinic_name = "Riverside Clinic".into();
            s.vapid_subject = Some("mailto:it@riverside.example".into());
            // The stand-in push service is on loopback.
            s.push_hosts = vec!["127.0.0.1".into()];
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(app(Backend::Sqlite).await.unwrap()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        match app(Backend::Postgres).await {
            Some(a) => run(a).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn wait_for(service: &PushService, n: usize) {
        for _ in 0..150 {
            if service.got.lock().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{n} pushes did not arrive (got {})",
            service.got.lock().len()
        );
    }

    async fn run(app: TestApp) {
        let (service, base) = push_service().await;
        let patient = client_with_token(&patient_token(&app, "p1"));
        let other = client_with_token(&patient_token(&app, "p2"));
        let doctor = client_with_token(&clinician_token(&app, "dr-1"));
        let prefs: Value = patient
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let public_key = prefs["push"]["public_key"]
            .as_str()
            .expect("VAPID key")
            .to_string();
        assert_eq!(prefs["push"]["devices"], 0);
        let post = |c: &reqwest::Client, body: Value| {
            let (c, url) = (c.clone(), app.url("notify/push"));
            async move { c.post(url).json(&body).send().await.unwrap() }
        };
        // Bad subscriptions: a clear 400 OperationOutcome, nothing kept.
        let phone = BrowserKeys::new();
        let good = phone.subscription(&format!("{base}/push/phone"));
        let mut bad_key = good.clone();
        bad_key["keys"]["p256dh"] = json!("AAAA");
        let mut bad_auth = good.clone();
        bad_auth["keys"]["auth"] = json!("c2hvcnQ");
        let mut ftp = good.clone();
        ftp["endpoint"] = json!("ftp://push.example/x");
        // Not a push service Courier sends to (an address inside the hospital, say): refused.
        let mut inside = good.clone();
        inside["endpoint"] = json!("https://ehr-db.hospital.internal:5432/push");
        let mut other_port = good.clone();
        other_port["endpoint"] = json!(format!("{base}/push/phone")
            .replace("http://", "https://")
            .replace("127.0.0.1", "localhost"));
        for (body, says) in [
            (inside, "not at a push service"),
            (other_port, "not at a push service"),
            (json!({}), "push subscription"),
            (bad_key, "p256dh"),
            (bad_auth, "auth"),
            (ftp, "https"),
        ] {
            let r = post(&patient, body.clone()).await;
            assert_eq!(r.status(), 400, "{body}");
            let o: Value = r.json().await.unwrap();
            assert_eq!(o["resourceType"], "OperationOutcome");
            assert!(
                o["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains(says),
                "{o}"
            );
        }
        // Not signed in: 401; a system client (no person): 403.
        let r = reqwest::Client::new()
            .post(app.url("notify/push"))
            .json(&good)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        let system = client_with_token(&user_token(&app, "system/*.cruds", "Device/x", None));
        let r = post(&system, good.clone()).await;
        assert!(r.status() == 403 || r.status() == 401, "{}", r.status());
        let n: Value = patient
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(n["push"]["devices"], 0, "nothing kept from bad requests");

        // Two browsers turn notifications on.
        let laptop = BrowserKeys::new();
        let r = post(&patient, good.clone()).await;
        assert_eq!(r.status(), 201);
        let r = post(
            &patient,
            laptop.subscription(&format!("{base}/push/laptop")),
        )
        .await;
        assert_eq!(r.status(), 201);
        assert_eq!(r.json::<Value>().await.unwrap()["devices"], 2);
        // Another person cannot turn off a device that is not theirs.
        let r = other
            .delete(app.url("notify/push"))
            .json(&json!({"endpoint": format!("{base}/push/phone")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);

        // A new message to the patient, unread: a push to each browser.
        let phi = "Your biopsy shows melanoma, Ada Lovelace";
        let mut m = crate::messaging::msg("Practitioner/dr-1", &["Patient/p1"], phi);
        m["subject"] = json!({"reference": "Patient/p1"});
        m["topic"] = json!({"text": "Dermatology results"});
        let r = doctor
            .post(app.url("Communication"))
            .json(&m)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        wait_for(&service, 2).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = service.got.lock().clone();
        assert_eq!(got.len(), 2, "one push per browser");
        let origin = base.clone();
        for (path, headers, body) in &got {
            let h = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k == n)
                    .map(|(_, v)| v.as_str())
            };
            assert_eq!(h("content-encoding"), Some("aes128gcm"), "RFC 8291 §4");
            assert!(
                h("ttl")
                    .and_then(|t| t.parse::<u64>().ok())
                    .is_some_and(|t| t > 0),
                "RFC 8030 §5.2 TTL"
            );
            assert_eq!(h("urgency"), Some("normal"));
            let claims = check_vapid(h("authorization").expect("VAPID"), &origin, &public_key);
            assert_eq!(claims["sub"], "mailto:it@riverside.example");
            let keys = if path == "/push/phone" {
                &phone
            } else {
                &laptop
            };
            let plain = keys.decrypt(body);
            let text = String::from_utf8(plain).unwrap();
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["title"], "Riverside Clinic");
            assert_eq!(v["body"], "You have a new secure message.");
            assert!(v["url"].as_str().unwrap().starts_with(&app.url("")), "{v}");
            for secret in [
                "biopsy",
                "melanoma",
                "Ada",
                "Lovelace",
                "Dermatology",
                "p1",
                "dr-1",
            ] {
                assert!(
                    !text.contains(secret),
                    "PHI {secret:?} in a push payload: {text}"
                );
            }
            // Nothing readable on the wire either.
            assert!(!String::from_utf8_lossy(body).contains("Riverside"));
        }
        let sent: Vec<Notice> = notices(&app)
            .into_iter()
            .filter(|n| n.state == "sent")
            .collect();
        assert_eq!(sent.len(), 1, "one notice, both browsers: {sent:?}");
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let stamped: Vec<N> = app
            .store
            .query(
                "SELECT COUNT(*) AS n FROM notify_push WHERE last_sent_at IS NOT NULL",
                vec![],
            )
            .unwrap();
        assert_eq!(stamped[0].n, 2, "each browser's last delivery is recorded");

        // The laptop's subscription has expired (410): forgotten; the phone still gets it.
        service.answer.lock().insert("/push/laptop".into(), 410);
        let r = doctor
            .post(app.url("Communication"))
            .json(&m)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        wait_for(&service, 4).await;
        for _ in 0..50 {
            if notices(&app).iter().filter(|n| n.state == "sent").count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            notices(&app).iter().filter(|n| n.state == "sent").count(),
            2
        );
        let n: Value = patient
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            n["push"]["devices"], 1,
            "the expired subscription is forgotten"
        );

        // The push service is failing (503): tried again, and delivered once it is back.
        service.answer.lock().insert("/push/phone".into(), 503);
        let r = doctor
            .post(app.url("Communication"))
            .json(&m)
            .send()
            .await
            .unwrap();
        let third = format!(
            "Communication/{}",
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap()
        );
        wait_for(&service, 5).await;
        let waiting = wait_state(&app, &third, "pending").await;
        assert!(
            waiting
                .reason
                .as_deref()
                .unwrap_or("")
                .contains("push service"),
            "{waiting:?}"
        );
        service.answer.lock().insert("/push/phone".into(), 201);
        wait_state(&app, &third, "sent").await;

        // The patient turns this browser off: no device, and the next notice is not made.
        let r = patient
            .delete(app.url("notify/push"))
            .json(&json!({"endpoint": format!("{base}/push/phone")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let n: Value = patient
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(n["push"]["devices"], 0);
        let before = service.got.lock().len();
        let r = doctor
            .post(app.url("Communication"))
            .json(&m)
            .send()
            .await
            .unwrap();
        let fourth = format!(
            "Communication/{}",
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(
            service.got.lock().len(),
            before,
            "no push after turning it off"
        );
        assert!(
            notices(&app).iter().all(|n| n.about != fourth),
            "no notice made"
        );

        // The export tells the patient which browsers and notices there were.
        let everything: Value = patient
            .get(app.url("Patient/p1/$everything"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let settings = everything["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["resource"]["id"] == "notification-settings")
            .expect("notification settings in the export");
        let notices_exported = settings["resource"]["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "notice")
            .count();
        assert_eq!(notices_exported, 3, "{settings}");
        // A token of hers that may not read her messages gets none of it.
        let narrow = client_with_token(&user_token(
            &app,
            "patient/Binary.cr",
            "Patient/p1",
            Some("p1"),
        ));
        let r = narrow
            .get(app.url("Patient/p1/$everything"))
            .send()
            .await
            .unwrap();
        let body = r.text().await.unwrap();
        assert!(!body.contains("notification-settings"), "{body}");
    }
}

mod notices_speak_the_persons_language {
    use super::*;
    use crate::messaging::{clinician_token, patient_token};

    async fn app(backend: Backend, url: String) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            with_sms_provider(s, url);
            s.notify_after_secs = 1;
            s.clinic_name = "Riverside".into();
            s.notify_templates = std::collections::BTreeMap::from([(
                "fr".to_string(),
                std::collections::BTreeMap::from([
                    ("name".to_string(), "Français".to_string()),
                    (
                        "sms".to_string(),
                        "{clinic} : vous avez un nouveau message sécurisé. Connectez-vous : {link}"
                            .to_string(),
                    ),
                ]),
            )]);
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (p, url) = sms_provider().await;
        run(app(Backend::Sqlite, url).await.unwrap(), p).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let (p, url) = sms_provider().await;
        match app(Backend::Postgres, url).await {
            Some(a) => run(a, p).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    async fn run(app: TestApp, provider: SmsProvider) {
        let record = |phone: &str, lang: &str| {
            json!({"telecom": [{"system": "sms", "value": phone}],
                "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en"}]}},
                    {"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": lang}]}, "preferred": true}]})
        };
        // Her record prefers Mexican Spanish; his says French is preferred, but he chooses
        // French in the app... and another patient chooses English over her record's Spanish.
        courier::notify::remember_contacts(
            &app.store,
            "Patient/p-es",
            &record("+15550100801", "es-MX"),
        )
        .unwrap();
        courier::notify::remember_contacts(
            &app.store,
            "Patient/p-fr",
            &record("+15550100802", "de"),
        )
        .unwrap();
        courier::notify::remember_contacts(
            &app.store,
            "Patient/p-en",
            &record("+15550100803", "es"),
        )
        .unwrap();
        let put = |who: &str, body: Value| {
            let (c, url) = (
                client_with_token(&patient_token(&app, who)),
                app.url("notify/preferences"),
            );
            async move {
                let r = c.put(url).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        };
        let (s, o) = put("p-fr", json!({"language": "klingon"})).await;
        assert_eq!(s, 400, "{o}");
        assert!(
            o["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("en, es, fr"),
            "{o}"
        );
        let (s, v) = put("p-fr", json!({"language": "fr"})).await;
        assert_eq!((s, v["language"].as_str()), (200, Some("fr")), "{v}");
        assert!(v["languages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["code"] == "fr" && l["name"] == "Français"));
        let (s, v) = put("p-en", json!({"language": "en"})).await;
        assert_eq!((s, v["language"].as_str()), (200, Some("en")));
        // The next launch reads the records again: a choice made in the app stands.
        courier::notify::remember_contacts(
            &app.store,
            "Patient/p-fr",
            &record("+15550100802", "de"),
        )
        .unwrap();
        courier::notify::remember_contacts(
            &app.store,
            "Patient/p-en",
            &record("+15550100803", "es"),
        )
        .unwrap();

        let doctor = client_with_token(&clinician_token(&app, "dr-1"));
        // One message to each (a message reaches one patient at most).
        for p in ["Patient/p-es", "Patient/p-fr", "Patient/p-en"] {
            let m = crate::messaging::msg("Practitioner/dr-1", &[p], "Resultados: glucosa 180");
            let r = doctor
                .post(app.url("Communication"))
                .json(&m)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
        }
        for _ in 0..150 {
            if provider.got.lock().len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let got = provider.got.lock().clone();
        let body_to = |to: &str| {
            got.iter()
                .find(|f| f.iter().any(|(k, v)| k == "To" && v == to))
                .and_then(|f| f.iter().find(|(k, _)| k == "Body").map(|(_, v)| v.clone()))
                .unwrap_or_else(|| panic!("no SMS to {to}: {got:?}"))
        };
        let es = body_to("+15550100801");
        assert!(
            es.starts_with("Riverside: tiene un nuevo mensaje seguro."),
            "{es}"
        );
        let fr = body_to("+15550100802");
        assert!(
            fr.starts_with("Riverside : vous avez un nouveau message sécurisé."),
            "{fr}"
        );
        let en = body_to("+15550100803");
        assert!(
            en.starts_with("Riverside: you have a new secure message."),
            "{en}"
        );
        for b in [&es, &fr, &en] {
            assert!(b.contains(&app.url("")), "the sign-in link: {b}");
            assert!(!b.contains("glucosa") && !b.contains("180"), "PHI in {b}");
        }
        // Email and push speak it too (the same words).
        let settings = courier::config::Settings {
            clinic_name: "Riverside".into(),
            ..Default::default()
        };
        let mail = courier::notify::render(
            &settings,
            false,
            "new-message",
            3,
            "https://x/app/",
            "https://x/u",
            Some("es"),
        );
        assert_eq!(mail.subject, "3 mensajes seguros nuevos de Riverside");
        assert!(
            mail.text
                .starts_with("Hola:\r\n\r\nTiene 3 mensajes seguros nuevos de Riverside."),
            "{}",
            mail.text
        );
        let push: Value = serde_json::from_slice(&courier::notify::push::payload(
            &settings,
            "reminder",
            1,
            "https://x/app/",
            Some("es-419"),
        ))
        .unwrap();
        assert_eq!(
            push["body"],
            "Tiene un recordatorio. Abra Courier para leerlo."
        );
        assert_eq!(push["lang"], "es");
        // A language with no words of its own falls back to the clinic's default.
        let de = courier::notify::render(
            &settings,
            false,
            "new-message",
            1,
            "https://x/app/",
            "https://x/u",
            Some("de"),
        );
        assert_eq!(de.subject, "New secure message from Riverside");
    }
}

/// An SMTP server that takes a message's DATA and never answers it: the sending instance is
/// cut off in the middle of a send. `data` turns true once the message body has arrived.
fn black_hole_smtp() -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let data = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = data.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let mut r = BufReader::new(conn);
                let _ = w.write_all(b"220 blackhole ESMTP\r\n");
                let mut in_data = false;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                    let l = line.trim_end().to_string();
                    line.clear();
                    if in_data {
                        if l == "." {
                            flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            // Never answered: hold the connection until the peer dies.
                            std::thread::sleep(Duration::from_secs(600));
                        }
                        continue;
                    }
                    let up = l.to_ascii_uppercase();
                    let answer: &[u8] = if up.starts_with("EHLO") {
                        b"250-blackhole\r\n250 8BITMIME\r\n"
                    } else if up.starts_with("DATA") {
                        in_data = true;
                        b"354 go on\r\n"
                    } else if up.starts_with("QUIT") {
                        b"221 bye\r\n"
                    } else {
                        b"250 OK\r\n"
                    };
                    let _ = w.write_all(answer);
                }
            });
        }
    });
    (port, data)
}

/// Two Courier processes on one PostgreSQL database: the first is killed (SIGKILL) while the mail
/// server holds its send open; the second, started after, never sends that notice (whether it went
/// out is unknown: `uncertain`), and sends the next one normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_send_never_sends_twice() {
    // The in-process instance only takes the messages: it has no channel, so it sends nothing.
    let Some(app) = spawn_app_with(Backend::Postgres, |s| {
        s.web_push = false;
        s.smtp_url = None;
    })
    .await
    else {
        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
        return;
    };
    let serve = |smtp_port: u16| {
        serve_command(&app, free_port())
            .env("COURIER_SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}"))
            .env("COURIER_NOTIFY_AFTER_SECS", "0")
            .env("COURIER_NOTIFY_LEASE_SECS", "3")
            .spawn()
            .expect("courier serve starts")
    };
    courier::notify::remember_contacts(
        &app.store,
        "Patient/k1",
        &json!({"telecom": [{"system": "email", "value": "k1@example.org"}]}),
    )
    .unwrap();
    let (hole, data) = black_hole_smtp();
    let mut first = serve(hole);
    let cut = app
        .create(&message("Patient/k1", "2026-12-06T10:00:00Z", "first"))
        .await;
    for _ in 0..300 {
        if data.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        data.load(std::sync::atomic::Ordering::SeqCst),
        "the first instance was sending"
    );
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();

    let port = free_port();
    let Some(smtp) = Smtp::start(port, tempfile::tempdir().unwrap()) else {
        return;
    };
    let mut second = serve(port);
    let cut_off = wait_state(&app, &format!("Communication/{cut}"), "uncertain").await;
    assert!(
        cut_off
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("may or may not"),
        "{cut_off:?}"
    );
    let next = app
        .create(&message("Patient/k1", "2026-12-06T10:05:00Z", "second"))
        .await;
    wait_state(&app, &format!("Communication/{next}"), "sent").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mails = smtp.received();
    second.kill().unwrap();
    second.wait().unwrap();
    assert_eq!(
        mails.len(),
        1,
        "only the second notice was sent by the second instance"
    );
    assert_eq!(h(&mails[0].0, "to"), Some("k1@example.org"));
    assert!(
        h(&mails[0].0, "message-id").is_some_and(|id| !id.is_empty()),
        "{:?}",
        mails[0].0
    );
}

mod a_later_bounce_stops_email_to_that_address {
    use super::*;
    use crate::messaging::patient_token;

    async fn app(backend: Backend, port: u16) -> Option<TestApp> {
        spawn_app_with(backend, move |s| {
            s.smtp_url = Some(format!("smtp://127.0.0.1:{port}").into());
            s.notify_after_secs = 1;
            s.notify_from = "Riverside <no-reply@riverside.example>".into();
            s.notify_bounce_to = Some("bounces@riverside.example".into());
            s.web_push = false;
        })
        .await
    }

    // The mail server listens before the app starts: a port only chosen free, then left unbound
    // while the app started, was taken by another test's process under a full run (a flake).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let port = free_port();
        let Some(smtp) = Smtp::start(port, tempfile::tempdir().unwrap()) else {
            return;
        };
        run(app(Backend::Sqlite, port).await.unwrap(), smtp).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let port = free_port();
        let Some(smtp) = Smtp::start(port, tempfile::tempdir().unwrap()) else {
            return;
        };
        match app(Backend::Postgres, port).await {
            Some(a) => run(a, smtp).await,
            None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
        }
    }

    fn bounce(app: &TestApp, dsn: &str) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
            .args(["notify", "bounce"])
            .env("COURIER_DATA_DIR", app.dir.path())
            .env("COURIER_DATABASE_URL", &app.database_url)
            .env(
                "COURIER_MASTER_KEY",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            )
            .env("COURIER_LOG", "error")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(dsn.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    async fn run(app: TestApp, smtp: Smtp) {
        courier::notify::remember_contacts(
            &app.store,
            "Patient/b1",
            &json!({"telecom": [{"system": "email", "value": "b1@example.org"}]}),
        )
        .unwrap();
        let first = app
            .create(&message("Patient/b1", "2026-12-06T10:00:00Z", "first"))
            .await;
        let mails = smtp.wait(1).await;
        let (headers, _) = &mails[0];
        assert_eq!(
            h(headers, "x-mailfrom"),
            Some("bounces@riverside.example"),
            "the envelope sender is the bounce mailbox"
        );
        let message_id = h(headers, "message-id").unwrap().to_string();
        wait_state(&app, &format!("Communication/{first}"), "sent").await;
        // Not a bounce: ignored, and the mail system is told all is well (exit 0).
        assert!(bounce(
            &app,
            "From: someone@example.org\r\nSubject: thanks!\r\n\r\nThank you\r\n"
        )
        .contains("ignored"));
        // The recipient's server refuses it later (RFC 3464).
        let dsn = format!(
            "From: MAILER-DAEMON@mx.example.org\r\nTo: bounces@riverside.example\r\nSubject: Undelivered Mail\r\n\
             Content-Type: multipart/report; report-type=delivery-status; boundary=\"x\"\r\n\r\n--x\r\n\
             Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n\
             Final-Recipient: rfc822; b1@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n--x\r\n\
             Content-Type: text/rfc822-headers\r\n\r\nTo: b1@example.org\r\nMessage-ID: {message_id}\r\n--x--\r\n"
        );
        // A report about another address (forged, or a late bounce of an address since changed)
        // changes nothing.
        let forged = dsn.replace("rfc822; b1@example.org", "rfc822; someone.else@example.org");
        assert!(bounce(&app, &forged).contains("not about the person's current address"));
        wait_state(&app, &format!("Communication/{first}"), "sent").await;
        let said = bounce(&app, &dsn);
        assert!(
            said.contains("bounced (5.1.1)") && !said.contains("b1@example.org"),
            "{said}"
        );
        let n = wait_state(&app, &format!("Communication/{first}"), "bounced").await;
        assert!(n.reason.unwrap().contains("5.1.1"));
        // The person sees it, and no more email goes to that address.
        let patient = client_with_token(&patient_token(&app, "b1"));
        let p: Value = patient
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(p["email"]["bounced"], true, "{p}");
        let second = app
            .create(&message("Patient/b1", "2026-12-06T10:05:00Z", "second"))
            .await;
        tokio::time::sleep(Duration::from_millis(3000)).await;
        assert_eq!(smtp.received().len(), 1, "no email to a bounced address");
        assert!(notices(&app)
            .iter()
            .all(|n| n.about != format!("Communication/{second}")));
        // They give another address, confirmed with the code sent to it: email resumes.
        let r = patient
            .post(app.url("notify/contacts"))
            .json(&json!({"kind": "email", "value": "b1.new@example.org"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let mails = smtp.wait(2).await;
        let code_mail = mails
            .iter()
            .find(|(h0, _)| h(h0, "to") == Some("b1.new@example.org"))
            .expect("the code");
        let code: String = code_mail
            .1
            .chars()
            .filter(|c| c.is_ascii_digit())
            .take(6)
            .collect();
        let r = patient
            .post(app.url("notify/contacts/verify"))
            .json(&json!({"kind": "email", "code": code}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let p: Value = patient
            .get(app.url("notify/preferences"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(p["email"]["bounced"].is_null(), "{p}");
        app.create(&message("Patient/b1", "2026-12-06T10:10:00Z", "third"))
            .await;
        let mails = smtp.wait(3).await;
        assert_eq!(
            mails
                .iter()
                .filter(|(h0, _)| h(h0, "to") == Some("b1.new@example.org"))
                .count(),
            2
        );
    }
}
