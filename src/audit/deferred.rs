//! AuditEvents of refused requests that could not be recorded when they were refused (the
//! database full or unreachable: the request got 503 and nothing was served or changed). They
//! are kept in memory, in order, and recorded as soon as the store takes writes again, so the
//! trail shows the refusals of an outage too (an outside fault probe found them missing).
//!
//! Bounded: at most [`MAX_KEPT`] events and [`MAX_BYTES`] of them wait; beyond that only their
//! number is kept, and one AuditEvent says how many were lost. An event the store refuses for
//! another reason than its availability (it will never be taken) is dropped, logged, and counted
//! as lost, so it cannot hold up the ones behind it. An event whose first try failed after its
//! commit (a connection lost at that moment) may be recorded twice. They live in this process only: a crash or a stop while
//! the store is still unavailable loses them (the log keeps each refusal, with its request id).

use crate::store::Store;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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
}

impl Deferred {
    /// Keeps `event` to be recorded later.
    pub fn push(&self, event: Value) {
        let size = event.to_string().len();
        let mut q = self.waiting.lock();
        if q.len() >= MAX_KEPT || self.bytes.load(Ordering::Relaxed) + size > MAX_BYTES {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bytes.fetch_add(size, Ordering::Relaxed);
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
        loop {
            let Some((ev, _)) = self.waiting.lock().front().cloned() else {
                break;
            };
            match store.record_audit_async(ev).await {
                Ok(()) => recorded += 1,
                // The store is still unavailable: it stays, for the next pass.
                Err(e) if crate::store::health::unavailable(&e).is_some() => return recorded,
                // Refused for itself: it never will be taken.
                Err(e) => {
                    tracing::error!(error = %e, "a late AuditEvent cannot be recorded: dropped");
                    self.lost.fetch_add(1, Ordering::Relaxed);
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
        if recorded > 0 {
            tracing::info!(
                recorded,
                "AuditEvents of requests refused while the store was unavailable are recorded"
            );
        }
        recorded
    }
}
