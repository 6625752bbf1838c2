//! The tamper-evident audit chain.
//!
//! The leader seals every stored AuditEvent, in the order it finds them, into one global chain:
//! `hash = HMAC-SHA-256(chain key, previous hash | row | id | key id | SHA-256(ciphertext))` (the
//! previous hash in hex; each link stores its hash's 32 bytes and the `audit_events` row it seals,
//! in its `vid` column: events moved there from the generic tables kept their version row's
//! number as their row id, so their links verify unchanged).
//! It hashes the row exactly as stored (never re-serialised JSON), so any edit of a sealed row, its
//! replacement by another valid row, or its deletion breaks the chain; `courier audit verify` walks
//! it and names the first broken link. The chain key is random, kept sealed under Courier's system
//! key (so under the master key): someone who can write the database but not read the master key
//! cannot recompute the links after an edit.
//!
//! Why global, and why sealed after the fact: a link computed inside each write's transaction
//! would have to serialise every audited transaction (reads included) across all instances on
//! PostgreSQL. One sealer off the write path costs the writes nothing; the price is a window of
//! about a second in which a new row is not yet sealed (verify reports unsealed rows older than a
//! minute as a failure). When the retention purge removes the oldest AuditEvents it removes their
//! links from the start of the chain and keeps the hash of the last one removed as the chain's
//! anchor (`audit_chain_anchor`); verify starts there. On PostgreSQL a transaction may commit a lower row id after a higher one:
//! the sealer looks back 10,000 rows for late arrivals, and they are sealed where they are found.

use crate::clock::now_micros;
use crate::store::{Store, StoreError};
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use sha2::{Digest, Sha256};

/// How far back (in row ids) the sealer looks for rows that committed late.
const LOOK_BACK: i64 = 10_000;
pub(crate) const GENESIS: &str = "courier-audit-chain-v1";

/// An AuditEvent's row as the chain reads it (`ROW_COLUMNS`, from `audit_events a`): what its
/// link hashes. `vid` is the row's id (for events moved from the generic tables, the number of
/// their version row, which their links were made with).
#[derive(QueryableByName)]
struct Row {
    #[diesel(sql_type = BigInt)]
    vid: i64,
    /// The stored id; empty for a derived one, filled in by [`Row::named`].
    #[diesel(sql_type = Text)]
    fhir_id: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    body: Vec<u8>,
}

impl Row {
    /// With its id, derived from its row when not stored.
    fn named(mut self, store: &Store) -> Row {
        if self.fhir_id.is_empty() {
            self.fhir_id = store.audit_ids().id(self.vid);
        }
        self
    }
}

const ROW_COLUMNS: &str = "a.rid AS vid, COALESCE(a.fhir_id, '') AS fhir_id, \
    COALESCE((SELECT k.key_id FROM data_keys k WHERE k.n = a.key_n), '') AS key_id, a.body";

/// One link of the chain (also read by the audit trail's retention purge). The hash is stored as
/// its 32 bytes; the chain is computed over the hex form (`link`, `hex`).
#[derive(QueryableByName)]
pub(crate) struct Link {
    #[diesel(sql_type = BigInt)]
    pub(crate) seq: i64,
    #[diesel(sql_type = BigInt)]
    pub(crate) vid: i64,
    #[diesel(sql_type = Binary)]
    pub(crate) hash: Vec<u8>,
}

/// A stored hash in the hex form the chain is computed over.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(QueryableByName)]
struct AnchorHash {
    #[diesel(sql_type = Text)]
    hash: String,
}

#[derive(QueryableByName)]
struct MaxRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    n: Option<i64>,
}

/// A link's hash, in the hex form the next link is computed over (see [`link_bytes`]).
pub(crate) fn link(
    key: &[u8],
    prev: &str,
    vid: i64,
    id: &str,
    key_id: &str,
    body: &[u8],
) -> String {
    hex(&link_bytes(key, prev, vid, id, key_id, body))
}

/// A link's hash as stored: its 32 bytes.
fn link_bytes(key: &[u8], prev: &str, vid: i64, id: &str, key_id: &str, body: &[u8]) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut h = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    h.update(prev.as_bytes());
    h.update(format!("|{vid}|{id}|{key_id}|").as_bytes());
    h.update(&Sha256::digest(body));
    h.finalize().into_bytes().to_vec()
}

/// The chain's HMAC key: made (random, sealed under the system key) by the first instance that
/// needs it, then read and kept in memory (`Store::chain_key`, which the store also keys the
/// AuditEvents' ids with).
pub(crate) fn chain_key(store: &Store) -> Result<Vec<u8>, StoreError> {
    store.chain_key()
}

fn last_link(store: &Store) -> Result<Option<Link>, StoreError> {
    Ok(store
        .query::<Link>(
            "SELECT seq, vid, hash FROM audit_chain ORDER BY seq DESC LIMIT 1",
            vec![],
        )?
        .into_iter()
        .next())
}

/// Seals the AuditEvent rows not yet in the chain (at most 5,000 per call). Run by one instance
/// at a time (the leader). Blocking. Returns how many were sealed.
pub fn seal(store: &Store) -> Result<usize, StoreError> {
    let max: Vec<MaxRow> = store.query("SELECT MAX(vid) AS n FROM audit_chain", vec![])?;
    let from = max.first().and_then(|m| m.n).map_or(0, |m| m - LOOK_BACK);
    let rows: Vec<Row> = store.query(
        &format!(
            "SELECT {ROW_COLUMNS} FROM audit_events a LEFT JOIN audit_chain c ON c.vid = a.rid \
             WHERE a.rid > ? AND c.vid IS NULL ORDER BY a.rid LIMIT 5000"
        ),
        vec![from.into()],
    )?;
    if rows.is_empty() {
        return Ok(0);
    }
    let key = chain_key(store)?;
    let mut prev = match last_link(store)? {
        Some(l) => hex(&l.hash),
        // Every link was cut by the retention purge: the chain goes on from its anchor.
        None => store
            .query::<AnchorHash>("SELECT hash FROM audit_chain_anchor WHERE id = 1", vec![])?
            .into_iter()
            .next()
            .map_or(GENESIS.to_string(), |a| a.hash),
    };
    let now = now_micros();
    let mut links = Vec::with_capacity(rows.len());
    let rows: Vec<Row> = rows.into_iter().map(|r| r.named(store)).collect();
    for r in &rows {
        let hash = link_bytes(&key, &prev, r.vid, &r.fhir_id, &r.key_id, &r.body);
        prev = hex(&hash);
        links.push((r.vid, hash));
    }
    // One transaction for the batch (one commit, not one per AuditEvent), its links inserted 64
    // to a statement, in chain order (each row's `seq` is given in the order of the VALUES list;
    // one statement per link was one in every sixteen statements of a PostgreSQL create).
    let sealed = links.len();
    let mut binds = Vec::with_capacity(links.len() * 3);
    for (vid, hash) in links {
        binds.extend([vid.into(), crate::store::db::Bind::Blob(hash), now.into()]);
    }
    let _writer = store.exclusive_writer();
    let mut c = store.db.get().map_err(StoreError::Other)?;
    crate::with_conn!(c, |c| {
        use crate::store::db::Conn;
        c.write_tx(|c| {
            crate::store::multi_insert(
                c,
                "INSERT INTO",
                "audit_chain (vid, hash, sealed_at)",
                3,
                binds,
            )
        })
    })?;
    Ok(sealed)
}

const ANCHOR_AAD: &str = "audit_chain_anchor";

/// The sealed anchor the chain starts from (also moved by the retention purge).
#[derive(QueryableByName)]
pub(crate) struct Anchor {
    #[diesel(sql_type = BigInt)]
    pub(crate) seq: i64,
    #[diesel(sql_type = Text)]
    pub(crate) hash: String,
    #[diesel(sql_type = Text)]
    pub(crate) key_id: String,
    #[diesel(sql_type = Binary)]
    pub(crate) seal: Vec<u8>,
}

/// Does the anchor's seal hold "seq|hash"? `Err` when it cannot be checked (a database or key
/// problem), `Ok(false)` when it was altered.
pub(crate) fn anchor_genuine(
    store: &Store,
    seq: i64,
    hash: &str,
    key_id: &str,
    seal: &[u8],
) -> Result<bool, StoreError> {
    match store.open_sealed(key_id, seal, ANCHOR_AAD) {
        Ok(p) => Ok(p == format!("{seq}|{hash}").as_bytes()),
        Err(e) if e.to_string().contains("failed authentication") => Ok(false),
        Err(e) if e.to_string().contains("destroyed") => Ok(false),
        Err(e) => Err(StoreError::Other(e)),
    }
}

/// The anchor's seal: "seq|hash" under the system key (AES-GCM authenticates it).
pub(crate) fn seal_anchor(store: &Store, seq: i64, hash: &str) -> (String, Vec<u8>) {
    store
        .keys
        .seal(format!("{seq}|{hash}").as_bytes(), ANCHOR_AAD)
}

/// What `verify` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every link holds; `unsealed` recent rows are not yet in the chain.
    Intact { links: usize, unsealed: usize },
    /// The first link that does not hold, and why.
    Broken {
        seq: i64,
        audit_id: String,
        why: String,
    },
}

/// Walks the whole chain from the start. Blocking.
pub fn verify(store: &Store) -> Result<Verdict, StoreError> {
    // After a retention purge the chain starts at its anchor: the hash of the last link removed,
    // sealed so that it cannot be moved by whoever can only write the database.
    let key = chain_key(store)?;
    let anchor: Vec<Anchor> = store.query(
        "SELECT seq, hash, key_id, seal FROM audit_chain_anchor WHERE id = 1",
        vec![],
    )?;
    let (mut prev, mut after) = match anchor.into_iter().next() {
        Some(a) => {
            if !anchor_genuine(store, a.seq, &a.hash, &a.key_id, &a.seal)? {
                return Ok(Verdict::Broken {
                    seq: a.seq,
                    audit_id: String::new(),
                    why: "the chain's anchor (where a retention purge cut it) was altered".into(),
                });
            }
            (a.hash, a.seq)
        }
        None => (GENESIS.to_string(), 0i64),
    };
    let mut links = 0usize;
    loop {
        let page: Vec<Link> = store.query(
            "SELECT seq, vid, hash FROM audit_chain WHERE seq > ? ORDER BY seq LIMIT 2000",
            vec![after.into()],
        )?;
        let Some(last) = page.last().map(|l| l.seq) else {
            break;
        };
        for l in page {
            let rows: Vec<Row> = store.query(
                &format!("SELECT {ROW_COLUMNS} FROM audit_events a WHERE a.rid = ?"),
                vec![l.vid.into()],
            )?;
            let Some(r) = rows.into_iter().next().map(|r| r.named(store)) else {
                return Ok(Verdict::Broken {
                    seq: l.seq,
                    audit_id: String::new(),
                    why: format!("the sealed AuditEvent row (row {}) is gone", l.vid),
                });
            };
            // The AuditEvent's id is part of the hash: a row moved to another id breaks it too.
            let expect = link(&key, &prev, r.vid, &r.fhir_id, &r.key_id, &r.body);
            if expect != hex(&l.hash) {
                return Ok(Verdict::Broken {
                    seq: l.seq,
                    audit_id: r.fhir_id,
                    // The id the row carries now (an edit may have changed it too).
                    why: format!(
                        "the row (row {}) or the chain was changed after it was sealed",
                        l.vid
                    ),
                });
            }
            prev = expect;
            links += 1;
        }
        after = last;
    }
    // Rows older than a minute that are not in the chain were written around the sealer.
    let stale: Vec<MaxRow> = store.query(
        "SELECT COUNT(*) AS n FROM audit_events a LEFT JOIN audit_chain c ON c.vid = a.rid \
         WHERE c.vid IS NULL AND a.last_updated < ?",
        vec![(now_micros() - 60_000_000).into()],
    )?;
    let stale = stale.first().and_then(|m| m.n).unwrap_or(0);
    if stale > 0 {
        return Ok(Verdict::Broken {
            seq: 0,
            audit_id: String::new(),
            why: format!("{stale} AuditEvent rows older than a minute are not in the chain"),
        });
    }
    let fresh: Vec<MaxRow> = store.query(
        "SELECT COUNT(*) AS n FROM audit_events a LEFT JOIN audit_chain c ON c.vid = a.rid \
         WHERE c.vid IS NULL",
        vec![],
    )?;
    Ok(Verdict::Intact {
        links,
        unsealed: fresh.first().and_then(|m| m.n).unwrap_or(0) as usize,
    })
}
