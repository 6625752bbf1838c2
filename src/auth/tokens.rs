//! Courier's access tokens: JWTs signed (ES384) by Courier's own key, published at the JWKS URL.
//!
//! Keys live in `signing_keys`, the private half sealed under the store's data key like a resource
//! body. `courier signing-key rotate` adds a key and retires the old one; a retired key stays
//! published and accepted for [`RETIRED_KEY_GRACE`], longer than any token it signed lives, so a
//! rotation breaks no token in flight. Every instance re-reads the keys at most [`KEY_REFRESH`] after a
//! change (and at once when it sees an unknown `kid`).
//!
//! A token's signature is checked once; the resulting [`Principal`] is cached by the token's hash
//! until it expires. Revocation and client removal are checked on every request
//! ([`Tokens::still_valid`]), so both take effect at once on every instance.

use super::scopes::{self, Scope};
use super::Principal;
use crate::store::db::Bind;
use crate::store::Store;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Access-token lifetime: SMART asks for at most 5 minutes for backend services.
pub const TOKEN_LIFETIME_SECS: i64 = 300;
/// The lifetime of a web-app session's tokens: no longer than the idle limit, so that a person
/// who stops using Courier holds no valid token past it even if nothing asks for a refresh (a
/// probe: with a 20 s idle limit, a token from the session's last refresh still read messages
/// at 60 s; the session itself ends at its next refresh).
pub fn session_lifetime(idle_timeout_secs: i64) -> i64 {
    if idle_timeout_secs > 0 {
        idle_timeout_secs.min(TOKEN_LIFETIME_SECS)
    } else {
        TOKEN_LIFETIME_SECS
    }
}

/// How long a retired signing key stays published and accepted.
pub const RETIRED_KEY_GRACE_SECS: i64 = 3600;
const KEY_REFRESH: Duration = Duration::from_secs(30);
const CACHE_LIMIT: usize = 50_000;

/// The claims of a Courier access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: String,
    pub client_id: String,
    pub scope: String,
    #[serde(rename = "fhirUser", default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encounter: Option<String>,
    /// How the user authenticated (RFC 8176 values; OpenID Connect Core §2), for tokens of a
    /// signed-in person: the EHR's methods, and `mfa` with Courier's own factor when one was used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amr: Vec<String>,
}

/// What a token is issued for: a client's grant, and for a user also who and in what context.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    pub client_id: String,
    pub scopes: Vec<Scope>,
    pub fhir_user: Option<String>,
    pub patient: Option<String>,
    pub encounter: Option<String>,
}

/// A freshly issued token.
pub struct Issued {
    pub access_token: String,
    pub expires_in: i64,
    pub claims: AccessClaims,
}

#[derive(QueryableByName)]
struct KeyRow {
    #[diesel(sql_type = Text)]
    kid: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    private_key: Vec<u8>,
    #[diesel(sql_type = Text)]
    public_jwk: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    retired_at: Option<i64>,
}

#[derive(QueryableByName)]
struct ValidityRow {
    #[diesel(sql_type = BigInt)]
    revoked: i64,
    #[diesel(sql_type = BigInt)]
    clients: i64,
}

/// The keys currently published: the signer and every key still accepted.
struct KeySet {
    signer: Option<(String, EncodingKey)>,
    verifiers: HashMap<String, DecodingKey>,
    jwks: JwkSet,
    loaded: Instant,
}

pub struct Tokens {
    store: Arc<Store>,
    /// `iss` of Courier's tokens and `aud` they are for: the FHIR base URL.
    issuer: String,
    keys: RwLock<KeySet>,
    /// Held while the keys are re-read, so concurrent requests do not all reload.
    reloading: Mutex<()>,
    /// Verified tokens by hash, with the kid that signed them.
    verified: Mutex<HashMap<[u8; 32], (Principal, String)>>,
}

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

fn aad(kid: &str) -> String {
    format!("signing-key/{kid}")
}

impl Tokens {
    /// Loads the signing keys, creating the first one on a new database.
    pub fn open(store: Arc<Store>, issuer: &str) -> anyhow::Result<Tokens> {
        let tokens = Tokens {
            store,
            issuer: issuer.to_string(),
            keys: RwLock::new(KeySet {
                signer: None,
                verifiers: HashMap::new(),
                jwks: JwkSet { keys: vec![] },
                loaded: Instant::now(),
            }),
            reloading: Mutex::new(()),
            verified: Mutex::new(HashMap::new()),
        };
        tokens.reload()?;
        if tokens.keys.read().signer.is_none() {
            tokens.rotate()?;
        }
        Ok(tokens)
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Adds a new signing key and retires the others (they stay published for the grace period).
    /// Returns the new key's `kid`.
    pub fn rotate(&self) -> anyhow::Result<String> {
        let super::keys::NewKey {
            kid,
            der,
            public: jwk,
        } = super::keys::generate(Algorithm::ES384)?;
        let (key_id, sealed) = self.store.keys.seal(&der, &aad(&kid));
        let created = crate::clock::now_micros();
        self.store.execute(
            "INSERT INTO signing_keys (kid, alg, key_id, private_key, public_jwk, created_at, retired_at) VALUES (?, 'ES384', ?, ?, ?, ?, NULL)",
            vec![kid.clone().into(), key_id.into(), sealed.into(), serde_json::to_string(&jwk)?.into(), created.into()],
        )?;
        self.store.execute(
            "UPDATE signing_keys SET retired_at = ? WHERE retired_at IS NULL AND kid <> ?",
            vec![now().into(), kid.clone().into()],
        )?;
        self.reload()?;
        Ok(kid)
    }

    /// Re-reads the published keys from the database.
    fn reload(&self) -> anyhow::Result<()> {
        let rows: Vec<KeyRow> = self.store.query(
            "SELECT kid, key_id, private_key, public_jwk, retired_at FROM signing_keys \
             WHERE retired_at IS NULL OR retired_at > ? ORDER BY created_at DESC, kid ASC",
            vec![(now() - RETIRED_KEY_GRACE_SECS).into()],
        )?;
        let mut set = KeySet {
            signer: None,
            verifiers: HashMap::new(),
            jwks: JwkSet { keys: vec![] },
            loaded: Instant::now(),
        };
        for row in rows {
            let jwk: Jwk = serde_json::from_str(&row.public_jwk)?;
            if set.signer.is_none() && row.retired_at.is_none() {
                let der = self
                    .store
                    .open_sealed(&row.key_id, &row.private_key, &aad(&row.kid))?;
                set.signer = Some((row.kid.clone(), EncodingKey::from_ec_der(&der)));
            }
            set.verifiers
                .insert(row.kid.clone(), DecodingKey::from_jwk(&jwk)?);
            set.jwks.keys.push(jwk);
        }
        *self.keys.write() = set;
        Ok(())
    }

    fn refresh_if_stale(&self, force: bool) {
        let age = self.keys.read().loaded.elapsed();
        if age > KEY_REFRESH || (force && age > Duration::from_secs(1)) {
            let Some(_one) = self.reloading.try_lock() else {
                return; // another request is reloading right now
            };
            if let Err(e) = self.reload() {
                tracing::error!(error = %e, "could not reload signing keys");
            }
        }
    }

    /// The public keys, for the JWKS endpoint.
    pub fn jwks(&self) -> JwkSet {
        self.refresh_if_stale(false);
        self.keys.read().jwks.clone()
    }

    /// Issues an access token for `grant`.
    pub fn issue(&self, grant: &Grant) -> anyhow::Result<Issued> {
        self.issue_with_amr(grant, &[], TOKEN_LIFETIME_SECS)
    }

    /// Issues a token for a signed-in person that says how they authenticated (`amr`), valid for
    /// `lifetime` seconds (at most [`TOKEN_LIFETIME_SECS`]; see [`session_lifetime`]).
    pub fn issue_with_amr(
        &self,
        grant: &Grant,
        amr: &[String],
        lifetime: i64,
    ) -> anyhow::Result<Issued> {
        let lifetime = lifetime.clamp(1, TOKEN_LIFETIME_SECS);
        self.refresh_if_stale(false);
        let iat = now();
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: grant
                .fhir_user
                .clone()
                .unwrap_or_else(|| grant.client_id.clone()),
            aud: self.issuer.clone(),
            exp: iat + lifetime,
            iat,
            jti: uuid::Uuid::new_v4().to_string(),
            client_id: grant.client_id.clone(),
            scope: scopes::render(&grant.scopes),
            fhir_user: grant.fhir_user.clone(),
            patient: grant.patient.clone(),
            encounter: grant.encounter.clone(),
            amr: amr.to_vec(),
        };
        let keys = self.keys.read();
        let (kid, key) = keys
            .signer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no signing key"))?;
        let mut header = Header::new(Algorithm::ES384);
        header.kid = Some(kid.clone());
        header.typ = Some("at+jwt".into());
        let access_token = jsonwebtoken::encode(&header, &claims, key)?;
        Ok(Issued {
            access_token,
            expires_in: lifetime,
            claims,
        })
    }

    /// Checks a token's signature, issuer, audience and lifetime. Does not check revocation
    /// (see [`Tokens::still_valid`]).
    pub fn verify(&self, token: &str) -> Result<Principal, String> {
        if let Some(p) = self.verified(token) {
            return Ok(p);
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| "the access token is not a well-formed JWT".to_string())?;
        if header.alg != Algorithm::ES384 {
            return Err("the access token was not signed by this server".into());
        }
        let kid = header
            .kid
            .ok_or("the access token was not signed by this server")?;
        if !self.keys.read().verifiers.contains_key(&kid) {
            self.refresh_if_stale(true);
        }
        let keys = self.keys.read();
        let key = keys
            .verifiers
            .get(&kid)
            .ok_or("the access token was not signed by a current key of this server")?;
        let mut v = Validation::new(Algorithm::ES384);
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 5;
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<AccessClaims>(token, key, &v)
            .map_err(|e| format!("the access token is not valid: {e}"))?;
        drop(keys);
        let c = data.claims;
        if c.exp - c.iat > TOKEN_LIFETIME_SECS {
            return Err("the access token claims a longer life than this server gives".into());
        }
        let principal = Principal {
            scopes: scopes::parse_all(&c.scope)
                .map_err(|e| format!("the access token carries a bad scope: {e}"))?,
            client_id: c.client_id,
            jti: c.jti,
            exp: c.exp,
            fhir_user: c.fhir_user,
            patient: c.patient,
            encounter: c.encounter,
            groups: vec![],
            emergency: vec![],
        };
        let mut cache = self.verified.lock();
        if cache.len() >= CACHE_LIMIT {
            let t = now();
            cache.retain(|_, (p, _)| p.exp > t);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
        }
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        cache.insert(hash, (principal.clone(), kid));
        Ok(principal)
    }

    /// The principal of a token whose signature this server has already checked (and which is
    /// still unexpired, its key still accepted): what [`Tokens::verify`] answers without the
    /// signature check. `None` for any other token.
    pub fn verified(&self, token: &str) -> Option<Principal> {
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let cache = self.verified.lock();
        let (p, kid) = cache.get(&hash)?;
        // A key dropped from the set ends its tokens.
        (p.exp > now() && self.keys.read().verifiers.contains_key(kid)).then(|| p.clone())
    }

    /// True unless the token was revoked or its client removed since it was issued. One indexed
    /// query, run on every request so revocation takes effect at once on every instance.
    pub fn still_valid(&self, p: &Principal) -> Result<bool, crate::store::StoreError> {
        self.still_valid_on(&mut self.store.db.get()?, p)
    }

    /// [`Tokens::still_valid`] on a connection the caller holds.
    pub fn still_valid_on(
        &self,
        c: &mut crate::store::db::PooledConn,
        p: &Principal,
    ) -> Result<bool, crate::store::StoreError> {
        let rows: Vec<ValidityRow> = self.store.query_on(
            c,
            "SELECT (SELECT COUNT(*) FROM revoked_tokens WHERE jti = ?) AS revoked, \
                    (SELECT COUNT(*) FROM oauth_clients WHERE client_id = ?) AS clients",
            vec![p.jti.clone().into(), p.client_id.clone().into()],
        )?;
        Ok(rows
            .first()
            .is_some_and(|r| r.revoked == 0 && r.clients > 0))
    }

    /// Revokes a token by its `jti` until it would have expired anyway.
    pub fn revoke(&self, p: &Principal) -> Result<(), crate::store::StoreError> {
        self.revoke_jti(&p.jti, p.exp)
    }

    /// Revokes the token with this `jti` (which expires at `exp`).
    pub fn revoke_jti(&self, jti: &str, exp: i64) -> Result<(), crate::store::StoreError> {
        revoke_in(&self.store, jti, exp)
    }
}

/// Revokes a token by its `jti` until it would have expired anyway (for callers holding only the
/// store, such as the EHR registry).
pub fn revoke_in(store: &Store, jti: &str, exp: i64) -> Result<(), crate::store::StoreError> {
    let binds: Vec<Bind> = vec![jti.into(), exp.into()];
    let sql = if store.db.backend_name() == "postgresql" {
        "INSERT INTO revoked_tokens (jti, expires_at) VALUES (?, ?) ON CONFLICT DO NOTHING"
    } else {
        "INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?, ?)"
    };
    store.execute(sql, binds)?;
    store.execute(
        "DELETE FROM revoked_tokens WHERE expires_at < ?",
        vec![(now() - 60).into()],
    )?;
    Ok(())
}

impl Tokens {}
