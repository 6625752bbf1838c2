//! Compliance: retention classes, the purge, erasure and legal holds (issue 6).

pub mod api;
pub mod emergency;
pub mod purge;
pub mod retention;

use crate::messaging::dispatch::Leader;
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;

/// Background work: on every instance, every 30 s, pick up a rotated system key and re-wrap data
/// keys still wrapped by a previous master key; on the leader, the purge every
/// `purge_interval_secs` (first a minute after start).
pub fn spawn(store: Arc<Store>, leader: Arc<Leader>, purge_interval_secs: i64) {
    let s = store.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(30)).await;
            let s2 = s.clone();
            let r = tokio::task::spawn_blocking(move || {
                // A rotation by `courier keys rotate --master` shows in the key file.
                s2.reload_master_keys();
                s2.refresh_system_key()?;
                anyhow::Ok(s2.rewrap_step(1000)?)
            })
            .await;
            match r {
                Ok(Ok(n)) if n > 0 => tracing::info!(
                    rewrapped = n,
                    "data keys re-wrapped under the current master key"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "key maintenance failed"),
                _ => {}
            }
        }
    });
    if purge_interval_secs <= 0 {
        return;
    }
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(60);
        loop {
            tokio::time::sleep(wait).await;
            wait = Duration::from_secs(purge_interval_secs as u64);
            let (s, l) = (store.clone(), leader.clone());
            let r = tokio::task::spawn_blocking(move || {
                if !l.lead() {
                    return Ok(None);
                }
                let now = crate::search::dates::now_micros();
                purge::purge(&s, now, false, None).map(Some)
            })
            .await;
            match r {
                Ok(Ok(Some(sum))) => tracing::info!(
                    removed = sum.resources(),
                    held = sum.held,
                    keys_destroyed = sum.keys_destroyed,
                    audit_links_cut = sum.audit_links_cut,
                    "retention purge"
                ),
                Ok(Err(e)) => tracing::warn!(error = %e, "retention purge failed"),
                _ => {}
            }
        }
    });
}
