//! `spawn_app(backend)`: a Courier built exactly as production builds it, on a random port, with a
//! fresh database (a temporary SQLite file, or a fresh PostgreSQL schema).

use courier::auth::tokens::{Grant, Tokens};
use courier::auth::{clients, scopes};
use courier::config::Settings;
use courier::startup::Application;
use courier::store::Store;
use serde_json::Value;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub base: String,
    /// Sends every request with an access token for `system/*.cruds system/AuditEvent.rs`.
    pub client: reqwest::Client,
    /// Sends no token.
    pub anonymous: reqwest::Client,
    pub store: Arc<Store>,
    pub tokens: Arc<Tokens>,
    /// Backend-services connections to EHRs.
    pub ehrs: Arc<courier::smart::backend::Connections>,
    /// The outbox worker (abort it to play a crashed instance).
    pub outbox: tokio::task::AbortHandle,
    /// The scheduled-message sender (abort it to play a crashed instance).
    pub scheduler: tokio::task::AbortHandle,
    /// The database this instance uses (a second instance can share it).
    pub database_url: String,
    /// The client the default token was issued to.
    pub admin_client_id: String,
    pub backend: Backend,
    /// Keeps the SQLite directory alive for the test's duration.
    pub dir: tempfile::TempDir,
}

/// PostgreSQL URL for tests: `COURIER_TEST_POSTGRES_URL`. Under CI a missing URL is a failure.
pub fn postgres_url() -> Option<String> {
    match std::env::var("COURIER_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but COURIER_TEST_POSTGRES_URL is not set: PostgreSQL tests must run in CI");
            }
            None
        }
    }
}

/// A fresh schema in the test database, so tests run in parallel without seeing each other.
fn fresh_postgres_schema(admin_url: &str) -> String {
    use diesel::{Connection, PgConnection, RunQueryDsl};
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let mut c = PgConnection::establish(admin_url).expect("connect to COURIER_TEST_POSTGRES_URL");
    diesel::sql_query(format!("CREATE SCHEMA {schema}"))
        .execute(&mut c)
        .expect("create schema");
    let sep = if admin_url.contains('?') { '&' } else { '?' };
    format!("{admin_url}{sep}options=-csearch_path%3D{schema}")
}

/// A free TCP port on loopback (free when asked; for a process started next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `courier serve` on `app`'s database and master key, listening on `port`, quiet: a Courier
/// instance in a process of its own (to kill). The caller adds its settings and spawns it.
pub fn serve_command(app: &TestApp, port: u16) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_courier"));
    c.arg("serve")
        .env("COURIER_DATA_DIR", app.dir.path())
        .env("COURIER_DATABASE_URL", &app.database_url)
        .env(
            "COURIER_MASTER_KEY",
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
        )
        .env("COURIER_LISTEN", format!("127.0.0.1:{port}"))
        .env("COURIER_WEB_PUSH", "false")
        .env("COURIER_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// `SELECT … AS n` (a BIGINT: `COUNT(*)`, or a `CAST(… AS BIGINT)`) in the app's store.
pub fn count(app: &TestApp, sql: &str, binds: Vec<courier::store::db::Bind>) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    app.store.query::<N>(sql, binds).unwrap()[0].n
}

/// Runs a migration's `down.sql` (or any script of plain statements) on `app`'s database, one
/// statement at a time (the store runs one per call); comment-only pieces are skipped.
pub fn run_script(app: &TestApp, script: &str) {
    for stmt in script
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty() && !s.lines().all(|l| l.trim_start().starts_with("--")))
    {
        app.store.execute(stmt, vec![]).unwrap();
    }
}

/// A second Courier instance on the same database as `app` (same master key), as after a restart
/// or beside it in a cluster.
pub async fn spawn_instance_on(app: &TestApp) -> Option<TestApp> {
    let url = app.database_url.clone();
    spawn_app_with(app.backend, move |s| s.database_url = url).await
}

pub async fn spawn_app(backend: Backend) -> Option<TestApp> {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(
    backend: Backend,
    tweak: impl FnOnce(&mut Settings),
) -> Option<TestApp> {
    let dir = tempfile::tempdir().unwrap();
    let database_url = match backend {
        Backend::Sqlite => format!("sqlite://{}", dir.path().join("courier.db").display()),
        Backend::Postgres => fresh_postgres_schema(&postgres_url()?),
    };
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        base_url: String::new(),
        data_dir: dir.path().to_path_buf(),
        database_url,
        master_key: Some(
            "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
                .to_string()
                .into(),
        ),
        db_pool_size: 4,
        workers: 2,
        sqlite_synchronous: "NORMAL".into(),
        // The tests' notification receivers listen on loopback.
        subscription_private_endpoints: true,
        // The suite counts failed authentications one event each; tests/api/abuse.rs checks the
        // default's aggregation (a window of its own).
        auth_failure_audit_window_secs: 0,
        ..Settings::default()
    };
    tweak(&mut settings);
    if settings.base_url.is_empty() {
        settings.base_url = "http://127.0.0.1:0".into();
    }
    let database_url_used = settings.database_url.clone();
    let app = Application::build(settings).expect("application builds");
    let port = app.port();
    let store = app.store.clone();
    let tokens = app.tokens.clone();
    let ehrs = app.ehrs.clone();
    let outbox = app.outbox.clone();
    let scheduler = app.scheduler.clone();
    tokio::spawn(app.run_until_stopped());
    let admin_client_id = clients::add(
        &store,
        "test suite",
        clients::KeySource::Document(es384_key().1.to_string()),
        ADMIN_SCOPES,
    )
    .unwrap();
    let token = issue(&tokens, &admin_client_id, ADMIN_SCOPES, None, None);
    Some(TestApp {
        base: format!("http://127.0.0.1:{port}"),
        client: client_with_token(&token),
        anonymous: reqwest::Client::new(),
        store,
        tokens,
        ehrs,
        outbox,
        scheduler,
        database_url: database_url_used,
        admin_client_id,
        backend,
        dir,
    })
}

/// Runs the real `courier` binary on the data directory `dir`: (success, stdout, stderr).
pub fn run_cli(dir: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
        .args(args)
        .env("COURIER_DATA_DIR", dir)
        .env("COURIER_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

pub const ADMIN_SCOPES: &str = "system/*.cruds system/AuditEvent.rs";

/// A reqwest client that sends `token` as its bearer token on every request.
/// What a search of Communication answers with this bearer token (200 while it is good, 401
/// once revoked or expired).
pub async fn status_with(app: &TestApp, token: &str) -> u16 {
    client_with_token(token)
        .get(app.url("Communication"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

/// Issues a token the way the token endpoint (and later the SMART launch) does.
pub fn issue(
    tokens: &Tokens,
    client_id: &str,
    scope: &str,
    fhir_user: Option<&str>,
    patient: Option<&str>,
) -> String {
    tokens
        .issue(&Grant {
            client_id: client_id.to_string(),
            scopes: scopes::parse_all(scope).unwrap(),
            fhir_user: fhir_user.map(String::from),
            patient: patient.map(String::from),
            encounter: None,
        })
        .unwrap()
        .access_token
}

/// A fresh ES384 key pair: (PKCS#8 PEM private key, public JWK Set with kid "es-1").
pub fn es384_key() -> (String, Value) {
    use p384::pkcs8::{EncodePrivateKey, LineEnding};
    let secret = p384::SecretKey::random(&mut rand::rngs::OsRng);
    let pem = secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let mut jwk: Value = serde_json::from_str(&secret.public_key().to_jwk_string()).unwrap();
    jwk["kid"] = serde_json::json!("es-1");
    jwk["alg"] = serde_json::json!("ES384");
    jwk["use"] = serde_json::json!("sig");
    (pem, serde_json::json!({"keys": [jwk]}))
}

pub const FHIR_JSON: &str = "application/fhir+json";

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    pub async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", FHIR_JSON)
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn put(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("content-type", FHIR_JSON)
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// Creates a resource and returns its id.
    pub async fn create(&self, body: &Value) -> String {
        let rt = body["resourceType"].as_str().unwrap();
        let r = self.post(rt, body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "create {rt}: {v}");
        v["id"].as_str().unwrap().to_string()
    }

    /// Ids of the match entries of a search, in order.
    pub async fn search_ids(&self, query: &str) -> Vec<String> {
        let b = self.get_json(query).await;
        ids(&b)
    }

    pub fn row_counts(&self) -> Vec<(String, i64)> {
        self.store.row_counts().unwrap()
    }
}

/// The `next` link of a search Bundle, if it has one.
pub fn next_link(bundle: &Value) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .map(|l| l["url"].as_str().unwrap().to_string())
}

/// Every page of the search at `url`, following `next` links; each page must answer 200.
pub async fn all_pages(client: &reqwest::Client, url: String) -> Vec<Value> {
    let mut pages = Vec::new();
    let mut next = Some(url);
    while let Some(url) = next {
        let r = client.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let b: Value = r.json().await.unwrap();
        next = next_link(&b);
        pages.push(b);
    }
    pages
}

pub fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

pub fn message(recipient: &str, sent: &str, text: &str) -> Value {
    serde_json::json!({
        "resourceType": "Communication",
        "status": "completed",
        "recipient": [{"reference": recipient}],
        "sender": {"reference": "Practitioner/dr-1"},
        "sent": sent,
        "payload": [{"contentString": text}]
    })
}

/// Runs the test body against SQLite and against PostgreSQL (two test functions).
#[macro_export]
macro_rules! both_backends {
    ($(async fn $name:ident($app:ident: TestApp) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn run($app: $crate::helpers::TestApp) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let app = $crate::helpers::spawn_app($crate::helpers::Backend::Sqlite).await.unwrap();
                    run(app).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    match $crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await {
                        Some(app) => run(app).await,
                        None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
                    }
                }
            }
        )*
    };
}

/// `both_backends!` with settings of the test's own (`|s| { s.field = …; }`).
#[macro_export]
macro_rules! both_backends_with {
    (|$s:ident| $tweak:block $(async fn $name:ident($app:ident: TestApp) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                fn tweak($s: &mut courier::config::Settings) $tweak
                async fn run($app: $crate::helpers::TestApp) $body
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let app = $crate::helpers::spawn_app_with($crate::helpers::Backend::Sqlite, tweak).await.unwrap();
                    run(app).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    match $crate::helpers::spawn_app_with($crate::helpers::Backend::Postgres, tweak).await {
                        Some(app) => run(app).await,
                        None => eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set"),
                    }
                }
            }
        )*
    };
}

/// Waits (at most 30 s) until a Courier process at `base` answers `/metadata`.
pub async fn started(app: &TestApp, base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app
        .client
        .get(format!("{base}/metadata"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "courier serve did not start"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The claims of a JWT (its payload), unchecked.
pub fn claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}
