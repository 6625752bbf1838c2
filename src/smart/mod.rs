//! Courier as a SMART on FHIR client of EHRs (confidential asymmetric client).
//!
//! - [`registry`]   the EHRs Courier works with, and Courier's signing key for each
//! - [`discovery`]  an EHR's SMART endpoints, from `.well-known/smart-configuration` or, failing
//!   that, the CapabilityStatement's `oauth-uris` extension; cached
//! - [`identity`]   Courier's own identities linked to each EHR's records and identifiers
//! - [`launch`]     EHR and standalone launches ending in a Courier user token for the web app
//! - [`backend`]    the backend-services connection to each EHR: `client_credentials` with a
//!   `private_key_jwt` assertion, the token cached until shortly before it expires
//!
//! - [`session`]    signed-in users: EHR token refresh while active, idle log-off, logout
//! - [`chart`]      "file to chart": a thread filed to the EHR as Communications, via the outbox
//! - [`outbox`]     AuditEvent write-back to EHRs through a durable outbox, exactly once

pub mod backend;
pub mod chart;
pub mod discovery;
pub mod identity;
pub mod launch;
pub mod outbox;
pub mod registry;
pub mod session;
