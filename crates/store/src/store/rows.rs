//! Row shapes read back with `sql_query` (valid on both backends).

use diesel::sql_types::{BigInt, Binary, Text};
use diesel::QueryableByName;

#[derive(Debug, Clone, QueryableByName)]
pub struct HeadRow {
    #[diesel(sql_type = BigInt)]
    pub rid: i64,
    #[diesel(sql_type = Text)]
    pub fhir_id: String,
    #[diesel(sql_type = BigInt)]
    pub version_id: i64,
    #[diesel(sql_type = BigInt)]
    pub last_updated: i64,
    #[diesel(sql_type = BigInt)]
    pub deleted: i64,
    #[diesel(sql_type = Text)]
    pub retention_class: String,
}

#[derive(Debug, Clone, QueryableByName)]
pub struct VersionRow {
    #[diesel(sql_type = BigInt)]
    pub vid: i64,
    #[diesel(sql_type = BigInt)]
    pub rid: i64,
    #[diesel(sql_type = Text)]
    pub res_type: String,
    #[diesel(sql_type = Text)]
    pub fhir_id: String,
    #[diesel(sql_type = BigInt)]
    pub version_id: i64,
    #[diesel(sql_type = BigInt)]
    pub last_updated: i64,
    #[diesel(sql_type = Text)]
    pub method: String,
    #[diesel(sql_type = BigInt)]
    pub deleted: i64,
    #[diesel(sql_type = Text)]
    pub key_id: String,
    #[diesel(sql_type = Binary)]
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, QueryableByName)]
pub struct RidRow {
    #[diesel(sql_type = BigInt)]
    pub rid: i64,
}

/// A resource row inserted, as `RETURNING rid, res_type, fhir_id` names it.
#[derive(Debug, Clone, QueryableByName)]
pub struct InsertedRow {
    #[diesel(sql_type = BigInt)]
    pub rid: i64,
    #[diesel(sql_type = Text)]
    pub res_type: String,
    #[diesel(sql_type = Text)]
    pub fhir_id: String,
}

#[derive(Debug, Clone, QueryableByName)]
pub struct RidTypeRow {
    #[diesel(sql_type = BigInt)]
    pub rid: i64,
    #[diesel(sql_type = Text)]
    pub res_type: String,
}

#[derive(Debug, Clone, QueryableByName)]
pub struct CountRow {
    #[diesel(sql_type = BigInt)]
    pub n: i64,
}

#[derive(Debug, Clone, QueryableByName)]
pub struct KeyRow {
    #[diesel(sql_type = Text)]
    pub key_id: String,
    #[diesel(sql_type = Text)]
    pub master_key_id: String,
    #[diesel(sql_type = Binary)]
    pub wrapped: Vec<u8>,
}

/// A scope's data key and the end of its write window.
#[derive(Debug, Clone, QueryableByName)]
pub struct ScopedKeyRow {
    #[diesel(embed)]
    pub key: KeyRow,
    #[diesel(sql_type = BigInt)]
    pub window_end: i64,
}

impl KeyRow {
    pub fn wrapped_key(&self) -> super::crypto::WrappedKey {
        super::crypto::WrappedKey {
            key_id: self.key_id.clone(),
            wrapped: self.wrapped.clone(),
        }
    }
}
