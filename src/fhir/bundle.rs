//! Bundles: searchset and history responses, and batch/transaction processing at the base URL.

use super::access;
use super::outcome::{self, FhirError, FHIR_JSON};
use super::rest::{self, audit_context, blocking, check_resource, new_id, query_pairs, Res};
use super::{support, AppState};
use crate::audit::Interaction;
use crate::auth::scopes::Perm;
use crate::auth::Principal;
use crate::search::dates;
use crate::search::query::SearchRequest;
use crate::store::{Incoming, SearchPage, Stored, WriteOp, WriteResult, WriteStatus};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashMap;

#[derive(Serialize, Default)]
pub struct Entry {
    #[serde(rename = "fullUrl", skip_serializing_if = "Option::is_none")]
    pub full_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
}

#[derive(Serialize)]
struct Bundle {
    #[serde(rename = "resourceType")]
    resource_type: &'static str,
    id: String,
    meta: Value,
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    link: Vec<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    entry: Vec<Entry>,
}

pub fn raw(s: &Stored) -> Option<Box<RawValue>> {
    s.body
        .as_ref()
        .and_then(|b| RawValue::from_string(String::from_utf8_lossy(b).into_owned()).ok())
}

fn raw_value(v: &Value) -> Box<RawValue> {
    RawValue::from_string(v.to_string()).expect("serialised JSON is valid")
}

pub fn bundle_response(
    kind: &'static str,
    total: Option<i64>,
    link: Vec<Value>,
    entry: Vec<Entry>,
) -> HttpResponse {
    let b = Bundle {
        resource_type: "Bundle",
        id: uuid::Uuid::new_v4().to_string(),
        meta: json!({"lastUpdated": dates::format_instant(crate::clock::now_micros())}),
        kind,
        total,
        link,
        entry,
    };
    HttpResponse::Ok()
        .content_type(FHIR_JSON)
        .body(serde_json::to_vec(&b).expect("bundle serialises"))
}

/// The batch or transaction response of `entries`, marked with the patients whose data they carry (for its AuditEvent: a
/// batch of reads discloses what each read does; an outside probe found a batch's GETs of a
/// patient's messages in no patient's trail).
fn with_disclosed(base: &str, kind: &'static str, entries: Vec<Entry>) -> HttpResponse {
    let bodies: Vec<Value> = entries
        .iter()
        .filter_map(|e| e.resource.as_ref())
        .filter_map(|r| serde_json::from_str(r.get()).ok())
        .collect();
    // A searchset inside an entry carries its own entries.
    let mut all: Vec<Value> = vec![];
    for b in bodies {
        if b["resourceType"] == "Bundle" {
            all.extend(
                b["entry"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| e["resource"].clone()),
            );
        } else {
            all.push(b);
        }
    }
    let disclosed = crate::audit::patients_of(&all, base);
    let mut answer = bundle_response(kind, None, vec![], entries);
    answer
        .extensions_mut()
        .insert(crate::api::Disclosed(disclosed));
    answer
}

/// `self`, `next` and `previous` links; later pages carry `_snapshot` so they see the same data.
pub fn page_links(
    path: &str,
    params: &[(String, String)],
    offset: usize,
    count: usize,
    has_next: bool,
    snapshot: &str,
) -> Vec<Value> {
    let url = |off: usize, with_snapshot: bool| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in params {
            s.append_pair(k, v);
        }
        if with_snapshot {
            s.append_pair("_offset", &off.to_string());
            s.append_pair("_snapshot", snapshot);
        }
        let q = s.finish();
        if q.is_empty() {
            path.to_string()
        } else {
            format!("{path}?{q}")
        }
    };
    let mut links = vec![json!({"relation": "self", "url": url(offset, offset > 0)})];
    if has_next {
        links.push(json!({"relation": "next", "url": url(offset.saturating_add(count), true)}));
    }
    if offset > 0 {
        links.push(json!({"relation": "previous", "url": url(offset.saturating_sub(count), true)}));
    }
    links
}

pub fn searchset(
    state: &AppState,
    res_type: &str,
    req: &SearchRequest,
    page: &SearchPage,
) -> Result<HttpResponse, FhirError> {
    let base = state.settings.base_url.as_str();
    let mut params = req.used.clone();
    if !params.iter().any(|(k, _)| k == "_count") {
        params.push(("_count".into(), req.count.to_string()));
    }
    let links = page_links(
        &format!("{base}/{res_type}"),
        &params,
        req.offset,
        req.count,
        page.has_next,
        &super::paging::seal(&state.store, page.snapshot)?,
    );
    let mut entries: Vec<Entry> = Vec::with_capacity(page.matches.len() + page.included.len() + 1);
    for (mode, list) in [("match", &page.matches), ("include", &page.included)] {
        for s in list {
            entries.push(Entry {
                full_url: Some(format!("{base}/{}/{}", s.res_type, s.id)),
                resource: raw(s),
                search: Some(json!({"mode": mode})),
                ..Default::default()
            });
        }
    }
    if !req.ignored.is_empty() {
        entries.push(Entry {
            full_url: Some(format!("urn:uuid:{}", uuid::Uuid::new_v4())),
            resource: Some(raw_value(&outcome::outcome(&req.ignored, "warning"))),
            search: Some(json!({"mode": "outcome"})),
            ..Default::default()
        });
    }
    Ok(bundle_response("searchset", page.total, links, entries))
}

pub fn history_entry(base: &str, s: &Stored) -> Entry {
    let (method, url) = match s.method.as_str() {
        "POST" => ("POST", s.res_type.clone()),
        m => (m, format!("{}/{}", s.res_type, s.id)),
    };
    let status = match (s.method.as_str(), s.version_id) {
        ("DELETE", _) => "204 No Content",
        ("POST", _) | ("PUT", 1) => "201 Created",
        _ => "200 OK",
    };
    Entry {
        full_url: Some(format!("{base}/{}/{}", s.res_type, s.id)),
        resource: raw(s),
        request: Some(
            json!({"method": if method == "PATCH" { "PATCH" } else { method }, "url": url}),
        ),
        response: Some(
            json!({"status": status, "etag": s.etag(), "lastModified": dates::format_instant(s.last_updated)}),
        ),
        ..Default::default()
    }
}

// ----- batch / transaction ----------------------------------------------------------------------

pub async fn batch_or_transaction(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> HttpResponse {
    let ctx = audit_context(&req, &state);
    let p = match access::principal(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let (result, interaction) = match process(&state, &req, payload, &ctx, &p).await {
        Ok((r, i)) => (Ok(r), i),
        Err((e, i)) => (Err(e), i),
    };
    crate::fhir::rest::answer_audited(&state, &ctx, interaction, None, None, result).await
}

struct Parsed {
    method: String,
    res_type: String,
    id: Option<String>,
    version: Option<i64>,
    query: Option<String>,
    full_url: Option<String>,
    resource: Option<Value>,
    if_match: Option<i64>,
    if_none_exist: Option<String>,
}

type ProcessResult = Result<(HttpResponse, Interaction), (FhirError, Interaction)>;

async fn process(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    payload: web::Payload,
    ctx: &crate::audit::Context,
    p: &Principal,
) -> ProcessResult {
    let fail = |e: FhirError| (e, Interaction::Batch);
    rest::check_accept(req).map_err(fail)?;
    if !matches!(
        rest::media_type(req).as_str(),
        "application/fhir+json" | "application/json"
    ) {
        return Err(fail(FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "a Bundle must be sent as application/fhir+json",
        )));
    }
    // A Bundle may carry a Binary, so it gets the larger limit; each entry obeys its own below.
    let limit = super::limits::bundle_body_limit(&state.settings);
    let body = rest::read_body(req, payload, limit).await.map_err(fail)?;
    super::limits::check_json_cost(&body).map_err(fail)?;
    let bundle: Value = serde_json::from_slice(&body).map_err(|e| {
        fail(FhirError::at(
            StatusCode::BAD_REQUEST,
            "structure",
            "Bundle",
            format!("invalid JSON: {e}"),
        ))
    })?;
    // A key given twice (say two `reference`s) would be read as the last one: refused, as it is
    // in a single resource.
    crate::store::no_duplicate_keys(&body).map_err(|m| {
        fail(FhirError::at(
            StatusCode::BAD_REQUEST,
            "structure",
            "Bundle",
            m,
        ))
    })?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(fail(FhirError::at(
            StatusCode::BAD_REQUEST,
            "invalid",
            "resourceType",
            "POST to the base URL takes a Bundle of type batch or transaction",
        )));
    }
    let interaction = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => Interaction::Transaction,
        Some("batch") => Interaction::Batch,
        other => {
            return Err(fail(FhirError::at(
                StatusCode::BAD_REQUEST,
                "invalid",
                "Bundle.type",
                match other {
                    Some(t) => format!("Bundle.type must be batch or transaction, not '{t}'"),
                    None => "Bundle.type must be batch or transaction (it is missing)".to_string(),
                },
            )))
        }
    };
    let fail = |e: FhirError| (e, interaction);
    let entries = match bundle.get("entry") {
        None => &Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(fail(FhirError::at(
                StatusCode::BAD_REQUEST,
                "structure",
                "Bundle.entry",
                "entry must be an array",
            )))
        }
    };
    super::limits::check_entry_count(entries.len()).map_err(fail)?;
    check_bundle(entries).map_err(fail)?;
    let mut parsed = Vec::with_capacity(entries.len());
    let mut entry_errors: HashMap<usize, FhirError> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let entry = parse_entry(i, e).and_then(|p| {
            if let Some(r) = &p.resource {
                let at = format!("Bundle.entry[{i}].resource");
                super::limits::check_resource_size(&state.settings, &p.res_type, r, &at)?;
            }
            Ok(p)
        });
        match entry {
            Ok(p) => parsed.push(Some(p)),
            Err(err) if interaction == Interaction::Batch => {
                entry_errors.insert(i, err);
                parsed.push(None)
            }
            Err(err) => return Err(fail(err)),
        }
    }
    if interaction == Interaction::Transaction {
        let parsed: Vec<Parsed> = parsed.into_iter().flatten().collect();
        transaction(state, parsed, ctx, p)
            .await
            .map(|r| (r, interaction))
            .map_err(fail)
    } else {
        Ok((
            batch(state, parsed, entry_errors, ctx, p).await,
            interaction,
        ))
    }
}

/// What holds for the Bundle as a whole: no control characters in any of its strings (the
/// resources get the same check, and more, from the strict parser), and every `fullUrl` unique
/// (bdl-7; a reference to a fullUrl that two entries carry would be ambiguous).
fn check_bundle(entries: &[Value]) -> Result<(), FhirError> {
    fn strings(path: &str, v: &Value) -> Result<(), FhirError> {
        match v {
            Value::String(s) if fhir_codec::has_control_chars(s) => Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "value",
                path,
                "control characters are not allowed in FHIR strings (only tab, carriage return and line feed)",
            )),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .try_for_each(|(i, x)| strings(&format!("{path}[{i}]"), x)),
            Value::Object(o) => o
                .iter()
                .try_for_each(|(k, x)| strings(&format!("{path}.{k}"), x)),
            _ => Ok(()),
        }
    }
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        for (k, v) in e.as_object().into_iter().flatten() {
            if k != "resource" {
                strings(&format!("Bundle.entry[{i}].{k}"), v)?;
            }
        }
        if let Some(full) = e.get("fullUrl").and_then(Value::as_str) {
            if let Some(first) = seen.insert(full, i) {
                return Err(FhirError::at(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("Bundle.entry[{i}].fullUrl"),
                    format!("bdl-7: this fullUrl is also the fullUrl of Bundle.entry[{first}]; each entry needs its own"),
                ));
            }
        }
    }
    Ok(())
}

/// The query of an entry URL or `ifNoneExist`: no empty parameters (`a=1&&b=2`, a trailing `&`,
/// a bare `?`) and none without a name (`=x`). Such a URL is a client error, not a search for
/// "anything" (conditional writes and searches would silently match more than intended).
pub fn check_query(query: &str, expression: &str) -> Result<(), FhirError> {
    for part in query.split('&') {
        if part.is_empty() || part.starts_with('=') {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "invalid",
                expression,
                "the URL has an empty search parameter (a stray '&', '?' or '=')",
            ));
        }
    }
    Ok(())
}

fn parse_entry(i: usize, e: &Value) -> Result<Parsed, FhirError> {
    let at = |field: &str| format!("Bundle.entry[{i}].{field}");
    let request = e.get("request").ok_or_else(|| {
        FhirError::at(
            StatusCode::BAD_REQUEST,
            "required",
            at("request"),
            "each entry needs a request",
        )
    })?;
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            FhirError::at(
                StatusCode::BAD_REQUEST,
                "required",
                at("request.method"),
                "request.method is required",
            )
        })?;
    let url = request.get("url").and_then(Value::as_str).ok_or_else(|| {
        FhirError::at(
            StatusCode::BAD_REQUEST,
            "required",
            at("request.url"),
            "request.url is required",
        )
    })?;
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (url, None),
    };
    if let Some(q) = &query {
        check_query(q, &at("request.url"))?;
    }
    if let Some(q) = request.get("ifNoneExist").and_then(Value::as_str) {
        check_query(
            q.split_once('?').map_or(q, |(_, q)| q),
            &at("request.ifNoneExist"),
        )?;
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let res_type = segs[0].to_string();
    if support(&res_type).is_none() {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "not-supported",
            at("request.url"),
            format!("resource type '{res_type}' is not supported"),
        ));
    }
    let id = segs.get(1).map(|s| s.to_string());
    if segs.len() > 4 || segs.iter().any(|s| s.is_empty()) {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "not-supported",
            at("request.url"),
            format!("'{url}' is not a supported entry URL"),
        ));
    }
    let version = match (segs.get(2), segs.get(3)) {
        (Some(&"_history"), Some(v)) if method == "GET" => {
            Some(v.parse::<i64>().map_err(|_| {
                FhirError::at(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    at("request.url"),
                    "bad version",
                )
            })?)
        }
        (None, None) => None,
        _ => {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "not-supported",
                at("request.url"),
                format!("'{url}' is not a supported entry URL"),
            ))
        }
    };
    if let Some(id) = &id {
        if !fhir_codec::is_valid_id(id) {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "invalid",
                at("request.url"),
                format!("'{id}' is not a valid id"),
            ));
        }
    }
    if request.get("ifNoneExist").is_some()
        && !support(&res_type).is_some_and(|t| t.conditional_create && method == "POST")
    {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "not-supported",
            at("request.ifNoneExist"),
            format!("conditional create is not supported for {method} {res_type}"),
        ));
    }
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        Some(v) => Some(rest::parse_etag(v)?),
        None => None,
    };
    let resource = e.get("resource").cloned();
    let shape_ok = match method {
        "POST" => id.is_none() && resource.is_some(),
        "PUT" => id.is_some() && resource.is_some(),
        "DELETE" => id.is_some(),
        "GET" => true,
        _ => false,
    };
    if !shape_ok {
        return Err(FhirError::at(StatusCode::BAD_REQUEST, "not-supported", at("request"), format!("{method} {url} is not a supported entry (POST Type, PUT Type/id, DELETE Type/id, GET)")));
    }
    // A query (or a fragment) would be silently ignored on a write: refused, not dropped
    // (a conditional create is `request.ifNoneExist`).
    if (query.is_some() && method != "GET") || url.contains('#') {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "not-supported",
            at("request.url"),
            format!("'{url}' is not a supported {method} entry URL: a query is for GET entries only, and no URL takes a fragment"),
        ));
    }
    Ok(Parsed {
        method: method.to_string(),
        res_type,
        id,
        version,
        query,
        full_url: e.get("fullUrl").and_then(Value::as_str).map(String::from),
        resource,
        if_match,
        if_none_exist: request
            .get("ifNoneExist")
            .and_then(Value::as_str)
            .map(String::from),
    })
}

/// Replaces `urn:uuid:` (and other fullUrl) references — and attachment URLs naming a Binary of
/// the same transaction — with the ids the transaction assigned.
fn rewrite_references(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o.iter_mut() {
                if k == "reference" || k == "url" {
                    if let Value::String(s) = x {
                        if let Some(new) = map.get(s.as_str()) {
                            *s = new.clone();
                        }
                    }
                } else {
                    rewrite_references(x, map);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_references(x, map)),
        _ => {}
    }
}

fn response_entry(base: &str, r: &WriteResult) -> Entry {
    let status = match r.status {
        WriteStatus::Created => "201 Created",
        WriteStatus::Updated | WriteStatus::Existing => "200 OK",
        WriteStatus::Deleted | WriteStatus::NothingToDelete => "204 No Content",
    };
    let mut response = json!({"status": status});
    if matches!(
        r.status,
        WriteStatus::Created | WriteStatus::Updated | WriteStatus::Existing
    ) {
        response["location"] = json!(rest::location(base, &r.stored));
        response["etag"] = json!(r.stored.etag());
        response["lastModified"] = json!(dates::format_instant(r.stored.last_updated));
    }
    Entry {
        full_url: (!r.stored.deleted)
            .then(|| format!("{base}/{}/{}", r.stored.res_type, r.stored.id)),
        resource: if r.stored.deleted {
            None
        } else {
            raw(&r.stored)
        },
        response: Some(response),
        ..Default::default()
    }
}

/// Step 1 of a transaction: each entry's id — a new one for a create, the existing resource's
/// for a conditional create that matches one — and the map from each entry's `fullUrl` to its
/// `Type/id`, so references between entries can be rewritten.
#[allow(clippy::type_complexity)]
async fn assign_ids(
    state: &web::Data<AppState>,
    p: &Principal,
    entries: &[Parsed],
) -> Result<
    (
        Vec<Option<String>>,
        HashMap<usize, Stored>,
        HashMap<String, String>,
    ),
    FhirError,
> {
    let mut ids: Vec<Option<String>> = Vec::with_capacity(entries.len());
    let mut existing: HashMap<usize, Stored> = HashMap::new();
    let mut map: HashMap<String, String> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let id = match e.method.as_str() {
            "POST" => {
                let mut id = new_id();
                if let Some(q) = &e.if_none_exist {
                    let search =
                        rest::conditional_search(state, p, &e.res_type, q).map_err(|mut err| {
                            err.issues.iter_mut().for_each(|x| {
                                x.expression = format!("Bundle.entry[{i}].request.ifNoneExist")
                            });
                            err
                        })?;
                    let store = state.store.clone();
                    let rt = e.res_type.clone();
                    let page = blocking(move || Ok(store.search(&rt, &search)?)).await?;
                    match page.matches.len() {
                        0 => {}
                        1 => {
                            // The match is answered in full: it takes create and read permission.
                            access::decide(state, p, &e.res_type, Perm::Create)?;
                            access::decide(state, p, &e.res_type, Perm::Read)?;
                            id = page.matches[0].id.clone();
                            existing.insert(i, page.matches[0].clone());
                        }
                        _ => {
                            return Err(FhirError::at(
                                StatusCode::PRECONDITION_FAILED,
                                "conflict",
                                format!("Bundle.entry[{i}].request.ifNoneExist"),
                                "ifNoneExist matched more than one resource",
                            ))
                        }
                    }
                }
                Some(id)
            }
            "PUT" | "DELETE" => e.id.clone(),
            _ => None,
        };
        if let (Some(full), Some(id)) = (&e.full_url, &id) {
            map.insert(full.clone(), format!("{}/{}", e.res_type, id));
        }
        ids.push(id);
    }
    Ok((ids, existing, map))
}

/// Two writes to one resource in a transaction are ambiguous: the spec says it SHALL fail.
fn one_write_per_resource(entries: &[Parsed], ids: &[Option<String>]) -> Result<(), FhirError> {
    let mut targets = std::collections::HashSet::new();
    for (i, e) in entries.iter().enumerate() {
        if matches!(e.method.as_str(), "PUT" | "DELETE") {
            if let Some(id) = &ids[i] {
                if !targets.insert((e.res_type.clone(), id.clone())) {
                    return Err(FhirError::at(
                        StatusCode::BAD_REQUEST,
                        "invalid",
                        format!("Bundle.entry[{i}].request.url"),
                        format!("{}/{id} is written by more than one entry", e.res_type),
                    ));
                }
            }
        }
    }
    Ok(())
}

async fn transaction(
    state: &web::Data<AppState>,
    entries: Vec<Parsed>,
    ctx: &crate::audit::Context,
    p: &Principal,
) -> Res {
    let base = state.settings.base_url.clone();
    // 1. Resolve conditional creates and assign ids, so references between entries can be rewritten.
    let (ids, mut existing, map) = assign_ids(state, p, &entries).await?;
    // Two writes to one resource in a transaction are ambiguous: the spec says it SHALL fail.
    one_write_per_resource(&entries, &ids)?;
    // 2. Check every resource (after rewriting) and build the operations.
    let mut ops = Vec::new();
    let mut op_index = Vec::new();
    // Binaries this transaction writes may be attached by its messages.
    let fresh: std::collections::HashSet<String> = entries
        .iter()
        .zip(&ids)
        .enumerate()
        .filter(|(i, (e, _))| {
            e.res_type == "Binary" && e.resource.is_some() && !existing.contains_key(i)
        })
        .filter_map(|(_, (_, id))| id.clone())
        .collect();
    // Messages this transaction writes, and whether each is staff-only (a reply may belong to a
    // thread started in the same transaction).
    let mut fresh_messages: HashMap<String, bool> = HashMap::new();
    // Each message's thread references, checked again once every label is known: a reply may
    // come before the staff-only message it answers.
    let mut threads: Vec<(usize, String, Vec<String>)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if existing.contains_key(&i) || e.method == "GET" {
            continue;
        }
        let prefix = format!("Bundle.entry[{i}].resource");
        let id = ids[i].clone().expect("POST/PUT/DELETE have ids");
        let (resource, guard, may_create) = match &e.resource {
            Some(r) => {
                let mut r = r.clone();
                rewrite_references(&mut r, &map);
                let c =
                    checked_entry(state, p, i, e, &prefix, &id, r, &fresh, &fresh_messages).await?;
                if e.res_type == "Communication" {
                    fresh_messages.insert(
                        id.clone(),
                        crate::messaging::staff_only::is_labelled(&c.body),
                    );
                    threads.push((i, id.clone(), thread_ids(&c.body, &base)));
                }
                (Some(Incoming::from_value(c.body)), c.guard, c.may_create)
            }
            None => (None, entry_guard(state, p, i, e, None)?, false),
        };
        let op = entry_op(i, e, id, resource, None, guard, may_create)?;
        ops.push(op);
        op_index.push(i);
    }
    for (i, id, refs) in &threads {
        if fresh_messages.get(id) == Some(&false)
            && refs.iter().any(|r| fresh_messages.get(r) == Some(&true))
        {
            return Err(FhirError::at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "business-rule",
                format!("Bundle.entry[{i}].resource.partOf"),
                "this message belongs to a staff-only conversation (security label NOPAT), which cannot include a patient or RelatedPerson: start a new conversation with them",
            ));
        }
    }
    // 3. All writes in one database transaction: all or nothing.
    let store = state.store.clone();
    let ctx2 = ctx.clone();
    let results = blocking(move || {
        store.write(ops, &ctx2).map_err(|e| {
            let mut fe = FhirError::from(e);
            for issue in &mut fe.issues {
                if issue.expression.is_empty() {
                    issue.expression = "Bundle.entry".into();
                }
            }
            fe
        })
    })
    .await?;
    let mut by_entry: HashMap<usize, WriteResult> = op_index.into_iter().zip(results).collect();
    // 4. Reads see the committed state.
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        if let Some(s) = existing.remove(&i) {
            out.push(response_entry(
                &base,
                &WriteResult {
                    status: WriteStatus::Existing,
                    stored: s,
                },
            ));
        } else if let Some(r) = by_entry.remove(&i) {
            out.push(response_entry(&base, &r));
        } else {
            out.push(get_entry(state, e, p).await);
        }
    }
    Ok(with_disclosed(
        &state.settings.base_url,
        "transaction-response",
        out,
    ))
}

async fn batch(
    state: &web::Data<AppState>,
    entries: Vec<Option<Parsed>>,
    mut errors: HashMap<usize, FhirError>,
    ctx: &crate::audit::Context,
    p: &Principal,
) -> HttpResponse {
    let base = state.settings.base_url.clone();
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.into_iter().enumerate() {
        let Some(e) = e else {
            out.push(error_entry(
                &errors.remove(&i).unwrap_or_else(FhirError::internal),
            ));
            continue;
        };
        if e.method == "GET" {
            out.push(get_entry(state, &e, p).await);
            continue;
        }
        let result: Result<WriteResult, FhirError> = async {
            let prefix = format!("Bundle.entry[{i}].resource");
            let id = e.id.clone().unwrap_or_else(new_id);
            let (resource, guard, may_create) = match &e.resource {
                Some(r) => {
                    let c = checked_entry(
                        state,
                        p,
                        i,
                        &e,
                        &prefix,
                        &id,
                        r.clone(),
                        &Default::default(),
                        &Default::default(),
                    )
                    .await?;
                    (Some(Incoming::from_value(c.body)), c.guard, c.may_create)
                }
                None => (None, entry_guard(state, p, i, &e, None)?, false),
            };
            let if_none_exist = match &e.if_none_exist {
                Some(q) if e.method == "POST" => {
                    Some(rest::conditional_search(state, p, &e.res_type, q)?)
                }
                _ => None,
            };
            let op = entry_op(i, &e, id, resource, if_none_exist, guard, may_create)?;
            rest::write_one(state, ctx, op).await
        }
        .await;
        out.push(match result {
            Ok(r) => response_entry(&base, &r),
            Err(err) => error_entry(&err),
        });
    }
    with_disclosed(&state.settings.base_url, "batch-response", out)
}

/// The ids of the messages `v` answers or belongs to (`partOf`, `inResponseTo`), read as the
/// search index reads references.
fn thread_ids(v: &Value, base: &str) -> Vec<String> {
    ["partOf", "inResponseTo"]
        .iter()
        .flat_map(|k| v[*k].as_array().into_iter().flatten())
        .filter_map(|r| r["reference"].as_str())
        .filter_map(|r| crate::search::index::parse_reference(r, base))
        .filter(|p| {
            p.url.is_none() && matches!(p.target_type.as_deref(), None | Some("Communication"))
        })
        .filter_map(|p| p.target_id)
        .collect()
}

/// An entry's body checked strictly (a Binary stamped with its owner first), then
/// [`access::before_write`] — the same steps as a plain create or update — its errors naming the
/// entry. `fresh_*`: what the same transaction writes earlier.
#[allow(clippy::too_many_arguments)]
async fn checked_entry(
    state: &AppState,
    p: &Principal,
    i: usize,
    e: &Parsed,
    prefix: &str,
    id: &str,
    mut r: Value,
    fresh_binaries: &std::collections::HashSet<String>,
    fresh_messages: &HashMap<String, bool>,
) -> Result<access::BeforeWrite, FhirError> {
    if e.res_type == "Binary" {
        access::stamp_owner(state, p, &mut r);
    }
    check_resource(state, &r, &e.res_type, prefix)?;
    let replaces = (e.method == "PUT").then_some(id);
    let mut c = access::before_write(
        state,
        p,
        &e.res_type,
        entry_perm(e),
        r,
        replaces,
        fresh_binaries,
        fresh_messages,
    )
    .await
    .map_err(|err| at_entry(err, i))?;
    c.may_create &= e.method == "PUT";
    Ok(c)
}

fn entry_perm(e: &Parsed) -> Perm {
    match e.method.as_str() {
        "POST" => Perm::Create,
        "PUT" => Perm::Update,
        _ => Perm::Delete,
    }
}

/// An entry's error names the entry when it names no element of it.
fn at_entry(mut err: FhirError, i: usize) -> FhirError {
    for x in &mut err.issues {
        x.expression = if x.expression.is_empty() {
            format!("Bundle.entry[{i}]")
        } else {
            format!(
                "Bundle.entry[{i}].resource.{}",
                x.expression
                    .split_once('.')
                    .map_or(x.expression.as_str(), |(_, rest)| rest)
            )
        };
    }
    err
}

/// The access policy's decision on a POST/PUT/DELETE entry (shared by transaction and batch).
fn entry_guard(
    state: &AppState,
    p: &Principal,
    i: usize,
    e: &Parsed,
    resource: Option<&Value>,
) -> Result<Option<crate::search::query::Condition>, FhirError> {
    access::write_guard(state, p, &e.res_type, entry_perm(e), resource).map_err(|mut err| {
        err.issues
            .iter_mut()
            .for_each(|x| x.expression = format!("Bundle.entry[{i}]"));
        err
    })
}

/// The write a POST/PUT/DELETE entry asks for (shared by transaction and batch).
fn entry_op(
    i: usize,
    e: &Parsed,
    id: String,
    resource: Option<Incoming>,
    if_none_exist: Option<SearchRequest>,
    guard: Option<crate::search::query::Condition>,
    may_create: bool,
) -> Result<WriteOp, FhirError> {
    let needed = match e.method.as_str() {
        "POST" => "create",
        "PUT" => "update",
        _ => "delete",
    };
    let t = support(&e.res_type).expect("checked in parse_entry");
    if !t.interactions.contains(&needed) {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "not-supported",
            format!("Bundle.entry[{i}].request"),
            format!("{needed} is not supported on {}", e.res_type),
        ));
    }
    let res_type = e.res_type.clone();
    Ok(match (e.method.as_str(), resource) {
        ("POST", Some(resource)) => WriteOp::Create {
            res_type,
            id,
            resource,
            if_none_exist,
        },
        ("PUT", Some(resource)) => {
            if resource.value.get("id").and_then(Value::as_str) != Some(id.as_str()) {
                return Err(FhirError::at(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("Bundle.entry[{i}].resource.id"),
                    "the resource id must match request.url",
                ));
            }
            WriteOp::Update {
                res_type,
                id,
                resource,
                if_match: e.if_match,
                upsert: true,
                patch: false,
                guard,
                may_create,
            }
        }
        _ => WriteOp::Delete {
            res_type,
            id,
            if_match: e.if_match,
            guard,
        },
    })
}

fn error_entry(e: &FhirError) -> Entry {
    Entry {
        response: Some(json!({
            "status": format!("{} {}", e.status.as_u16(), e.status.canonical_reason().unwrap_or("")),
            "outcome": e.outcome(),
        })),
        ..Default::default()
    }
}

/// A GET entry: read, vread or search, through the same access decisions as a plain request.
async fn get_entry(state: &web::Data<AppState>, e: &Parsed, p: &Principal) -> Entry {
    let base = state.settings.base_url.clone();
    let result: Result<Entry, FhirError> = async {
        match (&e.id, e.version) {
            (Some(id), v) => {
                let s = access::read(state, p, &e.res_type, id, v).await?;
                Ok(Entry {
                    full_url: Some(format!("{base}/{}/{}", s.res_type, s.id)),
                    resource: raw(&s),
                    response: Some(json!({"status": "200 OK", "etag": s.etag(), "lastModified": dates::format_instant(s.last_updated)})),
                    ..Default::default()
                })
            }
            (None, _) => {
                let t = support(&e.res_type).expect("checked");
                if !t.searchable {
                    return Err(FhirError::new(StatusCode::METHOD_NOT_ALLOWED, "not-supported", format!("search is not supported on {}", e.res_type)));
                }
                let search = rest::parse_search(state, &e.res_type, &query_pairs(e.query.as_deref().unwrap_or("")), false)?;
                let page = access::search(state, p, &e.res_type, search.clone()).await?;
                let resp = searchset(state, &e.res_type, &search, &page)?;
                let body = actix_web::body::to_bytes(resp.into_body()).await.map_err(|_| FhirError::internal())?;
                Ok(Entry {
                    resource: RawValue::from_string(String::from_utf8_lossy(&body).into_owned()).ok(),
                    response: Some(json!({"status": "200 OK"})),
                    ..Default::default()
                })
            }
        }
    }
    .await;
    result.unwrap_or_else(|err| error_entry(&err))
}
