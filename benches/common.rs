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
