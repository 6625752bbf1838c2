//! Scoped data keys, key rotation and crypto-erase.
//!
//! A resource version is sealed under the data key of its scope: its retention class, its
//! patient (or none) and its write window (the calendar month, for classes that expire). The key
//! is looked up (or made) inside the write's own transaction, so a rolled-back write leaves no key
//! and a retired or destroyed key is never used again by any instance. Destroying a key (purge,
//! erasure) makes what it sealed unreadable everywhere a copy survives: backups, WAL, free pages.
//!
//! Rotation: `courier keys rotate` retires every data key (new writes get new keys at once) and,
//! with `--master`, makes a new master key current. Each instance re-wraps data keys still wrapped
//! by a previous master key in the background (every 30 s, 1,000 at a time); `courier keys status`
//! says when no data key depends on a previous master key any more, so it can be retired.

use super::db::{Bind, Conn};
use super::rows::{KeyRow, ScopedKeyRow};
use super::{Store, StoreError};
use crate::clock::now_micros;
use crate::retention::{self, SYSTEM};
use crate::with_conn;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;

#[derive(QueryableByName)]
#[allow(dead_code)]
struct KeyIdRow {
    #[diesel(sql_type = Text)]
    key_id: String,
}

#[derive(QueryableByName)]
pub struct KeyStatusRow {
    #[diesel(sql_type = Text)]
    pub master_key_id: String,
    #[diesel(sql_type = Text)]
    pub class: String,
    #[diesel(sql_type = BigInt)]
    pub active: i64,
    #[diesel(sql_type = BigInt)]
    pub retired: i64,
}

#[derive(QueryableByName)]
struct OldestRow {
    #[diesel(sql_type = Nullable<BigInt>)]
    n: Option<i64>,
}

/// What `courier keys status` prints.
pub struct KeyStatus {
    pub current_master: String,
    pub rows: Vec<KeyStatusRow>,
    /// Master keys configured but wrapping no data key any more: safe to remove.
    pub retirable: Vec<String>,
    /// Master keys still wrapping data keys that are not the current one.
    pub pending: Vec<(String, i64)>,
}

impl Store {
    /// At start-up: check the configured master keys fit this database, and install the system key
    /// (making the first one on a new database).
    pub(super) fn load_keys(&self) -> anyhow::Result<()> {
        let mut c = self.db.get()?;
        #[derive(QueryableByName)]
        struct MasterRow {
            #[diesel(sql_type = Text)]
            master_key_id: String,
        }
        let masters: Vec<MasterRow> = with_conn!(c, |c| c
            .load("SELECT DISTINCT master_key_id FROM data_keys", vec![]))?;
        let known = self.keys.master_key_ids();
        if !masters.is_empty() && !masters.iter().any(|m| known.contains(&m.master_key_id)) {
            anyhow::bail!(
                "the database's data keys are wrapped by master key(s) {:?}, but the configured master key(s) are {known:?}: \
                 configure the key this database was created with",
                masters.iter().map(|m| m.master_key_id.as_str()).collect::<Vec<_>>(),
            );
        }
        self.refresh_system_key()?;
        Ok(())
    }

    /// Installs the newest active system key, making one if there is none (a new database, or
    /// after `courier keys rotate`).
    pub fn refresh_system_key(&self) -> anyhow::Result<()> {
        let mut c = self.db.get()?;
        let rows: Vec<KeyRow> = with_conn!(c, |c| {
            c.load(
            "SELECT key_id, master_key_id, wrapped FROM data_keys WHERE class = 'system' AND retired_at IS NULL \
             ORDER BY created_at DESC, key_id DESC",
            vec![]
        )
        })?;
        let known = self.keys.master_key_ids();
        if let Some(r) = rows.iter().find(|r| known.contains(&r.master_key_id)) {
            if self.keys.active_key_id() != r.key_id {
                self.keys
                    .install(&r.wrapped_key(), &r.master_key_id, true)?;
            }
            return Ok(());
        }
        let k = self.keys.generate();
        with_conn!(c, |c| {
            c.execute(
            "INSERT INTO data_keys (key_id, master_key_id, wrapped, created_at, class, patient, window_end) VALUES (?, ?, ?, ?, 'system', '', ?)",
            vec![
                k.key_id.clone().into(),
                self.keys.master_key_id().into(),
                k.wrapped.clone().into(),
                now_micros().into(),
                i64::MAX.into(),
            ]
        )
        })?;
        self.keys.install(&k, &self.keys.master_key_id(), true)?;
        Ok(())
    }

    /// The data key for a version of class `class` about `patient` written now, inside the
    /// write's transaction: the newest active key of the scope, else a new one.
    pub(super) fn scoped_key<C: Conn>(
        &self,
        c: &mut C,
        class: &str,
        patient: &str,
        now: i64,
    ) -> Result<String, StoreError> {
        if class == SYSTEM {
            return Ok(self.keys.active_key_id());
        }
        // PostgreSQL: a patient's key is share-locked until this write commits, so an erasure
        // destroying that key waits for it and then sees what it sealed (and keeps the key). On
        // SQLite the single writer already orders them. Unscoped keys are only destroyed once
        // their write window has closed, when no write can pick them.
        let lock = if c.is_postgres() && !patient.is_empty() {
            " FOR KEY SHARE"
        } else {
            ""
        };
        // SQLite's group commit: a scope met earlier in the same transaction has the same key
        // (nothing else writes `data_keys` meanwhile: the transaction holds the only write lock).
        let memo_key = (class.to_string(), patient.to_string());
        if let Some(memo) = self.group_keys.lock().as_ref() {
            if let Some((key_id, window_end)) = memo.get(&memo_key) {
                if *window_end > now && self.keys.has(key_id) {
                    return Ok(key_id.clone());
                }
            }
        }
        let remember = |key_id: &str, window_end: i64| {
            if let Some(memo) = self.group_keys.lock().as_mut() {
                memo.insert(memo_key.clone(), (key_id.to_string(), window_end));
            }
        };
        let rows: Vec<ScopedKeyRow> = c.load_cached(
            &format!(
                "SELECT key_id, master_key_id, wrapped, window_end FROM data_keys \
                 WHERE class = ? AND patient = ? AND window_end > ? AND retired_at IS NULL \
                 ORDER BY window_end ASC, created_at DESC LIMIT 1{lock}"
            ),
            vec![class.into(), patient.into(), now.into()],
        )?;
        if let Some(ScopedKeyRow { key: r, window_end }) = rows.into_iter().next() {
            if !self.keys.has(&r.key_id) {
                self.install_row(&r)?;
            }
            remember(&r.key_id, window_end);
            return Ok(r.key_id);
        }
        let k = self.keys.generate();
        c.execute(
            "INSERT INTO data_keys (key_id, master_key_id, wrapped, created_at, class, patient, window_end) VALUES (?, ?, ?, ?, ?, ?, ?)",
            vec![
                k.key_id.clone().into(),
                self.keys.master_key_id().into(),
                k.wrapped.clone().into(),
                now.into(),
                class.into(),
                patient.into(),
                retention::window_end(now).into(),
            ],
        )?;
        self.keys
            .install(&k, &self.keys.master_key_id(), false)
            .map_err(StoreError::Other)?;
        remember(&k.key_id, retention::window_end(now));
        Ok(k.key_id)
    }

    fn install_row(&self, r: &KeyRow) -> Result<(), StoreError> {
        if self
            .keys
            .install(&r.wrapped_key(), &r.master_key_id, false)
            .is_err()
        {
            // Another instance may have rotated the master key into the key file: read it again.
            self.reload_master_keys();
            self.keys
                .install(&r.wrapped_key(), &r.master_key_id, false)
                .map_err(StoreError::Other)?;
        }
        Ok(())
    }

    /// Makes sure data key `key_id` is in memory, reading it through `c`.
    pub(super) fn ensure_key<C: Conn>(&self, c: &mut C, key_id: &str) -> Result<(), StoreError> {
        if self.keys.has(key_id) {
            return Ok(());
        }
        let rows: Vec<KeyRow> = c.load_cached(
            "SELECT key_id, master_key_id, wrapped FROM data_keys WHERE key_id = ?",
            vec![key_id.into()],
        )?;
        let r = rows.into_iter().next().ok_or_else(|| {
            StoreError::Other(anyhow::anyhow!(
                "data key {key_id} was destroyed: what it sealed cannot be read"
            ))
        })?;
        self.install_row(&r)
    }

    /// Opens data sealed outside the resource store (sessions, subscriptions, Courier's own keys).
    pub fn open_sealed(&self, key_id: &str, sealed: &[u8], aad: &str) -> anyhow::Result<Vec<u8>> {
        // Twice: the key cache may start over between loading the key and using it.
        for _ in 0..2 {
            if !self.keys.has(key_id) {
                let mut c = self.db.get()?;
                with_conn!(c, |c| self.ensure_key(c, key_id))?;
            }
            match self.keys.open(key_id, sealed, aad) {
                Err(_) if !self.keys.has(key_id) => continue,
                r => return r,
            }
        }
        self.keys.open(key_id, sealed, aad)
    }

    /// Re-reads the master key file (after `courier keys rotate --master` by another process).
    pub fn reload_master_keys(&self) {
        let Some(file) = &self.key_file else { return };
        match crate::store::crypto::read_key_file(file) {
            Ok((current, previous)) => {
                for p in previous {
                    self.keys.add_previous(p);
                }
                if !self.keys.master_key_ids().contains(&current.id) {
                    tracing::info!(master_key_id = %current.id, "a new master key was found in the key file");
                    self.keys.promote(current);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot re-read the master key file"),
        }
    }

    /// Retires every active data key: every new write, on every instance, gets a new data key at
    /// once (the system key within 30 s). Old data stays readable. Returns how many were retired.
    pub fn retire_data_keys(&self) -> Result<usize, StoreError> {
        let n = self.execute(
            "UPDATE data_keys SET retired_at = ? WHERE retired_at IS NULL",
            vec![now_micros().into()],
        )?;
        self.refresh_system_key().map_err(StoreError::Other)?;
        Ok(n)
    }

    /// Re-wraps up to `limit` data keys still wrapped by a master key other than the current one.
    /// Idempotent and safe on every instance at once. Returns how many were re-wrapped.
    pub fn rewrap_step(&self, limit: i64) -> Result<usize, StoreError> {
        let current = self.keys.master_key_id();
        let rows: Vec<KeyRow> = self.query(
            "SELECT key_id, master_key_id, wrapped FROM data_keys WHERE master_key_id <> ? ORDER BY created_at LIMIT ?",
            vec![current.clone().into(), limit.into()],
        )?;
        let known = self.keys.master_key_ids();
        let mut n = 0;
        for r in rows {
            if !known.contains(&r.master_key_id) {
                continue; // wrapped by a key this instance was not given
            }
            let wrapped = self
                .keys
                .rewrap(&r.key_id, &r.master_key_id, &r.wrapped)
                .map_err(StoreError::Other)?;
            n += self.execute(
                "UPDATE data_keys SET wrapped = ?, master_key_id = ? WHERE key_id = ? AND master_key_id = ?",
                vec![
                    Bind::Blob(wrapped),
                    current.clone().into(),
                    r.key_id.into(),
                    r.master_key_id.into(),
                ],
            )?;
        }
        Ok(n)
    }

    /// Re-wraps every data key under the current master key. Returns how many were re-wrapped.
    pub fn rewrap_all(&self) -> Result<usize, StoreError> {
        let mut total = 0;
        loop {
            let n = self.rewrap_step(1000)?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Per master key and class: how many data keys are active and retired.
    pub fn key_status(&self) -> Result<KeyStatus, StoreError> {
        let rows: Vec<KeyStatusRow> = self.query(
            "SELECT master_key_id, class, \
             CAST(SUM(CASE WHEN retired_at IS NULL THEN 1 ELSE 0 END) AS BIGINT) AS active, \
             CAST(SUM(CASE WHEN retired_at IS NULL THEN 0 ELSE 1 END) AS BIGINT) AS retired \
             FROM data_keys GROUP BY master_key_id, class ORDER BY master_key_id, class",
            vec![],
        )?;
        let current = self.keys.master_key_id();
        let mut pending: Vec<(String, i64)> = vec![];
        for r in rows.iter().filter(|r| r.master_key_id != current) {
            match pending.iter_mut().find(|p| p.0 == r.master_key_id) {
                Some(p) => p.1 += r.active + r.retired,
                None => pending.push((r.master_key_id.clone(), r.active + r.retired)),
            }
        }
        let retirable = self
            .keys
            .master_key_ids()
            .into_iter()
            .skip(1)
            .filter(|m| !pending.iter().any(|p| &p.0 == m))
            .collect();
        Ok(KeyStatus {
            current_master: current,
            rows,
            retirable,
            pending,
        })
    }

    /// The oldest write window still holding a key (for status output); none if no scoped key.
    pub fn oldest_window(&self) -> Result<Option<i64>, StoreError> {
        let rows: Vec<OldestRow> = self.query(
            "SELECT MIN(window_end) AS n FROM data_keys WHERE class <> 'system'",
            vec![],
        )?;
        Ok(rows.into_iter().next().and_then(|r| r.n))
    }

    /// Seals every version still under data key `key_id` again, under the unscoped key of its
    /// resource's class (inside `c`'s transaction): so the key can be destroyed while its data stays.
    pub fn reseal_unscoped<C: Conn>(&self, c: &mut C, key_id: &str) -> Result<usize, StoreError> {
        #[derive(QueryableByName)]
        struct Sealed {
            #[diesel(sql_type = BigInt)]
            vid: i64,
            #[diesel(sql_type = Text)]
            res_type: String,
            #[diesel(sql_type = Text)]
            fhir_id: String,
            #[diesel(sql_type = BigInt)]
            version_id: i64,
            #[diesel(sql_type = diesel::sql_types::Binary)]
            body: Vec<u8>,
            #[diesel(sql_type = Text)]
            retention_class: String,
        }
        let rows: Vec<Sealed> = c.load(
            "SELECT v.vid, v.res_type, r.fhir_id, v.version_id, v.body, r.retention_class \
             FROM resource_versions v JOIN resources r ON r.rid = v.rid \
             WHERE v.key_n = (SELECT n FROM data_keys WHERE key_id = ?)",
            vec![key_id.into()],
        )?;
        // AuditEvents (`audit_rows`): their class is their type's.
        let audits: Vec<Sealed> = c.load(
            "SELECT r.rid AS vid, 'AuditEvent' AS res_type, COALESCE(r.fhir_id, '') AS fhir_id, \
             CAST(1 AS BIGINT) AS version_id, r.body, '' AS retention_class \
             FROM audit_events r WHERE r.key_n = (SELECT n FROM data_keys WHERE key_id = ?)",
            vec![key_id.into()],
        )?;
        self.ensure_key(c, key_id)?;
        let audit_class = self
            .retention
            .class_of(super::audit_rows::TYPE, &serde_json::Value::Null)
            .to_string();
        let resealed = rows.len() + audits.len();
        for mut r in audits {
            if r.fhir_id.is_empty() {
                r.fhir_id = self.audit_ids().id(r.vid);
            }
            let aad = format!("{}/{}/{}", r.res_type, r.fhir_id, r.version_id);
            let plain = self
                .keys
                .open(key_id, &r.body, &aad)
                .map_err(StoreError::Other)?;
            let to = self.scoped_key(c, &audit_class, "", now_micros())?;
            let sealed = self
                .keys
                .seal_with(&to, &plain, &aad)
                .map_err(StoreError::Other)?;
            c.execute(
                "UPDATE audit_events SET key_n = (SELECT n FROM data_keys WHERE key_id = ?), body = ? WHERE rid = ?",
                vec![to.into(), Bind::Blob(sealed), r.vid.into()],
            )?;
        }
        for r in &rows {
            let aad = format!("{}/{}/{}", r.res_type, r.fhir_id, r.version_id);
            let plain = self
                .keys
                .open(key_id, &r.body, &aad)
                .map_err(StoreError::Other)?;
            let to = self.scoped_key(c, &r.retention_class, "", now_micros())?;
            let sealed = self
                .keys
                .seal_with(&to, &plain, &aad)
                .map_err(StoreError::Other)?;
            c.execute(
                "UPDATE resource_versions SET key_n = (SELECT n FROM data_keys WHERE key_id = ?), body = ? WHERE vid = ?",
                vec![to.into(), Bind::Blob(sealed), r.vid.into()],
            )?;
        }
        Ok(resealed)
    }

    /// Destroys data key `key_id` if nothing sealed under it remains (inside `c`'s transaction).
    /// Returns whether it was destroyed.
    pub fn destroy_key_if_unused<C: Conn>(
        &self,
        c: &mut C,
        key_id: &str,
    ) -> Result<bool, StoreError> {
        if c.is_postgres() {
            // Waits for writes that share-locked the key (see `scoped_key`) to commit, so the
            // check below sees what they sealed.
            c.load::<KeyIdRow>(
                "SELECT key_id FROM data_keys WHERE key_id = ? FOR UPDATE",
                vec![key_id.into()],
            )?;
        }
        let used: Vec<KeyIdRow> = c.load(
            "SELECT k.key_id FROM resource_versions v JOIN data_keys k ON k.n = v.key_n WHERE k.key_id = ? \
             UNION ALL SELECT k.key_id FROM audit_events a JOIN data_keys k ON k.n = a.key_n WHERE k.key_id = ?",
            vec![key_id.into(), key_id.into()],
        )?;
        if !used.is_empty() {
            return Ok(false);
        }
        let n = c.execute(
            "DELETE FROM data_keys WHERE key_id = ? AND class <> 'system'",
            vec![key_id.into()],
        )?;
        Ok(n > 0)
    }
}
