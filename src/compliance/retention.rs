//! Retention classes (the store files each write under one): see [`courier_store::retention`].

pub use courier_store::retention::*;
