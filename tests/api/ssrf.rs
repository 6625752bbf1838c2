//! Server-side request forgery (issue 19 E): no outbound call — rest-hook, client JWKS, EHR
//! discovery and token endpoints — reaches a loopback, private, link-local, CGNAT, site-local,
//! NAT64, IPv4-mapped or other non-public address, whether written in the URL or behind a name
//! (names come from a resolver the test controls: `Outbound::pin`). Listeners on loopback prove
//! that no connection arrives.

use crate::helpers::*;
use courier::auth::clients;
use courier::messaging::subscriptions::{SubRow, EXT_SECRET, SUB_COLUMNS, TOPIC_COMMUNICATION};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "a-shared-secret-of-at-least-32-characters";

/// Runs the body on SQLite and on PostgreSQL (skipped without `COURIER_TEST_POSTGRES_URL`).
macro_rules! on_both {
    ($(async fn $name:ident($b:ident: Backend) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn run($b: Backend) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() { run(Backend::Sqlite).await }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() { run(Backend::Postgres).await }
        }
    )*};
}

/// A Courier with the production address rules; `allow` is `COURIER_OUTBOUND_ALLOW`.
async fn strict(b: Backend, allow: &[&str]) -> Option<TestApp> {
    let allow: Vec<String> = allow.iter().map(|s| s.to_string()).collect();
    spawn_app_with(b, move |s| {
        s.subscription_private_endpoints = false;
        s.outbound_allow = allow;
    })
    .await
}

/// Pins `name` to `addrs` in the app's outbound resolver.
fn pin(app: &TestApp, name: &str, addrs: &[&str]) {
    let addrs: Vec<IpAddr> = addrs.iter().map(|a| a.parse().unwrap()).collect();
    app.ehrs.discovery().http().pin(name, &addrs);
}

/// A TCP listener on `ip` that counts connections and answers each request with `reply`.
struct Tap {
    port: u16,
    hits: Arc<AtomicUsize>,
}

async fn tap(ip: &str, reply: Option<String>) -> Tap {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as much body as it announces (so closing does not reset).
                let need = loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break end + 4 + len;
                    }
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                while buf.len() < need {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                if let Some(r) = reply {
                    let _ = sock.write_all(r.as_bytes()).await;
                }
            });
        }
    });
    Tap { port, hits }
}

impl Tap {
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn subscription(endpoint: &str) -> Value {
    json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": TOPIC_COMMUNICATION,
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": "application/fhir+json",
            "extension": [{"url": EXT_SECRET, "valueString": SECRET}]},
    })
}

fn subscriber(app: &TestApp) -> reqwest::Client {
    let scope = "system/Communication.rs system/Subscription.cruds";
    let id = clients::add(
        &app.store,
        "subscriber",
        clients::KeySource::Document(es384_key().1.to_string()),
        scope,
    )
    .unwrap();
    client_with_token(&issue(&app.tokens, &id, scope, None, None))
}

async fn create(c: &reqwest::Client, app: &TestApp, endpoint: &str) -> (u16, Value) {
    let r = c
        .post(app.url("Subscription"))
        .header("content-type", FHIR_JSON)
        .body(subscription(endpoint).to_string())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn sub_row(app: &TestApp, id: &str) -> SubRow {
    app.store
        .query::<SubRow>(
            &format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE id = ?"),
            vec![id.to_string().into()],
        )
        .unwrap()
        .remove(0)
}

fn assert_refused(s: u16, o: &Value, what: &str) {
    assert_eq!(s, 400, "{what}: {o}");
    assert_eq!(o["resourceType"], "OperationOutcome", "{what}");
    assert_eq!(
        o["issue"][0]["expression"][0], "Subscription.channel.endpoint",
        "{what}: {o}"
    );
}

on_both! {
    async fn rest_hooks_to_forbidden_address_literals_are_refused(b: Backend) {
        let Some(app) = strict(b, &[]).await else { return };
        let c = subscriber(&app);
        let before = app.row_counts();
        for url in [
            "https://[::ffff:127.0.0.1]:18443/",
            "https://[::ffff:7f00:2]/",
            "https://[::ffff:169.254.169.254]/",
            "https://[::ffff:10.0.0.1]/hook",
            "https://100.64.0.1/",
            "https://100.127.255.254/",
            "https://[fec0::1]/",
            "https://[64:ff9b::7f00:1]/",
            "https://[64:ff9b::a9fe:a9fe]/",
            "https://[64:ff9b:1::a00:1]/",
            "https://[::127.0.0.1]/",
            "https://[fd00::1]/",
            "https://[fe80::1]/",
            "https://[ff02::1]/",
            "https://[2002:7f00:1::1]/",
            "https://[2001:db8::1]/",
            "https://0.0.0.0/",
            "https://192.0.0.170/",
            "https://198.18.0.1/",
            "https://224.0.0.1/",
            "https://255.255.255.255/",
            "https://2130706433/",
            "https://0x7f.1/",
            "https://127.1/",
            "https://[::]/",
            "https://sub.localhost/",
        ] {
            let (s, o) = create(&c, &app, url).await;
            assert_refused(s, &o, url);
        }
        assert_eq!(app.row_counts(), before, "nothing is stored");
    }

    async fn rest_hooks_to_names_that_resolve_to_forbidden_addresses_are_refused(b: Backend) {
        let Some(app) = strict(b, &[]).await else { return };
        let c = subscriber(&app);
        pin(&app, "loop.test", &["127.0.0.1"]);
        pin(&app, "mapped.test", &["::ffff:127.0.0.1"]);
        pin(&app, "cgnat.test", &["100.64.0.1"]);
        pin(&app, "metadata.test", &["169.254.169.254"]);
        pin(&app, "nat64.test", &["64:ff9b::a00:1"]);
        // One public address is not enough: every address of the name is checked.
        pin(&app, "mixed.test", &["93.184.216.34", "10.1.2.3"]);
        pin(&app, "mixed6.test", &["2606:4700:4700::1111", "fd00::1"]);
        let before = app.row_counts();
        for name in ["loop.test", "mapped.test", "cgnat.test", "metadata.test", "nat64.test", "mixed.test", "MIXED6.test."] {
            let url = format!("https://{name}/hook");
            let (s, o) = create(&c, &app, &url).await;
            assert_refused(s, &o, &url);
        }
        // Names the system resolver answers from /etc/hosts (not pinned) are checked the same way.
        let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        let local_names = hosts
            .lines()
            .filter_map(|l| {
                let mut f = l.split('#').next()?.split_whitespace();
                let ip: IpAddr = f.next()?.parse().ok()?;
                courier::outbound::forbidden(ip)?;
                Some(f.map(String::from).collect::<Vec<_>>())
            })
            .flatten()
            .filter(|n| !n.ends_with("localhost"))
            .take(3);
        for name in local_names {
            let url = format!("https://{name}/hook");
            let (s, o) = create(&c, &app, &url).await;
            assert_refused(s, &o, &url);
        }
        assert_eq!(app.row_counts(), before, "nothing is stored");
        // A name with only public addresses is accepted.
        pin(&app, "public.test", &["93.184.216.34", "2606:4700:4700::1111"]);
        let (s, o) = create(&c, &app, "https://public.test/hook").await;
        assert_eq!(s, 201, "{o}");
    }

    async fn a_name_that_rebinds_to_loopback_after_create_is_never_connected(b: Backend) {
        // 127.0.0.2 stands in for a public address: allowed, and nothing listens there.
        let Some(app) = strict(b, &["127.0.0.2/32"]).await else { return };
        let c = subscriber(&app);
        let target = tap("127.0.0.1", None).await;
        pin(&app, "rebind.test", &["127.0.0.2"]);
        let (s, o) = create(&c, &app, &format!("https://rebind.test:{}/hook", target.port)).await;
        assert_eq!(s, 201, "{o}");
        let id = o["id"].as_str().unwrap().to_string();
        // DNS now answers loopback: the delivery's own resolution is checked, not the create's.
        pin(&app, "rebind.test", &["127.0.0.1"]);
        let mut refused = false;
        for _ in 0..80 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let row = sub_row(&app, &id);
            if row.last_error.as_deref().is_some_and(|e| e.contains("rebind.test resolves to an address that is not public")) {
                refused = true;
                break;
            }
        }
        assert!(refused, "a delivery was refused: {:?}", sub_row(&app, &id).last_error);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(target.hits(), 0, "no connection reached the loopback listener");
        assert_ne!(sub_row(&app, &id).status, "active");
    }

    async fn a_redirect_from_an_allowed_endpoint_to_loopback_is_not_followed(b: Backend) {
        let Some(app) = strict(b, &["127.0.0.2/32"]).await else { return };
        let c = subscriber(&app);
        let target = tap("127.0.0.1", Some("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".into())).await;
        let redirect = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://127.0.0.1:{}/hook\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            target.port
        );
        let hook = tap("127.0.0.2", Some(redirect)).await;
        let (s, o) = create(&c, &app, &format!("http://127.0.0.2:{}/hook", hook.port)).await;
        assert_eq!(s, 201, "{o}");
        let id = o["id"].as_str().unwrap().to_string();
        for _ in 0..50 {
            if hook.hits() > 0 && sub_row(&app, &id).last_error.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(hook.hits() > 0, "the allowed endpoint was called");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(target.hits(), 0, "the redirect to loopback was not followed");
        let row = sub_row(&app, &id);
        assert_ne!(row.status, "active");
        assert!(row.last_error.as_deref().is_some_and(|e| e.contains("307")), "{:?}", row.last_error);
    }

    async fn a_client_jwks_url_at_a_forbidden_address_is_never_fetched(b: Backend) {
        use crate::auth::{assertion, es384, token_url};
        let Some(app) = strict(b, &[]).await else { return };
        let target = tap("127.0.0.1", None).await;
        pin(&app, "jwks.test", &["93.184.216.34", "127.0.0.1"]);
        for url in [
            format!("http://127.0.0.1:{}/jwks.json", target.port),
            format!("https://jwks.test:{}/jwks.json", target.port),
        ] {
            let (signer, _) = es384();
            let id = clients::add(&app.store, "jwks-by-url", clients::KeySource::Url(url.clone()), "system/Communication.rs").unwrap();
            let a = assertion(&signer, &id, &token_url(&app), json!({}));
            let (s, body, _) = crate::auth::token_request(&app, &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", &a),
                ("scope", "system/Communication.rs"),
            ]).await;
            assert_eq!(s, 401, "{url}: {body}");
            assert_eq!(body["error"], "invalid_client", "{url}");
        }
        assert_eq!(target.hits(), 0, "no JWKS request reached the loopback listener");
    }

    async fn ehr_discovery_and_token_endpoints_at_forbidden_addresses_are_never_contacted(b: Backend) {
        use courier::smart::registry;
        // An EHR registered on loopback, with no COURIER_OUTBOUND_ALLOW: discovery is refused.
        let Some(app) = strict(b, &[]).await else { return };
        let ehr_port = tap("127.0.0.1", None).await;
        let iss = format!("http://127.0.0.1:{}/fhir", ehr_port.port);
        let ehr = registry::add(&app.store, &crate::ehr::new_ehr("loop-ehr", &iss, "ES384")).unwrap();
        let e = app.ehrs.token(&app.store, &ehr).await.unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        assert_eq!(ehr_port.hits(), 0, "discovery never reached the EHR's loopback address");

        // An allowed EHR whose discovery names a token endpoint on a forbidden address.
        let Some(app) = strict(b, &["127.0.0.1/32"]).await else { return };
        let token_tap = tap("127.0.0.3", None).await;
        pin(&app, "token.test", &["127.0.0.3"]);
        let conf = json!({"token_endpoint": format!("https://token.test:{}/token", token_tap.port),
            "capabilities": ["client-confidential-asymmetric"]}).to_string();
        let ehr_tap = tap("127.0.0.1", Some(format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{conf}", conf.len()))).await;
        let iss = format!("http://127.0.0.1:{}/fhir", ehr_tap.port);
        let ehr = registry::add(&app.store, &crate::ehr::new_ehr("allowed-ehr", &iss, "ES384")).unwrap();
        let e = app.ehrs.token(&app.store, &ehr).await.unwrap_err();
        assert!(ehr_tap.hits() > 0, "the allowed EHR was asked for its configuration");
        assert_eq!(token_tap.hits(), 0, "the token endpoint on 127.0.0.3 was never contacted: {e}");
    }
}
