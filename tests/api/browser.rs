//! The web app in real Chromium (Debian `chromium` + `playwright-core`): a patient (portal,
//! standalone launch, phone width) and a clinician (EHR launch) message each other live. The
//! browser part is `tests/ehr/browser.mjs`; screenshots land in `target/browser-artifacts/`.

use crate::ehr::{launch_as, new_ehr, person, spawn_ehr};
use crate::helpers::*;
use courier::smart::registry;
use serde_json::{json, Value};

fn chromium() -> Option<String> {
    let path = std::env::var("COURIER_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if std::path::Path::new(&path).exists() {
        return Some(path);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but Chromium is not installed at {path} (apt-get install chromium)");
    }
    eprintln!("skipped: no Chromium at {path}");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinician_and_patient_message_each_other_in_real_browsers() {
    let Some(chromium) = chromium() else { return };
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.message_pools = vec![("Nurse line".into(), "Group/nurse-line".into())];
    })
    .await
    .unwrap();
    let Some(ehr) = spawn_ehr("ehr-a") else {
        return;
    };
    let mut patient = person("Patient", "a1", &[]);
    patient["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
    patient["birthDate"] = json!("1990-12-10");
    patient["gender"] = json!("female");
    patient["identifier"] = json!([{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]}, "system": "urn:mrn", "value": "MRN-0042"}]);
    let mut other = person("Patient", "b2", &[]);
    other["name"] = json!([{"given": ["Bob"], "family": "Other"}]);
    other["birthDate"] = json!("1950-05-11");
    let mut clinician = person("Practitioner", "dr-a", &[]);
    clinician["name"] = json!([{"given": ["Grace"], "family": "Hopper"}]);
    let mut colleague = person("Practitioner", "dr-b", &[]);
    colleague["name"] = json!([{"given": ["Alan"], "family": "Turing"}]);
    colleague["qualification"] = json!([{"code": {"text": "Nurse practitioner"}}]);
    let team = json!({"resourceType": "CareTeam", "id": "team-a1", "status": "active",
        "subject": {"reference": "Patient/a1"}, "participant": [{"member": {"reference": "Practitioner/dr-b"}}]});
    ehr.control(
        reqwest::Method::POST,
        "seed",
        Some(json!([patient, other, clinician, colleague, team])),
    )
    .await;
    let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
    n.launch_scopes =
        "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r user/CareTeam.rs patient/CareTeam.rs";
    registry::add(&app.store, &n).unwrap();
    ehr.register_courier(&app, "courier").await;
    // The shared inbox reaches someone (a pool without members is not offered).
    let pool = json!({"resourceType": "Group", "id": "nurse-line", "type": "practitioner", "actual": true,
        "member": [{"entity": {"reference": "Practitioner/nurse-1"}}]});
    assert!(app
        .put("Group/nurse-line", &pool)
        .await
        .status()
        .is_success());
    // Earlier launches (as an EHR would have made them): Grace with Bob and with Ada in context,
    // and her colleague Alan — so that Courier knows them, and there is history to show.
    let with_bob = launch_as(&app, &ehr, "b2", "Practitioner/dr-a").await;
    let with_ada = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
    let alan = launch_as(&app, &ehr, "a1", "Practitioner/dr-b").await;
    let (grace, ada, bob) = (
        with_ada["fhirUser"].as_str().unwrap().to_string(),
        with_ada["patient"].as_str().unwrap().to_string(),
        with_bob["patient"].as_str().unwrap().to_string(),
    );
    let alan_ref = alan["fhirUser"].as_str().unwrap().to_string();
    let post = |token: &str, body: Value| {
        let c = client_with_token(token);
        let url = app.url("Communication");
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
    let thread = |token: String,
                  about: String,
                  with: String,
                  topic: &'static str,
                  text: &'static str| {
        let grace = grace.clone();
        async move {
            let h = post(&token, json!({"resourceType": "Communication", "status": "in-progress", "topic": {"text": topic},
                "subject": {"reference": about}, "sender": {"reference": grace}, "recipient": [{"reference": with}]})).await;
            post(&token, json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": format!("Communication/{h}")}],
                "subject": {"reference": about}, "sender": {"reference": grace}, "recipient": [{"reference": with}],
                "sent": "2026-12-01T09:00:00Z", "payload": [{"contentString": text}]})).await;
            h
        }
    };
    // Two threads with the same subject about two patients; a long thread with Ada.
    let bob_token = with_bob["access_token"].as_str().unwrap().to_string();
    let ada_token = with_ada["access_token"].as_str().unwrap().to_string();
    let bobs = thread(
        bob_token.clone(),
        bob.clone(),
        bob.clone(),
        "Chest pain after climbing stairs",
        "How is the knee today?",
    )
    .await;
    // An out-of-office reply Courier wrote for Grace in it (as the job writes it, through the
    // store: no client may set the mark): marked as automatic where shown.
    let auto = json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": format!("Communication/{bobs}")}],
        "subject": {"reference": bob}, "sender": {"reference": grace}, "recipient": [{"reference": bob}],
        "sent": "2026-12-01T08:00:00Z", "payload": [{"contentString": "Away until Monday."}],
        "extension": [{"url": courier::messaging::away::EXT_AUTOMATIC, "valueCode": "auto-reply"}]});
    let (store, ctx) = (
        app.store.clone(),
        courier::audit::Context {
            request_id: "out-of-office".into(),
            client_address: "127.0.0.1".into(),
            base_url: app.store.base_url.clone(),
            ..Default::default()
        },
    );
    tokio::task::spawn_blocking(move || {
        store.write(
            vec![courier::store::WriteOp::Create {
                res_type: "Communication".into(),
                id: courier::fhir::rest::new_id(),
                resource: courier::store::Incoming::from_value(auto),
                if_none_exist: None,
            }],
            &ctx,
        )
    })
    .await
    .unwrap()
    .unwrap();
    thread(
        ada_token.clone(),
        ada.clone(),
        ada.clone(),
        "Chest pain after climbing stairs",
        "Any chest pain since Monday?",
    )
    .await;
    let long = thread(
        ada_token.clone(),
        ada.clone(),
        ada.clone(),
        "Blood pressure diary",
        "Please send your readings daily.",
    )
    .await;
    for i in 0..119 {
        let from_ada = i % 2 == 0;
        let (s, r) = if from_ada {
            (&ada, &grace)
        } else {
            (&grace, &ada)
        };
        let body = json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": format!("Communication/{long}")}],
            "subject": {"reference": ada}, "sender": {"reference": s}, "recipient": [{"reference": r}],
            "sent": format!("2026-12-02T{:02}:{:02}:00Z", 8 + i / 60, i % 60), "payload": [{"contentString": format!("Reading {i}: 12{} over 8{}", i % 10, i % 7)}]});
        assert_eq!(
            app.client
                .post(app.url("Communication"))
                .json(&body)
                .send()
                .await
                .unwrap()
                .status(),
            201
        );
    }
    ehr.control(
        reqwest::Method::POST,
        "settings",
        Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1"})),
    )
    .await;
    let launch = ehr
        .control(
            reqwest::Method::POST,
            "launches",
            Some(
                json!({"patient": "a1", "user": "Practitioner/dr-a", "need_patient_banner": true,
                "smart_style_url": format!("{}/smart-style.json", ehr.base.trim_end_matches("/fhir"))}),
            ),
        )
        .await;
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    let args = json!({
        "clinician_url": app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap())),
        "patient_url": app.url("smart/launch?ehr=ehr-a"),
        "patient_name": "Ada Lovelace",
        "patient_mrn": "MRN-0042",
        "other_patient_name": "Bob Other",
        "clinician_name": "Grace Hopper",
        "colleague_name": "Alan Turing",
        "colleague_ref": alan_ref,
        "colleague_token": alan["access_token"],
        // To set the colleague's out-of-office as an administrator would.
        "admin_token": issue(&app.tokens, &app.admin_client_id, ADMIN_SCOPES, None, None),
        "clinician_ref": grace,
        "patient_ref": ada,
        "base": app.url(""),
        "artifacts": artifacts,
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ehr/browser.mjs");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        tokio::process::Command::new("node")
            .arg(script)
            .arg(args.to_string())
            .env("COURIER_CHROMIUM", chromium)
            .output(),
    )
    .await
    .expect("the browser test finishes within 5 minutes")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success() && result["ok"] == true,
        "browser test failed (screenshots in {}):\n{stdout}\n{}",
        artifacts.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // What the browsers did really went through Courier. Staff only (NOPAT): the thread's header
    // and message, the note half-written in it (kept as that thread's draft when the clinician
    // moved on), the colleague's urgent message, the side note in the patient's conversation,
    // and the out-of-office copy to the colleague covering. The draft that was sent is no draft
    // any more; the withdrawn message is entered-in-error.
    let staff = app
        .get_json("Communication?_security=http://terminology.hl7.org/CodeSystem/v3-ActCode|NOPAT")
        .await;
    assert_eq!(ids(&staff).len(), 6, "{staff}");
    let drafts = app.get_json("Communication?status=preparation").await;
    assert_eq!(ids(&drafts).len(), 1, "{drafts}");
    assert_eq!(
        drafts["entry"][0]["resource"]["payload"][0]["contentString"],
        "half-written note for the pharmacist"
    );
    assert_eq!(
        ids(&app.get_json("Communication?status=entered-in-error").await).len(),
        1
    );
    // Every file stored is one a message attaches (or attached: a withdrawn message's earlier
    // version): the send refused with a photo left none.
    let stored: Vec<courier::store::rows::InsertedRow> = app
        .store
        .query(
            "SELECT rid, res_type, fhir_id FROM resources WHERE res_type = 'Binary'",
            vec![],
        )
        .unwrap();
    let all = app.get_json("Communication/_history?_count=1000").await;
    let attached: std::collections::HashSet<String> = all["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|e| {
            e["resource"]["payload"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|p| p["contentAttachment"]["url"].as_str().map(String::from))
        .filter_map(|u| u.rsplit_once("Binary/").map(|(_, id)| id.to_string()))
        .collect();
    assert!(stored.len() >= 2, "the files sent are stored");
    for b in &stored {
        assert!(
            attached.contains(&b.fhir_id),
            "Binary/{} is attached to no message",
            b.fhir_id
        );
    }
}

/// Multi-factor sign-in in Chromium (issue 22 §3): a clinician enrols and uses a passkey on a
/// DevTools virtual authenticator; a patient enrols an authenticator app whose codes the test
/// computes. Courier calls itself `localhost` here: passkeys need a domain as relying party.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clinician_signs_in_with_a_passkey_and_a_patient_with_an_authenticator_app() {
    let Some(chromium) = chromium() else { return };
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.base_url = "http://localhost:0".into()
    })
    .await
    .unwrap();
    let Some(ehr) = spawn_ehr("ehr-a") else {
        return;
    };
    let mut patient = person("Patient", "a1", &[]);
    patient["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
    patient["telecom"] = json!([{"system": "email", "value": "ada@example.org"}]);
    let mut clinician = person("Practitioner", "dr-a", &[]);
    clinician["name"] = json!([{"given": ["Grace"], "family": "Hopper"}]);
    ehr.control(
        reqwest::Method::POST,
        "seed",
        Some(json!([patient, clinician])),
    )
    .await;
    let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
    n.launch_scopes =
        "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r";
    registry::add(&app.store, &n).unwrap();
    // EHR launches read at once and write after Courier's second factor; the portal asks for it
    // at sign-in (trust-ehr, and the EHR shows none).
    courier::mfa::set_settings(&app.store, "ehr-a", Some("writes"), None, None).unwrap();
    let local = app.url("").replace("127.0.0.1", "localhost");
    ehr.control(
        reqwest::Method::POST,
        "clients",
        Some(
            json!({"client_id": "courier", "jwks_url": app.url("smart/jwks"),
            "redirect_uris": [format!("{local}smart/callback")], "scopes": "*"}),
        ),
    )
    .await;
    // The EHR's id_tokens show no second factor.
    ehr.control(
        reqwest::Method::POST,
        "settings",
        Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1", "id_token_amr": null})),
    )
    .await;
    let mut clinician_urls = Vec::new();
    for _ in 0..3 {
        let l = ehr
            .control(
                reqwest::Method::POST,
                "launches",
                Some(json!({"patient": "a1", "user": "Practitioner/dr-a"})),
            )
            .await;
        clinician_urls.push(format!(
            "{local}launch?iss={}&launch={}",
            ehr.base,
            l["launch"].as_str().unwrap()
        ));
    }
    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    let args = json!({
        "clinician_urls": clinician_urls,
        "patient_url": format!("{local}smart/launch?ehr=ehr-a"),
        "artifacts": artifacts,
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ehr/mfa-browser.mjs");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        tokio::process::Command::new("node")
            .arg(script)
            .arg(args.to_string())
            .env("COURIER_CHROMIUM", chromium)
            .output(),
    )
    .await
    .expect("the browser test finishes within 4 minutes")
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    assert!(
        out.status.success() && result["ok"] == true,
        "browser test failed (screenshots in {}):\n{stdout}\n{}",
        artifacts.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    // What the browsers did went through Courier's factors: one passkey (its counter moved on),
    // one authenticator app, and an audit trail of each step.
    #[derive(diesel::QueryableByName)]
    struct Kind {
        #[diesel(sql_type = diesel::sql_types::Text)]
        kind: String,
    }
    let kinds: Vec<Kind> = app
        .store
        .query("SELECT kind FROM mfa_factors ORDER BY kind", vec![])
        .unwrap();
    assert_eq!(
        kinds.iter().map(|k| k.kind.as_str()).collect::<Vec<_>>(),
        ["passkey", "totp"]
    );
    for (step, n) in [
        ("passkey-enrolled", 1),
        ("passkey-verified", 1),
        ("recovery-code-used", 1),
        ("totp-enrolled", 1),
        ("totp-replayed", 1),
        ("totp-verified", 1),
    ] {
        let b = app
            .get_json(&format!(
                "AuditEvent?subtype={}|{step}",
                courier::mfa::STEP_SYSTEM
            ))
            .await;
        assert_eq!(
            b["entry"].as_array().map_or(0, |e| e.len()),
            n,
            "{step}: {b}"
        );
    }
}
