//! Bodies are compressed before they are sealed (issue 24): FHIR JSON of a few hundred bytes to a
//! few kilobytes, most of it the same keys, code systems and BALP skeletons in every resource.
//!
//! - Format: the plaintext sealed in `resource_versions.body` is one of
//!   - the JSON itself (rows written before compression, and any body that would not shrink;
//!     JSON starts with `{`);
//!   - [`DEFLATE_V1`] followed by raw deflate (RFC 1951) with the preset dictionary
//!     `deflate-dict-v1.txt`;
//!   - [`DEFLATE_V1_AFTER_ID`] followed by the same, of the JSON after its first two members,
//!     `{"resourceType":…,"id":…,` ([`identity`]): the row holds the type and id, and they are
//!     part of the body's associated data (`Type/id/version`), so a row whose type or id was
//!     changed does not open at all. The id is random and ~18 of a body's ~270 bytes.
//!
//!   A dictionary is never changed: another one gets another format byte, so every row stays
//!   readable.
//! - The dictionary holds only Courier's own skeletons (keys, code systems, BALP profiles), no
//!   configuration and no stored data. Each body is compressed on its own, so a body's size tells
//!   nothing about another's.
//! - Compressed on the caller's thread ([`pack_for`] runs in the draft, before the writer), opened
//!   in [`unpack_for`] after decryption. The audit chain hashes the ciphertext as stored:
//!   unaffected.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Format byte: raw deflate with dictionary v1.
pub const DEFLATE_V1: u8 = 0x01;
const DICT_V1: &[u8] = include_bytes!("deflate-dict-v1.txt");
/// A body never inflates beyond this (the largest resource Courier accepts is far smaller).
const MAX_PLAIN: usize = 64 * 1024 * 1024;

/// Format byte: raw deflate with dictionary v1 of the JSON after its [`identity`].
pub const DEFLATE_V1_AFTER_ID: u8 = 0x02;

/// The first members of a body as the store composes it: `{"resourceType":"T","id":"I",`.
pub fn identity(res_type: &str, id: &str) -> Vec<u8> {
    let mut p = Vec::with_capacity(res_type.len() + id.len() + 32);
    p.extend_from_slice(b"{\"resourceType\":");
    p.extend_from_slice(
        serde_json::to_string(res_type)
            .unwrap_or_default()
            .as_bytes(),
    );
    p.extend_from_slice(b",\"id\":");
    p.extend_from_slice(serde_json::to_string(id).unwrap_or_default().as_bytes());
    p.push(b',');
    p
}

/// The plaintext to seal for `json`, the body of `res_type`/`id`: without its identity and
/// compressed when it starts with it, else as [`pack`] does.
pub fn pack_for(json: &[u8], res_type: &str, id: &str) -> Vec<u8> {
    match json.strip_prefix(identity(res_type, id).as_slice()) {
        Some(rest) => match deflate(DEFLATE_V1_AFTER_ID, rest) {
            Some(out) if out.len() < json.len() => out,
            _ => pack(json),
        },
        None => pack(json),
    }
}

/// The JSON in the sealed body of `res_type`/`id`, whichever format it was written in.
pub fn unpack_for(plain: Vec<u8>, res_type: &str, id: &str) -> anyhow::Result<Vec<u8>> {
    match plain.first() {
        Some(&DEFLATE_V1_AFTER_ID) => {
            let mut out = identity(res_type, id);
            inflate(&plain[1..], &mut out)?;
            Ok(out)
        }
        _ => unpack(plain),
    }
}

/// The plaintext to seal for `json`: compressed when that makes it smaller.
pub fn pack(json: &[u8]) -> Vec<u8> {
    match deflate(DEFLATE_V1, json) {
        Some(out) if out.len() < json.len() => out,
        _ => json.to_vec(),
    }
}

/// `format` followed by `json` deflated with the dictionary; None if that fails or grows
/// beyond `json`.
fn deflate(format: u8, json: &[u8]) -> Option<Vec<u8>> {
    let mut c = Compress::new(Compression::new(6), false);
    c.set_dictionary(DICT_V1).ok()?;
    let mut out = Vec::with_capacity(json.len() / 2 + 64);
    out.push(format);
    loop {
        let before = c.total_in() as usize;
        match c.compress_vec(&json[before..], &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => return Some(out),
            Ok(_) if out.len() > json.len() => return None,
            Ok(_) => out.reserve(out.capacity().max(256)),
            Err(_) => return None,
        }
    }
}

/// The JSON in a sealed body's plaintext, in the formats that need no identity.
pub fn unpack(plain: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    match plain.first() {
        Some(&DEFLATE_V1) => {
            let mut out = Vec::with_capacity(plain.len() * 4 + 64);
            inflate(&plain[1..], &mut out)?;
            Ok(out)
        }
        Some(&DEFLATE_V1_AFTER_ID) => {
            anyhow::bail!("a stored body needs its resource's type and id to be opened")
        }
        _ => Ok(plain),
    }
}

/// Appends `input` inflated with the dictionary to `out`.
fn inflate(input: &[u8], out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut d = Decompress::new(false);
    d.set_dictionary(DICT_V1)
        .map_err(|e| anyhow::anyhow!("cannot set the body dictionary: {e}"))?;
    out.reserve(input.len() * 4 + 64);
    let start = out.len();
    loop {
        let before = d.total_in() as usize;
        match d.decompress_vec(&input[before..], out, FlushDecompress::Finish) {
            Ok(Status::StreamEnd) => return Ok(()),
            Ok(_) if out.len() - start >= MAX_PLAIN => {
                anyhow::bail!("a stored body inflates beyond its limit")
            }
            Ok(_) if d.total_in() as usize == input.len() && out.len() < out.capacity() => {
                anyhow::bail!("a stored body is truncated")
            }
            Ok(_) => out.reserve(out.capacity().max(256)),
            Err(e) => anyhow::bail!("a stored body cannot be inflated: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_shrinks_typical_bodies() {
        let comm = br#"{"resourceType":"Communication","id":"01a249ee-d559-7373-9e7f-166c7519646a","meta":{"versionId":"1","lastUpdated":"2026-12-06T05:58:38.683595Z"},"status":"completed","sender":{"reference":"Practitioner/dr-1"},"recipient":[{"reference":"Patient/p1"}],"sent":"2026-11-28T10:00:00Z","payload":[{"contentString":"Your lab results are back; please book a follow-up visit."}],"subject":{"reference":"Patient/p1"},"priority":"routine","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/communication-category","code":"notification"}]}]}"#;
        let packed = pack(comm);
        assert_eq!(packed[0], DEFLATE_V1);
        assert!(
            packed.len() * 2 < comm.len(),
            "{} of {}",
            packed.len(),
            comm.len()
        );
        assert_eq!(unpack(packed).unwrap(), comm.to_vec());
        // Old rows (JSON as it was) open unchanged; tiny bodies that would grow stay JSON.
        assert_eq!(unpack(comm.to_vec()).unwrap(), comm.to_vec());
        assert_eq!(pack(b"{}"), b"{}".to_vec());
        // Large and incompressible bodies round-trip (a Binary's base64).
        let big: Vec<u8> = (0..200_000u32)
            .map(|i| {
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(i.wrapping_mul(2654435761) >> 26) as usize]
            })
            .collect();
        let mut json = b"{\"resourceType\":\"Binary\",\"data\":\"".to_vec();
        json.extend_from_slice(&big);
        json.extend_from_slice(b"\"}");
        assert_eq!(unpack(pack(&json)).unwrap(), json);
    }

    /// A body that starts with its identity is stored without it and opens to the same bytes;
    /// one that does not (another id) falls back to the format that keeps everything; bodies
    /// written before open unchanged.
    #[test]
    fn a_body_is_stored_without_its_type_and_id_and_opens_whole() {
        let comm = br#"{"resourceType":"Communication","id":"0D3ExbZ3pLgT6qRlN2sYwK","meta":{"versionId":"1","lastUpdated":"2026-12-06T05:58:38.683595Z"},"status":"completed","sender":{"reference":"Practitioner/dr-1"},"recipient":[{"reference":"Patient/p1"}],"payload":[{"contentString":"Your lab results are back."}]}"#;
        let packed = pack_for(comm, "Communication", "0D3ExbZ3pLgT6qRlN2sYwK");
        assert_eq!(packed[0], DEFLATE_V1_AFTER_ID);
        let whole = pack(comm);
        assert!(
            packed.len() + 12 < whole.len(),
            "{} against {}",
            packed.len(),
            whole.len()
        );
        assert_eq!(
            unpack_for(packed.clone(), "Communication", "0D3ExbZ3pLgT6qRlN2sYwK").unwrap(),
            comm.to_vec()
        );
        // It cannot be opened without its identity.
        assert!(unpack(packed).is_err());
        // Another resource's identity: stored whole.
        let other = pack_for(comm, "Communication", "another");
        assert_eq!(other[0], DEFLATE_V1);
        assert_eq!(
            unpack_for(other, "Communication", "another").unwrap(),
            comm.to_vec()
        );
        // Rows written before (whole, or plain JSON) open unchanged.
        assert_eq!(
            unpack_for(whole, "Communication", "0D3ExbZ3pLgT6qRlN2sYwK").unwrap(),
            comm.to_vec()
        );
        assert_eq!(
            unpack_for(comm.to_vec(), "Communication", "x").unwrap(),
            comm.to_vec()
        );
        // A tiny body round-trips; one that would not shrink stays JSON.
        let tiny = br#"{"resourceType":"Basic","id":"a","x":1}"#;
        assert_eq!(
            unpack_for(pack_for(tiny, "Basic", "a"), "Basic", "a").unwrap(),
            tiny.to_vec()
        );
        assert_eq!(pack_for(b"{}", "Basic", "a"), b"{}".to_vec());
        // A damaged one is an error.
        let mut cut = pack_for(comm, "Communication", "0D3ExbZ3pLgT6qRlN2sYwK");
        cut.truncate(cut.len() - 3);
        assert!(unpack_for(cut, "Communication", "0D3ExbZ3pLgT6qRlN2sYwK").is_err());
    }

    #[test]
    fn a_damaged_body_is_an_error_not_garbage() {
        let mut packed = pack(br#"{"resourceType":"Communication","status":"completed","payload":[{"contentString":"hello hello hello"}]}"#);
        packed.truncate(packed.len() - 3);
        assert!(unpack(packed).is_err());
    }

    #[test]
    fn the_dictionary_never_changes() {
        // Rows written with format 1 need exactly these bytes: a new dictionary is a new format.
        use sha2::Digest;
        let h = sha2::Sha256::digest(DICT_V1);
        let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, include_str!("deflate-dict-v1.sha256").trim());
    }
}
