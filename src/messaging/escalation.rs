//! Escalation of unread urgent messages, run by the leader (see `dispatch`).
//!
//! A Communication with priority urgent, asap or stat, status completed, that a recipient (named
//! directly) has not read:
//! - after `escalation_renotify_secs` Courier creates a CommunicationRequest about it, addressed to
//!   that recipient — the reminder — and updates it every further `escalation_renotify_secs`
//!   (each update is a new version: the reminders are the request's history);
//! - after `escalation_after_secs` unread, the request also names the configured backup
//!   recipient (`escalation_backup`), who is notified like any recipient;
//! - when the recipient is away (out-of-office, `away.rs`), the first request already names their
//!   delegate (else the backup);
//! - once the recipient reads the message the request is `completed`; if the message is withdrawn
//!   (entered-in-error) or deleted it is `revoked`.
//!
//! The request carries identifier `urn:courier:escalation|<message id>:<recipient>`, category
//! `https://courier.example.org/fhir/CodeSystem/escalation#unread-urgent`, `about` the message, and
//! the extension `https://courier.example.org/fhir/StructureDefinition/escalation` (recipient,
//! reminders, lastReminder, escalatedTo, escalatedAt). It is written through the one write path, so
//! it is versioned, audited and pushed to the sockets of those it names.

use crate::audit;
use crate::clock::now_micros;
use crate::config::Settings;
use crate::search::dates::format_instant;
use crate::store::{Incoming, Store, StoreError, WriteOp};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};

pub const IDENTIFIER_SYSTEM: &str = "urn:courier:escalation";
pub const CATEGORY_SYSTEM: &str = "https://courier.example.org/fhir/CodeSystem/escalation";
pub const EXTENSION: &str = "https://courier.example.org/fhir/StructureDefinition/escalation";
/// Messages older than this are not considered (bounds the scan of urgent messages).
const HORIZON_SECS: i64 = 7 * 24 * 3600;

/// The urgent, completed messages still unread by a recipient (binds: priority key, recipient
/// key, due before, horizon, status key).
///
/// Driven from the urgent-priority tokens (few), in this order: CROSS JOIN fixes SQLite's join
/// order; PostgreSQL plans it as an inner join. The `|| ''` on the status parameter keeps
/// SQLite (which has no statistics) from answering the EXISTS through the (param, code) index,
/// reading every completed message for each candidate: on a store of 1,000,000 messages one
/// pass then ran for more than ten minutes, every second. By rid it is one index probe.
/// Reference rows name a type by its short name (`search::names::TYPES`).
pub static UNREAD_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let recipient = format!(
        "{} || '/' || x.target_id",
        crate::search::names::type_sql("x.target_type")
    );
    let people = [
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
    ]
    .map(|t| format!("'{}'", crate::search::names::ty(t)))
    .join(", ");
    format!("SELECT r.fhir_id AS comm_id, {recipient} AS recipient, r.last_updated AS at \
         FROM idx_token pr CROSS JOIN resources r CROSS JOIN idx_ref x \
         LEFT JOIN receipts rc ON rc.comm_id = r.fhir_id AND rc.recipient = {recipient} \
         WHERE pr.param = ? AND pr.code IN ('urgent', 'asap', 'stat') \
         AND r.rid = pr.rid AND x.rid = r.rid AND x.param = ? AND x.url IS NULL \
         AND r.res_type = 'Communication' AND r.deleted = 0 AND rc.read_at IS NULL \
         AND r.last_updated <= ? AND r.last_updated >= ? \
         AND x.target_type IN ({people}) \
         AND EXISTS (SELECT 1 FROM idx_token s WHERE s.rid = r.rid AND s.param || '' = ? AND s.code = 'completed')")
});

/// Open escalations that are resolved (binds: horizon, status key). The `|| ''` as in
/// [`UNREAD_SQL`].
pub const RESOLVED_SQL: &str = "SELECT e.comm_id, e.recipient, e.request_id, CAST(CASE WHEN rc.read_at IS NOT NULL THEN 1 ELSE 0 END AS BIGINT) AS was_read \
         FROM escalations e \
         LEFT JOIN receipts rc ON rc.comm_id = e.comm_id AND rc.recipient = e.recipient \
         LEFT JOIN resources r ON r.res_type = 'Communication' AND r.fhir_id = e.comm_id \
         WHERE e.done = 0 AND (rc.read_at IS NOT NULL OR r.rid IS NULL OR r.deleted = 1 OR r.last_updated < ? \
         OR NOT EXISTS (SELECT 1 FROM idx_token s WHERE s.rid = r.rid AND s.param || '' = ? AND s.code = 'completed'))";

#[derive(QueryableByName, Debug)]
struct Unread {
    #[diesel(sql_type = Text)]
    comm_id: String,
    #[diesel(sql_type = Text)]
    recipient: String,
    #[diesel(sql_type = BigInt)]
    at: i64,
}

#[derive(QueryableByName, Debug)]
struct Resolved {
    #[diesel(sql_type = Text)]
    comm_id: String,
    #[diesel(sql_type = Text)]
    recipient: String,
    #[diesel(sql_type = Text)]
    request_id: String,
    #[diesel(sql_type = BigInt)]
    was_read: i64,
}

#[derive(QueryableByName, Debug)]
struct Row {
    #[diesel(sql_type = Text)]
    comm_id: String,
    #[diesel(sql_type = Text)]
    recipient: String,
    #[diesel(sql_type = Text)]
    request_id: String,
    #[diesel(sql_type = BigInt)]
    reminders: i64,
    #[diesel(sql_type = BigInt)]
    last_reminder_at: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    escalated_at: Option<i64>,
}

fn ctx(store: &Store) -> audit::Context {
    audit::Context::job(&store.base_url, "escalation")
}

/// What one escalation pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Reminders sent to the recipient of an unread urgent message.
    pub reminders: usize,
    /// Escalations to the backup recipient.
    pub escalations: usize,
    /// Reminder requests closed because their message was read.
    pub closed: usize,
}

/// One pass: reminds (and escalates) every unread urgent message that is due, then closes what
/// is resolved. Blocking.
pub fn run(store: &Store, settings: &Settings) -> Result<Pass, StoreError> {
    let now = now_micros();
    let secs = 1_000_000;
    let due_before = now - settings.escalation_renotify_secs * secs;
    let unread: Vec<Unread> = store.query(
        &UNREAD_SQL,
        vec![
            store
                .registry
                .index_name("Communication", "priority")
                .into(),
            store
                .registry
                .index_name("Communication", "recipient")
                .into(),
            due_before.into(),
            (now - HORIZON_SECS * secs).into(),
            store.registry.index_name("Communication", "status").into(),
        ],
    )?;
    let mut pass = Pass::default();
    for u in unread {
        remind(store, settings, u, now, due_before, &mut pass)?;
    }
    pass.closed = close_resolved(store, now)?;
    Ok(pass)
}

/// One unread urgent message to one recipient: its first reminder, or the next one when due —
/// escalated to the recipient's out-of-office delegate, else the backup, when that is due.
fn remind(
    store: &Store,
    settings: &Settings,
    u: Unread,
    now: i64,
    due_before: i64,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let secs = 1_000_000;
    let existing: Vec<Row> = store.query(
        "SELECT comm_id, recipient, request_id, reminders, last_reminder_at, escalated_at FROM escalations WHERE comm_id = ? AND recipient = ? AND done = 0",
        vec![u.comm_id.clone().into(), u.recipient.clone().into()],
    )?;
    let done_before: Vec<Row> = if existing.is_empty() {
        store.query(
            "SELECT comm_id, recipient, request_id, reminders, last_reminder_at, escalated_at FROM escalations WHERE comm_id = ? AND recipient = ?",
            vec![u.comm_id.clone().into(), u.recipient.clone().into()],
        )?
    } else {
        vec![]
    };
    if !done_before.is_empty() {
        return Ok(()); // closed once: never reopened
    }
    let Ok(msg) = store.read("Communication", &u.comm_id) else {
        return Ok(());
    };
    let msg: Value =
        serde_json::from_slice(msg.body.as_deref().unwrap_or_default()).unwrap_or(Value::Null);
    // Someone away (out-of-office) is not reminded in vain: it goes to their delegate (else
    // the backup) at once.
    let away = super::away::away(store, &u.recipient, now)?;
    let escalate = match &away {
        Some(a) => a.delegate.clone().or(settings.escalation_backup.clone()),
        None => settings
            .escalation_backup
            .clone()
            .filter(|_| now - u.at >= settings.escalation_after_secs * secs),
    }
    .filter(|b| *b != u.recipient);
    match existing.into_iter().next() {
        None => first_reminder(store, &u, &msg, now, escalate.as_deref(), pass),
        Some(row) if row.last_reminder_at <= due_before => {
            next_reminder(store, settings, row, &msg, now, escalate, pass)
        }
        Some(_) => Ok(()),
    }
}

/// The first reminder: a CommunicationRequest (conditional on its identifier, so a crash between
/// it and its row never makes a second one) and the escalation row.
fn first_reminder(
    store: &Store,
    u: &Unread,
    msg: &Value,
    now: i64,
    escalate: Option<&str>,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let id = crate::fhir::rest::new_id();
    let (cr, escalated_to) = request(store, &id, msg, &u.recipient, 1, now, escalate, None);
    // Conditional on the identifier: after a crash between the request and its row,
    // the next pass finds the request instead of making a second one.
    // Also (a second layer, since no client may write that identifier) its category and
    // recipient: a request planted with the identifier alone, before clients were refused it,
    // is not taken for the reminder.
    let identifier = format!("{IDENTIFIER_SYSTEM}|{}:{}", u.comm_id, u.recipient);
    let category = format!("{CATEGORY_SYSTEM}|unread-urgent");
    let cond = super::condition(
        store,
        "CommunicationRequest",
        &[
            ("identifier", &identifier),
            ("category", &category),
            ("recipient", &u.recipient),
        ],
    )?;
    let written = store.write(
        vec![WriteOp::Create {
            res_type: "CommunicationRequest".into(),
            id: id.clone(),
            resource: Incoming::from_value(cr),
            if_none_exist: Some(cond),
        }],
        &ctx(store),
    )?;
    let id = written.first().map(|w| w.stored.id.clone()).unwrap_or(id);
    store.execute(
        "INSERT INTO escalations (comm_id, recipient, request_id, reminders, last_reminder_at, escalated_at) VALUES (?, ?, ?, 1, ?, ?)",
        vec![u.comm_id.clone().into(), u.recipient.clone().into(), id.into(), now.into(), escalated_to.then_some(now).into()],
    )?;
    pass.reminders += 1;
    pass.escalations += escalated_to as usize;
    Ok(())
}

/// A later reminder, escalated once when due (never twice).
fn next_reminder(
    store: &Store,
    settings: &Settings,
    row: Row,
    msg: &Value,
    now: i64,
    escalate: Option<String>,
    pass: &mut Pass,
) -> Result<(), StoreError> {
    let escalate = if row.escalated_at.is_some() {
        None
    } else {
        escalate
    };
    let (cr, now_escalated) = request(
        store,
        &row.request_id,
        msg,
        &row.recipient,
        row.reminders + 1,
        now,
        escalate
            .as_deref()
            .or(row.escalated_at.and(settings.escalation_backup.as_deref())),
        row.escalated_at,
    );
    update(store, &row.request_id, cr)?;
    let newly = now_escalated && row.escalated_at.is_none();
    store.execute(
        "UPDATE escalations SET reminders = ?, last_reminder_at = ?, escalated_at = ? WHERE comm_id = ? AND recipient = ?",
        vec![
            (row.reminders + 1).into(),
            now.into(),
            row.escalated_at.or(newly.then_some(now)).into(),
            row.comm_id.into(),
            row.recipient.into(),
        ],
    )?;
    pass.reminders += 1;
    pass.escalations += newly as usize;
    Ok(())
}

/// Closes what is resolved — read by its recipient, the message withdrawn, deleted or past the
/// horizon. Returns how many.
fn close_resolved(store: &Store, now: i64) -> Result<usize, StoreError> {
    let secs = 1_000_000;
    let mut closed = 0;
    // Found in SQL, so open escalations cost nothing per pass while they stay open.
    let resolved: Vec<Resolved> = store.query(
        RESOLVED_SQL,
        vec![
            (now - HORIZON_SECS * secs).into(),
            store.registry.index_name("Communication", "status").into(),
        ],
    )?;
    for row in resolved {
        let status = if row.was_read != 0 {
            "completed"
        } else {
            "revoked"
        };
        if let Ok(current) = store.read("CommunicationRequest", &row.request_id) {
            let mut cr: Value = serde_json::from_slice(current.body.as_deref().unwrap_or_default())
                .unwrap_or(Value::Null);
            cr["status"] = json!(status);
            update(store, &row.request_id, cr)?;
        }
        store.execute(
            "UPDATE escalations SET done = 1 WHERE comm_id = ? AND recipient = ?",
            vec![row.comm_id.into(), row.recipient.into()],
        )?;
        closed += 1;
    }
    Ok(closed)
}

fn write(store: &Store, op: WriteOp) -> Result<(), StoreError> {
    store.write(vec![op], &ctx(store)).map(|_| ())
}

fn update(store: &Store, id: &str, cr: Value) -> Result<(), StoreError> {
    write(
        store,
        WriteOp::Update {
            res_type: "CommunicationRequest".into(),
            id: id.into(),
            resource: Incoming::from_value(cr),
            if_match: None,
            upsert: false,
            patch: false,
            guard: None,
            may_create: false,
        },
    )
}

/// Courier's marks of an escalation on a CommunicationRequest: its [`EXTENSION`] and the
/// categories in [`CATEGORY_SYSTEM`] (empty on any other request). Only Courier writes them: one
/// put by a client would page a clinician, through quiet hours, as if a message were waiting.
pub fn marks(v: &Value) -> Vec<Value> {
    let ext = v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == EXTENSION);
    let categories = v["category"].as_array().into_iter().flatten().filter(|c| {
        c["coding"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|k| k["system"] == CATEGORY_SYSTEM)
    });
    ext.chain(categories).cloned().collect()
}

/// The CommunicationRequest that records (and notifies) an escalation. Returns it and whether it
/// names the backup.
#[allow(clippy::too_many_arguments)]
fn request(
    store: &Store,
    id: &str,
    msg: &Value,
    recipient: &str,
    reminders: i64,
    now: i64,
    backup: Option<&str>,
    escalated_at: Option<i64>,
) -> (Value, bool) {
    let comm_id = msg["id"].as_str().unwrap_or_default();
    let mut recipients = vec![json!({"reference": recipient})];
    let mut ext = vec![
        json!({"url": "recipient", "valueReference": {"reference": recipient}}),
        json!({"url": "reminders", "valueInteger": reminders}),
        json!({"url": "lastReminder", "valueDateTime": format_instant(now)}),
    ];
    if let Some(b) = backup {
        recipients.push(json!({"reference": b}));
        ext.push(json!({"url": "escalatedTo", "valueReference": {"reference": b}}));
        ext.push(json!({"url": "escalatedAt", "valueDateTime": format_instant(escalated_at.unwrap_or(now))}));
    }
    let mut cr = json!({
        "resourceType": "CommunicationRequest",
        "id": id,
        "extension": [{"url": EXTENSION, "extension": ext}],
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": format!("{comm_id}:{recipient}")}],
        "status": "active",
        "category": [{"coding": [{"system": CATEGORY_SYSTEM, "code": "unread-urgent", "display": "Urgent message unread"}]}],
        "priority": msg["priority"],
        "about": [{"reference": format!("Communication/{comm_id}")}],
        "recipient": recipients,
        "requester": {"display": "Courier escalation"},
        "authoredOn": format_instant(now),
        "payload": [{"contentString": "An urgent message is waiting to be read."}],
    });
    // No `subject`: the request would otherwise sit in the patient's compartment and show the
    // patient whether (and when) a clinician read a message — what `$receipts` keeps from them.
    super::staff_only::label_derived(store, "CommunicationRequest", &mut cr, msg);
    (cr, backup.is_some())
}

/// Erasure (the store's erase hook): the escalation state of these messages, or of these
/// escalation requests.
pub fn erase<C: crate::store::db::Conn>(
    c: &mut C,
    res_type: &str,
    ids: &[&str],
) -> Result<(), StoreError> {
    let column = match res_type {
        "Communication" => "comm_id",
        "CommunicationRequest" => "request_id",
        _ => return Ok(()),
    };
    let marks = vec!["?"; ids.len()].join(", ");
    c.execute(
        &format!("DELETE FROM escalations WHERE {column} IN ({marks})"),
        ids.iter().map(|i| (*i).into()).collect(),
    )?;
    Ok(())
}
