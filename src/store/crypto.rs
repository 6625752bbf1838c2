//! Envelope encryption at rest. A master key (key-encryption key) from configuration wraps data keys
//! stored in `data_keys`; resource bodies are sealed with AES-256-GCM under a data key, with the row's
//! identity (`type/id/version`) as associated data so a ciphertext cannot be moved to another row.
//! Each row records its `key_id`, so keys can rotate and old rows stay readable.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use std::collections::HashMap;
use std::path::Path;

const NONCE_LEN: usize = 12;

/// The master key and its key-check value (an id that reveals nothing about the key).
pub struct MasterKey {
    cipher: Aes256Gcm,
    pub id: String,
}

impl MasterKey {
    pub fn from_base64(b64: &str) -> anyhow::Result<MasterKey> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| anyhow::anyhow!("the master key must be base64"))?;
        anyhow::ensure!(
            bytes.len() == 32,
            "the master key must be 32 bytes (base64 of 32 random bytes)"
        );
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&bytes));
        // Key-check value: the key encrypting a fixed block; a fingerprint, not the key.
        let kcv = cipher
            .encrypt(Nonce::from_slice(&[0u8; NONCE_LEN]), &b"courier-kcv"[..])
            .map_err(|_| anyhow::anyhow!("master key check failed"))?;
        let id = format!("mk-{}", hex(&kcv[..8]));
        Ok(MasterKey { cipher, id })
    }

    /// The configured key, else the key file, else a new key written to the key file with mode 0600.
    /// Returns the key and whether it was just created.
    pub fn load_or_create(
        configured: Option<&SecretString>,
        file: &Path,
    ) -> anyhow::Result<(MasterKey, bool)> {
        if let Some(k) = configured {
            return Ok((MasterKey::from_base64(k.expose_secret())?, false));
        }
        if file.exists() {
            let text = std::fs::read_to_string(file).map_err(|e| {
                anyhow::anyhow!("cannot read master key file {}: {e}", file.display())
            })?;
            return Ok((MasterKey::from_base64(&text)?, false));
        }
        if let Some(dir) = file.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)?;
            }
        }
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        write_private(file, &b64)?;
        Ok((MasterKey::from_base64(&b64)?, true))
    }

    fn wrap(&self, data_key: &[u8; 32], key_id: &str) -> Vec<u8> {
        seal(&self.cipher, data_key, key_id.as_bytes())
    }

    fn unwrap(&self, wrapped: &[u8], key_id: &str) -> anyhow::Result<[u8; 32]> {
        let plain = open(&self.cipher, wrapped, key_id.as_bytes()).map_err(|_| {
            anyhow::anyhow!(
                "data key {key_id} cannot be unwrapped with master key {}",
                self.id
            )
        })?;
        plain
            .try_into()
            .map_err(|_| anyhow::anyhow!("data key {key_id} has the wrong length"))
    }
}

#[cfg(unix)]
fn write_private(file: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(file: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(file, text)?;
    Ok(())
}

/// A data key as stored: its id and its wrapped bytes.
pub struct WrappedKey {
    pub key_id: String,
    pub wrapped: Vec<u8>,
}

/// The unwrapped data keys in memory, and which one seals new writes.
pub struct Keyring {
    master: MasterKey,
    keys: parking_lot::RwLock<HashMap<String, Aes256Gcm>>,
    active: parking_lot::RwLock<String>,
}

impl Keyring {
    pub fn new(master: MasterKey) -> Keyring {
        Keyring {
            master,
            keys: Default::default(),
            active: Default::default(),
        }
    }

    pub fn master_key_id(&self) -> &str {
        &self.master.id
    }

    /// Makes a new random data key, returns it wrapped for storage; it becomes active on `install`.
    pub fn generate(&self) -> WrappedKey {
        let mut dk = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut dk);
        let key_id = format!("dk-{}", uuid::Uuid::now_v7().simple());
        let wrapped = self.master.wrap(&dk, &key_id);
        WrappedKey { key_id, wrapped }
    }

    /// Unwraps a stored data key into memory; `active` makes it the key for new writes.
    pub fn install(&self, key: &WrappedKey, active: bool) -> anyhow::Result<()> {
        let dk = self.master.unwrap(&key.wrapped, &key.key_id)?;
        self.keys.write().insert(
            key.key_id.clone(),
            Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&dk)),
        );
        if active {
            *self.active.write() = key.key_id.clone();
        }
        Ok(())
    }

    /// Seals `plain` under the active data key; returns `(key_id, nonce || ciphertext)`.
    pub fn seal(&self, plain: &[u8], aad: &str) -> (String, Vec<u8>) {
        let key_id = self.active.read().clone();
        let keys = self.keys.read();
        let cipher = keys
            .get(&key_id)
            .expect("an active data key is installed at start-up");
        (key_id, seal(cipher, plain, aad.as_bytes()))
    }

    pub fn open(&self, key_id: &str, sealed: &[u8], aad: &str) -> anyhow::Result<Vec<u8>> {
        let keys = self.keys.read();
        let cipher = keys
            .get(key_id)
            .ok_or_else(|| anyhow::anyhow!("data key {key_id} is not available"))?;
        open(cipher, sealed, aad.as_bytes())
            .map_err(|_| anyhow::anyhow!("stored data failed authentication"))
    }
}

fn seal(cipher: &Aes256Gcm, plain: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open(cipher: &Aes256Gcm, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, aes_gcm::Error> {
    if sealed.len() < NONCE_LEN {
        return Err(aes_gcm::Error);
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_with_its_row_identity() {
        let mk =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
                .unwrap();
        let ring = Keyring::new(mk);
        let k = ring.generate();
        ring.install(&k, true).unwrap();
        let (kid, sealed) = ring.seal(b"secret text", "Communication/1/1");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            ring.open(&kid, &sealed, "Communication/1/1").unwrap(),
            b"secret text"
        );
        assert!(ring.open(&kid, &sealed, "Communication/2/1").is_err());
    }

    #[test]
    fn a_data_key_does_not_unwrap_under_another_master_key() {
        let a = Keyring::new(
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([1u8; 32]))
                .unwrap(),
        );
        let b = Keyring::new(
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([2u8; 32]))
                .unwrap(),
        );
        let k = a.generate();
        assert!(b.install(&k, true).is_err());
        assert_ne!(a.master_key_id(), b.master_key_id());
    }
}
