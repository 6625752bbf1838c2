//! The group-commit writers. PostgreSQL's are at the end ([`start_pg`]).
//!
//! SQLite's single writer: a thread that commits every job waiting in its queue as one
//! transaction (group commit), and a syncer thread behind it that makes the committed groups
//! durable (one `fdatasync` of the write-ahead log for all the groups committed since the last
//! one) before anyone is answered or told of them. When no other group is waiting, the writer
//! makes the fsync itself.
//!
//! Callers do not take turns as the writer any more: an HTTP request's task waits on a channel
//! without holding a thread (see [`Store::write_async`]), the writer never hands the database
//! over between groups, and the next group's transaction runs while the syncer waits for the
//! disk. (Before, each waiting request held a blocking thread and the first to get the writer's
//! lock committed everyone's jobs and made the fsync itself; under 32 clients a fifth of both
//! cores stood idle in lock hand-overs and thread wake-ups.)

use super::{AnswerOnUnwind, Answers, Slot, Store, StoreError, WriteUnit};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Weak};

/// A group committed by the writer and not yet durable: each job's slot and outcome, and the
/// jobs themselves, freed once answered.
struct Committed {
    answers: Answers,
    spent: Vec<WriteUnit>,
}

/// The answer to a job the writer can no longer take (the store is closing).
pub(super) fn gone() -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "the store is closing; the write was not made"
    ))
}

/// The answer to a job committed but not made durable because the store closed meanwhile.
fn not_durable() -> StoreError {
    StoreError::Other(anyhow::anyhow!(
        "the store closed before the commit was made durable"
    ))
}

/// Starts the writer and the syncer for the store `store` will point to; returns the writer's
/// queue. Both threads end when the store (which owns the queue's sender) is dropped.
pub(super) fn start(store: Weak<Store>) -> Sender<(Arc<Slot>, WriteUnit)> {
    let (queue, jobs) = channel::<(Arc<Slot>, WriteUnit)>();
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

fn write_loop(
    store: Weak<Store>,
    jobs: Receiver<(Arc<Slot>, WriteUnit)>,
    to_sync: Sender<Committed>,
) {
    // A job taken from the queue to see whether another group is waiting.
    let mut next: Option<(Arc<Slot>, WriteUnit)> = None;
    loop {
        let first = match next.take() {
            Some(s) => s,
            None => match jobs.recv() {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        // Everything queued meanwhile joins this group.
        let batch: Vec<(Arc<Slot>, WriteUnit)> =
            std::iter::once(first).chain(jobs.try_iter()).collect();
        let (store, (answers, needs_sync, spent)) = match guarded(&store, batch, |store, batch| {
            let _writer = store.sqlite_writer.lock();
            store.commit_group(batch)
        }) {
            Ok(done) => done,
            Err(Stopped::Gone) => return,
            Err(Stopped::Panicked) => continue,
        };
        let group = Committed { answers, spent };
        if !needs_sync {
            answer(&store, group.answers);
            continue;
        }
        // Another group waiting: the syncer makes this one durable while the writer commits
        // that one. None: the writer makes the fsync itself (one thread hand-over fewer for a
        // lone write, such as a read's AuditEvent).
        next = jobs.try_recv().ok();
        if next.is_some() {
            if let Err(std::sync::mpsc::SendError(group)) = to_sync.send(group) {
                for (s, _) in group.answers {
                    s.answer(Err(not_durable()));
                }
            }
        } else {
            make_durable(&store, vec![group]);
        }
    }
}

fn sync_loop(store: Weak<Store>, committed: Receiver<Committed>) {
    while let Ok(first) = committed.recv() {
        // One fsync makes every group committed before it durable.
        let groups: Vec<Committed> = std::iter::once(first).chain(committed.try_iter()).collect();
        match store.upgrade() {
            Some(store) => make_durable(&store, groups),
            None => {
                for (s, _) in groups.into_iter().flat_map(|g| g.answers) {
                    s.answer(Err(not_durable()));
                }
            }
        }
    }
}

/// Fsyncs the write-ahead log, which makes `groups` (committed before this call) durable, then
/// answers their jobs and tells the event log's readers.
fn make_durable(store: &Store, groups: Vec<Committed>) {
    use std::sync::atomic::Ordering::Relaxed;
    let synced = store.db.sync_wal();
    match &synced {
        Ok(()) => {
            store.wal_syncs.fetch_add(1, Relaxed);
            store.synced_groups.fetch_add(groups.len() as u64, Relaxed);
        }
        Err(e) => {
            let jobs: usize = groups.iter().map(|g| g.answers.len()).sum();
            let request_ids: Vec<&str> = groups
                .iter()
                .flat_map(|g| g.spent.iter().filter_map(|j| j.request_id()))
                .collect();
            tracing::error!(error = %e, jobs, request_ids = %request_ids.join(","), "fsync of the SQLite write-ahead log failed");
        }
    }
    let mut spent = Vec::with_capacity(groups.len());
    for g in groups {
        spent.push(g.spent);
        for (s, r) in g.answers {
            let r = match &synced {
                Ok(()) => r,
                Err(e) => r.and(Err(StoreError::Other(anyhow::anyhow!(
                    "the commit could not be made durable: {e}"
                )))),
            };
            s.answer(r);
        }
    }
    store.changed.notify_one();
    // Freed after everyone is answered, on the syncer's thread (or the writer's when idle).
    drop(spent);
}

/// PostgreSQL: at most this many group-commit writers (each holds a pooled connection while it
/// commits a group; half the pool at most, so that reads keep the rest).
pub(super) const PG_WRITERS: u32 = 2;

/// PostgreSQL: the largest group one transaction takes (a longer queue makes several groups,
/// committed by the writers side by side).
const PG_GROUP: usize = 64;

/// Starts `writers` PostgreSQL group-commit writers sharing one queue, and returns the queue.
/// Each takes every job waiting (up to [`PG_GROUP`]) and commits them in one transaction; while
/// one commits, the others can write their groups' rows, so only the event lock and the commit
/// itself are taken in turn. The commit is durable (`synchronous_commit`) before any job is
/// answered. The writers end when the store (which owns the queue's sender) is dropped.
pub(super) fn start_pg(store: Weak<Store>, writers: u32) -> Sender<(Arc<Slot>, WriteUnit)> {
    let (queue, jobs) = channel::<(Arc<Slot>, WriteUnit)>();
    let jobs: SharedQueue = Arc::new(parking_lot::Mutex::new(jobs));
    for i in 0..writers {
        let (store, jobs) = (store.clone(), jobs.clone());
        std::thread::Builder::new()
            .name(format!("courier-pg-writer-{i}"))
            .spawn(move || pg_write_loop(store, jobs))
            .expect("cannot start a PostgreSQL writer thread");
    }
    queue
}

/// The queue the PostgreSQL writers share: one of them waits on it at a time.
type SharedQueue = Arc<parking_lot::Mutex<Receiver<(Arc<Slot>, WriteUnit)>>>;

fn pg_write_loop(store: Weak<Store>, jobs: SharedQueue) {
    loop {
        // One writer waits on the queue at a time; the others wait for it to take its group.
        let batch: Vec<(Arc<Slot>, WriteUnit)> = {
            let queue = jobs.lock();
            let Ok(first) = queue.recv() else { return };
            std::iter::once(first)
                .chain(queue.try_iter().take(PG_GROUP - 1))
                .collect()
        };
        let (store, (answers, spent)) =
            match guarded(&store, batch, |store, batch| store.commit_group_pg(batch)) {
                Ok(done) => done,
                Err(Stopped::Gone) => return,
                Err(Stopped::Panicked) => continue,
            };
        answer(&store, answers);
        drop(spent);
    }
}

/// Why a writer's group was not committed.
enum Stopped {
    /// The store is closing: every job was answered so, and the writer ends.
    Gone,
    /// The commit panicked: every job was answered with an error (`AnswerOnUnwind`), and the
    /// writer goes on with the next group.
    Panicked,
}

/// Runs `commit` on `batch` with the store, if it is still open.
fn guarded<T>(
    store: &Weak<Store>,
    batch: Vec<(Arc<Slot>, WriteUnit)>,
    commit: impl FnOnce(&Store, Vec<(Arc<Slot>, WriteUnit)>) -> T,
) -> Result<(Arc<Store>, T), Stopped> {
    let Some(store) = store.upgrade() else {
        for (s, _) in batch {
            s.answer(Err(gone()));
        }
        return Err(Stopped::Gone);
    };
    let held: Vec<Arc<Slot>> = batch.iter().map(|(s, _)| s.clone()).collect();
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _unwind = AnswerOnUnwind(held);
        commit(&store, batch)
    }));
    match done {
        Ok(t) => Ok((store, t)),
        Err(_) => Err(Stopped::Panicked),
    }
}

/// Answers committed (and durable) jobs, then tells the event log's readers.
fn answer(store: &Store, answers: Answers) {
    for (s, r) in answers {
        s.answer(r);
    }
    store.changed.notify_one();
}
