//! Instance and type interactions: create, read, vread, update, patch, delete, history, search.

use super::access;
use super::outcome::{self, FhirError, FHIR_JSON};
use super::{support, TypeSupport};
#[allow(unused_imports)]
pub use crate::api::{
    answer_audited, audit_context, audit_outcome, audited_answer, audited_operation, blocking,
    check_accept, check_content_type, media_type, query_pairs, read_body, record_event,
    record_event_checked, AppState, RequestId, Res,
};
use crate::audit::{self, Interaction};
use crate::auth::scopes::Perm;
use crate::search::dates;
use crate::search::query::{self, Limits, SearchRequest};
use crate::store::{Incoming, Stored, WriteOp, WriteResult, WriteStatus};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine;
use serde_json::{json, Value};

/// Parses and strictly checks a resource body of `expected` type.
pub fn parse_resource(
    state: &AppState,
    bytes: &[u8],
    expected: &str,
    expression_prefix: &str,
) -> Result<Incoming, FhirError> {
    super::limits::check_json_cost(bytes)?;
    let text =
        std::str::from_utf8(bytes).map_err(|_| FhirError::bad_request("the body is not UTF-8"))?;
    let incoming = Incoming::parse(text)
        .map_err(|m| FhirError::at(StatusCode::BAD_REQUEST, "structure", expression_prefix, m))?;
    check_resource(state, &incoming.value, expected, expression_prefix)?;
    Ok(incoming)
}

/// Strict FHIR check of an already parsed resource; expressions are prefixed for Bundle entries.
/// Besides [`fhir_codec::check`], every searchable value must fit the index
/// ([`crate::search::index::check_indexable`]).
pub fn check_resource(
    state: &AppState,
    value: &Value,
    expected: &str,
    expression_prefix: &str,
) -> Result<(), FhirError> {
    let prefix = |e: String| {
        if expression_prefix.is_empty() {
            e
        } else if e.is_empty() {
            expression_prefix.to_string()
        } else {
            format!("{expression_prefix}.{e}")
        }
    };
    match value.get("resourceType").and_then(Value::as_str) {
        Some(t) if t == expected => {}
        Some(t) => {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "invalid",
                prefix("resourceType".into()),
                format!("resourceType '{t}' does not match the expected type '{expected}'"),
            ))
        }
        None => {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "required",
                prefix("resourceType".into()),
                "resourceType is missing",
            ))
        }
    }
    fhir_codec::check(value)
        .and_then(|()| {
            let issues = crate::search::index::check_indexable(
                &state.store.registry,
                expected,
                value,
                &state.settings.base_url,
            );
            if issues.is_empty() {
                Ok(())
            } else {
                Err(issues)
            }
        })
        .map_err(|issues| {
            FhirError::invalid_resource(
                issues
                    .into_iter()
                    .map(|mut i| {
                        i.expression = prefix(i.expression);
                        i
                    })
                    .collect(),
            )
        })
}

// ----- Prefer / If-Match ------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

pub fn prefer_return(req: &HttpRequest) -> Return {
    let prefer = req
        .headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    for p in prefer.split([',', ';']) {
        match p.trim().replace(' ', "").as_str() {
            "return=minimal" => return Return::Minimal,
            "return=OperationOutcome" => return Return::OperationOutcome,
            "return=representation" => return Return::Representation,
            _ => {}
        }
    }
    Return::Representation
}

pub fn prefer_strict(req: &HttpRequest) -> bool {
    req.headers()
        .get_all("prefer")
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split([',', ';'])
                .any(|p| p.trim().replace(' ', "") == "handling=strict")
        })
}

/// `If-Match: W/"3"` → 3.
pub fn parse_etag(v: &str) -> Result<i64, FhirError> {
    let t = v.trim();
    let t = t.strip_prefix("W/").unwrap_or(t);
    t.trim_matches('"')
        .parse()
        .map_err(|_| FhirError::bad_request(format!("If-Match '{v}' is not an ETag like W/\"1\"")))
}

fn if_match(req: &HttpRequest) -> Result<Option<i64>, FhirError> {
    match req.headers().get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => parse_etag(v.to_str().unwrap_or("")).map(Some),
    }
}

// ----- responses --------------------------------------------------------------------------------

pub fn location(base: &str, s: &Stored) -> String {
    format!("{base}/{}/{}/_history/{}", s.res_type, s.id, s.version_id)
}

/// The standard headers of a resource response.
pub fn resource_response(status: StatusCode, s: &Stored) -> actix_web::HttpResponseBuilder {
    let mut b = HttpResponse::build(status);
    b.insert_header((header::ETAG, s.etag()))
        .insert_header((header::LAST_MODIFIED, dates::format_http(s.last_updated)));
    b
}

fn write_response(state: &AppState, req: &HttpRequest, r: &WriteResult) -> HttpResponse {
    let status = match r.status {
        WriteStatus::Created => StatusCode::CREATED,
        _ => StatusCode::OK,
    };
    let mut b = resource_response(status, &r.stored);
    if r.status == WriteStatus::Created {
        b.insert_header((
            header::LOCATION,
            location(&state.settings.base_url, &r.stored),
        ));
    }
    let mut res = match prefer_return(req) {
        Return::Minimal => b.finish(),
        Return::OperationOutcome => b.content_type(FHIR_JSON).body(
            outcome::information(&format!(
                "{}/{}/_history/{} {}",
                r.stored.res_type,
                r.stored.id,
                r.stored.version_id,
                match r.status {
                    WriteStatus::Created => "created",
                    WriteStatus::Existing =>
                        "already exists (If-None-Exist matched); nothing was written",
                    _ => "updated",
                }
            ))
            .to_string(),
        ),
        Return::Representation => b
            .content_type(FHIR_JSON)
            .body(r.stored.body.clone().unwrap_or_default()),
    };
    if r.status == WriteStatus::Existing {
        // Nothing was written, so nothing was audited in a write's transaction: `finish_write`
        // audits it (a conditional create's match answers with the stored resource: a read).
        let patient = r
            .stored
            .body
            .as_deref()
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
            .and_then(|v| audit::patient_of(&v));
        let what = format!(
            "{}/{}/_history/{}",
            r.stored.res_type, r.stored.id, r.stored.version_id
        );
        res.extensions_mut()
            .insert(NothingWritten { what, patient });
    }
    res
}

/// On a write's answer: nothing was written (a conditional create matched, or nothing changed).
struct NothingWritten {
    what: String,
    patient: Option<String>,
}

fn type_support(res_type: &str) -> Result<&'static TypeSupport, FhirError> {
    support(res_type).ok_or_else(|| {
        FhirError::not_found(format!(
            "resource type '{res_type}' is not supported by this server"
        ))
    })
}

fn require(t: &TypeSupport, interaction: &str) -> Result<(), FhirError> {
    if t.interactions.contains(&interaction) {
        Ok(())
    } else {
        Err(FhirError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "not-supported",
            format!("{interaction} is not supported on {}", t.name),
        ))
    }
}

fn check_id(id: &str) -> Result<(), FhirError> {
    if fhir_codec::is_valid_id(id) {
        Ok(())
    } else {
        Err(FhirError::bad_request(format!(
            "'{id}' is not a valid FHIR id"
        )))
    }
}

/// [`access::before_write`] on a request's body; the body as received when nothing was added
/// (its text is stored as sent).
async fn checked(
    state: &AppState,
    p: &crate::auth::Principal,
    res_type: &str,
    perm: Perm,
    incoming: Incoming,
    replaces: Option<&str>,
) -> Result<(Incoming, Option<crate::search::query::Condition>, bool), FhirError> {
    let c = access::before_write(
        state,
        p,
        res_type,
        perm,
        incoming.value.clone(),
        replaces,
        &Default::default(),
        &Default::default(),
    )
    .await?;
    let incoming = if c.body == incoming.value {
        incoming
    } else {
        Incoming::from_value(c.body)
    };
    Ok((incoming, c.guard, c.may_create))
}

/// A new resource id (`courier_store::ids`: a UUIDv7 in 22 base62 digits).
pub fn new_id() -> String {
    courier_store::ids::new_id()
}

// ----- create -----------------------------------------------------------------------------------

/// A write's success is audited inside its own transaction; only a failure is audited here.
async fn finish_write(
    state: &web::Data<AppState>,
    ctx: &audit::Context,
    interaction: Interaction,
    what: Option<String>,
    result: Res,
) -> HttpResponse {
    if result.is_err() {
        return answer_audited(state, ctx, interaction, what, None, result).await;
    }
    let mut result = result;
    let nothing_written = result
        .as_mut()
        .ok()
        .and_then(|r| r.extensions_mut().remove::<NothingWritten>());
    if let Some(n) = nothing_written {
        // Audited here, and not served if that fails (`answer_audited` lets through only a 201
        // from a create: a conditional create's match is a 200 and carries the stored resource).
        let interaction = if interaction == Interaction::Create {
            Interaction::Read
        } else {
            interaction
        };
        return answer_audited(state, ctx, interaction, Some(n.what), n.patient, result).await;
    }
    result.unwrap_or_else(|e| actix_web::ResponseError::error_response(&e))
}

/// One change through the store's single write path.
pub async fn write_one(
    state: &AppState,
    ctx: &audit::Context,
    op: WriteOp,
) -> Result<WriteResult, FhirError> {
    Ok(state.store.write_async(vec![op], ctx).await?.remove(0))
}

pub async fn create(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let res_type = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = create_inner(&state, &req, &res_type, payload, &ctx).await;
    finish_write(&state, &ctx, Interaction::Create, Some(res_type), result).await
}

async fn create_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    payload: web::Payload,
    ctx: &audit::Context,
) -> Res {
    let t = type_support(res_type)?;
    require(t, "create")?;
    check_accept(req)?;
    let p = access::principal(req)?;
    let is_binary = res_type == "Binary";
    let limit = if is_binary {
        super::limits::binary_json_body_limit(&state.settings)
    } else {
        state.settings.max_resource_bytes
    };
    let mt = media_type(req);
    let raw_binary = is_binary
        && !matches!(
            mt.as_str(),
            "application/fhir+json" | "application/json+fhir"
        );
    if !raw_binary {
        check_content_type(req)?;
    }
    let body = read_body(req, payload, limit).await?;
    let id = new_id();
    let incoming = if raw_binary {
        super::limits::check_binary_bytes(&state.settings, body.len(), "Binary.data")?;
        let content_type = if mt.is_empty() {
            "application/octet-stream".to_string()
        } else {
            req.headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(&mt)
                .to_string()
        };
        if !fhir_codec::is_mime_type(&content_type) {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "value",
                "Binary.contentType",
                "Content-Type must be a MIME type: type/subtype, optionally with ;name=value parameters",
            ));
        }
        let mut v = json!({"resourceType": "Binary", "contentType": content_type, "data": base64::engine::general_purpose::STANDARD.encode(&body)});
        access::stamp_owner(state, &p, &mut v);
        Incoming::from_value(v)
    } else {
        let incoming = parse_resource(state, &body, res_type, "")?;
        if is_binary {
            super::limits::check_resource_size(
                &state.settings,
                "Binary",
                &incoming.value,
                "Binary",
            )?;
        }
        incoming
    };
    let (incoming, _, _) = checked(state, &p, res_type, Perm::Create, incoming, None).await?;
    let if_none_exist = match req.headers().get("if-none-exist") {
        Some(v) if t.conditional_create => {
            let q = v
                .to_str()
                .map_err(|_| FhirError::bad_request("If-None-Exist is not valid text"))?;
            let q = q.split_once('?').map_or(q, |(_, q)| q);
            super::bundle::check_query(q, "If-None-Exist")?;
            Some(conditional_search(state, &p, res_type, q)?)
        }
        Some(_) => {
            return Err(FhirError::bad_request(format!(
                "conditional create is not supported on {res_type}"
            )))
        }
        None => None,
    };
    let op = WriteOp::Create {
        res_type: res_type.to_string(),
        id,
        resource: incoming,
        if_none_exist,
    };
    let r = write_one(state, ctx, op).await?;
    Ok(write_response(state, req, &r))
}

// ----- read / vread -----------------------------------------------------------------------------

pub async fn read(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (res_type, id) = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = read_inner(&state, &req, &res_type, &id, None).await;
    finish_read(&state, &ctx, Interaction::Read, &res_type, &id, result).await
}

/// `HEAD /{type}/{id}`: the read's status and headers, without its body (actix drops it). Only
/// for a FHIR type and id: any other two-part path (`/app/app.js`, `/Communication/$unread`)
/// whose route answers only GET is no endpoint here, as before, and writes no AuditEvent.
pub async fn head(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (res_type, id) = path.as_ref();
    if support(res_type).is_none() || !fhir_codec::is_valid_id(id) {
        return super::no_such_endpoint().await;
    }
    read(state, req, path).await
}

pub async fn vread(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> HttpResponse {
    let (res_type, id, vid) = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = match vid.parse::<i64>() {
        Ok(v) => read_inner(&state, &req, &res_type, &id, Some(v)).await,
        Err(_) => Err(FhirError::not_found(format!(
            "'{vid}' is not a version of {res_type}/{id}"
        ))),
    };
    finish_read(&state, &ctx, Interaction::Vread, &res_type, &id, result).await
}

async fn finish_read(
    state: &web::Data<AppState>,
    ctx: &audit::Context,
    interaction: Interaction,
    res_type: &str,
    id: &str,
    result: Result<(HttpResponse, Option<String>), FhirError>,
) -> HttpResponse {
    let (result, patient) = match result {
        Ok((r, p)) => (Ok(r), p),
        Err(e) => (Err(e), None),
    };
    answer_audited(
        state,
        ctx,
        interaction,
        Some(format!("{res_type}/{id}")),
        patient,
        result,
    )
    .await
}

async fn read_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    id: &str,
    version: Option<i64>,
) -> Result<(HttpResponse, Option<String>), FhirError> {
    let t = type_support(res_type)?;
    require(t, if version.is_some() { "vread" } else { "read" })?;
    check_id(id)?;
    let raw_binary = res_type == "Binary" && wants_raw(req);
    if !raw_binary {
        check_accept(req)?;
    }
    let p = access::principal(req)?;
    let s = access::read(state, &p, res_type, id, version).await?;
    let body = s.body.clone().unwrap_or_default();
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let patient = audit::patient_of(&value);
    // A Binary's patients are those of the messages that attach it.
    let disclosed = if res_type == "Binary" {
        Some(Disclosed(access::patients_of_binary(state, id).await?))
    } else {
        None
    };
    let mark = |mut r: HttpResponse| {
        if let Some(d) = &disclosed {
            r.extensions_mut().insert(d.clone());
        }
        r
    };
    // If-None-Match: the client's copy is current.
    if let Some(inm) = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        if parse_etag(inm).ok() == Some(s.version_id) {
            return Ok((
                mark(resource_response(StatusCode::NOT_MODIFIED, &s).finish()),
                patient,
            ));
        }
    }
    if raw_binary {
        // A content type stored before it was checked is served as plain bytes, never as a 500.
        let ct = value["contentType"]
            .as_str()
            .filter(|ct| fhir_codec::is_mime_type(ct) && header::HeaderValue::from_str(ct).is_ok())
            .unwrap_or("application/octet-stream")
            .to_string();
        let data = base64::engine::general_purpose::STANDARD
            .decode(value["data"].as_str().unwrap_or(""))
            .unwrap_or_default();
        // User-supplied content: never let a browser run it in our origin.
        return Ok((
            mark(
                resource_response(StatusCode::OK, &s)
                    .content_type(ct)
                    .insert_header(("X-Content-Type-Options", "nosniff"))
                    .insert_header(("Content-Security-Policy", "sandbox; default-src 'none'"))
                    .body(data),
            ),
            patient,
        ));
    }
    Ok((
        mark(
            resource_response(StatusCode::OK, &s)
                .content_type(FHIR_JSON)
                .body(body),
        ),
        patient,
    ))
}

/// A Binary read returns the raw content unless the client asks for a FHIR format.
fn wants_raw(req: &HttpRequest) -> bool {
    if query_pairs(req.query_string())
        .iter()
        .any(|(k, _)| k == "_format")
    {
        return false;
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    !(accept.contains("application/fhir+json") || accept.contains("application/json"))
}

// ----- update / patch / delete ------------------------------------------------------------------

pub async fn update(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> HttpResponse {
    let (res_type, id) = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = update_inner(&state, &req, &res_type, &id, payload, &ctx).await;
    finish_write(
        &state,
        &ctx,
        Interaction::Update,
        Some(format!("{res_type}/{id}")),
        result,
    )
    .await
}

async fn update_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    id: &str,
    payload: web::Payload,
    ctx: &audit::Context,
) -> Res {
    let t = type_support(res_type)?;
    require(t, "update")?;
    check_id(id)?;
    check_accept(req)?;
    check_content_type(req)?;
    let if_match = if_match(req)?;
    let p = access::principal(req)?;
    let body = read_body(req, payload, state.settings.max_resource_bytes).await?;
    let incoming = parse_resource(state, &body, res_type, "")?;
    match incoming.value.get("id").and_then(Value::as_str) {
        Some(body_id) if body_id == id => {}
        Some(body_id) => {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("{res_type}.id"),
                format!("the body's id '{body_id}' does not match the URL's id '{id}'"),
            ))
        }
        None => {
            return Err(FhirError::at(
                StatusCode::BAD_REQUEST,
                "required",
                format!("{res_type}.id"),
                "an update must carry the resource id in the body",
            ))
        }
    }
    // Client-assigned ids (update as create) for system tokens only: see `access::before_write`.
    let (incoming, guard, may_create) =
        checked(state, &p, res_type, Perm::Update, incoming, Some(id)).await?;
    let op = WriteOp::Update {
        res_type: res_type.to_string(),
        id: id.to_string(),
        resource: incoming,
        if_match,
        upsert: true,
        patch: false,
        guard,
        may_create,
    };
    let r = write_one(state, ctx, op).await?;
    Ok(write_response(state, req, &r))
}

pub async fn patch(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> HttpResponse {
    let (res_type, id) = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = patch_inner(&state, &req, &res_type, &id, payload, &ctx).await;
    finish_write(
        &state,
        &ctx,
        Interaction::Patch,
        Some(format!("{res_type}/{id}")),
        result,
    )
    .await
}

async fn patch_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    id: &str,
    payload: web::Payload,
    ctx: &audit::Context,
) -> Res {
    let t = type_support(res_type)?;
    require(t, "patch")?;
    check_id(id)?;
    check_accept(req)?;
    if media_type(req) != "application/json-patch+json" {
        return Err(FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "PATCH takes a JSON Patch document (Content-Type: application/json-patch+json)",
        ));
    }
    let if_match = if_match(req)?;
    let body = read_body(req, payload, state.settings.max_resource_bytes).await?;
    super::limits::check_json_cost(&body)?;
    let patch: json_patch::Patch = serde_json::from_slice(&body)
        .map_err(|e| FhirError::bad_request(format!("invalid JSON Patch document: {e}")))?;
    let p = access::principal(req)?;
    // A patch reads the current version (and answers with the result): it takes update and read
    // permission, and a confined token patches only what it can see.
    access::write_guard(state, &p, res_type, Perm::Update, None)?;
    let current = access::read(state, &p, res_type, id, None).await?;
    if let Some(v) = if_match {
        if v != current.version_id {
            return Err(FhirError::new(
                StatusCode::PRECONDITION_FAILED,
                "conflict",
                format!(
                    "{res_type}/{id} is at version {}, not {v}",
                    current.version_id
                ),
            ));
        }
    }
    let mut value: Value = serde_json::from_slice(current.body.as_deref().unwrap_or_default())
        .map_err(|_| FhirError::internal())?;
    super::limits::apply_patch(&state.settings, &mut value, &patch)?;
    if depth(&value) > 100 {
        return Err(FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "the patched resource would be nested more than 100 levels deep",
        ));
    }
    if value.get("id").and_then(Value::as_str) != Some(id)
        || value.get("resourceType").and_then(Value::as_str) != Some(res_type)
    {
        return Err(FhirError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "processing",
            "a patch may not change id or resourceType",
        ));
    }
    // meta.versionId/lastUpdated are the server's; the patched resource is checked as strictly as a PUT.
    super::limits::check_resource_size(&state.settings, res_type, &value, res_type)?;
    check_resource(state, &value, res_type, "")?;
    let checked = access::before_write(
        state,
        &p,
        res_type,
        Perm::Update,
        value,
        Some(id),
        &Default::default(),
        &Default::default(),
    )
    .await?;
    let (value, guard) = (checked.body, checked.guard);
    let op = WriteOp::Update {
        res_type: res_type.to_string(),
        id: id.to_string(),
        resource: Incoming::from_value(value),
        if_match: Some(current.version_id),
        upsert: false,
        patch: true,
        guard,
        may_create: false,
    };
    let r = write_one(state, ctx, op).await?;
    Ok(write_response(state, req, &r))
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub async fn delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (res_type, id) = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = delete_inner(&state, &req, &res_type, &id, &ctx).await;
    finish_write(
        &state,
        &ctx,
        Interaction::Delete,
        Some(format!("{res_type}/{id}")),
        result,
    )
    .await
}

async fn delete_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    id: &str,
    ctx: &audit::Context,
) -> Res {
    let t = type_support(res_type)?;
    require(t, "delete")?;
    check_id(id)?;
    let if_match = if_match(req)?;
    let p = access::principal(req)?;
    let guard = access::write_guard(state, &p, res_type, Perm::Delete, None)?;
    let op = WriteOp::Delete {
        res_type: res_type.to_string(),
        id: id.to_string(),
        if_match,
        guard,
    };
    let r = write_one(state, ctx, op).await?;
    let msg = match r.status {
        WriteStatus::Deleted => format!("{res_type}/{id} deleted"),
        _ => format!("{res_type}/{id} did not exist or was already deleted; nothing to do"),
    };
    let mut b = HttpResponse::build(if prefer_return(req) == Return::OperationOutcome {
        StatusCode::OK
    } else {
        StatusCode::NO_CONTENT
    });
    if r.status == WriteStatus::Deleted {
        b.insert_header((header::ETAG, r.stored.etag()));
    }
    Ok(if prefer_return(req) == Return::OperationOutcome {
        b.content_type(FHIR_JSON)
            .body(outcome::information(&msg).to_string())
    } else {
        b.finish()
    })
}

// ----- history ----------------------------------------------------------------------------------

pub async fn instance_history(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> HttpResponse {
    let (res_type, id) = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = history_inner(&state, &req, &res_type, Some(id.clone())).await;
    answer_audited(
        &state,
        &ctx,
        Interaction::HistoryInstance,
        Some(format!("{res_type}/{id}")),
        None,
        result,
    )
    .await
}

pub async fn type_history(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let res_type = path.into_inner();
    let ctx = audit_context(&req, &state);
    let result = history_inner(&state, &req, &res_type, None).await;
    answer_audited(&state, &ctx, Interaction::HistoryType, None, None, result).await
}

/// The patients of stored resources (their bodies), for an answer's AuditEvent.
pub fn patients_in_stored<'a>(
    base: &str,
    stored: impl IntoIterator<Item = &'a Stored>,
) -> Disclosed {
    Disclosed(audit::patients_of_bodies(
        stored
            .into_iter()
            // An AuditEvent has none of the elements read: not parsed for nothing.
            .filter(|s| s.res_type != "AuditEvent")
            .filter_map(|s| s.body.as_deref()),
        base,
    ))
}

async fn history_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    id: Option<String>,
) -> Res {
    let t = type_support(res_type)?;
    require(
        t,
        if id.is_some() {
            "history-instance"
        } else {
            "history-type"
        },
    )?;
    if let Some(id) = &id {
        check_id(id)?;
    }
    check_accept(req)?;
    let p = access::principal(req)?;
    // SMART v2: instance history is under `r`, type history under `s`.
    let perm = if id.is_some() {
        Perm::Read
    } else {
        Perm::Search
    };
    let filter = match access::decide(state, &p, res_type, perm)? {
        access::Access::All => None,
        access::Access::Only(c) => {
            if let Some(id) = &id {
                // The resource itself must be visible; then each version is checked below.
                access::read(state, &p, res_type, id, None).await?;
            }
            Some(c)
        }
    };
    let pairs = query_pairs(req.query_string());
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let num = |k: &str| -> Result<Option<usize>, FhirError> {
        get(k)
            .map(|v| {
                v.parse().map_err(|_| {
                    FhirError::bad_request(format!("{k} must be a non-negative integer"))
                })
            })
            .transpose()
    };
    // `_count=0`: no entries (as a search's count alone; a history bundle carries no total).
    let count = num("_count")?
        .unwrap_or(state.settings.default_count)
        .min(state.settings.max_count);
    let offset = num("_offset")?.unwrap_or(0);
    let snapshot = get("_snapshot")
        .map(|t| super::paging::open(&state.store, &t))
        .transpose()?;
    // `_at` and `_list` are R4 history parameters Courier does not implement: answering as if
    // they were absent would return versions the client asked to leave out.
    for k in ["_at", "_list"] {
        if get(k).is_some() {
            return Err(FhirError::bad_request(format!(
                "{k} is not supported on _history: use _since (and _count)"
            )));
        }
    }
    let since = match get("_since") {
        Some(s) => Some(
            dates::range(&s)
                .ok_or_else(|| {
                    FhirError::bad_request(format!("_since '{s}' is not a valid instant"))
                })?
                .0,
        ),
        None => None,
    };
    // A confined reader's history is filtered before it is paged: the SQL applies the grant to
    // each resource's current version, and older versions outside the grant (or recalled by a
    // withdrawal) are left out here, chunk by chunk, so that every page is full while more
    // follow and a short page or a `next` never says that hidden versions exist. `_offset`
    // counts the versions this reader sees.
    let chunk = if filter.is_some() {
        count.clamp(20, 200)
    } else {
        count.max(1)
    };
    let (mut versions, mut has_next, mut pinned) = (Vec::new(), false, snapshot);
    let (mut raw, mut skipped) = (if filter.is_some() { 0 } else { offset }, 0usize);
    while count > 0 {
        let store = state.store.clone();
        let (rt, rid, f2) = (res_type.to_string(), id.clone(), filter.clone());
        let (mut got, more, snap) = blocking(move || {
            Ok(store.history(&rt, rid.as_deref(), since, chunk, raw, pinned, f2.as_ref())?)
        })
        .await?;
        pinned = Some(snap);
        raw += got.len();
        if filter.is_some() {
            // Older versions may have been outside the grant even though the current one is not.
            got.retain(|s| access::may_see(state, &p, s));
            // Nor are a withdrawn message's earlier versions its readers' (its content is recalled).
            got = access::without_recalled(state, &p, got).await?;
        }
        for v in got {
            if skipped < offset && filter.is_some() {
                skipped += 1;
            } else if versions.len() < count {
                versions.push(v);
            } else {
                has_next = true;
                break;
            }
        }
        if has_next || !more {
            break;
        }
        if filter.is_none() && versions.len() >= count {
            has_next = more;
            break;
        }
    }
    let snapshot = match pinned {
        Some(s) => s,
        // `_count=0` read nothing: its links still pin the view.
        None => {
            let (store, rt) = (state.store.clone(), res_type.to_string());
            blocking(move || Ok(store.history(&rt, None, None, 1, 0, None, None)?.2)).await?
        }
    };
    let base = &state.settings.base_url;
    let path = match &id {
        Some(id) => format!("{base}/{res_type}/{id}/_history"),
        None => format!("{base}/{res_type}/_history"),
    };
    let mut keep: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k == "_since")
        .cloned()
        .collect();
    keep.push(("_count".into(), count.to_string()));
    let snapshot = super::paging::seal(&state.store, snapshot)?;
    let links = super::bundle::page_links(&path, &keep, offset, count, has_next, &snapshot);
    let entries = versions
        .iter()
        .map(|s| super::bundle::history_entry(base, s))
        .collect();
    let mut answer = super::bundle::bundle_response("history", None, links, entries);
    answer
        .extensions_mut()
        .insert(patients_in_stored(&state.settings.base_url, &versions));
    Ok(answer)
}

// ----- search -----------------------------------------------------------------------------------

pub fn parse_search(
    state: &AppState,
    res_type: &str,
    pairs: &[(String, String)],
    strict: bool,
) -> Result<SearchRequest, FhirError> {
    let limits = Limits {
        default_count: state.settings.default_count,
        max_count: state.settings.max_count,
        strict,
    };
    let pairs = &super::paging::open_pairs(&state.store, pairs)?;
    query::parse(
        &state.store.registry,
        res_type,
        pairs,
        &state.settings.base_url,
        &limits,
    )
    .map_err(|issues| {
        let status = StatusCode::BAD_REQUEST;
        FhirError { status, issues }
    })
}

/// The search of a conditional create (`If-None-Exist`, Bundle `ifNoneExist`): strict, and it must
/// actually narrow the search (an empty one would match any resource of the type).
pub fn conditional_search(
    state: &AppState,
    p: &crate::auth::Principal,
    res_type: &str,
    query: &str,
) -> Result<SearchRequest, FhirError> {
    let mut search = parse_search(state, res_type, &query_pairs(query), true)?;
    if search.conditions.is_empty() {
        return Err(FhirError::at(
            StatusCode::BAD_REQUEST,
            "invalid",
            "If-None-Exist",
            "a conditional create needs at least one search criterion",
        ));
    }
    search.count = 2;
    search.offset = 0;
    search.summary_count = false;
    // It may match only what the token may see: a match outside the grant must not leak.
    access::confine(state, p, res_type, &mut search)?;
    Ok(search)
}

pub async fn search_get(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let res_type = path.into_inner();
    let pairs = query_pairs(req.query_string());
    let raw = format!("GET {}{}", state.settings.base_url, req.uri());
    search_common(state, req, res_type, pairs, raw).await
}

pub async fn search_post(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> HttpResponse {
    let res_type = path.into_inner();
    let body = match read_body(&req, payload, 64 * 1024).await {
        Ok(b) => b,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    if !body.is_empty() && media_type(&req) != "application/x-www-form-urlencoded" {
        let e = FhirError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not-supported",
            "_search takes application/x-www-form-urlencoded parameters",
        );
        return actix_web::ResponseError::error_response(&e);
    }
    let mut pairs = query_pairs(req.query_string());
    pairs.extend(query_pairs(&String::from_utf8_lossy(&body)));
    let raw = format!(
        "POST {}{}\n\n{}",
        state.settings.base_url,
        req.uri(),
        String::from_utf8_lossy(&body)
    );
    search_common(state, req, res_type, pairs, raw).await
}

async fn search_common(
    state: web::Data<AppState>,
    req: HttpRequest,
    res_type: String,
    pairs: Vec<(String, String)>,
    raw: String,
) -> HttpResponse {
    let mut ctx = audit_context(&req, &state);
    ctx.query = Some(raw);
    let patient = pairs
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "patient" | "subject" | "recipient" | "sender"))
        .find_map(|(k, v)| {
            if k == "patient" && !v.contains('/') {
                Some(format!("Patient/{v}"))
            } else {
                v.starts_with("Patient/").then(|| v.clone())
            }
        });
    let result = search_inner(&state, &req, &res_type, pairs).await;
    // A refused search concerns no patient: naming one would put the caller's query into that
    // patient's audit trail.
    let patient = patient.filter(|pt| {
        result.as_ref().is_ok_and(|r| r.status().is_success())
            && access::principal(&req).is_ok_and(|p| {
                matches!(
                    access::decide(&state, &p, &res_type, Perm::Search),
                    Ok(access::Access::All)
                ) || p
                    .patient
                    .as_deref()
                    .map(|x| format!("Patient/{x}"))
                    .as_deref()
                    == Some(pt.as_str())
                    || p.fhir_user.as_deref() == Some(pt.as_str())
            })
    });
    answer_audited(&state, &ctx, Interaction::SearchType, None, patient, result).await
}

async fn search_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    res_type: &str,
    pairs: Vec<(String, String)>,
) -> Res {
    let t = type_support(res_type)?;
    require(t, "search-type")?;
    check_accept(req)?;
    let search = parse_search(state, res_type, &pairs, prefer_strict(req))?;
    let p = access::principal(req)?;
    let page = access::search(state, &p, res_type, search.clone()).await?;
    let mut answer = super::bundle::searchset(state, res_type, &search, &page)?;
    // Whose data the page disclosed: each patient goes into the search's AuditEvent (an outside
    // probe's clinician searched `Communication?status=completed`, got a patient's messages,
    // and the patient's accounting of disclosures never showed it).
    answer.extensions_mut().insert(patients_in_stored(
        &state.settings.base_url,
        page.matches.iter().chain(&page.included),
    ));
    Ok(answer)
}

use crate::api::Disclosed;
