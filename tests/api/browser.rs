//! The web app in real Chromium (Debian `chromium` + `playwright-core`): a patient (portal,
//! standalone launch, phone width) and a clinician (EHR launch) message each other live. The
//! browser part is `tests/ehr/browser.mjs`; screenshots land in `target/browser-artifacts/`.

use crate::ehr::{new_ehr, person, spawn_ehr};
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
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let Some(ehr) = spawn_ehr("ehr-a") else {
        return;
    };
    let mut patient = person("Patient", "a1", &[]);
    patient["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
    patient["birthDate"] = json!("1990-12-10");
    patient["gender"] = json!("female");
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
    ehr.register_courier(&app, "courier").await;
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
        "clinician_name": "Grace Hopper",
        "artifacts": artifacts,
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ehr/browser.mjs");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(180),
        tokio::process::Command::new("node")
            .arg(script)
            .arg(args.to_string())
            .env("COURIER_CHROMIUM", chromium)
            .output(),
    )
    .await
    .expect("the browser test finishes within 3 minutes")
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
    // The conversations really went through Courier: header, message, reply, the foreign-URL one
    // and the patient's later message; the staff-only thread's header and message, labelled NOPAT.
    let b = app.get_json("Communication?_count=10").await;
    assert_eq!(ids(&b).len(), 7, "{b}");
    let staff = app
        .get_json("Communication?_security=http://terminology.hl7.org/CodeSystem/v3-ActCode|NOPAT")
        .await;
    assert_eq!(ids(&staff).len(), 2, "{staff}");
}
