//! Courier's own authorization server and the one access-policy path.
//!
//! - [`scopes`]  SMART v1/v2 scope syntax, `requested ∩ registered`
//! - [`tokens`]  Courier's signing keys (ES384, rotatable) and its JWT access tokens
//! - [`keys`]    key generation, shared with Courier's client keys for EHRs
//! - [`clients`] the client registry (SMART Backend Services integrators) and their JWKS
//! - [`server`]  token, introspection, revocation and discovery endpoints
//! - [`guard`]   the middleware that turns a bearer token into a [`Principal`] (or a 401)
//! - [`abuse`]   rate limits per client address, failed authentications audited with a count
//! - [`policy`]  what a principal may do with a resource: the single decision every read, search,
//!   include, history entry, write and Binary read goes through
//!
//! Every caller — an integrator's backend service today, a clinician or patient after a SMART
//! launch later — is a [`Principal`] built from one kind of access token.

pub mod abuse;
pub mod clients;
pub mod guard;
pub mod keys;
pub mod policy;
pub mod scopes;
pub mod server;
pub mod tokens;

use scopes::Scope;

/// What kind of party a token speaks for, derived from its `fhirUser`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    System,
    Practitioner,
    Patient,
    RelatedPerson,
}

/// A validated access token: who is asking, through which client, with what grant.
#[derive(Debug, Clone)]
pub struct Principal {
    pub client_id: String,
    /// The token's `jti` (recorded in AuditEvents, used for revocation).
    pub jti: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    pub scopes: Vec<Scope>,
    /// The user, as a Courier reference (`Practitioner/123`); none for a backend service.
    pub fhir_user: Option<String>,
    /// Launch context: the patient in context (a Courier Patient id).
    pub patient: Option<String>,
    /// Launch context: the encounter in context.
    pub encounter: Option<String>,
    /// The Groups and CareTeams (`Group/…`, `CareTeam/…`) the user is a member of, looked up when
    /// the token is used: a message addressed to one of them is the user's too.
    pub groups: Vec<String>,
    /// Patients (Courier ids) this user reads under an active emergency-access grant ("break the
    /// glass"), looked up when the token is used; read-only, and every access is audited as BTG.
    pub emergency: Vec<String>,
}

impl Principal {
    pub fn kind(&self) -> SubjectKind {
        match self.fhir_user.as_deref().and_then(|u| u.split_once('/')) {
            None => SubjectKind::System,
            Some(("Patient", _)) => SubjectKind::Patient,
            Some(("RelatedPerson", _)) => SubjectKind::RelatedPerson,
            Some(_) => SubjectKind::Practitioner,
        }
    }

    pub fn scope_text(&self) -> String {
        scopes::render(&self.scopes)
    }
}
