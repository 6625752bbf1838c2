//! Topic-based Subscriptions per the FHIR R5 Backport IG for R4.
//!
//! - Topics (`fhir-profiles/SubscriptionTopic/`): a Communication, or a CommunicationRequest, was
//!   created, updated or deleted. `Subscription.criteria` is the topic's canonical URL; filters
//!   are `backport-filter-criteria` extensions (`Communication?recipient=Patient/1`, token and
//!   reference parameters, all must hold).
//! - Channels: `rest-hook` (POSTed notification Bundles, signed with HMAC-SHA256 under the
//!   subscriber's secret, retried with exponential backoff; a handshake first, heartbeats while
//!   idle) and `websocket` (`$get-ws-binding-token`, then `bind-with-token` on
//!   `/subscriptions/ws`).
//! - Content: `empty`, `id-only` (default) or `full-resource` (`backport-payload-content`).
//! - `$status`, `$events` (catch-up by event number), notification Bundles shaped as the IG says
//!   (`history` Bundle, first entry a `backport-subscription-status-r4` Parameters).
//!
//! A Subscription belongs to the client (and user) that created it: only they read, delete or
//! query it, and an event reaches it only if the owner's grant would let it read the resource
//! (the access policy, as for every read); a removed client's subscriptions stop.

use crate::api::AppState;
use crate::api::{audit_context, audited_answer, blocking, check_content_type, read_body, Res};
use crate::audit::Interaction;
use crate::auth::policy::{self, Access};
use crate::auth::scopes::{self, Perm};
use crate::auth::Principal;
use crate::clock::now_micros;
use crate::fhir::outcome::{FhirError, FHIR_JSON};
use crate::fhir::rest::{new_id, parse_resource};
use crate::search::dates::format_instant;
use crate::search::query::{self, Condition, Limits};
use crate::store::{Store, StoreError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};
use sha2::Digest;

pub const TOPIC_COMMUNICATION: &str =
    "https://courier.example.org/fhir/SubscriptionTopic/communication";
pub const TOPIC_REQUEST: &str =
    "https://courier.example.org/fhir/SubscriptionTopic/communication-request";
const IG: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
/// Courier's extension on `Subscription.channel` carrying the rest-hook HMAC secret (write-only).
pub const EXT_SECRET: &str =
    "https://courier.example.org/fhir/StructureDefinition/subscription-hmac-secret";
/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`
pub const SIGNATURE_HEADER: &str = "X-Courier-Signature";
const MIN_SECRET_CHARS: usize = 32;
const MAX_HEADERS: usize = 10;
/// Headers a subscriber cannot set on its notifications.
const RESERVED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "host",
    "connection",
    "te",
    "upgrade",
    "trailer",
    "x-courier-signature",
];

/// What the API shows of a Subscription: `channel.header` values are the subscriber's secrets
/// (its endpoint's credentials), so only their names are shown, the values masked.
pub fn shown(mut v: Value) -> Value {
    if let Some(hs) = v["channel"]["header"].as_array_mut() {
        for h in hs.iter_mut() {
            if let Some((name, _)) = h.as_str().and_then(|x| x.split_once(':')) {
                *h = json!(format!("{name}: ***"));
            }
        }
    }
    v
}
const BINDING_TOKEN_SECS: i64 = 300;

/// The topics Courier offers: (canonical URL, resource type).
pub const TOPICS: &[(&str, &str)] = &[
    (TOPIC_COMMUNICATION, "Communication"),
    (TOPIC_REQUEST, "CommunicationRequest"),
];

pub fn topic_type(topic: &str) -> Option<&'static str> {
    TOPICS.iter().find(|(t, _)| *t == topic).map(|(_, r)| *r)
}

fn ext(name: &str) -> String {
    format!("{IG}/{name}")
}

#[derive(Debug, Clone, QueryableByName)]
pub struct SubRow {
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = Text)]
    pub key_id: String,
    #[diesel(sql_type = Binary)]
    pub body: Vec<u8>,
    #[diesel(sql_type = Nullable<Binary>)]
    pub secret: Option<Vec<u8>>,
    #[diesel(sql_type = Text)]
    pub owner_client: String,
    #[diesel(sql_type = Text)]
    pub owner_scope: String,
    #[diesel(sql_type = Nullable<Text>)]
    pub owner_user: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    pub owner_patient: Option<String>,
    #[diesel(sql_type = Text)]
    pub topic: String,
    #[diesel(sql_type = Text)]
    pub channel: String,
    #[diesel(sql_type = Text)]
    pub content: String,
    #[diesel(sql_type = Text)]
    pub status: String,
    #[diesel(sql_type = BigInt)]
    pub heartbeat_secs: i64,
    #[diesel(sql_type = BigInt)]
    pub max_count: i64,
    #[diesel(sql_type = BigInt)]
    pub start_seq: i64,
    #[diesel(sql_type = BigInt)]
    pub events_since_start: i64,
    #[diesel(sql_type = BigInt)]
    pub delivered: i64,
    #[diesel(sql_type = BigInt)]
    pub attempts: i64,
    #[diesel(sql_type = BigInt)]
    pub next_attempt_at: i64,
    #[diesel(sql_type = BigInt)]
    pub last_sent_at: i64,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

pub const SUB_COLUMNS: &str = "id, key_id, body, secret, owner_client, owner_scope, owner_user, owner_patient, topic, channel, content, status, heartbeat_secs, max_count, start_seq, events_since_start, delivered, attempts, next_attempt_at, last_sent_at, last_error";

fn aad(id: &str) -> String {
    format!("Subscription/{id}")
}

impl SubRow {
    /// The stored body with the live status.
    pub fn resource(&self, store: &Store) -> Result<Value, StoreError> {
        let plain = store
            .open_sealed(&self.key_id, &self.body, &aad(&self.id))
            .map_err(StoreError::Other)?;
        let mut v: Value =
            serde_json::from_slice(&plain).map_err(|e| StoreError::Other(e.into()))?;
        v["status"] = json!(self.status);
        if let Some(e) = &self.last_error {
            if self.status == "error" {
                // R4: Subscription.error is a string.
                v["error"] = json!(e);
            }
        }
        Ok(v)
    }

    pub fn secret(&self, store: &Store) -> Option<Vec<u8>> {
        let sealed = self.secret.as_ref()?;
        store
            .open_sealed(&self.key_id, sealed, &format!("{}#secret", aad(&self.id)))
            .ok()
    }

    /// The owner's grant, as the principal its notifications are decided for.
    pub fn owner(&self) -> Principal {
        Principal {
            client_id: self.owner_client.clone(),
            jti: String::new(),
            exp: i64::MAX,
            scopes: scopes::parse_all(&self.owner_scope).unwrap_or_default(),
            fhir_user: self.owner_user.clone(),
            patient: self.owner_patient.clone(),
            encounter: None,
            groups: vec![],
            emergency: vec![],
        }
    }

    /// The same client and user; for an app with no user, the same patient context too (it is
    /// one client for every patient it is launched for, and one patient's subscription is not
    /// another's to read). A user's subscriptions are theirs whichever patient they open next.
    fn owned_by(&self, p: &Principal) -> bool {
        self.owner_client == p.client_id
            && self.owner_user == p.fhir_user
            && (p.fhir_user.is_some() || self.owner_patient == p.patient)
    }
}

pub fn load(store: &Store, id: &str) -> Result<Option<SubRow>, StoreError> {
    Ok(store
        .query::<SubRow>(
            &format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE id = ?"),
            vec![id.into()],
        )?
        .into_iter()
        .next())
}

// ----- creating ---------------------------------------------------------------------------------

/// What a Subscription asks for, checked.
struct Request {
    topic: String,
    channel: String,
    endpoint: Option<String>,
    content: String,
    heartbeat: i64,
    max_count: i64,
    secret: Option<String>,
    /// `Subscription.end`, when given (microseconds): the dispatcher turns it off then.
    end_at: Option<i64>,
}

fn bad(expression: &str, why: impl Into<String>) -> FhirError {
    FhirError::at(StatusCode::BAD_REQUEST, "invalid", expression, why)
}

fn extension<'a>(holder: &'a Value, url: &str) -> impl Iterator<Item = &'a Value> + 'a {
    let url = url.to_string();
    holder["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(move |e| e["url"] == url.as_str())
}

/// Parses the filter criteria of a topic into conditions (token and reference parameters only,
/// the kinds that can be checked on a single resource, as for granular scopes).
pub fn filters(
    state: &AppState,
    res_type: &str,
    criteria: &[String],
) -> Result<Vec<Condition>, FhirError> {
    filters_in(
        &state.store.registry,
        &state.settings.base_url,
        res_type,
        criteria,
    )
}

pub fn filters_in(
    registry: &crate::search::Registry,
    base_url: &str,
    res_type: &str,
    criteria: &[String],
) -> Result<Vec<Condition>, FhirError> {
    let mut all = vec![];
    for c in criteria {
        let (t, q) = c.split_once('?').unwrap_or(("", c));
        if !t.is_empty() && t != res_type {
            return Err(bad(
                "Subscription.criteria.extension",
                format!("filter '{c}' is not about {res_type}, the topic's resource"),
            ));
        }
        let pairs: Vec<(String, String)> =
            form_urlencoded::parse(q.as_bytes()).into_owned().collect();
        let limits = Limits {
            default_count: 1,
            max_count: 1,
            strict: true,
        };
        let req =
            query::parse(registry, res_type, &pairs, base_url, &limits).map_err(|issues| {
                let why: Vec<String> = issues.into_iter().map(|i| i.diagnostics).collect();
                bad(
                    "Subscription.criteria.extension",
                    format!("filter '{c}': {}", why.join("; ")),
                )
            })?;
        let ok = !req.conditions.is_empty()
            && req.conditions.iter().all(|c| {
                matches!(
                    c,
                    Condition::Token { not: false, .. } | Condition::Reference { .. }
                )
            });
        if !ok {
            return Err(bad(
                "Subscription.criteria.extension",
                format!("filter '{c}': only token and reference parameters (without :not) can filter a subscription"),
            ));
        }
        all.extend(req.conditions);
    }
    Ok(all)
}

fn criteria_of(v: &Value) -> Vec<String> {
    extension(&v["_criteria"], &ext("backport-filter-criteria"))
        .filter_map(|e| e["valueString"].as_str().map(String::from))
        .collect()
}

fn check(state: &AppState, p: &Principal, v: &mut Value) -> Result<Request, FhirError> {
    let topic = v["criteria"].as_str().unwrap_or_default().to_string();
    let Some(res_type) = topic_type(&topic) else {
        return Err(bad(
            "Subscription.criteria",
            format!(
                "criteria must be the canonical URL of a topic this server offers: {}",
                TOPICS
                    .iter()
                    .map(|(t, _)| *t)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    };
    // Notifications reveal that resources exist: the owner must be able to read the topic's type.
    if crate::fhir::access::decide(state, p, res_type, Perm::Read).is_err() {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("subscribing to {res_type} changes takes read permission on {res_type}"),
        ));
    }
    // Only the IG's filter extension is understood on criteria: another (a cross-version
    // `http://hl7.org/fhir/5.0/…` one, a misspelt URL) would silently be a subscription to
    // everything, so it is refused.
    for e in v["_criteria"]["extension"].as_array().into_iter().flatten() {
        let url = e["url"].as_str().unwrap_or_default();
        if url != ext("backport-filter-criteria") {
            return Err(bad(
                "Subscription.criteria.extension",
                format!(
                    "extension '{url}' on criteria is not supported: filters go in {}",
                    ext("backport-filter-criteria")
                ),
            ));
        }
    }
    filters(state, res_type, &criteria_of(v))?;
    if !matches!(v["status"].as_str(), Some("requested" | "active")) {
        return Err(bad(
            "Subscription.status",
            "a new subscription has status 'requested'",
        ));
    }
    let channel = &mut v["channel"];
    let kind = channel["type"].as_str().unwrap_or_default().to_string();
    if !matches!(kind.as_str(), "rest-hook" | "websocket") {
        return Err(bad(
            "Subscription.channel.type",
            format!("channel type '{kind}' is not supported: use rest-hook or websocket"),
        ));
    }
    match channel["payload"].as_str() {
        None | Some("application/fhir+json") | Some("application/json") => {}
        Some(other) => {
            return Err(bad(
                "Subscription.channel.payload",
                format!("payload '{other}' is not supported: use application/fhir+json"),
            ))
        }
    }
    let content = extension(&channel["_payload"], &ext("backport-payload-content"))
        .find_map(|e| e["valueCode"].as_str())
        .unwrap_or("id-only")
        .to_string();
    if !matches!(content.as_str(), "empty" | "id-only" | "full-resource") {
        return Err(bad(
            "Subscription.channel.payload.extension",
            format!("payload content '{content}' is not one of empty, id-only, full-resource"),
        ));
    }
    let heartbeat = extension(channel, &ext("backport-heartbeat-period"))
        .find_map(|e| e["valueUnsignedInt"].as_i64())
        .unwrap_or(0);
    let max_count = extension(channel, &ext("backport-max-count"))
        .find_map(|e| e["valuePositiveInt"].as_i64())
        .unwrap_or(20)
        .clamp(1, 100);
    let secret = extension(channel, EXT_SECRET)
        .find_map(|e| e["valueString"].as_str())
        .map(String::from);
    // The secret is write-only: it never appears in what is stored as the body or shown.
    if let Some(exts) = channel.get_mut("extension").and_then(Value::as_array_mut) {
        exts.retain(|e| e["url"] != EXT_SECRET);
        if exts.is_empty() {
            channel.as_object_mut().map(|o| o.remove("extension"));
        }
    }
    let endpoint = channel["endpoint"].as_str().map(String::from);
    if kind == "rest-hook" {
        let Some(url) = &endpoint else {
            return Err(bad(
                "Subscription.channel.endpoint",
                "a rest-hook subscription needs an endpoint",
            ));
        };
        crate::auth::clients::check_jwks_url(url).map_err(|e| {
            bad(
                "Subscription.channel.endpoint",
                e.to_string().replace("the JWKS URL", "the endpoint"),
            )
        })?;
        // Signing is an extra the subscriber may ask for (the IG's own way to authenticate
        // Courier to the endpoint is `channel.header`).
        if secret
            .as_ref()
            .is_some_and(|s| s.chars().count() < MIN_SECRET_CHARS)
        {
            return Err(bad(
                "Subscription.channel.extension",
                format!("a signing secret ({EXT_SECRET}) must have at least {MIN_SECRET_CHARS} characters"),
            ));
        }
    }
    let headers = channel["header"].as_array().cloned().unwrap_or_default();
    if headers.len() > MAX_HEADERS {
        return Err(bad(
            "Subscription.channel.header",
            format!("at most {MAX_HEADERS} headers"),
        ));
    }
    for h in &headers {
        let Some((name, value)) = h.as_str().and_then(|h| h.split_once(':')) else {
            return Err(bad(
                "Subscription.channel.header",
                "each header must be 'Name: value'",
            ));
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let value_ok = value.len() <= 4096 && !value.chars().any(|c| c.is_control());
        if !name_ok || !value_ok {
            return Err(bad("Subscription.channel.header", "each header must be 'Name: value' (a token name, a value of at most 4096 characters without control characters)"));
        }
        // Headers that would change what is sent, or forge Courier's own signature.
        if RESERVED_HEADERS
            .iter()
            .any(|r| r.eq_ignore_ascii_case(name.trim()))
        {
            return Err(bad(
                "Subscription.channel.header",
                format!(
                    "the header '{}' is set by Courier and cannot be given",
                    name.trim()
                ),
            ));
        }
    }
    // The time to turn it off: one already past would never be active (and would be listed as
    // active until then).
    let end_at = match v["end"].as_str() {
        None => None,
        Some(end) => {
            let Some((at, _)) = crate::search::dates::range(end) else {
                return Err(bad("Subscription.end", "end is not a FHIR instant"));
            };
            if at <= now_micros() {
                return Err(bad(
                    "Subscription.end",
                    "end is in the past: the subscription would never be active",
                ));
            }
            Some(at)
        }
    };
    Ok(Request {
        topic,
        channel: kind,
        endpoint,
        content,
        heartbeat,
        max_count,
        secret,
        end_at,
    })
}

fn may(p: &Principal, perm: Perm) -> Result<(), FhirError> {
    if p.scopes
        .iter()
        .any(|s| s.names("Subscription") && s.allows(perm))
    {
        return Ok(());
    }
    Err(FhirError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "the token's scopes do not allow '{}' on Subscription",
            perm.letter()
        ),
    ))
}

fn reply(status: StatusCode, v: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .content_type(FHIR_JSON)
        .insert_header(("Cache-Control", "no-store"))
        .body(v.to_string())
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let ctx = audit_context(&req, &state);
    let result = create_inner(&state, &req, payload).await;
    let what = result
        .as_ref()
        .ok()
        .and_then(|r| r.headers().get("location"))
        .and_then(|l| l.to_str().ok())
        .map(|l| {
            l.trim_start_matches(&state.settings.base_url)
                .trim_start_matches('/')
                .to_string()
        });
    crate::api::answer_audited(&state, &ctx, Interaction::Create, what, None, result).await
}

async fn create_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
) -> Res {
    let p = crate::fhir::access::principal(req)?;
    may(&p, Perm::Create)?;
    check_content_type(req)?;
    let body = read_body(req, payload, state.settings.max_resource_bytes).await?;
    let incoming = parse_resource(state, &body, "Subscription", "")?;
    let mut v = incoming.value;
    let r = check(state, &p, &mut v)?;
    if let Some(url) = r.endpoint.as_deref().filter(|_| r.channel == "rest-hook") {
        // Resolved and checked now for a clear answer; every delivery is checked again.
        let http = state.ehrs.discovery().http();
        http.check(url)
            .await
            .map_err(|e| bad("Subscription.channel.endpoint", e.0))?;
    }
    let id = new_id();
    let now = now_micros();
    v["id"] = json!(id);
    v["meta"] = json!({"versionId": "1", "lastUpdated": format_instant(now)});
    let status = if r.channel == "rest-hook" {
        "requested"
    } else {
        "active"
    };
    v["status"] = json!(status);
    let store = state.store.clone();
    let sid = id.clone();
    let scope = p.scope_text();
    let (owner_user, owner_patient, client) =
        (p.fhir_user.clone(), p.patient.clone(), p.client_id.clone());
    let shown = shown(v.clone());
    blocking(move || {
        let start_seq = super::events::last_seq(&store)?;
        let (key_id, sealed) = store.keys.seal(v.to_string().as_bytes(), &aad(&sid));
        let secret = r.secret.as_ref().map(|s| {
            let key = store.keys.seal(s.as_bytes(), &format!("{}#secret", aad(&sid)));
            (key.0, key.1)
        });
        // Both sealed under the active key (one key id per row).
        if let Some((k, _)) = &secret {
            if *k != key_id {
                return Err(FhirError::internal());
            }
        }
        store.execute(
            "INSERT INTO subscriptions (id, key_id, body, secret, owner_client, owner_scope, owner_user, owner_patient, topic, channel, content, status, heartbeat_secs, max_count, start_seq, created_at, end_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            vec![
                sid.clone().into(),
                key_id.into(),
                sealed.into(),
                crate::store::db::Bind::OptBlob(secret.map(|s| s.1)),
                client.into(),
                scope.into(),
                owner_user.into(),
                owner_patient.into(),
                r.topic.into(),
                r.channel.into(),
                r.content.into(),
                status.into(),
                r.heartbeat.into(),
                r.max_count.into(),
                start_seq.into(),
                now.into(),
                r.end_at.into(),
            ],
        )?;
        let _ = r.endpoint;
        Ok(())
    })
    .await?;
    let location = format!("{}/Subscription/{id}", state.settings.base_url);
    Ok(HttpResponse::Created()
        .content_type(FHIR_JSON)
        .insert_header(("Location", location))
        .insert_header(("ETag", "W/\"1\""))
        .body(shown.to_string()))
}

/// The caller, if its scopes allow `perm` on Subscription, and its own subscription `id` — or
/// 404 (another owner's is as if it did not exist).
async fn owned(
    state: &AppState,
    req: &HttpRequest,
    id: &str,
    perm: Perm,
) -> Result<(Principal, SubRow), FhirError> {
    let p = crate::fhir::access::principal(req)?;
    may(&p, perm)?;
    let store = state.store.clone();
    let sid = id.to_string();
    let row = blocking(move || Ok(load(&store, &sid)?)).await?;
    match row {
        Some(r) if r.owned_by(&p) => Ok((p, r)),
        _ => Err(FhirError::from(StoreError::NotFound(
            "Subscription".into(),
            id.into(),
        ))),
    }
}

pub async fn read(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = async {
        let (_, row) = owned(&state, &req, &id, Perm::Read).await?;
        let v = shown(row.resource(&state.store)?);
        Ok(reply(StatusCode::OK, &v))
    }
    .await;
    audited_answer(
        &state,
        &req,
        Interaction::Read,
        format!("Subscription/{id}"),
        result,
    )
    .await
}

/// `GET /Subscription`: the caller's own subscriptions (search parameters are not supported).
pub async fn search(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let result = async {
        let p = crate::fhir::access::principal(&req)?;
        may(&p, Perm::Search)?;
        let store = state.store.clone();
        let client = p.client_id.clone();
        let rows = blocking(move || {
            Ok(store.query::<SubRow>(
                &format!("SELECT {SUB_COLUMNS} FROM subscriptions WHERE owner_client = ? ORDER BY created_at"),
                vec![client.into()],
            )?)
        })
        .await?;
        let base = &state.settings.base_url;
        let mut entries = vec![];
        for r in rows.iter().filter(|r| r.owned_by(&p)) {
            let v = shown(r.resource(&state.store)?);
            entries.push(json!({"fullUrl": format!("{base}/Subscription/{}", r.id), "resource": v, "search": {"mode": "match"}}));
        }
        Ok(reply(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries}),
        ))
    }
    .await;
    audited_answer(
        &state,
        &req,
        Interaction::SearchType,
        "Subscription".into(),
        result,
    )
    .await
}

pub async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = async {
        owned(&state, &req, &id, Perm::Delete).await?;
        let store = state.store.clone();
        let sid = id.clone();
        blocking(move || {
            for t in ["subscription_events", "ws_binding_tokens"] {
                store.execute(
                    &format!("DELETE FROM {t} WHERE sub_id = ?"),
                    vec![sid.clone().into()],
                )?;
            }
            store.execute("DELETE FROM subscriptions WHERE id = ?", vec![sid.into()])?;
            Ok(())
        })
        .await?;
        Ok(HttpResponse::NoContent().finish())
    }
    .await;
    audited_answer(
        &state,
        &req,
        Interaction::Delete,
        format!("Subscription/{id}"),
        result,
    )
    .await
}

// ----- notifications ------------------------------------------------------------------------------

/// One event of a subscription, as recorded by the dispatcher.
#[derive(Debug, Clone, QueryableByName)]
pub struct NumberedEvent {
    #[diesel(sql_type = BigInt)]
    pub number: i64,
    #[diesel(sql_type = BigInt)]
    pub at: i64,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub res_type: String,
    #[diesel(sql_type = Text)]
    pub fhir_id: String,
    #[diesel(sql_type = BigInt)]
    pub version_id: i64,
}

/// A subscription's events numbered `from..=to`, oldest first.
pub fn numbered(
    store: &Store,
    sub: &str,
    from: i64,
    to: i64,
) -> Result<Vec<NumberedEvent>, StoreError> {
    store.query(
        "SELECT s.number, e.at, e.kind, e.res_type, e.fhir_id, e.version_id FROM subscription_events s \
         JOIN events e ON e.seq = s.event_seq WHERE s.sub_id = ? AND s.number >= ? AND s.number <= ? ORDER BY s.number",
        vec![sub.into(), from.into(), to.into()],
    )
}

/// A notification Bundle (`history`), its first entry the subscription status (R4 Parameters).
pub fn bundle(
    store: &Store,
    sub: &SubRow,
    kind: &str,
    events: &[NumberedEvent],
    content: &str,
) -> Value {
    let base = &store.base_url;
    let mut params = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{base}/Subscription/{}", sub.id)}}),
        json!({"name": "topic", "valueCanonical": sub.topic}),
        json!({"name": "status", "valueCode": sub.status}),
        json!({"name": "type", "valueCode": kind}),
        json!({"name": "events-since-subscription-start", "valueString": sub.events_since_start.to_string()}),
    ];
    let mut entries = vec![];
    for e in events {
        let mut part = vec![
            json!({"name": "event-number", "valueString": e.number.to_string()}),
            json!({"name": "timestamp", "valueInstant": format_instant(e.at)}),
        ];
        let url = format!("{base}/{}/{}", e.res_type, e.fhir_id);
        if content != "empty" {
            part.push(json!({"name": "focus", "valueReference": {"reference": url}}));
            let (method, status) = match e.kind.as_str() {
                "create" => ("POST", "201"),
                "delete" => ("DELETE", "204"),
                _ => ("PUT", "200"),
            };
            let request_url = if method == "POST" {
                e.res_type.clone()
            } else {
                format!("{}/{}", e.res_type, e.fhir_id)
            };
            let mut entry = json!({
                "fullUrl": url,
                "request": {"method": method, "url": request_url},
                "response": {"status": status},
            });
            if content == "full-resource"
                && e.kind != "delete"
                && !super::hub::superseded_by_withdrawal(
                    store,
                    &e.res_type,
                    &e.fhir_id,
                    e.version_id,
                )
            {
                if let Some(body) = store
                    .vread(&e.res_type, &e.fhir_id, e.version_id)
                    .ok()
                    .and_then(|s| s.body)
                {
                    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                        entry["resource"] = v;
                    }
                }
            }
            entries.push(entry);
        }
        params.push(json!({"name": "notification-event", "part": part}));
    }
    let status = json!({
        "resourceType": "Parameters",
        "id": uuid::Uuid::new_v4().to_string(),
        "meta": {"profile": [format!("{IG}/backport-subscription-status-r4")]},
        "parameter": params,
    });
    let mut all = vec![json!({
        "fullUrl": format!("urn:uuid:{}", status["id"].as_str().unwrap_or_default()),
        "resource": status,
        "request": {"method": "GET", "url": format!("Subscription/{}/$status", sub.id)},
        "response": {"status": "200"},
    })];
    all.extend(entries);
    json!({
        "resourceType": "Bundle",
        "id": uuid::Uuid::new_v4().to_string(),
        "type": "history",
        "timestamp": format_instant(now_micros()),
        "entry": all,
    })
}

/// `Subscription/{id}/$status`: a searchset Bundle holding the status Parameters.
pub async fn status(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = async {
        let (_, row) = owned(&state, &req, &id, Perm::Read).await?;
        let b = bundle(&state.store, &row, "query-status", &[], "empty");
        let mut status = b["entry"][0].clone();
        status["search"] = json!({"mode": "match"});
        Ok(reply(
            StatusCode::OK,
            &json!({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [status]}),
        ))
    }
    .await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        format!("Subscription/{id}"),
        result,
    )
    .await
}

/// At most this many events in one `$events` answer.
const MAX_EVENTS_PAGE: i64 = 100;

/// `Subscription/{id}/$events?eventsSinceNumber=&eventsUntilNumber=&content=`
pub async fn events(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = async {
        let (_, row) = owned(&state, &req, &id, Perm::Read).await?;
        let q: Vec<(String, String)> = form_urlencoded::parse(req.query_string().as_bytes())
            .into_owned()
            .collect();
        let num = |k: &str| -> Result<Option<i64>, FhirError> {
            match q.iter().find(|(n, _)| n == k) {
                None => Ok(None),
                Some((_, v)) => v
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .map(Some)
                    .ok_or_else(|| {
                        FhirError::bad_request(format!(
                            "{k} must be a non-negative integer, got '{v}'"
                        ))
                    }),
            }
        };
        let since = num("eventsSinceNumber")?.unwrap_or(1).max(1);
        let until = num("eventsUntilNumber")?
            .unwrap_or(row.events_since_start)
            .min(row.events_since_start)
            .min(since + MAX_EVENTS_PAGE - 1);
        // The content asked for, never more than the subscription's own.
        let rank = |c: &str| {
            ["empty", "id-only", "full-resource"]
                .iter()
                .position(|x| *x == c)
        };
        let content = match q.iter().find(|(n, _)| n == "content") {
            Some((_, c)) if rank(c).is_none() => {
                return Err(FhirError::bad_request(format!(
                    "content '{c}' is not one of empty, id-only, full-resource"
                )))
            }
            Some((_, c)) if rank(c) < rank(&row.content) => c.clone(),
            _ => row.content.clone(),
        };
        let store = state.store.clone();
        let sid = id.clone();
        let r2 = row.clone();
        let b = blocking(move || {
            let evs = if until >= since {
                numbered(&store, &sid, since, until)?
            } else {
                vec![]
            };
            Ok(bundle(&store, &r2, "query-event", &evs, &content))
        })
        .await?;
        let mut answer = reply(StatusCode::OK, &b);
        answer
            .extensions_mut()
            .insert(crate::api::Disclosed(patients_in(
                &b,
                &state.settings.base_url,
            )));
        Ok(answer)
    }
    .await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        format!("Subscription/{id}"),
        result,
    )
    .await
}

/// The patients whose resources a notification Bundle carries (`full-resource` content; its
/// status entry is a Parameters).
pub fn patients_in(notification: &Value, base: &str) -> Vec<String> {
    let resources = notification["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| &e["resource"])
        .filter(|r| r.is_object() && r["resourceType"] != "Parameters");
    crate::audit::patients_of(resources, base)
}

pub fn token_hash(token: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()))
}

/// `Subscription/{id}/$get-ws-binding-token` (GET or POST).
pub async fn binding_token(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = async {
        let (p, row) = owned(&state, &req, &id, Perm::Read).await?;
        if row.channel != "websocket" {
            return Err(FhirError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                "this subscription's channel is not websocket",
            ));
        }
        let mut raw = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut raw);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        let expires = now_micros() / 1_000_000 + BINDING_TOKEN_SECS;
        let store = state.store.clone();
        let (h, sid, client, jti) = (token_hash(&token), id.clone(), p.client_id.clone(), p.jti.clone());
        blocking(move || {
            store.execute(
                "DELETE FROM ws_binding_tokens WHERE expires_at < ?",
                vec![(now_micros() / 1_000_000).into()],
            )?;
            store.execute(
                "INSERT INTO ws_binding_tokens (token_hash, sub_id, owner_client, expires_at, jti) VALUES (?, ?, ?, ?, ?)",
                vec![h.into(), sid.into(), client.into(), expires.into(), jti.into()],
            )?;
            Ok(())
        })
        .await?;
        let ws_url = format!(
            "{}/subscriptions/ws",
            state
                .settings
                .base_url
                .replacen("https://", "wss://", 1)
                .replacen("http://", "ws://", 1)
        );
        Ok(reply(
            StatusCode::OK,
            &json!({"resourceType": "Parameters", "parameter": [
                {"name": "token", "valueString": token},
                {"name": "expiration", "valueDateTime": format_instant(expires * 1_000_000)},
                {"name": "subscription", "valueString": format!("{}/Subscription/{id}", state.settings.base_url)},
                {"name": "websocket-url", "valueUrl": ws_url},
            ]}),
        ))
    }
    .await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        format!("Subscription/{id}"),
        result,
    )
    .await
}

/// Does an event (its resource's index entries) reach this subscription: the owner's grant and
/// every filter.
pub fn matches(
    access: &Option<Access>,
    filters: &[Condition],
    entries: &[crate::search::index::Entry],
) -> bool {
    let admitted = match access {
        None => false,
        Some(Access::All) => true,
        Some(Access::Only(c)) => policy::admits(c, entries),
    };
    admitted && filters.iter().all(|f| policy::admits(f, entries))
}
