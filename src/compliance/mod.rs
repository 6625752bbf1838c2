//! Compliance: retention classes, the purge, erasure and legal holds (issue 6).

pub mod api;
pub mod emergency;
pub mod purge;
pub mod retention;

// The key maintenance and the retention purge run as background tasks (`crate::background`).
