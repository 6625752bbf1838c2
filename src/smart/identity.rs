//! Identity mapping between EHRs and Courier. Courier keeps its own identities (`Patient/{uuid}`,
//! `Practitioner/{uuid}`, `RelatedPerson/{uuid}`); each is linked to the `(iss, EHR reference)`
//! pairs it is known by and to its business identifiers (`system|value`: MRN, NPI, …).
//!
//! [`link`] takes a Patient/Practitioner/RelatedPerson read from an EHR and finds its Courier
//! identity: by its EHR reference, else by an identifier another EHR already linked (so one
//! patient seen in two EHRs is one Courier patient), else it creates one. An identifier or record
//! that would join two identities is a conflict: refused, recorded for an administrator
//! (`courier identity conflicts`), never resolved by guessing.
//!
//! [`ehr_reference`] goes the other way for writes to an EHR: that EHR's own reference, else an
//! identifier-only reference, else nothing — never a guess.

use crate::search::dates;
use crate::store::db::Conn;
use crate::store::{Store, StoreError};
use crate::with_conn;
use diesel::sql_types::{BigInt, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The kinds of person Courier keeps identities for.
pub const KINDS: &[&str] = &["Patient", "Practitioner", "RelatedPerson"];

/// How [`link`] found the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// This EHR record was linked before.
    Linked,
    /// Another EHR's record with the same identifier.
    Identifier,
    /// A new identity.
    Created,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The record cannot be linked without joining two identities; recorded for an administrator.
    #[error("identity conflict: {0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for LinkError {
    fn from(e: diesel::result::Error) -> Self {
        LinkError::Store(e.into())
    }
}

#[derive(QueryableByName)]
struct RefRow {
    #[diesel(sql_type = Text)]
    courier_ref: String,
}

#[derive(QueryableByName)]
struct EhrRefRow {
    #[diesel(sql_type = Text)]
    ehr_ref: String,
}

#[derive(QueryableByName)]
struct IdentifierRow {
    #[diesel(sql_type = Text)]
    system: String,
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(Debug, Clone, QueryableByName, serde::Serialize)]
pub struct ConflictRow {
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = BigInt)]
    pub at: i64,
    #[diesel(sql_type = Text)]
    pub iss: String,
    #[diesel(sql_type = Text)]
    pub ehr_ref: String,
    #[diesel(sql_type = Text)]
    pub claimed: String,
    #[diesel(sql_type = Text)]
    pub reason: String,
}

/// The identifiers of a resource that can identify it: both system and value present.
fn identifiers(resource: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = resource["identifier"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| {
            Some((
                i["system"].as_str()?.to_string(),
                i["value"].as_str()?.to_string(),
            ))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Finds or makes the Courier identity of a person record read from the EHR at `iss`. Only
/// identifiers in `trusted` systems (those the administrator trusts this EHR for,
/// `courier ehr add --trusted-systems`) are used to join, or stored: any EHR could otherwise claim
/// anyone by asserting their identifier.
pub fn link(
    store: &Store,
    iss: &str,
    trusted: &dyn Fn(&str) -> bool,
    resource: &Value,
) -> Result<(String, How), LinkError> {
    let kind = resource["resourceType"].as_str().unwrap_or_default();
    if !KINDS.contains(&kind) {
        return Err(LinkError::Invalid(format!(
            "cannot link a {kind}: only {KINDS:?}"
        )));
    }
    let id = resource["id"]
        .as_str()
        .filter(|id| fhir_codec::is_valid_id(id))
        .ok_or_else(|| LinkError::Invalid("the EHR record has no valid id".into()))?;
    let iss = iss.trim_end_matches('/');
    let ehr_ref = format!("{kind}/{id}");
    let ids: Vec<(String, String)> = identifiers(resource)
        .into_iter()
        .filter(|(system, _)| trusted(system))
        .collect();
    let mut c = store.db.get().map_err(StoreError::from)?;
    let result = with_conn!(c, |c| c
        .write_tx(|c| decide_and_link(c, iss, &ehr_ref, kind, &ids)));
    if let Err(LinkError::Conflict(reason)) = &result {
        // Identifier values can be PHI (an MRN): the log names the records, not the values.
        tracing::warn!(
            iss,
            ehr_ref,
            "identity conflict refused; see `courier identity conflicts`"
        );
        store.execute(
            "INSERT INTO identity_conflicts (id, at, iss, ehr_ref, claimed, reason) VALUES (?, ?, ?, ?, ?, ?)",
            vec![
                uuid::Uuid::now_v7().to_string().into(),
                dates::now_micros().into(),
                iss.into(),
                ehr_ref.clone().into(),
                ids.iter().map(|(s, v)| format!("{s}|{v}")).collect::<Vec<_>>().join(" ").into(),
                reason.clone().into(),
            ],
        )?;
    }
    result
}

fn decide_and_link<C: Conn>(
    c: &mut C,
    iss: &str,
    ehr_ref: &str,
    kind: &str,
    ids: &[(String, String)],
) -> Result<(String, How), LinkError> {
    let linked: Option<String> = c
        .load_cached::<RefRow>(
            "SELECT courier_ref FROM identity_links WHERE iss = ? AND ehr_ref = ?",
            vec![iss.into(), ehr_ref.into()],
        )?
        .into_iter()
        .next()
        .map(|r| r.courier_ref);
    let mut owners = BTreeSet::new();
    for (system, value) in ids {
        for r in c.load_cached::<RefRow>(
            "SELECT courier_ref FROM identity_identifiers WHERE system = ? AND value = ?",
            vec![system.clone().into(), value.clone().into()],
        )? {
            owners.insert(r.courier_ref);
        }
    }
    if let Some(other) = owners.iter().find(|o| !o.starts_with(&format!("{kind}/"))) {
        return Err(LinkError::Conflict(format!(
            "an identifier of this {kind} belongs to {other}"
        )));
    }
    // Within one EHR an identifier names one record: two records sharing one (a mother and her
    // newborn, a duplicate chart) are two people, and joining them would be a guess.
    for owner in &owners {
        let other_records: Vec<EhrRefRow> = c.load_cached(
            "SELECT ehr_ref FROM identity_links WHERE iss = ? AND courier_ref = ? AND ehr_ref <> ?",
            vec![iss.into(), owner.clone().into(), ehr_ref.into()],
        )?;
        if let Some(r) = other_records.first() {
            return Err(LinkError::Conflict(format!(
                "its identifiers belong to {owner}, which this EHR knows as {}",
                r.ehr_ref
            )));
        }
    }
    let (courier_ref, how) = match (linked, owners.len()) {
        (Some(l), _) if owners.iter().all(|o| *o == l) => (l, How::Linked),
        (Some(l), _) => {
            return Err(LinkError::Conflict(format!(
                "this record is linked to {l}, but its identifiers belong to {}",
                owners
                    .iter()
                    .filter(|o| **o != l)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
        (None, 0) => {
            let new = format!("{kind}/{}", uuid::Uuid::new_v4());
            c.execute(
                "INSERT INTO identities (courier_ref, kind, created_at) VALUES (?, ?, ?)",
                vec![new.clone().into(), kind.into(), dates::now_micros().into()],
            )?;
            (new, How::Created)
        }
        (None, 1) => (
            owners.into_iter().next().expect("one owner"),
            How::Identifier,
        ),
        (None, _) => {
            return Err(LinkError::Conflict(format!(
                "its identifiers belong to different identities: {}",
                owners.into_iter().collect::<Vec<_>>().join(", ")
            )))
        }
    };
    if how != How::Linked {
        c.execute(
            "INSERT INTO identity_links (iss, ehr_ref, courier_ref) VALUES (?, ?, ?)",
            vec![iss.into(), ehr_ref.into(), courier_ref.clone().into()],
        )?;
    }
    for (system, value) in ids {
        let known = c.load_cached::<RefRow>(
            "SELECT courier_ref FROM identity_identifiers WHERE system = ? AND value = ?",
            vec![system.clone().into(), value.clone().into()],
        )?;
        if known.is_empty() {
            c.execute(
                "INSERT INTO identity_identifiers (system, value, courier_ref) VALUES (?, ?, ?)",
                vec![
                    system.clone().into(),
                    value.clone().into(),
                    courier_ref.clone().into(),
                ],
            )?;
        }
    }
    Ok((courier_ref, how))
}

/// How to name the Courier identity `courier_ref` when writing to the EHR at `iss`: its reference
/// there, else an identifier-only reference, else `None` (no mapping; never guessed).
pub fn ehr_reference(
    store: &Store,
    iss: &str,
    courier_ref: &str,
) -> Result<Option<Value>, StoreError> {
    let iss = iss.trim_end_matches('/');
    if let Some(r) = store
        .query::<EhrRefRow>(
            "SELECT ehr_ref FROM identity_links WHERE iss = ? AND courier_ref = ? ORDER BY ehr_ref LIMIT 1",
            vec![iss.into(), courier_ref.into()],
        )?
        .into_iter()
        .next()
    {
        return Ok(Some(json!({"reference": r.ehr_ref})));
    }
    Ok(store
        .query::<IdentifierRow>(
            "SELECT system, value FROM identity_identifiers WHERE courier_ref = ? ORDER BY system, value LIMIT 1",
            vec![courier_ref.into()],
        )?
        .into_iter()
        .next()
        .map(|i| {
            let kind = courier_ref.split('/').next().unwrap_or_default();
            json!({"type": kind, "identifier": {"system": i.system, "value": i.value}})
        }))
}

/// The refused links, newest first (`courier identity conflicts`).
pub fn conflicts(store: &Store) -> Result<Vec<ConflictRow>, StoreError> {
    store.query(
        "SELECT id, at, iss, ehr_ref, claimed, reason FROM identity_conflicts ORDER BY at DESC, id DESC",
        vec![],
    )
}
