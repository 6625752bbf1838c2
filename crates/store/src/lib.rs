//! Courier's store, below everything else: the database (SQLite | PostgreSQL), resource versions,
//! the search index and its query planner, encryption at rest, the write path (one transaction per
//! write: the resource, its index rows, its AuditEvent), the IHE BALP AuditEvent builder and the
//! retention classes a write is filed under.
//!
//! It imports nothing from the application: what other modules add to its transactions (messaging
//! events, schedules, outbox rows, erasure of their own rows) they register as
//! [`store::hooks::Hooks`] when the store is opened. This crate boundary makes the compiler refuse
//! an import from the store into the application.
//!
//! - [`store`]     persistence, keys, the write path, hooks
//! - [`search`]    SearchParameters, the index, queries as SQL, FHIR dates
//! - [`clock`]     every "now" (microseconds since the epoch)
//! - [`audit`]     IHE BALP AuditEvents (building them; the hash chain lives in the application)
//! - [`retention`] retention classes and the policy that files each write under one

pub mod audit;
pub mod clock;
pub mod ids;
pub mod retention;
pub mod search;
pub mod store;
