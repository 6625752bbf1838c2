//! Closing what a revoked token opened. While a socket is open on this instance, one task reads
//! the revoked token ids and the registered clients every [`POLL`] (two small queries, however
//! many sockets) and hands the sockets a snapshot; the hub's tail refreshes it too before it
//! broadcasts a batch of events, so a socket never sends an event committed after its token's
//! revocation was. Revocations made on any instance (or by `courier client remove`) are seen,
//! as they are rows in the shared database.

use crate::store::{Store, StoreError};
use diesel::sql_types::Text;
use diesel::QueryableByName;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the open sockets' tokens are checked: a revoked token's socket closes within this
/// (plus a round trip).
pub const POLL: Duration = Duration::from_millis(500);

/// The revoked token ids and the registered clients, as read last.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    revoked: HashSet<String>,
    clients: HashSet<String>,
    loaded: bool,
}

impl Snapshot {
    /// Does this snapshot end a socket opened with the token `jti` of `client`?
    pub fn ends(&self, jti: Option<&str>, client: &str) -> bool {
        self.loaded
            && (jti.is_some_and(|j| self.revoked.contains(j)) || !self.clients.contains(client))
    }
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

pub struct Revocations {
    store: Arc<Store>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Revocations {
    /// Starts the poller (it reads only while a socket listens).
    pub fn start(store: Arc<Store>) -> Arc<Revocations> {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        let r = Arc::new(Revocations { store, tx });
        let weak = Arc::downgrade(&r);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let Some(r) = weak.upgrade() else { return };
                if r.tx.receiver_count() == 0 {
                    continue;
                }
                let refreshed = tokio::task::spawn_blocking(move || r.refresh()).await;
                if let Ok(Err(e)) = refreshed {
                    tracing::warn!(error = %e, "cannot read token revocations; retrying");
                }
            }
        });
        r
    }

    /// A socket's view of the revocations.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Is anyone listening?
    pub fn watched(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// Reads the revocations now and tells the sockets if they changed. Blocking.
    pub fn refresh(&self) -> Result<(), StoreError> {
        let revoked: Vec<Name> = self
            .store
            .query("SELECT jti AS name FROM revoked_tokens", vec![])?;
        let clients: Vec<Name> = self
            .store
            .query("SELECT client_id AS name FROM oauth_clients", vec![])?;
        let snap = Snapshot {
            revoked: revoked.into_iter().map(|n| n.name).collect(),
            clients: clients.into_iter().map(|n| n.name).collect(),
            loaded: true,
        };
        self.tx.send_if_modified(|old| {
            if **old == snap {
                return false;
            }
            *old = Arc::new(snap);
            true
        });
        Ok(())
    }
}

#[derive(QueryableByName)]
struct Counts {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    revoked: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    clients: i64,
}

/// Is the token `jti` of `client` revoked, or the client removed, as of now? Blocking; for a
/// socket about to send (one indexed query).
pub fn ends_now(store: &Store, jti: Option<&str>, client: &str) -> Result<bool, StoreError> {
    let rows: Vec<Counts> = store.query(
        "SELECT (SELECT COUNT(*) FROM revoked_tokens WHERE jti = ?) AS revoked, \
                (SELECT COUNT(*) FROM oauth_clients WHERE client_id = ?) AS clients",
        vec![
            jti.unwrap_or("").to_string().into(),
            client.to_string().into(),
        ],
    )?;
    Ok(rows.first().is_none_or(|r| r.revoked > 0 || r.clients == 0))
}
