//! Courier as a SMART client of EHRs, against the test EHR in `tests/ehr` (FHIR on Medplum's
//! fhir-router, plus a SMART authorization-server fixture that checks private_key_jwt the way a
//! real one does): the EHR registry, Courier's published client keys, discovery (and its
//! CapabilityStatement fallback), and the backend-services connection with its token cache.

use crate::both_backends;
use crate::helpers::*;
use actix_web::{web, App, HttpResponse, HttpServer};
use courier::smart::registry::{self, NewEhr};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// One running test EHR; killed when dropped.
pub struct TestEhr {
    pub base: String,
    pub test_api: String,
    child: Child,
}

impl Drop for TestEhr {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ehr_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ehr")
}

/// Starts a test EHR, or `None` where Node or its packages are missing (a failure under CI).
pub fn spawn_ehr(name: &str) -> Option<TestEhr> {
    let installed = ehr_dir().join("node_modules/@medplum/fhir-router").exists()
        && Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !installed {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true but the test EHR is not installed: run `npm ci` in tests/ehr");
        }
        eprintln!("skipped: the test EHR is not installed (npm ci in tests/ehr)");
        return None;
    }
    let mut child = Command::new("node")
        .arg(ehr_dir().join("server.mjs"))
        .args([
            "--port",
            "0",
            "--name",
            name,
            "--exit-on-stdin-eof",
            "--max-lifetime",
            "300",
            "--quiet",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("node starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready: Value = serde_json::from_str(&line).expect("the test EHR's ready line");
    Some(TestEhr {
        base: ready["base"].as_str().unwrap().to_string(),
        test_api: ready["test_api"].as_str().unwrap().to_string(),
        child,
    })
}

impl TestEhr {
    pub async fn control(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = reqwest::Client::new().request(method, format!("{}/{path}", self.test_api));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let res = r.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap()
    }

    /// Registers Courier as a client of this EHR, with its keys at Courier's JWKS URL.
    pub async fn register_courier(&self, app: &TestApp, client_id: &str) {
        self.control(
            reqwest::Method::POST,
            "clients",
            Some(
                json!({"client_id": client_id, "jwks_url": app.url("smart/jwks"),
                "redirect_uris": [app.url("smart/callback")], "scopes": "*"}),
            ),
        )
        .await;
    }

    async fn token_requests(&self) -> u64 {
        self.control(reqwest::Method::GET, "counters", None).await["token"]["requests"]
            .as_u64()
            .unwrap()
    }
}

pub fn new_ehr<'a>(name: &'a str, iss: &'a str, alg: &'a str) -> NewEhr<'a> {
    NewEhr {
        name,
        iss,
        client_id: "courier",
        alg,
        launch_scopes: "openid fhirUser launch user/Patient.r",
        backend_scopes: "system/AuditEvent.crs",
        trusted_systems: "urn:oid:2.16.840.1.113883.19.5 http://hl7.org/fhir/sid/us-npi",
        backend_token_url: None,
        audit_base: None,
    }
}

both_backends! {
    async fn backend_services_connection_to_two_ehrs(app: TestApp) {
        let (Some(a), Some(b)) = (spawn_ehr("ehr-a"), spawn_ehr("ehr-b")) else { return };
        // One EHR with an RS384 key, one with ES384; Courier publishes both public keys.
        let ehr_a = registry::add(&app.store, &new_ehr("ehr-a", &a.base, "RS384")).unwrap();
        let ehr_b = registry::add(&app.store, &new_ehr("ehr-b", &b.base, "ES384")).unwrap();
        let jwks = app.anonymous.get(app.url("smart/jwks")).send().await.unwrap().json::<Value>().await.unwrap();
        let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert!(kids.contains(&ehr_a.kid.as_str()) && kids.contains(&ehr_b.kid.as_str()));
        for field in ["d", "p", "q", "dp", "dq", "qi"] {
            assert!(jwks["keys"].as_array().unwrap().iter().all(|k| k.get(field).is_none()), "private {field} published");
        }
        // Before the EHR knows Courier, it refuses the connection.
        let err = app.ehrs.token(&app.store, &ehr_a).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
        a.register_courier(&app, "courier").await;
        b.register_courier(&app, "courier").await;
        for (ehr, fixture) in [(&ehr_a, &a), (&ehr_b, &b)] {
            let before = fixture.token_requests().await;
            let token = app.ehrs.token(&app.store, ehr).await.unwrap();
            // The token works at that EHR, and only there.
            let r = reqwest::Client::new().get(format!("{}/AuditEvent", fixture.base)).bearer_auth(&token).send().await.unwrap();
            assert_eq!(r.status(), 200, "{}", ehr.name);
            let other = if fixture.base == a.base { &b } else { &a };
            let r = reqwest::Client::new().get(format!("{}/AuditEvent", other.base)).bearer_auth(&token).send().await.unwrap();
            assert_eq!(r.status(), 401);
            // Cached: the second call does not go to the EHR again.
            assert_eq!(app.ehrs.token(&app.store, ehr).await.unwrap(), token);
            assert_eq!(fixture.token_requests().await, before + 1);
        }
        // The client assertion is one a strict server accepts only once (fresh jti each time).
        app.ehrs.forget("ehr-a");
        app.ehrs.token(&app.store, &ehr_a).await.unwrap();
        // Down EHR: a clear error, no token.
        app.ehrs.forget("ehr-b");
        b.control(reqwest::Method::POST, "down", Some(json!({}))).await;
        assert!(app.ehrs.token(&app.store, &ehr_b).await.is_err());
        b.control(reqwest::Method::POST, "up", None).await;
        assert!(app.ehrs.token(&app.store, &ehr_b).await.is_ok());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_falls_back_to_the_capability_statement() {
    // An EHR that publishes its endpoints only in its CapabilityStatement.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let b2 = base.clone();
    let server = HttpServer::new(move || {
        let b = b2.clone();
        App::new().route("/fhir/metadata", web::get().to(move || {
            let b = b.clone();
            async move {
                HttpResponse::Ok().json(json!({"resourceType": "CapabilityStatement", "rest": [{"mode": "server", "security": {"extension": [{
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": format!("{b}/oauth/token")}, {"url": "authorize", "valueUri": format!("{b}/oauth/authorize")}]}]}}]}))
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    let d = courier::smart::discovery::Discovery::new(courier::outbound::Outbound::any_address());
    let e = d.endpoints(&base).await.unwrap();
    assert_eq!(e.source, "CapabilityStatement");
    assert_eq!(e.token, format!("{base}/oauth/token"));
    assert_eq!(
        e.authorization.as_deref(),
        Some(format!("{base}/oauth/authorize").as_str())
    );
    // Neither document: a clear error.
    assert!(d.endpoints("http://127.0.0.1:1/fhir").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reads_the_smart_configuration_of_the_test_ehr() {
    let Some(ehr) = spawn_ehr("disc") else { return };
    let e = courier::smart::discovery::Discovery::new(courier::outbound::Outbound::any_address())
        .endpoints(&ehr.base)
        .await
        .unwrap();
    assert_eq!(e.source, "smart-configuration");
    assert!(e.token.ends_with("/token"));
    assert!(e
        .capabilities
        .iter()
        .any(|c| c == "client-confidential-asymmetric"));
}

/// `courier ehr …` through the real binary.
#[test]
fn ehr_registry_cli() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| run_cli(dir.path(), args);
    let (ok, out, err) = run(&[
        "ehr",
        "add",
        "--name",
        "hospital-a",
        "--iss",
        "https://ehr.example.org/fhir/",
        "--client-id",
        "courier-at-a",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("hospital-a") && out.ends_with("/smart/jwks\n"),
        "{out}"
    );
    let (ok, list, _) = run(&["ehr", "list"]);
    assert!(
        ok && list.contains("https://ehr.example.org/fhir\t") && list.contains("ES384"),
        "{list}"
    );
    for (args, why) in [
        (
            vec![
                "ehr",
                "add",
                "--name",
                "b",
                "--iss",
                "http://ehr.example.org/fhir",
                "--client-id",
                "x",
            ],
            "https",
        ),
        (
            vec![
                "ehr",
                "add",
                "--name",
                "hospital-a",
                "--iss",
                "https://other.example.org/fhir",
                "--client-id",
                "x",
            ],
            "already",
        ),
        (
            vec![
                "ehr",
                "add",
                "--name",
                "c",
                "--iss",
                "https://ehr.example.org/fhir",
                "--client-id",
                "x",
            ],
            "already",
        ),
        (
            vec![
                "ehr",
                "add",
                "--name",
                "bad name",
                "--iss",
                "https://e.example.org/fhir",
                "--client-id",
                "x",
            ],
            "name",
        ),
        (
            vec![
                "ehr",
                "add",
                "--name",
                "d",
                "--iss",
                "https://e.example.org/fhir",
                "--client-id",
                "x",
                "--backend-scope",
                "system/AuditEvent.xyz",
            ],
            "scope",
        ),
    ] {
        let (ok, _, err) = run(&args);
        assert!(!ok && err.contains(why), "{args:?}: {err}");
    }
    let (ok, out, _) = run(&["identity", "conflicts"]);
    assert!(ok && out.is_empty());
    let (ok, out, _) = run(&["outbox", "status"]);
    assert!(ok && out.contains("empty"), "{out}");
    assert!(run(&["ehr", "remove", "hospital-a"]).0);
    assert!(!run(&["ehr", "remove", "hospital-a"]).0);
}

pub fn person(kind: &str, id: &str, ids: &[(&str, &str)]) -> Value {
    let mut v = json!({"resourceType": kind, "id": id, "name": [{"family": "Test"}]});
    if !ids.is_empty() {
        v["identifier"] = json!(ids
            .iter()
            .map(|(s, val)| json!({"system": s, "value": val}))
            .collect::<Vec<_>>());
    }
    v
}

/// Reads a record from a test EHR with Courier's backend-services token for it.
async fn read_from(app: &TestApp, ehr: &courier::smart::registry::Ehr, reference: &str) -> Value {
    let token = app.ehrs.token(&app.store, ehr).await.unwrap();
    let r = reqwest::Client::new()
        .get(format!("{}/{reference}", ehr.iss))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{reference}");
    r.json().await.unwrap()
}

both_backends! {
    async fn one_person_in_two_ehrs_is_one_courier_identity(app: TestApp) {
        use courier::smart::identity::{self, How, LinkError};
        let (Some(a), Some(b)) = (spawn_ehr("ehr-a"), spawn_ehr("ehr-b")) else { return };
        const MRN: &str = "urn:oid:2.16.840.1.113883.19.5";
        const NPI: &str = "http://hl7.org/fhir/sid/us-npi";
        a.control(reqwest::Method::POST, "seed", Some(json!([
            person("Patient", "a1", &[(MRN, "1001")]),
            person("Patient", "a2", &[(MRN, "1002")]),
            person("Practitioner", "dr-a", &[(NPI, "1234567890")]),
            person("Patient", "a9", &[(MRN, "1001")]),
        ]))).await;
        b.control(reqwest::Method::POST, "seed", Some(json!([
            person("Patient", "b1", &[(MRN, "1001")]),
            person("Patient", "b3", &[(MRN, "1001"), (MRN, "1002")]),
            person("Patient", "b4", &[]),
            person("Patient", "b5", &[("urn:untrusted:mrn", "1001")]),
            person("Practitioner", "dr-b", &[(NPI, "1234567890")]),
        ]))).await;
        let mut ehrs = Vec::new();
        for (name, fixture) in [("ehr-a", &a), ("ehr-b", &b)] {
            let mut n = new_ehr(name, &fixture.base, "ES384");
            n.backend_scopes = "system/Patient.r system/Practitioner.r";
            ehrs.push(registry::add(&app.store, &n).unwrap());
            fixture.register_courier(&app, "courier").await;
        }
        let (ea, eb) = (&ehrs[0], &ehrs[1]);
        let link = |ehr: &courier::smart::registry::Ehr, r: Value| identity::link(&app.store, &ehr.iss, &|s| ehr.trusts(s), &r);

        let (p1, how) = link(ea, read_from(&app, ea, "Patient/a1").await).unwrap();
        assert_eq!(how, How::Created);
        assert!(p1.starts_with("Patient/") && p1 != "Patient/a1", "Courier ids are Courier's own: {p1}");
        assert_eq!(link(ea, read_from(&app, ea, "Patient/a1").await).unwrap(), (p1.clone(), How::Linked));
        // The same MRN in the other EHR: the same Courier patient.
        assert_eq!(link(eb, read_from(&app, eb, "Patient/b1").await).unwrap(), (p1.clone(), How::Identifier));
        let (p2, _) = link(ea, read_from(&app, ea, "Patient/a2").await).unwrap();
        assert_ne!(p1, p2);
        // A record whose identifiers belong to two identities is refused and recorded.
        let before = identity::conflicts(&app.store).unwrap().len();
        assert!(matches!(link(eb, read_from(&app, eb, "Patient/b3").await), Err(LinkError::Conflict(_))));
        let conflicts = identity::conflicts(&app.store).unwrap();
        assert_eq!(conflicts.len(), before + 1);
        assert_eq!(conflicts[0].ehr_ref, "Patient/b3");
        // No identifiers: a new identity, never a guess.
        let (p4, how) = link(eb, read_from(&app, eb, "Patient/b4").await).unwrap();
        assert_eq!(how, How::Created);
        assert!(![&p1, &p2].contains(&&p4));
        // An identifier in a system this EHR is not trusted for joins nothing.
        let (p5, how) = link(eb, read_from(&app, eb, "Patient/b5").await).unwrap();
        assert_eq!(how, How::Created);
        assert_ne!(p5, p1);
        // Two records of one EHR sharing an identifier (mother and newborn) are never merged.
        assert!(matches!(link(ea, read_from(&app, ea, "Patient/a9").await), Err(LinkError::Conflict(_))));
        // Practitioners by NPI.
        let (d1, _) = link(ea, read_from(&app, ea, "Practitioner/dr-a").await).unwrap();
        assert_eq!(link(eb, read_from(&app, eb, "Practitioner/dr-b").await).unwrap(), (d1.clone(), How::Identifier));
        assert!(d1.starts_with("Practitioner/"));
        // Writing to an EHR: its own reference, else identifier-only, else nothing.
        assert_eq!(identity::ehr_reference(&app.store, &ea.iss, &p1).unwrap(), Some(json!({"reference": "Patient/a1"})));
        assert_eq!(identity::ehr_reference(&app.store, &eb.iss, &p1).unwrap(), Some(json!({"reference": "Patient/b1"})));
        assert_eq!(identity::ehr_reference(&app.store, &eb.iss, &p2).unwrap(),
            Some(json!({"type": "Patient", "identifier": {"system": MRN, "value": "1002"}})));
        assert_eq!(identity::ehr_reference(&app.store, &ea.iss, &p4).unwrap(), None);
        // Only people are linked.
        assert!(matches!(identity::link(&app.store, &ea.iss, &|_| true, &json!({"resourceType": "Encounter", "id": "e1"})), Err(LinkError::Invalid(_))));
    }
}

/// Follows one redirect step by hand (as a browser would), returning the Location.
pub async fn step(url: &str) -> (u16, Option<String>, String) {
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let loc = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    (status, loc, r.text().await.unwrap_or_default())
}

/// Starts a standalone launch in a "browser": the EHR's authorize URL and the binding cookie.
pub async fn standalone(app: &TestApp) -> (String, String) {
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .get(app.url("smart/launch?ehr=ehr-a"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    (
        r.headers()["location"].to_str().unwrap().to_string(),
        cookie,
    )
}

/// The EHR's redirect back, as the browser that holds `cookie` follows it.
pub async fn back_with(url: &str, cookie: &str) -> (u16, String) {
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c.get(url).header("cookie", cookie).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The session the hand-off page gives the web app.
pub fn session_of(page: &str) -> Value {
    let start = page.find("const n=").expect("hand-off script") + "const n=".len();
    let end = page[start..].find(";try{").unwrap() + start;
    serde_json::from_str(&page[start..end]).unwrap()
}

fn query_of(url: &str) -> std::collections::HashMap<String, String> {
    form_urlencoded::parse(url.split_once('?').unwrap().1.as_bytes())
        .into_owned()
        .collect()
}

both_backends! {
    async fn ehr_and_standalone_launch_end_in_a_courier_user_token(app: TestApp) {
        let Some(a) = spawn_ehr("ehr-a") else { return };
        const MRN: &str = "urn:oid:2.16.840.1.113883.19.5";
        a.control(reqwest::Method::POST, "seed", Some(json!([
            person("Patient", "a1", &[(MRN, "1001")]),
            person("Practitioner", "dr-a", &[("http://hl7.org/fhir/sid/us-npi", "1234567890")]),
        ]))).await;
        let mut n = new_ehr("ehr-a", &a.base, "ES384");
        n.launch_scopes = "openid fhirUser launch user/Patient.r user/Practitioner.r";
        let ehr = registry::add(&app.store, &n).unwrap();
        a.register_courier(&app, "courier").await;

        // EHR launch: the clinician opens Courier with patient a1 in context.
        let l = a.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a", "need_patient_banner": true}))).await;
        let start = app.url(&format!("launch?iss={}&launch={}", a.base, l["launch"].as_str().unwrap()));
        let (s, to_ehr, _) = step(&start).await;
        assert_eq!(s, 302);
        let to_ehr = to_ehr.unwrap();
        let q = query_of(&to_ehr);
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], "courier");
        assert_eq!(q["redirect_uri"], app.url("smart/callback"));
        assert_eq!(q["aud"], a.base);
        assert_eq!(q["launch"], l["launch"].as_str().unwrap());
        assert_eq!(q["code_challenge_method"], "S256");
        assert!(q["state"].len() >= 22, "at least 128 bits of state");
        assert!(q["scope"].split(' ').any(|s| s == "openid") && q["scope"].split(' ').any(|s| s == "fhirUser"));
        let (s, back, _) = step(&to_ehr).await;
        assert_eq!(s, 302, "the EHR approves");
        let back = back.unwrap();
        assert!(back.starts_with(&app.url("smart/callback")));
        let r = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap().get(&back).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cache-control"], "no-store");
        assert_eq!(r.headers()["referrer-policy"], "no-referrer");
        assert!(r.headers().get("location").is_none(), "the token never travels in a URL");
        let session = session_of(&r.text().await.unwrap());
        let user = session["fhirUser"].as_str().unwrap().to_string();
        let patient = session["patient"].as_str().unwrap().to_string();
        assert!(user.starts_with("Practitioner/") && user != "Practitioner/dr-a", "{user}");
        assert_eq!(session["need_patient_banner"], true);
        assert_eq!(courier::smart::identity::ehr_reference(&app.store, &ehr.iss, &patient).unwrap(), Some(json!({"reference": "Patient/a1"})));
        // The Courier token works, as that clinician, in that patient's context.
        let clinician = client_with_token(session["access_token"].as_str().unwrap());
        let msg = json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": user}, "recipient": [{"reference": patient}]});
        let r = clinician.post(app.url("Communication")).header("content-type", FHIR_JSON).body(msg.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 201);
        // The same answer from the EHR again: the state was single use.
        let (s, loc, body) = step(&back).await;
        assert_eq!((s, loc), (400, None));
        assert!(body.contains("expired or was already used"));
        // (Most often Back after signing in: the page offers the way back into Courier.)
        assert!(body.contains("<a href=\"/app/\">Go to Courier</a>"), "{body}");

        // Standalone launch from the patient portal: the patient signs in at the EHR.
        a.control(reqwest::Method::POST, "settings", Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1"}))).await;
        let (to_ehr, cookie) = standalone(&app).await;
        assert!(cookie.starts_with("courier_launch="));
        assert!(query_of(&to_ehr)["scope"].split(' ').any(|s| s == "launch/patient"));
        assert!(!query_of(&to_ehr).contains_key("launch"));
        let (_, back, _) = step(&to_ehr).await;
        let back = back.unwrap();
        assert!(!back.contains("error="), "{back}");
        let (s, page) = back_with(&back, &cookie).await;
        assert_eq!(s, 200, "{page}");
        let session = session_of(&page);
        assert_eq!(session["fhirUser"], patient.as_str(), "the patient is the same Courier patient");
        assert_eq!(session["patient"], patient.as_str());
        // Their own record, no hint from the EHR: no banner of themselves (the header names them).
        assert_eq!(session["need_patient_banner"], false);

        // An EHR that cannot be reached: a readable page, no redirect.
        registry::add(&app.store, &new_ehr("dead", "http://127.0.0.1:1/fhir", "ES384")).unwrap();
        let (s, loc, body) = step(&app.url("launch?iss=http://127.0.0.1:1/fhir&launch=x")).await;
        assert_eq!((s, loc), (502, None));
        assert!(body.contains("cannot be reached"), "{body}");

        // Refusals end on a readable page and are audited.
        let (s, loc, body) = step(&app.url("launch?iss=https://evil.example.org/fhir&launch=x")).await;
        assert_eq!((s, loc), (400, None), "an unknown iss is never followed");
        assert!(body.contains("not registered"));
        let (s, _, _) = step(&app.url("smart/callback?code=x&state=not-a-state")).await;
        assert_eq!(s, 400);
        // Login CSRF: a standalone callback finished in another browser (without the cookie) fails.
        let (to_ehr, _cookie) = standalone(&app).await;
        let (_, back, _) = step(&to_ehr).await;
        let (s, _, body) = step(&back.unwrap()).await;
        assert_eq!(s, 400);
        assert!(body.contains("another browser"), "{body}");
        a.control(reqwest::Method::POST, "settings", Some(json!({"deny": true}))).await;
        let (to_ehr, cookie) = standalone(&app).await;
        let (_, back, _) = step(&to_ehr).await;
        let back = back.unwrap();
        assert!(back.contains("error=access_denied"));
        let (s, body) = back_with(&back, &cookie).await;
        assert_eq!(s, 403);
        // In words a patient can act on, readable on a phone (an outside walk-through found it
        // tiny there, and saying "EHR" to a patient).
        assert!(body.contains("declined") && body.contains("patient portal"), "{body}");
        assert!(body.contains(r#"name="viewport""#), "{body}");
        // Other codes are named and said for what they are (a set-up fault, a passing one).
        for (code, status, words) in [("invalid_scope", 502, "administrator"), ("temporarily_unavailable", 503, "Try again")] {
            let (to_ehr, cookie) = standalone(&app).await;
            let (_, back, _) = step(&to_ehr).await;
            let back = back.unwrap().replace("error=access_denied", &format!("error={code}"));
            let (s, body) = back_with(&back, &cookie).await;
            assert_eq!(s, status, "{code}: {body}");
            assert!(body.contains(code) && body.contains(words), "{body}");
        }
        let logins = app.get_json("AuditEvent?subtype=http://dicom.nema.org/resources/ontology/DCM|110122&_count=100").await;
        let entries = logins["entry"].as_array().unwrap();
        assert!(entries.iter().any(|e| e["resource"]["outcome"] == "0" && e["resource"].to_string().contains(&user)));
        assert!(entries.iter().filter(|e| e["resource"]["outcome"] == "4").count() >= 5);
        // No token or code in the audit trail.
        assert!(!logins.to_string().contains(session["access_token"].as_str().unwrap()));
    }
}

/// The AuditEvents the test EHR holds that came from Courier's outbox, by outbox id.
pub async fn delivered(ehr: &TestEhr) -> std::collections::HashMap<String, Vec<Value>> {
    let all = ehr
        .control(reqwest::Method::GET, "resources/AuditEvent", None)
        .await;
    let mut by_id: std::collections::HashMap<String, Vec<Value>> = Default::default();
    for ev in all["resources"].as_array().unwrap() {
        for e in ev["entity"].as_array().into_iter().flatten() {
            if e["what"]["identifier"]["system"] == "urn:courier:outbox" {
                by_id
                    .entry(
                        e["what"]["identifier"]["value"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    )
                    .or_default()
                    .push(ev.clone());
            }
        }
    }
    by_id
}

/// Waits (bounded) until the outbox has nothing pending.
pub async fn drained(app: &TestApp) -> bool {
    for _ in 0..60 {
        let s = courier::smart::outbox::status(&app.store).unwrap();
        if s.iter().all(|r| r.pending == 0) && !s.is_empty() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    false
}

both_backends! {
    async fn every_audit_event_reaches_the_ehr_exactly_once(app: TestApp) {
        use courier::smart::identity;
        let Some(a) = spawn_ehr("ehr-a") else { return };
        a.control(reqwest::Method::POST, "seed", Some(json!([
            person("Patient", "a1", &[("urn:oid:mrn", "1001")]),
            person("Practitioner", "dr-a", &[("http://hl7.org/fhir/sid/us-npi", "1234567890")]),
        ]))).await;
        let mut n = new_ehr("ehr-a", &a.base, "ES384");
        n.backend_scopes = "system/Patient.r system/Practitioner.r system/AuditEvent.cr";
        let ehr = registry::add(&app.store, &n).unwrap();
        a.register_courier(&app, "courier").await;
        // The clinician and the patient as a launch would have linked them.
        let trust = |s: &str| ehr.trusts(s);
        let (dr, _) = identity::link(&app.store, &ehr.iss, &trust, &read_from(&app, &ehr, "Practitioner/dr-a").await).unwrap();
        let (pt, _) = identity::link(&app.store, &ehr.iss, &trust, &read_from(&app, &ehr, "Patient/a1").await).unwrap();
        let clinician = client_with_token(&issue(&app.tokens, &app.admin_client_id, "user/Communication.cruds", Some(&dr), Some(pt.strip_prefix("Patient/").unwrap())));
        let msg = json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": dr}, "recipient": [{"reference": pt}]});
        let send = || async { clinician.post(app.url("Communication")).header("content-type", FHIR_JSON).body(msg.to_string()).send().await.unwrap().status().as_u16() };
        // A second EHR that knows the clinician but not this patient hears nothing about them.
        let Some(b) = spawn_ehr("ehr-b") else { return };
        b.control(reqwest::Method::POST, "seed", Some(json!([person("Practitioner", "dr-b", &[("http://hl7.org/fhir/sid/us-npi", "1234567890")])]))).await;
        let mut nb = new_ehr("ehr-b", &b.base, "ES384");
        nb.backend_scopes = "system/Practitioner.r system/AuditEvent.cr";
        let ehr_b = registry::add(&app.store, &nb).unwrap();
        b.register_courier(&app, "courier").await;
        let (dr_b, _) = identity::link(&app.store, &ehr_b.iss, &|s| ehr_b.trusts(s), &read_from(&app, &ehr_b, "Practitioner/dr-b").await).unwrap();
        assert_eq!(dr_b, dr, "the same clinician in both EHRs");
        // Events about people no EHR knows stay home.
        app.create(&message("Patient/nobody", "2024-01-01", "x")).await;

        assert_eq!(send().await, 201);
        assert!(drained(&app).await, "delivered");
        let got = delivered(&a).await;
        assert_eq!(got.len(), 1, "one event (the create) concerns people ehr-a knows");
        let ev = &got.values().next().unwrap()[0];
        // Translated to the EHR's references; Courier's own resources as absolute URLs.
        let text = ev.to_string();
        assert!(ev.get("contained").is_none() && !text.contains("\"network\""), "no outcome or addresses leave Courier");
        assert!(text.contains("\"Practitioner/dr-a\"") && text.contains("\"Patient/a1\""), "{text}");
        assert!(!text.contains(&dr) && !text.contains(&pt), "no Courier ids leak to the EHR as references");
        assert!(text.contains(&format!("{}/Communication/", app.base)));

        // Outage: the EHR is down while events happen; nothing is lost, nothing doubled.
        a.control(reqwest::Method::POST, "down", Some(json!({}))).await;
        for _ in 0..3 {
            assert_eq!(send().await, 201);
        }
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let backlog = courier::smart::outbox::status(&app.store).unwrap();
        assert_eq!(backlog[0].pending, 3);
        assert!(backlog[0].oldest_pending.is_some() && backlog[0].last_error.is_some());
        let metrics = app.get("metrics").await.text().await.unwrap(); // a system token (anonymous: 401)
        assert!(metrics.contains(r#"courier_outbox_pending{ehr="ehr-a"} 3"#), "{metrics}");
        a.control(reqwest::Method::POST, "up", None).await;
        // Lost answers: the EHR commits the next two writes but the connection drops.
        a.control(reqwest::Method::POST, "faults", Some(json!({"drop_response_after_write": 2}))).await;
        // A restart in the middle: this instance stops; another on the same database takes over.
        app.outbox.abort();
        let app2 = spawn_instance_on(&app).await.unwrap();
        assert!(drained(&app2).await, "the new instance delivered the backlog");
        let got = delivered(&a).await;
        assert_eq!(got.len(), 4, "every event arrived");
        assert!(delivered(&b).await.is_empty(), "ehr-b does not know the patient: it received nothing");
        assert!(got.values().all(|copies| copies.len() == 1), "each exactly once: {:?}", got.values().map(Vec::len).collect::<Vec<_>>());
        let st = courier::smart::outbox::status(&app2.store).unwrap();
        assert_eq!((st[0].pending, st[0].delivered), (0, 4));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_are_checked_like_a_relying_party_must() {
    use crate::auth::{now, rs384, serve_jwks};
    use courier::smart::launch::verify_id_token;
    let (key, jwks, _) = rs384();
    let url = serve_jwks(jwks).await;
    let cache = courier::auth::clients::JwksCache::new(courier::outbound::Outbound::any_address());
    let iss = "http://127.0.0.1:9/fhir";
    let sign =
        |claims: Value, alg: jsonwebtoken::Algorithm, k: &jsonwebtoken::EncodingKey, kid: &str| {
            let mut h = jsonwebtoken::Header::new(alg);
            h.kid = Some(kid.into());
            jsonwebtoken::encode(&h, &claims, k).unwrap()
        };
    let good = json!({"iss": iss, "aud": "courier", "sub": "u1", "exp": now() + 60, "iat": now(), "nonce": "n1", "fhirUser": "Practitioner/dr-a"});
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    let check = |t: String| {
        let cache = &cache;
        let url = url.clone();
        async move { verify_id_token(cache, &url, iss, "courier", &t, "n1").await }
    };
    assert_eq!(
        check(sign(good.clone(), key.alg, &key.key, "rs-1"))
            .await
            .unwrap()["fhirUser"],
        "Practitioner/dr-a"
    );
    for (why, token) in [
        (
            "expired",
            sign(with("exp", json!(now() - 120)), key.alg, &key.key, "rs-1"),
        ),
        (
            "wrong audience",
            sign(
                with("aud", json!("someone-else")),
                key.alg,
                &key.key,
                "rs-1",
            ),
        ),
        (
            "wrong issuer",
            sign(
                with("iss", json!("https://evil.example.org")),
                key.alg,
                &key.key,
                "rs-1",
            ),
        ),
        (
            "wrong nonce",
            sign(with("nonce", json!("n2")), key.alg, &key.key, "rs-1"),
        ),
        (
            "unknown kid",
            sign(good.clone(), key.alg, &key.key, "other"),
        ),
        (
            "HS256 with the public key",
            sign(
                good.clone(),
                jsonwebtoken::Algorithm::HS256,
                &jsonwebtoken::EncodingKey::from_secret(b"x"),
                "rs-1",
            ),
        ),
        ("another key", {
            let (k2, _, _) = rs384();
            sign(good.clone(), k2.alg, &k2.key, "rs-1")
        }),
    ] {
        assert!(check(token).await.is_err(), "{why} accepted");
    }
}

/// OpenID Connect Core §10.1 asks for `kid` only when the JWKS holds several keys, and the SMART
/// App Launcher signs its id_tokens without one: the key that fits the `alg` is used, several are
/// tried (at most 4), and a refusal names its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn id_tokens_without_kid_are_checked_with_the_keys_that_fit() {
    use crate::auth::{now, rs384, serve_jwks};
    use courier::smart::launch::verify_id_token;
    let iss = "http://127.0.0.1:9/fhir";
    let claims = json!({"iss": iss, "aud": "courier", "sub": "u1", "exp": now() + 60, "iat": now(), "nonce": "n1"});
    let unsigned_kid = |k: &crate::auth::Signer| {
        jsonwebtoken::encode(&jsonwebtoken::Header::new(k.alg), &claims, &k.key).unwrap()
    };
    let jwks_of = |keys: Vec<Value>| json!({"keys": keys});
    let key_of = |jwks: &Value, kid: &str| {
        let mut k = jwks["keys"][0].clone();
        k["kid"] = json!(kid);
        k
    };
    let (real, real_jwks, _) = rs384();
    let decoys: Vec<Value> = (0..5)
        .map(|i| key_of(&rs384().1, &format!("decoy-{i}")))
        .collect();
    let check = |url: String, t: String| async move {
        let cache =
            courier::auth::clients::JwksCache::new(courier::outbound::Outbound::any_address());
        verify_id_token(&cache, &url, iss, "courier", &t, "n1").await
    };
    // One key: it is the one.
    let url = serve_jwks(real_jwks.clone()).await;
    assert_eq!(
        check(url.clone(), unsigned_kid(&real)).await.unwrap()["sub"],
        "u1"
    );
    // Two decoys before it (an EHR mid-rotation): each is tried.
    let mut keys = decoys[..2].to_vec();
    keys.push(key_of(&real_jwks, "current"));
    let url = serve_jwks(jwks_of(keys)).await;
    assert_eq!(check(url, unsigned_kid(&real)).await.unwrap()["sub"], "u1");
    // Beyond the bound, a readable refusal.
    let mut keys = decoys.clone();
    keys.push(key_of(&real_jwks, "current"));
    let url = serve_jwks(jwks_of(keys)).await;
    let why = check(url, unsigned_kid(&real)).await.unwrap_err();
    assert!(
        why.contains("names no kid") && why.contains("none of"),
        "{why}"
    );
    // A token no key of the EHR signed, and a token whose alg no key fits.
    let url = serve_jwks(real_jwks.clone()).await;
    let (other, _, _) = rs384();
    assert!(check(url.clone(), unsigned_kid(&other)).await.is_err());
    let es = jsonwebtoken::EncodingKey::from_ec_pem(es384_key().0.as_bytes()).unwrap();
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES384),
        &claims,
        &es,
    )
    .unwrap();
    let why = check(url.clone(), t).await.unwrap_err();
    assert!(why.contains("no ES384 key"), "{why}");
    // Clock skew: an id_token that expired 30 s ago (the EHR's clock is behind) still passes.
    let mut late = claims.clone();
    late["exp"] = json!(now() - 30);
    let t = jsonwebtoken::encode(&jsonwebtoken::Header::new(real.alg), &late, &real.key).unwrap();
    assert!(check(url, t).await.is_ok(), "60 s of clock skew is allowed");
}

/// The same, end to end: the test EHR signs its id_tokens without `kid` and publishes decoy keys
/// beside its signing key, as the SMART App Launcher (no kid) and an EHR mid-rotation do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ehr_launch_whose_id_token_has_no_kid_signs_in() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let Some(a) = spawn_ehr("ehr-a") else { return };
    launch_fixture(&app, &a).await;
    let set = a
        .control(
            reqwest::Method::POST,
            "settings",
            Some(json!({"id_token_kid": false, "jwks_decoys": 2})),
        )
        .await;
    assert_eq!(set["id_token_kid"], false, "{set}");
    let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
    assert!(
        s["fhirUser"].as_str().unwrap().starts_with("Practitioner/"),
        "{s}"
    );
    let token = s["access_token"].as_str().unwrap();
    assert_eq!(status_with(&app, token).await, 200);
}

/// An EHR launch of `user` with `patient` in context, through to the hand-off page's session.
pub async fn launch_as(app: &TestApp, ehr: &TestEhr, patient: &str, user: &str) -> Value {
    let l = ehr
        .control(
            reqwest::Method::POST,
            "launches",
            Some(json!({"patient": patient, "user": user})),
        )
        .await;
    let (_, to_ehr, _) = step(&app.url(&format!(
        "launch?iss={}&launch={}",
        ehr.base,
        l["launch"].as_str().unwrap()
    )))
    .await;
    let (_, back, _) = step(&to_ehr.unwrap()).await;
    let (s, _, page) = step(&back.unwrap()).await;
    assert_eq!(s, 200, "{page}");
    session_of(&page)
}

pub async fn session_post(
    app: &TestApp,
    path: &str,
    handle: &str,
    bearer: Option<&str>,
) -> (u16, Value) {
    let mut r = app
        .anonymous
        .post(app.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("session={handle}"));
    if let Some(t) = bearer {
        r = r.bearer_auth(t);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn launch_fixture(app: &TestApp, ehr: &TestEhr) {
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
    n.launch_scopes = "openid fhirUser launch online_access user/Patient.r user/Practitioner.r";
    registry::add(&app.store, &n).unwrap();
    ehr.register_courier(app, "courier").await;
}

both_backends! {
    async fn sessions_refresh_the_ehr_token_while_active_and_end_on_logout(app: TestApp) {
        let Some(a) = spawn_ehr("ehr-a") else { return };
        launch_fixture(&app, &a).await;
        // The EHR's tokens live 2 s here, so the next refresh must renew it at the EHR.
        a.control(reqwest::Method::POST, "settings", Some(json!({"token_ttl": 2}))).await;
        let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
        let handle = s["session"].as_str().unwrap().to_string();
        assert!(handle.len() >= 22);
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let before = a.control(reqwest::Method::GET, "counters", None).await["token"]["by_grant_type"]["refresh_token"].as_u64().unwrap_or(0);
        let (st, fresh) = session_post(&app, "smart/session/refresh", &handle, None).await;
        assert_eq!(st, 200, "{fresh}");
        let after = a.control(reqwest::Method::GET, "counters", None).await["token"]["by_grant_type"]["refresh_token"].as_u64().unwrap_or(0);
        assert_eq!(after, before + 1, "the EHR token was refreshed");
        let token = fresh["access_token"].as_str().unwrap().to_string();
        assert_ne!(token, s["access_token"].as_str().unwrap());
        assert_eq!(status_with(&app, &token).await, 200);
        // Logout: the session and the token end at once.
        let (st, _) = session_post(&app, "smart/logout", &handle, Some(&token)).await;
        assert_eq!(st, 200);
        assert_eq!(status_with(&app, &token).await, 401);
        // So does every earlier token of the session, the launch's own included.
        let first = s["access_token"].as_str().unwrap();
        assert_eq!(status_with(&app, first).await, 401);
        assert_eq!(session_post(&app, "smart/session/refresh", &handle, None).await.0, 401);
        assert_eq!(session_post(&app, "smart/session/refresh", "not-a-session", None).await.0, 401);
        // A refresh loop is bounded: at most 30 tokens of one session are alive at once (the
        // app holds one or two), the row does not grow past them, and ending the session still
        // revokes every one, those handed out before the refusals included.
        a.control(reqwest::Method::POST, "settings", Some(json!({"token_ttl": 3600}))).await;
        let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
        let handle = s["session"].as_str().unwrap().to_string();
        // An entry long expired is dropped from the list by the next refresh.
        app.store.execute("UPDATE ehr_sessions SET token_jtis = token_jtis || ' stale-jti:1000'", vec![]).unwrap();
        let (st, body) = session_post(&app, "smart/session/refresh", &handle, None).await;
        assert_eq!(st, 200, "{body}");
        let stale = count(&app, "SELECT COUNT(*) AS n FROM ehr_sessions WHERE token_jtis LIKE '%stale-jti%'", vec![]);
        assert_eq!(stale, 0, "the expired entry is gone");
        let mut handed = vec![s["access_token"].as_str().unwrap().to_string(), body["access_token"].as_str().unwrap().to_string()];
        let mut refused = 0;
        for _ in 0..40 {
            let (st, body) = session_post(&app, "smart/session/refresh", &handle, None).await;
            match st {
                200 => handed.push(body["access_token"].as_str().unwrap().to_string()),
                429 => {
                    refused += 1;
                    assert_eq!(body["error"], "slow_down", "{body}");
                }
                _ => panic!("{st} {body}"),
            }
        }
        assert_eq!(handed.len(), 30, "the launch's token and 29 refreshes");
        assert_eq!(refused, 12);
        let longest = count(&app, "SELECT CAST(MAX(length(token_jtis)) AS BIGINT) AS n FROM ehr_sessions", vec![]);
        assert!(longest < 30 * 60, "{longest}");
        assert_eq!(status_with(&app, handed.last().unwrap()).await, 200, "the session goes on");
        let (st, _) = session_post(&app, "smart/logout", &handle, None).await;
        assert_eq!(st, 200);
        for t in &handed {
            assert_eq!(status_with(&app, t).await, 401);
        }
        a.control(reqwest::Method::POST, "settings", Some(json!({"token_ttl": 2}))).await;
        // expires_in sent as a string ("2"): read as 2 s, so each refresh renews at the EHR (read
        // as absent, the token would count as good for 300 s and no refresh would reach it).
        a.control(reqwest::Method::POST, "settings", Some(json!({"expires_in_form": "string"}))).await;
        let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
        let refreshes = || async { a.control(reqwest::Method::GET, "counters", None).await["token"]["by_grant_type"]["refresh_token"].as_u64().unwrap_or(0) };
        for _ in 0..2 {
            let before = refreshes().await;
            let (st, body) = session_post(&app, "smart/session/refresh", s["session"].as_str().unwrap(), None).await;
            assert_eq!(st, 200, "{body}");
            assert_eq!(refreshes().await, before + 1, "renewed at the EHR");
        }
        // A refresh answered with a token that is not a bearer token ends the session (Courier
        // could only send it as one).
        a.control(reqwest::Method::POST, "settings", Some(json!({"expires_in_form": "number", "token_type": "MAC"}))).await;
        let (st, body) = session_post(&app, "smart/session/refresh", s["session"].as_str().unwrap(), None).await;
        assert_eq!(st, 401, "{body}");
        assert_eq!(body["error"], "session_ended", "{body}");
        a.control(reqwest::Method::POST, "settings", Some(json!({"token_type": "Bearer"}))).await;
        // When the EHR revokes the grant, the next refresh that needs it ends the session.
        let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
        a.control(reqwest::Method::POST, "revoke", Some(json!({}))).await;
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        let (st, body) = session_post(&app, "smart/session/refresh", s["session"].as_str().unwrap(), None).await;
        assert_eq!(st, 401, "{body}");
        let logouts = app.get_json("AuditEvent?subtype=http://dicom.nema.org/resources/ontology/DCM|110123").await;
        assert!(ids(&logouts).len() >= 2, "logouts are audited");
    }
}

/// A sign-out Courier could not carry out (its database refusing writes) is not answered "signed
/// out": 503, which the app tries again, and the tokens it could not revoke are revoked when it can.
/// PostgreSQL only: its "full disk" refuses every insert, SQLite's only those needing a new page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_out_that_cannot_be_carried_out_is_not_said_to_be_done() {
    let Some(app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    let Some(a) = spawn_ehr("ehr-a") else { return };
    launch_fixture(&app, &a).await;
    let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
    let (handle, token) = (
        s["session"].as_str().unwrap(),
        s["access_token"].as_str().unwrap(),
    );
    crate::failclosed::fill_disk(&app);
    let (st, body) = session_post(&app, "smart/logout", handle, Some(token)).await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["signed_out"], false, "{body}");
    crate::failclosed::free_disk(&app);
    let (st, body) = session_post(&app, "smart/logout", handle, Some(token)).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(status_with(&app, token).await, 401);
    assert_eq!(
        session_post(&app, "smart/session/refresh", handle, None)
            .await
            .0,
        401
    );
    // A session past its idle limit, which Courier cannot end now: its refresh is 503, not
    // "signed out" (and not a fresh token); once it can, the session ends and its token with it.
    let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
    let (handle, token) = (
        s["session"].as_str().unwrap(),
        s["access_token"].as_str().unwrap(),
    );
    app.store
        .execute("UPDATE ehr_sessions SET last_active = 0", vec![])
        .unwrap();
    crate::failclosed::fill_disk(&app);
    let (st, body) = session_post(&app, "smart/session/refresh", handle, None).await;
    assert_eq!(st, 503, "{body}");
    assert_eq!(body["error"], "temporarily_unavailable", "{body}");
    assert!(body["access_token"].is_null());
    crate::failclosed::free_disk(&app);
    let (st, body) = session_post(&app, "smart/session/refresh", handle, None).await;
    assert_eq!(st, 401, "{body}");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("inactivity"));
    assert_eq!(status_with(&app, token).await, 401);
}

/// A SQLite Courier whose sessions idle out after `idle` seconds, with an EHR, and a clinician's
/// session launched from it (the EHR is kept running while the pair is held).
async fn signed_in_with_idle_limit(idle: i64) -> Option<(TestApp, TestEhr, Value)> {
    let app = spawn_app_with(Backend::Sqlite, |s| s.idle_timeout_secs = idle).await?;
    let a = spawn_ehr("ehr-a")?;
    launch_fixture(&app, &a).await;
    let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
    Some((app, a, s))
}

// A person who stops using Courier holds no valid token past the idle limit, even when nothing
// asks for a refresh (a probe: with a 20 s limit, the session's last token still read messages
// at 60 s, as tokens lived 5 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_token_outlives_the_idle_limit() {
    let Some((app, _ehr, s)) = signed_in_with_idle_limit(2).await else {
        return;
    };
    let token = s["access_token"].as_str().unwrap();
    let c = claims(token);
    assert_eq!(
        c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(),
        2,
        "{c}"
    );
    assert_eq!(status_with(&app, token).await, 200);
    // Past its expiry and the verifier's 5 s leeway, with no refresh asked for.
    tokio::time::sleep(std::time::Duration::from_millis(8200)).await;
    assert_eq!(status_with(&app, token).await, 401);
}

// An abandoned session is logged off by Courier's own pass, not only at its next refresh: its
// tokens revoked, the EHR's tokens it held gone, the log-off audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_sessions_are_logged_off_without_a_refresh() {
    let Some((app, _ehr, s)) = signed_in_with_idle_limit(2).await else {
        return;
    };
    let token = s["access_token"].as_str().unwrap().to_string();
    let sweep = || {
        let store = app.store.clone();
        async move {
            tokio::task::spawn_blocking(move || courier::smart::session::sweep(&store, 2))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(sweep().await, 0, "not idle yet");
    assert_eq!(status_with(&app, &token).await, 200);
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    assert_eq!(sweep().await, 1);
    assert_eq!(
        count(&app, "SELECT COUNT(*) AS n FROM ehr_sessions", vec![]),
        0,
        "the session and the EHR's tokens it held are gone"
    );
    // Revoked (its expiry's leeway would still let it in otherwise).
    assert_eq!(status_with(&app, &token).await, 401);
    let trail = app
        .get_json("AuditEvent?subtype=http://dicom.nema.org/resources/ontology/DCM|110123")
        .await;
    assert!(
        trail
            .to_string()
            .contains("automatic log-off after inactivity"),
        "{trail}"
    );
    assert_eq!(sweep().await, 0, "once");
}

// A refresh the app asks for while the person does nothing (its socket's token ran out) renews
// the token but is not activity: the session still ends at the idle limit, and the token lives
// no longer than that (a probe: refreshing at each socket expiry kept an idle session for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_in_the_background_is_not_activity() {
    let Some((app, _ehr, s)) = signed_in_with_idle_limit(4).await else {
        return;
    };
    let handle = s["session"].as_str().unwrap();
    let in_background = format!("{handle}&background=1");
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let (st, body) = session_post(&app, "smart/session/refresh", &in_background, None).await;
    assert_eq!(st, 200, "{body}");
    let c = claims(body["access_token"].as_str().unwrap());
    let life = c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
    assert!(
        (1..=2).contains(&life),
        "until the idle limit only: {life} s"
    );
    // Past the limit counted from the launch (whole seconds: more than 4 means 5 or more).
    tokio::time::sleep(std::time::Duration::from_millis(3900)).await;
    let (st, body) = session_post(&app, "smart/session/refresh", &in_background, None).await;
    assert_eq!(st, 401, "{body}");
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("inactivity"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_logged_off() {
    let Some((app, _ehr, s)) = signed_in_with_idle_limit(1).await else {
        return;
    };
    let handle = s["session"].as_str().unwrap();
    assert_eq!(
        session_post(&app, "smart/session/refresh", handle, None)
            .await
            .0,
        200,
        "active"
    );
    tokio::time::sleep(std::time::Duration::from_millis(2200)).await;
    let (st, body) = session_post(&app, "smart/session/refresh", handle, None).await;
    assert_eq!(st, 401);
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("inactivity"));
    let first = s["access_token"].as_str().unwrap();
    assert_eq!(
        status_with(&app, first).await,
        401,
        "its tokens end with it"
    );
}

// A person active while their EHR cannot be reached stays signed in: the refresh Courier answers
// 503 ("try again shortly") still counts as activity (a review: a clinician pressing "Stay
// signed in" while the EHR was down was signed out at the idle limit counted from before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_while_the_ehr_is_down_keeps_the_session_active() {
    let Some(app) = spawn_app_with(Backend::Sqlite, |s| s.idle_timeout_secs = 4).await else {
        return;
    };
    let Some(a) = spawn_ehr("ehr-a") else { return };
    launch_fixture(&app, &a).await;
    // The EHR's tokens live 1 s, so each refresh needs the EHR.
    a.control(
        reqwest::Method::POST,
        "settings",
        Some(json!({"token_ttl": 1})),
    )
    .await;
    let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
    let handle = s["session"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    a.control(reqwest::Method::POST, "down", Some(json!({})))
        .await;
    let (st, body) = session_post(&app, "smart/session/refresh", &handle, None).await;
    assert_eq!(st, 503, "{body}");
    a.control(reqwest::Method::POST, "up", None).await;
    // 5 s after the launch, 2.5 s after the person was last active.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let (st, body) = session_post(&app, "smart/session/refresh", &handle, None).await;
    assert_eq!(st, 200, "active 2.5 s ago, the session goes on: {body}");
    // EHR tokens that cannot be read (a destroyed key, a damaged row) will never be: the session
    // ends, instead of answering "try again" — and counting as activity — for ever.
    app.store
        .execute(
            "UPDATE ehr_sessions SET ehr_tokens = ?, ehr_expires_at = 0",
            vec![courier::store::db::Bind::Blob(vec![0u8; 40])],
        )
        .unwrap();
    let (st, body) = session_post(&app, "smart/session/refresh", &handle, None).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (401, Some("session_ended")),
        "{body}"
    );
}

both_backends! {
    async fn a_clinician_files_a_thread_to_the_chart_once(app: TestApp) {
        let Some(a) = spawn_ehr("ehr-a") else { return };
        a.control(reqwest::Method::POST, "seed", Some(json!([person("Patient", "a1", &[]), person("Practitioner", "dr-a", &[])]))).await;
        let mut n = new_ehr("ehr-a", &a.base, "ES384");
        n.launch_scopes = "openid fhirUser launch online_access user/Patient.r user/Practitioner.r";
        n.backend_scopes = "system/AuditEvent.c system/Communication.crs";
        registry::add(&app.store, &n).unwrap();
        a.register_courier(&app, "courier").await;
        // This EHR sends expires_in as a string ("300"), at sign-in and to Backend Services (the
        // filing's token): both read it.
        a.control(reqwest::Method::POST, "settings", Some(json!({"expires_in_form": "string"}))).await;
        let s = launch_as(&app, &a, "a1", "Practitioner/dr-a").await;
        let (dr, pt) = (s["fhirUser"].as_str().unwrap(), s["patient"].as_str().unwrap());
        let clinician = client_with_token(s["access_token"].as_str().unwrap());
        let post = |body: Value| { let c = clinician.clone(); let url = app.url("Communication"); async move {
            let r = c.post(url).header("content-type", FHIR_JSON).body(body.to_string()).send().await.unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string()
        }};
        let thread = post(json!({"resourceType": "Communication", "status": "in-progress", "subject": {"reference": pt}, "sender": {"reference": dr}, "recipient": [{"reference": pt}], "topic": {"text": "Lab results"}})).await;
        for text in ["Your potassium is normal", "Please repeat in 3 months"] {
            // A participant's extension is its writer's claim ("on behalf of" someone): not filed.
            post(json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": format!("Communication/{thread}")}],
                "subject": {"reference": pt}, "recipient": [{"reference": pt}], "payload": [{"contentString": text}],
                "sender": {"reference": dr, "extension": [{"url": "http://example.org/on-behalf-of", "valueReference": {"reference": "Practitioner/dr-b"}}]}})).await;
        }
        // A side note to a colleague in the patient's thread: staff-only (labelled NOPAT).
        post(json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": format!("Communication/{thread}")}],
            "subject": {"reference": pt}, "sender": {"reference": dr}, "recipient": [{"reference": "Practitioner/dr-b"}],
            "payload": [{"contentString": "SIDENOTE: recheck adherence"}]})).await;
        let file = || clinician.post(app.url(&format!("Communication/{thread}/$file-to-chart"))).send();
        let r = file().await.unwrap();
        assert_eq!(r.status(), 202);
        let said = r.text().await.unwrap();
        assert!(said.contains("4 Communications queued") && said.contains("1 of them staff-only"), "{said}");
        assert!(drained(&app).await, "{:?}", courier::smart::outbox::status(&app.store).unwrap());
        let filed = || async { a.control(reqwest::Method::GET, "resources/Communication", None).await["resources"].as_array().unwrap().clone() };
        let chart = filed().await;
        assert_eq!(chart.len(), 4, "the header, both messages and the side note");
        for c in &chart {
            assert_eq!(c["subject"]["reference"], "Patient/a1", "the EHR's own reference");
            assert_eq!(c["sender"]["reference"], "Practitioner/dr-a");
            assert!(c["sender"].get("extension").is_none() && !c.to_string().contains("on-behalf-of"), "{c}");
            assert!(c["identifier"].to_string().contains("urn:courier:communication"));
            // The side note keeps its label in the chart; the others carry none.
            let note = c.to_string().contains("SIDENOTE");
            let labelled = c["meta"]["security"].as_array().is_some_and(|l| l.iter().any(|x| x["code"] == "NOPAT"
                && x["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActCode"));
            assert_eq!(labelled, note, "{c}");
        }
        // Filing again adds nothing.
        assert_eq!(file().await.unwrap().status(), 202);
        assert!(drained(&app).await);
        assert_eq!(filed().await.len(), 4);
        // Only a clinician may file, and only what they can see.
        let patient = client_with_token(&issue(&app.tokens, &app.admin_client_id, "patient/Communication.rs", Some(pt), Some(pt.strip_prefix("Patient/").unwrap())));
        assert_eq!(patient.post(app.url(&format!("Communication/{thread}/$file-to-chart"))).send().await.unwrap().status(), 403);
        let other = client_with_token(&issue(&app.tokens, &app.admin_client_id, "user/Communication.crs", Some("Practitioner/someone-else"), None));
        assert_eq!(other.post(app.url(&format!("Communication/{thread}/$file-to-chart"))).send().await.unwrap().status(), 404);
        // Filing writes to the chart: a token that may only read cannot.
        let reader = client_with_token(&issue(&app.tokens, &app.admin_client_id, "user/Communication.rs", Some("Practitioner/someone-else"), None));
        assert_eq!(reader.post(app.url(&format!("Communication/{thread}/$file-to-chart"))).send().await.unwrap().status(), 403);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehrs_from_the_config_file_are_registered_and_updated() {
    let cfg = |scope: &str| courier::config::EhrConfig {
        name: "from-file".into(),
        iss: "https://ehr.example.org/fhir".into(),
        client_id: "courier".into(),
        alg: "ES384".into(),
        launch_scope: "openid fhirUser launch".into(),
        backend_scope: scope.into(),
        trusted_systems: courier::config::default_trusted_systems(),
        mfa: Some("always".into()),
        portal_mfa: None,
        mfa_acr: Some("urn:example:loa:mfa".into()),
        backend_token_url: None,
        audit_base: None,
    };
    let first = cfg("system/AuditEvent.c");
    let app = spawn_app_with(Backend::Sqlite, move |s| s.ehr = vec![first])
        .await
        .unwrap();
    let e = registry::get(&app.store, "from-file")
        .unwrap()
        .expect("registered at start");
    assert_eq!(e.backend_scopes, "system/AuditEvent.c");
    let m = courier::mfa::settings(&app.store, "from-file").unwrap();
    assert_eq!(
        (m.launch, m.portal),
        (courier::mfa::Policy::Always, courier::mfa::Policy::TrustEhr)
    );
    assert_eq!(m.acr, ["urn:example:loa:mfa"]);
    // A restart with changed settings updates them and keeps the key the EHR registered.
    let url = app.database_url.clone();
    let mut second = cfg("system/AuditEvent.c system/Communication.c");
    second.backend_token_url = Some("https://auth.example.org/backend/token".into());
    second.audit_base = Some("https://ehr.example.org/audit/".into());
    let app2 = spawn_app_with(Backend::Sqlite, move |s| {
        s.database_url = url;
        s.ehr = vec![second];
    })
    .await
    .unwrap();
    let e2 = registry::get(&app2.store, "from-file").unwrap().unwrap();
    assert_eq!(
        e2.backend_scopes,
        "system/AuditEvent.c system/Communication.c"
    );
    assert_eq!(e2.kid, e.kid);
    assert_eq!(
        (e2.backend_token_url.as_deref(), e2.audit_base.as_deref()),
        (
            Some("https://auth.example.org/backend/token"),
            Some("https://ehr.example.org/audit")
        )
    );
    // A bad override is refused, naming the table; none given clears them.
    let mut bad = cfg("system/AuditEvent.c");
    bad.audit_base = Some("http://ehr.example.org/audit".into());
    let err = registry::sync(&app2.store, &[bad]).unwrap_err().to_string();
    assert!(
        err.contains("[[ehr]] from-file") && err.contains("https"),
        "{err}"
    );
    registry::sync(&app2.store, &[cfg("system/AuditEvent.c")]).unwrap();
    let e3 = registry::get(&app2.store, "from-file").unwrap().unwrap();
    assert_eq!((e3.backend_token_url, e3.audit_base), (None, None));
    // Another server under the same name is refused (its sessions and deliveries would follow it).
    let mut moved = cfg("system/AuditEvent.c");
    moved.iss = "https://elsewhere.example.org/fhir".into();
    let err = registry::sync(&app2.store, &[moved])
        .unwrap_err()
        .to_string();
    assert!(err.contains("remove it"), "{err}");
    // The file format.
    let parsed: courier::config::Settings = toml::from_str(
        "[[ehr]]\nname = \"a\"\niss = \"https://e.example.org/fhir\"\nclient_id = \"c\"\n",
    )
    .unwrap();
    assert_eq!(parsed.ehr[0].alg, "ES384");
}

both_backends! {
    // Many creates at once (one group commit on PostgreSQL, whose outbox rows are made for the
    // whole group with one lookup): each create's AuditEvent goes to exactly the EHRs that know
    // its patient, never to another patient's EHR, and an unlinked patient's to none.
    async fn concurrent_creates_queue_each_audit_event_for_its_own_patients_ehr(app: TestApp) {
        registry::add(&app.store, &new_ehr("ehr-a", "https://ehr-a.invalid/fhir", "ES384")).unwrap();
        registry::add(&app.store, &new_ehr("ehr-b", "https://ehr-b.invalid/fhir", "ES384")).unwrap();
        let link = |iss: &str, mrn: &str| {
            courier::smart::identity::link(&app.store, iss, &|_| true, &json!({"resourceType": "Patient", "id": mrn}))
                .unwrap()
                .0
        };
        let (a, b) = (link("https://ehr-a.invalid/fhir", "mrn-a"), link("https://ehr-b.invalid/fhir", "mrn-b"));
        let patients = [a.clone(), b.clone(), "Patient/unlinked".to_string()];
        let bodies: Vec<Value> = (0..30)
            .map(|i| {
                let mut m = message(&patients[i % 3], "2026-12-06T09:00:00Z", &format!("queued {i}"));
                m["subject"] = json!({"reference": patients[i % 3]});
                m
            })
            .collect();
        let answers = futures::future::join_all(bodies.iter().map(|m| app.post("Communication", m))).await;
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Text)]
            ehr: String,
        }
        for (i, r) in answers.into_iter().enumerate() {
            assert_eq!(r.status(), 201);
            let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
            let events = app.get_json(&format!("AuditEvent?entity=Communication/{id}&subtype=create")).await;
            let audit = ids(&events);
            assert_eq!(audit.len(), 1, "{events}");
            let rows: Vec<Row> = app
                .store
                .query(
                    "SELECT ehr FROM outbox WHERE res_type = 'AuditEvent' AND res_id = ? ORDER BY ehr",
                    vec![audit[0].clone().into()],
                )
                .unwrap();
            let got: Vec<String> = rows.into_iter().map(|r| r.ehr).collect();
            let want: Vec<String> = match i % 3 {
                0 => vec!["ehr-a".into()],
                1 => vec!["ehr-b".into()],
                _ => vec![],
            };
            assert_eq!(got, want, "the AuditEvent of the create about {}", patients[i % 3]);
        }
    }
}
