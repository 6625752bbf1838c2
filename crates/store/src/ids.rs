//! The ids Courier assigns: a UUID written as 22 base62 digits instead of 36 hexadecimal
//! characters and dashes.
//!
//! A resource's id is stored several times (its row, the (type, id) key, each reference to it,
//! its events, the bodies that name it), so 14 characters fewer is about 150 bytes less per
//! message with its AuditEvent. The digits are fixed-width and in ASCII order (`0-9A-Za-z`), so
//! in byte order ids sort as their UUIDs do, as the hexadecimal form did; and they are valid FHIR
//! ids (`[A-Za-z0-9\-\.]{1,64}`). Ids assigned before (UUIDs) stay as they are. Every comparison
//! of ids is exact (base62 is case-sensitive).

const DIGITS: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Width of an id: 62^22 > 2^128.
pub const WIDTH: usize = 22;

/// A new resource id: a fresh UUIDv7 (milliseconds, then random bits; in creation order within
/// the process, which keeps a B-tree's inserts at its end) in base62.
pub fn new_id() -> String {
    base62(uuid::Uuid::now_v7().as_u128())
}

/// A new id that says nothing about when it was made (a random UUIDv4 in base62): for a
/// person's identity, which lives for years and would otherwise show when they were first seen.
pub fn random_id() -> String {
    base62(uuid::Uuid::new_v4().as_u128())
}

/// `n` as 22 base62 digits (fixed width, so the strings sort as the numbers do).
pub fn base62(mut n: u128) -> String {
    let mut out = [b'0'; WIDTH];
    for d in out.iter_mut().rev() {
        *d = DIGITS[(n % 62) as usize];
        n /= 62;
    }
    out.iter().map(|&b| b as char).collect()
}

/// The number 22 base62 digits write ([`base62`]'s inverse); `None` for anything else.
pub fn from_base62(s: &str) -> Option<u128> {
    if s.len() != WIDTH {
        return None;
    }
    let mut n: u128 = 0;
    for b in s.bytes() {
        let d = DIGITS.iter().position(|&x| x == b)? as u128;
        n = n.checked_mul(62)?.checked_add(d)?;
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_width_fhir_ids_in_uuid_order() {
        assert_eq!(base62(0), "0".repeat(WIDTH));
        assert_eq!(base62(u128::MAX), "7n42DGM5Tflk9n8mt7Fhc7");
        assert_eq!(base62(61), format!("{}z", "0".repeat(WIDTH - 1)));
        assert_eq!(base62(62), format!("{}10", "0".repeat(WIDTH - 2)));
        // Order is kept for values far apart and adjacent.
        let mut values: Vec<u128> = (0..2000u128)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C834))
            .chain([0, 1, 61, 62, 63, u128::MAX - 1, u128::MAX])
            .collect();
        values.sort();
        values.dedup();
        let ids: Vec<String> = values.iter().map(|&v| base62(v)).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "order kept");
        assert!(values
            .iter()
            .zip(&ids)
            .all(|(v, id)| from_base62(id) == Some(*v)));
        assert_eq!(from_base62("7n42DGM5Tflk9n8mt7Fhc8"), None, "above 2^128");
        assert_eq!(from_base62("short"), None);
        // Fresh ids: distinct, in creation order, valid FHIR ids.
        let fresh: Vec<String> = (0..1000).map(|_| new_id()).collect();
        assert!(fresh.windows(2).all(|w| w[0] < w[1]), "creation order");
        assert!(fresh
            .iter()
            .all(|id| id.len() == WIDTH && id.bytes().all(|b| b.is_ascii_alphanumeric())));
        // Random ones: the same shape, and not in order (1,000 in a row would be 1 in 1000!).
        let random: Vec<String> = (0..1000).map(|_| random_id()).collect();
        assert!(random.iter().all(|id| id.len() == WIDTH));
        assert!(!random.windows(2).all(|w| w[0] < w[1]));
    }
}
