//! Secure deletion: the retention purge, a patient's erasure, and legal holds.
//!
//! Both remove a resource with every trace Courier keeps of it: all versions, its search-index
//! rows, the index rows of other resources that point at it (replies, AuditEvents), its event-log
//! rows and the subscription notifications that name them, its receipts, escalation state and
//! escalation requests, out-of-office marks and schedule rows, and the Binaries it attaches that
//! nothing else attaches. Then the data keys whose data is all gone are destroyed (crypto-erase:
//! copies in backups, WAL and free pages become unreadable). On SQLite `secure_delete` zeroes the
//! freed content and the WAL is checkpointed and truncated, so the database files hold no trace.
//!
//! The purge runs by class: a resource whose last change is older than its class's period goes,
//! unless a legal hold covers it (its patient, or its thread). The audit trail is purged from the
//! start of the chain (`audit::chain` keeps the hash of the last link removed as its new anchor).
//! Each run is itself audited: per class, how many, never what.

use crate::audit::{self, Interaction};
use crate::clock::now_micros;
use crate::search::names;
use crate::store::db::{Bind, Conn, Db};
use crate::store::{Store, StoreError};
use crate::with_conn;
use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};

/// Runs the block in one write transaction (queued behind the write path on SQLite).
macro_rules! in_write_tx {
    ($store:expr, |$c:ident| $body:expr) => {{
        let _writer = $store.exclusive_writer();
        let mut pooled = $store.db.get().map_err(StoreError::from)?;
        with_conn!(pooled, |$c| $c.write_tx(|$c| $body))
    }};
}

/// Resources erased per transaction.
const BATCH: usize = 200;
/// Delivered outbox rows are kept this long (they only name AuditEvents already at the EHR).
const OUTBOX_KEEP_MICROS: i64 = 30 * 86_400 * 1_000_000;
/// The compartment parameters that make a message a patient's (as the access policy has them;
/// `patient` is `subject` of type Patient, search::ALIASES).
const PATIENT_PARAMS: [&str; 7] = [
    "Communication.subject",
    "Communication.sender",
    "Communication.recipient",
    "CommunicationRequest.subject",
    "CommunicationRequest.requester",
    "CommunicationRequest.sender",
    "CommunicationRequest.recipient",
];

/// How many resources of a retention class (`?`) are past their period (updated before `?`),
/// AuditEvents aside (the audit trail is cut from the start of its chain). Read through
/// `resources_retention`, which holds no AuditEvent (its `WHERE res_type <> 'AuditEvent'` is
/// repeated here, so that both databases use it).
pub const EXPIRED_COUNT: &str = "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM resources WHERE retention_class = ? AND last_updated < ? AND res_type <> 'AuditEvent'";

/// The next page of them after row id `?` (see [`EXPIRED_COUNT`]).
pub const EXPIRED_PAGE: &str = "SELECT rid, res_type, fhir_id FROM resources WHERE retention_class = ? AND last_updated < ? AND rid > ? \
     AND res_type <> 'AuditEvent' ORDER BY rid LIMIT ?";

/// The parameters by which a message attaches a Binary.
const ATTACHMENT_PARAMS: [&str; 2] = [
    "Communication.attachment",
    "CommunicationRequest.attachment",
];

#[derive(QueryableByName, Debug, Clone)]
struct Target {
    #[diesel(sql_type = BigInt)]
    rid: i64,
    #[diesel(sql_type = Text)]
    res_type: String,
    #[diesel(sql_type = Text)]
    fhir_id: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    id: String,
}

#[derive(QueryableByName)]
struct RidRow {
    #[diesel(sql_type = BigInt)]
    rid: i64,
}

/// A legal hold.
#[derive(QueryableByName, Debug, Clone, serde::Serialize)]
pub struct Hold {
    #[diesel(sql_type = Text)]
    pub target: String,
    #[diesel(sql_type = Text)]
    pub reason: String,
    #[diesel(sql_type = BigInt)]
    pub created_at: i64,
}

/// What a purge or an erasure removed (or, in a dry run, would remove).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Summary {
    /// Per retention class: resources removed.
    pub classes: BTreeMap<String, usize>,
    /// Resources of those classes kept because a legal hold covers them.
    pub held: usize,
    pub versions: usize,
    pub keys_destroyed: usize,
    pub audit_links_cut: usize,
    pub outbox_rows: usize,
    /// Erasure: messages kept because they are also another patient's.
    pub shared: usize,
    pub dry_run: bool,
}

impl Summary {
    pub fn resources(&self) -> usize {
        self.classes.values().sum()
    }
}

/// Progress of a purge: `(done, total)` resources.
pub type Progress<'a> = &'a (dyn Fn(usize, usize) + Sync);

fn held_patient(target: &str) -> Option<&str> {
    target.strip_prefix("Patient/")
}

// ----- legal holds ------------------------------------------------------------------------------

/// A hold target is `Patient/<id>` or `Communication/<id>` (a thread: the message and what is
/// `partOf` it).
pub fn check_target(target: &str) -> Result<(), String> {
    match target.split_once('/') {
        Some(("Patient" | "Communication", id)) if fhir_codec::is_valid_id(id) => Ok(()),
        _ => Err(format!(
            "a legal hold is on Patient/<id> or Communication/<id> (a thread), not '{target}'"
        )),
    }
}

/// Places a hold; false if it was already there. The caller checks the target and reason first.
pub fn place_hold(store: &Store, target: &str, reason: &str) -> Result<bool, StoreError> {
    let exists = !list_holds(store)?.iter().any(|h| h.target == target);
    if exists {
        store.execute(
            "INSERT INTO legal_holds (target, reason, created_at) VALUES (?, ?, ?)",
            vec![target.into(), reason.into(), now_micros().into()],
        )?;
    }
    Ok(exists)
}

pub fn release_hold(store: &Store, target: &str) -> Result<bool, StoreError> {
    Ok(store.execute(
        "DELETE FROM legal_holds WHERE target = ?",
        vec![target.into()],
    )? > 0)
}

pub fn list_holds(store: &Store) -> Result<Vec<Hold>, StoreError> {
    let mut c = store.db.get()?;
    with_conn!(c, |c| holds_in(c))
}

/// The holds, read through `c` (inside a transaction: as they stand now).
fn holds_in<C: Conn>(c: &mut C) -> Result<Vec<Hold>, StoreError> {
    Ok(c.load(
        "SELECT target, reason, created_at FROM legal_holds ORDER BY target",
        vec![],
    )?)
}

/// The resources (row ids) a set of holds covers: a patient's compartment (and the Binaries its
/// messages attach, which stay referenced), a thread's root and its parts.
fn held_rids<C: Conn>(c: &mut C, holds: &[Hold]) -> Result<HashSet<i64>, StoreError> {
    let mut out = HashSet::new();
    for h in holds {
        if let Some(p) = held_patient(&h.target) {
            out.extend(compartment_rids(c, p)?);
        } else if let Some(id) = h.target.strip_prefix("Communication/") {
            let rows: Vec<RidRow> = c.load(
                "SELECT rid FROM resources WHERE res_type = 'Communication' AND fhir_id = ? \
                 UNION SELECT rid FROM idx_ref WHERE param = ? AND target_type = ? AND target_id = ?",
                vec![
                    id.into(),
                    names::key("Communication.part-of").into(),
                    names::ty("Communication").into(),
                    id.into(),
                ],
            )?;
            out.extend(rows.into_iter().map(|r| r.rid));
        }
    }
    Ok(out)
}

/// The messages in a patient's compartment, and everything sealed under the patient's keys.
fn compartment_rids<C: Conn>(c: &mut C, patient: &str) -> Result<Vec<i64>, StoreError> {
    let marks = vec!["?"; PATIENT_PARAMS.len()].join(", ");
    let mut binds: Vec<Bind> = PATIENT_PARAMS
        .iter()
        .map(|p| names::key(p).into())
        .collect();
    binds.push(names::ty("Patient").into());
    binds.push(patient.into());
    binds.push(format!("Patient/{patient}").into());
    let rows: Vec<RidRow> = c.load(
        &format!(
            "SELECT rid FROM idx_ref WHERE param IN ({marks}) AND target_type = ? AND target_id = ? AND url IS NULL \
             UNION SELECT v.rid FROM resource_versions v JOIN data_keys k ON k.n = v.key_n WHERE k.patient = ?"
        ),
        binds,
    )?;
    Ok(rows.into_iter().map(|r| r.rid).collect())
}

// ----- erasing resources ------------------------------------------------------------------------

/// Erases `targets` through the store (which first asks every module to remove what it keeps
/// about them: [`erase_dependents`]). Returns how many versions went.
fn erase<C: Conn>(store: &Store, c: &mut C, targets: &[Target]) -> Result<usize, StoreError> {
    let t: Vec<(i64, &str, &str)> = targets
        .iter()
        .map(|t| (t.rid, t.res_type.as_str(), t.fhir_id.as_str()))
        .collect();
    store.erase_resources(c, &t)
}

/// What each module keeps about resources being erased, removed in the erasing transaction (the
/// store calls this through its erase hook): the event log and the subscription notifications
/// numbered from it, receipts, escalation and out-of-office marks, schedules, outbox rows. A
/// module that keeps rows keyed by a resource adds its own `erase` here.
pub fn erase_dependents<C: Conn>(
    c: &mut C,
    erased: &[crate::store::hooks::Erased],
) -> Result<(), StoreError> {
    let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in erased {
        by_type.entry(e.res_type).or_default().push(e.id);
    }
    for (res_type, ids) in &by_type {
        crate::messaging::events::erase(c, res_type, ids)?;
        if *res_type == "Communication" {
            for id in ids {
                c.execute(
                    "DELETE FROM notices WHERE about = ?",
                    vec![format!("Communication/{id}").into()],
                )?;
            }
            crate::messaging::receipts::erase(c, ids)?;
            crate::messaging::away::erase(c, ids)?;
            for id in ids {
                c.execute(
                    "DELETE FROM draft_messages WHERE comm_id = ?",
                    vec![(*id).into()],
                )?;
            }
        }
        crate::messaging::escalation::erase(c, res_type, ids)?;
        crate::messaging::schedule::erase(c, res_type, ids)?;
        crate::smart::outbox::erase(c, res_type, ids)?;
    }
    Ok(())
}

/// Which of `a` and `b` are still of `class` and unchanged since `cutoff` (row-locked on PostgreSQL).
fn still_expired<C: Conn>(
    c: &mut C,
    a: &[Target],
    b: &[Target],
    class: &str,
    cutoff: i64,
) -> Result<HashSet<i64>, StoreError> {
    let rids: Vec<i64> = a.iter().chain(b).map(|t| t.rid).collect();
    if rids.is_empty() {
        return Ok(HashSet::new());
    }
    let marks = vec!["?"; rids.len()].join(", ");
    let lock = if c.is_postgres() { " FOR UPDATE" } else { "" };
    let mut binds: Vec<Bind> = rids.iter().map(|r| Bind::Int(*r)).collect();
    binds.push(class.into());
    binds.push(cutoff.into());
    let rows: Vec<RidRow> = c.load(
        &format!("SELECT rid FROM resources WHERE rid IN ({marks}) AND retention_class = ? AND last_updated < ?{lock}"),
        binds,
    )?;
    Ok(rows.into_iter().map(|r| r.rid).collect())
}

/// Erases `targets` with what exists only for them: the escalation requests about their messages,
/// and the Binaries they (or `binaries`) name that nothing kept attaches. Nothing in `held` goes.
/// Returns (resources, versions) removed.
fn erase_with_dependents<C: Conn>(
    store: &Store,
    c: &mut C,
    mut targets: Vec<Target>,
    binaries: Vec<String>,
    held: &HashSet<i64>,
    base: &str,
) -> Result<(usize, usize), StoreError> {
    let comms: Vec<String> = targets
        .iter()
        .filter(|t| t.res_type == "Communication")
        .map(|t| t.fhir_id.clone())
        .collect();
    let comm_refs: Vec<&str> = comms.iter().map(String::as_str).collect();
    for t in escalation_requests(c, &comm_refs)? {
        if !held.contains(&t.rid) && !targets.iter().any(|a| a.rid == t.rid) {
            targets.push(t);
        }
    }
    let messages: Vec<i64> = targets
        .iter()
        .filter(|t| {
            matches!(
                t.res_type.as_str(),
                "Communication" | "CommunicationRequest"
            )
        })
        .map(|t| t.rid)
        .collect();
    let mut candidates = attached_binaries(c, base, &messages)?;
    candidates.extend(binaries);
    let mut v = erase(store, c, &targets)?;
    let mut n = targets.len();
    let mut seen = HashSet::new();
    for b in candidates {
        if seen.insert(b.clone()) && !binary_attached(c, base, &b)? {
            if let Some(t) = binary_target(c, &b)?.filter(|t| !held.contains(&t.rid)) {
                v += erase(store, c, &[t])?;
                n += 1;
            }
        }
    }
    Ok((n, v))
}

/// The escalation requests about `comms` (they exist only for those messages): erased with them.
fn escalation_requests<C: Conn>(c: &mut C, comms: &[&str]) -> Result<Vec<Target>, StoreError> {
    if comms.is_empty() {
        return Ok(vec![]);
    }
    let marks = vec!["?"; comms.len()].join(", ");
    Ok(c.load(
        &format!(
            "SELECT r.rid, r.res_type, r.fhir_id FROM resources r WHERE r.res_type = 'CommunicationRequest' \
             AND r.fhir_id IN (SELECT request_id FROM escalations WHERE comm_id IN ({marks}))"
        ),
        comms.iter().map(|c| Bind::from(*c)).collect(),
    )?)
}

/// The Binaries `messages` attach (by local reference).
fn attached_binaries<C: Conn>(
    c: &mut C,
    base: &str,
    messages: &[i64],
) -> Result<Vec<String>, StoreError> {
    if messages.is_empty() {
        return Ok(vec![]);
    }
    let marks = vec!["?"; messages.len()].join(", ");
    let mut binds: Vec<Bind> = ATTACHMENT_PARAMS
        .iter()
        .map(|p| names::key(p).into())
        .collect();
    binds.extend(messages.iter().map(|r| Bind::Int(*r)));
    let rows: Vec<IdRow> = c.load(
        &format!("SELECT code AS id FROM idx_token WHERE param IN (?, ?) AND rid IN ({marks})"),
        binds,
    )?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            crate::messaging::hub::local_ref(&r.id, base)
                .strip_prefix("Binary/")
                .map(String::from)
        })
        .collect())
}

/// Is Binary `id` attached to a message still stored?
fn binary_attached<C: Conn>(c: &mut C, base: &str, id: &str) -> Result<bool, StoreError> {
    let rows: Vec<RidRow> = c.load(
        "SELECT rid FROM idx_token WHERE param IN (?, ?) AND code IN (?, ?) LIMIT 1",
        vec![
            names::key(ATTACHMENT_PARAMS[0]).into(),
            names::key(ATTACHMENT_PARAMS[1]).into(),
            format!("Binary/{id}").into(),
            format!("{base}/Binary/{id}").into(),
        ],
    )?;
    Ok(!rows.is_empty())
}

fn binary_target<C: Conn>(c: &mut C, id: &str) -> Result<Option<Target>, StoreError> {
    Ok(c.load::<Target>(
        "SELECT rid, res_type, fhir_id FROM resources WHERE res_type = 'Binary' AND fhir_id = ?",
        vec![id.into()],
    )?
    .into_iter()
    .next())
}

/// Destroys the data keys of the given rows' scopes whose data is all gone and whose write window
/// closed before `closed_before`.
fn destroy_keys<C: Conn>(
    store: &Store,
    c: &mut C,
    class: &str,
    closed_before: i64,
) -> Result<usize, StoreError> {
    let keys: Vec<IdRow> = c.load(
        "SELECT key_id AS id FROM data_keys WHERE class = ? AND window_end <= ?",
        vec![class.into(), closed_before.into()],
    )?;
    let mut n = 0;
    for k in keys {
        if store.destroy_key_if_unused(c, &k.id)? {
            store.keys.forget(&k.id);
            n += 1;
        }
    }
    Ok(n)
}

// ----- the purge --------------------------------------------------------------------------------

/// Removes what expired as of `as_of` (microseconds; the real clock outside tests). A dry run
/// counts without changing anything.
pub fn purge(
    store: &Store,
    as_of: i64,
    dry_run: bool,
    progress: Option<Progress>,
) -> Result<Summary, StoreError> {
    let holds = list_holds(store)?;
    let base = store.base_url.clone();
    let held: HashSet<i64> = {
        let mut c = store.db.get()?;
        with_conn!(c, |c| held_rids(c, &holds))?
    };
    let mut summary = Summary {
        dry_run,
        ..Default::default()
    };
    // Every class with a period except the audit trail (last: it records this purge's reads).
    let classes: Vec<(String, i64)> = store
        .retention
        .classes
        .iter()
        .filter_map(|c| {
            store
                .retention
                .period(&c.class)
                .map(|p| (c.class.clone(), p))
        })
        .collect();
    let mut total = 0usize;
    let mut planned = Summary::default();
    for (class, period) in &classes {
        let n = store.query::<Count>(
            EXPIRED_COUNT,
            vec![class.clone().into(), (as_of - period).into()],
        )?[0]
            .n;
        total += n as usize;
        planned.classes.insert(class.clone(), n as usize);
    }
    // The audit trail's class and period (purged last, from the start of its chain).
    let audit_class = store
        .retention
        .class_of("AuditEvent", &json!({}))
        .to_string();
    let audit_period = store.retention.period(&audit_class);
    // Recorded before anything is removed: a purge stopped part-way (killed, the disk full)
    // still leaves in the trail that it ran, when, and what it found expired — the audit
    // trail's expired part too (at most: a hold or the chain may keep some).
    if !dry_run {
        if let Some(period) = audit_period {
            let n = store.query::<Count>(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM audit_events WHERE at_hi < ?",
                vec![(as_of - period).into()],
            )?[0]
                .n;
            *planned.classes.entry(audit_class.clone()).or_default() += n as usize;
        }
        let ctx = audit::Context::job(&store.base_url, "retention purge");
        record(
            store,
            &ctx,
            "retention purge started",
            None,
            &planned,
            "expired",
        )?;
    }
    let mut done = 0usize;
    for (class, period) in &classes {
        let cutoff = as_of - period;
        let mut after = 0i64;
        let mut removed = 0usize;
        loop {
            let page: Vec<Target> = store.query(
                EXPIRED_PAGE,
                vec![
                    class.clone().into(),
                    cutoff.into(),
                    after.into(),
                    (BATCH as i64).into(),
                ],
            )?;
            let Some(last) = page.last() else { break };
            after = last.rid;
            done += page.len();
            let (keep, go): (Vec<Target>, Vec<Target>) =
                page.into_iter().partition(|t| held.contains(&t.rid));
            summary.held += keep.len();
            // Binaries go last, and only when nothing still stored attaches them.
            let (binaries, go): (Vec<Target>, Vec<Target>) =
                go.into_iter().partition(|t| t.res_type == "Binary");
            if dry_run {
                removed += go.len() + binaries.len();
            } else {
                let (n, v) = in_write_tx!(store, |c| {
                    // Again inside the transaction (locked on PostgreSQL): a resource changed
                    // since the page was read is no longer expired and stays.
                    let still = still_expired(c, &go, &binaries, class, cutoff)?;
                    // Holds too: one placed since the purge started counts.
                    let holds_now = holds_in(c)?;
                    let held = held_rids(c, &holds_now)?;
                    let keep = |t: &&Target| still.contains(&t.rid) && !held.contains(&t.rid);
                    let go: Vec<Target> = go.iter().filter(keep).cloned().collect();
                    let binaries: Vec<String> = binaries
                        .iter()
                        .filter(keep)
                        .map(|b| b.fhir_id.clone())
                        .collect();
                    let (n, v) = erase_with_dependents(store, c, go, binaries, &held, &base)?;
                    Ok::<_, StoreError>((n, v))
                })?;
                removed += n;
                summary.versions += v;
            }
            if let Some(p) = progress {
                p(done.min(total), total);
            }
        }
        if !dry_run {
            summary.keys_destroyed +=
                in_write_tx!(store, |c| destroy_keys(store, c, class, cutoff))?;
        }
        summary.classes.insert(class.clone(), removed);
    }
    // The audit trail: from the start of the chain, as far as it expired.
    if let Some(period) = audit_period {
        let (n, links, outbox) = purge_audit(store, as_of - period, dry_run)?;
        *summary.classes.entry(audit_class.clone()).or_default() += n;
        summary.audit_links_cut = links;
        summary.outbox_rows += outbox;
        if !dry_run {
            summary.keys_destroyed += in_write_tx!(store, |c| destroy_keys(
                store,
                c,
                &audit_class,
                as_of - period
            ))?;
        }
    }
    if !dry_run {
        // In batches: one row per delivered AuditEvent, so a store not purged for long has many
        // (one statement must stay within PostgreSQL's statement timeout).
        loop {
            let n = store.execute(
                "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
                 WHERE delivered_at IS NOT NULL AND delivered_at < ? LIMIT 5000)",
                vec![(as_of - OUTBOX_KEEP_MICROS).into()],
            )?;
            summary.outbox_rows += n;
            if n == 0 {
                break;
            }
        }
        // A person's summary (name, birth date, MRN) and a patient's care team are refreshed at
        // each launch: one not refreshed within the message class's period goes.
        if let Some(period) = store.retention.period("message") {
            for table in ["person_summaries", "care_team_members"] {
                store.execute(
                    &format!("DELETE FROM {table} WHERE updated_at < ?"),
                    vec![(as_of - period).into()],
                )?;
            }
        }
        let ctx = audit::Context::job(&store.base_url, "retention purge");
        record(store, &ctx, "purge", None, &summary, "removed")?;
        scrub_files(store);
    }
    Ok(summary)
}

#[derive(QueryableByName)]
struct ChainRow {
    #[diesel(embed)]
    link: crate::audit::chain::Link,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    rid: Option<i64>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    fhir_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    key_id: Option<String>,
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Binary>)]
    body: Option<Vec<u8>>,
    #[diesel(sql_type = diesel::sql_types::Nullable<BigInt>)]
    last_updated: Option<i64>,
}

/// What one audit-purge step cut: the AuditEvents, the new anchor, outbox rows removed.
type AuditStep = (Vec<Target>, Option<(i64, String)>, usize);

/// One step of the audit purge, inside a write transaction: from the anchor (locked), up to
/// `BATCH` links that are intact, expired and not about a held patient; cut them unless `dry`.
/// A broken link stops the purge with an error: evidence of tampering is never cut away.
fn audit_step<C: Conn>(
    store: &Store,
    c: &mut C,
    chain_key: &[u8],
    from: Option<(i64, String)>,
    cutoff: i64,
    dry: bool,
) -> Result<AuditStep, StoreError> {
    let lock = if c.is_postgres() { " FOR UPDATE" } else { "" };
    let anchor = match from {
        Some(a) => Some(a),
        None => match c
            .load::<crate::audit::chain::Anchor>(
                &format!("SELECT seq, hash, key_id, seal FROM audit_chain_anchor WHERE id = 1{lock}"),
                vec![],
            )?
            .into_iter()
            .next()
        {
            // An anchor that was moved by hand is never built on (that would launder it).
            Some(a) if !crate::audit::chain::anchor_genuine(store, a.seq, &a.hash, &a.key_id, &a.seal)? => {
                return Err(StoreError::Other(anyhow::anyhow!(
                    "the audit chain's anchor was altered: not cutting it; see `courier audit verify`"
                )))
            }
            Some(a) => Some((a.seq, a.hash)),
            None => None,
        },
    };
    let (mut seq, mut prev) = anchor.unwrap_or((0, crate::audit::chain::GENESIS.to_string()));
    // A link names its AuditEvent's row (`store::audit_rows`); a derived id is '' here.
    let rows: Vec<ChainRow> = c.load(
        "SELECT c.seq, c.vid, c.hash, a.rid, CASE WHEN a.rid IS NULL THEN NULL ELSE COALESCE(a.fhir_id, '') END AS fhir_id, \
         COALESCE((SELECT k.key_id FROM data_keys k WHERE k.n = a.key_n), '') AS key_id, a.body, a.last_updated \
         FROM audit_chain c LEFT JOIN audit_events a ON a.rid = c.vid \
         WHERE c.seq > ? ORDER BY c.seq LIMIT ?",
        vec![seq.into(), (BATCH as i64).into()],
    )?;
    // Patients under a hold: their AuditEvents stay, and so does everything after them.
    let holds = holds_in(c)?;
    // What is held, as the references an AuditEvent names: the patients, and every message of a
    // held thread.
    let mut held_refs: HashSet<String> = holds
        .iter()
        .filter(|h| h.target.starts_with("Patient/"))
        .map(|h| h.target.clone())
        .collect();
    for h in holds
        .iter()
        .filter(|h| h.target.starts_with("Communication/"))
    {
        let id = h.target.trim_start_matches("Communication/");
        held_refs.insert(h.target.clone());
        let parts: Vec<IdRow> = c.load(
            "SELECT r.fhir_id AS id FROM idx_ref x JOIN resources r ON r.rid = x.rid \
             WHERE x.param = ? AND x.target_type = ? AND x.target_id = ?",
            vec![
                names::key("Communication.part-of").into(),
                names::ty("Communication").into(),
                id.into(),
            ],
        )?;
        held_refs.extend(parts.into_iter().map(|p| format!("Communication/{}", p.id)));
    }
    let mut cut = vec![];
    for r in rows {
        let (Some(rid), Some(id), Some(key_id), Some(body), Some(at)) =
            (r.rid, &r.fhir_id, &r.key_id, &r.body, r.last_updated)
        else {
            return Err(StoreError::Other(anyhow::anyhow!(
                "the audit chain is broken at link {} (its AuditEvent row is gone): not cutting it; see `courier audit verify`",
                r.link.seq
            )));
        };
        let id = if id.is_empty() {
            store.audit_ids().id(rid)
        } else {
            id.clone()
        };
        let hash = crate::audit::chain::link(chain_key, &prev, r.link.vid, &id, key_id, body);
        if hash != crate::audit::chain::hex(&r.link.hash) {
            return Err(StoreError::Other(anyhow::anyhow!(
                "the audit chain is broken at link {}: not cutting it; see `courier audit verify`",
                r.link.seq
            )));
        }
        if at >= cutoff {
            break;
        }
        if !held_refs.is_empty() {
            // The patients it is about (`patient` is the agents and entities that are Patients:
            // search::ALIASES) and the resources it names, from its body.
            let about =
                store.audit_references(c, rid, &["AuditEvent.entity", "AuditEvent.agent"])?;
            let held = about.iter().any(|(param, r)| {
                (param == "AuditEvent.entity" || r.starts_with("Patient/")) && held_refs.contains(r)
            });
            if held {
                break;
            }
        }
        seq = r.link.seq;
        prev = hash;
        cut.push(Target {
            rid,
            res_type: "AuditEvent".into(),
            fhir_id: id,
        });
    }
    if cut.is_empty() {
        return Ok((cut, None, 0));
    }
    let mut outbox = 0;
    if !dry {
        let count = "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM outbox";
        let before = c.load::<Count>(count, vec![])?[0].n;
        erase(store, c, &cut)?;
        outbox = (before - c.load::<Count>(count, vec![])?[0].n) as usize;
        c.execute("DELETE FROM audit_chain WHERE seq <= ?", vec![seq.into()])?;
        let n = cut.len() as i64;
        let (key_id, seal) = crate::audit::chain::seal_anchor(store, seq, &prev);
        let updated = c.execute(
            "UPDATE audit_chain_anchor SET seq = ?, hash = ?, cut_at = ?, links_cut = links_cut + ?, key_id = ?, seal = ? WHERE id = 1 AND seq < ?",
            vec![seq.into(), prev.clone().into(), now_micros().into(), n.into(), key_id.clone().into(), Bind::Blob(seal.clone()), seq.into()],
        )?;
        if updated == 0 {
            c.execute(
                "INSERT INTO audit_chain_anchor (id, seq, hash, cut_at, links_cut, key_id, seal) VALUES (1, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                vec![seq.into(), prev.clone().into(), now_micros().into(), n.into(), key_id.into(), Bind::Blob(seal)],
            )?;
        }
    }
    Ok((cut, Some((seq, prev)), outbox))
}

/// Removes the AuditEvents older than `cutoff` from the start of the audit chain (a prefix of it:
/// the chain must stay verifiable), checking each link before it goes, and moves the chain's
/// anchor past them. Stops at the first AuditEvent about a patient under a legal hold.
fn purge_audit(
    store: &Store,
    cutoff: i64,
    dry_run: bool,
) -> Result<(usize, usize, usize), StoreError> {
    let (mut events, mut outbox) = (0, 0);
    // A dry run carries its own cursor; a real one re-reads the (locked) anchor each step.
    let mut cursor: Option<(i64, String)> = None;
    // Read (or made) before any write transaction: on SQLite that needs the writer.
    let chain_key = crate::audit::chain::chain_key(store)?;
    loop {
        let from = if dry_run { cursor.clone() } else { None };
        let (cut, next, o) = in_write_tx!(store, |c| audit_step(
            store,
            c,
            &chain_key,
            from.clone(),
            cutoff,
            dry_run
        ))?;
        if cut.is_empty() {
            break;
        }
        events += cut.len();
        outbox += o;
        cursor = next;
        if cut.len() < BATCH {
            break;
        }
    }
    Ok((events, events, outbox))
}

/// Records a purge or an erasure as an AuditEvent: per class, how many (`{verb}:{class}`);
/// never what.
fn record(
    store: &Store,
    ctx: &audit::Context,
    job: &str,
    patient: Option<&str>,
    summary: &Summary,
    verb: &str,
) -> Result<(), StoreError> {
    let mut ev = audit::event(ctx, Interaction::Delete, patient, patient, None);
    let mut detail: Vec<Value> = summary
        .classes
        .iter()
        .map(|(class, n)| json!({"type": format!("{verb}:{class}"), "valueString": n.to_string()}))
        .collect();
    // A start says what it found expired; the end, what it did.
    if verb != "expired" {
        detail.push(json!({"type": "versions", "valueString": summary.versions.to_string()}));
        detail.push(json!({"type": "held", "valueString": summary.held.to_string()}));
        detail.push(
            json!({"type": "keys-destroyed", "valueString": summary.keys_destroyed.to_string()}),
        );
        detail.push(
            json!({"type": "audit-links-cut", "valueString": summary.audit_links_cut.to_string()}),
        );
    }
    let entity = json!({
        "what": {"display": format!("Courier {job}")},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
        "detail": detail,
    });
    match ev["entity"].as_array_mut() {
        Some(a) => a.push(entity),
        None => ev["entity"] = json!([entity]),
    }
    store.record_audit(ev)
}

/// SQLite: move everything out of the WAL and truncate it, so no page image of removed rows stays
/// in the WAL file (`secure_delete` already zeroed them in the database file).
fn scrub_files(store: &Store) {
    #[derive(QueryableByName)]
    struct Checkpoint {
        #[diesel(sql_type = BigInt)]
        busy: i64,
    }
    if let Db::Sqlite(..) = store.db {
        for _ in 0..50 {
            let done = {
                let _writer = store.exclusive_writer();
                store
                    .query::<Checkpoint>("PRAGMA wal_checkpoint(TRUNCATE)", vec![])
                    .map(|r| r.first().is_some_and(|c| c.busy == 0))
                    .unwrap_or(false)
            };
            if done {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        tracing::warn!("could not truncate the WAL after a purge (readers kept it busy); the next checkpoint will");
    }
}

// ----- erasure ----------------------------------------------------------------------------------

/// Why an erasure was refused.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    #[error("a legal hold applies: {0}")]
    Held(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for EraseError {
    fn from(e: diesel::result::Error) -> Self {
        EraseError::Store(e.into())
    }
}

/// Refuses (409) while a hold covers the patient or one of their threads.
fn check_holds(store: &Store, patient: &str, rids: Option<&[i64]>) -> Result<(), EraseError> {
    let mut c = store.db.get().map_err(StoreError::from)?;
    with_conn!(c, |c| check_holds_in(c, patient, rids))
}

fn check_holds_in<C: Conn>(
    c: &mut C,
    patient: &str,
    rids: Option<&[i64]>,
) -> Result<(), EraseError> {
    let holds = holds_in(c)?;
    if let Some(h) = holds
        .iter()
        .find(|h| h.target == format!("Patient/{patient}"))
    {
        return Err(EraseError::Held(format!("{} ({})", h.target, h.reason)));
    }
    let threads: Vec<Hold> = holds
        .into_iter()
        .filter(|h| h.target.starts_with("Communication/"))
        .collect();
    if threads.is_empty() {
        return Ok(());
    }
    let held = held_rids(c, &threads)?;
    let mine = match rids {
        Some(r) => r.to_vec(),
        None => compartment_rids(c, patient)?,
    };
    if mine.iter().any(|r| held.contains(r)) {
        return Err(EraseError::Held(
            "one of the patient's threads is on hold".into(),
        ));
    }
    Ok(())
}

/// Which of `rids` also belong to another patient's compartment.
fn shared_rids<C: Conn>(
    c: &mut C,
    rids: &[i64],
    patient: &str,
) -> Result<HashSet<i64>, StoreError> {
    let mut out = HashSet::new();
    for chunk in rids.chunks(BATCH) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let pmarks = vec!["?"; PATIENT_PARAMS.len()].join(", ");
        let mut binds: Vec<Bind> = chunk.iter().map(|r| Bind::Int(*r)).collect();
        binds.extend(PATIENT_PARAMS.iter().map(|p| Bind::from(names::key(p))));
        binds.push(patient.into());
        let rows: Vec<RidRow> = c.load(
            &format!(
                "SELECT DISTINCT rid FROM idx_ref WHERE rid IN ({marks}) AND param IN ({pmarks}) \
                 AND target_type = '{}' AND target_id <> ? AND url IS NULL",
                names::ty("Patient")
            ),
            binds,
        )?;
        out.extend(rows.into_iter().map(|r| r.rid));
    }
    Ok(out)
}

/// Erases one patient's messaging data with the purge's thoroughness: the messages and requests
/// in their compartment, the Binaries only those attach, everything sealed under their keys, their
/// receipts, escalations and out-of-office marks as a recipient, their subscriptions, EHR
/// sessions and identity links, and then their data keys. Refused while a hold covers the patient
/// or one of their threads. The AuditEvents about them stay (their own retention; GDPR
/// Art. 17(3)(b), HIPAA §164.316). Audited by the caller's context.
pub fn erase_patient(
    store: &Store,
    patient: &str,
    ctx: &audit::Context,
) -> Result<Summary, EraseError> {
    let reference = format!("Patient/{patient}");
    let base = store.base_url.clone();
    check_holds(store, patient, None)?;
    // New writes about the patient get new keys from now on, so the keys destroyed at the end
    // cannot be taken up by a write racing with the erasure.
    store.retire_patient_keys(&reference)?;
    let mut c0 = store.db.get().map_err(StoreError::from)?;
    let all = with_conn!(c0, |c| compartment_rids(c, patient))?;
    // A message that is also another patient's stays theirs: it is kept (and counted).
    let shared = with_conn!(c0, |c| shared_rids(c, &all, patient))?;
    drop(c0);
    let rids: Vec<i64> = all
        .iter()
        .copied()
        .filter(|r| !shared.contains(r))
        .collect();
    let mut summary = Summary {
        shared: shared.len(),
        ..Default::default()
    };
    for chunk in rids.chunks(BATCH) {
        let (n, v) = in_write_tx!(store, |c| {
            // A hold placed since the erasure began stops it here.
            check_holds_in(c, patient, Some(chunk))?;
            let marks = vec!["?"; chunk.len()].join(", ");
            let found: Vec<Target> = c.load(
                &format!("SELECT rid, res_type, fhir_id FROM resources WHERE rid IN ({marks})"),
                chunk.iter().map(|r| Bind::Int(*r)).collect(),
            )?;
            // Binaries last, and only those nothing kept attaches.
            let (own_binaries, targets): (Vec<Target>, Vec<Target>) =
                found.into_iter().partition(|t| t.res_type == "Binary");
            let binaries = own_binaries.into_iter().map(|b| b.fhir_id).collect();
            // Another patient's hold keeps what it covers (a Binary only this patient's message
            // attached, say).
            let holds = holds_in(c)?;
            let held = held_rids(c, &holds)?;
            let (n, v) = erase_with_dependents(store, c, targets, binaries, &held, &base)?;
            Ok::<_, EraseError>((n, v))
        })?;
        *summary.classes.entry("patient-data".into()).or_default() += n;
        summary.versions += v;
    }
    // What names the patient outside the resource store.
    let destroyed = in_write_tx!(store, |c| {
        for (table, column) in [
            ("receipts", "recipient"),
            ("escalations", "recipient"),
            ("away_handled", "recipient"),
        ] {
            c.execute(
                &format!("DELETE FROM {table} WHERE {column} = ?"),
                vec![reference.clone().into()],
            )?;
        }
        c.execute(
            "DELETE FROM subscription_events WHERE event_seq IN (SELECT seq FROM events WHERE detail = ?)",
            vec![reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM events WHERE detail = ?",
            vec![reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM subscription_events WHERE sub_id IN (SELECT id FROM subscriptions WHERE owner_patient = ? OR owner_user = ?)",
            vec![patient.into(), reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM subscriptions WHERE owner_patient = ? OR owner_user = ?",
            vec![patient.into(), reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM ehr_sessions WHERE patient = ? OR fhir_user = ?",
            vec![patient.into(), reference.clone().into()],
        )?;
        // What the app showed of the patient (name, birth date, MRN), and their care team.
        c.execute(
            "DELETE FROM person_summaries WHERE courier_ref = ?",
            vec![reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM care_team_members WHERE patient_ref = ?",
            vec![reference.clone().into()],
        )?;
        // Their second factors (passkeys, authenticator app, recovery codes) and waiting sign-ins.
        for table in [
            "mfa_factors",
            "mfa_recovery_codes",
            "mfa_guard",
            "mfa_tickets",
        ] {
            c.execute(
                &format!("DELETE FROM {table} WHERE user_ref = ?"),
                vec![reference.clone().into()],
            )?;
        }
        // Their email address, mobile number, browsers, choices and notices.
        for table in [
            "notify_contacts",
            "notify_prefs",
            "notices",
            "notify_pending_contacts",
            "notify_push",
        ] {
            c.execute(
                &format!("DELETE FROM {table} WHERE person = ?"),
                vec![reference.clone().into()],
            )?;
        }
        c.execute(
            "DELETE FROM identity_links WHERE courier_ref = ?",
            vec![reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM identity_identifiers WHERE courier_ref = ?",
            vec![reference.clone().into()],
        )?;
        c.execute(
            "DELETE FROM identities WHERE courier_ref = ?",
            vec![reference.clone().into()],
        )?;
        // Kept messages (shared with another patient) no longer name this one in the index, so a
        // later erasure of the other patient does not count them as shared with this one.
        store.forget_references(c, &PATIENT_PARAMS, &reference)?;
        // Crypto-erase: what is kept but still sealed under the patient's keys (an older version
        // of a message later shared, a Binary a kept message attaches) is sealed again under its
        // class's unscoped key, so the patient's keys seal nothing stored any more.
        // In (class, patient) order, as a PostgreSQL group commit share-locks the keys it seals
        // with (`Store::put_new_versions`): the same order, so the two cannot deadlock.
        let keys: Vec<IdRow> = c.load(
            "SELECT key_id AS id FROM data_keys WHERE patient = ? ORDER BY class, window_end, key_id",
            vec![reference.clone().into()],
        )?;
        for k in &keys {
            store.reseal_unscoped(c, &k.id)?;
        }
        let mut n = 0;
        for k in keys {
            if store.destroy_key_if_unused(c, &k.id)? {
                store.keys.forget(&k.id);
                n += 1;
            }
        }
        Ok::<_, StoreError>(n)
    })?;
    summary.keys_destroyed = destroyed;
    record(store, ctx, "erasure", Some(&reference), &summary, "removed")?;
    scrub_files(store);
    Ok(summary)
}
