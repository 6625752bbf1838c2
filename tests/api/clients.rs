//! A real, independent client: PyPI `fhirpy` (with PyJWT for the assertion) obtains a token from
//! Courier with SMART Backend Services and creates, reads and searches Communications.

use crate::auth::rs384;
use crate::helpers::*;
use courier::auth::clients;
use std::process::Command;

fn python() -> String {
    std::env::var("COURIER_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn client_available() -> bool {
    let ok = Command::new(python())
        .args(["-c", "import fhirpy, jwt, requests, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but python3 with fhirpy, PyJWT and cryptography is not installed");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fhirpy_gets_a_token_and_creates_and_searches_communications() {
    if !client_available() {
        eprintln!("skipped: python3 with fhirpy and PyJWT is not installed");
        return;
    }
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // RS384 (PKCS#1 PEM) and ES384 (PKCS#8 PEM), each registered with its public JWKS.
    let (_, rs_jwks, rs_pem) = rs384();
    let (es_pem, es_jwks) = es384_key();
    for (alg, kid, pem, jwks) in [
        ("RS384", "rs-1", rs_pem, rs_jwks),
        ("ES384", "es-1", es_pem, es_jwks),
    ] {
        let client_id = clients::add(
            &app.store,
            &format!("fhirpy {alg}"),
            clients::KeySource::Document(jwks.to_string()),
            "system/Communication.cruds",
        )
        .unwrap();
        let key_file = dir.path().join(format!("{alg}.pem"));
        std::fs::write(&key_file, pem).unwrap();
        let base = app.base.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(python())
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/clients/backend_services.py"
                ))
                .args([&base, &client_id, key_file.to_str().unwrap(), kid, alg])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{alg}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value =
            serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
        assert_eq!(report["found"], 1);
        // What the Python client created is really in Courier.
        let found = app
            .search_ids(&format!(
                "Communication?recipient={}",
                report["recipient"].as_str().unwrap()
            ))
            .await;
        assert_eq!(found, vec![report["id"].as_str().unwrap().to_string()]);
    }
}
