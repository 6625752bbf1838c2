//! The real-time hub: one task per instance tails the event log and broadcasts each event, with
//! the resource it concerns already loaded and indexed, to the sockets of this instance; every
//! socket then applies its own principal's access decision (`auth::policy`, the one path) before
//! anything is sent.
//!
//! Every instance tails the same table, so a change committed through any instance reaches the
//! sockets of all of them. The tail wakes on a local commit (`Store::changed`), on a PostgreSQL
//! `NOTIFY` from another instance (a listener thread), and otherwise once a second.

use super::events::{self, EventRow, Kind};
use crate::search::index::{self, Entry};
use crate::store::{Store, StoreError};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// One event, loaded once for all sockets.
#[derive(Debug)]
pub struct Event {
    pub seq: i64,
    pub kind: Kind,
    pub res_type: String,
    pub id: String,
    pub version_id: i64,
    /// The index entries of the resource the access decision is made on: the new version, or for
    /// a deletion the version deleted, or for a receipt the Communication's current version.
    pub entries: Vec<Entry>,
    /// The Communication's sender (`Type/id`), for receipts: only the sender and the recipient
    /// concerned see a receipt.
    pub sender: Option<String>,
    /// A receipt's recipient (`Type/id`).
    pub recipient: Option<String>,
    /// The message as sent to a socket that may see it (JSON text, built once).
    pub text: String,
}

pub struct Hub {
    store: Arc<Store>,
    tx: broadcast::Sender<Arc<Event>>,
    /// The seq of the last event broadcast.
    head: AtomicI64,
    /// Orders a new subscriber against the head moving without a broadcast (see `tail`).
    gate: parking_lot::Mutex<()>,
    /// Revoked tokens and removed clients: their sockets close (see `revocations`).
    pub revocations: Arc<super::revocations::Revocations>,
    /// True once the server is stopping: every socket closes at once with 1012 ("restarting"),
    /// so an app says it is reconnecting instead of "Connected" through the graceful shutdown.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

/// How many events a socket may be behind before it is told to reload instead of catching up.
pub const MAX_CATCH_UP: usize = 5000;

impl Hub {
    /// Starts the tail task (and, on PostgreSQL, the listener thread) from the current end of the
    /// log.
    pub fn start(store: Arc<Store>, postgres_url: Option<String>) -> anyhow::Result<Arc<Hub>> {
        let head = events::last_seq(&store)?;
        let (tx, _) = broadcast::channel(4096);
        let hub = Arc::new(Hub {
            store: store.clone(),
            tx,
            head: AtomicI64::new(head),
            gate: parking_lot::Mutex::new(()),
            revocations: super::revocations::Revocations::start(store.clone()),
            stopping: tokio::sync::watch::channel(false).0,
        });
        if let Some(url) = postgres_url {
            listen(url, Arc::downgrade(&store.changed));
        }
        let h = hub.clone();
        tokio::spawn(async move { h.tail().await });
        Ok(hub)
    }

    /// A receiver of live events and the seq it starts after.
    pub fn subscribe(&self) -> (broadcast::Receiver<Arc<Event>>, i64) {
        let _gate = self.gate.lock();
        let rx = self.tx.subscribe();
        (rx, self.head.load(Ordering::Acquire))
    }

    pub fn head(&self) -> i64 {
        self.head.load(Ordering::Acquire)
    }

    async fn tail(self: Arc<Self>) {
        loop {
            let woken = self.store.changed.clone();
            tokio::select! {
                _ = woken.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            loop {
                let after = self.head();
                if self.tx.receiver_count() == 0 {
                    // Nobody is listening on this instance: move the head without loading the
                    // events (a socket that connects later catches up from the log).
                    let store = self.store.clone();
                    let Ok(Ok(last)) =
                        tokio::task::spawn_blocking(move || events::last_seq(&store)).await
                    else {
                        break;
                    };
                    {
                        // Only while still nobody listens: a socket that subscribed meanwhile
                        // has a head before these events, and gets them from the loop below.
                        let _gate = self.gate.lock();
                        if self.tx.receiver_count() == 0 {
                            self.head.fetch_max(last, Ordering::AcqRel);
                            break;
                        }
                    }
                    continue;
                }
                let hub = self.clone();
                let batch = tokio::task::spawn_blocking(move || {
                    let b = hub.load_after(after, 500)?;
                    // Read after the events: a revocation committed before any of them is in
                    // the snapshot the sockets check before they send it.
                    if !b.0.is_empty() && hub.revocations.watched() {
                        hub.revocations.refresh()?;
                    }
                    Ok::<_, StoreError>(b)
                })
                .await;
                let (batch, raw_last) = match batch {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "event tail failed; retrying");
                        break;
                    }
                    Err(_) => break,
                };
                for e in batch {
                    self.head.store(e.seq, Ordering::Release);
                    let _ = self.tx.send(e); // no receivers is fine
                }
                // Past events that could not be loaded (their resource since purged) too.
                match raw_last {
                    Some(last) => {
                        self.head.fetch_max(last, Ordering::AcqRel);
                    }
                    None => break,
                }
            }
        }
    }

    /// Events after `seq` (at most `limit` rows of the log), loaded, and the seq of the last row
    /// read (`None` when there was none): an event whose resource is gone is skipped, but read
    /// past. Blocking.
    pub fn load_after(
        &self,
        seq: i64,
        limit: i64,
    ) -> Result<(Vec<Arc<Event>>, Option<i64>), StoreError> {
        let rows = events::after(&self.store, seq, limit)?;
        let last = rows.last().map(|r| r.seq);
        Ok((
            rows.into_iter()
                .filter_map(|r| self.load(r))
                .map(Arc::new)
                .collect(),
            last,
        ))
    }

    /// Loads what an event concerns. An event whose resource has since been purged is skipped.
    fn load(&self, r: EventRow) -> Option<Event> {
        let kind = Kind::parse(&r.kind)?;
        let store = &self.store;
        let (resource, shown): (Value, Option<Value>) = match kind {
            Kind::Create | Kind::Update => {
                let s = store.vread(&r.res_type, &r.fhir_id, r.version_id).ok()?;
                let v: Value = serde_json::from_slice(s.body.as_deref()?).ok()?;
                // Replayed after the message was withdrawn: the event, not its recalled content.
                let shown =
                    (!superseded_by_withdrawal(store, &r.res_type, &r.fhir_id, r.version_id))
                        .then(|| v.clone());
                (v, shown)
            }
            Kind::Delete => {
                let s = store
                    .vread(&r.res_type, &r.fhir_id, r.version_id - 1)
                    .ok()?;
                (serde_json::from_slice(s.body.as_deref()?).ok()?, None)
            }
            Kind::Receipt => {
                let s = store.read(&r.res_type, &r.fhir_id).ok()?;
                (serde_json::from_slice(s.body.as_deref()?).ok()?, None)
            }
        };
        let entries = index::entries(&store.registry, &r.res_type, &resource, &store.base_url);
        let sender = resource["sender"]["reference"]
            .as_str()
            .map(|s| local_ref(s, &store.base_url));
        let mut msg = json!({
            "type": "event",
            // Sealed: in the clear it counts every event Courier records, anyone's.
            "seq": crate::fhir::paging::seal_seq(store, r.seq).ok(),
            "event": kind.as_str(),
            "resourceType": r.res_type,
            "id": r.fhir_id,
            "versionId": r.version_id,
            "at": crate::search::dates::format_instant(r.at),
        });
        if let Some(v) = shown {
            msg["resource"] = v;
        }
        if kind == Kind::Receipt {
            let recipient = r.detail.clone()?;
            let receipt = super::receipts::get(store, &r.fhir_id, &recipient).ok()??;
            msg["receipt"] = receipt.to_json();
        }
        Some(Event {
            seq: r.seq,
            kind,
            res_type: r.res_type,
            id: r.fhir_id,
            version_id: r.version_id,
            entries,
            sender,
            recipient: r.detail,
            text: msg.to_string(),
        })
    }
}

/// `Type/id` of a reference to this server (relative or absolute under `base`); others unchanged.
/// Has the message `res_type/id` been withdrawn (`entered-in-error`) or deleted in a version
/// after `version`? Then that version's content is recalled: a replayed event (a socket's
/// catch-up, a subscription behind or retrying, `$events`) carries no resource (an outside
/// review: the original text went out again after the withdrawal, and after a deletion).
pub fn superseded_by_withdrawal(store: &Store, res_type: &str, id: &str, version: i64) -> bool {
    if res_type != "Communication" {
        return false;
    }
    match store.current_version(res_type, id) {
        Ok(Some((v, deleted))) if v > version => {
            if deleted {
                return true;
            }
        }
        Ok(Some(_)) => return false,
        // Gone from the store (purged, erased) or not readable: nothing of it is replayed.
        _ => return true,
    }
    store.read(res_type, id).is_ok_and(|s| {
        s.version_id > version
            && s.body
                .as_deref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .is_some_and(|v| v["status"] == "entered-in-error")
    })
}

/// One `/` after the base, as the search index reads it (`index::parse_reference`): a reference
/// that the index does not take for a local one is not one here either (an outside probe's
/// `base//Communication/x` passed as local here and not in the index).
pub fn local_ref(reference: &str, base: &str) -> String {
    reference
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix('/'))
        .filter(|r| !r.starts_with('/'))
        .map(String::from)
        .unwrap_or_else(|| reference.to_string())
}

/// PostgreSQL: a thread holding one connection that `LISTEN`s for events committed by any
/// instance and wakes the tail. Reading notifications is a non-blocking socket read, polled every
/// 10 ms; a broken connection is re-established. The thread ends (closing its connection) once the
/// store is gone, so an instance shut down in-process leaves no connection behind.
fn listen(url: String, wake: std::sync::Weak<tokio::sync::Notify>) {
    use diesel::{Connection, PgConnection, RunQueryDsl};
    std::thread::Builder::new()
        .name("courier-listen".into())
        .spawn(move || loop {
            if wake.strong_count() == 0 {
                return;
            }
            let mut conn = match PgConnection::establish(&crate::store::db::with_liveness(&url)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "event listener cannot connect; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            if let Err(e) =
                diesel::sql_query(format!("LISTEN {}", events::CHANNEL)).execute(&mut conn)
            {
                tracing::warn!(error = %e, "LISTEN failed; retrying");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            // Whatever was committed while not listening is picked up by the tail's own poll.
            let Some(w) = wake.upgrade() else { return };
            w.notify_one();
            drop(w);
            'poll: loop {
                let mut any = false;
                for n in conn.notifications_iter() {
                    match n {
                        Ok(_) => any = true,
                        Err(e) => {
                            tracing::warn!(error = %e, "event listener lost its connection");
                            break 'poll;
                        }
                    }
                }
                match wake.upgrade() {
                    Some(w) if any => w.notify_one(),
                    Some(_) => {}
                    None => return,
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
        .expect("spawn the event listener");
}
