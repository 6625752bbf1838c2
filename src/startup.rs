//! `Application::build(settings)`: opens the store, binds the listener and returns the server.
//! `main` and the tests build the application exactly the same way.

use crate::api::AppState;
use crate::api::RequestId;
use crate::auth::clients::JwksCache;
use crate::auth::tokens::Tokens;
use crate::config::Settings;
use crate::fhir;
use crate::fhir::outcome::FHIR_JSON;
use crate::search::Registry;
use crate::smart::backend::Connections;
use crate::smart::discovery::Discovery;
use crate::store::crypto::{Keyring, MasterKey};
use crate::store::db::Db;
use crate::store::Store;
use actix_web::body::MessageBody;
use actix_web::dev::{Server, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpMessage, HttpResponse, HttpServer};
use std::net::TcpListener;
use std::sync::Arc;

pub struct Application {
    port: u16,
    server: Server,
    pub store: Arc<Store>,
    /// Issues and checks access tokens (tests and the SMART launch issue user tokens with it).
    pub tokens: Arc<Tokens>,
    /// Backend-services connections to the registered EHRs.
    pub ehrs: Arc<Connections>,
    /// The outbox delivery worker (tests stop it to play a crashed instance).
    pub outbox: tokio::task::AbortHandle,
    /// The scheduled-message sender (tests stop it to play a crashed instance).
    pub scheduler: tokio::task::AbortHandle,
    /// Failed authentications counted but not yet audited: written at shutdown.
    abuse: Arc<crate::auth::abuse::Abuse>,
    /// Refusals' AuditEvents still waiting for the store (recorded at a stop if they can be).
    deferred_audit: Arc<crate::audit::deferred::Deferred>,
}

/// Opens (and migrates) the database and loads keys: what `courier migrate` and `serve` share.
pub fn open_store(settings: &Settings) -> anyhow::Result<Arc<Store>> {
    // OpenSSL (libpq's TLS) is set up before any connection so that it does not free its global
    // state in an atexit handler: other threads (a pool's connections, background jobs) may
    // still use it while the process exits — a test binary segfaulted in libcrypto at exit after
    // every test had passed. The OS frees it instead.
    openssl_sys::init();
    if settings.data_dir.is_dir() {
        // Narrowed to 0700 if it is open to others (a new one is made 0700 where it is needed).
        crate::store::private::dir(&settings.data_dir)?;
    }
    let db = Db::connect(
        &settings.database_url,
        settings.db_pool_size,
        &settings.sqlite_synchronous,
    )?;
    // No key given and no key file, but data sealed under some key: the key file is lost or
    // misplaced. Refused before a new key is made (a new one would only be mistaken for it).
    if settings.master_key.is_none() && !settings.key_file().exists() {
        use crate::store::db::Conn;
        let mut c = db.get()?;
        let sealed: Vec<crate::store::rows::CountRow> = crate::with_conn!(c, |c| c.load(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM data_keys",
            vec![]
        ))?;
        if sealed.first().is_some_and(|r| r.n > 0) {
            anyhow::bail!(
                "the database holds data sealed under a master key, but no key is configured (COURIER_MASTER_KEY) and the key file {} does not exist: restore the key file; nothing was created",
                settings.key_file().display()
            );
        }
    }
    let (master, previous, created) = MasterKey::load_or_create(
        settings.master_key.as_ref(),
        &settings.previous_master_keys,
        &settings.key_file(),
    )?;
    if created {
        tracing::warn!(path = %settings.key_file().display(), key_id = %master.id,
            "created a new master key (mode 0600); back it up: without it the stored data cannot be read");
    }
    let registry = Arc::new(Registry::load()?);
    let retention = crate::compliance::retention::Policy::new(settings.retention.clone())?;
    // The key file is re-read on an unknown master key only when it is where the key comes from.
    let key_file = settings.master_key.is_none().then(|| settings.key_file());
    let store = Store::open(
        db,
        Keyring::with_previous(master, previous),
        registry,
        &settings.base_url,
        retention,
        key_file,
        crate::hooks::app(),
    )?;
    store.compress_bodies.store(
        settings.store_compress,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(store)
}

impl Application {
    pub fn build(mut settings: Settings) -> anyhow::Result<Application> {
        let listener = TcpListener::bind(&settings.listen)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.listen))?;
        let port = listener.local_addr()?.port();
        // Port 0 (tests): the derived base URL names the port actually bound.
        if settings.base_url.ends_with(":0") {
            settings.base_url = format!(
                "{}:{port}",
                &settings.base_url[..settings.base_url.len() - 2]
            );
        }
        let store = open_store(&settings)?;
        // Serve only what can be audited: a database that cannot be written now (read-only
        // file or directory, full disk) stops the start, naming it and why.
        store.probe_write().map_err(|e| {
            let place = match &store.db {
                Db::Sqlite(_, path, _) => format!("the SQLite database {}", path.display()),
                Db::Postgres(_) => "the PostgreSQL database".to_string(),
            };
            anyhow::anyhow!("cannot write to {place}: {e}")
        })?;
        if settings.sqlite_resident_mb > 0 {
            store.keep_resident(settings.sqlite_resident_mb.saturating_mul(1 << 20))?;
        }
        let tokens = Arc::new(Tokens::open(store.clone(), &settings.base_url)?);
        crate::smart::registry::sync(&store, &settings.ehr)?;
        crate::auth::clients::ensure_internal(
            &store,
            crate::smart::launch::WEB_APP_CLIENT,
            "Courier web app (tokens from SMART launches)",
            "user/*.cruds patient/*.cruds",
        )?;
        // Every request to another server goes through this one client (SSRF rules: `outbound`).
        let outbound = crate::outbound::Outbound::new(&settings)?;
        let ehrs = Arc::new(Connections::new(Arc::new(Discovery::new(outbound.clone()))));
        let pg_url = settings
            .database_url
            .starts_with("postgres")
            .then(|| settings.database_url.clone());
        let hub = crate::messaging::hub::Hub::start(store.clone(), pg_url.clone())?;
        crate::messaging::away::init(&store)?;
        // A shared inbox that reaches no one is not offered to anyone (`$recipients`): say so.
        for (label, group) in &settings.message_pools {
            if crate::messaging::groups::members(&store, group)?.is_empty() {
                tracing::warn!(pool = %label, %group,
                    "COURIER_MESSAGE_POOLS names a Group that Courier does not hold, or holds without members: the shared inbox is not offered until it has some");
            }
        }
        let leader = Arc::new(crate::messaging::dispatch::Leader::new(pg_url));
        let abuse = Arc::new(crate::auth::abuse::Abuse::new(&settings));
        let settings_arc = Arc::new(settings.clone());
        let background = crate::background::start(
            &store,
            &settings_arc,
            &leader,
            &hub,
            &ehrs,
            &outbound,
            &abuse,
        );
        let (outbox, scheduler) = (background.outbox, background.scheduler);
        let workers = if settings.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            settings.workers
        };
        let abuse_at_exit = abuse.clone();
        let abuse = web::Data::from(abuse);
        let bodies = web::Data::new(crate::auth::abuse::BodyBudget::new(&settings));
        // Kept in a spool in the data directory too: a crash during an outage does not lose them.
        let deferred_audit = Arc::new(crate::audit::deferred::Deferred::with_spool(
            store.clone(),
            &settings.data_dir,
        ));
        let base_url = settings.base_url.clone();
        let state = web::Data::new(AppState {
            store: store.clone(),
            settings: Arc::new(settings),
            tokens: tokens.clone(),
            jwks: Arc::new(JwksCache::new(outbound)),
            ehrs: ehrs.clone(),
            hub,
            deferred_audit: deferred_audit.clone(),
        });
        // AuditEvents that could not be recorded when their request was refused: recorded once
        // the store takes writes again (every 2 s while any wait; ends with the store).
        {
            let (deferred, store, base_url) = (
                Arc::downgrade(&deferred_audit),
                Arc::downgrade(&store),
                base_url,
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                    let (Some(deferred), Some(store)) = (deferred.upgrade(), store.upgrade())
                    else {
                        return;
                    };
                    if !deferred.is_empty() {
                        deferred.flush(&store, &base_url).await;
                    }
                }
            });
        }
        // SIGTERM or SIGINT starts the graceful shutdown (actix finishes the requests in flight):
        // the sockets close at once, so no app shows "Connected" to a server that is going, and
        // /readyz says 503 so a load balancer sends no one back. (Started once nothing here can
        // fail any more; it keeps only a weak hold on the hub.)
        let stopping = Arc::downgrade(&state.hub);
        tokio::spawn(async move {
            if stop_signal().await {
                if let Some(hub) = stopping.upgrade() {
                    hub.stopping.send_replace(true);
                }
            }
        });
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .app_data(abuse.clone())
                .app_data(bodies.clone())
                .app_data(web::PayloadConfig::new(64 * 1024))
                // Inside the guard: only authenticated requests get to have their bodies read.
                .wrap(from_fn(crate::auth::abuse::body_budget))
                .wrap(from_fn(crate::auth::guard::authenticate))
                .wrap(from_fn(request_id))
                .wrap(cors())
                .route("/healthz", web::get().to(healthz))
                .route("/readyz", web::get().to(readyz))
                .route("/metrics", web::get().to(metrics))
                .configure(crate::auth::server::routes)
                .configure(crate::smart::launch::routes)
                .configure(crate::smart::session::routes)
                .configure(crate::mfa::routes)
                .configure(crate::notify::routes)
                // Static paths first, then FHIR's type level, then the operations on an
                // instance, then FHIR's instance level (see `fhir::type_routes`).
                .configure(crate::messaging::routes)
                .configure(fhir::type_routes)
                .configure(crate::messaging::operation_routes)
                .configure(fhir::instance_routes)
                .default_service(web::to(fhir::no_such_endpoint))
        })
        .workers(workers)
        .shutdown_timeout(10)
        .listen(listener)?
        .run();
        Ok(Application {
            port,
            server,
            store,
            tokens,
            ehrs,
            outbox,
            scheduler,
            abuse: abuse_at_exit,
            deferred_audit,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until stopped; SIGINT/SIGTERM finish in-flight requests first (graceful shutdown).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let r = self.server.await;
        for event in self.abuse.due(true) {
            if let Err(e) = self.store.record_audit_async(event).await {
                tracing::error!(error = %e, "could not record AuditEvent");
            }
        }
        if !self.deferred_audit.is_empty() {
            // Bounded: a database that hangs must not hold the stop past its grace period.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                self.deferred_audit.flush(&self.store, &self.store.base_url),
            )
            .await;
            let left = self.deferred_audit.len();
            if left > 0 {
                tracing::error!(left, "AuditEvents of refused requests could not be recorded before the stop (the log has each, by request id)");
            }
        }
        r
    }
}

/// Waits for the signal that stops the server (SIGTERM or SIGINT): true when it came, false
/// when no handler could be installed (logged; the sockets then close only as before).
async fn stop_signal() -> bool {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (term, int) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        );
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                got = term.recv() => got.is_some(),
                got = int.recv() => got.is_some(),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "cannot watch for SIGTERM/SIGINT: WebSockets will not be closed early at shutdown");
                false
            }
        }
    }
    #[cfg(not(unix))]
    {
        match tokio::signal::ctrl_c().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch for Ctrl-C");
                false
            }
        }
    }
}

/// Browsers' SMART apps call the FHIR API, discovery and token endpoints from other origins. Bearer
/// tokens, never cookies: no credentials mode.
fn cors() -> actix_cors::Cors {
    use actix_web::http::header;
    actix_cors::Cors::default()
        .allow_any_origin()
        .allowed_methods(["GET", "POST", "PUT", "PATCH", "DELETE"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::ACCEPT,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            HeaderName::from_static("if-none-exist"),
            HeaderName::from_static("prefer"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            header::LOCATION,
            header::ETAG,
            header::LAST_MODIFIED,
            header::WWW_AUTHENTICATE,
            HeaderName::from_static("x-request-id"),
        ])
        .max_age(3600)
}

/// Prometheus metrics: the write-back backlog (counts and ages only, no PHI), for the static
/// `COURIER_METRICS_TOKEN` or a system client's access token (EHR names are not for everyone).
async fn metrics(state: web::Data<AppState>, req: actix_web::HttpRequest) -> HttpResponse {
    let allowed = req
        .extensions()
        .get::<crate::auth::guard::MetricsAccess>()
        .is_some()
        || req
            .extensions()
            .get::<crate::auth::Principal>()
            .is_some_and(|p| p.kind() == crate::auth::SubjectKind::System);
    if !allowed {
        use actix_web::ResponseError;
        return crate::fhir::outcome::FhirError::new(
            actix_web::http::StatusCode::FORBIDDEN,
            "forbidden",
            "the metrics are for the metrics token or a system client's token",
        )
        .error_response();
    }
    let store = state.store.clone();
    match web::block(move || {
        let mut m = crate::smart::outbox::metrics(&store)?;
        m.push_str(&crate::notify::metrics(&store)?);
        Ok::<_, crate::store::StoreError>(m)
    })
    .await
    {
        Ok(Ok(text)) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4")
            .body(text),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"ok"}"#)
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if *state.hub.stopping.borrow() {
        return HttpResponse::ServiceUnavailable()
            .content_type("application/json")
            .body(r#"{"status":"stopping"}"#);
    }
    let store = state.store.clone();
    // Answered within 2 s whatever the database does: while it is unreachable, taking a pooled
    // connection waits for the pool's own timeout (10 s), longer than a load balancer's check.
    let ready = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        web::block(move || store.readiness()),
    )
    .await
    .unwrap_or_else(|_| Ok(Err("the database did not answer within 2 s".into())))
    .unwrap_or_else(|_| Err("the readiness check failed".into()));
    match ready {
        Ok(()) => HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"status":"ready","database":"ok"}"#),
        // Not ready while writes fail: nothing could be audited, so nothing is served.
        Err(why) => HttpResponse::ServiceUnavailable()
            .content_type(FHIR_JSON)
            .insert_header((
                actix_web::http::header::RETRY_AFTER,
                crate::fhir::outcome::RETRY_AFTER_SECS.to_string(),
            ))
            .body(
                crate::fhir::outcome::outcome(
                    &[fhir_codec::Issue {
                        code: "transient",
                        expression: String::new(),
                        diagnostics: why,
                    }],
                    "error",
                )
                .to_string(),
            ),
    }
}

/// Takes `X-Request-Id` from the client (if sane) or makes one, returns it, and logs the request
/// by method, route and status only: no query strings, no bodies (they can hold PHI).
async fn request_id(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        })
        .map(String::from)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let started = std::time::Instant::now();
    // Every line logged while the request is handled carries its id (ERROR lines included: the
    // 500/503 answers point to the server log by it). An ERROR-level span, so a quieter log
    // filter keeps it.
    let span = tracing::error_span!("request", request_id = %id);
    let mut res = tracing::Instrument::instrument(next.call(req), span).await?;
    res.headers_mut().insert(
        HeaderName::from_static("x-request-id"),
        HeaderValue::from_str(&id).expect("checked ASCII"),
    );
    // Nothing Courier answers is kept by a browser's or a proxy's cache unless the route says so
    // (the app's own files, the public keys): message bodies, Binaries, searches and errors hold
    // PHI, and a disk cache would keep them after sign-out.
    if !res
        .headers()
        .contains_key(actix_web::http::header::CACHE_CONTROL)
    {
        res.headers_mut().insert(
            actix_web::http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
    // The route's pattern is found by matching the path against the routes once more: only
    // when the line is logged.
    if tracing::enabled!(tracing::Level::INFO) {
        let req = res.request();
        let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
        tracing::info!(request_id = %id, method = %req.method(), %route, status = res.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
    }
    Ok(res)
}
