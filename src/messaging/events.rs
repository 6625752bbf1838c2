//! The event log: one row per version of a Communication or CommunicationRequest and per receipt
//! change, written inside the change's own transaction (so an event exists exactly when its change
//! committed). The hub tails it; reconnecting clients catch up from it.

use crate::store::db::Conn;
use crate::store::{Store, StoreError};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;

/// The PostgreSQL notification channel that wakes every instance's hub.
pub const CHANNEL: &str = "courier_events";

/// The advisory lock held from an event's insert to its commit: it makes PostgreSQL commit events
/// in `seq` order (a sequence alone would let a later seq commit first, and a tailer that had read
/// past it would never see the earlier one). Keyed by the schema, as the dispatch leader's lock is:
/// advisory locks are database-wide, and Courier instances (or test runs) in other schemas of the
/// same database have event logs of their own that must not queue on ours.
const PG_EVENT_LOCK: &str =
    "SELECT pg_advisory_xact_lock(hashtext('courier.events.' || current_schema()))";

/// Are changes of this type logged (and so pushed to sockets and subscribers)?
pub fn logged(res_type: &str) -> bool {
    matches!(res_type, "Communication" | "CommunicationRequest")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Create,
    Update,
    Delete,
    Receipt,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Create => "create",
            Kind::Update => "update",
            Kind::Delete => "delete",
            Kind::Receipt => "receipt",
        }
    }
    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "create" => Kind::Create,
            "update" => Kind::Update,
            "delete" => Kind::Delete,
            "receipt" => Kind::Receipt,
            _ => return None,
        })
    }
}

/// PostgreSQL: takes the event lock for the rest of the transaction. Events are recorded at the
/// end of a transaction, after its last row lock, so the lock is held only from the event insert
/// to the commit, and a holder never waits for a row lock (no deadlock with writers that hold row
/// locks and wait for it). Re-taking it is free.
pub fn lock<C: Conn>(c: &mut C) -> Result<(), StoreError> {
    if c.is_postgres() {
        c.execute(PG_EVENT_LOCK, vec![])?;
    }
    Ok(())
}

/// Appends an event inside the caller's transaction. `detail` is a reference (a receipt's
/// recipient), never content.
pub fn record<C: Conn>(
    c: &mut C,
    kind: Kind,
    res_type: &str,
    id: &str,
    version_id: i64,
    detail: Option<String>,
) -> Result<(), StoreError> {
    record_all(c, vec![(kind, res_type, id, version_id, detail)])
}

/// An event to record: kind, resource type, id, version, detail.
pub type NewEvent<'a> = (Kind, &'a str, &'a str, i64, Option<String>);

/// Appends `events`, in their order, inside the caller's transaction: one turn of the event lock,
/// one INSERT (of up to 64 rows) and one `NOTIFY` for all of a write's events, as the event lock
/// is held from here to the commit.
pub fn record_all<C: Conn>(c: &mut C, events: Vec<NewEvent>) -> Result<(), StoreError> {
    if events.is_empty() {
        return Ok(());
    }
    lock(c)?;
    let at = crate::clock::now_micros();
    let mut binds = Vec::with_capacity(events.len() * 6);
    for (kind, res_type, id, version_id, detail) in events {
        binds.extend([
            at.into(),
            kind.as_str().into(),
            res_type.into(),
            id.into(),
            version_id.into(),
            detail.into(),
        ]);
    }
    crate::store::multi_insert(
        c,
        "INSERT INTO",
        "events (at, kind, res_type, fhir_id, version_id, detail)",
        6,
        binds,
    )?;
    if c.is_postgres() {
        // Delivered at commit, to every instance listening (and not at all on rollback).
        c.execute(&format!("NOTIFY {CHANNEL}"), vec![])?;
    }
    Ok(())
}

#[derive(Debug, Clone, QueryableByName)]
pub struct EventRow {
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
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
    #[diesel(sql_type = Nullable<Text>)]
    pub detail: Option<String>,
}

/// Events after `seq`, oldest first, at most `limit`. Every reader of the log tells someone
/// (a socket, a subscriber, a sender), so what is returned is durable first ([`Store::settle`]):
/// nobody hears of a write that a crash could still take back.
pub fn after(store: &Store, seq: i64, limit: i64) -> Result<Vec<EventRow>, StoreError> {
    let rows: Vec<EventRow> = store.query(
        "SELECT seq, at, kind, res_type, fhir_id, version_id, detail FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
        vec![seq.into(), limit.into()],
    )?;
    if !rows.is_empty() {
        store.settle()?;
    }
    Ok(rows)
}

#[derive(QueryableByName)]
struct SeqRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// A background job's position in the log (`job_cursors`). A job seen for the first time starts
/// at the end of the log, so it acts on what happens from then on, not on the history.
pub fn cursor(store: &Store, job: &str) -> Result<i64, StoreError> {
    let at: Vec<SeqRow> = store.query(
        "SELECT seq AS n FROM job_cursors WHERE name = ?",
        vec![job.into()],
    )?;
    if let Some(r) = at.first() {
        return Ok(r.n);
    }
    let last = last_seq(store)?;
    store.execute(
        "INSERT INTO job_cursors (name, seq) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        vec![job.into(), last.into()],
    )?;
    Ok(last)
}

/// Moves a background job's position in the log.
pub fn move_cursor(store: &Store, job: &str, seq: i64) -> Result<(), StoreError> {
    store.execute(
        "UPDATE job_cursors SET seq = ? WHERE name = ?",
        vec![seq.into(), job.into()],
    )?;
    Ok(())
}

/// The newest event's seq (0 when there is none).
pub fn last_seq(store: &Store) -> Result<i64, StoreError> {
    let rows: Vec<SeqRow> = store.query("SELECT COALESCE(MAX(seq), 0) AS n FROM events", vec![])?;
    Ok(rows.first().map_or(0, |r| r.n))
}

/// Erasure (the store's erase hook): the events of these resources and the subscription
/// notifications numbered from them.
pub fn erase<C: Conn>(c: &mut C, res_type: &str, ids: &[&str]) -> Result<(), StoreError> {
    let marks = vec!["?"; ids.len()].join(", ");
    let mut binds: Vec<crate::store::db::Bind> = vec![res_type.into()];
    binds.extend(ids.iter().map(|i| (*i).into()));
    c.execute(
        &format!("DELETE FROM subscription_events WHERE event_seq IN (SELECT seq FROM events WHERE res_type = ? AND fhir_id IN ({marks}))"),
        binds.clone(),
    )?;
    c.execute(
        &format!("DELETE FROM events WHERE res_type = ? AND fhir_id IN ({marks})"),
        binds,
    )?;
    Ok(())
}
