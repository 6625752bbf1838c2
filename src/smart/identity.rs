//! Identity mapping between EHRs and Courier. Courier keeps its own identities (`Patient/{id}`,
//! `Practitioner/{id}`, `RelatedPerson/{id}`; a random id, `courier_store::ids::random_id`); each is linked to the `(iss, EHR reference)`
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
                crate::clock::now_micros().into(),
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
            let new = format!("{kind}/{}", courier_store::ids::random_id());
            c.execute(
                "INSERT INTO identities (courier_ref, kind, created_at) VALUES (?, ?, ?)",
                vec![
                    new.clone().into(),
                    kind.into(),
                    crate::clock::now_micros().into(),
                ],
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

/// The Courier identity an EHR's reference (`Practitioner/123` at the EHR named `ehr`) is linked to.
pub fn courier_reference(
    store: &Store,
    ehr: &str,
    ehr_ref: &str,
) -> anyhow::Result<Option<String>> {
    let ehr = super::registry::get(store, ehr)?
        .ok_or_else(|| anyhow::anyhow!("no EHR named {ehr} is registered"))?;
    Ok(store
        .query::<RefRow>(
            "SELECT courier_ref FROM identity_links WHERE iss = ? AND ehr_ref = ?",
            vec![ehr.iss.into(), ehr_ref.into()],
        )?
        .into_iter()
        .next()
        .map(|r| r.courier_ref))
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

/// What the web app shows of a person, so that every thread names the patient it is about and
/// every message its sender: name, for a patient birth date, gender and the MRN the EHR gives,
/// for a practitioner the role (qualification), for a related person the relationship. Read from
/// the EHR record at each launch ([`summary_of`]), kept sealed ([`remember`]).
pub fn summary_of(resource: &Value) -> Value {
    let name = resource["name"].as_array().and_then(|names| {
        let n = names
            .iter()
            .find(|n| n["use"] == "official")
            .or(names.first())?;
        if let Some(t) = n["text"].as_str().filter(|t| !t.trim().is_empty()) {
            return Some(t.trim().to_string());
        }
        let mut parts: Vec<&str> = n["given"]
            .as_array()
            .map(|g| g.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(f) = n["family"].as_str() {
            parts.push(f);
        }
        (!parts.is_empty()).then(|| parts.join(" "))
    });
    let coded_text = |c: &Value| -> Option<String> {
        c["text"].as_str().map(String::from).or_else(|| {
            c["coding"]
                .as_array()?
                .iter()
                .find_map(|k| k["display"].as_str().or(k["code"].as_str()))
                .map(String::from)
        })
    };
    // The medical record number: the identifier typed MR (HL7 v2 table 0203).
    let mrn = resource["identifier"].as_array().and_then(|ids| {
        ids.iter()
            .find(|i| {
                i["type"]["coding"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|k| k["code"] == "MR"))
            })
            .and_then(|i| i["value"].as_str())
            .map(String::from)
    });
    let role = match resource["resourceType"].as_str() {
        Some("Practitioner") => resource["qualification"]
            .as_array()
            .and_then(|q| q.first())
            .and_then(|q| coded_text(&q["code"])),
        Some("RelatedPerson") => resource["relationship"]
            .as_array()
            .and_then(|r| r.first())
            .and_then(coded_text),
        _ => None,
    };
    let short = |v: Option<String>| v.map(|s| s.chars().take(200).collect::<String>());
    let date = resource["birthDate"]
        .as_str()
        .filter(|d| d.len() <= 10 && d.chars().all(|c| c.is_ascii_digit() || c == '-'));
    let gender = resource["gender"]
        .as_str()
        .filter(|g| ["male", "female", "other", "unknown"].contains(g));
    json!({
        "name": short(name),
        "birthDate": date,
        "gender": gender,
        "mrn": short(mrn),
        "role": short(role),
    })
}

#[derive(QueryableByName)]
struct SealedRow {
    #[diesel(sql_type = Text)]
    courier_ref: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    sealed: Vec<u8>,
}

fn summary_aad(courier_ref: &str) -> String {
    format!("person_summaries:{courier_ref}")
}

/// Keeps (or refreshes) the summary of a Courier identity, sealed.
pub fn remember(store: &Store, courier_ref: &str, summary: &Value) -> Result<(), StoreError> {
    let (key_id, sealed) = store
        .keys
        .seal(summary.to_string().as_bytes(), &summary_aad(courier_ref));
    store.execute(
        "INSERT INTO person_summaries (courier_ref, key_id, sealed, updated_at) VALUES (?, ?, ?, ?) \
         ON CONFLICT (courier_ref) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed, updated_at = excluded.updated_at",
        vec![
            courier_ref.into(),
            key_id.into(),
            crate::store::db::Bind::Blob(sealed),
            crate::clock::now_micros().into(),
        ],
    )?;
    Ok(())
}

/// The summaries kept for `refs` (those with none are left out).
pub fn summaries(
    store: &Store,
    refs: &[String],
) -> Result<std::collections::BTreeMap<String, Value>, StoreError> {
    let mut out = std::collections::BTreeMap::new();
    for chunk in refs.chunks(100) {
        let marks = vec!["?"; chunk.len()].join(", ");
        let rows: Vec<SealedRow> = store.query(
            &format!("SELECT courier_ref, key_id, sealed FROM person_summaries WHERE courier_ref IN ({marks})"),
            chunk.iter().map(|r| r.clone().into()).collect(),
        )?;
        for r in rows {
            let plain = store
                .open_sealed(&r.key_id, &r.sealed, &summary_aad(&r.courier_ref))
                .map_err(StoreError::Other)?;
            let v: Value =
                serde_json::from_slice(&plain).map_err(|e| StoreError::Other(e.into()))?;
            out.insert(r.courier_ref, v);
        }
    }
    Ok(out)
}

/// Replaces the care team Courier knows for `patient_ref` (members as Courier references).
pub fn set_care_team(
    store: &Store,
    patient_ref: &str,
    members: &[String],
) -> Result<(), StoreError> {
    let now = crate::clock::now_micros();
    let _writer = store.exclusive_writer();
    let mut c = store.db.get().map_err(StoreError::from)?;
    with_conn!(c, |c| {
        c.write_tx(|c| {
        c.execute(
            "DELETE FROM care_team_members WHERE patient_ref = ?",
            vec![patient_ref.into()],
        )?;
        for m in members {
            c.execute(
                "INSERT INTO care_team_members (patient_ref, member_ref, updated_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                vec![patient_ref.into(), m.clone().into(), now.into()],
            )?;
        }
        Ok::<_, StoreError>(())
    })
    })
}

/// The care team Courier knows for `patient_ref`.
pub fn care_team(store: &Store, patient_ref: &str) -> Result<Vec<String>, StoreError> {
    #[derive(QueryableByName)]
    struct M {
        #[diesel(sql_type = Text)]
        member_ref: String,
    }
    Ok(store
        .query::<M>(
            "SELECT member_ref FROM care_team_members WHERE patient_ref = ? ORDER BY member_ref",
            vec![patient_ref.into()],
        )?
        .into_iter()
        .map(|m| m.member_ref)
        .collect())
}
