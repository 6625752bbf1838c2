//! The client registry (integrators using SMART Backend Services) and the verification of their
//! client assertions (`private_key_jwt`), exactly as SMART's asymmetric client authentication says:
//! RS384 or ES384, `kid` found in the client's JWKS (registered, or fetched from its JWKS URL and
//! cached), `iss` = `sub` = client id, `aud` = the token URL, `exp` at most five minutes ahead,
//! and a `jti` never seen before within its lifetime.

use super::scopes::{self, Scope};
use crate::outbound::Outbound;
use crate::store::{Store, StoreError};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::Mutex;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A client assertion may live at most this long (SMART: five minutes), plus clock skew.
pub const MAX_ASSERTION_LIFETIME_SECS: i64 = 300;
const LEEWAY_SECS: u64 = 5;
const JWKS_TTL: Duration = Duration::from_secs(600);
/// An unknown `kid` refetches the JWKS, but not more often than this.
const JWKS_MIN_REFETCH: Duration = Duration::from_secs(10);
const JWKS_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct Client {
    #[diesel(sql_type = Text)]
    pub client_id: String,
    #[diesel(sql_type = Text)]
    pub name: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub jwks_url: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    #[serde(skip)]
    pub jwks: Option<String>,
    #[diesel(sql_type = Text)]
    pub scopes: String,
    #[diesel(sql_type = BigInt)]
    pub created_at: i64,
}

/// Where a client's public keys come from.
pub enum KeySource {
    Url(String),
    /// A JWKS document (JSON).
    Document(String),
}

/// Registers a client; returns its new `client_id`.
pub fn add(store: &Store, name: &str, keys: KeySource, scope: &str) -> anyhow::Result<String> {
    anyhow::ensure!(!name.trim().is_empty(), "the client needs a name");
    let parsed = scopes::parse_all(scope).map_err(|e| anyhow::anyhow!("invalid scope: {e}"))?;
    anyhow::ensure!(
        !parsed.is_empty(),
        "register at least one resource scope, e.g. system/Communication.cruds"
    );
    let (url, doc) = match keys {
        KeySource::Url(u) => {
            check_jwks_url(&u)?;
            (Some(u), None)
        }
        KeySource::Document(d) => {
            let set: JwkSet = serde_json::from_str(&d)
                .map_err(|e| anyhow::anyhow!("the JWKS is not a valid JWK Set: {e}"))?;
            anyhow::ensure!(
                set.keys.iter().any(|k| usable(k).is_some()),
                "the JWKS has no RS384/ES384 signature key with a kid"
            );
            anyhow::ensure!(
                set.keys.iter().all(|k| !has_private_parts(k)),
                "the JWKS contains private key material: register public keys only"
            );
            (None, Some(d))
        }
    };
    let client_id = uuid::Uuid::new_v4().to_string();
    store.execute(
        "INSERT INTO oauth_clients (client_id, name, jwks_url, jwks, scopes, created_at) VALUES (?, ?, ?, ?, ?, ?)",
        vec![
            client_id.clone().into(),
            name.trim().into(),
            url.into(),
            doc.into(),
            scopes::render(&parsed).into(),
            crate::clock::now_micros().into(),
        ],
    )?;
    Ok(client_id)
}

/// Makes sure a client Courier itself uses exists (no keys: it cannot use the token endpoint).
pub fn ensure_internal(
    store: &Store,
    client_id: &str,
    name: &str,
    scope: &str,
) -> Result<(), StoreError> {
    if get(store, client_id)?.is_none() {
        match store.execute(
            "INSERT INTO oauth_clients (client_id, name, jwks_url, jwks, scopes, created_at) VALUES (?, ?, NULL, NULL, ?, ?)",
            vec![client_id.into(), name.into(), scope.into(), crate::clock::now_micros().into()],
        ) {
            Ok(_) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn list(store: &Store) -> Result<Vec<Client>, StoreError> {
    store.query(
        "SELECT client_id, name, jwks_url, jwks, scopes, created_at FROM oauth_clients ORDER BY created_at, client_id",
        vec![],
    )
}

pub fn get(store: &Store, client_id: &str) -> Result<Option<Client>, StoreError> {
    Ok(store
        .query::<Client>(
            "SELECT client_id, name, jwks_url, jwks, scopes, created_at FROM oauth_clients WHERE client_id = ?",
            vec![client_id.into()],
        )?
        .into_iter()
        .next())
}

/// Removes a client: its assertions are refused and its tokens stop working at once.
pub fn remove(store: &Store, client_id: &str) -> Result<bool, StoreError> {
    store.execute(
        "DELETE FROM used_assertions WHERE client_id = ?",
        vec![client_id.into()],
    )?;
    Ok(store.execute(
        "DELETE FROM oauth_clients WHERE client_id = ?",
        vec![client_id.into()],
    )? > 0)
}

/// JWKS URLs must be https, except on the loopback interface (development and tests), and carry
/// no credentials.
pub fn check_jwks_url(u: &str) -> anyhow::Result<()> {
    let url =
        reqwest::Url::parse(u).map_err(|e| anyhow::anyhow!("the JWKS URL is not a URL: {e}"))?;
    anyhow::ensure!(
        url.username().is_empty() && url.password().is_none(),
        "the JWKS URL must not carry credentials"
    );
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    let ok = match url.scheme() {
        "https" => url.host().is_some(),
        "http" => loopback,
        _ => false,
    };
    anyhow::ensure!(ok, "the JWKS URL must be https (http only on loopback)");
    Ok(())
}

fn has_private_parts(k: &Jwk) -> bool {
    let v = serde_json::to_value(k).unwrap_or_default();
    ["d", "p", "q", "dp", "dq", "qi"]
        .iter()
        .any(|f| v.get(f).is_some())
}

/// The algorithm a key may verify, if it is an RS384/ES384 signature key with a kid.
fn usable(k: &Jwk) -> Option<Algorithm> {
    k.common.key_id.as_ref()?;
    if matches!(k.common.public_key_use, Some(ref u) if *u != jsonwebtoken::jwk::PublicKeyUse::Signature)
    {
        return None;
    }
    let alg = match &k.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS384,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P384 => {
            Algorithm::ES384
        }
        _ => return None,
    };
    use jsonwebtoken::jwk::KeyAlgorithm;
    match (k.common.key_algorithm, alg) {
        (None, _)
        | (Some(KeyAlgorithm::RS384), Algorithm::RS384)
        | (Some(KeyAlgorithm::ES384), Algorithm::ES384) => Some(alg),
        _ => None,
    }
}

/// Why an assertion was refused: always `invalid_client` (RFC 7521 §4.2.1), with a description.
#[derive(Debug)]
pub struct Refused(pub String);

#[derive(Deserialize)]
struct AssertionClaims {
    iss: String,
    exp: i64,
    jti: Option<String>,
}

#[derive(Deserialize)]
struct Unverified {
    iss: Option<String>,
}

/// Fetches and caches clients' JWKS documents.
pub struct JwksCache {
    http: Outbound,
    cache: Mutex<HashMap<String, (Instant, Arc<JwkSet>)>>,
    /// URLs whose last fetch failed, and when: not fetched again for `JWKS_MIN_REFETCH`, so
    /// unauthenticated requests cannot make Courier hammer an unreachable host.
    failed: Mutex<HashMap<String, Instant>>,
}

impl JwksCache {
    /// A cache that fetches through `http` (see [`crate::outbound`]).
    pub fn new(http: Outbound) -> JwksCache {
        JwksCache {
            http,
            cache: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    async fn fetch(&self, url: &str) -> Result<Arc<JwkSet>, Refused> {
        if self
            .failed
            .lock()
            .get(url)
            .is_some_and(|at| at.elapsed() < JWKS_MIN_REFETCH)
        {
            return Err(Refused(
                "the client's JWKS could not be fetched a moment ago; try again shortly".into(),
            ));
        }
        let result = self.fetch_now(url).await;
        if result.is_err() {
            self.failed.lock().insert(url.to_string(), Instant::now());
        }
        result
    }

    async fn fetch_now(&self, url: &str) -> Result<Arc<JwkSet>, Refused> {
        let fail = |m: String| Refused(format!("the client's JWKS could not be fetched: {m}"));
        let mut res = self
            .http
            .get(url)
            .map_err(|e| fail(e.0))?
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| fail(e.without_url().to_string()))?;
        if !res.status().is_success() {
            return Err(fail(format!("HTTP {}", res.status().as_u16())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| fail(e.to_string()))? {
            if body.len() + chunk.len() > JWKS_MAX_BYTES {
                return Err(fail("the document is too large".into()));
            }
            body.extend_from_slice(&chunk);
        }
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|_| fail("not a JWK Set".into()))?;
        let set = Arc::new(set);
        self.cache
            .lock()
            .insert(url.to_string(), (Instant::now(), set.clone()));
        Ok(set)
    }

    /// A JWK Set from `url`: cached for ten minutes, refetched when `refresh` (an unknown kid).
    pub async fn set(&self, url: &str, refresh: bool) -> Result<Arc<JwkSet>, Refused> {
        let cached = self.cache.lock().get(url).cloned();
        match cached {
            Some((at, set))
                if at.elapsed() < JWKS_TTL && !(refresh && at.elapsed() > JWKS_MIN_REFETCH) =>
            {
                Ok(set)
            }
            _ => self.fetch(url).await,
        }
    }

    /// The client's key named `kid`, usable for `alg`.
    async fn key(&self, client: &Client, kid: &str, alg: Algorithm) -> Result<Jwk, Refused> {
        let find = |set: &JwkSet| {
            set.keys
                .iter()
                .find(|k| k.common.key_id.as_deref() == Some(kid) && usable(k) == Some(alg))
                .cloned()
        };
        let unknown = || {
            Refused(format!(
                "no {alg:?} key with kid '{kid}' is registered for this client"
            ))
        };
        match (&client.jwks, &client.jwks_url) {
            (Some(doc), _) => {
                let set: JwkSet = serde_json::from_str(doc)
                    .map_err(|_| Refused("the registered JWKS is invalid".into()))?;
                find(&set).ok_or_else(unknown)
            }
            (None, Some(url)) => {
                let cached = self.cache.lock().get(url).cloned();
                let set = match cached {
                    Some((at, set)) if at.elapsed() < JWKS_TTL => set,
                    _ => self.fetch(url).await?,
                };
                if let Some(k) = find(&set) {
                    return Ok(k);
                }
                // The client may have rotated its keys: refetch once, not too often.
                let age = self.cache.lock().get(url).map(|(at, _)| at.elapsed());
                if age.is_some_and(|a| a > JWKS_MIN_REFETCH) {
                    let set = self.fetch(url).await?;
                    return find(&set).ok_or_else(unknown);
                }
                Err(unknown())
            }
            (None, None) => Err(Refused("the client has no keys".into())),
        }
    }
}

/// Verifies a client assertion for the token endpoint at `token_url`; returns the client.
pub async fn authenticate(
    store: &Arc<Store>,
    jwks: &JwksCache,
    token_url: &str,
    assertion: &str,
) -> Result<Client, Refused> {
    let header = jsonwebtoken::decode_header(assertion).map_err(|_| {
        Refused("the client assertion is not a JWT signed with RS384 or ES384".into())
    })?;
    if !matches!(header.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(Refused(format!(
            "the client assertion is signed with {:?}; only RS384 and ES384 are accepted",
            header.alg
        )));
    }
    let kid = header
        .kid
        .ok_or_else(|| Refused("the client assertion header has no kid".into()))?;
    // The issuer names the client whose keys verify the signature; nothing else is trusted yet.
    let iss = jsonwebtoken::dangerous::insecure_decode::<Unverified>(assertion)
        .ok()
        .and_then(|d| d.claims.iss)
        .ok_or_else(|| Refused("the client assertion has no iss".into()))?;
    let store2 = store.clone();
    let iss2 = iss.clone();
    let client = actix_web::web::block(move || get(&store2, &iss2))
        .await
        .map_err(|_| Refused("internal error".into()))?
        .map_err(|_| Refused("internal error".into()))?
        .ok_or_else(|| Refused("unknown client".into()))?;
    let jwk = jwks.key(&client, &kid, header.alg).await?;
    let key =
        DecodingKey::from_jwk(&jwk).map_err(|_| Refused("the client's key is unusable".into()))?;
    let mut v = Validation::new(header.alg);
    v.set_issuer(&[&client.client_id]);
    v.sub = Some(client.client_id.clone());
    v.set_audience(&[token_url]);
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    let data = jsonwebtoken::decode::<AssertionClaims>(assertion, &key, &v)
        .map_err(|e| Refused(format!("the client assertion is not valid: {e}")))?;
    let c = data.claims;
    let now = crate::clock::now_micros() / 1_000_000;
    if c.exp > now + MAX_ASSERTION_LIFETIME_SECS + LEEWAY_SECS as i64 {
        return Err(Refused(
            "the client assertion's exp is more than five minutes ahead".into(),
        ));
    }
    let jti = c
        .jti
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| {
            Refused("the client assertion needs a jti (at most 256 characters)".into())
        })?;
    // Replay protection: the (client, jti) pair may be used once. The row outlives the assertion.
    let store2 = store.clone();
    let (cid, exp) = (c.iss.clone(), c.exp);
    let fresh = actix_web::web::block(move || -> Result<bool, StoreError> {
        store2.execute(
            "DELETE FROM used_assertions WHERE expires_at < ?",
            vec![(now - 60).into()],
        )?;
        match store2.execute(
            "INSERT INTO used_assertions (client_id, jti, expires_at) VALUES (?, ?, ?)",
            vec![cid.into(), jti.into(), (exp + LEEWAY_SECS as i64).into()],
        ) {
            Ok(_) => Ok(true),
            Err(StoreError::Conflict(_)) => Ok(false),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(|_| Refused("internal error".into()))?
    .map_err(|_| Refused("internal error".into()))?;
    if !fresh {
        return Err(Refused(
            "the client assertion's jti has been used before (replay)".into(),
        ));
    }
    Ok(client)
}

/// The registered scopes of a client, parsed.
pub fn registered_scopes(client: &Client) -> Vec<Scope> {
    scopes::parse_all(&client.scopes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn jwks_urls_are_https_or_loopback_http_without_credentials() {
        use super::check_jwks_url as ok;
        assert!(ok("https://ehr.example.org/jwks.json").is_ok());
        assert!(ok("http://127.0.0.1:9000/jwks").is_ok());
        assert!(ok("http://localhost/jwks").is_ok());
        assert!(ok("http://[::1]:80/jwks").is_ok());
        for bad in [
            "http://ehr.example.org/jwks",
            "http://localhost.evil.example/jwks",
            "http://127.0.0.1@evil.example/jwks",
            "https://user:pw@ehr.example.org/jwks",
            "ftp://ehr.example.org/jwks",
            "not a url",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
    }
}
