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
    /// A key file holds one base64 key per line: the current key first, then previous keys (kept
    /// after a rotation until no data key is wrapped by them). `previous` adds configured previous
    /// keys. Returns the current key, the previous ones, and whether the key was just created.
    pub fn load_or_create(
        configured: Option<&SecretString>,
        previous: &[SecretString],
        file: &Path,
    ) -> anyhow::Result<(MasterKey, Vec<MasterKey>, bool)> {
        let mut prev = previous
            .iter()
            .map(|k| MasterKey::from_base64(k.expose_secret()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(k) = configured {
            return Ok((MasterKey::from_base64(k.expose_secret())?, prev, false));
        }
        if file.exists() {
            let (current, mut from_file) = read_key_file(file)?;
            from_file.append(&mut prev);
            return Ok((current, from_file, false));
        }
        if let Some(dir) = file.parent() {
            super::private::dir(dir).map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the master key's directory {}: {e}",
                    dir.display()
                )
            })?;
        }
        let b64 = new_key_base64();
        // On disk (file and directory entry) before anything is sealed with it: a power loss
        // after the first write must not leave data under a key that was never stored.
        write_private(file, &b64)
            .and_then(|()| sync_parent(file))
            .map_err(|e| anyhow::anyhow!("cannot write master key file {}: {e}", file.display()))?;
        Ok((MasterKey::from_base64(&b64)?, prev, true))
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

/// A new random master key, base64.
pub fn new_key_base64() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// The key file's current key and previous keys.
pub fn read_key_file(file: &Path) -> anyhow::Result<(MasterKey, Vec<MasterKey>)> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read master key file {}: {e}", file.display()))?;
    let mut keys = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(MasterKey::from_base64);
    let current = keys
        .next()
        .ok_or_else(|| anyhow::anyhow!("master key file {} is empty", file.display()))??;
    Ok((current, keys.collect::<anyhow::Result<Vec<_>>>()?))
}

/// Rewrites the key file with `lines` (base64 keys, current first), atomically and mode 0600,
/// and durably: the new file is synced before it replaces the old one and the directory after, so
/// the data keys a rotation then re-wraps (and commits) are never under a key lost to a power
/// loss (an outside fault probe found a 0-byte key file after a simulated power loss on XFS).
pub fn rewrite_key_file(file: &Path, lines: &[String]) -> anyhow::Result<()> {
    let tmp = file.with_extension("key.new");
    let _ = std::fs::remove_file(&tmp);
    write_private(&tmp, &(lines.join("\n") + "\n"))?;
    std::fs::rename(&tmp, file)?;
    sync_parent(file)?;
    Ok(())
}

/// Syncs the directory holding `file` (its entry: a created or renamed file survives a power
/// loss only then).
fn sync_parent(file: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = file.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The key file's lines (base64 keys), current first.
pub fn key_file_lines(file: &Path) -> anyhow::Result<Vec<String>> {
    Ok(std::fs::read_to_string(file)?
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
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
    f.sync_all()?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(file: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(file)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// A data key as stored: its id and its wrapped bytes.
pub struct WrappedKey {
    pub key_id: String,
    pub wrapped: Vec<u8>,
}

/// At most this many unwrapped data keys are kept in memory; beyond it the cache starts over (keys
/// are scoped per patient and month, so a large store has many; each is unwrapped again on use).
const CACHE_MAX: usize = 50_000;

/// The master keys (the current one wraps new data keys; previous ones still unwrap what they
/// wrapped until the background re-wrap is done), the unwrapped data keys in memory, and the
/// system key that seals Courier's own secrets.
pub struct Keyring {
    masters: parking_lot::RwLock<Vec<MasterKey>>,
    keys: parking_lot::RwLock<HashMap<String, Aes256Gcm>>,
    active: parking_lot::RwLock<String>,
}

impl Keyring {
    pub fn new(master: MasterKey) -> Keyring {
        Keyring::with_previous(master, vec![])
    }

    /// `current` wraps new data keys; `previous` master keys only unwrap.
    pub fn with_previous(current: MasterKey, previous: Vec<MasterKey>) -> Keyring {
        let mut masters = vec![current];
        for p in previous {
            if !masters.iter().any(|m| m.id == p.id) {
                masters.push(p);
            }
        }
        Keyring {
            masters: parking_lot::RwLock::new(masters),
            keys: Default::default(),
            active: Default::default(),
        }
    }

    pub fn master_key_id(&self) -> String {
        self.masters.read()[0].id.clone()
    }

    /// Every master key id known here, the current one first.
    pub fn master_key_ids(&self) -> Vec<String> {
        self.masters.read().iter().map(|m| m.id.clone()).collect()
    }

    /// Makes `master` the current master key (the one before stays, to unwrap).
    pub fn promote(&self, master: MasterKey) {
        let mut ms = self.masters.write();
        ms.retain(|m| m.id != master.id);
        ms.insert(0, master);
    }

    /// Learns another previous master key (unwrap only).
    pub fn add_previous(&self, master: MasterKey) {
        let mut ms = self.masters.write();
        if !ms.iter().any(|m| m.id == master.id) {
            ms.push(master);
        }
    }

    /// Makes a new random data key, wrapped by the current master key for storage.
    pub fn generate(&self) -> WrappedKey {
        let mut dk = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut dk);
        let key_id = format!("dk-{}", crate::ids::new_id());
        let wrapped = self.masters.read()[0].wrap(&dk, &key_id);
        WrappedKey { key_id, wrapped }
    }

    /// Unwraps a stored data key (wrapped by master `master_key_id`) into memory; `active` makes it
    /// the system key (see [`Keyring::seal`]).
    pub fn install(
        &self,
        key: &WrappedKey,
        master_key_id: &str,
        active: bool,
    ) -> anyhow::Result<()> {
        let dk = {
            let ms = self.masters.read();
            let m = ms.iter().find(|m| m.id == master_key_id).ok_or_else(|| {
                anyhow::anyhow!(
                    "data key {} is wrapped by master key {master_key_id}, which is not configured (configured: {})",
                    key.key_id,
                    ms.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
                )
            })?;
            m.unwrap(&key.wrapped, &key.key_id)?
        };
        let mut keys = self.keys.write();
        if keys.len() >= CACHE_MAX {
            let keep = self.active.read().clone();
            keys.retain(|k, _| *k == keep);
        }
        keys.insert(
            key.key_id.clone(),
            Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&dk)),
        );
        if active {
            *self.active.write() = key.key_id.clone();
        }
        Ok(())
    }

    /// The data key wrapped again by the current master key (key rotation).
    pub fn rewrap(&self, key_id: &str, from: &str, wrapped: &[u8]) -> anyhow::Result<Vec<u8>> {
        let ms = self.masters.read();
        let old = ms
            .iter()
            .find(|m| m.id == from)
            .ok_or_else(|| anyhow::anyhow!("master key {from} is not configured"))?;
        let dk = old.unwrap(wrapped, key_id)?;
        Ok(ms[0].wrap(&dk, key_id))
    }

    pub fn has(&self, key_id: &str) -> bool {
        self.keys.read().contains_key(key_id)
    }

    /// Drops a destroyed data key from memory.
    pub fn forget(&self, key_id: &str) {
        self.keys.write().remove(key_id);
    }

    pub fn active_key_id(&self) -> String {
        self.active.read().clone()
    }

    /// Seals `plain` under the system key; returns `(key_id, nonce || ciphertext)`.
    pub fn seal(&self, plain: &[u8], aad: &str) -> (String, Vec<u8>) {
        let key_id = self.active.read().clone();
        let sealed = self
            .seal_with(&key_id, plain, aad)
            .expect("the system data key is installed at start-up");
        (key_id, sealed)
    }

    /// Seals `plain` under the (installed) data key `key_id`.
    pub fn seal_with(&self, key_id: &str, plain: &[u8], aad: &str) -> anyhow::Result<Vec<u8>> {
        let keys = self.keys.read();
        let cipher = keys
            .get(key_id)
            .ok_or_else(|| anyhow::anyhow!("data key {key_id} is not available"))?;
        Ok(seal(cipher, plain, aad.as_bytes()))
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

    /// A rewrite replaces the key file whole (no temporary left, mode 0600). That it is synced
    /// (file, then directory) is not observable here: an outside probe checked it with a
    /// simulated power loss on XFS (`xfs_io -x -c shutdown`), which left a 0-byte file before.
    #[test]
    fn the_key_file_is_rewritten_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("master.key");
        let (a, b) = (new_key_base64(), new_key_base64());
        rewrite_key_file(&file, &[a.clone()]).unwrap();
        rewrite_key_file(&file, &[b.clone(), a.clone()]).unwrap();
        assert_eq!(key_file_lines(&file).unwrap(), vec![b, a]);
        assert!(!dir.path().join("master.key.new").exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn sealed_data_opens_only_with_its_row_identity() {
        let mk =
            MasterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([7u8; 32]))
                .unwrap();
        let ring = Keyring::new(mk);
        let k = ring.generate();
        ring.install(&k, &ring.master_key_id(), true).unwrap();
        let (kid, sealed) = ring.seal(b"secret text", "Communication/1/1");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            ring.open(&kid, &sealed, "Communication/1/1").unwrap(),
            b"secret text"
        );
        assert!(ring.open(&kid, &sealed, "Communication/2/1").is_err());
    }

    #[test]
    fn a_rewrapped_data_key_opens_old_data_under_the_new_master_key_only() {
        let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
        let old = Keyring::new(MasterKey::from_base64(&b64(1)).unwrap());
        let k = old.generate();
        old.install(&k, &old.master_key_id(), true).unwrap();
        let sealed = old.seal_with(&k.key_id, b"kept", "Binary/1/1").unwrap();
        let both = Keyring::with_previous(
            MasterKey::from_base64(&b64(2)).unwrap(),
            vec![MasterKey::from_base64(&b64(1)).unwrap()],
        );
        let rewrapped = both
            .rewrap(&k.key_id, &old.master_key_id(), &k.wrapped)
            .unwrap();
        let new_only = Keyring::new(MasterKey::from_base64(&b64(2)).unwrap());
        let moved = WrappedKey {
            key_id: k.key_id.clone(),
            wrapped: rewrapped,
        };
        assert!(old
            .install(&moved, &new_only.master_key_id(), false)
            .is_err());
        new_only
            .install(&moved, &new_only.master_key_id(), false)
            .unwrap();
        assert_eq!(
            new_only.open(&k.key_id, &sealed, "Binary/1/1").unwrap(),
            b"kept"
        );
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
        assert!(b.install(&k, &a.master_key_id(), true).is_err());
        assert!(b.install(&k, &b.master_key_id(), true).is_err());
        assert_ne!(a.master_key_id(), b.master_key_id());
    }
}
