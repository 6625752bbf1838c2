//! AuditEvents of refused requests that could not be recorded when they were refused (the
//! database full or unreachable: the request got 503 and nothing was served or changed). They
//! are kept in memory, in order, and recorded as soon as the store takes writes again, so the
//! trail shows the refusals of an outage too (an outside fault probe found them missing).
//!
//! Bounded: at most [`MAX_KEPT`] events and [`MAX_BYTES`] of them wait; beyond that only their
//! number is kept, and one AuditEvent says how many were lost. An event the store refuses for
//! another reason than its availability (it will never be taken) is dropped, logged, and counted
//! as lost, so it cannot hold up the ones behind it. An event whose first try failed after its
//! commit (a connection lost at that moment) may be recorded twice.
//!
//! **Kept across a crash** ([`Spool`]): each waiting event is also appended, sealed under the
//! system data key, to `audit-spool` in the data directory and synced before the refusal is
//! answered; the start reads it back and records what it holds. The file is emptied once all
//! that waited is recorded, and rewritten with what still waits after a pass the store cut
//! short, so a process killed in the middle of a pass records that pass's events a second time
//! at its next start (never fewer). A full disk must not stop the spool: beside it lies a ballast
//! file of [`BALLAST_BYTES`], made at the start, which the spool deletes to make room when a write
//! finds the disk full (and makes again once everything is recorded).

use crate::store::Store;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The spool's name in the data directory, and its ballast's.
pub const SPOOL_FILE: &str = "audit-spool";
pub const BALLAST_FILE: &str = "audit-spool.ballast";
/// The room the ballast keeps for the spool on a full disk (a refusal's event is ~2–3 KB sealed).
pub const BALLAST_BYTES: u64 = 8 << 20;
const SPOOL_AAD: &str = "audit-spool";

/// At most this many refusals wait to be recorded (~2 KB each)…
pub const MAX_KEPT: usize = 10_000;
/// … and at most this many bytes of them (an event echoes some of its request).
pub const MAX_BYTES: usize = 32 << 20;

#[derive(Default)]
pub struct Deferred {
    waiting: parking_lot::Mutex<VecDeque<(Value, usize)>>,
    bytes: std::sync::atomic::AtomicUsize,
    lost: AtomicU64,
    /// One flush at a time (the background pass and a stop may meet).
    flushing: tokio::sync::Mutex<()>,
    /// Where waiting events are kept across a crash (none in tests that build it bare).
    spool: Option<Spool>,
}

/// The waiting events on disk, sealed, one per line (`key_id`, tab, base64), in order.
pub struct Spool {
    path: PathBuf,
    ballast: PathBuf,
    store: Arc<Store>,
    /// Appends (under the queue's lock, so the file keeps the queue's order).
    file: parking_lot::Mutex<Option<std::fs::File>>,
}

impl Spool {
    fn line(&self, event: &Value) -> String {
        let (key_id, sealed) = self
            .store
            .keys
            .seal(event.to_string().as_bytes(), SPOOL_AAD);
        // A line of its own even after a write cut short (a full disk): a fragment before it is
        // read as one bad line, not glued to this one.
        format!("\n{key_id}\t{}\n", B64.encode(sealed))
    }

    /// Appends `event` and syncs; on a full disk, gives up the ballast's room and tries again.
    fn append(&self, event: &Value) {
        let line = self.line(event);
        let mut file = self.file.lock();
        for attempt in 0..2 {
            let r = (|| -> std::io::Result<()> {
                if file.is_none() {
                    *file = Some(private_file(&self.path, true)?);
                }
                let f = file.as_mut().expect("opened");
                f.write_all(line.as_bytes())?;
                f.sync_data()
            })();
            match r {
                Ok(()) => return,
                Err(e) if attempt == 0 && std::fs::remove_file(&self.ballast).is_ok() => {
                    tracing::warn!(error = %e, "the audit spool took its ballast's room");
                    // A partly written line is cut off at the next rewrite, and read as nothing.
                    *file = None;
                }
                Err(e) => {
                    tracing::error!(error = %e, "an AuditEvent waiting to be recorded could not be spooled: a crash now would lose it");
                    *file = None;
                    return;
                }
            }
        }
    }

    /// The file holds exactly `events` (written aside, synced, then renamed over it); the ballast
    /// is made again when nothing waits.
    fn rewrite(&self, events: &[Value]) {
        let mut file = self.file.lock();
        *file = None;
        let tmp = self.path.with_extension("tmp");
        let r = (|| -> std::io::Result<()> {
            let mut f = private_file(&tmp, false)?;
            for e in events {
                f.write_all(self.line(e).as_bytes())?;
            }
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            sync_dir(&self.path)
        })();
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            tracing::error!(error = %e, "the audit spool could not be rewritten (it may hold events recorded already)");
        }
        if events.is_empty() {
            make_ballast(&self.ballast);
        }
    }

    /// The events the file holds, in order; a line that does not open (cut off by a crash, or
    /// sealed under a destroyed key) is counted and skipped.
    fn read(&self) -> (Vec<Value>, usize) {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return (vec![], 0);
        };
        let (mut out, mut bad) = (Vec::new(), 0);
        for line in text.lines().filter(|l| !l.is_empty()) {
            let opened = line.split_once('\t').and_then(|(key_id, b64)| {
                let sealed = B64.decode(b64).ok()?;
                let plain = self.store.open_sealed(key_id, &sealed, SPOOL_AAD).ok()?;
                serde_json::from_slice::<Value>(&plain).ok()
            });
            match opened {
                Some(v) => out.push(v),
                None => bad += 1,
            }
        }
        (out, bad)
    }
}

/// A file only the service's user may read: created 0600 (appended to, or made anew).
fn private_file(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.create(true).mode(0o600);
    if append {
        o.append(true);
    } else {
        o.write(true).truncate(true);
    }
    o.open(path)
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// Keeps [`BALLAST_BYTES`] of the disk for the spool: allocated (`posix_fallocate`, so the room
/// is really taken without writing it), or written out where the file system cannot allocate.
fn make_ballast(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() >= BALLAST_BYTES) {
        return;
    }
    let r = (|| -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let mut f = private_file(path, false)?;
        // SAFETY: a plain call on an open file descriptor this function owns.
        let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, BALLAST_BYTES as libc::off_t) };
        if rc != 0 {
            let zeros = vec![0u8; 1 << 20];
            for _ in 0..(BALLAST_BYTES >> 20) {
                f.write_all(&zeros)?;
            }
        }
        f.sync_all()
    })();
    if let Err(e) = r {
        let _ = std::fs::remove_file(path);
        tracing::warn!(error = %e, "no room for the audit spool's ballast: on a full disk, refusals' AuditEvents may not survive a crash");
    }
}

impl Deferred {
    /// Waiting events kept in `dir`'s spool as well, and those a previous process left there
    /// taken back (to be recorded by the next flush).
    pub fn with_spool(store: Arc<Store>, dir: &Path) -> Deferred {
        let spool = Spool {
            path: dir.join(SPOOL_FILE),
            ballast: dir.join(BALLAST_FILE),
            store,
            file: parking_lot::Mutex::new(None),
        };
        let (left, bad) = spool.read();
        if bad > 0 {
            tracing::error!(
                lines = bad,
                "lines of the audit spool could not be read back (cut off by a crash, or their key is gone)"
            );
        }
        if !left.is_empty() {
            tracing::warn!(
                events = left.len(),
                "AuditEvents of requests refused before the last stop are recorded now"
            );
        }
        let d = Deferred {
            spool: Some(spool),
            ..Default::default()
        };
        for ev in left {
            d.keep(ev, false);
        }
        if d.is_empty() {
            if let Some(s) = &d.spool {
                s.rewrite(&[]);
            }
        }
        d
    }

    /// Keeps `event` to be recorded later.
    pub fn push(&self, event: Value) {
        self.keep(event, true);
    }

    fn keep(&self, event: Value, spool: bool) {
        let size = event.to_string().len();
        let mut q = self.waiting.lock();
        if q.len() >= MAX_KEPT || self.bytes.load(Ordering::Relaxed) + size > MAX_BYTES {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bytes.fetch_add(size, Ordering::Relaxed);
            if spool {
                if let Some(s) = &self.spool {
                    s.append(&event);
                }
            }
            q.push_back((event, size));
        }
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.waiting.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records what waits, oldest first, until the store refuses one (it stays, for the next
    /// pass). Returns how many were recorded.
    pub async fn flush(&self, store: &Arc<Store>, base_url: &str) -> usize {
        let _one = self.flushing.lock().await;
        let mut recorded = 0;
        // Dropped from the queue (refused for themselves): the spool must lose them too.
        let mut dropped = 0;
        loop {
            let Some((ev, _)) = self.waiting.lock().front().cloned() else {
                break;
            };
            match store.record_audit_async(ev).await {
                Ok(()) => recorded += 1,
                // The store is still unavailable: it stays, for the next pass.
                Err(e) if crate::store::health::unavailable(&e).is_some() => {
                    if recorded + dropped > 0 {
                        self.respool();
                    }
                    return recorded;
                }
                // Refused for itself: it never will be taken.
                Err(e) => {
                    tracing::error!(error = %e, "a late AuditEvent cannot be recorded: dropped");
                    self.lost.fetch_add(1, Ordering::Relaxed);
                    dropped += 1;
                }
            }
            if let Some((_, size)) = self.waiting.lock().pop_front() {
                self.bytes.fetch_sub(size, Ordering::Relaxed);
            }
        }
        let lost = self.lost.swap(0, Ordering::Relaxed);
        if lost > 0 {
            let ctx = crate::audit::Context::job(base_url, "deferred audit");
            let mut ev =
                crate::audit::event(&ctx, crate::audit::Interaction::Operation, None, None, None);
            ev["outcome"] = json!("4");
            ev["outcomeDesc"] = json!(format!(
                "{lost} refused requests' AuditEvents were lost: more than {MAX_KEPT} waited while the audit trail could not be written (the server log has each, by request id)"
            ));
            if store.record_audit_async(ev).await.is_err() {
                self.lost.fetch_add(lost, Ordering::Relaxed);
            }
        }
        if recorded + dropped > 0 {
            self.respool();
            tracing::info!(
                recorded,
                "AuditEvents of requests refused while the store was unavailable are recorded"
            );
        }
        recorded
    }

    /// The spool made to hold what waits now (the recorded ones leave it).
    fn respool(&self) {
        if let Some(s) = &self.spool {
            let q = self.waiting.lock();
            let left: Vec<Value> = q.iter().map(|(v, _)| v.clone()).collect();
            s.rewrite(&left);
        }
    }
}
