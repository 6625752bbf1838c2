//! Black-box tests through HTTP. One test binary; each test runs on SQLite and PostgreSQL.

mod helpers;

mod abuse;
mod access;
mod architecture;
mod audit;
mod auth;
mod browser;
mod bundles;
mod clients;
mod compat;
mod crud;
mod ehr;
mod emergency;
mod export;
mod failclosed;
mod keys;
mod kits;
mod messaging;
mod mfa;
mod notify;
mod operability;
mod people;
mod plans;
mod retention;
mod review_ad;
mod review_ei;
mod schedule;
mod search;
mod ssrf;
mod staff_only;
mod storage;
mod strict;
mod strict_more;
mod subscriptions;
mod validator;
