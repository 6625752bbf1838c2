//! What other parts of Courier add to the store's transactions, registered once at start-up
//! ([`crate::store::Store::open`]): the store knows nothing above it.
//!
//! - [`Hooks::written`]: after the writes of one job, in its transaction, once every row lock is
//!   held — the derived rows that must commit with the resource (messaging events, schedules).
//! - [`Hooks::audited`]: after AuditEvents are inserted (one, or a PostgreSQL group's), in their
//!   transaction (the outbox rows that deliver them to the EHRs): `(id, event)` each.
//! - [`Hooks::erased`]: when resources are purged or erased, in the erasing transaction — each
//!   module removes the rows it keeps about them.
//!
//! A hook is called with the concrete connection of the backend in use (a trait object cannot
//! have generic methods); [`Dispatch`], which every connection implements, picks the method. An implementation usually forwards both methods of a pair to one generic function.

use super::{StoreError, WriteStatus};
use diesel::{PgConnection, SqliteConnection};
use serde_json::Value;

/// One resource a job wrote.
#[derive(Debug, Clone, Copy)]
pub struct Written<'a> {
    pub res_type: &'a str,
    pub id: &'a str,
    pub version_id: i64,
    pub status: WriteStatus,
    /// The new body (none for a delete).
    pub body: Option<&'a [u8]>,
}

/// One resource being erased.
#[derive(Debug, Clone, Copy)]
pub struct Erased<'a> {
    pub res_type: &'a str,
    pub id: &'a str,
}

pub trait Hooks: Send + Sync {
    fn written_sqlite(&self, c: &mut SqliteConnection, w: &[Written]) -> Result<(), StoreError>;
    fn written_pg(&self, c: &mut PgConnection, w: &[Written]) -> Result<(), StoreError>;
    fn audited_sqlite(
        &self,
        c: &mut SqliteConnection,
        events: &[(&str, &Value)],
    ) -> Result<(), StoreError>;
    fn audited_pg(&self, c: &mut PgConnection, events: &[(&str, &Value)])
        -> Result<(), StoreError>;
    fn erased_sqlite(&self, c: &mut SqliteConnection, e: &[Erased]) -> Result<(), StoreError>;
    fn erased_pg(&self, c: &mut PgConnection, e: &[Erased]) -> Result<(), StoreError>;
}

/// Calls the hook method for the connection's backend.
pub trait Dispatch {
    fn written(&mut self, h: &dyn Hooks, w: &[Written]) -> Result<(), StoreError>;
    fn audited(&mut self, h: &dyn Hooks, events: &[(&str, &Value)]) -> Result<(), StoreError>;
    fn erased(&mut self, h: &dyn Hooks, e: &[Erased]) -> Result<(), StoreError>;
}

impl Dispatch for SqliteConnection {
    fn written(&mut self, h: &dyn Hooks, w: &[Written]) -> Result<(), StoreError> {
        h.written_sqlite(self, w)
    }
    fn audited(&mut self, h: &dyn Hooks, events: &[(&str, &Value)]) -> Result<(), StoreError> {
        h.audited_sqlite(self, events)
    }
    fn erased(&mut self, h: &dyn Hooks, e: &[Erased]) -> Result<(), StoreError> {
        h.erased_sqlite(self, e)
    }
}

impl Dispatch for PgConnection {
    fn written(&mut self, h: &dyn Hooks, w: &[Written]) -> Result<(), StoreError> {
        h.written_pg(self, w)
    }
    fn audited(&mut self, h: &dyn Hooks, events: &[(&str, &Value)]) -> Result<(), StoreError> {
        h.audited_pg(self, events)
    }
    fn erased(&mut self, h: &dyn Hooks, e: &[Erased]) -> Result<(), StoreError> {
        h.erased_pg(self, e)
    }
}

/// Implements [`Hooks`] for `$t` by forwarding each pair of methods to generic functions
/// `written<C: Conn>(c, w)`, `audited<C: Conn>(c, events)` and `erased<C: Conn>(c, e)` in scope.
#[macro_export]
macro_rules! forward_hooks {
    ($t:ty, $written:path, $audited:path, $erased:path) => {
        impl $crate::store::hooks::Hooks for $t {
            fn written_sqlite(
                &self,
                c: &mut diesel::SqliteConnection,
                w: &[$crate::store::hooks::Written],
            ) -> Result<(), $crate::store::StoreError> {
                $written(c, w)
            }
            fn written_pg(
                &self,
                c: &mut diesel::PgConnection,
                w: &[$crate::store::hooks::Written],
            ) -> Result<(), $crate::store::StoreError> {
                $written(c, w)
            }
            fn audited_sqlite(
                &self,
                c: &mut diesel::SqliteConnection,
                events: &[(&str, &serde_json::Value)],
            ) -> Result<(), $crate::store::StoreError> {
                $audited(c, events)
            }
            fn audited_pg(
                &self,
                c: &mut diesel::PgConnection,
                events: &[(&str, &serde_json::Value)],
            ) -> Result<(), $crate::store::StoreError> {
                $audited(c, events)
            }
            fn erased_sqlite(
                &self,
                c: &mut diesel::SqliteConnection,
                e: &[$crate::store::hooks::Erased],
            ) -> Result<(), $crate::store::StoreError> {
                $erased(c, e)
            }
            fn erased_pg(
                &self,
                c: &mut diesel::PgConnection,
                e: &[$crate::store::hooks::Erased],
            ) -> Result<(), $crate::store::StoreError> {
                $erased(c, e)
            }
        }
    };
}
