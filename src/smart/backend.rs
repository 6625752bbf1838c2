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
    out.body(body).map_err(std::io::Error::other)
}
