//! The `_snapshot` of paging links, sealed. A search or history pins its later pages to the store
//! as it was at the first page: the highest row number then. That number is the count of rows
//! Courier has ever written (every read writes an AuditEvent), so in the clear it would let any
//! client, a patient included, watch the whole service's activity from its own searches. The link
//! carries it encrypted (AES-256-GCM, a fresh nonce each time, so two links at the same snapshot
//! do not even compare equal), under a key derived from the audit chain's key (the same on every
//! instance, kept across master-key rotations). A `_snapshot` Courier did not issue is a 400.

use super::outcome::FhirError;
use crate::store::Store;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

const AAD: &[u8] = b"courier paging snapshot v1";
/// The same for the real-time socket's event numbers (`seq`), which count every event Courier
/// records: sealed as paging links are, under their own purpose.
const SEQ_AAD: &[u8] = b"courier event seq v1";

fn cipher(store: &Store, purpose: &[u8]) -> Result<Aes256Gcm, FhirError> {
    use hmac::{Hmac, Mac};
    let chain = crate::audit::chain::chain_key(store).map_err(FhirError::from)?;
    let mut h =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(&chain).expect("HMAC takes any key length");
    h.update(purpose);
    let key = h.finalize().into_bytes();
    Ok(Aes256Gcm::new_from_slice(&key).expect("32-byte key"))
}

/// The paging token for `snapshot`.
pub fn seal(store: &Store, snapshot: i64) -> Result<String, FhirError> {
    seal_for(store, snapshot, AAD)
}

/// The socket's token for event number `seq`.
pub fn seal_seq(store: &Store, seq: i64) -> Result<String, FhirError> {
    seal_for(store, seq, SEQ_AAD)
}

/// The event number a socket token names (`None`: not one Courier issued).
pub fn open_seq(store: &Store, token: &str) -> Option<i64> {
    open_for(store, token, SEQ_AAD).ok()
}

fn seal_for(store: &Store, snapshot: i64, aad: &[u8]) -> Result<String, FhirError> {
    use rand::RngCore;
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let sealed = cipher(store, aad)?
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &snapshot.to_be_bytes(),
                aad,
            },
        )
        .map_err(|_| FhirError::internal())?;
    let mut out = nonce.to_vec();
    out.extend(sealed);
    Ok(URL_SAFE_NO_PAD.encode(out))
}

/// The snapshot a paging token names; a 400 for anything Courier did not issue.
pub fn open(store: &Store, token: &str) -> Result<i64, FhirError> {
    open_for(store, token, AAD)
}

fn open_for(store: &Store, token: &str, aad: &[u8]) -> Result<i64, FhirError> {
    let refused = || {
        FhirError::bad_request(
            "_snapshot is not a paging link Courier issued: follow the Bundle's next or previous link, or search again",
        )
    };
    let raw = URL_SAFE_NO_PAD
        .decode(token.trim())
        .map_err(|_| refused())?;
    if raw.len() != 12 + 8 + 16 {
        return Err(refused());
    }
    let plain = cipher(store, aad)?
        .decrypt(
            Nonce::from_slice(&raw[..12]),
            Payload {
                msg: &raw[12..],
                aad,
            },
        )
        .map_err(|_| refused())?;
    let n = i64::from_be_bytes(plain.try_into().map_err(|_| refused())?);
    if n < 0 {
        return Err(refused());
    }
    Ok(n)
}

/// `pairs` with a sealed `_snapshot` opened to the number the store reads (a second `_snapshot`
/// is refused, as any repeated paging parameter).
pub fn open_pairs(
    store: &Store,
    pairs: &[(String, String)],
) -> Result<Vec<(String, String)>, FhirError> {
    pairs
        .iter()
        .map(|(k, v)| {
            if k == "_snapshot" {
                Ok((k.clone(), open(store, v)?.to_string()))
            } else {
                Ok((k.clone(), v.clone()))
            }
        })
        .collect()
}
