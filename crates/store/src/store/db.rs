//! The two database backends behind one small interface: SQL is written once with `?` placeholders
//! and run through diesel's `sql_query` with typed binds on SQLite or PostgreSQL.

use diesel::connection::SimpleConnection;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::query_builder::BoxedSqlQuery;
use diesel::r2d2::{
    ConnectionManager, CustomizeConnection, ManageConnection, Pool, PooledConnection,
};
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::sqlite::Sqlite;
use diesel::{PgConnection, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");
const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");

/// A value bound to a `?` placeholder.
#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    OptText(Option<String>),
    Int(i64),
    OptInt(Option<i64>),
    Blob(Vec<u8>),
    OptBlob(Option<Vec<u8>>),
}

impl From<&str> for Bind {
    fn from(s: &str) -> Self {
        Bind::Text(s.to_string())
    }
}
impl From<String> for Bind {
    fn from(s: String) -> Self {
        Bind::Text(s)
    }
}
impl From<i64> for Bind {
    fn from(i: i64) -> Self {
        Bind::Int(i)
    }
}
impl From<Option<String>> for Bind {
    fn from(s: Option<String>) -> Self {
        Bind::OptText(s)
    }
}
impl From<Option<i64>> for Bind {
    fn from(i: Option<i64>) -> Self {
        Bind::OptInt(i)
    }
}
impl From<Vec<u8>> for Bind {
    fn from(b: Vec<u8>) -> Self {
        Bind::Blob(b)
    }
}

pub type DbResult<T> = Result<T, diesel::result::Error>;

/// What the store needs from a connection. Implemented for both backends so the store's logic is
/// written once; the only dialect difference it hides is placeholder syntax and transaction start.
/// A connection of either backend (every one can call the registered hooks: [`super::hooks`]).
pub trait Conn: super::hooks::Dispatch {
    /// Runs a statement whose prepared form is cached per connection by its SQL text: for the
    /// write path and other statements of a bounded set of shapes.
    fn execute(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<usize>;
    /// A query prepared afresh each time: for searches, whose SQL varies without bound.
    fn load<T>(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static;
    /// A query of a fixed shape on the write path (`INSERT … RETURNING`, head lookups), cached
    /// like [`Conn::execute`].
    fn load_cached<T>(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static;
    /// Runs `f` in a write transaction (SQLite: `BEGIN IMMEDIATE`, so writers queue instead of failing).
    fn write_tx<T, E>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>;
    /// Runs `f` in a savepoint inside the current transaction: its failure undoes only its work.
    fn savepoint<T, E>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>;
    /// True on PostgreSQL, where row locks (`FOR UPDATE`) exist.
    fn is_postgres(&self) -> bool;
}

macro_rules! bind_all {
    ($q:expr, $binds:expr) => {{
        let mut q = $q;
        for b in $binds {
            q = match b {
                Bind::Text(s) => q.bind::<Text, _>(s),
                Bind::OptText(s) => q.bind::<Nullable<Text>, _>(s),
                Bind::Int(i) => q.bind::<BigInt, _>(i),
                Bind::OptInt(i) => q.bind::<Nullable<BigInt>, _>(i),
                Bind::Blob(v) => q.bind::<Binary, _>(v),
                Bind::OptBlob(v) => q.bind::<Nullable<Binary>, _>(v),
            };
        }
        q
    }};
}

/// A statement with `?` placeholders whose prepared form diesel caches by SQL text. (`sql_query`
/// opts out of diesel's statement cache; preparing every statement anew was ~10% of a write and
/// most of the time SQLite's single writer held its lock.) Each `?` becomes the backend's own
/// placeholder, so the same text serves SQLite and PostgreSQL.
struct CachedQuery<'a> {
    sql: &'a str,
    binds: Vec<Bind>,
}

impl<DB> diesel::query_builder::QueryFragment<DB> for CachedQuery<'_>
where
    DB: diesel::backend::Backend
        + diesel::sql_types::HasSqlType<Text>
        + diesel::sql_types::HasSqlType<BigInt>
        + diesel::sql_types::HasSqlType<Binary>,
    String: diesel::serialize::ToSql<Text, DB>,
    Option<String>: diesel::serialize::ToSql<Nullable<Text>, DB>,
    i64: diesel::serialize::ToSql<BigInt, DB>,
    Option<i64>: diesel::serialize::ToSql<Nullable<BigInt>, DB>,
    Vec<u8>: diesel::serialize::ToSql<Binary, DB>,
    Option<Vec<u8>>: diesel::serialize::ToSql<Nullable<Binary>, DB>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        let mut parts = self.sql.split('?');
        out.push_sql(parts.next().unwrap_or_default());
        let mut binds = self.binds.iter();
        for part in parts {
            match binds.next() {
                Some(Bind::Text(s)) => out.push_bind_param::<Text, _>(s)?,
                Some(Bind::OptText(s)) => out.push_bind_param::<Nullable<Text>, _>(s)?,
                Some(Bind::Int(i)) => out.push_bind_param::<BigInt, _>(i)?,
                Some(Bind::OptInt(i)) => out.push_bind_param::<Nullable<BigInt>, _>(i)?,
                Some(Bind::Blob(b)) => out.push_bind_param::<Binary, _>(b)?,
                Some(Bind::OptBlob(b)) => out.push_bind_param::<Nullable<Binary>, _>(b)?,
                None => {
                    return Err(diesel::result::Error::QueryBuilderError(
                        "more placeholders than binds".into(),
                    ))
                }
            }
            out.push_sql(part);
        }
        Ok(())
    }
}

impl diesel::query_builder::QueryId for CachedQuery<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for CachedQuery<'_> {
    type SqlType = diesel::sql_types::Untyped;
}

impl<C> RunQueryDsl<C> for CachedQuery<'_> {}

fn sqlite_query(
    sql: &str,
    binds: Vec<Bind>,
) -> BoxedSqlQuery<'static, Sqlite, diesel::query_builder::SqlQuery> {
    bind_all!(
        diesel::sql_query(sql.to_string()).into_boxed::<Sqlite>(),
        binds
    )
}

fn pg_query(
    sql: &str,
    binds: Vec<Bind>,
) -> BoxedSqlQuery<'static, Pg, diesel::query_builder::SqlQuery> {
    bind_all!(
        diesel::sql_query(pg_placeholders(sql)).into_boxed::<Pg>(),
        binds
    )
}

/// `?` → `$1, $2, …` (our SQL never has a `?` inside a literal).
fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl Conn for SqliteConnection {
    fn savepoint<T, E>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>,
    {
        self.transaction(f)
    }
    fn execute(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<usize> {
        CachedQuery { sql, binds }.execute(self)
    }
    fn load_cached<T>(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static,
    {
        CachedQuery { sql, binds }.load::<T>(self)
    }
    fn load<T>(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static,
    {
        sqlite_query(sql, binds).load::<T>(self)
    }
    fn write_tx<T, E>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>,
    {
        // On SQLITE_FULL or an I/O error SQLite rolls the transaction back itself; diesel's
        // ROLLBACK then fails ("no transaction is active") and diesel answers with that error
        // instead of the one that happened. Keep the one that happened.
        let mut failure: Option<E> = None;
        let r = self.immediate_transaction(|c| {
            f(c).map_err(|e| {
                failure = Some(e);
                E::from(diesel::result::Error::RollbackTransaction)
            })
        });
        r.map_err(|e| failure.take().unwrap_or(e))
    }
    fn is_postgres(&self) -> bool {
        false
    }
}

impl Conn for PgConnection {
    fn savepoint<T, E>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>,
    {
        self.transaction(f)
    }
    fn execute(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<usize> {
        CachedQuery { sql, binds }
            .execute(self)
            .inspect_err(note_pg_error)
    }
    fn load_cached<T>(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static,
    {
        CachedQuery { sql, binds }
            .load::<T>(self)
            .inspect_err(note_pg_error)
    }
    fn load<T>(&mut self, sql: &str, binds: Vec<Bind>) -> DbResult<Vec<T>>
    where
        T: QueryableByName<Sqlite> + QueryableByName<Pg> + 'static,
    {
        pg_query(sql, binds)
            .load::<T>(self)
            .inspect_err(note_pg_error)
    }
    fn write_tx<T, E>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, E>) -> Result<T, E>
    where
        E: From<diesel::result::Error>,
    {
        self.transaction(f)
    }
    fn is_postgres(&self) -> bool {
        true
    }
}

/// How long a request waits for a PostgreSQL connection, and how long once one could not be had
/// (the database unreachable: a restart, a partition): then each request is answered 503 within
/// a second instead of holding its client for ten, until a connection is had again.
const PG_CHECKOUT: std::time::Duration = std::time::Duration::from_secs(10);
const PG_CHECKOUT_WHILE_UNREACHABLE: std::time::Duration = std::time::Duration::from_secs(1);

/// A pooled PostgreSQL connection, when it was last found alive, and the [`PG_LOST`] count then.
pub struct PgConn {
    conn: PgConnection,
    checked: std::time::Instant,
    lost: u64,
}

/// How many statements have failed because their connection was lost (closed by the server, a
/// restart, a network cut). Any such failure makes every pooled connection be checked again at
/// its next check-out: the ones that died with it are found and replaced, not handed out again.
static PG_LOST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Counts a statement's failure in [`PG_LOST`] when its connection was lost. Called where a
/// statement runs and where any database error becomes a `StoreError` (a transaction's `BEGIN` or
/// `COMMIT` failing is seen only there); counting one failure twice does no harm.
pub(crate) fn note_pg_error(e: &diesel::result::Error) {
    use diesel::result::{DatabaseErrorKind as Kind, Error};
    let lost = match e {
        Error::DatabaseError(Kind::ClosedConnection | Kind::UnableToSendCommand, _)
        | Error::BrokenTransactionManager => true,
        Error::RollbackErrorOnCommit { commit_error, .. } => {
            note_pg_error(commit_error);
            false
        }
        _ => false,
    };
    if lost {
        PG_LOST.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl std::ops::Deref for PgConn {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.conn
    }
}

/// A connection found alive this recently is handed out without asking again.
const PG_CHECKED_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// diesel's connection manager, but a connection is checked (`SELECT 1`, a round trip) on
/// check-out only when it was not checked in the last [`PG_CHECKED_FOR`], or a statement lost
/// its connection since ([`PG_LOST`]): one in every 3.6 statements of a create was that check (a
/// statement log of the load benchmark), each a round trip and a query the server parses and
/// plans. After a restart or a cut, the first statement to find its connection gone makes every
/// other one be checked before it is used again (the connections died together).
#[derive(Debug)]
pub struct PgManager(ConnectionManager<PgConnection>);

impl ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<PgConn, Self::Error> {
        let lost = PG_LOST.load(std::sync::atomic::Ordering::SeqCst);
        Ok(PgConn {
            conn: self.0.connect()?,
            checked: std::time::Instant::now(),
            lost,
        })
    }

    fn is_valid(&self, c: &mut PgConn) -> Result<(), Self::Error> {
        let lost = PG_LOST.load(std::sync::atomic::Ordering::SeqCst);
        if c.checked.elapsed() < PG_CHECKED_FOR && c.lost == lost {
            return Ok(());
        }
        self.0.is_valid(&mut c.conn).inspect_err(|e| {
            if let diesel::r2d2::Error::QueryError(e) = e {
                note_pg_error(e);
            }
        })?;
        c.checked = std::time::Instant::now();
        c.lost = lost;
        Ok(())
    }

    fn has_broken(&self, c: &mut PgConn) -> bool {
        self.0.has_broken(&mut c.conn)
    }
}

/// PostgreSQL's pool, and whether the last attempt to get a connection failed (shared by clones).
#[derive(Clone)]
pub struct PgPool {
    pool: Pool<PgManager>,
    unreachable: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::ops::Deref for PgPool {
    type Target = Pool<PgManager>;
    fn deref(&self) -> &Self::Target {
        &self.pool
    }
}

impl PgPool {
    /// A connection, waiting [`PG_CHECKOUT`], or [`PG_CHECKOUT_WHILE_UNREACHABLE`] once a
    /// checkout timed out while the pool held fewer connections than it may (so they could not
    /// be made or kept: the database unreachable), until one succeeds. A checkout that timed out
    /// on a busy pool (every connection made and in use, say behind a lock) changes nothing.
    pub fn checkout(&self) -> Result<PooledConnection<PgManager>, diesel::r2d2::PoolError> {
        use std::sync::atomic::Ordering;
        let down = self.unreachable.load(Ordering::Relaxed);
        let got = self.pool.get_timeout(if down {
            PG_CHECKOUT_WHILE_UNREACHABLE
        } else {
            PG_CHECKOUT
        });
        match &got {
            Ok(_) if down => self.unreachable.store(false, Ordering::Relaxed),
            Err(_) if !down => {
                let s = self.pool.state();
                let busy = s.connections >= self.pool.max_size() && s.idle_connections == 0;
                if !busy {
                    self.unreachable.store(true, Ordering::Relaxed)
                }
            }
            _ => {}
        }
        got
    }
}

/// A pool of either backend.
#[derive(Clone)]
pub enum Db {
    Postgres(PgPool),
    /// The pool, the database file's path and its `synchronous` setting (FULL, NORMAL, EXTRA).
    Sqlite(
        Pool<ConnectionManager<SqliteConnection>>,
        std::path::PathBuf,
        String,
    ),
}

pub enum PooledConn {
    Postgres(PooledConnection<PgManager>),
    Sqlite(PooledConnection<ConnectionManager<SqliteConnection>>),
}

/// Runs the same block against whichever backend `$conn` holds.
#[macro_export]
macro_rules! with_conn {
    ($pooled:expr, |$c:ident| $body:expr) => {
        match $pooled {
            $crate::store::db::PooledConn::Postgres(ref mut __p) => {
                let $c: &mut diesel::PgConnection = &mut *__p;
                $body
            }
            $crate::store::db::PooledConn::Sqlite(ref mut __p) => {
                let $c: &mut diesel::SqliteConnection = &mut *__p;
                $body
            }
        }
    };
}

#[derive(Debug)]
struct SqlitePragmas {
    sync: String,
}

/// Every PostgreSQL statement of Courier's ends within a minute, and no lock is waited for
/// more than 20 s: a database that hangs (a network partition without a reset, a table locked
/// by hand) answers 503 instead of holding requests open (an outside fault probe saw 88 s).
/// Courier's statements take milliseconds; migrations run without a limit.
const PG_TIMEOUTS: &str = "SET statement_timeout = '60s'; SET lock_timeout = '20s'";

#[derive(Debug)]
struct PgTimeouts;

impl CustomizeConnection<PgConn, diesel::r2d2::Error> for PgTimeouts {
    fn on_acquire(&self, conn: &mut PgConn) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(PG_TIMEOUTS)
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // WAL is set once on the file before the pool exists (setting it per connection gave
        // "database is locked"); here only per-connection settings.
        // secure_delete: freed content is zeroed, so a purge or erasure leaves no trace of the
        // removed ids in the file's free pages (tests/api/retention.rs scans the raw files).
        sqlite_pragmas(conn, &self.sync).map_err(diesel::r2d2::Error::QueryError)
    }
}

/// SQLite checkpoints the write-ahead log into the database file itself only once it has grown
/// this far (pages, 4 KiB each): normally [`Checkpointer`] has done it long before, off the
/// writer's path.
const AUTOCHECKPOINT_PAGES: u32 = 16_000;

/// Per-connection settings. No memory-mapped I/O (`mmap_size = 0`): when another connection has
/// committed, SQLite drops a connection's whole mapping at its next transaction and maps it anew,
/// page fault by page fault, and the profile of the write benchmark showed the kernel's unmapping
/// and faulting as the largest cost. Without it pages are read with `pread` from the OS cache.
/// Measured (`cargo bench --bench load -- --messages 100000 --recipients 100 --creates 8000`,
/// interleaved): creates/s at 32 clients up, inbox search p50/p99 within ~0.5/2 ms of before.
fn sqlite_pragmas(conn: &mut SqliteConnection, sync: &str) -> QueryResult<()> {
    conn.batch_execute(&format!(
        "PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON; PRAGMA secure_delete = ON; PRAGMA synchronous = {sync}; PRAGMA cache_size = -65536; PRAGMA mmap_size = 0; PRAGMA wal_autocheckpoint = {AUTOCHECKPOINT_PAGES};"
    ))
}

/// SQLite: a thread that checkpoints the write-ahead log into the database file every
/// [`Checkpointer::EVERY`]. SQLite's own automatic checkpoint (every 1,000 pages by default) runs
/// inside the commit that crosses the mark, with two fsyncs, while the single writer's lock is
/// held: the profile of the write benchmark showed the writer waiting on them for much of its
/// time. A `PASSIVE` checkpoint here runs beside readers and the writer and blocks neither. The
/// thread ends when this is dropped (with its store).
pub struct Checkpointer {
    _stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    pub const EVERY: std::time::Duration = std::time::Duration::from_millis(100);

    /// `None` on PostgreSQL.
    pub fn start(db: &Db) -> Option<Checkpointer> {
        let Db::Sqlite(pool, ..) = db else {
            return None;
        };
        let pool = pool.clone();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name("courier-checkpoint".into())
            .spawn(move || {
                // A failure is logged once a minute while it lasts (with how many passes failed),
                // not ten times a second: a full disk fails every pass.
                let mut failing: Option<(std::time::Instant, u64)> = None;
                loop {
                    match stopped.recv_timeout(Self::EVERY) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let done = pool.get().map_err(|e| e.to_string()).and_then(|mut c| {
                        c.batch_execute("PRAGMA wal_checkpoint(PASSIVE)")
                            .map_err(|e| e.to_string())
                    });
                    match (done, &mut failing) {
                        (Ok(()), Some((_, n))) => {
                            tracing::info!(failed_passes = *n, "WAL checkpoints succeed again");
                            failing = None;
                        }
                        (Ok(()), None) => {}
                        (Err(e), Some((since, n))) => {
                            *n += 1;
                            if since.elapsed() >= std::time::Duration::from_secs(60) {
                                tracing::warn!(error = %e, failed_passes = *n, "WAL checkpoints still fail; retrying");
                                *since = std::time::Instant::now();
                            }
                        }
                        (Err(e), None) => {
                            tracing::warn!(error = %e, "WAL checkpoint failed; retrying");
                            failing = Some((std::time::Instant::now(), 1));
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Checkpointer { _stop: stop }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the WAL checkpointer; SQLite checkpoints by itself");
                None
            }
        }
    }
}

/// SQLite's process-wide settings, made once before its first connection. Memory statistics off:
/// with them on (SQLite's default), every allocation of every connection takes one global mutex,
/// and the profile of the write benchmark showed the single writer waiting on it behind the
/// readers (token checks, searches, the event tail) for a large part of its time.
fn sqlite_global_config() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: `sqlite3_config` may be called before SQLite is initialised (its first
        // connection), which the `Once` and the call site (before any connection) ensure; after
        // that it only answers SQLITE_MISUSE and changes nothing.
        let rc = unsafe {
            libsqlite3_sys::sqlite3_config(
                libsqlite3_sys::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if rc != libsqlite3_sys::SQLITE_OK {
            tracing::debug!(
                rc,
                "SQLite was initialised already; memory statistics stay on"
            );
        }
    });
}

/// The SQLite database's directory exists (made if missing) and takes a new file now: a missing
/// directory that cannot be made, a read-only one and a full disk all stop the start here, the
/// same way each time, naming the directory and the reason.
fn check_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let fail = |what: &str, e: std::io::Error| {
        anyhow::anyhow!(
            "cannot use the data directory {}: {what}: {e}",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(|e| fail("cannot create it", e))?;
    let probe = dir.join(format!(".courier-write-check-{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&probe)
        .and_then(|mut f| {
            f.write_all(b"courier")?;
            f.sync_all()
        });
    let _ = std::fs::remove_file(&probe);
    written.map_err(|e| fail("cannot write a file in it", e))
}

/// `url` with libpq's TCP liveness settings, unless it sets them itself: a connection whose peer
/// stops answering (a partition that drops packets, no reset) fails within ~20 s instead of
/// holding a write for the kernel's ~15 minutes (an outside fault probe held creates for the
/// whole of a 40 s outage, then saved them after their clients had given up). The server's
/// `statement_timeout` cannot bound what never reaches it.
pub fn with_liveness(url: &str) -> String {
    const SETTINGS: [(&str, &str); 5] = [
        ("keepalives", "1"),
        ("keepalives_idle", "10"),
        ("keepalives_interval", "3"),
        ("keepalives_count", "3"),
        ("tcp_user_timeout", "20000"),
    ];
    let mut out = url.to_string();
    for (k, v) in SETTINGS {
        let given = url
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|p| p.split('=').next() == Some(k)));
        if !given {
            out.push(if out.contains('?') { '&' } else { '?' });
            out.push_str(&format!("{k}={v}"));
        }
    }
    out
}

impl Db {
    /// Opens the database named by `url` and applies pending migrations.
    pub fn connect(url: &str, pool_size: u32, sqlite_synchronous: &str) -> anyhow::Result<Db> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let url = &with_liveness(url);
            let pool = Pool::builder()
                .max_size(pool_size)
                .connection_timeout(PG_CHECKOUT)
                .connection_customizer(Box::new(PgTimeouts))
                .build(PgManager(ConnectionManager::<PgConnection>::new(url)))
                .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
            let mut c = pool.get()?;
            // A migration may rewrite a large table: no time limit for it.
            c.batch_execute("SET statement_timeout = 0; SET lock_timeout = 0")?;
            c.run_pending_migrations(POSTGRES_MIGRATIONS)
                .map_err(|e| anyhow::anyhow!("PostgreSQL migration failed: {e}"))?;
            c.batch_execute(PG_TIMEOUTS)?;
            Ok(Db::Postgres(PgPool {
                pool,
                unreachable: Default::default(),
            }))
        } else {
            let path = url.strip_prefix("sqlite://").unwrap_or(url);
            let dir = std::path::Path::new(path)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            // 0700, created if missing; then a probe write names the path and the reason when
            // the directory cannot be used.
            super::private::dir(dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot use the data directory {}: cannot create it: {e}",
                    dir.display()
                )
            })?;
            check_data_dir(dir)?;
            if !path.starts_with(":memory:") && !path.starts_with("file:") {
                super::private::file(std::path::Path::new(path))?;
            }
            let sync = match sqlite_synchronous {
                "NORMAL" | "FULL" | "EXTRA" => sqlite_synchronous.to_string(),
                other => anyhow::bail!(
                    "COURIER_SQLITE_SYNCHRONOUS must be FULL, NORMAL or EXTRA, not '{other}'"
                ),
            };
            sqlite_global_config();
            {
                let mut c = SqliteConnection::establish(path)
                    .map_err(|e| anyhow::anyhow!("cannot open SQLite database {path}: {e}"))?;
                c.batch_execute("PRAGMA journal_mode = WAL;")?;
                c.run_pending_migrations(SQLITE_MIGRATIONS)
                    .map_err(|e| anyhow::anyhow!("SQLite migration failed: {e}"))?;
            }
            let pool = Pool::builder()
                .max_size(pool_size)
                .connection_customizer(Box::new(SqlitePragmas { sync: sync.clone() }))
                .build(ConnectionManager::<SqliteConnection>::new(path))?;
            Ok(Db::Sqlite(pool, path.into(), sync))
        }
    }

    pub fn get(&self) -> anyhow::Result<PooledConn> {
        Ok(match self {
            Db::Postgres(p) => PooledConn::Postgres(p.checkout()?),
            Db::Sqlite(p, ..) => PooledConn::Sqlite(p.get()?),
        })
    }

    /// SQLite: an idle pooled connection, if one is free at once (`None` rather than waiting).
    /// PostgreSQL: always `None`, as its queries are network round trips. For the few indexed
    /// lookups an async task may make in place rather than through the blocking pool.
    pub fn get_now(&self) -> Option<PooledConn> {
        match self {
            Db::Postgres(_) => None,
            Db::Sqlite(p, ..) => p.try_get().map(PooledConn::Sqlite),
        }
    }

    pub fn backend_name(&self) -> &'static str {
        match self {
            Db::Postgres(_) => "postgresql",
            Db::Sqlite(..) => "sqlite",
        }
    }

    /// Does the group commit leave its fsync to [`Db::sync_wal`] (SQLite, `synchronous = FULL`)?
    pub(crate) fn defers_sync(&self) -> bool {
        matches!(self, Db::Sqlite(_, _, sync) if sync == "FULL")
    }

    /// SQLite with deferred syncs: makes everything committed to the write-ahead log so far durable (`fdatasync` on
    /// the `-wal` file, as `synchronous = FULL` does at the end of every commit). Opened by path
    /// each time, so a log SQLite has removed and made anew is never missed. No WAL file means
    /// its content was checkpointed into the database file, which SQLite synced itself.
    pub fn sync_wal(&self) -> std::io::Result<()> {
        let Db::Sqlite(_, path, _) = self else {
            return Ok(());
        };
        if !self.defers_sync() {
            return Ok(());
        }
        let mut wal = path.clone().into_os_string();
        wal.push("-wal");
        match std::fs::File::open(&wal) {
            Ok(f) => f.sync_data(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A pooled SQLite connection switched to `synchronous = NORMAL` for one group commit, whose
/// fsync [`Db::sync_wal`] then makes after the commit (in the syncer thread, or the writer's when
/// nothing else waits; see `store::writer`) and before any of its jobs is answered: the same durability as `FULL` (which is `NORMAL` plus an fsync of the WAL
/// after every commit), but the next group's transaction runs while the last one's fsync is under
/// way. Back to `FULL` when dropped, whatever happened meanwhile. (A connection of its own for
/// the group commit was tried: it wrote ~5% faster, but every reader then found the database
/// changed by another connection at each transaction and started with a cold page cache: inbox
/// search p50 2.5× slower.)
pub(crate) struct DeferredSync<'a> {
    conn: &'a mut SqliteConnection,
    deferred: bool,
}

impl<'a> DeferredSync<'a> {
    pub(crate) fn new(conn: &'a mut SqliteConnection, deferred: bool) -> DeferredSync<'a> {
        if deferred {
            if let Err(e) = conn.batch_execute("PRAGMA synchronous = NORMAL") {
                tracing::warn!(error = %e, "cannot defer the commit's fsync; it stays in the commit");
            }
        }
        DeferredSync { conn, deferred }
    }
}

impl std::ops::Deref for DeferredSync<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
    }
}

impl std::ops::DerefMut for DeferredSync<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
    }
}

impl Drop for DeferredSync<'_> {
    fn drop(&mut self) {
        if self.deferred {
            if let Err(e) = self.conn.batch_execute("PRAGMA synchronous = FULL") {
                tracing::error!(error = %e, "cannot restore synchronous = FULL on a pooled connection");
            }
        }
    }
}

#[cfg(test)]
mod liveness_tests {
    use super::with_liveness;

    #[test]
    fn tcp_liveness_is_added_unless_the_url_sets_it() {
        let u = with_liveness("postgres://u@h/db");
        assert!(u.starts_with("postgres://u@h/db?keepalives=1&"), "{u}");
        assert!(u.contains("tcp_user_timeout=20000"), "{u}");
        let u = with_liveness("postgres://u@h/db?options=-csearch_path%3Dx&tcp_user_timeout=5000");
        assert!(
            u.contains("tcp_user_timeout=5000") && !u.contains("tcp_user_timeout=20000"),
            "{u}"
        );
        assert!(u.contains("options=-csearch_path%3Dx&"), "{u}");
        assert_eq!(u.matches("keepalives_idle").count(), 1);
    }
}
