//! Scheduled messages (appointment reminders, "your results are ready" notices): an integrator
//! posts a CommunicationRequest with `status=active` and an `occurrenceDateTime`; at that time
//! Courier sends the Communication — `basedOn` the request, its recipients, sender, subject,
//! category, priority and payload — and completes the request. Revoking the request (or putting
//! it on hold, or deleting it) before then cancels the send.
//!
//! - The schedule is kept by the write path, in the request's own transaction (`track`).
//! - Every instance runs the sender; a due row is claimed with a lease (`FOR UPDATE SKIP LOCKED`
//!   on PostgreSQL), so instances share the work without sending twice. The Communication is
//!   created conditionally on `urn:courier:schedule|<request id>`, so an instance that dies after
//!   sending and before recording it cannot cause a second send: the next claimant finds it.
//! - A time missed while Courier was down is sent at start, with the original time recorded in
//!   the extension `https://courier.example.org/fhir/StructureDefinition/scheduled-for`.
//! - Times are instants: `occurrenceDateTime` carries its time-zone offset; a date without a time
//!   is due at 00:00 UTC of that date.
//!
//! - Repeating schedules (medication schedules): `occurrencePeriod` with the `schedule-timing`
//!   extension and the `tz-code` time zone (see `timing`); one schedule row per occurrence, each
//!   sent once (identifier `<request id>@<instant>`); an occurrence missed while a later one is already
//!   due is skipped; the request completes with its last occurrence.

use crate::audit;
use crate::clock::now_micros;
use crate::search::dates::format_instant;
use crate::store::db::Conn;
use crate::store::{Incoming, Store, StoreError, WriteOp, WriteStatus};
use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub const IDENTIFIER_SYSTEM: &str = "urn:courier:schedule";
pub const EXT_SCHEDULED_FOR: &str =
    "https://courier.example.org/fhir/StructureDefinition/scheduled-for";

/// Inside a write's transaction: keeps the schedule rows of a CommunicationRequest in step with
/// it (one per occurrence). Rows already sent are never touched. An active request whose schedule
/// Courier cannot follow is refused (4xx naming the element), so it is never silently unsent.
pub fn track<C: Conn>(
    c: &mut C,
    id: &str,
    status: WriteStatus,
    body: Option<&[u8]>,
) -> Result<(), StoreError> {
    let value: Option<Value> = body.and_then(|b| serde_json::from_slice(b).ok());
    let due = match value.as_ref().filter(|v| v["status"] == "active") {
        Some(v) => super::timing::occurrences(v).map_err(StoreError::Invalid)?,
        None => None,
    };
    match (status, due) {
        (WriteStatus::Created | WriteStatus::Updated, Some(due)) => {
            c.execute(
                "DELETE FROM schedules WHERE request_id = ? AND sent_at IS NULL",
                vec![id.into()],
            )?;
            // One occurrence is number 0 (occurrenceDateTime); a repeating schedule's are numbered
            // by their instant, so an edited schedule keeps what was sent and sends each new
            // instant once.
            let numbered: Vec<(i64, i64)> = if due.len() == 1
                && value
                    .as_ref()
                    .is_some_and(|v| v.get("occurrencePeriod").is_none())
            {
                vec![(0, due[0])]
            } else {
                due.iter().map(|d| (*d, *d)).collect()
            };
            for (n, at) in numbered {
                c.execute(
                    "INSERT INTO schedules (request_id, occurrence, due_at) VALUES (?, ?, ?) \
                     ON CONFLICT (request_id, occurrence) DO NOTHING",
                    vec![id.into(), n.into(), at.into()],
                )?;
            }
        }
        // Completed by the sender itself: the sender records the send.
        (WriteStatus::Updated, None)
            if value.as_ref().is_some_and(|v| v["status"] == "completed") => {}
        (WriteStatus::Existing | WriteStatus::NothingToDelete, _) => {}
        _ => {
            c.execute(
                "DELETE FROM schedules WHERE request_id = ? AND sent_at IS NULL",
                vec![id.into()],
            )?;
        }
    }
    Ok(())
}

/// A due send, as claimed.
#[derive(QueryableByName, Debug)]
pub struct Due {
    #[diesel(sql_type = Text)]
    request_id: String,
    #[diesel(sql_type = BigInt)]
    occurrence: i64,
    #[diesel(sql_type = BigInt)]
    due_at: i64,
}

fn ctx(store: &Store) -> audit::Context {
    audit::Context::job(&store.base_url, "scheduler")
}

/// Claims up to `limit` due sends for `lease` as `instance` and sends them. Blocking. Returns how
/// many were sent.
pub fn run(
    store: &Store,
    instance: &str,
    lease: Duration,
    limit: i64,
) -> Result<usize, StoreError> {
    let mut sent = 0;
    for d in claim(store, instance, lease, limit)? {
        if send(store, &d)? {
            sent += 1;
        }
    }
    Ok(sent)
}

/// Claims up to `limit` due sends for `lease` as `instance`, in time order. Blocking.
pub fn claim(
    store: &Store,
    instance: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Due>, StoreError> {
    let now = now_micros();
    let until = now + lease.as_micros() as i64;
    // A read first: the claim is a write, and most passes find nothing due.
    let due: Vec<Due> = store.query(
        "SELECT request_id, occurrence, due_at FROM schedules WHERE sent_at IS NULL AND due_at <= ? AND claimed_until < ? LIMIT 1",
        vec![now.into(), now.into()],
    )?;
    if due.is_empty() {
        return Ok(vec![]);
    }
    let claimed: Vec<Due> = {
        let _writer = store.exclusive_writer();
        let skip = if store.db.backend_name() == "postgresql" {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        store.query(
            &format!(
                "UPDATE schedules SET claimed_until = ?, claimed_by = ? WHERE (request_id, occurrence) IN (\
                 SELECT request_id, occurrence FROM schedules WHERE sent_at IS NULL AND due_at <= ? AND claimed_until < ? \
                 ORDER BY due_at LIMIT ?{skip}) RETURNING request_id, occurrence, due_at"
            ),
            vec![
                until.into(),
                instance.to_string().into(),
                now.into(),
                now.into(),
                limit.into(),
            ],
        )?
    };
    // In time order (RETURNING has none), so a repeating schedule's doses are judged in order.
    let mut claimed = claimed;
    claimed.sort_by_key(|d| (d.due_at, d.occurrence));
    Ok(claimed)
}

/// Releases the claims `instance` holds on unsent sends: called as an instance starts, when any
/// claim under its id is a previous run's, which died holding it (kill -9, power loss). They are
/// sent at once instead of after their lease. Instance ids must differ between instances running
/// at the same time (`COURIER_INSTANCE_ID`). Blocking; returns how many were released.
pub fn release_own(store: &Store, instance: &str) -> Result<usize, StoreError> {
    store.execute(
        "UPDATE schedules SET claimed_until = 0, claimed_by = NULL WHERE claimed_by = ? AND sent_at IS NULL AND claimed_until > 0",
        vec![instance.to_string().into()],
    )
}

/// Sends one due request (if it is still active) and records it: the message (conditional on
/// its identifier, so a crash between the send and its record never sends twice), the request
/// completed with its last occurrence, the schedule row marked sent.
fn send(store: &Store, d: &Due) -> Result<bool, StoreError> {
    let Some((version, cr)) = still_active(store, d)? else {
        return Ok(false);
    };
    let now = now_micros();
    if missed_for_a_later_one(store, d, now)? {
        return Ok(false);
    }
    let remaining = store.query::<N>(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM schedules WHERE request_id = ? AND occurrence <> ? AND sent_at IS NULL",
        vec![d.request_id.clone().into(), d.occurrence.into()],
    )?[0]
        .n;
    let (msg, ident) = message_for(store, d, &cr, now);
    let mut ops = vec![WriteOp::Create {
        res_type: "Communication".into(),
        id: crate::fhir::rest::new_id(),
        resource: Incoming::from_value(msg),
        // Its identifier, and (a second layer, since no client may write that identifier) that
        // it is based on this request: a message planted with the identifier alone before
        // clients were refused it does not stop the send.
        if_none_exist: Some(super::condition(
            store,
            "Communication",
            &[
                ("identifier", &format!("{IDENTIFIER_SYSTEM}|{ident}")),
                (
                    "based-on",
                    &format!("CommunicationRequest/{}", d.request_id),
                ),
            ],
        )?),
    }];
    if remaining == 0 {
        // The request completes with its last occurrence.
        let mut done = cr.clone();
        done["status"] = json!("completed");
        ops.push(WriteOp::Update {
            res_type: "CommunicationRequest".into(),
            id: d.request_id.clone(),
            resource: Incoming::from_value(done),
            if_match: Some(version),
            upsert: false,
            patch: false,
            guard: None,
            may_create: false,
        });
    } else {
        // Not the last: the request must still be the version read (not revoked meanwhile).
        ops.push(WriteOp::Unchanged {
            res_type: "CommunicationRequest".into(),
            id: d.request_id.clone(),
            version,
        });
    }
    let communication = match store.write(ops, &ctx(store)) {
        Ok(w) => w[0].stored.id.clone(),
        // The request changed meanwhile (revoked, edited): the next pass decides again.
        Err(StoreError::PreconditionFailed(_) | StoreError::Conflict(_)) => {
            store.execute(
                "UPDATE schedules SET claimed_until = 0 WHERE request_id = ? AND occurrence = ? AND sent_at IS NULL",
                vec![d.request_id.clone().into(), d.occurrence.into()],
            )?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    store.execute(
        "UPDATE schedules SET sent_at = ?, communication_id = ? WHERE request_id = ? AND occurrence = ?",
        vec![
            now.into(),
            communication.into(),
            d.request_id.clone().into(),
            d.occurrence.into(),
        ],
    )?;
    Ok(true)
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// The request (its version and body) if it is still active; otherwise its unsent schedule rows
/// go and `None`.
fn still_active(store: &Store, d: &Due) -> Result<Option<(i64, Value)>, StoreError> {
    let request = match store.read("CommunicationRequest", &d.request_id) {
        Ok(s) => Some(s),
        Err(StoreError::NotFound(..) | StoreError::Gone(..)) => None,
        Err(e) => return Err(e),
    };
    let active = match &request {
        Some(r) => {
            let cr: Value = serde_json::from_slice(r.body.as_deref().unwrap_or_default())
                .map_err(|e| StoreError::Other(e.into()))?;
            (cr["status"] == "active").then_some((r.version_id, cr))
        }
        None => None,
    };
    if active.is_none() {
        store.execute(
            "DELETE FROM schedules WHERE request_id = ? AND sent_at IS NULL",
            vec![d.request_id.clone().into()],
        )?;
    }
    Ok(active)
}

/// A repeating schedule's occurrence missed while a later one is also due (downtime) is skipped
/// (marked sent): one "take your 14:00 dose" at 15:00, not a burst of every dose missed.
fn missed_for_a_later_one(store: &Store, d: &Due, now: i64) -> Result<bool, StoreError> {
    if d.occurrence == 0 {
        return Ok(false);
    }
    let later: Vec<N> = store.query(
        "SELECT occurrence AS n FROM schedules WHERE request_id = ? AND occurrence > ? AND due_at <= ? LIMIT 1",
        vec![d.request_id.clone().into(), d.occurrence.into(), now.into()],
    )?;
    if later.is_empty() {
        return Ok(false);
    }
    store.execute(
        "UPDATE schedules SET sent_at = ? WHERE request_id = ? AND occurrence = ? AND sent_at IS NULL",
        vec![now.into(), d.request_id.clone().into(), d.occurrence.into()],
    )?;
    Ok(true)
}

/// The Communication an occurrence sends, and its identifier: what the request asks for, sent now
/// by its sender (else its requester), as staff-only as the request.
fn message_for(store: &Store, d: &Due, cr: &Value, now: i64) -> (Value, String) {
    let ident = if d.occurrence == 0 {
        d.request_id.clone()
    } else {
        format!("{}@{}", d.request_id, format_instant(d.occurrence))
    };
    let mut msg = json!({
        "resourceType": "Communication",
        "extension": [{"url": EXT_SCHEDULED_FOR, "valueDateTime": format_instant(d.due_at)}],
        "identifier": [{"system": IDENTIFIER_SYSTEM, "value": ident}],
        "basedOn": [{"reference": format!("CommunicationRequest/{}", d.request_id)}],
        "status": "completed",
        "sent": format_instant(now),
    });
    for k in [
        "category",
        "priority",
        "subject",
        "recipient",
        "sender",
        "encounter",
        "medium",
    ] {
        if let Some(v) = cr.get(k) {
            msg[k] = v.clone();
        }
    }
    if msg.get("sender").is_none() {
        if let Some(r) = cr.get("requester") {
            msg["sender"] = r.clone();
        }
    }
    if let Some(p) = cr["payload"].as_array() {
        msg["payload"] = json!(p);
    }
    // Sent as the author checked when the request was written (`messaging::rules`), and as
    // staff-only as the request.
    super::staff_only::label_derived(store, "Communication", &mut msg, cr);
    (msg, ident)
}

/// Sends claimed per pass.
const BATCH: i64 = 20;

/// The sender on this instance: a pass every 250 ms, or at once after a full pass (a backlog is
/// worked off without pausing).
pub fn spawn(store: Arc<Store>, instance: String, lease: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (s, me) = (store.clone(), instance.clone());
        match tokio::task::spawn_blocking(move || release_own(&s, &me)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => {
                tracing::info!(released = n, instance = %instance, "released the scheduled sends this instance had claimed before it stopped")
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot release this instance's earlier claims; they wait for their lease")
            }
            Err(_) => {}
        }
        let mut full = false;
        loop {
            if !full {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let (s, me) = (store.clone(), instance.clone());
            full = match tokio::task::spawn_blocking(move || run(&s, &me, lease, BATCH)).await {
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "scheduled sends failed; retrying");
                    false
                }
                Ok(Ok(n)) => {
                    if n > 0 {
                        tracing::debug!(sent = n, "scheduled messages sent");
                    }
                    n as i64 == BATCH
                }
                Err(_) => false,
            };
        }
    })
}

/// Erasure (the store's erase hook): a request's schedule goes with it; a sent message erased
/// leaves its schedule row without it.
pub fn erase<C: Conn>(c: &mut C, res_type: &str, ids: &[&str]) -> Result<(), StoreError> {
    let marks = vec!["?"; ids.len()].join(", ");
    let binds = || {
        ids.iter()
            .map(|i| (*i).into())
            .collect::<Vec<crate::store::db::Bind>>()
    };
    match res_type {
        "Communication" => {
            c.execute(
                &format!("UPDATE schedules SET communication_id = NULL WHERE communication_id IN ({marks})"),
                binds(),
            )?;
        }
        "CommunicationRequest" => {
            c.execute(
                &format!("DELETE FROM schedules WHERE request_id IN ({marks})"),
                binds(),
            )?;
        }
        _ => {}
    }
    Ok(())
}
