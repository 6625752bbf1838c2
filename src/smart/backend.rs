//! The backend-services connection to each EHR: `client_credentials` at the EHR's token endpoint,
//! authenticated with a `private_key_jwt` assertion signed by Courier's key for that EHR (SMART
//! Backend Services), through the `oauth2` crate. The token is cached until [`RENEW_BEFORE`] ahead
//! of its expiry. An EHR that serves Backend Services at another token endpoint than the launch's
//! is registered with that endpoint (`--backend-token-url`), which is then used instead of the
//! discovered one, and named as the assertion's `aud`.

use super::discovery::Discovery;
use super::registry::Ehr;
use crate::store::Store;
use oauth2::basic::BasicClient;
use oauth2::{AuthType, ClientId, Scope, TokenResponse, TokenUrl};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A cached token is renewed this long before it expires.
pub const RENEW_BEFORE: Duration = Duration::from_secs(30);
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub struct Connections {
    discovery: Arc<Discovery>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// How each EHR took Courier's idempotent writes (see [`WriteMode`]), by EHR, base and type.
    modes: Mutex<HashMap<String, WriteMode>>,
}

/// How an EHR takes an idempotent create (the write-back outbox), learnt from its answers and
/// kept in memory: after a restart the first write pays for the refused tries once again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteMode {
    /// The EHR honours `If-None-Exist` (conditional create); otherwise Courier searches for its
    /// identifier and creates only when there is no copy.
    pub conditional: bool,
    /// The EHR accepts `Prefer: handling=strict`.
    pub strict: bool,
}

impl WriteMode {
    /// Best first: each refusal steps to the next.
    pub const ALL: [WriteMode; 4] = [
        WriteMode {
            conditional: true,
            strict: true,
        },
        WriteMode {
            conditional: true,
            strict: false,
        },
        WriteMode {
            conditional: false,
            strict: true,
        },
        WriteMode {
            conditional: false,
            strict: false,
        },
    ];
}

impl Connections {
    pub fn new(discovery: Arc<Discovery>) -> Connections {
        Connections {
            discovery,
            tokens: Mutex::new(HashMap::new()),
            modes: Mutex::new(HashMap::new()),
        }
    }

    /// A backend-services access token for `ehr`: cached, or requested now.
    pub async fn token(&self, store: &Arc<Store>, ehr: &Ehr) -> Result<String, String> {
        if let Some((t, until)) = self.tokens.lock().get(&ehr.name) {
            if *until > Instant::now() + RENEW_BEFORE {
                return Ok(t.clone());
            }
        }
        let token_url = match &ehr.backend_token_url {
            Some(u) => u.clone(),
            None => self.discovery.endpoints(&ehr.iss).await?.token.clone(),
        };
        let assertion = ehr
            .client_assertion(store, &token_url)
            .map_err(|e| format!("cannot sign the client assertion: {e}"))?;
        let client = BasicClient::new(ClientId::new(ehr.client_id.clone()))
            .set_token_uri(TokenUrl::new(token_url).map_err(|e| e.to_string())?)
            .set_auth_type(AuthType::RequestBody);
        let http = self.discovery.http().clone();
        let send = move |req: oauth2::HttpRequest| {
            let http = http.clone();
            async move { send(&http, req).await }
        };
        let res = client
            .exchange_client_credentials()
            .add_scopes(
                ehr.backend_scopes
                    .split_whitespace()
                    .map(|s| Scope::new(s.into())),
            )
            .add_extra_param("client_assertion_type", JWT_BEARER)
            .add_extra_param("client_assertion", assertion)
            .request_async(&send)
            .await
            .map_err(|e| format!("the EHR's token endpoint refused: {e}"))?;
        let token = res.access_token().secret().clone();
        let lifetime = res.expires_in().unwrap_or(Duration::from_secs(300));
        self.tokens
            .lock()
            .insert(ehr.name.clone(), (token.clone(), Instant::now() + lifetime));
        Ok(token)
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// The write mode that last worked for `key` (EHR, base and type), else the best one.
    pub fn write_mode(&self, key: &str) -> WriteMode {
        self.modes
            .lock()
            .get(key)
            .copied()
            .unwrap_or(WriteMode::ALL[0])
    }

    /// Remembers the write mode that worked for `key`.
    pub fn remember_write_mode(&self, key: &str, mode: WriteMode) {
        self.modes.lock().insert(key.to_string(), mode);
    }

    /// Forgets a cached token (after the EHR answered 401 to it, say).
    pub fn forget(&self, ehr: &str) {
        self.tokens.lock().remove(ehr);
    }
}

/// The ~20-line adapter DESIGN asks for: `oauth2` without its own reqwest, through ours.
pub(crate) async fn send(
    http: &crate::outbound::Outbound,
    req: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, std::io::Error> {
    let req = reqwest::Request::try_from(req).map_err(std::io::Error::other)?;
    let res = http.execute(req).await.map_err(std::io::Error::other)?;
    let mut out = oauth2::http::Response::builder().status(res.status());
    for (k, v) in res.headers() {
        out = out.header(k, v);
    }
    let body = res.bytes().await.map_err(std::io::Error::other)?.to_vec();
    out.body(lenient_expires_in(body))
        .map_err(std::io::Error::other)
}

/// The longest lifetime Courier takes from a token response (a year): an EHR's token is
/// renewed long before, and a larger figure would overflow the clocks it is added to.
const MAX_EXPIRES_IN: u64 = 365 * 24 * 3600;

/// A token response's `expires_in` as a whole number of seconds Courier can use: a string of
/// digits (`"3600"`) or a number with a fraction (`3600.0`) is read as that number (RFC 6749 §5.1
/// makes it a number, but EHRs in use send both forms, and the `oauth2` crate refuses the whole
/// response — the sign-in or the write-back — for it), and any of them beyond a year is a year
/// (`18446744073709551615` once reached `Instant + Duration` and panicked). Anything else, and a
/// body that names `expires_in` more than once (which the `oauth2` crate refuses, and which
/// re-writing would merge), is passed on as it came.
pub(crate) fn lenient_expires_in(body: Vec<u8>) -> Vec<u8> {
    if body.windows(12).filter(|w| w == b"\"expires_in\"").count() != 1 {
        return body;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    let seconds = match &v["expires_in"] {
        serde_json::Value::Number(n) if n.as_u64().is_some_and(|s| s <= MAX_EXPIRES_IN) => None,
        serde_json::Value::Number(n) => n
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| (f as u64).min(MAX_EXPIRES_IN)),
        serde_json::Value::String(s) => s
            .trim()
            .parse::<u64>()
            .ok()
            .or_else(|| {
                let t = s.trim();
                (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then_some(u64::MAX)
            })
            .map(|s| s.min(MAX_EXPIRES_IN)),
        _ => None,
    };
    match seconds {
        Some(s) => {
            v["expires_in"] = s.into();
            serde_json::to_vec(&v).unwrap_or(body)
        }
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::lenient_expires_in;
    use serde_json::{json, Value};

    fn read(body: Value) -> Value {
        serde_json::from_slice(&lenient_expires_in(serde_json::to_vec(&body).unwrap())).unwrap()
    }

    #[test]
    fn expires_in_is_read_as_a_number_of_seconds_in_the_forms_ehrs_send() {
        for (sent, read_as) in [
            (json!(3600), json!(3600)),
            (json!("3600"), json!(3600)),
            (json!(" 300 "), json!(300)),
            (json!(3600.0), json!(3600)),
            (json!(299.9), json!(299)),
            // Beyond a year: a year (u64::MAX once overflowed the clock it was added to).
            (json!(18446744073709551615u64), json!(31536000)),
            (json!("18446744073709551615"), json!(31536000)),
            (json!("99999999999999999999999"), json!(31536000)),
            (json!(1e300), json!(31536000)),
            // Not a number of seconds: passed on as it came (the oauth2 crate refuses it).
            (json!("an hour"), json!("an hour")),
            (json!(-5), json!(-5)),
            (json!(null), json!(null)),
        ] {
            let got =
                read(json!({"access_token": "t", "token_type": "Bearer", "expires_in": sent}));
            assert_eq!(got["expires_in"], read_as, "{sent}");
            assert_eq!(got["access_token"], "t");
        }
        // Named twice: passed on as it came (the oauth2 crate refuses it).
        let twice = br#"{"access_token":"t","expires_in":"5","expires_in":"3600"}"#.to_vec();
        assert_eq!(lenient_expires_in(twice.clone()), twice);
        // Bodies without it, and bodies that are not JSON, are untouched.
        let plain = br#"{"access_token":"t","token_type":"Bearer"}"#.to_vec();
        assert_eq!(lenient_expires_in(plain.clone()), plain);
        let html = b"<html>expires_in</html>".to_vec();
        assert_eq!(lenient_expires_in(html.clone()), html);
    }
}
