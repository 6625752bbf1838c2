//! AuditEvents in rows of their own (issue 24): one per read, search and write, so most of the
//! store's rows. An AuditEvent is written once and never changed, so it needs none of what a
//! versioned resource has: no head row, no version row, no generic index rows. It is one row of
//! `audit_events`:
//!
//! - `rid`: its place in the audit trail (the audit chain's links name it), which also names it:
//!   its id is `rid` under a keyed permutation ([`Ids`]), so the id is not stored and says nothing
//!   about how many events there are (AuditEvents moved from the generic tables keep their stored
//!   id, `fhir_id`);
//! - its date (`recorded`) as two columns (`at_lo`, `at_hi`), and its write time;
//! - its body, compressed and sealed under the audit class's data key as any body is.
//!
//! Its references (`agent`, `entity`, `source`; `patient` is those of type Patient,
//! `search::ALIASES`) are rows of `audit_refs`, stored once, keyed for lookup (parameter, target,
//! date, event), with no NULLs: an absolute reference has the type [`URL_TYPE`] and its URL as the
//! id. An outcome other than 0 is a row of `audit_tokens` (`search::SPARSE`); codes and names have
//! no rows (`search::UNSTORED`). The search SQL reads these tables for AuditEvent
//! (`search::sql`, `Sql::of`); a row's references are read back from its body when the row goes
//! (there is no index by event).

use super::db::{Bind, Conn};
use super::{names, Draft, IndexRows, StoreError};
use crate::search::index::Entry;
use aes_gcm::aes::cipher::{generic_array::GenericArray, BlockDecrypt, BlockEncrypt, KeyInit};
use aes_gcm::aes::Aes256;

/// The resource type held here.
pub const TYPE: &str = "AuditEvent";

/// The type of an absolute reference in `audit_refs` (its URL is the id): not a type name or a
/// short one (`search::names::TYPES`).
pub const URL_TYPE: &str = "/";

/// Is `res_type` held in the AuditEvent tables?
pub fn is_audit(res_type: &str) -> bool {
    res_type == TYPE
}

/// An AuditEvent row id in a search's `_id` list (`search::sql`): `#` cannot be in a FHIR id, and
/// `Store::search` turns every value that is not one into [`NO_ID`] first.
pub fn rid_token(rid: i64) -> String {
    format!("#{rid}")
}

/// What a searched `_id` that is not a FHIR id becomes: it matches no event.
pub const NO_ID: &str = "!";

/// Is `id` a FHIR id (`[A-Za-z0-9\-\.]{1,64}`)?
pub fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The draft `d` (made with an empty id) with its body named `id`, when its packed form is one
/// that carries the id (stored as it is, or deflated whole); `None` when the packed form leaves
/// the id out (`compress::DEFLATE_V1_AFTER_ID`), as nearly every one does.
pub(super) fn named(d: &Draft, id: &str, compress: bool) -> Option<Draft> {
    let packed = d.packed.as_deref()?;
    if packed.first() == Some(&super::compress::DEFLATE_V1_AFTER_ID) {
        return None;
    }
    let body = d.body.as_deref()?;
    let rest = body.strip_prefix(super::compress::identity(TYPE, "").as_slice())?;
    let mut json = super::compress::identity(TYPE, id);
    json.extend_from_slice(rest);
    let packed = if compress {
        super::compress::pack_for(&json, TYPE, id)
    } else {
        json.clone()
    };
    Some(Draft {
        version_id: d.version_id,
        last_updated: d.last_updated,
        body: Some(json),
        packed: Some(packed),
        class: d.class.clone(),
        patient: d.patient.clone(),
        entries: d.entries.clone(),
    })
}

/// The columns of an AuditEvent row read as a `rows::VersionRow` (version 1 of a live resource,
/// created by POST); `fhir_id` is '' for a derived id, which the reader fills in ([`Ids::id`]).
/// The table is named `r` (as the search SQL names the rows it selects).
pub const ROW_COLUMNS: &str = "r.rid AS vid, r.rid, 'AuditEvent' AS res_type, \
    COALESCE(r.fhir_id, '') AS fhir_id, CAST(1 AS BIGINT) AS version_id, r.last_updated, \
    'POST' AS method, CAST(0 AS BIGINT) AS deleted, \
    COALESCE((SELECT k.key_id FROM data_keys k WHERE k.n = r.key_n), '') AS key_id, r.body";

/// A tag in the permuted block: an id that does not decrypt to it is not a derived one.
const TAG: [u8; 8] = *b"CrAudEv1";

/// AuditEvent ids from row ids and back: AES-256 of one block (the tag, then the row id), in
/// base62 (22 digits, as every id Courier assigns). The key is derived from the audit chain's key,
/// which lives sealed in the database, so every instance of Courier on it derives the same ids.
pub struct Ids {
    cipher: Aes256,
}

impl Ids {
    pub fn new(chain_key: &[u8]) -> Ids {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"courier audit-event ids v1|");
        h.update(chain_key);
        let key = h.finalize();
        Ids {
            cipher: Aes256::new(&key),
        }
    }

    /// The id of the AuditEvent in row `rid`.
    pub fn id(&self, rid: i64) -> String {
        let mut block = [0u8; 16];
        block[..8].copy_from_slice(&TAG);
        block[8..].copy_from_slice(&rid.to_be_bytes());
        let mut b = GenericArray::from(block);
        self.cipher.encrypt_block(&mut b);
        crate::ids::base62(u128::from_be_bytes(b.into()))
    }

    /// The row of the AuditEvent with derived id `id`; `None` if `id` is not one.
    pub fn rid(&self, id: &str) -> Option<i64> {
        let n = crate::ids::from_base62(id)?;
        let mut b = GenericArray::from(n.to_be_bytes());
        self.cipher.decrypt_block(&mut b);
        let block: [u8; 16] = b.into();
        (block[..8] == TAG).then(|| i64::from_be_bytes(block[8..].try_into().expect("8 bytes")))
    }
}

/// What the chain key is sealed under (its associated data).
const CHAIN_KEY_AAD: &str = "audit_chain_key";

#[derive(diesel::QueryableByName)]
struct ChainKeyRow {
    #[diesel(sql_type = diesel::sql_types::Text)]
    key_id: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    seal: Vec<u8>,
}

impl super::Store {
    /// The audit chain's HMAC key (32 random bytes made on first use, kept sealed under the master
    /// key in `audit_chain_key`; every instance on the database reads the same). It also keys the
    /// AuditEvent ids ([`Ids`]). Not to be called inside a write transaction on SQLite (it may
    /// write, through the single writer's lock).
    pub fn chain_key(&self) -> Result<Vec<u8>, StoreError> {
        if let Some(k) = self.chain_key.get() {
            return Ok(k.clone());
        }
        let read = |store: &super::Store| -> Result<Option<Vec<u8>>, StoreError> {
            let rows: Vec<ChainKeyRow> = store.query(
                "SELECT key_id, seal FROM audit_chain_key WHERE id = 1",
                vec![],
            )?;
            rows.into_iter()
                .next()
                .map(|r| {
                    store
                        .open_sealed(&r.key_id, &r.seal, CHAIN_KEY_AAD)
                        .map_err(StoreError::Other)
                })
                .transpose()
        };
        let key = match read(self)? {
            Some(k) => k,
            None => {
                use rand::RngCore;
                let mut k = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut k);
                let (key_id, seal) = self.keys.seal(&k, CHAIN_KEY_AAD);
                // Two instances starting together: the first key stored is everyone's.
                self.execute(
                    "INSERT INTO audit_chain_key (id, key_id, seal) VALUES (1, ?, ?) ON CONFLICT (id) DO NOTHING",
                    vec![key_id.into(), Bind::Blob(seal)],
                )?;
                read(self)?
                    .ok_or_else(|| StoreError::Other(anyhow::anyhow!("no audit chain key")))?
            }
        };
        let _ = self.chain_key.set(key.clone());
        Ok(key)
    }
}

/// The row ids for `n` new AuditEvents, allocated in the write transaction: on SQLite from the
/// table's `AUTOINCREMENT` counter (which never goes back, so a row id, and with it an id, is
/// never used twice even after the newest events were purged); on PostgreSQL from its sequence.
pub(super) fn allocate<C: Conn>(c: &mut C, n: usize) -> Result<Vec<i64>, StoreError> {
    if n == 0 {
        return Ok(vec![]);
    }
    if c.is_postgres() {
        let rows: Vec<super::rows::CountRow> = c.load_cached(
            "SELECT nextval('audit_events_rid_seq') AS n FROM generate_series(1, ?)",
            vec![(n as i64).into()],
        )?;
        return Ok(rows.into_iter().map(|r| r.n).collect());
    }
    let last: Vec<super::rows::CountRow> = c.load_cached(
        "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'audit_events'), 0) AS n",
        vec![],
    )?;
    let last = last.first().map_or(0, |r| r.n);
    Ok((1..=n as i64).map(|i| last + i).collect())
}

/// The recorded date's range, from the event's index entries.
pub(super) fn date_of(entries: &[Entry]) -> (Option<i64>, Option<i64>) {
    let dates = entries.iter().filter_map(|e| match e {
        Entry::Date { param, lo, hi } if param == "AuditEvent.date" => Some((*lo, *hi)),
        _ => None,
    });
    (
        dates.clone().map(|(lo, _)| lo).min(),
        dates.map(|(_, hi)| hi).max(),
    )
}

/// One reference entry as its `audit_refs` key (parameter, target id, target type), or `None` for
/// a parameter without rows of its own (`search::ALIASES`).
pub(super) fn ref_key(e: &Entry) -> Option<(String, String, String)> {
    let Entry::Ref {
        param,
        target_type,
        target_id,
        url,
    } = e
    else {
        return None;
    };
    if crate::search::alias_of(param).is_some() {
        return None;
    }
    let (id, ty) = match url {
        Some(u) => (u.clone(), URL_TYPE.to_string()),
        None => (
            target_id.clone().unwrap_or_default(),
            target_type
                .as_deref()
                .map(|t| names::ty(t).to_string())
                .unwrap_or_default(),
        ),
    };
    Some((names::key(param).to_string(), id, ty))
}

impl IndexRows {
    /// The `audit_refs` and `audit_tokens` rows of the AuditEvent in row `rid`.
    pub(super) fn add_audit(&mut self, rid: i64, entries: &[Entry]) {
        let (_, at_hi) = date_of(entries);
        let mut seen = std::collections::HashSet::new();
        for (param, id, ty) in entries.iter().filter_map(ref_key) {
            if seen.insert((param.clone(), id.clone(), ty.clone())) {
                self.audit_refs.extend([
                    param.into(),
                    id.into(),
                    ty.into(),
                    at_hi.unwrap_or(0).into(),
                    rid.into(),
                ]);
            }
        }
        let mut tokens = Vec::new();
        super::token_rows(TYPE, entries, &mut tokens);
        for (param, system, code) in tokens {
            self.audit_tokens
                .extend([rid.into(), param.into(), system.into(), code.into()]);
        }
    }
}

/// The values of one `audit_events` row for [`super::multi_insert_rows`] (the data key is bound
/// by its text id, stored as its number).
pub(super) const INSERT: &str =
    "audit_events (rid, fhir_id, last_updated, at_lo, at_hi, key_n, body)";
pub(super) const VALUES: &str = "(?, NULL, ?, ?, ?, (SELECT n FROM data_keys WHERE key_id = ?), ?)";

/// One row's binds for [`INSERT`].
pub(super) fn values(rid: i64, d: &Draft, key_id: String, sealed: Vec<u8>) -> [Bind; 6] {
    let (lo, hi) = date_of(&d.entries);
    [
        rid.into(),
        d.last_updated.into(),
        lo.into(),
        hi.into(),
        key_id.into(),
        Bind::Blob(sealed),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_go_back_to_their_row_and_say_nothing_of_it() {
        let ids = Ids::new(&[7u8; 32]);
        let other = Ids::new(&[8u8; 32]);
        for rid in [1i64, 2, 3, 1000, 1 << 40, i64::MAX] {
            let id = ids.id(rid);
            assert_eq!(id.len(), crate::ids::WIDTH);
            assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
            assert_eq!(ids.rid(&id), Some(rid));
            // Another database's key does not read it.
            assert_eq!(other.rid(&id), None);
        }
        // Neighbouring rows get unrelated ids (no order, no shared prefix).
        let (a, b) = (ids.id(41), ids.id(42));
        assert_ne!(a[..4], b[..4]);
        // Ids Courier assigns otherwise (UUIDs in base62) are not derived ones.
        for _ in 0..1000 {
            assert_eq!(ids.rid(&crate::ids::new_id()), None);
        }
        assert_eq!(ids.rid("not-an-id"), None);
        assert_eq!(ids.rid("zzzzzzzzzzzzzzzzzzzzzz"), None);
    }
}
