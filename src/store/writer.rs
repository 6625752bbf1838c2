//! SQLite's single writer: a thread that commits every job waiting in its queue as one
//! transaction (group commit), and a syncer thread behind it that makes the committed groups
//! durable (one `fdatasync` of the write-ahead log for all the groups committed since the last
//! one) before anyone is answered or told of them.
//!
//! Callers do not take turns as the writer any more: an HTTP request's task waits on a channel
//! without holding a thread (see [`Store::write_async`]), the writer never hands the database
//! over between groups, and the next group's transaction runs while the syncer waits for the
//! disk. (Before, each waiting request held a blocking thread and the first to get the writer's
//! lock committed everyone's jobs and made the fsync itself; under 32 clients a fifth of both
//! cores stood idle in lock hand-overs and thread wake-ups.)

use super::{AnswerOnUnwind, Job, JobResult, Slot, Store, StoreError};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Weak};

/// The groups committed by the writer and not yet durable: each job's slot and outcome.
type Committed = Vec<(Arc<Slot>, JobResult)>;

/// The answer to a job the writer can no longer take (the store is closing).
pub(super) fn gone() -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "the store is closing; the write was not made"
    ))
}

/// Starts the writer and the syncer for the store `store` will point to; returns the writer's
/// queue. Both threads end when the store (which owns the queue's sender) is dropped.
pub(super) fn start(store: Weak<Store>) -> Sender<Arc<Slot>> {
    let (queue, jobs) = channel::<Arc<Slot>>();
    let (to_sync, committed) = channel::<Committed>();
    let for_syncer = store.clone();
    std::thread::Builder::new()
        .name("courier-writer".into())
        .spawn(move || write_loop(store, jobs, to_sync))
        .expect("cannot start the SQLite writer thread");
    std::thread::Builder::new()
        .name("courier-syncer".into())
        .spawn(move || sync_loop(for_syncer, committed))
        .expect("cannot start the SQLite syncer thread");
    queue
}

fn write_loop(store: Weak<Store>, jobs: Receiver<Arc<Slot>>, to_sync: Sender<Committed>) {
    while let Ok(first) = jobs.recv() {
        // Everything queued meanwhile joins this group.
        let slots: Vec<Arc<Slot>> = std::iter::once(first).chain(jobs.try_iter()).collect();
        let Some(store) = store.upgrade() else {
            for s in slots {
                s.answer(Err(gone()));
            }
            return;
        };
        let batch: Vec<(Arc<Slot>, Job)> = slots
            .into_iter()
            .filter_map(|s| {
                let job = s.job.lock().take()?;
                Some((s, job))
            })
            .collect();
        let held: Vec<Arc<Slot>> = batch.iter().map(|(s, _)| s.clone()).collect();
        // A panic in a group answers its jobs with an error (`AnswerOnUnwind`) and leaves the
        // writer running for the next.
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _unwind = AnswerOnUnwind(held);
            let _writer = store.sqlite_writer.lock();
            store.commit_group(batch)
        }));
        let Ok((outcomes, needs_sync)) = done else {
            continue;
        };
        if needs_sync {
            if let Err(std::sync::mpsc::SendError(outcomes)) = to_sync.send(outcomes) {
                for (s, _) in outcomes {
                    s.answer(Err(gone()));
                }
            }
        } else {
            for (s, r) in outcomes {
                s.answer(r);
            }
            store.changed.notify_one();
        }
    }
}

fn sync_loop(store: Weak<Store>, committed: Receiver<Committed>) {
    while let Ok(first) = committed.recv() {
        // One fsync makes every group committed before it durable.
        let groups: Vec<Committed> = std::iter::once(first).chain(committed.try_iter()).collect();
        let store = store.upgrade();
        let synced = match &store {
            Some(s) => s.db.sync_wal().inspect(|_| {
                use std::sync::atomic::Ordering::Relaxed;
                s.wal_syncs.fetch_add(1, Relaxed);
                s.synced_groups.fetch_add(groups.len() as u64, Relaxed);
            }),
            None => Err(std::io::Error::other("the store was closed")),
        };
        if let Err(e) = &synced {
            let jobs: usize = groups.iter().map(Vec::len).sum();
            tracing::error!(error = %e, jobs, "fsync of the SQLite write-ahead log failed");
        }
        for (s, r) in groups.into_iter().flatten() {
            let r = match &synced {
                Ok(()) => r,
                Err(e) => r.and(Err(StoreError::Other(anyhow::anyhow!(
                    "the commit could not be made durable: {e}"
                )))),
            };
            s.answer(r);
        }
        if let Some(s) = store {
            s.changed.notify_one();
        }
    }
}
