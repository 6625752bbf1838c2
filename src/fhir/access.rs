//! The REST layer's side of the access policy: every read, vread, search, include, history entry,
//! write and Binary read — from a plain request or a Bundle entry — calls these functions, which
//! ask `auth::policy` for the one decision. Nothing reaches the store for a principal any other way.
//!
//! Answers: a type the token's scopes do not name is 403 (that reveals nothing about any
//! resource); a resource outside the grant is 404, exactly as if it did not exist, and a deleted
//! resource is 404 rather than 410 for a confined token (410 would confirm it existed).

use super::outcome::FhirError;
use super::rest::blocking;
use super::AppState;
pub use crate::auth::policy::Access;
use crate::auth::policy::{self, Denied};
use crate::auth::scopes::Perm;
use crate::auth::Principal;
use crate::search::query::{Condition, SearchRequest, TokenValue};
use crate::store::{SearchPage, StoreError, Stored};
use actix_web::http::StatusCode;
use actix_web::{HttpMessage, HttpRequest};
use serde_json::Value;

/// The principal the guard middleware put on the request.
pub fn principal(req: &HttpRequest) -> Result<Principal, FhirError> {
    req.extensions().get::<Principal>().cloned().ok_or_else(|| {
        FhirError::new(
            StatusCode::UNAUTHORIZED,
            "login",
            "an access token is required",
        )
    })
}

pub fn forbidden(d: Denied) -> FhirError {
    FhirError::new(StatusCode::FORBIDDEN, "forbidden", d.0)
}

fn not_found(res_type: &str, id: &str) -> FhirError {
    FhirError::from(StoreError::NotFound(res_type.into(), id.into()))
}

pub fn decide(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    perm: Perm,
) -> Result<Access, FhirError> {
    policy::decide(
        p,
        &state.store.registry,
        &state.settings.base_url,
        res_type,
        perm,
    )
    .map_err(forbidden)
}

fn body_value(s: &Stored) -> Value {
    s.body
        .as_deref()
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or(Value::Null)
}

/// May `p` see this stored resource as a search result or include (read or search permission)?
pub fn may_see(state: &AppState, p: &Principal, s: &Stored) -> bool {
    let (registry, base) = (&state.store.registry, &state.settings.base_url);
    let v = body_value(s);
    policy::may_see(p, registry, base, &s.res_type, &v, Perm::Read)
        || policy::may_see(p, registry, base, &s.res_type, &v, Perm::Search)
}

/// Reads the current version (or `version`) as `p` may see it.
pub async fn read(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    id: &str,
    version: Option<i64>,
) -> Result<Stored, FhirError> {
    let access = if res_type == "Binary" {
        None
    } else {
        Some(decide(state, p, res_type, Perm::Read)?)
    };
    let store = state.store.clone();
    let (rt, rid) = (res_type.to_string(), id.to_string());
    let loaded = blocking(move || {
        Ok(match version {
            Some(v) => store.vread(&rt, &rid, v),
            None => store.read(&rt, &rid),
        })
    })
    .await?;
    // One answer for "no such resource", "no such version" and "not yours to see", whichever
    // it is: a vread's wording told a hidden resource from a missing one (an outside probe).
    let unknown = || match version {
        Some(v) => not_found(res_type, &format!("{id}/_history/{v}")),
        None => not_found(res_type, id),
    };
    let confined = !matches!(access, Some(Access::All));
    let s = match loaded {
        Ok(s) => s,
        Err(StoreError::Gone(..)) if confined && !binary_reachable_by_all(state, p, res_type) => {
            return Err(unknown())
        }
        Err(StoreError::NotFound(..)) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    let visible = match &access {
        None => owns(p, &body_value(&s)) || binary_visible(state, p, id).await?,
        Some(Access::All) => true,
        Some(Access::Only(c)) => {
            let entries = crate::search::index::entries(
                &state.store.registry,
                res_type,
                &body_value(&s),
                &state.settings.base_url,
            );
            policy::admits(c, &entries)
        }
    };
    if !visible {
        return Err(unknown());
    }
    // An earlier version of a withdrawn message is its author's (see `recalled`); of a deleted
    // one, no confined reader's (its history is not shown either).
    if confined && res_type == "Communication" && version.is_some() {
        let (store, rid) = (state.store.clone(), id.to_string());
        let head = blocking(move || Ok(store.current_version("Communication", &rid))).await??;
        if head.is_some_and(|(_, deleted)| deleted) {
            return Err(unknown());
        }
        let current = current_of(state, res_type, id).await?;
        if current
            .as_ref()
            .is_some_and(|c| c.1 != s.version_id && recalled(state, p, &c.0))
        {
            return Err(unknown());
        }
    }
    Ok(s)
}

/// The current version of `res_type/id` (its body and version), if it is live.
async fn current_of(
    state: &AppState,
    res_type: &str,
    id: &str,
) -> Result<Option<(Value, i64)>, FhirError> {
    let store = state.store.clone();
    let (rt, rid) = (res_type.to_string(), id.to_string());
    match blocking(move || Ok(store.read(&rt, &rid))).await? {
        Ok(s) => Ok(Some((body_value(&s), s.version_id))),
        Err(StoreError::NotFound(..) | StoreError::Gone(..)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Is `current` a withdrawn message (`entered-in-error`) that `p` did not write? Withdrawing
/// recalls the content: the withdrawn version has none, and the versions before it are kept
/// for the author and for compliance (an unconfined client), never shown to its readers.
pub fn recalled(state: &AppState, p: &Principal, current: &Value) -> bool {
    current["status"] == "entered-in-error"
        && !crate::messaging::rules::acting_as(p, "Communication").is_some_and(|me| {
            current["sender"]["reference"].as_str().is_some_and(|r| {
                let r = crate::messaging::hub::local_ref(r, &state.settings.base_url);
                r.split("/_history").next() == Some(me.as_str())
            })
        })
}

/// Drops from `versions` (a history, for a confined `p`) the earlier versions of withdrawn
/// messages that `p` did not write.
pub async fn without_recalled(
    state: &AppState,
    p: &Principal,
    versions: Vec<Stored>,
) -> Result<Vec<Stored>, FhirError> {
    let mut current: std::collections::HashMap<String, Option<(Value, i64)>> = Default::default();
    let mut out = Vec::with_capacity(versions.len());
    for s in versions {
        if s.res_type == "Communication" {
            if !current.contains_key(&s.id) {
                let c = current_of(state, "Communication", &s.id).await?;
                current.insert(s.id.clone(), c);
            }
            if let Some(Some((c, v))) = current.get(&s.id) {
                if *v != s.version_id && recalled(state, p, c) {
                    continue;
                }
            }
        }
        out.push(s);
    }
    Ok(out)
}

fn binary_reachable_by_all(state: &AppState, p: &Principal, res_type: &str) -> bool {
    res_type == "Binary" && matches!(decide(state, p, "Binary", Perm::Read), Ok(Access::All))
}

/// A Binary follows the resource that attaches it: visible to `p` when `p` may read a
/// Communication or CommunicationRequest whose payload attachment is this Binary.
async fn binary_visible(state: &AppState, p: &Principal, id: &str) -> Result<bool, FhirError> {
    if binary_reachable_by_all(state, p, "Binary") {
        return Ok(true);
    }
    let base = &state.settings.base_url;
    for res_type in ["Communication", "CommunicationRequest"] {
        let Ok(access) = decide(state, p, res_type, Perm::Read) else {
            continue;
        };
        let Some(param) = state.store.registry.get(res_type, "attachment") else {
            continue;
        };
        let mut conditions = vec![Condition::Token {
            key: param.key.clone(),
            not: false,
            values: vec![
                TokenValue::Code(format!("Binary/{id}")),
                TokenValue::Code(format!("{base}/Binary/{id}")),
            ],
        }];
        if let Access::Only(c) = access {
            conditions.push(c);
        }
        let search = SearchRequest::of(conditions, 1);
        let store = state.store.clone();
        let page = blocking(move || Ok(store.search(res_type, &search)?)).await?;
        if !page.matches.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The patients of the messages that attach Binary `id` (for the AuditEvent of its read: a
/// photo or file a patient sent is that patient's data, in their accounting of disclosures). Not
/// confined to what the reader may see: it names, in the trail, whose file was read.
pub async fn patients_of_binary(state: &AppState, id: &str) -> Result<Vec<String>, FhirError> {
    let base = state.settings.base_url.clone();
    let mut bodies = vec![];
    for res_type in ["Communication", "CommunicationRequest"] {
        let Some(param) = state.store.registry.get(res_type, "attachment") else {
            continue;
        };
        let search = SearchRequest::of(
            vec![Condition::Token {
                key: param.key.clone(),
                not: false,
                values: vec![
                    TokenValue::Code(format!("Binary/{id}")),
                    TokenValue::Code(format!("{base}/Binary/{id}")),
                ],
            }],
            20,
        );
        let store = state.store.clone();
        let page = blocking(move || Ok(store.search(res_type, &search)?)).await?;
        bodies.extend(page.matches.iter().map(body_value));
    }
    Ok(crate::audit::patients_of(&bodies, &base))
}

/// The identifier system naming an OAuth client as a Binary's owner (a backend service has no user).
pub const CLIENT_SYSTEM: &str = "urn:courier:oauth-client";

/// The uploader of a Binary as recorded in its `securityContext`: the user; else the client and
/// the patient in context; else the client (a backend service).
fn owner(p: &Principal) -> Value {
    match (&p.fhir_user, &p.patient) {
        (Some(u), _) => serde_json::json!({"reference": u}),
        (None, Some(pt)) => {
            serde_json::json!({"identifier": {"system": CLIENT_SYSTEM, "value": format!("{} Patient/{pt}", p.client_id)}})
        }
        (None, None) => {
            serde_json::json!({"identifier": {"system": CLIENT_SYSTEM, "value": p.client_id}})
        }
    }
}

/// Records who uploads a Binary in its `securityContext`. Only a caller that may read every Binary
/// may set its own (anyone else could claim someone else's upload): for all others it is
/// overwritten. The uploader may read it back, and attach it to a message.
pub fn stamp_owner(state: &AppState, p: &Principal, binary: &mut Value) {
    let trusted = binary_reachable_by_all(state, p, "Binary");
    if !trusted || binary.get("securityContext").is_none() {
        binary["securityContext"] = owner(p);
    }
}

/// Is `p` the uploader — and does its token still name Binary at all?
fn owns(p: &Principal, binary: &Value) -> bool {
    let names_binary = p
        .scopes
        .iter()
        .any(|s| s.names("Binary") && (s.allows(Perm::Read) || s.allows(Perm::Create)));
    names_binary && binary["securityContext"] == owner(p)
}

/// A message may attach only Binaries its writer may read (its own uploads, or ones already
/// shared with it): otherwise attaching a Binary id learnt elsewhere would open it to the writer.
/// `fresh` are the Binaries created in the same transaction.
pub async fn check_attachments(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    value: &Value,
    fresh: &std::collections::HashSet<String>,
) -> Result<(), FhirError> {
    let (registry, base) = (&state.store.registry, &state.settings.base_url);
    let Some(param) = registry.get(res_type, "attachment") else {
        return Ok(());
    };
    // Only the attachment parameter's values (the whole index is drafted once, later).
    let mut attached = Vec::new();
    crate::search::index::param_entries(param, value, base, &mut attached);
    for e in attached {
        let crate::search::index::Entry::Token { code, .. } = e else {
            continue;
        };
        let local = code
            .strip_prefix(base.as_str())
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(&code);
        let Some(id) = local
            .strip_prefix("Binary/")
            .and_then(|r| r.split('/').next())
        else {
            continue; // an attachment stored elsewhere
        };
        if fresh.contains(id) {
            continue;
        }
        if read(state, p, "Binary", id, None).await.is_err() {
            return Err(FhirError::at(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{res_type}.payload.content"),
                format!("the attachment Binary/{id} is not one this token may read"),
            ));
        }
    }
    Ok(())
}

/// Confines a search to what `p` may search.
pub fn confine(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    search: &mut SearchRequest,
) -> Result<(), FhirError> {
    if let Access::Only(c) = decide(state, p, res_type, Perm::Search)? {
        search.confine(c);
    }
    Ok(())
}

/// Runs a search as `p`: the grant is part of the SQL (so `_total` and paging see only what `p`
/// may see), and every `_include`/`_revinclude` result is checked on its own.
pub async fn search(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    mut search: SearchRequest,
) -> Result<SearchPage, FhirError> {
    confine(state, p, res_type, &mut search)?;
    if !search.includes.is_empty() {
        // Each level of an include (and of :iterate) reaches only what `p` may see.
        let mut reach = std::collections::HashMap::new();
        for t in crate::fhir::TYPES.iter().filter(|t| t.searchable) {
            if let Ok(a) = decide(state, p, t.name, Perm::Read)
                .or_else(|_| decide(state, p, t.name, Perm::Search))
            {
                reach.insert(
                    t.name.to_string(),
                    match a {
                        Access::All => None,
                        Access::Only(c) => Some(c),
                    },
                );
            }
        }
        search.include_access = Some(reach);
    }
    let store = state.store.clone();
    let rt = res_type.to_string();
    let mut page = blocking(move || Ok(store.search(&rt, &search)?)).await?;
    page.included.retain(|s| may_see(state, p, s));
    Ok(page)
}

/// May `p` write this body (`perm` Create or Update; `None` for a delete)? Returns the condition
/// the stored version being replaced or deleted must also meet (checked inside the write's
/// transaction), or `None` when the grant reaches every resource of the type.
pub fn write_guard(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    perm: Perm,
    body: Option<&Value>,
) -> Result<Option<Condition>, FhirError> {
    // Who a Group or CareTeam reaches decides who reads what is sent to it: membership is kept
    // by the EHR integration (a system client), never by a signed-in user or a patient app, who
    // could otherwise add themself to a group and read its messages.
    // (An app in a patient's context with no user is no such client, even without a user.)
    if matches!(res_type, "Group" | "CareTeam")
        && (p.kind() != crate::auth::SubjectKind::System
            || policy::patient_bound(p, res_type).is_some())
    {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{res_type} membership is managed by the EHR integration (a system client); a user's token cannot change it"),
        ));
    }
    let guard = match policy::check_write(
        p,
        &state.store.registry,
        &state.settings.base_url,
        res_type,
        perm,
        body,
    ) {
        Ok(Access::All) => None,
        Ok(Access::Only(c)) => Some(c),
        Err(d) => return Err(forbidden(d)),
    };
    // The messaging rules after the access decision: a caller refused access learns nothing
    // from them.
    if let Some(b) = body {
        crate::messaging::rules::check(&state.settings, p, res_type, b)?;
    }
    // A user changes or deletes only the messages they sent, and the requests they made (a
    // recipient may not rewrite one, nor make itself its author); any other stored version is,
    // to them, not there (404).
    let authors: &[&str] = match res_type {
        "Communication" => &["sender"],
        "CommunicationRequest" => &["requester", "sender"],
        _ => &[],
    };
    if !authors.is_empty() && matches!(perm, Perm::Update | Perm::Delete) {
        // An app in a patient's context with no user writes as the patient.
        if let Some(me) = crate::messaging::rules::acting_as(p, res_type) {
            if let Some((t, id)) = me.split_once('/') {
                let mine: Vec<Vec<Condition>> = authors
                    .iter()
                    .filter_map(|code| state.store.registry.get(res_type, code))
                    .map(|param| {
                        vec![Condition::Reference {
                            key: param.key.clone(),
                            values: vec![crate::search::index::RefParts {
                                target_type: Some(t.to_string()),
                                target_id: Some(id.to_string()),
                                url: None,
                            }],
                        }]
                    })
                    .collect();
                let mine = Condition::AnyOf(mine);
                return Ok(Some(match guard {
                    Some(g) => Condition::AnyOf(vec![vec![g, mine]]),
                    None => mine,
                }));
            }
        }
    }
    Ok(guard)
}

/// What the steps before a write decided: the body to write, the access condition the version
/// being replaced must still meet, and whether an update may create.
pub struct BeforeWrite {
    pub body: Value,
    pub guard: Option<Condition>,
    pub may_create: bool,
}

/// The steps before every write of a body, in one place — REST create, update and patch, and
/// every POST/PUT entry of a transaction or batch go through it, in this order:
/// 1. a Binary is stamped with its owner (`securityContext`);
/// 2. the access policy decides ([`write_guard`]); an update may create only for a system token
///    that may also create (to a user, an unused id and a hidden one both answer 404);
/// 3. attachments must be the writer's to attach ([`check_attachments`]; `fresh_binaries`: those
///    written earlier in the same transaction);
/// 4. the messaging rules prepare a message ([`crate::messaging::rules::prepare`]: sender,
///    thread, staff-only label; `fresh_messages`: messages earlier in the same transaction).
#[allow(clippy::too_many_arguments)]
pub async fn before_write(
    state: &AppState,
    p: &Principal,
    res_type: &str,
    perm: Perm,
    mut body: Value,
    replaces: Option<&str>,
    fresh_binaries: &std::collections::HashSet<String>,
    fresh_messages: &std::collections::HashMap<String, bool>,
) -> Result<BeforeWrite, FhirError> {
    if res_type == "Binary" {
        stamp_owner(state, p, &mut body);
    }
    let guard = write_guard(state, p, res_type, perm, Some(&body))?;
    let may_create = perm == Perm::Update
        && p.kind() == crate::auth::SubjectKind::System
        && write_guard(state, p, res_type, Perm::Create, Some(&body)).is_ok();
    check_attachments(state, p, res_type, &body, fresh_binaries).await?;
    crate::messaging::rules::prepare(state, p, res_type, &mut body, replaces, fresh_messages)
        .await?;
    Ok(BeforeWrite {
        body,
        guard,
        may_create,
    })
}
