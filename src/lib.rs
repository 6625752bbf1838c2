//! Courier: a FHIR R4 secure-messaging service.
//!
//! Module map:
//! - [`config`]   layered settings: defaults < file < `COURIER_*` environment
//! - [`startup`]  `Application::build(settings)`: the bound server, used by `main` and tests
//! - [`fhir`]     the REST layer: interactions, search parsing, Bundles, OperationOutcome, metadata
//! - [`store`]    persistence: SQLite | PostgreSQL, versions, search index, encryption at rest
//! - [`audit`]    IHE BALP AuditEvents for every interaction
//! - [`auth`]     Courier's SMART authorization server, tokens, scopes and the access policy
//! - [`outbound`] every HTTP request to another server, and the address rules (SSRF)
//! - [`smart`]    Courier as a SMART client of EHRs: registry, discovery, backend-services tokens

/// mimalloc for every Rust allocation of the process (server, CLI, tests, benchmarks): the write
/// benchmark's profile spent ~17% of the single writer's time in glibc's malloc and free.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod audit;
pub mod auth;
pub mod compliance;
pub mod config;
pub mod fhir;
pub mod hooks;
pub mod messaging;
pub mod outbound;
pub mod search;
pub mod smart;
pub mod startup;
pub mod store;
