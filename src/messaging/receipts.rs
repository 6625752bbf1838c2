//! Per-recipient delivery and read receipts.
//!
//! - `POST /Communication/{id}/$mark-delivered`, `POST /Communication/{id}/$mark-read`: the
//!   signed-in user marks a message addressed to them (read implies delivered; a time once set is
//!   never moved). Only a recipient named in `Communication.recipient` may; nobody sets a receipt
//!   for someone else.
//! - `GET /Communication/{id}/$receipts`: the sender (or a system client) sees every recipient's
//!   receipt; a recipient sees only their own.
//! - `GET /Communication/$unread`: the signed-in user's unread messages, counted in total, urgent
//!   (priority urgent/asap/stat) and per thread (`partOf`), and the newest 100 by reference, from
//!   the search index and the receipt table (no message is decrypted or scanned).
//!
//! Receipts are stored by Courier (a Communication has one `received` time, not one per
//! recipient), change the message's event stream (`receipt` events reach the sender's and the
//! recipient's sockets), and are audited.

use crate::api::AppState;
use crate::api::{audit_context, audited_answer, blocking, Res};
use crate::audit::Interaction;
use crate::auth::scopes::Perm;
use crate::auth::{Principal, SubjectKind};
use crate::clock::now_micros;
use crate::fhir::access;
use crate::fhir::outcome::FhirError;
use crate::messaging::events::{self, Kind};
use crate::search::dates::format_instant;
use crate::store::db::Conn;
use crate::store::{Store, StoreError};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};

#[derive(Debug, Clone, QueryableByName)]
pub struct Receipt {
    #[diesel(sql_type = Text)]
    pub comm_id: String,
    #[diesel(sql_type = Text)]
    pub recipient: String,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub delivered_at: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub read_at: Option<i64>,
}

impl Receipt {
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "communication": {"reference": format!("Communication/{}", self.comm_id)},
            "recipient": {"reference": self.recipient},
        });
        if let Some(t) = self.delivered_at {
            v["delivered"] = format_instant(t).into();
        }
        if let Some(t) = self.read_at {
            v["read"] = format_instant(t).into();
        }
        v
    }

    /// As a `Parameters.parameter` with parts.
    fn to_parameter(&self) -> Value {
        let mut part =
            vec![json!({"name": "recipient", "valueReference": {"reference": self.recipient}})];
        if let Some(t) = self.delivered_at {
            part.push(json!({"name": "delivered", "valueInstant": format_instant(t)}));
        }
        if let Some(t) = self.read_at {
            part.push(json!({"name": "read", "valueInstant": format_instant(t)}));
        }
        json!({"name": "receipt", "part": part})
    }
}

pub fn get(store: &Store, comm_id: &str, recipient: &str) -> Result<Option<Receipt>, StoreError> {
    let rows: Vec<Receipt> = store.query(
        "SELECT comm_id, recipient, delivered_at, read_at FROM receipts WHERE comm_id = ? AND recipient = ?",
        vec![comm_id.into(), recipient.into()],
    )?;
    Ok(rows.into_iter().next())
}

fn for_message(store: &Store, comm_id: &str) -> Result<Vec<Receipt>, StoreError> {
    store.query(
        "SELECT comm_id, recipient, delivered_at, read_at FROM receipts WHERE comm_id = ? ORDER BY recipient",
        vec![comm_id.into()],
    )
}

/// Inside the receipt's transaction: sets delivered (and read) unless already set, and logs a
/// `receipt` event when something changed. The message must still exist.
pub fn apply<C: Conn>(
    c: &mut C,
    comm_id: &str,
    recipient: &str,
    read: bool,
) -> Result<(Receipt, bool), StoreError> {
    #[derive(QueryableByName)]
    struct Live {
        #[diesel(sql_type = BigInt)]
        version_id: i64,
    }
    let live: Vec<Live> = c.load(
        "SELECT version_id FROM resources WHERE res_type = 'Communication' AND fhir_id = ? AND deleted = 0",
        vec![comm_id.into()],
    )?;
    let Some(live) = live.into_iter().next() else {
        return Err(StoreError::NotFound("Communication".into(), comm_id.into()));
    };
    // The row exists (empty) and is locked before it is read, so two marks at once (delivered
    // and read) serialise instead of both inserting.
    c.execute(
        "INSERT INTO receipts (comm_id, recipient) VALUES (?, ?) ON CONFLICT (comm_id, recipient) DO NOTHING",
        vec![comm_id.into(), recipient.into()],
    )?;
    let lock = if c.is_postgres() { " FOR UPDATE" } else { "" };
    let before: Option<Receipt> = c
        .load(
            &format!("SELECT comm_id, recipient, delivered_at, read_at FROM receipts WHERE comm_id = ? AND recipient = ?{lock}"),
            vec![comm_id.into(), recipient.into()],
        )?
        .into_iter()
        .next()
        .filter(|r: &Receipt| r.delivered_at.is_some() || r.read_at.is_some());
    let now = now_micros();
    let mut after = before.clone().unwrap_or(Receipt {
        comm_id: comm_id.into(),
        recipient: recipient.into(),
        delivered_at: None,
        read_at: None,
    });
    after.delivered_at.get_or_insert(now);
    if read {
        after.read_at.get_or_insert(now);
    }
    if read {
        // Read again: the user's own "mark unread" flag is cleared.
        c.execute(
            "UPDATE receipts SET unread_mark = NULL WHERE comm_id = ? AND recipient = ? AND unread_mark IS NOT NULL",
            vec![comm_id.into(), recipient.into()],
        )?;
    }
    let changed = before.as_ref().map(|b| (b.delivered_at, b.read_at))
        != Some((after.delivered_at, after.read_at));
    if changed {
        c.execute(
            "UPDATE receipts SET delivered_at = ?, read_at = ? WHERE comm_id = ? AND recipient = ?",
            vec![
                after.delivered_at.into(),
                after.read_at.into(),
                comm_id.into(),
                recipient.into(),
            ],
        )?;
        events::record(
            c,
            Kind::Receipt,
            "Communication",
            comm_id,
            live.version_id,
            Some(recipient.into()),
        )?;
    }
    Ok((after, changed))
}

/// Sets a receipt in a transaction of its own, serialised with the resource writes on SQLite;
/// its event commits with it.
pub fn mark_receipt(
    store: &Store,
    comm_id: &str,
    recipient: &str,
    read: bool,
) -> Result<(Receipt, bool), StoreError> {
    let _writer = store.exclusive_writer();
    let mut c = store.db.get()?;
    let r = crate::with_conn!(c, |c| c.write_tx(|c| apply(c, comm_id, recipient, read)));
    store.notify_changed();
    r
}

/// The references of a Communication's recipients, as `Type/id` of this server.
fn recipients(msg: &Value, base: &str) -> Vec<String> {
    msg["recipient"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["reference"].as_str())
                .map(|r| super::hub::local_ref(r, base))
                .collect()
        })
        .unwrap_or_default()
}

fn sender(msg: &Value, base: &str) -> Option<String> {
    msg["sender"]["reference"]
        .as_str()
        .map(|r| super::hub::local_ref(r, base))
}

fn user_of(p: &Principal) -> Result<String, FhirError> {
    p.fhir_user.clone().ok_or_else(|| {
        FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "receipts belong to users: this token speaks for no user (fhirUser)",
        )
    })
}

use crate::api::parameters;

async fn load_message(state: &AppState, p: &Principal, id: &str) -> Result<Value, FhirError> {
    let s = access::read(state, p, "Communication", id, None).await?;
    serde_json::from_slice(s.body.as_deref().unwrap_or_default()).map_err(|_| FhirError::internal())
}

pub async fn mark_delivered(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    mark(state, req, path.into_inner(), Mark::Delivered).await
}

pub async fn mark_read(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    mark(state, req, path.into_inner(), Mark::Read).await
}

/// What a recipient sets on a message for themself.
#[derive(Clone, Copy)]
enum Mark {
    Delivered,
    Read,
    Unread,
}

async fn mark(
    state: web::Data<AppState>,
    req: HttpRequest,
    id: String,
    what: Mark,
) -> HttpResponse {
    let ctx = audit_context(&req, &state);
    let result = mark_inner(&state, &req, &id, what).await;
    let patient = result.as_ref().ok().and_then(|(_, p)| p.clone());
    let result = result.map(|(r, _)| r);
    crate::api::answer_audited(
        &state,
        &ctx,
        Interaction::Operation,
        Some(format!("Communication/{id}")),
        patient,
        result,
    )
    .await
}

async fn mark_inner(
    state: &web::Data<AppState>,
    req: &HttpRequest,
    id: &str,
    what: Mark,
) -> Result<(HttpResponse, Option<String>), FhirError> {
    let p = access::principal(req)?;
    let user = user_of(&p)?;
    let msg = load_message(state, &p, id).await?;
    // A receipt changes what others see and do (the sender sees "read"; an urgent message's
    // reminder stops, so no one else is paged): a token that may only read messages cannot set
    // one (an outside probe marked read with a read-only token, as a session has before its
    // second factor).
    if access::decide(state, &p, "Communication", Perm::Update).is_err() {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "setting a receipt needs a grant to update Communications (this token may only read them)",
        ));
    }
    let base = &state.settings.base_url;
    let to = recipients(&msg, base);
    if !to.iter().any(|r| *r == user || p.groups.contains(r)) {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only a recipient of this message may set its receipt, and only their own",
        ));
    }
    if matches!(
        msg["status"].as_str(),
        Some("preparation" | "entered-in-error")
    ) {
        return Err(FhirError::new(
            StatusCode::CONFLICT,
            "business-rule",
            "a draft or a recalled message has no receipts",
        ));
    }
    let store = state.store.clone();
    let (cid, u) = (id.to_string(), user.clone());
    let answer = match what {
        Mark::Unread => {
            blocking(move || {
                // A message with no receipt yet is unread already.
                store.execute(
                    "UPDATE receipts SET unread_mark = ? WHERE comm_id = ? AND recipient = ?",
                    vec![now_micros().into(), cid.into(), u.into()],
                )?;
                Ok(())
            })
            .await?;
            parameters(vec![json!({"name": "unread", "valueBoolean": true})])
        }
        Mark::Delivered | Mark::Read => {
            let read = matches!(what, Mark::Read);
            let (receipt, _) = blocking(move || Ok(mark_receipt(&store, &cid, &u, read)?)).await?;
            parameters(vec![receipt.to_parameter()])
        }
    };
    Ok((answer, crate::audit::patient_of(&msg)))
}

/// `POST /Communication/{id}/$mark-unread`: the recipient's own flag — the message counts as
/// unread for them again (in `$unread`) until they read it again. Its sender's read receipt is
/// left as it was: the message was read.
pub async fn mark_unread(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    mark(state, req, path.into_inner(), Mark::Unread).await
}

/// `GET /Communication/{id}/$receipts`
pub async fn list(
    state: web::Data<AppState>,
    req: HttpRequest,
    path: web::Path<String>,
) -> HttpResponse {
    let id = path.into_inner();
    let result = list_inner(&state, &req, &id).await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        format!("Communication/{id}"),
        result,
    )
    .await
}

async fn list_inner(state: &web::Data<AppState>, req: &HttpRequest, id: &str) -> Res {
    let p = access::principal(req)?;
    let msg = load_message(state, &p, id).await?;
    let base = &state.settings.base_url;
    let me = p.fhir_user.clone();
    let everyone = p.kind() == SubjectKind::System || me.is_some() && me == sender(&msg, base);
    let to = recipients(&msg, base);
    let addressed =
        me.as_ref().is_some_and(|u| to.contains(u)) || to.iter().any(|r| p.groups.contains(r));
    if !everyone && !addressed {
        return Err(FhirError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "receipts are shown to the message's sender, and to each recipient their own",
        ));
    }
    let store = state.store.clone();
    let cid = id.to_string();
    let all = blocking(move || Ok(for_message(&store, &cid)?)).await?;
    let shown: Vec<Value> = all
        .iter()
        .filter(|r| everyone || Some(&r.recipient) == me.as_ref())
        .map(Receipt::to_parameter)
        .collect();
    // When a patient received and read a message is theirs: the answer is in their accounting
    // of disclosures (an outside probe found it in no patient's trail).
    let disclosed = crate::audit::patients_of(std::iter::once(&msg), base);
    let mut answer = parameters(shown);
    answer
        .extensions_mut()
        .insert(crate::api::Disclosed(disclosed));
    Ok(answer)
}

#[derive(QueryableByName)]
struct UnreadRow {
    #[diesel(sql_type = BigInt)]
    rid: i64,
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Nullable<Text>)]
    thread: Option<String>,
    #[diesel(sql_type = BigInt)]
    urgent: i64,
    /// Selected for the ORDER BY of a DISTINCT query (PostgreSQL requires it in the list).
    #[diesel(sql_type = BigInt)]
    #[allow(dead_code)]
    at: i64,
}

/// At most this many unread messages are listed by reference (all are counted).
const MAX_LISTED: usize = 100;

/// Priorities that make a message urgent (everything but `routine`).
pub const URGENT: [&str; 3] = ["urgent", "asap", "stat"];

/// `GET /Communication/$unread`
pub async fn unread(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let result = unread_inner(&state, &req).await;
    audited_answer(
        &state,
        &req,
        Interaction::Operation,
        "Communication/$unread".into(),
        result,
    )
    .await
}

async fn unread_inner(state: &web::Data<AppState>, req: &HttpRequest) -> Res {
    let p = access::principal(req)?;
    let user = user_of(&p)?;
    // Counting what one may not read would still tell something: read permission is required,
    // and a confined grant (e.g. a scope limited to a category) counts only what it admits.
    let access = access::decide(state, &p, "Communication", Perm::Read)?;
    let store = state.store.clone();
    let groups = p.groups.clone();
    let rows = blocking(move || {
        let rows = unread_messages(&store, &user, &groups)?;
        match &access {
            access::Access::All => Ok(rows),
            access::Access::Only(c) => {
                let rids: Vec<i64> = rows.iter().map(|r| r.rid).collect();
                let admitted = store.admitted_rids(&rids, c)?;
                Ok(rows
                    .into_iter()
                    .filter(|r| admitted.contains(&r.rid))
                    .collect())
            }
        }
    })
    .await?;
    // One message may sit in one thread (partOf); a message counts once.
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut urgent) = (0i64, 0i64);
    // Per thread: unread, urgent, and whether its header is among the unread.
    let mut threads: std::collections::BTreeMap<String, (i64, i64, bool)> = Default::default();
    let mut listed = vec![];
    for r in &rows {
        // A thread's header (no partOf) counts in its own thread (and says so: an app that
        // shows the header as the thread's title marks it read with the thread).
        let thread = r
            .thread
            .clone()
            .unwrap_or_else(|| format!("Communication/{}", r.id));
        let e = threads.entry(thread).or_default();
        e.0 += 1;
        e.1 += r.urgent;
        e.2 |= r.thread.is_none();
        if seen.insert(r.rid) {
            total += 1;
            urgent += r.urgent;
            if listed.len() < MAX_LISTED {
                listed.push(json!({"name": "message", "valueReference": {"reference": format!("Communication/{}", r.id)}}));
            }
        }
    }
    let mut params = vec![
        json!({"name": "unread", "valueInteger": total}),
        json!({"name": "urgent", "valueInteger": urgent}),
    ];
    for (t, (n, u, header)) in threads {
        params.push(json!({"name": "thread", "part": [
            {"name": "thread", "valueReference": {"reference": t}},
            {"name": "unread", "valueInteger": n},
            {"name": "urgent", "valueInteger": u},
            {"name": "header", "valueBoolean": header},
        ]}));
    }
    params.extend(listed);
    Ok(parameters(params))
}

/// The SQL of [`unread_messages`] for `targets` addressees (binds: priority key, user, part-of
/// key, recipient key, then the id of each addressee, then id and type per addressee, then status
/// key). The `|| ''` on the parameter in the per-message EXISTS keeps SQLite (which has no
/// statistics) on the (rid, param) index: through the (param, code) index it would read every
/// urgent (or withdrawn) message of the store for each unread one. The ids are listed with `IN`
/// before the (id, type) pairs are checked: SQLite reads `param = ? AND (pair OR pair)` as a
/// scan of every recipient entry of the store, `param = ? AND target_id IN (…)` as one range per id.
pub fn unread_sql(targets: usize) -> String {
    let addressed = vec!["(x.target_id = ? AND x.target_type = ?)"; targets].join(" OR ");
    let ids = vec!["?"; targets].join(", ");
    let thread_type = crate::search::names::type_sql("p.target_type");
    format!(
        "SELECT DISTINCT r.rid, r.fhir_id AS id, {thread_type} || '/' || p.target_id AS thread, \
         CAST(CASE WHEN EXISTS (SELECT 1 FROM idx_token pr WHERE pr.rid = r.rid AND pr.param || '' = ? AND pr.code IN ('urgent', 'asap', 'stat')) THEN 1 ELSE 0 END AS BIGINT) AS urgent, \
         r.last_updated AS at \
         FROM idx_ref x JOIN resources r ON r.rid = x.rid \
         LEFT JOIN receipts rc ON rc.comm_id = r.fhir_id AND rc.recipient = ? \
         LEFT JOIN idx_ref p ON p.rid = r.rid AND p.param = ? AND p.url IS NULL \
         WHERE x.param = ? AND x.target_id IN ({ids}) AND ({addressed}) AND x.url IS NULL \
         AND r.res_type = 'Communication' AND r.deleted = 0 AND (rc.read_at IS NULL OR rc.unread_mark IS NOT NULL) \
         AND NOT EXISTS (SELECT 1 FROM idx_token s WHERE s.rid = r.rid AND s.param || '' = ? AND s.code IN ('preparation', 'entered-in-error')) \
         ORDER BY at DESC, r.rid DESC"
    )
}

/// Unread messages addressed directly to `user`, grouped by thread. Index lookups only: the
/// recipient index finds the user's messages, the receipt's primary key tells which were read.
fn unread_messages(
    store: &Store,
    user: &str,
    groups: &[String],
) -> Result<Vec<UnreadRow>, StoreError> {
    // Addressed to the user, or to a Group or CareTeam they are a member of.
    let targets: Vec<(&str, &str)> = std::iter::once(user)
        .chain(groups.iter().map(String::as_str))
        .filter_map(|r| r.split_once('/'))
        .collect();
    if targets.is_empty() {
        return Ok(vec![]);
    }
    let key = |code: &str| store.registry.index_name("Communication", code);
    // One row per unread message and thread (a message to the user and to their group is one
    // message), newest first.
    let sql = unread_sql(targets.len());
    let mut binds: Vec<crate::store::db::Bind> = vec![
        key("priority").into(),
        user.into(),
        key("part-of").into(),
        key("recipient").into(),
    ];
    for (_, id) in &targets {
        binds.push((*id).into());
    }
    for (t, id) in targets {
        binds.push(id.into());
        binds.push(crate::search::names::ty(t).into());
    }
    binds.push(key("status").into());
    store.query(&sql, binds)
}

/// Erasure (the store's erase hook): the receipts of these Communications.
pub fn erase<C: Conn>(c: &mut C, ids: &[&str]) -> Result<(), StoreError> {
    let marks = vec!["?"; ids.len()].join(", ");
    c.execute(
        &format!("DELETE FROM receipts WHERE comm_id IN ({marks})"),
        ids.iter().map(|i| (*i).into()).collect(),
    )?;
    Ok(())
}
