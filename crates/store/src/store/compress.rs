//! Bodies are compressed before they are sealed (issue 24): FHIR JSON of a few hundred bytes to a
//! few kilobytes, most of it the same keys, code systems and BALP skeletons in every resource.
//!
//! - Format: the plaintext sealed in `resource_versions.body` is either the JSON itself (rows
//!   written before this, and any body that would not shrink; JSON starts with `{`) or
//!   [`DEFLATE_V1`] followed by raw deflate (RFC 1951) with the preset dictionary
//!   `deflate-dict-v1.txt`. A dictionary is never changed: another one gets another format byte,
//!   so every row stays readable.
//! - The dictionary holds only Courier's own skeletons (keys, code systems, BALP profiles), no
//!   configuration and no stored data. Each body is compressed on its own, so a body's size tells
//!   nothing about another's.
//! - Compressed on the caller's thread ([`pack`] runs in the draft, before the writer), opened in
//!   [`unpack`] after decryption. The audit chain hashes the ciphertext as stored: unaffected.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Format byte: raw deflate with dictionary v1.
pub const DEFLATE_V1: u8 = 0x01;
const DICT_V1: &[u8] = include_bytes!("deflate-dict-v1.txt");
/// A body never inflates beyond this (the largest resource Courier accepts is far smaller).
const MAX_PLAIN: usize = 64 * 1024 * 1024;

/// The plaintext to seal for `json`: compressed when that makes it smaller.
pub fn pack(json: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(6), false);
    if c.set_dictionary(DICT_V1).is_err() {
        return json.to_vec();
    }
    let mut out = Vec::with_capacity(json.len() / 2 + 64);
    out.push(DEFLATE_V1);
    loop {
        let before = c.total_in() as usize;
        match c.compress_vec(&json[before..], &mut out, FlushCompress::Finish) {
            Ok(Status::StreamEnd) => break,
            Ok(_) if out.len() > json.len() => return json.to_vec(),
            Ok(_) => out.reserve(out.capacity().max(256)),
            Err(_) => return json.to_vec(),
        }
    }
    if out.len() >= json.len() {
        return json.to_vec();
    }
    out
}

/// The JSON in a sealed body's plaintext, whichever format it was written in.
pub fn unpack(plain: Vec<u8>) -> anyhow::Result<Vec<u8>> {
    match plain.first() {
        Some(&DEFLATE_V1) => {
            let mut d = Decompress::new(false);
            d.set_dictionary(DICT_V1)
                .map_err(|e| anyhow::anyhow!("cannot set the body dictionary: {e}"))?;
            let input = &plain[1..];
            let mut out = Vec::with_capacity(input.len() * 4 + 64);
            loop {
                let before = d.total_in() as usize;
                match d.decompress_vec(&input[before..], &mut out, FlushDecompress::Finish) {
                    Ok(Status::StreamEnd) => return Ok(out),
                    Ok(_) if out.len() >= MAX_PLAIN => {
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
        _ => Ok(plain),
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
