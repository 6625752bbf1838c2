//! Courier: a FHIR R4 secure-messaging service.
//!
//! Module map:
//! - [`config`]   layered settings: defaults < file < `COURIER_*` environment
//! - [`startup`]  `Application::build(settings)`: the bound server, used by `main` and tests
//! - [`api`]      the web layer every handler uses: state, request context, bodies, audited answers
//! - [`fhir`]     the REST layer: interactions, search parsing, Bundles, OperationOutcome, metadata
//! - [`store`], [`search`] the `courier-store` crate (below everything, knows nothing above it):
//!   SQLite | PostgreSQL, versions, search index, encryption at rest, the write path and its hooks
//! - [`background`] every background task, named, started from one place
//! - [`hooks`]    what the modules add to the store's transactions (events, schedules, outbox, erasure)
//! - [`messaging`] threads, receipts, real time, subscriptions, schedules, escalation, the web app
//! - [`compliance`] retention and secure deletion, erasure, legal holds, emergency access
//! - [`audit`]    IHE BALP AuditEvents for every interaction
//! - [`auth`]     Courier's SMART authorization server, tokens, scopes and the access policy
//! - [`outbound`] every HTTP request to another server, and the address rules (SSRF)
//! - [`smart`]    Courier as a SMART client of EHRs: registry, discovery, backend-services tokens

/// mimalloc for every Rust allocation of the process (server, CLI, tests, benchmarks): the write
/// benchmark's profile spent ~17% of the single writer's time in glibc's malloc and free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod api;
pub mod audit;
pub mod auth;
pub mod background;
pub mod compliance;
pub mod config;
pub mod fhir;
pub mod hooks;
pub mod messaging;
pub mod mfa;
pub mod notify;
pub mod outbound;
pub mod smart;
pub mod startup;

// The store crate, below everything: its modules keep their paths (`crate::store`, `crate::search`).
pub use courier_store::{clock, forward_hooks, search, store, with_conn};
