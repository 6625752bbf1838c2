//! The EHR registry: each EHR's FHIR base URL (`iss`), Courier's client id there, the scopes to
//! request for user launches and for the backend-services connection, and Courier's own signing
//! key for that EHR (RS384 or ES384), whose public half Courier publishes at `/smart/jwks` for the
//! EHR to register. Managed with `courier ehr add|list|remove`, stored in the database.
//!
//! A registration may override what discovery finds, for EHRs that put things elsewhere: the token
//! endpoint of the backend-services connection (`--backend-token-url`) and the FHIR base that takes
//! Courier's AuditEvents (`--audit-base`).

use crate::auth::keys;
use crate::auth::scopes;
use crate::store::{Store, StoreError};
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey};

#[derive(Debug, Clone, QueryableByName)]
pub struct Ehr {
    /// A short name for people and the CLI (`ehr-a`).
    #[diesel(sql_type = Text)]
    pub name: String,
    /// The EHR's FHIR base URL: what it sends as `iss` in an EHR launch.
    #[diesel(sql_type = Text)]
    pub iss: String,
    /// Courier's client id at this EHR.
    #[diesel(sql_type = Text)]
    pub client_id: String,
    #[diesel(sql_type = Text)]
    pub alg: String,
    #[diesel(sql_type = Text)]
    pub kid: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    private_key: Vec<u8>,
    #[diesel(sql_type = Text)]
    public_jwk: String,
    #[diesel(sql_type = Text)]
    pub launch_scopes: String,
    #[diesel(sql_type = Text)]
    pub backend_scopes: String,
    #[diesel(sql_type = BigInt)]
    pub created_at: i64,
    /// Identifier systems this EHR is trusted for: only these join records across EHRs.
    #[diesel(sql_type = Text)]
    pub trusted_systems: String,
    /// The backend-services token endpoint, when not the discovered one (the client assertion's
    /// `aud` is then this URL).
    #[diesel(sql_type = Nullable<Text>)]
    pub backend_token_url: Option<String>,
    /// The FHIR base that takes Courier's AuditEvents, when not `iss`.
    #[diesel(sql_type = Nullable<Text>)]
    pub audit_base: Option<String>,
}

const COLUMNS: &str = "name, iss, client_id, alg, kid, key_id, private_key, public_jwk, launch_scopes, backend_scopes, created_at, trusted_systems, backend_token_url, audit_base";

fn aad(name: &str, kid: &str) -> String {
    format!("ehr-key/{name}/{kid}")
}

/// What `courier ehr add` takes.
pub struct NewEhr<'a> {
    pub name: &'a str,
    pub iss: &'a str,
    pub client_id: &'a str,
    pub alg: &'a str,
    pub launch_scopes: &'a str,
    pub backend_scopes: &'a str,
    /// Space-separated identifier systems trusted for joining identities across EHRs.
    pub trusted_systems: &'a str,
    /// The backend-services token endpoint, overriding the discovered one.
    pub backend_token_url: Option<&'a str>,
    /// The FHIR base for AuditEvents, overriding `iss`.
    pub audit_base: Option<&'a str>,
}

/// An EHR's FHIR base: an absolute https URL (http only on loopback), without a trailing slash,
/// query or fragment — it is compared exactly with the `iss` of a launch.
pub fn normalize_iss(iss: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(iss).map_err(|e| anyhow::anyhow!("iss is not a URL: {e}"))?;
    anyhow::ensure!(
        url.query().is_none() && url.fragment().is_none() && url.username().is_empty(),
        "iss must be a plain FHIR base URL (no query, fragment or credentials)"
    );
    let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"))
        || url.host_str().is_some_and(|h| h.ends_with(".localhost"));
    anyhow::ensure!(
        url.scheme() == "https" || (url.scheme() == "http" && loopback),
        "iss must be https (http only on loopback)"
    );
    // Stored as given (the EHR's own spelling is what its references and tokens carry); EHRs
    // are told apart, and found by a launch's iss, by [`iss_key`].
    Ok(iss.trim_end_matches('/').to_string())
}

/// `iss` as EHRs are told apart: without trailing slashes, scheme and host without case (RFC
/// 3986 §6.2.2.1: `HTTPS://EHR.example.org/fhir` is `https://ehr.example.org/fhir`); the path
/// keeps its case.
pub fn iss_key(iss: &str) -> String {
    let trimmed = iss.trim_end_matches('/');
    let authority_end = trimmed
        .find("://")
        .map(|i| {
            trimmed[i + 3..]
                .find('/')
                .map_or(trimmed.len(), |j| i + 3 + j)
        })
        .unwrap_or(0);
    format!(
        "{}{}",
        trimmed[..authority_end].to_ascii_lowercase(),
        &trimmed[authority_end..]
    )
}

/// A URL a registration overrides discovery with (`what` names it in errors): absolute, https
/// (http only on loopback), without credentials, query or fragment. Tokens and assertions travel
/// to it, and the events it takes carry patients' references.
pub fn check_override(what: &str, u: &str) -> anyhow::Result<String> {
    let u = u.trim();
    let url = reqwest::Url::parse(u).map_err(|e| anyhow::anyhow!("{what} is not a URL: {e}"))?;
    anyhow::ensure!(
        url.query().is_none()
            && url.fragment().is_none()
            && url.username().is_empty()
            && url.password().is_none(),
        "{what} must be a plain URL (no query, fragment or credentials)"
    );
    crate::auth::clients::check_jwks_url(u)
        .map_err(|_| anyhow::anyhow!("{what} must be https (http only on loopback)"))?;
    Ok(u.to_string())
}

/// The overrides of a registration, checked: the token URL as given (it is the assertion's `aud`,
/// compared exactly by the EHR), the AuditEvent base without a trailing slash. Empty means none.
fn overrides(
    backend_token_url: Option<&str>,
    audit_base: Option<&str>,
) -> anyhow::Result<(Option<String>, Option<String>)> {
    fn given(v: Option<&str>) -> Option<&str> {
        v.map(str::trim).filter(|v| !v.is_empty())
    }
    let token = given(backend_token_url)
        .map(|u| check_override("the backend token URL", u))
        .transpose()?;
    let audit = given(audit_base)
        .map(|u| check_override("the AuditEvent base", u))
        .transpose()?
        .map(|u| u.trim_end_matches('/').to_string());
    Ok((token, audit))
}

/// Registers an EHR and makes Courier's signing key for it. Returns the registration.
pub fn add(store: &Store, new: &NewEhr) -> anyhow::Result<Ehr> {
    let name = new.name.trim();
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "the EHR name must be 1-64 letters, digits, '-' or '_'"
    );
    anyhow::ensure!(
        !new.client_id.trim().is_empty(),
        "the client id is required"
    );
    let iss = normalize_iss(new.iss)?;
    // Two registrations whose iss differ only in the case of scheme or host are one EHR.
    if let Some(other) = by_iss(store, &iss)? {
        anyhow::ensure!(
            other.name == name,
            "EHR '{}' is already registered with this iss ({})",
            other.name,
            other.iss
        );
    }
    let alg = match new.alg {
        "ES384" => Algorithm::ES384,
        "RS384" => Algorithm::RS384,
        other => anyhow::bail!("the key algorithm must be ES384 or RS384, not {other}"),
    };
    for s in [new.launch_scopes, new.backend_scopes] {
        anyhow::ensure!(
            s.split_whitespace().all(|one| scopes::parse(one).is_ok()),
            "invalid SMART scope in '{s}'"
        );
    }
    let (backend_token_url, audit_base) = overrides(new.backend_token_url, new.audit_base)?;
    let key = keys::generate(alg)?;
    let (key_id, sealed) = store.keys.seal(&key.der, &aad(name, &key.kid));
    store
        .execute(
            &format!(
                "INSERT INTO ehrs ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ),
            vec![
                name.into(),
                iss.into(),
                new.client_id.trim().into(),
                new.alg.into(),
                key.kid.clone().into(),
                key_id.into(),
                sealed.into(),
                serde_json::to_string(&key.public)?.into(),
                new.launch_scopes.trim().into(),
                new.backend_scopes.trim().into(),
                crate::clock::now_micros().into(),
                new.trusted_systems
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .into(),
                backend_token_url.into(),
                audit_base.into(),
            ],
        )
        .map_err(|e| match e {
            StoreError::Conflict(_) => {
                anyhow::anyhow!("an EHR with this name or iss is registered already")
            }
            other => other.into(),
        })?;
    get(store, name)?.ok_or_else(|| anyhow::anyhow!("the EHR was not stored"))
}

pub fn list(store: &Store) -> Result<Vec<Ehr>, StoreError> {
    store.query(&format!("SELECT {COLUMNS} FROM ehrs ORDER BY name"), vec![])
}

pub fn get(store: &Store, name: &str) -> Result<Option<Ehr>, StoreError> {
    Ok(store
        .query(
            &format!("SELECT {COLUMNS} FROM ehrs WHERE name = ?"),
            vec![name.into()],
        )?
        .into_iter()
        .next())
}

/// The EHR whose FHIR base is `iss` (an EHR launch names its EHR this way).
pub fn by_iss(store: &Store, iss: &str) -> Result<Option<Ehr>, StoreError> {
    let key = iss_key(iss);
    let exact: Option<Ehr> = store
        .query(
            &format!("SELECT {COLUMNS} FROM ehrs WHERE iss = ?"),
            vec![key.clone().into()],
        )?
        .into_iter()
        .next();
    if exact.is_some() {
        return Ok(exact);
    }
    // A registration stored before hosts were compared without case: the few EHRs, compared
    // as keys.
    Ok(store
        .query::<Ehr>(&format!("SELECT {COLUMNS} FROM ehrs"), vec![])?
        .into_iter()
        .find(|e| iss_key(&e.iss) == key))
}

/// Removes an EHR with its sessions and undelivered outbox rows (a later EHR of the same name
/// must not inherit them).
pub fn remove(store: &Store, name: &str) -> Result<bool, StoreError> {
    crate::smart::session::end_where(store, "ehr = ?", vec![name.into()])?;
    store.execute(
        "DELETE FROM outbox WHERE ehr = ? AND delivered_at IS NULL",
        vec![name.into()],
    )?;
    Ok(store.execute("DELETE FROM ehrs WHERE name = ?", vec![name.into()])? > 0)
}

/// Registers the EHRs of the config file, or updates their settings (keeping their keys).
pub fn sync(store: &Store, configured: &[crate::config::EhrConfig]) -> anyhow::Result<()> {
    for c in configured {
        let wanted = NewEhr {
            name: &c.name,
            iss: &c.iss,
            client_id: &c.client_id,
            alg: &c.alg,
            launch_scopes: &c.launch_scope,
            backend_scopes: &c.backend_scope,
            trusted_systems: &c.trusted_systems,
            backend_token_url: c.backend_token_url.as_deref(),
            audit_base: c.audit_base.as_deref(),
        };
        match get(store, &c.name)? {
            None => {
                add(store, &wanted).map_err(|e| anyhow::anyhow!("[[ehr]] {}: {e}", c.name))?;
            }
            Some(e) => {
                // Another server under the same name would inherit sessions, links and pending
                // deliveries meant for the old one: that takes `courier ehr remove` and a new add.
                anyhow::ensure!(
                    iss_key(&e.iss) == iss_key(&normalize_iss(&c.iss)?) && e.alg == c.alg,
                    "[[ehr]] {}: iss or alg differ from the registered EHR; remove it (courier ehr remove) and start again",
                    c.name
                );
                let (backend_token_url, audit_base) =
                    overrides(c.backend_token_url.as_deref(), c.audit_base.as_deref())
                        .map_err(|e| anyhow::anyhow!("[[ehr]] {}: {e}", c.name))?;
                store.execute(
                    "UPDATE ehrs SET client_id = ?, launch_scopes = ?, backend_scopes = ?, trusted_systems = ?, backend_token_url = ?, audit_base = ? WHERE name = ?",
                    vec![
                        c.client_id.trim().into(),
                        c.launch_scope.trim().into(),
                        c.backend_scope.trim().into(),
                        c.trusted_systems.split_whitespace().collect::<Vec<_>>().join(" ").into(),
                        backend_token_url.into(),
                        audit_base.into(),
                        c.name.clone().into(),
                    ],
                )?;
            }
        }
        crate::mfa::set_settings(
            store,
            &c.name,
            c.mfa.as_deref(),
            c.portal_mfa.as_deref(),
            c.mfa_acr.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("[[ehr]] {}: {e}", c.name))?;
    }
    Ok(())
}

/// Courier's public keys for all EHRs (`GET /smart/jwks`).
pub fn jwks(store: &Store) -> Result<JwkSet, StoreError> {
    let keys = list(store)?
        .into_iter()
        .filter_map(|e| serde_json::from_str::<Jwk>(&e.public_jwk).ok())
        .collect();
    Ok(JwkSet { keys })
}

impl Ehr {
    pub fn trusts(&self, system: &str) -> bool {
        self.trusted_systems.split_whitespace().any(|s| s == system)
    }

    pub fn algorithm(&self) -> Algorithm {
        if self.alg == "RS384" {
            Algorithm::RS384
        } else {
            Algorithm::ES384
        }
    }

    /// Courier's signing key for this EHR, unsealed.
    pub fn signing_key(&self, store: &Store) -> anyhow::Result<EncodingKey> {
        let der =
            store.open_sealed(&self.key_id, &self.private_key, &aad(&self.name, &self.kid))?;
        Ok(keys::encoding_key(self.algorithm(), &der))
    }

    /// A `private_key_jwt` client assertion for this EHR's token endpoint (SMART: `iss` = `sub` =
    /// client id, `aud` = the token URL, `exp` within five minutes, a fresh `jti`).
    pub fn client_assertion(&self, store: &Store, token_url: &str) -> anyhow::Result<String> {
        let now = crate::clock::now_micros() / 1_000_000;
        let claims = serde_json::json!({
            "iss": self.client_id, "sub": self.client_id, "aud": token_url,
            "iat": now, "exp": now + 240, "jti": uuid::Uuid::new_v4().to_string(),
        });
        let mut header = jsonwebtoken::Header::new(self.algorithm());
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        Ok(jsonwebtoken::encode(
            &header,
            &claims,
            &self.signing_key(store)?,
        )?)
    }
}
