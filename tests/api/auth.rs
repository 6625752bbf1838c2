//! Courier's authorization server: SMART Backend Services end to end with keys made here (RS384
//! from a JWKS URL, ES384 from a registered JWKS), every rejection path with its exact status,
//! introspection, revocation, discovery, CORS, signing-key rotation and the audit trail of it all.

use crate::both_backends;
use crate::helpers::*;
use actix_web::{web, App, HttpResponse, HttpServer};
use base64::Engine;
use courier::auth::clients;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

pub struct Signer {
    pub alg: Algorithm,
    pub kid: String,
    pub key: EncodingKey,
}

/// A fresh RS384 key: its signer, public JWK Set (kid "rs-1") and PKCS#1 PEM.
pub fn rs384() -> (Signer, Value, String) {
    use rsa::pkcs1::EncodeRsaPrivateKey;
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap();
    let pem = key.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = json!({"kty": "RSA", "kid": "rs-1", "alg": "RS384", "use": "sig",
        "n": b64(key.n().to_bytes_be()), "e": b64(key.e().to_bytes_be())});
    (
        Signer {
            alg: Algorithm::RS384,
            kid: "rs-1".into(),
            key: EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        },
        json!({"keys": [jwk]}),
        pem.to_string(),
    )
}

/// A fresh ES384 key: its signer and public JWK Set (kid "es-1").
pub fn es384() -> (Signer, Value) {
    let (pem, jwks) = es384_key();
    (
        Signer {
            alg: Algorithm::ES384,
            kid: "es-1".into(),
            key: EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
        },
        jwks,
    )
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Serves a JWKS document on the loopback interface; returns its URL.
pub async fn serve_jwks(doc: Value) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let doc = web::Data::new(Arc::new(Mutex::new(doc)));
    let server = HttpServer::new(move || {
        App::new().app_data(doc.clone()).route(
            "/jwks.json",
            web::get().to(|d: web::Data<Arc<Mutex<Value>>>| async move {
                HttpResponse::Ok().json(d.lock().unwrap().clone())
            }),
        )
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    format!("http://127.0.0.1:{port}/jwks.json")
}

/// A client assertion: `claims` are merged over the standard ones.
pub fn assertion(s: &Signer, client_id: &str, aud: &str, overrides: Value) -> String {
    let mut claims = json!({"iss": client_id, "sub": client_id, "aud": aud,
        "exp": now() + 240, "jti": uuid::Uuid::new_v4().to_string()});
    for (k, v) in overrides.as_object().unwrap() {
        claims[k] = v.clone();
    }
    let mut h = Header::new(s.alg);
    h.kid = Some(s.kid.clone());
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

pub fn token_url(app: &TestApp) -> String {
    app.url("auth/token")
}

pub async fn token_request(
    app: &TestApp,
    form: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish();
    let r = app
        .anonymous
        .post(token_url(app))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

pub async fn get_token(app: &TestApp, s: &Signer, client_id: &str, scope: &str) -> (u16, Value) {
    let a = assertion(s, client_id, &token_url(app), json!({}));
    let (status, body, _) = token_request(
        app,
        &[
            ("grant_type", "client_credentials"),
            ("client_assertion_type", ASSERTION_TYPE),
            ("client_assertion", &a),
            ("scope", scope),
        ],
    )
    .await;
    (status, body)
}

async fn form_post(
    app: &TestApp,
    client: &reqwest::Client,
    path: &str,
    form: &[(&str, &str)],
) -> reqwest::Response {
    client
        .post(app.url(path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish(),
        )
        .send()
        .await
        .unwrap()
}

both_backends! {
    async fn backend_services_flow_with_rs384_and_es384(app: TestApp) {
        let (rs, rs_jwks, _) = rs384();
        let url = serve_jwks(rs_jwks).await;
        let rs_client = clients::add(&app.store, "EHR integration (RS384, JWKS URL)", clients::KeySource::Url(url),
            "system/Communication.cruds system/CommunicationRequest.rs").unwrap();
        let (es, es_jwks) = es384();
        let es_client = clients::add(&app.store, "Lab system (ES384, registered JWKS)", clients::KeySource::Document(es_jwks.to_string()),
            "system/Communication.rs").unwrap();

        for (signer, client_id, scope, granted) in [
            (&rs, &rs_client, "system/Communication.cruds system/CommunicationRequest.read", "system/Communication.cruds system/CommunicationRequest.rs"),
            // requested ∩ registered: asking for more than registered gets only what is registered.
            (&es, &es_client, "system/*.cruds", "system/Communication.rs"),
        ] {
            let a = assertion(signer, client_id, &token_url(&app), json!({}));
            let (status, body, headers) = token_request(&app, &[
                ("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE),
                ("client_assertion", &a), ("scope", scope)]).await;
            assert_eq!(status, 200, "{body}");
            assert_eq!(headers["cache-control"], "no-store");
            assert_eq!(headers["pragma"], "no-cache");
            assert_eq!(body["token_type"], "bearer");
            assert!(body["expires_in"].as_i64().unwrap() <= 300);
            assert_eq!(body["scope"], granted);
            assert!(body.get("refresh_token").is_none());
            let token = body["access_token"].as_str().unwrap();
            // The access token is a JWT signed by a key Courier publishes.
            let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
            let jwks = app.get_json("auth/jwks").await;
            assert!(jwks["keys"].as_array().unwrap().iter().any(|k| k["kid"] == kid.as_str()));
            assert!(jwks.to_string().find("\"d\"").is_none(), "no private key material published");
        }

        // The RS384 client writes and searches with its token.
        let (_, body) = get_token(&app, &rs, &rs_client, "system/Communication.cruds").await;
        let token = body["access_token"].as_str().unwrap().to_string();
        let integrator = client_with_token(&token);
        let r = integrator.post(app.url("Communication")).header("content-type", FHIR_JSON)
            .body(message("Patient/p1", "2024-01-01", "hi").to_string()).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let found: Value = integrator.get(app.url("Communication?recipient=Patient/p1")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids(&found).len(), 1);
        // A scope for another type gives 403, not data.
        let r = integrator.get(app.url("CommunicationRequest")).send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.json::<Value>().await.unwrap()["issue"][0]["code"], "forbidden");

        // Introspection (RFC 7662) by the token's own client.
        let r = form_post(&app, &integrator, "auth/introspect", &[("token", &token)]).await;
        let i: Value = r.json().await.unwrap();
        assert_eq!(i["active"], true, "{i}");
        assert_eq!(i["client_id"], rs_client.as_str());
        assert_eq!(i["scope"], "system/Communication.cruds");
        assert!(i["exp"].as_i64().unwrap() > now());
        // Another client cannot learn anything about it.
        let r = form_post(&app, &app.client, "auth/introspect", &[("token", &token)]).await;
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"active": false}));
        // A caller without credentials learns nothing: every token is inactive to it (as the
        // SMART test kit expects); one with bad credentials is refused.
        let r = form_post(&app, &app.anonymous, "auth/introspect", &[("token", &token)]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"active": false}));
        let forged = client_with_token("not-a-token");
        assert_eq!(form_post(&app, &forged, "auth/introspect", &[("token", &token)]).await.status(), 401);

        // Revocation (RFC 7009): the token stops working at once.
        let r = form_post(&app, &integrator, "auth/revoke", &[("token", &token)]).await;
        assert_eq!(r.status(), 200);
        let r = integrator.get(app.url("Communication")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Bearer"));
        let r = form_post(&app, &app.client, "auth/introspect", &[("token", &token)]).await;
        assert_eq!(r.json::<Value>().await.unwrap()["active"], false);
    }

    async fn every_bad_assertion_is_refused_with_the_exact_error(app: TestApp) {
        let (es, es_jwks) = es384();
        let client_id = clients::add(&app.store, "c", clients::KeySource::Document(es_jwks.to_string()), "system/Communication.rs").unwrap();
        let aud = token_url(&app);
        let send = |a: String, grant: &'static str, atype: &'static str, scope: &'static str| {
            let app = &app;
            async move {
                let (s, b, h) = token_request(app, &[("grant_type", grant), ("client_assertion_type", atype),
                    ("client_assertion", &a), ("scope", scope)]).await;
                assert_eq!(h["cache-control"], "no-store");
                (s, b["error"].as_str().unwrap_or("").to_string())
            }
        };
        let good = |o: Value| assertion(&es, &client_id, &aud, o);
        let std = |a: String| send(a, "client_credentials", ASSERTION_TYPE, "system/Communication.rs");
        let invalid_client = (401u16, "invalid_client".to_string());

        // alg none
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json!({"iss": client_id, "sub": client_id, "aud": aud, "exp": now() + 60, "jti": "n1"}).to_string());
        let none = format!("{}.{claims}.", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"es-1"}"#));
        assert_eq!(std(none).await, invalid_client, "alg none");
        // HS256 keyed with the client's own public key (algorithm confusion)
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("es-1".into());
        let hs = jsonwebtoken::encode(&h, &json!({"iss": client_id, "sub": client_id, "aud": aud, "exp": now() + 60, "jti": "h1"}),
            &EncodingKey::from_secret(es_jwks.to_string().as_bytes())).unwrap();
        assert_eq!(std(hs).await, invalid_client, "HS256");
        assert_eq!(std(good(json!({"exp": now() - 120}))).await, invalid_client, "expired");
        assert_eq!(std(good(json!({"exp": now() + 600}))).await, invalid_client, "exp more than 5 minutes ahead");
        assert_eq!(std(good(json!({"nbf": now() + 120}))).await, invalid_client, "nbf in the future");
        assert_eq!(std(good(json!({"aud": "https://elsewhere.example/token"}))).await, invalid_client, "wrong aud");
        assert_eq!(std(good(json!({"sub": "someone-else"}))).await, invalid_client, "sub is not the client");
        assert_eq!(std(good(json!({"iss": "someone-else"}))).await, invalid_client, "unknown iss");
        let mut tampered = good(json!({}));
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(std(tampered).await, invalid_client, "tampered signature");
        let mut h = Header::new(Algorithm::ES384);
        h.kid = Some("es-unknown".into());
        let unknown_kid = jsonwebtoken::encode(&h, &json!({"iss": client_id, "sub": client_id, "aud": aud, "exp": now() + 60, "jti": "k1"}), &es.key).unwrap();
        assert_eq!(std(unknown_kid).await, invalid_client, "unknown kid");
        let (other, _) = es384();
        assert_eq!(std(assertion(&other, &client_id, &aud, json!({}))).await, invalid_client, "signed by another key with the same kid");
        assert_eq!(std(good(json!({"jti": null}))).await, invalid_client, "no jti");
        // Replay: the same assertion twice.
        let once = good(json!({}));
        assert_eq!(std(once.clone()).await.0, 200);
        assert_eq!(std(once).await, invalid_client, "replayed jti");
        // Scope not registered, bad grant type, bad assertion type.
        assert_eq!(send(good(json!({})), "client_credentials", ASSERTION_TYPE, "system/CommunicationRequest.rs").await, (400, "invalid_scope".to_string()));
        assert_eq!(send(good(json!({})), "client_credentials", ASSERTION_TYPE, "patient/Communication.rs").await, (400, "invalid_scope".to_string()));
        assert_eq!(send(good(json!({})), "password", ASSERTION_TYPE, "system/Communication.rs").await, (400, "unsupported_grant_type".to_string()));
        assert_eq!(send(good(json!({})), "client_credentials", "urn:ietf:params:oauth:client-assertion-type:saml2-bearer", "system/Communication.rs").await, invalid_client);
        // Parameters must be a form, each once.
        let r = app.anonymous.post(token_url(&app)).header("content-type", "application/json").body("{}").send().await.unwrap();
        assert_eq!(r.status(), 400);
        let (s, b, _) = token_request(&app, &[("grant_type", "client_credentials"), ("grant_type", "client_credentials")]).await;
        assert_eq!((s, b["error"].as_str().unwrap()), (400, "invalid_request"));
        // A removed client can no longer authenticate, and its tokens stop working.
        let (_, body) = get_token(&app, &es, &client_id, "system/Communication.rs").await;
        let token = body["access_token"].as_str().unwrap().to_string();
        assert_eq!(client_with_token(&token).get(app.url("Communication")).send().await.unwrap().status(), 200);
        assert!(clients::remove(&app.store, &client_id).unwrap());
        assert_eq!(std(good(json!({}))).await, invalid_client, "removed client");
        assert_eq!(client_with_token(&token).get(app.url("Communication")).send().await.unwrap().status(), 401);
        // Every failed attempt is in the audit trail, with no secrets in it.
        let failures = app.get_json("AuditEvent?type=http://dicom.nema.org/resources/ontology/DCM|110114&outcome=4&_count=100").await;
        assert!(ids(&failures).len() >= 15, "{}", ids(&failures).len());
        assert!(!failures.to_string().contains(&token));
    }

    async fn fhir_endpoints_need_a_valid_access_token(app: TestApp) {
        let id = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        for path in ["Communication", &format!("Communication/{id}"), &format!("Communication/{id}/_history"), "AuditEvent", "Binary/abc"] {
            let r = app.anonymous.get(app.url(path)).send().await.unwrap();
            assert_eq!(r.status(), 401, "{path}");
            assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"courier\"");
            let oo: Value = r.json().await.unwrap();
            assert_eq!(oo["resourceType"], "OperationOutcome");
            assert!(!oo.to_string().contains(&id));
        }
        let r = app.anonymous.post(app.url("Communication")).header("content-type", FHIR_JSON).body(message("Patient/p1", "2024-01-01", "x").to_string()).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let before = app.row_counts();
        let r = app.anonymous.post(app.url("")).header("content-type", FHIR_JSON)
            .body(json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": message("Patient/p1", "2024", "x"), "request": {"method": "POST", "url": "Communication"}}]}).to_string())
            .send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(app.row_counts(), before, "nothing written without a token");
        // A forged token: HS256 keyed with Courier's own public key, claiming everything.
        let jwks = app.get_json("auth/jwks").await;
        let kid = jwks["keys"][0]["kid"].as_str().unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(kid.into());
        let forged = jsonwebtoken::encode(&h, &json!({"iss": app.base, "aud": app.base, "sub": "x", "exp": now() + 100, "iat": now(),
            "jti": "f", "client_id": app.admin_client_id, "scope": "system/*.cruds"}), &EncodingKey::from_secret(jwks["keys"][0].to_string().as_bytes())).unwrap();
        let r = client_with_token(&forged).get(app.url("Communication")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
        // A token of this server with one character changed.
        let good = issue(&app.tokens, &app.admin_client_id, "system/Communication.rs", None, None);
        let mut bad = good.clone();
        let mid = bad.len() / 2;
        bad.replace_range(mid..mid + 1, if &good[mid..mid + 1] == "A" { "B" } else { "A" });
        assert_eq!(client_with_token(&bad).get(app.url("Communication")).send().await.unwrap().status(), 401);
        assert_eq!(client_with_token(&good).get(app.url("Communication")).send().await.unwrap().status(), 200);
        // Public: discovery, metadata, health.
        for path in ["metadata", ".well-known/smart-configuration", "auth/jwks", "healthz"] {
            assert_eq!(app.anonymous.get(app.url(path)).send().await.unwrap().status(), 200, "{path}");
        }
    }

    async fn discovery_capability_statement_and_cors(app: TestApp) {
        let d: Value = app.anonymous.get(app.url(".well-known/smart-configuration")).send().await.unwrap().json().await.unwrap();
        assert_eq!(d["token_endpoint"], token_url(&app));
        assert_eq!(d["jwks_uri"], app.url("auth/jwks"));
        assert_eq!(d["introspection_endpoint"], app.url("auth/introspect"));
        assert_eq!(d["revocation_endpoint"], app.url("auth/revoke"));
        assert_eq!(d["token_endpoint_auth_methods_supported"], json!(["private_key_jwt"]));
        assert_eq!(d["token_endpoint_auth_signing_alg_values_supported"], json!(["RS384", "ES384"]));
        assert_eq!(d["grant_types_supported"], json!(["client_credentials"]));
        assert_eq!(d["code_challenge_methods_supported"], json!(["S256"]));
        assert!(d["capabilities"].as_array().unwrap().contains(&json!("client-confidential-asymmetric")));
        assert!(d["scopes_supported"].as_array().unwrap().contains(&json!("system/Communication.cruds")));
        let cs = app.get_json("metadata").await;
        let sec = &cs["rest"][0]["security"];
        assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
        let uris = sec["extension"].as_array().unwrap().iter().find(|e| e["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris").unwrap();
        let token = uris["extension"].as_array().unwrap().iter().find(|e| e["url"] == "token").unwrap();
        assert_eq!(token["valueUri"], token_url(&app));
        // CORS: a browser app on another origin may call discovery, token and FHIR endpoints.
        for path in [".well-known/smart-configuration", "auth/token", "Communication"] {
            let r = app.anonymous.request(reqwest::Method::OPTIONS, app.url(path))
                .header("origin", "https://app.example.org").header("access-control-request-method", "POST")
                .header("access-control-request-headers", "authorization,content-type").send().await.unwrap();
            assert!(r.status().is_success(), "{path}: {}", r.status());
            assert!(r.headers().contains_key("access-control-allow-origin"), "{path}");
        }
        let r = app.client.get(app.url("Communication")).header("origin", "https://app.example.org").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("access-control-allow-origin"));
    }

    async fn signing_key_rotation_breaks_no_token_in_flight(app: TestApp) {
        let before = issue(&app.tokens, &app.admin_client_id, "system/Communication.rs", None, None);
        let old_kid = jsonwebtoken::decode_header(&before).unwrap().kid.unwrap();
        let new_kid = app.tokens.rotate().unwrap();
        assert_ne!(old_kid, new_kid);
        let after = issue(&app.tokens, &app.admin_client_id, "system/Communication.rs", None, None);
        assert_eq!(jsonwebtoken::decode_header(&after).unwrap().kid.unwrap(), new_kid);
        for t in [&before, &after] {
            assert_eq!(client_with_token(t).get(app.url("Communication")).send().await.unwrap().status(), 200);
        }
        let jwks = app.get_json("auth/jwks").await;
        let kids: Vec<&str> = jwks["keys"].as_array().unwrap().iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert!(kids.contains(&old_kid.as_str()) && kids.contains(&new_kid.as_str()));
    }

    async fn audit_events_name_the_client_user_and_token(app: TestApp) {
        let (es, jwks) = es384();
        let client_id = clients::add(&app.store, "portal", clients::KeySource::Document(jwks.to_string()), "system/Communication.rs").unwrap();
        let (_, body) = get_token(&app, &es, &client_id, "system/Communication.rs").await;
        let token = body["access_token"].as_str().unwrap().to_string();
        let claims: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
        let r = client_with_token(&token).get(app.url("Communication?status=completed")).header("x-request-id", "sys-search").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let user_token = issue(&app.tokens, &client_id, "user/Communication.rs", Some("Practitioner/dr-9"), None);
        let claims_user: Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(user_token.split('.').nth(1).unwrap()).unwrap()).unwrap();
        client_with_token(&user_token).get(app.url("Communication")).header("x-request-id", "user-search").send().await.unwrap();
        // A denial is audited too.
        let r = client_with_token(&user_token).get(app.url("CommunicationRequest")).header("x-request-id", "user-denied").send().await.unwrap();
        assert_eq!(r.status(), 403);
        let events = app.get_json("AuditEvent?_count=500").await;
        let find = |rid: &str| events["entry"].as_array().unwrap().iter().map(|e| e["resource"].clone())
            .find(|e| e["entity"].as_array().is_some_and(|a| a.iter().any(|x| x["what"]["identifier"]["value"] == rid))).unwrap_or_else(|| panic!("{rid} audited"));
        let sys = find("sys-search");
        assert_eq!(sys["agent"][0]["who"]["identifier"]["value"], client_id.as_str());
        assert_eq!(sys["agent"][0]["requestor"], true);
        assert_eq!(sys["agent"][0]["policy"][0], claims["jti"]);
        let user = find("user-search");
        let agent = user["agent"].as_array().unwrap().iter().find(|a| a["who"]["reference"] == "Practitioner/dr-9").expect("user agent");
        assert_eq!(agent["requestor"], true);
        assert_eq!(agent["policy"][0], claims_user["jti"]);
        assert_eq!(user["agent"][0]["requestor"], false);
        let denied = find("user-denied");
        assert_eq!(denied["outcome"], "4");
        assert!(denied["agent"].as_array().unwrap().iter().any(|a| a["who"]["reference"] == "Practitioner/dr-9"));
    }
}

/// The `courier client …` commands, through the real binary.
#[test]
fn client_registry_cli_adds_lists_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, es384_key().1.to_string()).unwrap();
    let run = |args: &[&str]| run_cli(dir.path(), args);
    let (ok, id, err) = run(&[
        "client",
        "add",
        "--name",
        "Hospital EHR",
        "--jwks-file",
        jwks.to_str().unwrap(),
        "--scope",
        "system/Communication.cruds system/CommunicationRequest.cruds",
    ]);
    assert!(ok, "{err}");
    let id = id.trim().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().to_string(), id);
    let (ok, list, _) = run(&["client", "list"]);
    assert!(
        ok && list.contains(&id)
            && list.contains("Hospital EHR")
            && list.contains("system/Communication.cruds")
    );
    let (ok, token, err) = run(&[
        "token",
        "--client-id",
        &id,
        "--scope",
        "system/Communication.rs",
    ]);
    assert!(ok, "{err}");
    assert_eq!(token.trim().split('.').count(), 3);
    let (ok, _, err) = run(&[
        "client",
        "add",
        "--name",
        "x",
        "--jwks-url",
        "http://ehr.example.org/jwks",
        "--scope",
        "system/Communication.rs",
    ]);
    assert!(!ok && err.contains("https"), "{err}");
    let (ok, _, err) = run(&[
        "client",
        "add",
        "--name",
        "x",
        "--jwks-file",
        jwks.to_str().unwrap(),
        "--scope",
        "system/Communication.rx",
    ]);
    assert!(!ok && err.contains("scope"), "{err}");
    let (ok, _, _) = run(&["client", "remove", &id]);
    assert!(ok);
    let (_, list, _) = run(&["client", "list"]);
    assert!(!list.contains(&id));
    let (ok, _, _) = run(&["client", "remove", &id]);
    assert!(!ok, "removing twice is an error");
    let (ok, out, err) = run(&["signing-key", "rotate"]);
    assert!(ok && out.contains("now signing with"), "{err}");
}
