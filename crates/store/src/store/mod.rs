//! Persistence: one write path for every change. [`Store::write`] versions the resource, re-indexes
//! it, encrypts its body and records its AuditEvent in one database transaction; reads decrypt.

pub mod audit_rows;
pub mod compress;
pub mod crypto;
pub mod db;
pub mod health;
pub mod hooks;
pub mod keys;
pub mod private;
pub mod resident;
pub mod rows;
mod writer;

use crate::audit::{self, Interaction};
use crate::search::index::{self, Entry};
use crate::search::query::{Condition, Include, SearchRequest, SortKey, Total};
use crate::search::{dates, eval, names, sql, Registry};
use crate::with_conn;
use crypto::Keyring;
use db::{Bind, Conn, Db};
use fhir_codec::Issue;
use rows::*;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Any resource type but AuditEvent (held in the generic tables), where a type is needed only to
/// tell the two apart (`audit_rows::is_audit`).
const GENERIC: &str = "";

/// A resource body as received: the parsed value (checked, indexed) and its top-level members as
/// the exact JSON text sent, so the stored body is what the client sent plus `id` and `meta`.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub value: Value,
    pub members: Vec<(String, Box<RawValue>)>,
}

impl Incoming {
    /// Parses JSON text; the caller checks it with `fhir_codec::check` before writing.
    pub fn parse(text: &str) -> Result<Incoming, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        // serde_json keeps the last of two equal keys; the raw text would keep both. Refuse them.
        serde_json::from_str::<indexmap_like::NoDuplicateKeys>(text)
            .map_err(|e| format!("invalid JSON: {e}"))?;
        let map: indexmap_like::Members =
            serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
        Ok(Incoming {
            value,
            members: map.0,
        })
    }

    /// From a value (PATCH results, Bundle entries after reference rewriting).
    pub fn from_value(value: Value) -> Incoming {
        let members = value
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            RawValue::from_string(v.to_string()).expect("valid JSON"),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Incoming { value, members }
    }
}

/// Fails on a key repeated within one object of the JSON `text`, at any depth (serde_json would
/// keep the last one silently; [`Incoming::parse`] does the same check for a single resource).
pub fn no_duplicate_keys(text: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<indexmap_like::NoDuplicateKeys>(text)
        .map(|_| ())
        .map_err(|e| format!("invalid JSON: {e}"))
}

mod indexmap_like {
    //! Top-level JSON members in order, each kept as raw text.
    use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    pub struct Members(pub Vec<(String, Box<RawValue>)>);

    /// Walks a JSON document and fails on a key repeated within one object, at any depth.
    pub struct NoDuplicateKeys;

    impl<'de> Deserialize<'de> for NoDuplicateKeys {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = NoDuplicateKeys;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("JSON")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut m: A,
                ) -> Result<NoDuplicateKeys, A::Error> {
                    let mut keys = std::collections::HashSet::new();
                    while let Some(k) = m.next_key::<String>()? {
                        if !keys.insert(k.clone()) {
                            return Err(serde::de::Error::custom(format!(
                                "duplicate member '{k}'"
                            )));
                        }
                        m.next_value::<NoDuplicateKeys>()?;
                    }
                    Ok(NoDuplicateKeys)
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut s: A,
                ) -> Result<NoDuplicateKeys, A::Error> {
                    while s.next_element::<NoDuplicateKeys>()?.is_some() {}
                    Ok(NoDuplicateKeys)
                }
                fn visit_bool<E>(self, _: bool) -> Result<NoDuplicateKeys, E> {
                    Ok(NoDuplicateKeys)
                }
                fn visit_i64<E>(self, _: i64) -> Result<NoDuplicateKeys, E> {
                    Ok(NoDuplicateKeys)
                }
                fn visit_u64<E>(self, _: u64) -> Result<NoDuplicateKeys, E> {
                    Ok(NoDuplicateKeys)
                }
                fn visit_f64<E>(self, _: f64) -> Result<NoDuplicateKeys, E> {
                    Ok(NoDuplicateKeys)
                }
                fn visit_str<E>(self, _: &str) -> Result<NoDuplicateKeys, E> {
                    Ok(NoDuplicateKeys)
                }
                fn visit_unit<E>(self) -> Result<NoDuplicateKeys, E> {
                    Ok(NoDuplicateKeys)
                }
            }
            d.deserialize_any(V)
        }
    }

    impl<'de> Deserialize<'de> for Members {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members, A::Error> {
                    let mut out = Vec::new();
                    while let Some((k, v)) = m.next_entry::<String, Box<RawValue>>()? {
                        if out.iter().any(|(x, _): &(String, _)| x == &k) {
                            return Err(serde::de::Error::custom(format!(
                                "duplicate member '{k}'"
                            )));
                        }
                        out.push((k, v));
                    }
                    Ok(Members(out))
                }
            }
            d.deserialize_map(V)
        }
    }
}

/// One change, as the REST layer asks for it.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Create with a server-assigned id (already chosen, so transactions can resolve `urn:uuid:`).
    Create {
        res_type: String,
        id: String,
        resource: Incoming,
        if_none_exist: Option<SearchRequest>,
    },
    /// Update; `upsert` allows create-with-client-id when the resource does not exist.
    Update {
        res_type: String,
        id: String,
        resource: Incoming,
        if_match: Option<i64>,
        upsert: bool,
        patch: bool,
        /// The access policy's condition the version being replaced must meet (else 404).
        guard: Option<Condition>,
        /// May the caller create this resource, should it not exist (or be deleted)? An update
        /// that creates takes create permission.
        may_create: bool,
    },
    Delete {
        res_type: String,
        id: String,
        if_match: Option<i64>,
        /// As for `Update`: a confined principal deletes only what it may see (else 404).
        guard: Option<Condition>,
    },
    /// Writes nothing: the transaction goes ahead only if the resource is still live at `version`
    /// (row-locked on PostgreSQL), else 412. A job's guard on what it acts upon (the scheduler
    /// sending one dose of a request that may be revoked meanwhile).
    Unchanged {
        res_type: String,
        id: String,
        version: i64,
    },
}

impl WriteOp {
    pub fn target(&self) -> (&str, &str) {
        match self {
            WriteOp::Create { res_type, id, .. }
            | WriteOp::Update { res_type, id, .. }
            | WriteOp::Delete { res_type, id, .. }
            | WriteOp::Unchanged { res_type, id, .. } => (res_type, id),
        }
    }

    pub fn interaction(&self) -> Interaction {
        match self {
            WriteOp::Create { .. } => Interaction::Create,
            WriteOp::Update { patch: true, .. } => Interaction::Patch,
            WriteOp::Update { .. } => Interaction::Update,
            WriteOp::Delete { .. } => Interaction::Delete,
            WriteOp::Unchanged { .. } => Interaction::Read,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStatus {
    Created,
    Updated,
    /// Conditional create matched an existing resource: nothing written.
    Existing,
    Deleted,
    /// Delete of something that does not exist or is already deleted.
    NothingToDelete,
}

/// A stored resource version.
#[derive(Debug, Clone)]
pub struct Stored {
    pub res_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: i64,
    pub deleted: bool,
    pub method: String,
    /// The JSON body; `None` for a deletion.
    pub body: Option<Vec<u8>>,
}

impl Stored {
    pub fn etag(&self) -> String {
        format!("W/\"{}\"", self.version_id)
    }
    pub fn body_str(&self) -> Option<&str> {
        self.body
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }
}

#[derive(Debug, Clone)]
pub struct WriteResult {
    pub status: WriteStatus,
    pub stored: Stored,
}

/// The longest an async caller waits for its write to be answered (see `submit_async`):
/// longer than PostgreSQL's lock timeout (20 s), so a write waiting on a lock gets that answer.
pub const WRITE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How such a wait's error begins (`health::unavailable` knows it).
pub const WRITE_WAIT_TEXT: &str = "no answer from the database within";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}/{1} is not known")]
    NotFound(String, String),
    #[error("{0}/{1} has been deleted")]
    Gone(String, String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("{0}")]
    Conflict(String),
    /// The access policy refuses the write (403).
    #[error("{0}")]
    Forbidden(String),
    #[error("invalid resource")]
    Invalid(Vec<Issue>),
    #[error("database error: {0}")]
    Db(diesel::result::Error),
    #[error("{0}")]
    Other(#[from] anyhow::Error),
}

impl From<diesel::result::Error> for StoreError {
    fn from(e: diesel::result::Error) -> Self {
        use diesel::result::{DatabaseErrorKind, Error};
        db::note_pg_error(&e);
        match e {
            // Two writers raced to create the same resource: the loser is told, nothing is lost.
            Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                StoreError::Conflict("a concurrent request created the same resource; retry".into())
            }
            // PostgreSQL serialization failures / deadlocks are retryable conflicts too.
            Error::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => {
                StoreError::Conflict("a concurrent update conflicted with this one; retry".into())
            }
            // PostgreSQL deadlock (40P01): one of two crossing transactions was chosen to fail.
            Error::DatabaseError(_, ref info) if info.message().contains("deadlock detected") => {
                StoreError::Conflict(
                    "a concurrent transaction conflicted with this one; retry".into(),
                )
            }
            other => StoreError::Db(other),
        }
    }
}

/// What a search returned.
pub struct SearchPage {
    pub matches: Vec<Stored>,
    pub included: Vec<Stored>,
    pub total: Option<i64>,
    pub has_next: bool,
    pub snapshot: i64,
}

/// At most this many candidates of a search are checked on their bodies (`search::UNSTORED`):
/// each is read, decrypted and decompressed (~10k take a few hundred milliseconds), on one pooled
/// connection. A search that would need more is refused as too costly, naming how to narrow it.
pub const BODY_CANDIDATES: usize = 10_000;

/// At most this many resources are added by `_include`/`_revinclude` to one page.
pub const MAX_INCLUDED: usize = 1000;

pub struct Store {
    pub db: Db,
    pub keys: Keyring,
    pub registry: Arc<Registry>,
    pub base_url: String,
    /// SQLite has one writer at a time: the writer thread holds this while it commits a group,
    /// and so does any transaction outside the resource write path ([`Store::exclusive_writer`]).
    sqlite_writer: parking_lot::Mutex<()>,
    /// SQLite: the queue of the writer thread, which commits every job waiting in it as one group
    /// (see [`Store::submit`]); `None` on PostgreSQL.
    writer: Option<std::sync::mpsc::Sender<(Arc<Slot>, WriteUnit)>>,
    /// PostgreSQL: the queue of the group-commit writers, which commit plain creates and
    /// AuditEvents waiting together in one transaction each (see [`writer::start_pg`]); `None` on
    /// SQLite.
    pg_writer: Option<std::sync::mpsc::Sender<(Arc<Slot>, WriteUnit)>>,
    /// SQLite: checkpoints the write-ahead log off the writer's path; stops with the store.
    _checkpointer: Option<db::Checkpointer>,
    /// SQLite: keeps the database file in memory when asked to (see [`resident`]); stops with
    /// the store.
    resident: parking_lot::Mutex<Option<resident::Keeper>>,
    group_commits: std::sync::atomic::AtomicU64,
    /// SQLite: the data keys met in the group commit's transaction under way, by scope (class,
    /// patient), with their window's end; `None` outside it (see `scoped_key`).
    group_keys: parking_lot::Mutex<Option<KeyMemo>>,
    wal_syncs: std::sync::atomic::AtomicU64,
    /// SQLite: the group commits made durable by those fsyncs (each fsync covers every group
    /// committed before it).
    synced_groups: std::sync::atomic::AtomicU64,
    /// Woken after every commit: the messaging hub tails the event log when it fires.
    pub changed: Arc<tokio::sync::Notify>,
    /// The retention classes: each version's class scopes its data key.
    pub retention: crate::retention::Policy,
    /// What the modules above the store add to its transactions (registered at start-up).
    hooks: Arc<dyn hooks::Hooks>,
    /// The master key file, re-read when a data key is wrapped by a master key not known here.
    pub key_file: Option<std::path::PathBuf>,
    /// The audit chain's HMAC key, once loaded ([`Store::chain_key`]).
    pub chain_key: std::sync::OnceLock<Vec<u8>>,
    /// AuditEvent ids from their rows and back (`audit_rows::Ids`), keyed by the chain key: set
    /// when the store opens.
    audit_ids: std::sync::OnceLock<audit_rows::Ids>,
    /// The most candidates a search checks on their bodies (`search::UNSTORED`); more, and the
    /// search is refused as too costly. [`BODY_CANDIDATES`] unless a test lowers it.
    pub body_candidates: std::sync::atomic::AtomicUsize,
    /// Whether writes succeed now (see [`health`]).
    pub health: health::WriteHealth,
    /// Bodies are compressed before they are sealed ([`compress`]); off only to measure what it
    /// saves (`COURIER_STORE_COMPRESS=false`). Either way every row stays readable.
    pub compress_bodies: std::sync::atomic::AtomicBool,
}

/// Data keys by scope (class, patient): key id and the end of its write window.
type KeyMemo = HashMap<(String, String), (String, i64)>;

/// A write unit: one request's writes (or one AuditEvent) for the writer (not "a job": that word
/// is for background work, `crate::background` in the application). Whatever can be made before the transaction (the stored body,
/// the index entries, the AuditEvent of a plain create) is made before the unit is queued, so the
/// single SQLite writer spends its turn on rows only.
enum WriteUnit {
    Ops(Vec<Prepared>, audit::Context),
    Audit(AuditDraft),
}

impl WriteUnit {
    /// The id of the request the job is for, if any.
    fn request_id(&self) -> Option<&str> {
        match self {
            WriteUnit::Ops(_, ctx) => Some(ctx.request_id.as_str()),
            WriteUnit::Audit(a) => a.value["entity"].as_array()?.iter().find_map(|e| {
                (e["type"]["code"] == "XrequestId")
                    .then(|| e["what"]["identifier"]["value"].as_str())
                    .flatten()
            }),
        }
        .filter(|id| !id.is_empty())
    }
}

/// An operation, and for a plain create (no `If-None-Exist`) its version and AuditEvent drafted
/// ahead.
struct Prepared {
    op: WriteOp,
    ahead: Option<(Draft, AuditDraft)>,
}

/// A version made ready outside the transaction: everything but its rows, its data key and seal.
struct Draft {
    version_id: i64,
    last_updated: i64,
    /// The stored JSON; `None` for a deletion.
    body: Option<Vec<u8>>,
    /// What is sealed: the JSON compressed ([`compress::pack`]), made on the caller's thread.
    packed: Option<Vec<u8>>,
    /// Retention class and scope patient: which data key seals it.
    class: String,
    patient: String,
    entries: Vec<Entry>,
}

impl Draft {
    /// What the write of this draft returns.
    fn stored(&self, res_type: &str, id: &str, method: &str) -> Stored {
        Stored {
            res_type: res_type.into(),
            id: id.into(),
            version_id: self.version_id,
            last_updated: self.last_updated,
            deleted: self.body.is_none(),
            method: method.into(),
            body: self.body.clone(),
        }
    }
}

/// The version table and its columns, as every INSERT of a version names them, and one row's
/// values: the data key is bound by its text id and stored as its number (`data_keys.n`).
const VERSION_ROW: &str =
    "resource_versions (rid, res_type, version_id, last_updated, method, deleted, key_n, body)";
const VERSION_VALUES: &str = "(?, ?, ?, ?, ?, ?, (SELECT n FROM data_keys WHERE key_id = ?), ?)";

/// A version row as read (`VersionRow`), from `resource_versions v JOIN resources r`: its key's
/// text id through the number (a key gone makes that one version unreadable, as its text id did
/// before, not the whole query fail).
const VERSION_COLUMNS: &str = "v.vid, v.rid, v.res_type, r.fhir_id, v.version_id, v.last_updated, \
    v.method, v.deleted, COALESCE((SELECT k.key_id FROM data_keys k WHERE k.n = v.key_n), '') AS key_id, v.body";

/// Job `i` of a PostgreSQL group is not a plain create (the queue takes nothing else).
fn not_grouped(i: usize) -> BatchAbort {
    let e = anyhow::anyhow!("only plain creates are written in a group");
    BatchAbort::Unit(i, StoreError::Other(e))
}

/// An AuditEvent ready to insert: its content and drafted row (its id is given with its row, see
/// `audit_rows`; the drafted body names none, and the id is put back when it is read).
struct AuditDraft {
    value: Value,
    draft: Draft,
}

/// Why a group-commit transaction stopped: one job failed, or the database did.
enum BatchAbort {
    Unit(usize, StoreError),
    Store(StoreError),
}

impl BatchAbort {
    /// Job `i`'s failure `e`: the job's own, unless the database failed (full, unreachable, a
    /// timeout), which no job is to blame for: then the whole group gets one answer, instead of
    /// each job being tried again alone (behind a 20 s lock timeout, job k of a group would wait
    /// about 40 × (k + 1) s).
    fn blame(i: usize, e: StoreError) -> BatchAbort {
        if health::unavailable(&e).is_some() {
            BatchAbort::Store(e)
        } else {
            BatchAbort::Unit(i, e)
        }
    }
}

impl From<diesel::result::Error> for BatchAbort {
    fn from(e: diesel::result::Error) -> Self {
        BatchAbort::Store(e.into())
    }
}

type WriteUnitResult = Result<Vec<WriteResult>, StoreError>;

/// Each job of a group with its outcome.
type Answers = Vec<(Arc<Slot>, WriteUnitResult)>;

/// Where a queued job's result goes once committed (and durable): to the thread waiting on
/// `ready`, or through an async caller's channel.
struct Slot {
    result: parking_lot::Mutex<Option<WriteUnitResult>>,
    ready: parking_lot::Condvar,
    /// An async caller's channel: answered through it instead of `result` (see
    /// [`Store::write_async`]).
    reply: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<WriteUnitResult>>>,
    /// Answered: a slot keeps its first answer (a PostgreSQL group answers the halves of a
    /// group it had to split as each commits; the writer's own answer then changes nothing).
    answered: std::sync::atomic::AtomicBool,
}

/// Answers every slot it holds with an error if dropped while the thread panics.
struct AnswerOnUnwind(Vec<Arc<Slot>>);

impl Drop for AnswerOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for s in &self.0 {
                s.answer(Err(StoreError::Other(anyhow::anyhow!(
                    "the group commit failed unexpectedly"
                ))));
            }
        }
    }
}

impl Slot {
    fn new(reply: Option<tokio::sync::oneshot::Sender<WriteUnitResult>>) -> Arc<Slot> {
        Arc::new(Slot {
            result: parking_lot::Mutex::new(None),
            ready: parking_lot::Condvar::new(),
            reply: parking_lot::Mutex::new(reply),
            answered: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn answer(&self, r: WriteUnitResult) {
        if self
            .answered
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        if let Some(tx) = self.reply.lock().take() {
            // The caller may have gone (its request was cancelled): the job's outcome stands.
            let _ = tx.send(r);
            return;
        }
        *self.result.lock() = Some(r);
        self.ready.notify_all();
    }

    fn wait(&self) -> WriteUnitResult {
        let mut r = self.result.lock();
        loop {
            if let Some(r) = r.take() {
                return r;
            }
            self.ready.wait(&mut r);
        }
    }
}

impl Store {
    /// Connects, migrates and loads the data keys (creating the first one on a new database).
    pub fn open(
        db: Db,
        keys: Keyring,
        registry: Arc<Registry>,
        base_url: &str,
        retention: crate::retention::Policy,
        key_file: Option<std::path::PathBuf>,
        hooks: Arc<dyn hooks::Hooks>,
    ) -> anyhow::Result<Arc<Store>> {
        let checkpointer = db::Checkpointer::start(&db);
        let sqlite = matches!(db, Db::Sqlite(..));
        let store = Arc::new_cyclic(|weak: &std::sync::Weak<Store>| {
            let writer = sqlite.then(|| writer::start(weak.clone()));
            let pg_writer = match &db {
                Db::Postgres(pool) => Some(writer::start_pg(
                    weak.clone(),
                    (pool.max_size() / 2).clamp(1, writer::PG_WRITERS),
                )),
                Db::Sqlite(..) => None,
            };
            Store {
                db,
                keys,
                registry,
                base_url: base_url.to_string(),
                sqlite_writer: parking_lot::Mutex::new(()),
                writer,
                pg_writer,
                _checkpointer: checkpointer,
                resident: parking_lot::Mutex::new(None),
                group_commits: Default::default(),
                group_keys: parking_lot::Mutex::new(None),
                wal_syncs: Default::default(),
                synced_groups: Default::default(),
                changed: Arc::new(tokio::sync::Notify::new()),
                retention,
                hooks,
                key_file,
                chain_key: std::sync::OnceLock::new(),
                audit_ids: std::sync::OnceLock::new(),
                body_candidates: std::sync::atomic::AtomicUsize::new(BODY_CANDIDATES),
                health: Default::default(),
                compress_bodies: std::sync::atomic::AtomicBool::new(true),
            }
        });
        store.load_keys()?;
        let chain_key = store.chain_key()?;
        let _ = store.audit_ids.set(audit_rows::Ids::new(&chain_key));
        Ok(store)
    }

    /// One statement on a pooled connection, outside the resource write path: for the
    /// authorization server's own tables (clients, signing keys, used assertions, revocations)
    /// and the jobs' bookkeeping. On SQLite it takes the single writer's lock, so it queues behind
    /// the group commits instead of waiting in SQLite's busy handler (measured under the write
    /// benchmark: one `UPDATE job_cursors` waited ~280 ms there). Not to be called while holding
    /// [`Store::exclusive_writer`].
    pub fn execute(&self, sql: &str, binds: Vec<Bind>) -> Result<usize, StoreError> {
        let _writer = self.exclusive_writer();
        let mut c = self.db.get()?;
        Ok(with_conn!(c, |c| c.execute(sql, binds))?)
    }

    /// A query on a pooled connection (see [`Store::execute`]).
    pub fn query<T>(&self, sql: &str, binds: Vec<Bind>) -> Result<Vec<T>, StoreError>
    where
        T: diesel::QueryableByName<diesel::sqlite::Sqlite>
            + diesel::QueryableByName<diesel::pg::Pg>
            + 'static,
    {
        self.query_on(&mut self.db.get()?, sql, binds)
    }

    /// [`Store::query`] on a connection the caller holds (see [`db::Db::get_now`]).
    pub fn query_on<T>(
        &self,
        c: &mut db::PooledConn,
        sql: &str,
        binds: Vec<Bind>,
    ) -> Result<Vec<T>, StoreError>
    where
        T: diesel::QueryableByName<diesel::sqlite::Sqlite>
            + diesel::QueryableByName<diesel::pg::Pg>
            + 'static,
    {
        Ok(with_conn!(c, |c| c.load_cached(sql, binds))?)
    }

    /// Is the database reachable?
    pub fn ping(&self) -> bool {
        let Ok(mut c) = self.db.get() else {
            return false;
        };
        with_conn!(c, |c| c
            .load::<CountRow>("SELECT CAST(1 AS BIGINT) AS n", vec![]))
        .is_ok()
    }

    // ----- writes -------------------------------------------------------------------------------

    /// Applies `ops` in one transaction, all or nothing, with an AuditEvent per op in the same
    /// transaction.
    pub fn write(
        &self,
        ops: Vec<WriteOp>,
        ctx: &audit::Context,
    ) -> Result<Vec<WriteResult>, StoreError> {
        self.submit(self.prepare(ops, ctx))
    }

    /// [`Store::write`] for async callers. On SQLite the caller's task waits for the writer
    /// thread's answer without holding a thread of its own (the drafting, which is CPU work of a
    /// fraction of a millisecond, runs on the caller's thread); PostgreSQL's blocking driver runs
    /// on the blocking pool.
    pub async fn write_async(
        self: &Arc<Self>,
        ops: Vec<WriteOp>,
        ctx: &audit::Context,
    ) -> Result<Vec<WriteResult>, StoreError> {
        self.submit_async(self.prepare(ops, ctx)).await
    }

    /// [`Store::record_audit`] for async callers (see [`Store::write_async`]).
    pub async fn record_audit_async(self: &Arc<Self>, event: Value) -> Result<(), StoreError> {
        self.submit_async(WriteUnit::Audit(self.audit_draft(event)))
            .await
            .map(|_| ())
    }

    /// [`Store::submit`] without holding a thread while the SQLite writer works; PostgreSQL's
    /// blocking driver runs on the blocking pool.
    async fn submit_async(self: &Arc<Self>, job: WriteUnit) -> WriteUnitResult {
        let r = self.submit_async_unobserved(job).await;
        self.health.observe(&r);
        r
    }

    async fn submit_async_unobserved(self: &Arc<Self>, job: WriteUnit) -> WriteUnitResult {
        // No caller waits longer than this for its write: a database that stops answering without
        // breaking the connection (seen in an outside fault probe) would otherwise hold every
        // request for the whole outage. The write may still complete: the answer says so.
        let late = || {
            StoreError::Other(anyhow::anyhow!(
                "{WRITE_WAIT_TEXT} {} s",
                WRITE_WAIT.as_secs()
            ))
        };
        let Some(writer) = self.queue_for(&job) else {
            let store = self.clone();
            let done = tokio::task::spawn_blocking(move || store.submit(job));
            return tokio::time::timeout(WRITE_WAIT, done)
                .await
                .map_err(|_| late())?
                .map_err(|e| StoreError::Other(anyhow::anyhow!("the write failed: {e}")))?;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        writer
            .send((Slot::new(Some(tx)), job))
            .map_err(|_| writer::gone())?;
        tokio::time::timeout(WRITE_WAIT, rx)
            .await
            .map_err(|_| late())?
            .map_err(|_| writer::gone())?
    }

    /// The group-commit queue that takes `job`: on SQLite the single writer's, for every job; on
    /// PostgreSQL the group-commit writers', for plain creates only. Those lock no existing row
    /// but the data keys they seal with (shared, in a fixed order, see `put_new_versions`), so a
    /// transaction of many of them does not deadlock with another writer; and each records an
    /// event, whose lock is held to the commit, which is what grouping them saves. Updates,
    /// deletes and conditional creates lock resource rows and run in a transaction of their own;
    /// so do AuditEvents alone (a read's): they take no event lock, PostgreSQL flushes
    /// concurrent commits together by itself, and through a writer thread a search's p50 was
    /// ~0.3 ms slower (docs/benchmarks.md).
    fn queue_for(
        &self,
        job: &WriteUnit,
    ) -> Option<&std::sync::mpsc::Sender<(Arc<Slot>, WriteUnit)>> {
        if let Some(w) = &self.writer {
            return Some(w);
        }
        let plain_creates =
            matches!(job, WriteUnit::Ops(ops, _) if ops.iter().all(|p| p.ahead.is_some()));
        self.pg_writer.as_ref().filter(|_| plain_creates)
    }

    /// The job for `ops`: what can be made before the transaction (a plain create's version and
    /// AuditEvent) is drafted here, so the single SQLite writer spends its turn on rows only.
    fn prepare(&self, ops: Vec<WriteOp>, ctx: &audit::Context) -> WriteUnit {
        let ops = ops
            .into_iter()
            .map(|op| {
                let ahead = match &op {
                    WriteOp::Create {
                        res_type,
                        id,
                        resource,
                        if_none_exist: None,
                    } => {
                        let own = self.draft(res_type, id, None, Some(resource));
                        let what = format!("{res_type}/{id}/_history/1");
                        let patient = audit::patient_of(&resource.value);
                        let ev = audit::event(
                            ctx,
                            Interaction::Create,
                            Some(&what),
                            patient.as_deref(),
                            None,
                        );
                        Some((own, self.audit_draft(ev)))
                    }
                    _ => None,
                };
                Prepared { op, ahead }
            })
            .collect();
        WriteUnit::Ops(ops, ctx.clone())
    }

    /// A durability barrier for work that tells the outside world about what it read (the event
    /// log's readers: WebSockets, subscriptions): everything committed before this call is
    /// durable when it returns. Only the SQLite group commit defers its fsync (see `submit`), so
    /// elsewhere this does nothing.
    pub fn settle(&self) -> Result<(), StoreError> {
        self.db
            .sync_wal()
            .map_err(|e| StoreError::Other(anyhow::anyhow!("fsync of the write-ahead log: {e}")))
    }

    /// For a transaction outside the resource write path: on SQLite, the single writer's lock (so
    /// it queues behind group commits instead of failing busy); nothing on PostgreSQL.
    pub fn exclusive_writer(&self) -> Option<parking_lot::MutexGuard<'_, ()>> {
        matches!(self.db, Db::Sqlite(..)).then(|| self.sqlite_writer.lock())
    }

    /// SQLite: keeps the first `limit_bytes` of the database file in memory from now on (see
    /// [`resident`]). Nothing on PostgreSQL.
    pub fn keep_resident(&self, limit_bytes: u64) -> anyhow::Result<()> {
        if let Db::Sqlite(_, path, _) = &self.db {
            let keeper = resident::Keeper::start(path.into(), limit_bytes)
                .map_err(|e| anyhow::anyhow!("cannot keep the SQLite database in memory: {e}"))?;
            *self.resident.lock() = Some(keeper);
        }
        Ok(())
    }

    /// Bytes of the database file kept in memory (0 when not asked to, or on PostgreSQL).
    pub fn resident_bytes(&self) -> u64 {
        self.resident.lock().as_ref().map_or(0, |k| k.mapped())
    }

    /// Erases resources for good, inside the caller's write transaction: first what the modules
    /// above keep about them ([`hooks::Hooks::erased`]), then the index rows of other resources
    /// that point at them (replies, AuditEvents, requests), their own index rows, every version
    /// and the resource rows. Returns how many versions went.
    pub fn erase_resources<C: Conn>(
        &self,
        c: &mut C,
        targets: &[(i64, &str, &str)],
    ) -> Result<usize, StoreError> {
        if targets.is_empty() {
            return Ok(0);
        }
        let erased: Vec<hooks::Erased> = targets
            .iter()
            .map(|(_, t, id)| hooks::Erased { res_type: t, id })
            .collect();
        c.erased(&*self.hooks, &erased)?;
        let mut by_type: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for (_, t, id) in targets {
            by_type.entry(t).or_default().push(id);
        }
        let ref_keys = self.registry.reference_keys();
        let key_marks = vec!["?"; ref_keys.len()].join(", ");
        for (res_type, ids) in &by_type {
            let id_marks = vec!["?"; ids.len()].join(", ");
            let mut binds: Vec<Bind> = ref_keys
                .iter()
                .map(|k| names::key(k).to_string().into())
                .collect();
            binds.push(names::ty(res_type).into());
            binds.extend(ids.iter().map(|i| Bind::from(*i)));
            // Other resources' rows, and AuditEvents' (keyed by target, `audit_rows`).
            for table in ["idx_ref", "audit_refs"] {
                c.execute(
                    &format!("DELETE FROM {table} WHERE param IN ({key_marks}) AND target_type = ? AND target_id IN ({id_marks})"),
                    binds.clone(),
                )?;
            }
        }
        let (audits, targets): (Vec<_>, Vec<_>) = targets
            .iter()
            .partition(|(_, t, _)| audit_rows::is_audit(t));
        let audits: Vec<i64> = audits.iter().map(|(rid, _, _)| *rid).collect();
        let mut versions = self.erase_audits(c, &audits)?;
        if targets.is_empty() {
            return Ok(versions);
        }
        let rids: Vec<Bind> = targets.iter().map(|(rid, _, _)| Bind::Int(*rid)).collect();
        let rid_marks = vec!["?"; targets.len()].join(", ");
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        versions += c.load::<N>(
            &format!("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM resource_versions WHERE rid IN ({rid_marks})"),
            rids.clone(),
        )?[0]
            .n as usize;
        for t in ["idx_token", "idx_ref", "idx_date", "idx_string"] {
            c.execute(
                &format!("DELETE FROM {t} WHERE rid IN ({rid_marks})"),
                rids.clone(),
            )?;
        }
        c.execute(
            &format!("DELETE FROM resource_versions WHERE rid IN ({rid_marks})"),
            rids.clone(),
        )?;
        c.execute(
            &format!("DELETE FROM resources WHERE rid IN ({rid_marks})"),
            rids,
        )?;
        Ok(versions)
    }

    /// The local references of the AuditEvent in row `rid` under `params` (`AuditEvent.entity`, …),
    /// as (parameter, `Type/id`), read from its body (its reference rows are keyed by target).
    pub fn audit_references<C: Conn>(
        &self,
        c: &mut C,
        rid: i64,
        params: &[&str],
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .audit_local_refs(c, &[rid])?
            .into_iter()
            .filter(|(param, _, _)| params.contains(&param.as_str()))
            .map(|(param, t, id)| (param, format!("{t}/{id}")))
            .collect())
    }

    /// The local references (parameter, type, id) of the AuditEvents in rows `rids`, read from
    /// their bodies (their reference rows are keyed by target, not by event).
    fn audit_local_refs<C: Conn>(
        &self,
        c: &mut C,
        rids: &[i64],
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let mut out = Vec::new();
        for (_, s) in self.bodies_by_rid(c, audit_rows::TYPE, rids)? {
            let Some(value) = s
                .body
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
            else {
                continue;
            };
            for e in index::entries(&self.registry, audit_rows::TYPE, &value, &self.base_url) {
                if let Entry::Ref {
                    param,
                    target_type: Some(t),
                    target_id: Some(id),
                    url: None,
                } = e
                {
                    out.push((param, t, id));
                }
            }
        }
        Ok(out)
    }

    /// Erases the AuditEvents in rows `rids` (the retention purge's cut of the audit trail), inside
    /// the caller's write transaction: their reference rows (found from their bodies: the table is
    /// keyed by target; an event whose body cannot be read any more has its rows found by a scan),
    /// outcome rows and rows. Returns how many went.
    fn erase_audits<C: Conn>(&self, c: &mut C, rids: &[i64]) -> Result<usize, StoreError> {
        if rids.is_empty() {
            return Ok(0);
        }
        let mut unread: Vec<i64> = Vec::new();
        let mut keys: Vec<Bind> = Vec::new();
        for chunk in rids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let rows: Vec<VersionRow> = c.load(
                &format!(
                    "SELECT {} FROM audit_events r WHERE r.rid IN ({marks})",
                    audit_rows::ROW_COLUMNS
                ),
                chunk.iter().map(|r| Bind::Int(*r)).collect(),
            )?;
            for row in rows {
                let rid = row.rid;
                let value = self
                    .open_row(row)
                    .ok()
                    .and_then(|s| serde_json::from_slice::<Value>(s.body.as_deref()?).ok());
                let Some(value) = value else {
                    unread.push(rid);
                    continue;
                };
                let entries =
                    index::entries(&self.registry, audit_rows::TYPE, &value, &self.base_url);
                let (_, at_hi) = audit_rows::date_of(&entries);
                for (param, id, ty) in entries.iter().filter_map(audit_rows::ref_key) {
                    keys.extend([
                        param.into(),
                        id.into(),
                        ty.into(),
                        at_hi.unwrap_or(0).into(),
                        rid.into(),
                    ]);
                }
            }
        }
        let mut deleted = 0;
        for chunk in keys.chunks(5 * 100) {
            let rows = vec![
                    "(param = ? AND target_id = ? AND target_type = ? AND at_hi = ? AND rid = ?)";
                    chunk.len() / 5
                ];
            deleted += c.execute(
                &format!("DELETE FROM audit_refs WHERE {}", rows.join(" OR ")),
                chunk.to_vec(),
            )?;
        }
        // None of the rows the bodies name (another build indexed them differently): found by
        // a scan instead, so that none outlives its event. (Fewer is normal: an erasure takes a
        // person's rows out of the events that name them.)
        if deleted == 0 && !keys.is_empty() {
            unread = rids.to_vec();
        }
        let mut n = 0;
        for chunk in rids.chunks(500) {
            let marks = vec!["?"; chunk.len()].join(", ");
            let binds: Vec<Bind> = chunk.iter().map(|r| Bind::Int(*r)).collect();
            if chunk.iter().any(|r| unread.contains(r)) {
                c.execute(
                    &format!("DELETE FROM audit_refs WHERE rid IN ({marks})"),
                    binds.clone(),
                )?;
            }
            c.execute(
                &format!("DELETE FROM audit_tokens WHERE rid IN ({marks})"),
                binds.clone(),
            )?;
            n += c.execute(
                &format!("DELETE FROM audit_events WHERE rid IN ({marks})"),
                binds,
            )?;
        }
        Ok(n)
    }

    /// Takes `target` (`Type/id`) out of the reference index rows of `params` (parameter URLs or
    /// keys as [`crate::search::Registry::get`] names them `Type.param`): kept resources no longer
    /// name an erased person in the index. Inside the caller's write transaction.
    pub fn forget_references<C: Conn>(
        &self,
        c: &mut C,
        params: &[&str],
        target: &str,
    ) -> Result<usize, StoreError> {
        let Some((t, id)) = target.split_once('/') else {
            return Ok(0);
        };
        let marks = vec!["?"; params.len()].join(", ");
        let mut binds: Vec<Bind> = params.iter().map(|p| Bind::from(names::key(p))).collect();
        binds.push(names::ty(t).into());
        binds.push(id.into());
        // AuditEvents' rows too (`audit_rows`: an absolute reference is typed '/', never `t`).
        let audits = c.execute(
            &format!("DELETE FROM audit_refs WHERE param IN ({marks}) AND target_type = ? AND target_id = ?"),
            binds.clone(),
        )?;
        Ok(audits
            + c.execute(
                &format!("DELETE FROM idx_ref WHERE param IN ({marks}) AND target_type = ? AND target_id = ? AND url IS NULL"),
                binds,
            )?)
    }

    /// Retires every active data key scoped to `patient` (`Patient/id`): new writes about them get
    /// new keys from now on.
    pub fn retire_patient_keys(&self, patient: &str) -> Result<usize, StoreError> {
        self.execute(
            "UPDATE data_keys SET retired_at = ? WHERE patient = ? AND retired_at IS NULL",
            vec![crate::clock::now_micros().into(), patient.into()],
        )
    }

    /// Tells the waiters on [`Store::changed`] that something committed outside the write path
    /// (a receipt set in a transaction of its own).
    pub fn notify_changed(&self) {
        self.changed.notify_one();
    }

    /// Records an AuditEvent on its own (reads, searches, and failed interactions whose own
    /// transaction rolled back).
    pub fn record_audit(&self, event: Value) -> Result<(), StoreError> {
        self.submit(WriteUnit::Audit(self.audit_draft(event)))
            .map(|_| ())
    }

    /// PostgreSQL: each job in its own transaction (writers run concurrently). SQLite has one
    /// writer: the writer thread (see [`writer`]) commits every job waiting in its queue as one
    /// transaction (group commit), and leaves the group's fsync to the syncer thread behind it,
    /// so the next group's transaction runs while the last one is made durable. Durability is
    /// unchanged (every job is committed, and with `synchronous = FULL` its write-ahead log
    /// fsynced, before it is answered); nobody is told of a commit (answer, `changed`) before it
    /// is durable.
    ///
    /// A job that fails (412, 409, …) must not take the others with it. Savepoints per job would
    /// do that but make SQLite copy every touched page to a sub-journal (measured: a third of the
    /// write time), so instead the batch runs optimistically and, when a job fails, the whole
    /// transaction is rolled back and re-run without that job, which is answered with its error.
    fn submit(&self, job: WriteUnit) -> WriteUnitResult {
        let r = self.submit_unobserved(job);
        self.health.observe(&r);
        r
    }

    fn submit_unobserved(&self, job: WriteUnit) -> WriteUnitResult {
        let Some(writer) = self.queue_for(&job) else {
            let mut c = self.db.get()?;
            let r = with_conn!(c, |c| c.write_tx(|c| {
                let mut ix = IndexRows::default();
                let r = self.run_unit(c, &job, &mut ix)?;
                ix.flush(c)?;
                Ok(r)
            }));
            self.changed.notify_one();
            return r;
        };
        let slot = Slot::new(None);
        writer
            .send((slot.clone(), job))
            .map_err(|_| writer::gone())?;
        slot.wait()
    }

    /// SQLite: commits `batch` in one transaction on the group-commit connection, re-running it
    /// without any job that fails. Called with the single writer's lock held. Returns each job's
    /// outcome; whether a commit was made that still needs [`Db::sync_wal`] to be durable; and
    /// the jobs committed, for the caller to free on a thread other than the writer's (freeing
    /// them was ~5% of the writer's time).
    fn commit_group(&self, batch: Vec<(Arc<Slot>, WriteUnit)>) -> (Answers, bool, Vec<WriteUnit>) {
        let mut pooled = match self.db.get() {
            Ok(db::PooledConn::Sqlite(c)) => c,
            Ok(db::PooledConn::Postgres(_)) => unreachable!("this group commit is SQLite's"),
            Err(e) => return (cannot_open(batch, &e), false, Vec::new()),
        };
        let deferred = self.db.defers_sync();
        let mut conn = db::DeferredSync::new(&mut pooled, deferred);
        let c: &mut diesel::SqliteConnection = &mut conn;
        let (outcomes, committed, spent) = self.commit_together(c, batch);
        (outcomes, committed && deferred, spent)
    }

    /// PostgreSQL: commits `batch` (plain creates, see [`Store::queue_for`]) in
    /// one transaction, re-running it without any job that fails. One commit (one flush of the
    /// write-ahead log) and one turn of the event lock serve the whole group: the event lock is
    /// held from an event's insert to the commit, so one transaction per write made every write
    /// wait for the previous one's flush.
    fn commit_group_pg(&self, batch: Vec<(Arc<Slot>, WriteUnit)>) -> (Answers, Vec<WriteUnit>) {
        let mut pooled = match self.db.get() {
            Ok(db::PooledConn::Postgres(c)) => c,
            Ok(db::PooledConn::Sqlite(_)) => unreachable!("this group commit is PostgreSQL's"),
            Err(e) => return (cannot_open(batch, &e), Vec::new()),
        };
        let c: &mut diesel::PgConnection = &mut pooled;
        let (outcomes, _, spent) = self.commit_together(c, batch);
        (outcomes, spent)
    }

    /// Commits `batch` in one transaction on `c`, re-running it without any job that fails (that
    /// job is answered with its error). Returns each job's outcome, whether a transaction
    /// committed, and the jobs committed.
    ///
    /// SQLite (one writer, which holds the only write lock): the data keys met are remembered
    /// for the transaction (see `scoped_key`), and each job's own additions (events, notices) are
    /// written with it. PostgreSQL (several writers at once): the group's rows with one INSERT
    /// per table ([`Store::run_group_pg`]), then the jobs' additions in one pass
    /// ([`Store::run_group_hooks`]), so that the event lock is taken after every row of the group
    /// is written, and held once to the commit. A
    /// failure no job can be blamed for commits each half of the group on its own instead.
    fn commit_together<C: Conn>(
        &self,
        c: &mut C,
        mut batch: Vec<(Arc<Slot>, WriteUnit)>,
    ) -> (Answers, bool, Vec<WriteUnit>) {
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut spent = Vec::with_capacity(batch.len());
        let postgres = c.is_postgres();
        while !batch.is_empty() {
            let attempt = c.write_tx(|c| {
                // Keys met in an attempt rolled back may be gone: each attempt starts afresh.
                if !postgres {
                    *self.group_keys.lock() = Some(HashMap::new());
                }
                // The group's index rows, inserted together at its end (see `IndexRows`).
                let mut ix = IndexRows::default();
                let results = if postgres {
                    self.run_group_pg(c, &batch, &mut ix)?
                } else {
                    let mut results = Vec::with_capacity(batch.len());
                    for (i, (_, job)) in batch.iter().enumerate() {
                        match self.run_unit(c, job, &mut ix) {
                            Ok(r) => results.push(r),
                            // Roll back everything; the failing job is answered, the rest re-run.
                            Err(e) => return Err(BatchAbort::blame(i, e)),
                        }
                    }
                    results
                };
                ix.flush(c).map_err(BatchAbort::Store)?;
                // PostgreSQL: the jobs' additions (events, notices, schedules) after every row
                // of the group: the event lock is taken at the first event and held to the
                // commit. A job whose additions fail (a schedule Courier cannot keep) is answered
                // with that error, the others re-run.
                if postgres {
                    self.run_group_hooks(c, &results)?;
                }
                Ok(results)
            });
            if !postgres {
                *self.group_keys.lock() = None;
            }
            match attempt {
                Ok(results) => {
                    for ((s, job), r) in batch.drain(..).zip(results) {
                        outcomes.push((s, Ok(r)));
                        spent.push(job);
                    }
                    self.group_commits
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return (outcomes, true, spent);
                }
                Err(BatchAbort::Unit(i, e)) => {
                    let (s, _) = batch.remove(i);
                    outcomes.push((s, Err(e)));
                }
                // PostgreSQL: a failure no job can be blamed for (the group's shared INSERTs)
                // fails no job that would have succeeded without it: each half of the group is
                // committed on its own, halved again while it fails, so a job that cannot be
                // written is left alone after a few attempts and the others are still grouped.
                // Not when the database itself is unavailable: no split would help. Each half is
                // answered once committed (durable at commit on PostgreSQL), so nothing that
                // goes wrong later can answer its jobs with an error.
                Err(BatchAbort::Store(e))
                    if postgres && batch.len() > 1 && health::unavailable(&e).is_none() =>
                {
                    let second = batch.split_off(batch.len() / 2);
                    let mut committed = false;
                    for half in [std::mem::take(&mut batch), second] {
                        let (o, done, s) = self.commit_together(c, half);
                        for (slot, r) in o {
                            slot.answer(r);
                            // Answered: a slot keeps its first answer (see `Slot::answer`).
                            let again = StoreError::Other(anyhow::anyhow!("answered already"));
                            outcomes.push((slot, Err(again)));
                        }
                        spent.extend(s);
                        committed |= done;
                    }
                    return (outcomes, committed, spent);
                }
                // One job: its own error, as it happened (a conflict to retry, the database
                // unreachable, a bad value).
                Err(BatchAbort::Store(e)) if batch.len() == 1 => {
                    let (s, _) = batch.remove(0);
                    outcomes.push((s, Err(e)));
                    break;
                }
                Err(BatchAbort::Store(e)) => {
                    // The requests it fails, by id (the writer thread is in none's log span).
                    let request_ids: Vec<&str> =
                        batch.iter().filter_map(|(_, j)| j.request_id()).collect();
                    tracing::error!(error = %e, jobs = batch.len(), request_ids = %request_ids.join(","), "group commit failed");
                    // Each job's error keeps what the group's was (the database unreachable, full,
                    // ...: 503, not 500 — a fault probe's creates got 500 when a group's
                    // connection was terminated).
                    let why = health::unavailable(&e).map_or(String::new(), |w| format!("{w}: "));
                    let msg = e.to_string();
                    for (s, _) in batch.drain(..) {
                        let e = StoreError::Other(anyhow::anyhow!("commit failed: {why}{msg}"));
                        outcomes.push((s, Err(e)));
                    }
                    break;
                }
            }
        }
        (outcomes, false, spent)
    }

    /// SQLite: how many group commits were made, how many of them Courier's own fsyncs made
    /// durable (all of them with `synchronous = FULL`, once answered; none otherwise), and how
    /// many fsyncs of the write-ahead log that took (one covers every group committed before it,
    /// so at most as many as groups).
    pub fn group_commit_stats(&self) -> (u64, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.group_commits.load(Relaxed),
            self.synced_groups.load(Relaxed),
            self.wal_syncs.load(Relaxed),
        )
    }

    /// PostgreSQL: runs a group of plain creates (see [`Store::queue_for`]; a lone AuditEvent too) with
    /// one multi-row INSERT per table for the whole group: every version's data key and seal
    /// first, then the resource rows, the version rows, each AuditEvent's outbox rows, and the
    /// index rows to `ix`. The caller runs the hooks. A failure that belongs to one job names it.
    fn run_group_pg<C: Conn>(
        &self,
        c: &mut C,
        batch: &[(Arc<Slot>, WriteUnit)],
        ix: &mut IndexRows,
    ) -> Result<Vec<Vec<WriteResult>>, BatchAbort> {
        // Every version the group writes, with its job, and each create's AuditEvent.
        let mut items: Vec<(usize, &str, &str, &Draft)> = Vec::new();
        let mut creates: Vec<(usize, &AuditDraft)> = Vec::new();
        for (i, (_, job)) in batch.iter().enumerate() {
            let WriteUnit::Ops(ops, _) = job else {
                return Err(not_grouped(i));
            };
            for p in ops {
                let (WriteOp::Create { res_type, id, .. }, Some((own, audit))) = (&p.op, &p.ahead)
                else {
                    return Err(not_grouped(i));
                };
                items.push((i, res_type, id, own));
                creates.push((i, audit));
            }
        }
        let stored = self.put_new_versions(c, &items, ix)?;
        let audits: Vec<&AuditDraft> = creates.iter().map(|(_, a)| *a).collect();
        let ids = self.put_audits(c, &audits, ix).map_err(BatchAbort::Store)?;
        let mut results: Vec<Vec<WriteResult>> = batch.iter().map(|_| Vec::new()).collect();
        // The AuditEvents' outbox rows, for the whole group at once (one lookup of whom they
        // go to); a failure there is the group's.
        let events: Vec<(&str, &Value)> = ids
            .iter()
            .zip(&audits)
            .map(|(id, a)| (id.as_str(), &a.value))
            .collect();
        c.audited(&*self.hooks, &events)
            .map_err(BatchAbort::Store)?;
        // Each create's own version.
        for ((i, _), own) in creates.into_iter().zip(stored) {
            results[i].push(WriteResult {
                status: WriteStatus::Created,
                stored: own,
            });
        }
        Ok(results)
    }

    /// PostgreSQL: writes the first version of each new resource of `items` (job, type, id,
    /// draft) with one INSERT per table (see [`multi_insert`]), in `items`' order.
    ///
    /// Each data-key scope (class, patient) is looked up once, in sorted order, as an erasure
    /// takes a patient's keys (`compliance::purge`): a group share-locks several patients' keys,
    /// and two transactions taking keys in different orders could deadlock.
    fn put_new_versions<C: Conn>(
        &self,
        c: &mut C,
        items: &[(usize, &str, &str, &Draft)],
        ix: &mut IndexRows,
    ) -> Result<Vec<Stored>, BatchAbort> {
        const ROWS: usize = 64;
        // Each scope's key, for the latest write time of its versions (its window must hold all).
        let mut scopes: std::collections::BTreeMap<(&str, &str), (usize, i64)> = Default::default();
        for &(i, _, _, d) in items {
            let e = scopes
                .entry((&d.class, &d.patient))
                .or_insert((i, d.last_updated));
            e.1 = e.1.max(d.last_updated);
        }
        let mut keys: HashMap<(&str, &str), String> = HashMap::with_capacity(scopes.len());
        for ((class, patient), (i, now)) in scopes {
            let key_id = self
                .scoped_key(c, class, patient, now)
                .map_err(|e| BatchAbort::blame(i, e))?;
            keys.insert((class, patient), key_id);
        }
        let mut sealed = Vec::with_capacity(items.len());
        for &(i, res_type, id, d) in items {
            let key_id = &keys[&(d.class.as_str(), d.patient.as_str())];
            let body = self
                .seal(c, key_id, res_type, id, d)
                .map_err(|e| BatchAbort::blame(i, e))?;
            sealed.push((key_id.clone(), body));
        }
        let shared = |e: diesel::result::Error| BatchAbort::Store(e.into());
        let mut rids: HashMap<(&str, &str), i64> = HashMap::with_capacity(items.len());
        for chunk in items.chunks(ROWS) {
            let mut binds = Vec::with_capacity(chunk.len() * 6);
            for &(_, res_type, id, d) in chunk {
                binds.extend([
                    res_type.into(),
                    id.into(),
                    d.version_id.into(),
                    d.last_updated.into(),
                    i64::from(d.body.is_none()).into(),
                    d.class.clone().into(),
                ]);
            }
            let values = vec!["(?, ?, ?, ?, ?, ?)"; chunk.len()].join(", ");
            let rows: Vec<rows::InsertedRow> = c
                .load_cached(
                    &format!(
                        "INSERT INTO resources (res_type, fhir_id, version_id, last_updated, deleted, retention_class) \
                         VALUES {values} RETURNING rid, res_type, fhir_id"
                    ),
                    binds,
                )
                .map_err(shared)?;
            let by_key: HashMap<(String, String), i64> = rows
                .into_iter()
                .map(|r| ((r.res_type, r.fhir_id), r.rid))
                .collect();
            for &(_, res_type, id, _) in chunk {
                let rid = by_key
                    .get(&(res_type.to_string(), id.to_string()))
                    .ok_or_else(|| {
                        BatchAbort::Store(StoreError::Other(anyhow::anyhow!(
                            "a resource row was not returned by its insert"
                        )))
                    })?;
                rids.insert((res_type, id), *rid);
            }
        }
        let mut out = Vec::with_capacity(items.len());
        let mut binds = Vec::with_capacity(items.len() * 8);
        for (&(_, res_type, id, d), (key_id, body)) in items.iter().zip(sealed) {
            let rid = rids[&(res_type, id)];
            binds.extend([
                rid.into(),
                res_type.into(),
                d.version_id.into(),
                d.last_updated.into(),
                "POST".into(),
                i64::from(d.body.is_none()).into(),
                key_id.into(),
                Bind::Blob(body),
            ]);
            if d.body.is_some() {
                ix.add(rid, res_type, &d.entries);
            }
            out.push(d.stored(res_type, id, "POST"));
        }
        multi_insert_rows(c, "INSERT INTO", VERSION_ROW, VERSION_VALUES, 8, binds)
            .map_err(BatchAbort::Store)?;
        Ok(out)
    }

    /// Runs one job. The index rows of the versions it writes itself (a plain create's, every
    /// AuditEvent's) go to `ix`, for the caller to insert with others (see [`IndexRows`]); before
    /// an operation that reads the index (a conditional create, an update's access check) they
    /// are flushed.
    fn run_unit<C: Conn>(&self, c: &mut C, job: &WriteUnit, ix: &mut IndexRows) -> WriteUnitResult {
        match job {
            WriteUnit::Audit(a) => {
                self.insert_audit(c, a, ix)?;
                Ok(vec![])
            }
            WriteUnit::Ops(ops, ctx) => {
                let mut results = Vec::with_capacity(ops.len());
                for Prepared { op, ahead } in ops {
                    let (r, audited) = match (op, ahead) {
                        (WriteOp::Create { res_type, id, .. }, Some((own, audit))) => {
                            let stored = self.put_draft(c, res_type, id, None, own, "POST", ix)?;
                            let r = WriteResult {
                                status: WriteStatus::Created,
                                stored,
                            };
                            (r, Some(audit))
                        }
                        _ => {
                            ix.flush(c)?;
                            (self.apply(c, op)?, None)
                        }
                    };
                    if r.status != WriteStatus::Existing {
                        match audited {
                            Some(a) => self.insert_audit(c, a, ix)?,
                            None => {
                                let patient = match op {
                                    WriteOp::Create { resource, .. }
                                    | WriteOp::Update { resource, .. } => {
                                        audit::patient_of(&resource.value)
                                    }
                                    WriteOp::Delete { .. } | WriteOp::Unchanged { .. } => None,
                                };
                                let what = format!(
                                    "{}/{}/_history/{}",
                                    r.stored.res_type, r.stored.id, r.stored.version_id
                                );
                                let ev = audit::event(
                                    ctx,
                                    op.interaction(),
                                    Some(&what),
                                    patient.as_deref(),
                                    None,
                                );
                                self.insert_audit(c, &self.audit_draft(ev), ix)?;
                            }
                        }
                    }
                    results.push(r);
                }
                // PostgreSQL: the gathered index rows go in before the events, so that no round
                // trip falls inside the event lock (SQLite inserts them at the group's end).
                if c.is_postgres() {
                    ix.flush(c)?;
                }
                self.run_hooks(c, &results)?;
                Ok(results)
            }
        }
    }

    /// What the modules above add to a job's writes (messaging events, schedules, notices), last,
    /// once every row lock is held (see `messaging::events::lock`).
    fn run_hooks<'a, C: Conn>(
        &self,
        c: &mut C,
        results: impl IntoIterator<Item = &'a WriteResult>,
    ) -> Result<(), StoreError> {
        let written: Vec<hooks::Written> = results
            .into_iter()
            .filter(|r| {
                !matches!(
                    r.status,
                    WriteStatus::Existing | WriteStatus::NothingToDelete
                )
            })
            .map(|r| hooks::Written {
                res_type: &r.stored.res_type,
                id: &r.stored.id,
                version_id: r.stored.version_id,
                status: r.status,
                body: r.stored.body.as_deref(),
            })
            .collect();
        if !written.is_empty() {
            c.written(&*self.hooks, &written)?;
        }
        Ok(())
    }

    /// PostgreSQL: a group's additions in one pass (every job's notices and schedules, then all
    /// their events in one INSERT, so the event lock is held only from there to the commit). If
    /// that fails it is undone (a savepoint) and each job's additions run on their own, in order,
    /// so that the job that fails is named and answered with its own error.
    fn run_group_hooks<C: Conn>(
        &self,
        c: &mut C,
        results: &[Vec<WriteResult>],
    ) -> Result<(), BatchAbort> {
        if results.len() > 1 {
            c.execute("SAVEPOINT group_additions", vec![])
                .map_err(|e| BatchAbort::Store(e.into()))?;
            match self.run_hooks(c, results.iter().flatten()) {
                Ok(()) => return Ok(()),
                // The database failed: no job's alone would do better.
                Err(e) if health::unavailable(&e).is_some() => return Err(BatchAbort::Store(e)),
                Err(e) => {
                    tracing::debug!(error = %e, "a group's additions failed together; each job's alone")
                }
            }
            c.execute("ROLLBACK TO SAVEPOINT group_additions", vec![])
                .map_err(|e| BatchAbort::Store(e.into()))?;
        }
        for (i, r) in results.iter().enumerate() {
            self.run_hooks(c, r).map_err(|e| BatchAbort::blame(i, e))?;
        }
        Ok(())
    }

    /// An AuditEvent drafted for insertion. Its id comes with its row (`audit_rows`): the draft
    /// is made with an empty one, which the sealed body leaves out (`compress::pack_for`).
    fn audit_draft(&self, event: Value) -> AuditDraft {
        let incoming = Incoming::from_value(event);
        let draft = self.draft(audit_rows::TYPE, "", None, Some(&incoming));
        AuditDraft {
            value: incoming.value,
            draft,
        }
    }

    fn insert_audit<C: Conn>(
        &self,
        c: &mut C,
        a: &AuditDraft,
        ix: &mut IndexRows,
    ) -> Result<(), StoreError> {
        let id = self.put_audits(c, &[a], ix)?.remove(0);
        // In the same transaction: what the modules above add (the outbox rows that deliver it to
        // the EHRs that know its people).
        c.audited(&*self.hooks, &[(id.as_str(), &a.value)])?;
        Ok(())
    }

    /// Writes AuditEvents (see [`audit_rows`]): their rows with one INSERT, their reference and
    /// outcome rows to `ix`. Returns their ids, in order.
    fn put_audits<C: Conn>(
        &self,
        c: &mut C,
        drafts: &[&AuditDraft],
        ix: &mut IndexRows,
    ) -> Result<Vec<String>, StoreError> {
        let rids = audit_rows::allocate(c, drafts.len())?;
        let mut binds = Vec::with_capacity(drafts.len() * 6);
        let mut ids = Vec::with_capacity(drafts.len());
        // Each scope's key once (nearly always one: the audit class's, no patient), for the
        // latest write time of its events (its window must hold all).
        let mut keys: HashMap<(&str, &str), String> = HashMap::new();
        let mut latest: HashMap<(&str, &str), i64> = HashMap::new();
        for a in drafts {
            let e = latest
                .entry((&a.draft.class, &a.draft.patient))
                .or_insert(a.draft.last_updated);
            *e = (*e).max(a.draft.last_updated);
        }
        for (a, &rid) in drafts.iter().zip(&rids) {
            let d = &a.draft;
            let id = self.audit_ids().id(rid);
            // The body was drafted with an empty id, which the packed form leaves out; one
            // stored as it is (compression off, or deflate did not make it smaller) gets its id.
            let scope = (d.class.as_str(), d.patient.as_str());
            let named;
            let d = match audit_rows::named(d, &id, self.compress_bodies()) {
                Some(n) => {
                    named = n;
                    &named
                }
                None => d,
            };
            let key_id = match keys.get(&scope) {
                Some(k) => k.clone(),
                None => {
                    let k = self.scoped_key(c, scope.0, scope.1, latest[&scope])?;
                    keys.insert(scope, k.clone());
                    k
                }
            };
            let sealed = self.seal(c, &key_id, audit_rows::TYPE, &id, d)?;
            binds.extend(audit_rows::values(rid, d, key_id, sealed));
            ix.add_audit(rid, &d.entries);
            ids.push(id);
        }
        multi_insert_rows(
            c,
            "INSERT INTO",
            audit_rows::INSERT,
            audit_rows::VALUES,
            6,
            binds,
        )?;
        Ok(ids)
    }

    /// Are bodies compressed before they are sealed (see `compress_bodies`)?
    fn compress_bodies(&self) -> bool {
        self.compress_bodies
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The AuditEvent id codec (set up when the store is opened).
    pub fn audit_ids(&self) -> &audit_rows::Ids {
        self.audit_ids
            .get()
            .expect("the AuditEvent id key is loaded when the store opens")
    }

    fn apply<C: Conn>(&self, c: &mut C, op: &WriteOp) -> Result<WriteResult, StoreError> {
        match op {
            WriteOp::Create { .. } => self.apply_create(c, op),
            WriteOp::Update { .. } => self.apply_update(c, op),
            WriteOp::Unchanged { .. } => self.apply_unchanged(c, op),
            WriteOp::Delete { .. } => self.apply_delete(c, op),
        }
    }

    /// A create (conditional when `if_none_exist`).
    fn apply_create<C: Conn>(&self, c: &mut C, op: &WriteOp) -> Result<WriteResult, StoreError> {
        let WriteOp::Create {
            res_type,
            id,
            resource,
            if_none_exist,
        } = op
        else {
            unreachable!("apply sends only Create here")
        };
        if let Some(cond) = if_none_exist {
            if c.is_postgres() {
                // Serialise conditional creates of the same type so two cannot both create
                // (keyed by schema too: advisory locks are database-wide).
                c.execute(
                    "SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.' || ?))",
                    vec![res_type.clone().into()],
                )?;
            }
            let snapshot = i64::MAX / 2;
            let mut probe = cond.clone();
            probe.count = 2;
            probe.offset = 0;
            let q = sql::page(res_type, &probe, snapshot, dialect(c));
            let found: Vec<RidRow> = c.load(&q.text, q.binds)?;
            match found.len() {
                0 => {}
                1 => {
                    let stored = self.bodies(c, res_type, &[found[0].rid])?.remove(0);
                    return Ok(WriteResult {
                        status: WriteStatus::Existing,
                        stored,
                    });
                }
                _ => {
                    return Err(StoreError::PreconditionFailed(format!(
                        "If-None-Exist matched more than one {res_type}"
                    )))
                }
            }
        }
        // The id is server-assigned (UUIDv7), so no lookup first: should it ever exist, the
        // unique (res_type, fhir_id) constraint refuses the insert as a conflict.
        let stored = self.put_version(c, res_type, id, None, Some(resource), "POST")?;
        Ok(WriteResult {
            status: WriteStatus::Created,
            stored,
        })
    }

    /// An update (or update as create), checked against the guard, `If-Match` and the current version.
    fn apply_update<C: Conn>(&self, c: &mut C, op: &WriteOp) -> Result<WriteResult, StoreError> {
        let WriteOp::Update {
            res_type,
            id,
            resource,
            if_match,
            upsert,
            patch,
            guard,
            may_create,
        } = op
        else {
            unreachable!("apply sends only Update here")
        };
        let head = self.head(c, res_type, id)?;
        // The access policy first, so a refused caller learns nothing from 412s or 410s.
        if let (Some(g), Some(h)) = (&guard, &head) {
            // A confined caller neither sees nor revives what it cannot see; a deleted
            // resource it cannot see as such.
            if h.deleted != 0 || !self.admits(c, res_type, h.rid, g)? {
                return Err(StoreError::NotFound(res_type.clone(), id.clone()));
            }
        }
        let live = head.as_ref().is_some_and(|h| h.deleted == 0);
        if *upsert && !live && !may_create {
            // To a confined caller an unused id looks exactly like a hidden one.
            if guard.is_some() {
                return Err(StoreError::NotFound(res_type.clone(), id.clone()));
            }
            return Err(StoreError::Forbidden(format!(
                "{res_type}/{id} does not exist: creating it takes create permission"
            )));
        }
        match (&head, if_match) {
            (None, Some(v)) => {
                return Err(StoreError::PreconditionFailed(format!(
                    "If-Match W/\"{v}\" given but {res_type}/{id} does not exist"
                )))
            }
            (None, None) if !upsert => {
                return Err(StoreError::NotFound(res_type.clone(), id.clone()))
            }
            (Some(h), Some(v)) if h.version_id != *v => {
                return Err(StoreError::PreconditionFailed(format!(
                    "{res_type}/{id} is at version {}, not {v}",
                    h.version_id
                )))
            }
            (Some(h), _) if *patch && h.deleted != 0 => {
                return Err(StoreError::Gone(res_type.clone(), id.clone()))
            }
            _ => {}
        }
        let method = if *patch { "PATCH" } else { "PUT" };
        let status = if head.as_ref().is_some_and(|h| h.deleted == 0) {
            WriteStatus::Updated
        } else {
            WriteStatus::Created
        };
        let stored = self.put_version(c, res_type, id, head.as_ref(), Some(resource), method)?;
        Ok(WriteResult { status, stored })
    }

    /// A version the caller saw, still current: nothing written.
    fn apply_unchanged<C: Conn>(&self, c: &mut C, op: &WriteOp) -> Result<WriteResult, StoreError> {
        let WriteOp::Unchanged {
            res_type,
            id,
            version,
        } = op
        else {
            unreachable!("apply sends only Unchanged here")
        };
        match self.head(c, res_type, id)? {
            Some(h) if h.deleted == 0 && h.version_id == *version => Ok(WriteResult {
                status: WriteStatus::Existing,
                stored: Stored {
                    res_type: res_type.clone(),
                    id: id.clone(),
                    version_id: *version,
                    last_updated: h.last_updated,
                    deleted: false,
                    method: "GET".into(),
                    body: None,
                },
            }),
            _ => Err(StoreError::PreconditionFailed(format!(
                "{res_type}/{id} is no longer at version {version}"
            ))),
        }
    }

    /// A delete (a tombstone version), checked against the guard and `If-Match`.
    fn apply_delete<C: Conn>(&self, c: &mut C, op: &WriteOp) -> Result<WriteResult, StoreError> {
        let WriteOp::Delete {
            res_type,
            id,
            if_match,
            guard,
        } = op
        else {
            unreachable!("apply sends only Delete here")
        };
        let head = self.head(c, res_type, id)?;
        if let Some(g) = &guard {
            let visible = match &head {
                Some(h) if h.deleted == 0 => self.admits(c, res_type, h.rid, g)?,
                _ => false,
            };
            if !visible {
                return Err(StoreError::NotFound(res_type.clone(), id.clone()));
            }
        }
        match head {
            Some(h) if h.deleted == 0 => {
                if let Some(v) = *if_match {
                    if v != h.version_id {
                        return Err(StoreError::PreconditionFailed(format!(
                            "{res_type}/{id} is at version {}, not {v}",
                            h.version_id
                        )));
                    }
                }
                let stored = self.put_version(c, res_type, id, Some(&h), None, "DELETE")?;
                Ok(WriteResult {
                    status: WriteStatus::Deleted,
                    stored,
                })
            }
            _ if if_match.is_some() => Err(StoreError::PreconditionFailed(format!(
                "If-Match given but {res_type}/{id} does not exist or is deleted"
            ))),
            other => Ok(WriteResult {
                status: WriteStatus::NothingToDelete,
                stored: Stored {
                    res_type: res_type.clone(),
                    id: id.clone(),
                    version_id: other.as_ref().map_or(0, |h| h.version_id),
                    last_updated: other.as_ref().map_or(0, |h| h.last_updated),
                    deleted: true,
                    method: "DELETE".into(),
                    body: None,
                },
            }),
        }
    }

    /// Which of the live resources `rids` (of any type but AuditEvent) meet the access policy's
    /// condition `g`.
    pub fn admitted_rids(
        &self,
        rids: &[i64],
        g: &Condition,
    ) -> Result<std::collections::HashSet<i64>, StoreError> {
        refuse_body_condition(g)?;
        let mut out = std::collections::HashSet::new();
        let mut c = self.db.get()?;
        for chunk in rids.chunks(500) {
            let rows: Vec<RidRow> = with_conn!(c, |c| {
                let q = sql::admits_many(GENERIC, chunk, g, dialect(c));
                c.load::<RidRow>(&q.text, q.binds)
            })?;
            out.extend(rows.into_iter().map(|r| r.rid));
        }
        Ok(out)
    }

    /// Does the live resource `rid` (of any type but AuditEvent) meet the access policy's
    /// condition `g`? (Outside a write.)
    pub fn admits_rid(&self, rid: i64, g: &Condition) -> Result<bool, StoreError> {
        let mut c = self.db.get()?;
        with_conn!(c, |c| self.admits(c, GENERIC, rid, g))
    }

    /// Does the live resource `rid` of `res_type` meet the access policy's condition `g`?
    fn admits<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        rid: i64,
        g: &Condition,
    ) -> Result<bool, StoreError> {
        refuse_body_condition(g)?;
        let q = sql::admits(res_type, rid, g, dialect(c));
        Ok(!c.load::<RidRow>(&q.text, q.binds)?.is_empty())
    }

    fn head<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        id: &str,
    ) -> Result<Option<HeadRow>, StoreError> {
        let lock = if c.is_postgres() { " FOR UPDATE" } else { "" };
        let rows: Vec<HeadRow> = c.load_cached(
            &format!(
                "SELECT rid, fhir_id, version_id, last_updated, deleted, retention_class FROM resources WHERE res_type = ? AND fhir_id = ?{lock}"
            ),
            vec![res_type.into(), id.into()],
        )?;
        Ok(rows.into_iter().next())
    }

    /// The single place a version is written: body sealed, head moved, index rebuilt.
    fn put_version<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        id: &str,
        prior: Option<&HeadRow>,
        resource: Option<&Incoming>,
        method: &str,
    ) -> Result<Stored, StoreError> {
        let draft = self.draft(res_type, id, prior, resource);
        let mut ix = IndexRows::default();
        let stored = self.put_draft(c, res_type, id, prior, &draft, method, &mut ix)?;
        ix.flush(c)?;
        Ok(stored)
    }

    /// What a version will be, made without the database: its number and time (after `prior`),
    /// stored body, retention scope and index entries.
    fn draft(
        &self,
        res_type: &str,
        id: &str,
        prior: Option<&HeadRow>,
        resource: Option<&Incoming>,
    ) -> Draft {
        let version_id = prior.map_or(1, |h| h.version_id + 1);
        // lastUpdated never goes backwards for one resource, even if the clock does.
        let last_updated = crate::clock::now_micros().max(prior.map_or(0, |h| h.last_updated + 1));
        let body = resource.map(|r| compose(res_type, id, version_id, last_updated, r));
        // The data key of the version's scope: retention class, patient, write window.
        let (class, patient) = match resource {
            Some(r) => {
                let class = self.retention.class_of(res_type, &r.value).to_string();
                let patient = if class == crate::retention::SYSTEM {
                    String::new()
                } else {
                    scope_patient(res_type, &r.value, &self.base_url).unwrap_or_default()
                };
                (class, patient)
            }
            None => (
                prior.map_or_else(|| "system".to_string(), |h| h.retention_class.clone()),
                String::new(),
            ),
        };
        let entries = match resource {
            Some(r) => index::entries(&self.registry, res_type, &r.value, &self.base_url),
            None => Vec::new(),
        };
        let packed = body.as_deref().map(|b| {
            if self
                .compress_bodies
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                compress::pack_for(b, res_type, id)
            } else {
                b.to_vec()
            }
        });
        Draft {
            version_id,
            last_updated,
            body,
            packed,
            class,
            patient,
            entries,
        }
    }

    /// Writes a drafted version: sealed under its scope's data key, head moved, the old index rows
    /// deleted and the new ones handed to `ix` (the caller flushes them, see [`IndexRows`]).
    // The version's coordinates, its draft, and where its index rows go: one write, kept as one
    // call rather than split over a parameter struct used nowhere else.
    #[allow(clippy::too_many_arguments)]
    fn put_draft<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        id: &str,
        prior: Option<&HeadRow>,
        d: &Draft,
        method: &str,
        ix: &mut IndexRows,
    ) -> Result<Stored, StoreError> {
        let (version_id, last_updated) = (d.version_id, d.last_updated);
        let deleted = d.body.is_none();
        let key_id = self.scoped_key(c, &d.class, &d.patient, last_updated)?;
        let sealed = self.seal(c, &key_id, res_type, id, d)?;
        let rid = match prior {
            Some(h) => {
                c.execute(
                    "UPDATE resources SET version_id = ?, last_updated = ?, deleted = ?, retention_class = ? WHERE rid = ?",
                    vec![version_id.into(), last_updated.into(), (deleted as i64).into(), d.class.clone().into(), h.rid.into()],
                )?;
                for t in ["idx_token", "idx_ref", "idx_date", "idx_string"] {
                    c.execute(
                        &format!("DELETE FROM {t} WHERE rid = ?"),
                        vec![h.rid.into()],
                    )?;
                }
                h.rid
            }
            None => {
                let rows: Vec<RidRow> = c.load_cached(
                    "INSERT INTO resources (res_type, fhir_id, version_id, last_updated, deleted, retention_class) VALUES (?, ?, ?, ?, ?, ?) RETURNING rid",
                    vec![res_type.into(), id.into(), version_id.into(), last_updated.into(), (deleted as i64).into(), d.class.clone().into()],
                )?;
                rows[0].rid
            }
        };
        c.execute(
            &format!("INSERT INTO {VERSION_ROW} VALUES {VERSION_VALUES}"),
            vec![
                rid.into(),
                res_type.into(),
                version_id.into(),
                last_updated.into(),
                method.into(),
                (deleted as i64).into(),
                key_id.into(),
                sealed.into(),
            ],
        )?;
        if !deleted {
            ix.add(rid, res_type, &d.entries);
        }
        Ok(d.stored(res_type, id, method))
    }

    /// A version's body sealed under data key `key_id` (its scope's, from `scoped_key`).
    fn seal<C: Conn>(
        &self,
        c: &mut C,
        key_id: &str,
        res_type: &str,
        id: &str,
        d: &Draft,
    ) -> Result<Vec<u8>, StoreError> {
        let aad = format!("{res_type}/{id}/{}", d.version_id);
        let plain = d.packed.as_deref().unwrap_or_default();
        match self.keys.seal_with(key_id, plain, &aad) {
            Ok(s) => Ok(s),
            // The key cache started over between lookup and use: load it again.
            Err(_) => {
                self.ensure_key(c, key_id)?;
                self.keys
                    .seal_with(key_id, plain, &aad)
                    .map_err(StoreError::Other)
            }
        }
    }

    // ----- reads --------------------------------------------------------------------------------

    /// The current version; `Gone` if deleted.
    pub fn read(&self, res_type: &str, id: &str) -> Result<Stored, StoreError> {
        let mut c = self.db.get()?;
        with_conn!(c, |c| self.load_current(c, res_type, id))
    }

    fn load_current<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        id: &str,
    ) -> Result<Stored, StoreError> {
        if audit_rows::is_audit(res_type) {
            return match self.audit_row(c, id)? {
                Some(row) => self.open_row(row),
                None => Err(StoreError::NotFound(res_type.into(), id.into())),
            };
        }
        let rows: Vec<VersionRow> = c.load(
            &format!(
                "SELECT {VERSION_COLUMNS} \
                 FROM resources r JOIN resource_versions v ON v.rid = r.rid AND v.version_id = r.version_id \
                 WHERE r.res_type = ? AND r.fhir_id = ?"
            ),
            vec![res_type.into(), id.into()],
        )?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::NotFound(res_type.into(), id.into()))?;
        if row.deleted != 0 {
            return Err(StoreError::Gone(res_type.into(), id.into()));
        }
        self.open_row(row)
    }

    /// The row of AuditEvent `id`: by its row id when the id is derived from it, else by the id
    /// stored (events moved from the generic tables).
    fn audit_row<C: Conn>(&self, c: &mut C, id: &str) -> Result<Option<VersionRow>, StoreError> {
        let cols = audit_rows::ROW_COLUMNS;
        let rows: Vec<VersionRow> = match self.audit_ids().rid(id) {
            Some(rid) => c.load_cached(
                &format!("SELECT {cols} FROM audit_events r WHERE r.rid = ? AND r.fhir_id IS NULL"),
                vec![rid.into()],
            )?,
            None => c.load_cached(
                &format!("SELECT {cols} FROM audit_events r WHERE r.fhir_id = ?"),
                vec![id.into()],
            )?,
        };
        Ok(rows.into_iter().next())
    }

    /// The current version number of `res_type/id` and whether it is a deletion (`None`: no
    /// such resource). Reads the head row only (nothing is decrypted).
    pub fn current_version(
        &self,
        res_type: &str,
        id: &str,
    ) -> Result<Option<(i64, bool)>, StoreError> {
        let mut c = self.db.get()?;
        if audit_rows::is_audit(res_type) {
            let row = with_conn!(c, |c| self.audit_row(c, id))?;
            return Ok(row.map(|_| (1, false)));
        }
        let rows: Vec<HeadRow> = with_conn!(c, |c| {
            c.load_cached(
                "SELECT rid, fhir_id, version_id, last_updated, deleted, retention_class FROM resources WHERE res_type = ? AND fhir_id = ?",
                vec![res_type.into(), id.into()],
            )
        })?;
        Ok(rows
            .into_iter()
            .next()
            .map(|r| (r.version_id, r.deleted != 0)))
    }

    /// One version; a deleted version reads as `Gone`.
    pub fn vread(&self, res_type: &str, id: &str, version: i64) -> Result<Stored, StoreError> {
        let mut c = self.db.get()?;
        if audit_rows::is_audit(res_type) {
            // An AuditEvent has one version.
            let row = with_conn!(c, |c| self.audit_row(c, id))?.filter(|_| version == 1);
            return match row {
                Some(row) => self.open_row(row),
                None => Err(StoreError::NotFound(
                    res_type.into(),
                    format!("{id}/_history/{version}"),
                )),
            };
        }
        let rows: Vec<VersionRow> = with_conn!(c, |c| {
            c.load(
            &format!(
                "SELECT {VERSION_COLUMNS} FROM resources r JOIN resource_versions v ON v.rid = r.rid \
                 WHERE r.res_type = ? AND r.fhir_id = ? AND v.version_id = ?"
            ),
            vec![res_type.into(), id.into(), version.into()]
        )
        })?;
        let row = rows.into_iter().next().ok_or_else(|| {
            StoreError::NotFound(res_type.into(), format!("{id}/_history/{version}"))
        })?;
        if row.deleted != 0 {
            return Err(StoreError::Gone(res_type.into(), id.into()));
        }
        self.open_row(row)
    }

    fn open_row(&self, mut row: VersionRow) -> Result<Stored, StoreError> {
        if row.fhir_id.is_empty() && audit_rows::is_audit(&row.res_type) {
            row.fhir_id = self.audit_ids().id(row.rid);
        }
        let deleted = row.deleted != 0;
        let body = if deleted {
            None
        } else {
            let aad = format!("{}/{}/{}", row.res_type, row.fhir_id, row.version_id);
            let plain = self.open_sealed(&row.key_id, &row.body, &aad)?;
            Some(compress::unpack_for(plain, &row.res_type, &row.fhir_id)?)
        };
        Ok(Stored {
            res_type: row.res_type,
            id: row.fhir_id,
            version_id: row.version_id,
            last_updated: row.last_updated,
            deleted,
            method: row.method,
            body,
        })
    }

    /// Instance (`id` given) or type history, newest first. `snapshot` pins the view for paging.
    /// The SQL starts with [`history_sql`].
    #[allow(clippy::too_many_arguments)] // each is one of _history's own parameters
    pub fn history(
        &self,
        res_type: &str,
        id: Option<&str>,
        since: Option<i64>,
        count: usize,
        offset: usize,
        snapshot: Option<i64>,
        filter: Option<&Condition>,
    ) -> Result<(Vec<Stored>, bool, i64), StoreError> {
        let mut c = self.db.get()?;
        with_conn!(c, |c| {
            let audit = audit_rows::is_audit(res_type);
            // The resource's rid (a plain read: no row lock, as a writer's head takes).
            let rid = match id {
                Some(id) if audit => match self.audit_row(c, id)? {
                    Some(r) => Some(r.rid),
                    None => return Err(StoreError::NotFound(res_type.into(), id.into())),
                },
                Some(id) => {
                    let rows: Vec<RidRow> = c.load(
                        "SELECT rid FROM resources WHERE res_type = ? AND fhir_id = ?",
                        vec![res_type.into(), id.into()],
                    )?;
                    match rows.first() {
                        Some(r) => Some(r.rid),
                        None => return Err(StoreError::NotFound(res_type.into(), id.into())),
                    }
                }
                None => None,
            };
            let snapshot = match snapshot {
                Some(s) => s,
                None => {
                    let table = if audit {
                        "SELECT COALESCE(MAX(rid), 0) AS n FROM audit_events"
                    } else {
                        "SELECT COALESCE(MAX(vid), 0) AS n FROM resource_versions"
                    };
                    c.load::<CountRow>(table, vec![])?[0].n
                }
            };
            // An AuditEvent is its one version, its row `r` (`audit_rows::ROW_COLUMNS`).
            let (mut sql, at, order) = if audit {
                let cols = audit_rows::ROW_COLUMNS;
                let sql = match rid {
                    Some(_) => {
                        format!("SELECT {cols} FROM audit_events r WHERE r.rid = ? AND r.rid <= ?")
                    }
                    None => format!("SELECT {cols} FROM audit_events r WHERE r.rid <= ?"),
                };
                (
                    sql,
                    "r.last_updated",
                    " ORDER BY r.rid DESC LIMIT ? OFFSET ?",
                )
            } else {
                let sql = history_sql(res_type, rid.is_some());
                (
                    sql,
                    "v.last_updated",
                    " ORDER BY v.vid DESC LIMIT ? OFFSET ?",
                )
            };
            let mut binds: Vec<Bind> = match rid {
                Some(rid) => vec![rid.into(), snapshot.into()],
                None if audit => vec![snapshot.into()],
                None => vec![res_type.into(), snapshot.into()],
            };
            if let Some(s) = since {
                sql.push_str(&format!(" AND {at} >= ?"));
                binds.push(s.into());
            }
            if let Some(f) = filter {
                // The access policy, on the resource's current version (the index holds only that).
                refuse_body_condition(f)?;
                let p = sql::predicate(res_type, f, dialect(c));
                sql.push_str(" AND ");
                sql.push_str(&p.text);
                binds.extend(p.binds);
            }
            sql.push_str(order);
            binds.push((count as i64 + 1).into());
            binds.push((offset as i64).into());
            let mut rows: Vec<VersionRow> = c.load(&sql, binds)?;
            let has_next = rows.len() > count;
            rows.truncate(count);
            let out = rows
                .into_iter()
                .map(|r| self.open_row(r))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((out, has_next, snapshot))
        })
    }

    /// Runs a search: the page, `_include`/`_revinclude` results, and the total if asked for.
    pub fn search(&self, res_type: &str, req: &SearchRequest) -> Result<SearchPage, StoreError> {
        let audit = audit_rows::is_audit(res_type);
        let with_rids = audit.then(|| self.audit_id_conditions(req)).flatten();
        let req = with_rids.as_ref().unwrap_or(req);
        let mut c = self.db.get()?;
        with_conn!(c, |c| {
            let snapshot = match req.snapshot {
                Some(s) => s,
                None => {
                    let q = if audit {
                        "SELECT COALESCE(MAX(rid), 0) AS n FROM audit_events"
                    } else {
                        "SELECT COALESCE(MAX(rid), 0) AS n FROM resources"
                    };
                    c.load::<CountRow>(q, vec![])?[0].n
                }
            };
            if req.conditions.iter().any(eval::needs_body) || sorts_on_body(res_type, req) {
                return self.search_on_bodies(c, res_type, req, snapshot);
            }
            let want_total = req.total == Total::Accurate || req.summary_count;
            let total = if want_total {
                let q = sql::count(res_type, req, snapshot, dialect(c));
                Some(c.load::<CountRow>(&q.text, q.binds)?[0].n)
            } else {
                None
            };
            if req.summary_count {
                return Ok(SearchPage {
                    matches: vec![],
                    included: vec![],
                    total,
                    has_next: false,
                    snapshot,
                });
            }
            let q = sql::page(res_type, req, snapshot, dialect(c));
            let mut rows: Vec<RidRow> = c.load(&q.text, q.binds)?;
            let has_next = rows.len() > req.count;
            rows.truncate(req.count);
            // Without `_total`, the total is still exact when everything fits on the first page.
            let total =
                total.or_else(|| (!has_next && req.offset == 0).then_some(rows.len() as i64));
            let rids: Vec<i64> = rows.iter().map(|r| r.rid).collect();
            let matches = self.bodies(c, res_type, &rids)?;
            let included = self.includes(
                c,
                &req.includes,
                res_type,
                &rids,
                req.include_access.as_ref(),
            )?;
            Ok(SearchPage {
                matches,
                included,
                total,
                has_next,
                snapshot,
            })
        })
    }

    /// A search with a condition or a sort on a parameter that has no index rows
    /// (`search::UNSTORED`): SQL lists the candidates the other conditions select, in the
    /// search's order, and each candidate's body decides the rest ([`eval`]). Reading stops once
    /// the page is full, unless the total or a sort on the body needs every match.
    fn search_on_bodies<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        req: &SearchRequest,
        snapshot: i64,
    ) -> Result<SearchPage, StoreError> {
        let (on_body, in_sql): (Vec<Condition>, Vec<Condition>) =
            req.conditions.iter().cloned().partition(eval::needs_body);
        let sort_on_body = sorts_on_body(res_type, req);
        let mut candidates = req.clone();
        candidates.conditions = in_sql;
        if sort_on_body {
            candidates.sort.clear(); // sorted below, from the bodies
        }
        let limit = self
            .body_candidates
            .load(std::sync::atomic::Ordering::Relaxed);
        let q = sql::candidates(res_type, &candidates, snapshot, dialect(c), limit + 1);
        let mut rids: Vec<RidRow> = c.load(&q.text, q.binds)?;
        let more = rids.len() > limit;
        rids.truncate(limit);
        let want_total = req.total == Total::Accurate || req.summary_count;
        let every = want_total || sort_on_body;
        let window = req.offset..req.offset + req.count;
        let mut found = 0usize;
        let mut page: Vec<(i64, Stored)> = Vec::new();
        let mut keyed: Vec<(Vec<Option<SortValue>>, i64)> = Vec::new();
        for chunk in rids.chunks(200) {
            let chunk: Vec<i64> = chunk.iter().map(|r| r.rid).collect();
            for (rid, s) in self.bodies_by_rid(c, res_type, &chunk)? {
                let Some(value) = s
                    .body
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                else {
                    continue;
                };
                let entries = index::entries(&self.registry, res_type, &value, &self.base_url);
                let row = eval::Row {
                    id: &s.id,
                    last_updated: s.last_updated,
                };
                if !on_body
                    .iter()
                    .all(|cond| eval::admits(cond, &entries, Some(row)))
                {
                    continue;
                }
                if sort_on_body {
                    keyed.push((sort_values(&req.sort, &entries, row), rid));
                } else if window.contains(&found) {
                    page.push((rid, s));
                }
                found += 1;
            }
            if !every && found > window.end {
                break;
            }
        }
        if more && (every || found <= window.end) {
            let names: std::collections::BTreeSet<&str> = on_body
                .iter()
                .flat_map(eval::keys)
                .chain(req.sort.iter().filter_map(|k| match k {
                    SortKey::Param { key, .. } => Some(key.as_str()),
                    _ => None,
                }))
                .filter(|k| crate::search::is_unstored(k) || crate::search::sparse_of(k).is_some())
                .map(|k| k.split_once('.').map_or(k, |(_, code)| code))
                .chain(
                    (audit_rows::is_audit(res_type)
                        && req.sort.iter().any(|k| matches!(k, SortKey::Id { .. })))
                    .then_some("_id"),
                )
                .collect();
            return Err(StoreError::Invalid(vec![Issue {
                code: "too-costly",
                expression: String::new(),
                diagnostics: format!(
                    "{} has no index: this search would check it on more than {limit} {res_type}s \
                     one by one{}; narrow it by another parameter (patient, agent, entity, date)",
                    names.into_iter().collect::<Vec<_>>().join(", "),
                    if every {
                        " (for its total or its sort)"
                    } else {
                        ""
                    }
                ),
            }]));
        }
        if sort_on_body {
            keyed.sort_by(|a, b| compare_sorted(&req.sort, a, b));
            let rids: Vec<i64> = keyed
                .iter()
                .skip(window.start)
                .take(req.count)
                .map(|(_, rid)| *rid)
                .collect();
            page = self.bodies_by_rid(c, res_type, &rids)?;
        }
        let has_next = found > window.end && !req.summary_count;
        let total = if want_total {
            Some(found as i64)
        } else {
            (!has_next && req.offset == 0).then_some(page.len() as i64)
        };
        if req.summary_count {
            page.clear();
        }
        let page_rids: Vec<i64> = page.iter().map(|(rid, _)| *rid).collect();
        let included = if req.summary_count {
            vec![]
        } else {
            self.includes(
                c,
                &req.includes,
                res_type,
                &page_rids,
                req.include_access.as_ref(),
            )?
        };
        Ok(SearchPage {
            matches: page.into_iter().map(|(_, s)| s).collect(),
            included,
            total,
            has_next,
            snapshot,
        })
    }

    /// `req` with the AuditEvent ids of its `_id` conditions that are derived from a row as that
    /// row (`audit_rows::rid_token`), if it has any such condition.
    fn audit_id_conditions(&self, req: &SearchRequest) -> Option<SearchRequest> {
        fn map(ids: &audit_rows::Ids, c: &Condition) -> Option<Condition> {
            match c {
                // A value that is not a FHIR id names no event (and cannot pass for a row
                // number, `#…`, which only this mapping writes).
                Condition::Id { not, ids: list } => Some(Condition::Id {
                    not: *not,
                    ids: list
                        .iter()
                        .map(|i| match ids.rid(i) {
                            Some(rid) => audit_rows::rid_token(rid),
                            None if audit_rows::is_fhir_id(i) => i.clone(),
                            None => audit_rows::NO_ID.to_string(),
                        })
                        .collect(),
                }),
                Condition::AnyOf(groups) => {
                    let mapped: Vec<Vec<Option<Condition>>> = groups
                        .iter()
                        .map(|g| g.iter().map(|c| map(ids, c)).collect())
                        .collect();
                    if mapped.iter().flatten().all(Option::is_none) {
                        return None;
                    }
                    Some(Condition::AnyOf(
                        groups
                            .iter()
                            .zip(mapped)
                            .map(|(g, m)| {
                                g.iter()
                                    .zip(m)
                                    .map(|(c, m)| m.unwrap_or_else(|| c.clone()))
                                    .collect()
                            })
                            .collect(),
                    ))
                }
                _ => None,
            }
        }
        let ids = self.audit_ids();
        let mapped: Vec<Option<Condition>> = req.conditions.iter().map(|c| map(ids, c)).collect();
        if mapped.iter().all(Option::is_none) {
            return None;
        }
        let mut r = req.clone();
        for (c, m) in r.conditions.iter_mut().zip(mapped) {
            if let Some(m) = m {
                *c = m;
            }
        }
        Some(r)
    }

    /// Current bodies for `rids` of `res_type`, in the order given.
    fn bodies<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        rids: &[i64],
    ) -> Result<Vec<Stored>, StoreError> {
        Ok(self
            .bodies_by_rid(c, res_type, rids)?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    /// Current bodies for `rids` of `res_type` with their row ids, in the order given (a resource
    /// deleted meanwhile left out). AuditEvents are rows of their own (`audit_rows`).
    fn bodies_by_rid<C: Conn>(
        &self,
        c: &mut C,
        res_type: &str,
        rids: &[i64],
    ) -> Result<Vec<(i64, Stored)>, StoreError> {
        if rids.len() > 500 {
            let mut out = Vec::with_capacity(rids.len());
            for chunk in rids.chunks(500) {
                out.extend(self.bodies_by_rid(c, res_type, chunk)?);
            }
            return Ok(out);
        }
        if rids.is_empty() {
            return Ok(vec![]);
        }
        let placeholders = vec!["?"; rids.len()].join(", ");
        let sql = if audit_rows::is_audit(res_type) {
            format!(
                "SELECT {} FROM audit_events r WHERE r.rid IN ({placeholders})",
                audit_rows::ROW_COLUMNS
            )
        } else {
            format!(
                "SELECT {VERSION_COLUMNS} \
                 FROM resources r JOIN resource_versions v ON v.rid = r.rid AND v.version_id = r.version_id \
                 WHERE r.rid IN ({placeholders}) AND r.deleted = 0"
            )
        };
        let rows: Vec<VersionRow> = c.load(&sql, rids.iter().map(|r| Bind::Int(*r)).collect())?;
        let mut by_rid: HashMap<i64, VersionRow> = rows.into_iter().map(|r| (r.rid, r)).collect();
        rids.iter()
            .filter_map(|rid| by_rid.remove(rid))
            .map(|r| Ok((r.rid, self.open_row(r)?)))
            .collect()
    }

    /// `_include` / `_revinclude` (with `:iterate` repeated until nothing new is found), from the
    /// matches `matched` of `res_type`. Resources are known by row id and whether they are
    /// AuditEvents (whose rows are numbered apart, `audit_rows`).
    fn includes<C: Conn>(
        &self,
        c: &mut C,
        includes: &[Include],
        res_type: &str,
        matched: &[i64],
        reach: Option<&HashMap<String, Option<Condition>>>,
    ) -> Result<Vec<Stored>, StoreError> {
        if includes.is_empty() || matched.is_empty() {
            return Ok(vec![]);
        }
        let audit = audit_rows::is_audit(res_type);
        let mut seen: HashSet<(i64, bool)> = matched.iter().map(|r| (*r, audit)).collect();
        let mut out: Vec<(i64, bool)> = Vec::new();
        let mut frontier: Vec<(i64, bool)> = matched.iter().map(|r| (*r, audit)).collect();
        let mut first = true;
        while !frontier.is_empty() {
            let mut found = Vec::new();
            for inc in includes.iter().filter(|i| first || i.iterate) {
                for chunk in frontier.chunks(500) {
                    let followed = self.follow(c, inc, chunk)?;
                    for (rid, t) in self.reachable(c, followed, reach)? {
                        let key = (rid, audit_rows::is_audit(&t));
                        if out.len() + found.len() < MAX_INCLUDED && seen.insert(key) {
                            found.push(key);
                        }
                    }
                }
            }
            out.extend(found.iter().copied());
            frontier = found;
            first = false;
            if out.len() >= MAX_INCLUDED {
                break; // a bound on pathological reference graphs
            }
        }
        let mut bodies: HashMap<(i64, bool), Stored> = HashMap::with_capacity(out.len());
        for (kind, is) in [(GENERIC, false), (audit_rows::TYPE, true)] {
            let rids: Vec<i64> = out.iter().filter(|k| k.1 == is).map(|k| k.0).collect();
            for (rid, s) in self.bodies_by_rid(c, kind, &rids)? {
                bodies.insert((rid, is), s);
            }
        }
        Ok(out.iter().filter_map(|k| bodies.remove(k)).collect())
    }

    /// The followed resources the caller may reach (see `SearchRequest::include_access`).
    fn reachable<C: Conn>(
        &self,
        c: &mut C,
        followed: Vec<(i64, String)>,
        reach: Option<&HashMap<String, Option<Condition>>>,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let Some(reach) = reach else {
            return Ok(followed);
        };
        let mut out = Vec::with_capacity(followed.len());
        for (rid, res_type) in followed {
            match reach.get(&res_type) {
                None => {}
                Some(None) => out.push((rid, res_type)),
                Some(Some(cond)) if self.admits(c, &res_type, rid, cond)? => {
                    out.push((rid, res_type))
                }
                Some(Some(_)) => {}
            }
        }
        Ok(out)
    }

    /// The resources one `_include`/`_revinclude` reaches from `from` (row ids, and whether each
    /// is an AuditEvent), as row id and type.
    fn follow<C: Conn>(
        &self,
        c: &mut C,
        inc: &Include,
        from: &[(i64, bool)],
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let source_audit = audit_rows::is_audit(&inc.source_type);
        let of = |audit: bool| -> Vec<i64> {
            from.iter()
                .filter(|(_, a)| *a == audit)
                .map(|(rid, _)| *rid)
                .collect()
        };
        if !inc.reverse {
            // The sources are those of `from` of the source type.
            let sources = of(source_audit);
            if sources.is_empty() {
                return Ok(vec![]);
            }
            if source_audit {
                return self.follow_from_audits(c, inc, &sources);
            }
            return self.follow_generic(c, inc, &sources);
        }
        // Backward, the targets are `from`: AuditEvents (which a read's AuditEvent names as its
        // entity) by their ids, the others by their rows.
        let mut out = Vec::new();
        let generic = of(false);
        if !generic.is_empty() {
            out.extend(self.follow_generic(c, inc, &generic)?);
        }
        let audits = of(true);
        if !audits.is_empty() {
            out.extend(self.follow_back_to_audits(c, inc, &audits)?);
        }
        Ok(out)
    }

    /// [`Store::follow`] backward to the AuditEvents in rows `targets`: the resources of the
    /// source type whose parameter names one of them.
    fn follow_back_to_audits<C: Conn>(
        &self,
        c: &mut C,
        inc: &Include,
        targets: &[i64],
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let ids: Vec<String> = self
            .bodies_by_rid(c, audit_rows::TYPE, targets)?
            .into_iter()
            .map(|(_, s)| s.id)
            .collect();
        let (keys, of_type) = include_keys(inc);
        if ids.is_empty() || of_type.is_some_and(|t| !audit_rows::is_audit(t)) {
            return Ok(vec![]);
        }
        let key_marks = vec!["?"; keys.len()].join(", ");
        let id_marks = vec!["?"; ids.len()].join(", ");
        let mut binds: Vec<Bind> = keys
            .iter()
            .map(|k| names::key(k).to_string().into())
            .collect();
        binds.push(names::ty(audit_rows::TYPE).into());
        binds.extend(ids.into_iter().map(Bind::from));
        let sql = if audit_rows::is_audit(&inc.source_type) {
            format!(
                "SELECT x.rid, 'AuditEvent' AS res_type FROM audit_refs x \
                 WHERE x.param IN ({key_marks}) AND x.target_type = ? AND x.target_id IN ({id_marks})"
            )
        } else {
            binds.push(inc.source_type.clone().into());
            format!(
                "SELECT s.rid, s.res_type FROM idx_ref x JOIN resources s ON s.rid = x.rid AND s.deleted = 0 \
                 WHERE x.param IN ({key_marks}) AND x.target_type = ? AND x.target_id IN ({id_marks}) \
                 AND x.url IS NULL AND s.res_type = ?"
            )
        };
        Ok(c.load::<RidTypeRow>(&sql, binds)?
            .into_iter()
            .map(|r| (r.rid, r.res_type))
            .collect())
    }

    /// [`Store::follow`] from (forward) or to (backward) resources other than AuditEvents, in
    /// rows `from`.
    fn follow_generic<C: Conn>(
        &self,
        c: &mut C,
        inc: &Include,
        from: &[i64],
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let source_audit = audit_rows::is_audit(&inc.source_type);
        let ph = vec!["?"; from.len()].join(", ");
        // A parameter stored as its bases' rows of one type (search::ALIASES) follows those rows
        // that point at that type.
        let (keys, of_type) = include_keys(inc);
        let key_marks = vec!["?"; keys.len()].join(", ");
        let mut binds: Vec<Bind> = keys
            .iter()
            .map(|k| names::key(k).to_string().into())
            .collect();
        if !source_audit {
            binds.push(inc.source_type.clone().into());
        }
        binds.extend(from.iter().map(|r| Bind::Int(*r)));
        let type_filter = match of_type {
            Some(t) => {
                binds.push(names::ty(t).into());
                " AND x.target_type = ?"
            }
            None => "",
        };
        // Reference rows name a type by its short name (names::TYPES).
        let target = names::type_sql("x.target_type");
        let short = names::short_type_sql("t.res_type");
        if source_audit {
            // AuditEvents whose parameter refers to one of the `from` resources: their reference
            // rows are keyed by target (`audit_rows`), absolute ones typed '/', never a short name.
            let sql = format!(
                "SELECT x.rid, 'AuditEvent' AS res_type FROM resources t \
                 JOIN audit_refs x ON x.target_id = t.fhir_id AND x.target_type = {short} \
                 WHERE x.param IN ({key_marks}) AND t.rid IN ({ph}){type_filter}"
            );
            return Ok(c
                .load::<RidTypeRow>(&sql, binds)?
                .into_iter()
                .map(|r| (r.rid, r.res_type))
                .collect());
        }
        if !inc.reverse {
            // The references the `from` resources make, resolved to current local resources.
            let mut sql = format!(
                "SELECT t.rid, t.res_type FROM idx_ref x JOIN resources s ON s.rid = x.rid \
                 JOIN resources t ON t.res_type = {target} AND t.fhir_id = x.target_id AND t.deleted = 0 \
                 WHERE x.param IN ({key_marks}) AND s.res_type = ? AND x.url IS NULL AND x.rid IN ({ph}){type_filter}"
            );
            if let Some(tt) = &inc.target_type {
                sql.push_str(" AND t.res_type = ?");
                binds.push(tt.clone().into());
            }
            Ok(c.load::<RidTypeRow>(&sql, binds)?
                .into_iter()
                .map(|r| (r.rid, r.res_type))
                .collect())
        } else {
            // Resources of `source_type` whose parameter refers to one of the `from` resources.
            let sql = format!(
                "SELECT s.rid, s.res_type FROM idx_ref x JOIN resources s ON s.rid = x.rid AND s.deleted = 0 \
                 JOIN resources t ON x.target_type = {short} AND t.fhir_id = x.target_id \
                 WHERE x.param IN ({key_marks}) AND s.res_type = ? AND x.url IS NULL AND t.rid IN ({ph}){type_filter}"
            );
            Ok(c.load::<RidTypeRow>(&sql, binds)?
                .into_iter()
                .map(|r| (r.rid, r.res_type))
                .collect())
        }
    }

    /// `_include` from AuditEvents: their references are read from their bodies (their reference
    /// rows are keyed by target, not by event), resolved to current local resources.
    fn follow_from_audits<C: Conn>(
        &self,
        c: &mut C,
        inc: &Include,
        from: &[i64],
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let (keys, of_type) = include_keys(inc);
        let mut targets: Vec<(String, String)> = Vec::new();
        for (param, t, id) in self.audit_local_refs(c, from)? {
            let wanted = keys.contains(&param.as_str())
                && of_type.is_none_or(|o| o == t)
                && inc.target_type.as_deref().is_none_or(|tt| tt == t);
            if wanted && !targets.contains(&(t.clone(), id.clone())) {
                targets.push((t, id));
            }
        }
        let mut out = Vec::new();
        for (t, id) in targets {
            if audit_rows::is_audit(&t) {
                if let Some(row) = self.audit_row(c, &id)? {
                    out.push((row.rid, t));
                }
                continue;
            }
            let rows: Vec<RidTypeRow> = c.load_cached(
                "SELECT rid, res_type FROM resources WHERE res_type = ? AND fhir_id = ? AND deleted = 0",
                vec![t.into(), id.into()],
            )?;
            out.extend(rows.into_iter().map(|r| (r.rid, r.res_type)));
        }
        Ok(out)
    }

    /// Row counts of every table, leaving out AuditEvents (which record failures too). Tests assert
    /// with it that rejected input changes nothing.
    pub fn row_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut c = self.db.get()?;
        let mut out = Vec::new();
        let queries = [
            ("resources", "SELECT COUNT(*) AS n FROM resources WHERE res_type <> 'AuditEvent'".to_string()),
            ("resource_versions", "SELECT COUNT(*) AS n FROM resource_versions WHERE res_type <> 'AuditEvent'".to_string()),
            // The audit trail's keys aside: a refused request is audited, and its first AuditEvent
            // of the month makes that month's audit key.
            ("data_keys", "SELECT COUNT(*) AS n FROM data_keys WHERE class <> 'audit'".to_string()),
        ]
        .into_iter()
        .chain(["idx_token", "idx_ref", "idx_date", "idx_string"].into_iter().map(|t| {
            (t, format!("SELECT COUNT(*) AS n FROM {t} x JOIN resources r ON r.rid = x.rid WHERE r.res_type <> 'AuditEvent'"))
        }));
        for (t, q) in queries {
            let n = with_conn!(c, |c| c.load::<CountRow>(&q, vec![]))?[0].n;
            out.push((t.to_string(), n));
        }
        Ok(out)
    }
}

fn dialect<C: Conn>(c: &C) -> sql::Dialect {
    if c.is_postgres() {
        sql::Dialect::Postgres
    } else {
        sql::Dialect::Sqlite
    }
}

/// The versions of one resource (`instance`: its rid `?`) or of a type (its name `?`) up to vid
/// `?` (a history's snapshot), each with its resource row, for [`Store::history`] to add its
/// conditions and `ORDER BY v.vid DESC` to. An instance's are read by its rid (its few versions,
/// then sorted), never by walking its type's versions. A type's: the (res_type, vid) index holds
/// every type but AuditEvent, which are most of the versions: their history reads the versions'
/// own key, newest first, and every other type names the index's condition.
pub fn history_sql(res_type: &str, instance: bool) -> String {
    let head = format!(
        "SELECT {VERSION_COLUMNS} FROM resource_versions v JOIN resources r ON r.rid = v.rid"
    );
    if instance {
        return format!("{head} WHERE v.rid = ? AND v.vid <= ?");
    }
    let mut sql = format!("{head} WHERE v.res_type = ? AND v.vid <= ?");
    if res_type != "AuditEvent" {
        sql.push_str(" AND v.res_type <> 'AuditEvent'");
    }
    sql
}

/// Index rows to insert together: one multi-row INSERT per index table for many versions (a
/// whole group commit's creates and AuditEvents) instead of four statements per version. Statement
/// set-up was 10–15% of the SQLite writer's time. Whoever gathers rows flushes them before
/// anything in the same transaction reads the index, and before it commits.
#[derive(Default)]
struct IndexRows {
    tokens: Vec<Bind>,
    refs: Vec<RefRow>,
    dates: Vec<Bind>,
    strings: Vec<Bind>,
    /// AuditEvents' rows (`audit_rows`): references, and outcomes other than 0.
    audit_refs: Vec<Bind>,
    audit_tokens: Vec<Bind>,
}

/// One reference index row. `n` numbers a resource's reference rows: on SQLite the table is
/// keyed (rid, param, n); PostgreSQL's has no such column.
struct RefRow {
    rid: i64,
    param: String,
    n: i64,
    target_type: Option<String>,
    target_id: Option<String>,
    url: Option<String>,
    at_lo: Option<i64>,
    at_hi: Option<i64>,
}

impl IndexRows {
    /// Adds the index rows of the version of resource `rid` with these entries.
    fn add(&mut self, rid: i64, res_type: &str, entries: &[Entry]) {
        let IndexRows {
            tokens,
            refs,
            dates: dates_,
            strings,
            ..
        } = self;
        // The resource's principal date, carried by each of its reference rows (search::REFERENCE_SORT_DATES).
        let principal = entries.iter().filter_map(|e| match e {
            Entry::Date { param, lo, hi }
                if crate::search::REFERENCE_SORT_DATES.contains(&param.as_str()) =>
            {
                Some((*lo, *hi))
            }
            _ => None,
        });
        let at_lo: Option<i64> = principal.clone().map(|(lo, _)| lo).min();
        let at_hi: Option<i64> = principal.map(|(_, hi)| hi).max();
        // Numbers the resource's reference rows (their key on SQLite is (rid, param, n)).
        let mut n: i64 = 0;
        for e in entries {
            match e {
                // Its rows are its bases' rows of one type (search::ALIASES).
                Entry::Ref { param, .. } if crate::search::alias_of(param).is_some() => {}
                // Checked on the body when searched (search::UNSTORED).
                Entry::Str { param, .. } if crate::search::is_unstored(param) => {}
                // See `token_rows`.
                Entry::Token { .. } => {}
                Entry::Ref {
                    param,
                    target_type,
                    target_id,
                    url,
                } => {
                    refs.push(RefRow {
                        rid,
                        param: names::key(param).to_string(),
                        n,
                        target_type: target_type.as_deref().map(|t| names::ty(t).to_string()),
                        target_id: target_id.clone(),
                        url: url.clone(),
                        at_lo,
                        at_hi,
                    });
                    n += 1;
                }
                Entry::Date { param, lo, hi } => dates_.extend([
                    rid.into(),
                    names::key(param).to_string().into(),
                    (*lo).into(),
                    (*hi).into(),
                ]),
                Entry::Str { param, norm, raw } => strings.extend([
                    rid.into(),
                    names::key(param).to_string().into(),
                    norm.clone().into(),
                    raw.clone().into(),
                ]),
            }
        }
        let mut rows = Vec::new();
        token_rows(res_type, entries, &mut rows);
        for (param, system, code) in rows {
            tokens.extend([rid.into(), param.into(), system.into(), code.into()]);
        }
    }

    /// Inserts the rows gathered so far.
    /// On SQLite the token, date and reference tables are keyed (`WITHOUT ROWID`): `OR IGNORE`
    /// keeps a multi-row INSERT from needing a statement journal (it cannot abort midway), and a
    /// resource's entries are distinct (its reference rows by their number), so it ignores
    /// nothing.
    fn flush<C: Conn>(&mut self, c: &mut C) -> Result<(), StoreError> {
        let keyed = if c.is_postgres() {
            "INSERT INTO"
        } else {
            "INSERT OR IGNORE INTO"
        };
        // PostgreSQL's reference table has no `n` (a heap gains nothing from the key).
        let postgres = c.is_postgres();
        let (ref_cols, ref_width) = if postgres {
            (
                "idx_ref (rid, param, target_type, target_id, url, at_lo, at_hi)",
                7,
            )
        } else {
            (
                "idx_ref (rid, param, n, target_type, target_id, url, at_lo, at_hi)",
                8,
            )
        };
        let mut refs = Vec::with_capacity(self.refs.len() * ref_width);
        for r in std::mem::take(&mut self.refs) {
            refs.extend([r.rid.into(), r.param.into()]);
            if !postgres {
                refs.push(r.n.into());
            }
            refs.extend([
                r.target_type.into(),
                r.target_id.into(),
                r.url.into(),
                r.at_lo.into(),
                r.at_hi.into(),
            ]);
        }
        for (verb, target, width, rows) in [
            (
                keyed,
                "idx_token (rid, param, system, code)",
                4,
                &mut self.tokens,
            ),
            (keyed, ref_cols, ref_width, &mut refs),
            (keyed, "idx_date (rid, param, lo, hi)", 4, &mut self.dates),
            (
                "INSERT INTO",
                "idx_string (rid, param, norm, raw)",
                4,
                &mut self.strings,
            ),
            // An event's references are distinct (`add_audit`), and so are its tokens.
            (
                keyed,
                "audit_refs (param, target_id, target_type, at_hi, rid)",
                5,
                &mut self.audit_refs,
            ),
            (
                keyed,
                "audit_tokens (rid, param, system, code)",
                4,
                &mut self.audit_tokens,
            ),
        ] {
            multi_insert(c, verb, target, width, std::mem::take(rows))?;
        }
        Ok(())
    }
}

/// The token index rows (short key, short system, code) of a resource of `res_type` with these
/// entries: none for a parameter checked on the body (search::UNSTORED) or for the common value
/// of a sparse one, and the row of "no value" for a sparse parameter without one (search::SPARSE).
fn token_rows(res_type: &str, entries: &[Entry], out: &mut Vec<(String, String, String)>) {
    for e in entries {
        if let Entry::Token {
            param,
            system,
            code,
        } = e
        {
            if crate::search::is_unstored(param)
                || (system.is_none() && crate::search::sparse_of(param) == Some(code.as_str()))
            {
                continue;
            }
            out.push((
                names::key(param).to_string(),
                names::system(system.as_deref()).into_owned(),
                code.clone(),
            ));
        }
    }
    for (key, _) in crate::search::SPARSE {
        if key.split_once('.').is_some_and(|(t, _)| t == res_type)
            && !entries
                .iter()
                .any(|e| matches!(e, Entry::Token { param, .. } if param == key))
        {
            out.push((
                names::key(key).to_string(),
                names::system(None).into_owned(),
                crate::search::SPARSE_MISSING.to_string(),
            ));
        }
    }
}

/// The index keys an `_include`/`_revinclude` follows, and the one target type they must point at
/// when its parameter is stored as its bases' rows of that type (search::ALIASES).
fn include_keys(inc: &Include) -> (Vec<&str>, Option<&str>) {
    match crate::search::alias_of(&inc.param_key) {
        Some((bases, target)) => (bases.to_vec(), Some(target)),
        None => (vec![inc.param_key.as_str()], None),
    }
}

/// Every job of `batch` answered with the error of opening a connection.
fn cannot_open(batch: Vec<(Arc<Slot>, WriteUnit)>, e: &anyhow::Error) -> Answers {
    let msg = e.to_string();
    batch
        .into_iter()
        .map(|(s, _)| {
            let e = StoreError::Other(anyhow::anyhow!("cannot open the database: {msg}"));
            (s, Err(e))
        })
        .collect()
}

/// One INSERT with many rows (fewer statements per write): at most 64 rows and about 8 MB of
/// values per statement (a group's version rows can carry large Binaries). Each row count is a
/// statement of its own in every connection's prepared statement cache, so the sizes stay few (at
/// most 64 per table). `binds` are the rows' values, `width` per row.
pub fn multi_insert<C: Conn>(
    c: &mut C,
    verb: &str,
    target: &str,
    width: usize,
    binds: Vec<Bind>,
) -> Result<(), StoreError> {
    let row = format!("({})", vec!["?"; width].join(", "));
    multi_insert_rows(c, verb, target, &row, width, binds)
}

/// [`multi_insert`] with each row's values written as `row` (with `width` placeholders), e.g. a
/// value looked up by a subquery.
pub fn multi_insert_rows<C: Conn>(
    c: &mut C,
    verb: &str,
    target: &str,
    row: &str,
    width: usize,
    binds: Vec<Bind>,
) -> Result<(), StoreError> {
    const ROWS: usize = 64;
    const BYTES: usize = 8 << 20;
    if binds.is_empty() {
        return Ok(());
    }
    let sql = |rows: usize| format!("{verb} {target} VALUES {}", vec![row; rows].join(", "));
    let size = |b: &Bind| match b {
        Bind::Text(t) | Bind::OptText(Some(t)) => t.len(),
        Bind::Blob(v) | Bind::OptBlob(Some(v)) => v.len(),
        _ => 8,
    };
    // One statement (most single writes) takes the binds as they are, without a copy.
    if binds.len() <= width * ROWS && binds.iter().map(size).sum::<usize>() <= BYTES {
        c.execute(&sql(binds.len() / width), binds)?;
        return Ok(());
    }
    let mut binds = binds.into_iter().peekable();
    while binds.peek().is_some() {
        let (mut chunk, mut bytes) = (Vec::new(), 0);
        while chunk.len() < width * ROWS && binds.peek().is_some() {
            let row: Vec<Bind> = binds.by_ref().take(width).collect();
            let n: usize = row.iter().map(size).sum();
            if !chunk.is_empty() && bytes + n > BYTES {
                c.execute(&sql(chunk.len() / width), std::mem::take(&mut chunk))?;
                bytes = 0;
            }
            bytes += n;
            chunk.extend(row);
        }
        c.execute(&sql(chunk.len() / width), chunk)?;
    }
    Ok(())
}

/// The stored JSON: `resourceType`, `id`, `meta` (with `versionId`/`lastUpdated` set, the client's
/// profile/tag/security kept), then every other member exactly as received.
/// The access checks outside a search (history, `admits`) are SQL alone: a condition on a
/// parameter without index rows (`search::UNSTORED`) would match nothing there, so it is an
/// error instead. The access policy never makes one (a granular scope may not name such a
/// parameter: `policy::scope_query`).
fn refuse_body_condition(g: &Condition) -> Result<(), StoreError> {
    if eval::needs_body(g) {
        return Err(StoreError::Other(anyhow::anyhow!(
            "an access condition names a parameter that has no index rows"
        )));
    }
    Ok(())
}

/// Does the search sort by a parameter that has no index rows (`search::UNSTORED`), or AuditEvents
/// by id (most have none stored: it is derived from their row, `audit_rows`)?
fn sorts_on_body(res_type: &str, req: &SearchRequest) -> bool {
    req.sort.iter().any(|k| match k {
        SortKey::Param { key, .. } => crate::search::is_unstored(key),
        SortKey::Id { .. } => audit_rows::is_audit(res_type),
        SortKey::LastUpdated { .. } => false,
    })
}

/// One sort key's value for a resource, as `sql::ordered` sorts: a token's code, a string's
/// normalised form, a date's lowest start (ascending) or highest end (descending).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum SortValue {
    Int(i64),
    Text(String),
}

fn sort_values(sort: &[SortKey], entries: &[Entry], row: eval::Row) -> Vec<Option<SortValue>> {
    sort.iter()
        .map(|k| match k {
            SortKey::Id { .. } => Some(SortValue::Text(row.id.to_string())),
            SortKey::LastUpdated { .. } => Some(SortValue::Int(row.last_updated)),
            SortKey::Param {
                key,
                kind,
                descending,
            } => {
                let values = entries.iter().filter_map(|e| match (kind, e) {
                    (crate::search::ParamType::Date, Entry::Date { param, lo, hi })
                        if param == key =>
                    {
                        Some(SortValue::Int(if *descending { *hi } else { *lo }))
                    }
                    (crate::search::ParamType::String, Entry::Str { param, norm, .. })
                        if param == key =>
                    {
                        Some(SortValue::Text(norm.clone()))
                    }
                    (
                        crate::search::ParamType::Token | crate::search::ParamType::Uri,
                        Entry::Token { param, code, .. },
                    ) if param == key => Some(SortValue::Text(code.clone())),
                    _ => None,
                });
                if *descending {
                    values.max()
                } else {
                    values.min()
                }
            }
        })
        .collect()
}

/// The order of `sql::ordered` with a sort: each key in turn (a missing value last either way),
/// then the row id ascending.
fn compare_sorted(
    sort: &[SortKey],
    a: &(Vec<Option<SortValue>>, i64),
    b: &(Vec<Option<SortValue>>, i64),
) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    for (i, k) in sort.iter().enumerate() {
        let descending = match k {
            SortKey::Id { descending }
            | SortKey::LastUpdated { descending }
            | SortKey::Param { descending, .. } => *descending,
        };
        let o = match (&a.0[i], &b.0[i]) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(x), Some(y)) if descending => y.cmp(x),
            (Some(x), Some(y)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.1.cmp(&b.1)
}

/// The patient whose data key seals a resource: a message's patient (subject, sender, recipient),
/// a Binary's `securityContext` patient. AuditEvents are sealed per month, not per patient: the
/// audit trail outlives an erasure (its own retention, GDPR Art. 17(3)(b)).
fn scope_patient(res_type: &str, value: &Value, base_url: &str) -> Option<String> {
    // A reference to a Patient of this server (relative, or absolute under the base URL).
    let local_patient = |r: &str| {
        index::parse_reference(r, base_url)
            .filter(|p| p.url.is_none() && p.target_type.as_deref() == Some("Patient"))
            .and_then(|p| p.target_id)
            .map(|id| format!("Patient/{id}"))
    };
    match res_type {
        "AuditEvent" => None,
        "Binary" => value["securityContext"]["reference"]
            .as_str()
            .and_then(local_patient),
        // A message of one patient only: one that is also another patient's is sealed under the
        // unscoped key of its class, so erasing either patient can destroy their keys.
        _ => {
            let mut patients: Vec<String> =
                ["subject", "patient", "sender", "recipient", "requester"]
                    .iter()
                    .flat_map(|f| match &value[*f] {
                        Value::Array(a) => a.iter().collect::<Vec<_>>(),
                        v => vec![v],
                    })
                    .filter_map(|r| r["reference"].as_str())
                    .filter_map(local_patient)
                    .collect();
            patients.sort_unstable();
            patients.dedup();
            match patients.as_slice() {
                [one] => Some(one.clone()),
                _ => None,
            }
        }
    }
}

fn compose(res_type: &str, id: &str, version_id: i64, last_updated: i64, r: &Incoming) -> Vec<u8> {
    let mut meta = serde_json::Map::new();
    meta.insert("versionId".into(), Value::String(version_id.to_string()));
    meta.insert(
        "lastUpdated".into(),
        Value::String(dates::format_instant(last_updated)),
    );
    if let Some(Value::Object(m)) = r.value.get("meta") {
        for (k, v) in m {
            if k != "versionId" && k != "lastUpdated" {
                meta.insert(k.clone(), v.clone());
            }
        }
    }
    let mut out = Vec::with_capacity(
        r.members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + 128,
    );
    out.extend_from_slice(b"{\"resourceType\":");
    out.extend_from_slice(serde_json::to_string(res_type).unwrap().as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(serde_json::to_string(id).unwrap().as_bytes());
    out.extend_from_slice(b",\"meta\":");
    out.extend_from_slice(serde_json::to_string(&meta).unwrap().as_bytes());
    for (k, v) in &r.members {
        if k == "resourceType" || k == "id" || k == "meta" {
            continue;
        }
        out.push(b',');
        out.extend_from_slice(serde_json::to_string(k).unwrap().as_bytes());
        out.push(b':');
        out.extend_from_slice(v.get().as_bytes());
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::Connection;

    /// Every row is written, however the rows are split into statements (by count, by bytes).
    /// (How they are split is not observable here.)
    #[test]
    fn multi_insert_splits_by_rows_and_by_bytes() {
        let mut c = diesel::SqliteConnection::establish(":memory:").unwrap();
        c.execute("CREATE TABLE t (n BIGINT, b BLOB)", vec![])
            .unwrap();
        let rows = |n: usize, size: usize| -> Vec<Bind> {
            (0..n)
                .flat_map(|i| [Bind::Int(i as i64), Bind::Blob(vec![7; size])])
                .collect()
        };
        // 130 small rows: 64 + 64 + 2, all written.
        multi_insert(&mut c, "INSERT INTO", "t (n, b)", 2, rows(130, 10)).unwrap();
        // 5 rows of 3 MB: split by bytes (2 + 2 + 1 rows), all written.
        multi_insert(&mut c, "INSERT INTO", "t (n, b)", 2, rows(5, 3 << 20)).unwrap();
        let n: Vec<rows::CountRow> = c.load("SELECT COUNT(*) AS n FROM t", vec![]).unwrap();
        assert_eq!(n[0].n, 135);
        let big: Vec<rows::CountRow> = c
            .load(
                "SELECT SUM(length(b)) AS n FROM t WHERE length(b) > 10",
                vec![],
            )
            .unwrap();
        assert_eq!(big[0].n, 5 * (3 << 20));
    }
}
