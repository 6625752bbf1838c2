//! Courier as a SMART on FHIR client of EHRs (confidential asymmetric client).
//!
//! - [`registry`]   the EHRs Courier works with, and Courier's signing key for each
//! - [`discovery`]  an EHR's SMART endpoints, from `.well-known/smart-configuration` or, failing
//!   that, the CapabilityStatement's `oauth-uris` extension; cached
//! - [`backend`]    the backend-services connection to each EHR: `client_credentials` with a
//!   `private_key_jwt` assertion, the token cached until shortly before it expires
//!
//! Launches (EHR and standalone), identity mapping and AuditEvent write-back build on these.

pub mod backend;
pub mod discovery;
pub mod registry;
