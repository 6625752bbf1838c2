//! Background work, every task named and started from one place ([`start`]).
//!
//! | task | where | how often | what |
//! |---|---|---|---|
//! | `subscriptions` | leader | 100 ms (1 s when idle) | match new events to subscriptions, deliver rest-hooks ([`crate::messaging::dispatch`]) |
//! | `audit-chain` | leader | 1 s | seal new AuditEvents into the hash chain ([`crate::audit::chain`]) |
//! | `out-of-office` | leader | 1 s | auto-replies for away recipients ([`crate::messaging::away`]) |
//! | `escalation` | leader | 1 s | reminders and escalations of unread urgent messages ([`crate::messaging::escalation`]) |
//! | `notify` | every instance (row leases) | 2 s | email notices of unread messages ([`crate::notify`]) |
//! | `sessions` | leader | 30 s | end web-app sessions idle past the limit, audited ([`crate::smart::session::sweep`]) |
//! | `keys` | every instance | 30 s | pick up a rotated master or system key, re-wrap data keys |
//! | `retention-purge` | leader | `COURIER_PURGE_INTERVAL_SECS` (first after 60 s) | [`crate::compliance::purge`] |
//! | `outbox` | every instance (row leases) | continuous | AuditEvents and filings to the EHRs ([`crate::smart::outbox`]) |
//! | `scheduler` | every instance (claims) | continuous | scheduled messages and medication schedules ([`crate::messaging::schedule`]) |
//! | `abuse` | every instance | window | aggregated failed-authentication audits ([`crate::auth::abuse`]) |
//!
//! "Leader" is one instance at a time: on PostgreSQL the holder of an advisory lock (another
//! instance takes over when it dies), on SQLite the only instance.

use crate::config::Settings;
use crate::messaging::dispatch::Leader;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;

/// One periodic task: its name (in logs), where it runs, how often, and its work (blocking),
/// which returns a line to log when it did something.
pub struct Periodic {
    pub name: &'static str,
    pub leader_only: bool,
    pub every: Duration,
    pub first_after: Duration,
    pub work: fn(&Store, &Settings) -> anyhow::Result<Option<String>>,
}

/// The periodic tasks of an instance.
pub fn periodic(settings: &Settings) -> Vec<Periodic> {
    let second = Duration::from_secs(1);
    let mut tasks = vec![
        Periodic {
            name: "audit-chain",
            leader_only: true,
            every: second,
            first_after: second,
            work: |s, _| {
                crate::audit::chain::seal(s)?;
                Ok(None)
            },
        },
        Periodic {
            name: "out-of-office",
            leader_only: true,
            every: second,
            first_after: second,
            work: |s, _| {
                let n = crate::messaging::away::run(s)?;
                Ok((n > 0).then(|| format!("{n} out-of-office messages written")))
            },
        },
        Periodic {
            name: "escalation",
            leader_only: true,
            every: second,
            first_after: second,
            work: |s, cfg| {
                let p = crate::messaging::escalation::run(s, cfg)?;
                Ok((p.reminders + p.escalations + p.closed > 0).then(|| {
                    format!(
                        "{} reminders, {} escalations, {} closed",
                        p.reminders, p.escalations, p.closed
                    )
                }))
            },
        },
        Periodic {
            name: "notify",
            leader_only: false,
            every: Duration::from_secs(2),
            first_after: Duration::from_secs(2),
            work: |s, cfg| {
                let n = crate::notify::run(s, cfg)?;
                Ok((n > 0).then(|| format!("{n} email notices sent")))
            },
        },
        Periodic {
            name: "sessions",
            leader_only: true,
            every: Duration::from_secs(30),
            first_after: Duration::from_secs(30),
            work: |s, cfg| {
                let n = crate::smart::session::sweep(s, cfg.idle_timeout_secs)?;
                Ok((n > 0).then(|| format!("{n} idle sessions logged off")))
            },
        },
        Periodic {
            name: "keys",
            leader_only: false,
            every: Duration::from_secs(30),
            first_after: Duration::from_secs(30),
            work: |s, _| {
                // A rotation by `courier keys rotate --master` shows in the key file.
                s.reload_master_keys();
                s.refresh_system_key()?;
                let n = s.rewrap_step(1000)?;
                Ok((n > 0)
                    .then(|| format!("{n} data keys re-wrapped under the current master key")))
            },
        },
    ];
    if settings.purge_interval_secs > 0 {
        tasks.push(Periodic {
            name: "retention-purge",
            leader_only: true,
            every: Duration::from_secs(settings.purge_interval_secs as u64),
            first_after: Duration::from_secs(60),
            work: |s, _| {
                let sum =
                    crate::compliance::purge::purge(s, crate::clock::now_micros(), false, None)?;
                Ok(Some(format!(
                    "removed {}, held {}, keys destroyed {}, audit links cut {}",
                    sum.resources(),
                    sum.held,
                    sum.keys_destroyed,
                    sum.audit_links_cut
                )))
            },
        });
    }
    tasks
}

/// Runs `task` for ever on a tokio task of its own (a slow one never delays another).
pub fn run(task: Periodic, store: Arc<Store>, leader: Arc<Leader>, settings: Arc<Settings>) {
    tokio::spawn(async move {
        let mut wait = task.first_after;
        loop {
            tokio::time::sleep(wait).await;
            wait = task.every;
            let (s, l, cfg) = (store.clone(), leader.clone(), settings.clone());
            let (leader_only, work) = (task.leader_only, task.work);
            let done = tokio::task::spawn_blocking(move || {
                if leader_only && !l.lead() {
                    return Ok(None);
                }
                work(&s, &cfg)
            })
            .await;
            match done {
                Ok(Ok(Some(line))) => tracing::info!(task = task.name, "{line}"),
                Ok(Err(e)) => {
                    tracing::warn!(task = task.name, error = %e, "background task failed")
                }
                _ => {}
            }
        }
    });
}

/// What [`start`] leaves to stop at shutdown.
pub struct Started {
    pub outbox: tokio::task::AbortHandle,
    pub scheduler: tokio::task::AbortHandle,
}

/// Starts every background task of this instance.
pub fn start(
    store: &Arc<Store>,
    settings: &Arc<Settings>,
    leader: &Arc<Leader>,
    hub: &Arc<crate::messaging::hub::Hub>,
    ehrs: &Arc<crate::smart::backend::Connections>,
    outbound: &crate::outbound::Outbound,
    abuse: &Arc<crate::auth::abuse::Abuse>,
) -> Started {
    crate::messaging::dispatch::spawn(store.clone(), hub.clone(), leader.clone(), outbound.clone());
    for task in periodic(settings) {
        run(task, store.clone(), leader.clone(), settings.clone());
    }
    let outbox = crate::smart::outbox::spawn(store.clone(), ehrs.clone()).abort_handle();
    let scheduler = crate::messaging::schedule::spawn(
        store.clone(),
        settings.instance_id(),
        Duration::from_secs(settings.scheduler_lease_secs.max(1) as u64),
    )
    .abort_handle();
    abuse.spawn(store.clone());
    Started { outbox, scheduler }
}
