//! An EHR's SMART endpoints: `{iss}/.well-known/smart-configuration`, or — for servers that only
//! publish them there — the `oauth-uris` extension of `CapabilityStatement.rest.security`. Cached
//! for [`TTL`]; a failure is not cached, so a recovered EHR is found again on the next attempt.

use crate::outbound::Outbound;
use parking_lot::Mutex;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TTL: Duration = Duration::from_secs(600);
const MAX_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct Endpoints {
    /// The authorization server's issuer (the `iss` of its id_tokens), when published.
    pub issuer: Option<String>,
    pub authorization: Option<String>,
    pub token: String,
    pub jwks_uri: Option<String>,
    pub capabilities: Vec<String>,
    /// Where they came from: `smart-configuration` or `CapabilityStatement`.
    pub source: &'static str,
}

pub struct Discovery {
    http: Outbound,
    cache: Mutex<HashMap<String, (Instant, Arc<Endpoints>)>>,
}

impl Discovery {
    /// Discovery through `http` (see [`crate::outbound`]), whose client every EHR call shares.
    pub fn new(http: Outbound) -> Discovery {
        Discovery {
            http,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn http(&self) -> &Outbound {
        &self.http
    }

    /// Drops what was discovered of `iss`: the next launch discovers it again (after an EHR
    /// changed its configuration).
    pub fn forget(&self, iss: &str) {
        self.cache.lock().remove(iss);
    }

    /// The EHR's endpoints, from the cache or discovered now.
    pub async fn endpoints(&self, iss: &str) -> Result<Arc<Endpoints>, String> {
        if let Some((at, e)) = self.cache.lock().get(iss) {
            if at.elapsed() < TTL {
                return Ok(e.clone());
            }
        }
        let found = match self
            .get_json(
                &format!("{iss}/.well-known/smart-configuration"),
                "application/json",
            )
            .await
        {
            Ok(doc) => from_smart_configuration(&doc),
            Err(_) => Err("no smart-configuration".to_string()),
        };
        let found = match found {
            Ok(e) => e,
            Err(first) => {
                let cs = self
                    .get_json(&format!("{iss}/metadata"), "application/fhir+json")
                    .await
                    .map_err(|e| format!("{first}; and the CapabilityStatement: {e}"))?;
                from_capability_statement(&cs).map_err(|e| format!("{first}; {e}"))?
            }
        };
        // No jwks_uri (a CapabilityStatement carries none): the OpenID provider configuration
        // names the keys that sign the id_token (OpenID Connect Discovery §3).
        let mut found = found;
        if found.jwks_uri.is_none() {
            if let Ok(doc) = self
                .get_json(
                    &format!("{iss}/.well-known/openid-configuration"),
                    "application/json",
                )
                .await
            {
                found.jwks_uri = doc["jwks_uri"].as_str().map(String::from);
                if found.issuer.is_none() {
                    found.issuer = doc["issuer"].as_str().map(String::from);
                }
            }
        }
        if let Some(j) = &found.jwks_uri {
            crate::auth::clients::check_jwks_url(j)
                .map_err(|_| format!("the EHR's key set {j} is not https"))?;
        }
        // Codes, assertions and tokens travel to these: https only (http on loopback).
        for url in std::iter::once(&found.token).chain(found.authorization.as_ref()) {
            crate::auth::clients::check_jwks_url(url)
                .map_err(|_| format!("the EHR's endpoint {url} is not https"))?;
        }
        let found = Arc::new(found);
        self.cache
            .lock()
            .insert(iss.to_string(), (Instant::now(), found.clone()));
        Ok(found)
    }

    async fn get_json(&self, url: &str, accept: &str) -> Result<Value, String> {
        let mut res = self
            .http
            .get(url)?
            .header("accept", accept)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !res.status().is_success() {
            return Err(format!("HTTP {}", res.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_BYTES {
                return Err("the document is too large".into());
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|_| "not JSON".to_string())
    }
}

fn from_smart_configuration(doc: &Value) -> Result<Endpoints, String> {
    let s = |k: &str| doc[k].as_str().map(String::from);
    Ok(Endpoints {
        token: s("token_endpoint").ok_or("smart-configuration has no token_endpoint")?,
        issuer: s("issuer"),
        authorization: s("authorization_endpoint"),
        jwks_uri: s("jwks_uri"),
        capabilities: doc["capabilities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        source: "smart-configuration",
    })
}

fn from_capability_statement(cs: &Value) -> Result<Endpoints, String> {
    const OAUTH_URIS: &str =
        "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";
    let uris = cs["rest"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["security"]["extension"].as_array())
        .flatten()
        .find(|e| e["url"] == OAUTH_URIS)
        .ok_or("the CapabilityStatement has no oauth-uris extension")?;
    let uri = |name: &str| {
        uris["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["url"] == name)
            .and_then(|e| e["valueUri"].as_str())
            .map(String::from)
    };
    Ok(Endpoints {
        token: uri("token").ok_or("oauth-uris has no token URI")?,
        issuer: None,
        authorization: uri("authorize"),
        jwks_uri: None,
        capabilities: vec![],
        source: "CapabilityStatement",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_both_kinds_of_document() {
        let e = from_smart_configuration(&json!({"token_endpoint": "https://e/token",
            "authorization_endpoint": "https://e/auth", "capabilities": ["launch-ehr"]}))
        .unwrap();
        assert_eq!(e.token, "https://e/token");
        assert_eq!(e.capabilities, vec!["launch-ehr"]);
        assert!(from_smart_configuration(&json!({"issuer": "x"})).is_err());
        let cs = json!({"rest": [{"security": {"extension": [{"url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
            "extension": [{"url": "token", "valueUri": "https://e/t"}, {"url": "authorize", "valueUri": "https://e/a"}]}]}}]});
        let e = from_capability_statement(&cs).unwrap();
        assert_eq!(
            (e.token.as_str(), e.authorization.as_deref()),
            ("https://e/t", Some("https://e/a"))
        );
        assert!(from_capability_statement(&json!({"rest": [{}]})).is_err());
    }
}
