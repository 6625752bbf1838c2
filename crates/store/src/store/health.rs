//! Can the database be written now? Every write through the store's write path reports here
//! ([`WriteHealth::observe`]): a failure of the storage itself (disk full, read-only, I/O error,
//! database unreachable) marks the write path as failing until a write succeeds again. `/readyz`
//! answers not ready while it fails and tries a probe write ([`Store::probe_write`]) to find out
//! whether it has recovered; the FHIR API answers such failures 503 with `Retry-After`.
//!
//! Reads fail closed on their own: each read, search and operation waits for its AuditEvent to be
//! durable before it answers (see `fhir::rest::audit_outcome`), and answers 503 instead of the
//! data when that write fails.

use super::{Store, StoreError};
use crate::store::db::Conn;
use crate::with_conn;
use std::sync::atomic::{AtomicI64, Ordering};

/// The write path's state: failing since when (ms since the epoch; 0: not failing) and why.
#[derive(Default)]
pub struct WriteHealth {
    failing_since: AtomicI64,
    reason: parking_lot::Mutex<&'static str>,
    /// The last probe write's time and outcome, so `/readyz` probes at most once a second.
    last_probe: parking_lot::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
}

/// Why a store error means the storage cannot take writes now (rather than a bad request or a
/// bug), in words fit for a client; `None` for every other error. Diesel does not expose SQLSTATE
/// or SQLite's result codes, so the backends' own messages are matched: SQLite's
/// `sqlite3_errstr` texts and PostgreSQL's `ENOSPC` text (`disk_full`, 53100).
/// What [`unavailable`] says of a full database.
pub const FULL: &str = "the database storage is full";
/// What [`unavailable`] says of a read-only database.
pub const READ_ONLY: &str = "the database is read-only";
const IO_ERROR: &str = "the database storage reported an I/O error";
const NO_ANSWER: &str = "the database did not answer in time";
const UNREACHABLE: &str = "the database is unreachable";

pub fn unavailable(e: &StoreError) -> Option<&'static str> {
    use diesel::result::{DatabaseErrorKind, Error};
    let text = match e {
        StoreError::Db(Error::DatabaseError(DatabaseErrorKind::ReadOnlyTransaction, _)) => {
            return Some(READ_ONLY)
        }
        StoreError::Db(Error::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        )) => return Some(UNREACHABLE),
        StoreError::Db(e) => e.to_string(),
        StoreError::Other(e) => format!("{e:#}"),
        _ => return None,
    };
    let t = text.to_ascii_lowercase();
    // An error that already says it (a group's failure passed on to each of its jobs).
    if let Some(why) = [FULL, READ_ONLY, IO_ERROR, NO_ANSWER, UNREACHABLE]
        .into_iter()
        .find(|w| t.contains(&w.to_ascii_lowercase()))
    {
        return Some(why);
    }
    if t.contains("database or disk is full")
        || t.contains("no space left on device")
        || t.contains("disk quota exceeded")
    {
        Some(FULL)
    } else if t.contains("readonly database") || t.contains("read-only") {
        Some(READ_ONLY)
    } else if t.contains("disk i/o error") || t.contains("could not be made durable") {
        Some(IO_ERROR)
    } else if t.contains("canceling statement due to statement timeout")
        || t.contains("canceling statement due to lock timeout")
        || t.contains(super::WRITE_WAIT_TEXT)
    {
        Some(NO_ANSWER)
    } else if t.contains("unable to open database file")
        || t.contains("cannot open the database")
        || t.contains("timed out waiting for connection")
        || t.contains("the store is closing")
        // PostgreSQL's connection lost under a statement (libpq's and the server's words: a
        // fault probe's terminated backends and restarts got 500 for these).
        || t.contains("connection has been closed unexpectedly")
        || t.contains("server closed the connection unexpectedly")
        || t.contains("terminating connection due to administrator command")
        || t.contains("the database system is shutting down")
        || t.contains("the database system is starting up")
        || t.contains("could not receive data from server")
        || t.contains("could not send data to server")
        || t.contains("no connection to the server")
    {
        Some(UNREACHABLE)
    } else {
        None
    }
}

impl WriteHealth {
    /// Notes a write's outcome: storage failures mark the write path failing; a success clears it.
    pub fn observe<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Ok(_) => self.succeeded(),
            Err(e) => {
                if let Some(why) = unavailable(e) {
                    self.failed(why, e);
                }
            }
        }
    }

    pub fn succeeded(&self) {
        if self.failing_since.swap(0, Ordering::AcqRel) != 0 {
            tracing::warn!("database writes succeed again");
        }
    }

    fn failed(&self, why: &'static str, e: &StoreError) {
        *self.reason.lock() = why;
        let now = chrono::Utc::now().timestamp_millis().max(1);
        if self
            .failing_since
            .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::error!(error = %e, reason = why,
                "database writes are failing: reads and writes answer 503 until a write succeeds again");
        }
    }

    /// Since when (RFC 3339) and why the write path fails, if it does.
    pub fn failing(&self) -> Option<(String, &'static str)> {
        let since = self.failing_since.load(Ordering::Acquire);
        (since != 0).then(|| {
            let at = chrono::DateTime::from_timestamp_millis(since)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default();
            (at, *self.reason.lock())
        })
    }
}

impl Store {
    /// Writes and removes a small row in one committed transaction: does a write that needs new
    /// space in the database succeed now? Blocking. The outcome is noted in [`Store::health`].
    pub fn probe_write(&self) -> Result<(), StoreError> {
        let r = (|| {
            let _writer = self.exclusive_writer();
            let mut c = self.db.get()?;
            let id = uuid::Uuid::new_v4().to_string();
            // Random, so it needs its own pages (compression cannot shrink it).
            let pad: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
            with_conn!(c, |c| c.write_tx(|c| {
                c.execute(
                    "INSERT INTO write_probe (id, at, pad) VALUES (?, ?, ?)",
                    vec![
                        id.clone().into(),
                        crate::clock::now_micros().into(),
                        pad.into(),
                    ],
                )?;
                c.execute("DELETE FROM write_probe WHERE id = ?", vec![id.into()])?;
                Ok::<_, StoreError>(())
            }))?;
            // SQLite with a deferred fsync: durable only once the write-ahead log is synced.
            self.settle()
        })();
        self.health.observe(&r);
        r
    }

    /// Ready to serve: the database answers, and writes succeed (a probe write at most once a
    /// second, whose outcome is kept meanwhile). `Err` says why not.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.ping() {
            return Err("the database is unreachable".into());
        }
        let mut last = self.health.last_probe.lock();
        let fresh = last
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < std::time::Duration::from_secs(1));
        if !fresh {
            let r = self.probe_write().map_err(|e| {
                unavailable(&e)
                    .unwrap_or("a write to the database failed")
                    .to_string()
            });
            *last = Some((std::time::Instant::now(), r));
        }
        let probed = last.as_ref().map(|(_, r)| r.clone()).unwrap_or(Ok(()));
        drop(last);
        probed?;
        match self.health.failing() {
            Some((since, why)) => Err(format!("database writes are failing since {since}: {why}")),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(kind: diesel::result::DatabaseErrorKind, msg: &str) -> StoreError {
        StoreError::Db(diesel::result::Error::DatabaseError(
            kind,
            Box::new(msg.to_string()),
        ))
    }

    #[test]
    fn storage_failures_are_told_from_other_errors() {
        use diesel::result::DatabaseErrorKind::*;
        let full = "the database storage is full";
        assert_eq!(
            unavailable(&db(Unknown, "database or disk is full")),
            Some(full)
        );
        assert_eq!(
            unavailable(&db(
                Unknown,
                "could not extend file \"base/1/2\": No space left on device"
            )),
            Some(full)
        );
        assert_eq!(
            unavailable(&StoreError::Other(anyhow::anyhow!(
                "commit failed: database error: database or disk is full"
            ))),
            Some(full)
        );
        assert_eq!(
            unavailable(&db(Unknown, "attempt to write a readonly database")),
            Some("the database is read-only")
        );
        assert_eq!(
            unavailable(&db(
                ReadOnlyTransaction,
                "cannot execute INSERT in a read-only transaction"
            )),
            Some("the database is read-only")
        );
        assert_eq!(
            unavailable(&db(ClosedConnection, "server closed the connection")),
            Some("the database is unreachable")
        );
        // A connection lost under a statement, in PostgreSQL's and libpq's words (a fault probe
        // got 500 for these when a group commit's backend was terminated).
        for said in [
            "SSL connection has been closed unexpectedly",
            "terminating connection due to administrator command",
            "server closed the connection unexpectedly\n\tThis probably means the server terminated abnormally",
            "FATAL:  the database system is shutting down",
        ] {
            assert_eq!(unavailable(&db(Unknown, said)), Some(UNREACHABLE), "{said}");
        }
        // A group's failure passed on to each of its jobs keeps what it was.
        for why in [FULL, READ_ONLY, IO_ERROR, NO_ANSWER, UNREACHABLE] {
            let passed =
                StoreError::Other(anyhow::anyhow!("commit failed: {why}: database error: x"));
            assert_eq!(unavailable(&passed), Some(why));
        }
        assert_eq!(unavailable(&db(UniqueViolation, "duplicate key")), None);
        assert_eq!(unavailable(&StoreError::Conflict("retry".into())), None);
        assert_eq!(
            unavailable(&StoreError::NotFound("Communication".into(), "x".into())),
            None
        );
    }
}
