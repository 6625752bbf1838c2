//! AuditEvents of refused requests that could not be recorded when they were refused (the
//! database full or unreachable: the request got 503 and nothing was served or changed). They
//! are kept in memory, in order, and recorded as soon as the store takes writes again, so the
//! trail shows the refusals of an outage too (an outside fault probe found them missing).
//!
//! Bounded: at most [`MAX_KEPT`] events wait; beyond that only their number is kept, and one
//! AuditEvent says how many were lost. They live in this process only: a crash or a stop while
//! the store is still unavailable loses them (the log keeps each refusal, with its request id).

use crate::store::Store;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// At most this many refusals wait to be recorded (~2 KB each).
pub const MAX_KEPT: usize = 10_000;

#[derive(Default)]
pub struct Deferred {
    waiting: parking_lot::Mutex<VecDeque<Value>>,
    lost: AtomicU64,
    /// One flush at a time (the background pass and a stop may meet).
    flushing: tokio::sync::Mutex<()>,
}

impl Deferred {
    /// Keeps `event` to be recorded later.
    pub fn push(&self, event: Value) {
        let mut q = self.waiting.lock();
        if q.len() >= MAX_KEPT {
            self.lost.fetch_add(1, Ordering::Relaxed);
        } else {
            q.push_back(event);
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
            let Some(ev) = self.waiting.lock().front().cloned() else {
                break;
            };
            if store.record_audit_async(ev).await.is_err() {
                return recorded;
            }
            self.waiting.lock().pop_front();
            recorded += 1;
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
