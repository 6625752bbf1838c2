//! Shared by the benchmarks.

use serde_json::json;

/// A JWKS with one fresh ES384 public key (kid "bench"), to register the benchmark's client.
pub fn bench_jwks() -> String {
    let secret = p384::SecretKey::random(&mut rand::rngs::OsRng);
    let mut jwk: serde_json::Value =
        serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
    jwk["kid"] = json!("bench");
    json!({"keys": [jwk]}).to_string()
}

/// Settings for a benchmark's own Courier in `dir` (a fresh SQLite file unless `database_url`
/// is given), the test master key, logs at `warn`.
#[allow(dead_code)] // not every benchmark starts its server this way
pub fn settings(dir: &std::path::Path, database_url: Option<String>) -> courier::config::Settings {
    courier::config::Settings {
        listen: "127.0.0.1:0".into(),
        base_url: "http://127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        database_url: database_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.join("bench.db").display())),
        master_key: Some(
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                .to_string()
                .into(),
        ),
        log: "warn".into(),
        web_push: false,
        ..courier::config::Settings::default()
    }
}

/// A pooled HTTP client that sends `token` as its bearer token.
#[allow(dead_code)]
pub fn bearer_client(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .default_headers(h)
        .build()
        .unwrap()
}

/// Reads `--name value` arguments: `set(name, value)` says whether it knows the name. Cargo's own
/// `--bench` is skipped; an unknown argument stops the benchmark.
#[allow(dead_code)]
pub fn parse_args(mut set: impl FnMut(&str, String) -> bool) {
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--bench" {
            continue;
        }
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        assert!(set(&k, v), "unknown argument {k}");
    }
}
