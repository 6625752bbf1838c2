//! IHE BALP AuditEvents: built by the store crate ([`courier_store::audit`], re-exported here),
//! sealed into a hash chain by [`chain`].

pub use courier_store::audit::*;
pub mod chain;
pub mod deferred;
