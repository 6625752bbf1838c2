//! Courier's own second factors, per Courier identity (`Practitioner/…`, `Patient/…`,
//! `RelatedPerson/…`): passkeys (WebAuthn, through `webauthn-rs`), TOTP authenticator apps
//! (RFC 6238, through `totp-rs`) and one-time recovery codes; and the guard that locks a person
//! out after repeated wrong answers.
//!
//! Secrets are sealed like resource bodies (AES-256-GCM under the system data key, bound to the
//! person and the factor). Recovery codes are kept only as salted HMAC-SHA-256. A TOTP code is
//! accepted once: the time step it matched is recorded, and a code of that step or an earlier one
//! is refused from then on (RFC 6238 §5.2).

use crate::store::db::Bind;
use crate::store::{Store, StoreError};
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use webauthn_rs::prelude::Passkey;

/// Wrong answers in a row (within [`FAILURE_WINDOW_SECS`]) before a person is locked out.
pub const MAX_FAILURES: i64 = 5;
pub const FAILURE_WINDOW_SECS: i64 = 15 * 60;
/// How long a lockout lasts.
pub const LOCKOUT_SECS: i64 = 15 * 60;
/// Recovery codes made at enrolment.
pub const RECOVERY_CODES: usize = 10;
/// Letters in a recovery code.
const CODE_CHARS: usize = 24;

pub const PASSKEY: &str = "passkey";
pub const TOTP: &str = "totp";

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

fn aad(user: &str, id: &str) -> String {
    format!("mfa-factor/{user}/{id}")
}

#[derive(QueryableByName, Debug, Clone)]
pub struct Factor {
    #[diesel(sql_type = Text)]
    pub id: String,
    #[diesel(sql_type = Text)]
    pub user_ref: String,
    #[diesel(sql_type = Text)]
    pub kind: String,
    #[diesel(sql_type = Text)]
    pub label: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    sealed: Vec<u8>,
    #[diesel(sql_type = BigInt)]
    pub last_step: i64,
    #[diesel(sql_type = BigInt)]
    pub created_at: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub last_used_at: Option<i64>,
}

const COLUMNS: &str =
    "id, user_ref, kind, label, key_id, sealed, last_step, created_at, last_used_at";

/// A person's factors, oldest first.
pub fn list(store: &Store, user: &str) -> Result<Vec<Factor>, StoreError> {
    store.query(
        &format!("SELECT {COLUMNS} FROM mfa_factors WHERE user_ref = ? ORDER BY created_at, id"),
        vec![user.into()],
    )
}

fn add(
    store: &Store,
    user: &str,
    kind: &str,
    label: &str,
    secret: &[u8],
) -> Result<String, StoreError> {
    let id = uuid::Uuid::new_v4().to_string();
    let (key_id, sealed) = store.keys.seal(secret, &aad(user, &id));
    store.execute(
        &format!("INSERT INTO mfa_factors ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, 0, ?, NULL)"),
        vec![
            id.clone().into(),
            user.into(),
            kind.into(),
            label.into(),
            key_id.into(),
            Bind::Blob(sealed),
            now().into(),
        ],
    )?;
    Ok(id)
}

fn open(store: &Store, f: &Factor) -> Result<Vec<u8>, StoreError> {
    Ok(store.open_sealed(&f.key_id, &f.sealed, &aad(&f.user_ref, &f.id))?)
}

// ---- TOTP ----

/// A fresh TOTP secret (160 bits, as RFC 4226 §4 recommends).
pub fn new_totp_secret() -> Vec<u8> {
    let mut s = vec![0u8; 20];
    rand::thread_rng().fill(&mut s[..]);
    s
}

/// The TOTP of a secret: SHA-1, 6 digits, 30 s steps, one step of skew each way (RFC 6238 §5.2),
/// which every authenticator app reads from the `otpauth://` URI.
pub fn totp(secret: &[u8], account: &str) -> Result<totp_rs::Totp, String> {
    totp_rs::Builder::new()
        .with_secret(totp_rs::Secret::new(secret.to_vec().into_boxed_slice()))
        .with_issuer(Some("Courier"))
        .with_account_name(account.replace(':', " "))
        .build()
        .map_err(|e| format!("cannot make the TOTP: {e}"))
}

/// The time step a code matches, if any (the current one or one step either side).
pub fn totp_step(secret: &[u8], code: &str, at: i64) -> Option<i64> {
    let code: String = code
        .chars()
        .filter(|c| !c.is_whitespace() && *c != '-')
        .collect();
    if code.len() != 6 || !code.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    totp(secret, "x")
        .ok()?
        .check(&code, at.max(0) as u64)
        .map(|s| s as i64)
}

pub fn add_totp(
    store: &Store,
    user: &str,
    secret: &[u8],
    first_step: i64,
) -> Result<String, StoreError> {
    let id = add(store, user, TOTP, "Authenticator app", secret)?;
    // The code that proved the enrolment is used up too.
    store.execute(
        "UPDATE mfa_factors SET last_step = ?, last_used_at = ? WHERE id = ?",
        vec![first_step.into(), now().into(), id.clone().into()],
    )?;
    Ok(id)
}

/// What checking a TOTP code found.
#[derive(Debug, PartialEq, Eq)]
pub enum TotpCheck {
    Accepted,
    /// A right code that was already used (or an older one): refused.
    Replayed,
    Wrong,
}

/// Checks a code against each of the person's authenticator apps; a match is recorded in the
/// same statement that checks it was not used before, so two requests racing with one code
/// cannot both pass.
pub fn check_totp(store: &Store, user: &str, code: &str) -> Result<TotpCheck, StoreError> {
    let t = now();
    let mut replayed = false;
    for f in list(store, user)?.into_iter().filter(|f| f.kind == TOTP) {
        let secret = open(store, &f)?;
        let Some(step) = totp_step(&secret, code, t) else {
            continue;
        };
        let n = store.execute(
            "UPDATE mfa_factors SET last_step = ?, last_used_at = ? WHERE id = ? AND last_step < ?",
            vec![step.into(), t.into(), f.id.clone().into(), step.into()],
        )?;
        if n == 1 {
            return Ok(TotpCheck::Accepted);
        }
        replayed = true;
    }
    Ok(if replayed {
        TotpCheck::Replayed
    } else {
        TotpCheck::Wrong
    })
}

// ---- passkeys ----

pub fn add_passkey(store: &Store, user: &str, passkey: &Passkey) -> Result<String, StoreError> {
    let json = serde_json::to_vec(passkey)
        .map_err(|e| StoreError::Other(anyhow::anyhow!(e.to_string())))?;
    add(store, user, PASSKEY, "Passkey", &json)
}

/// The person's passkeys with their factor ids.
pub fn passkeys(store: &Store, user: &str) -> Result<Vec<(String, Passkey)>, StoreError> {
    let mut out = Vec::new();
    for f in list(store, user)?.into_iter().filter(|f| f.kind == PASSKEY) {
        let json = open(store, &f)?;
        let pk: Passkey = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Other(anyhow::anyhow!(e.to_string())))?;
        out.push((f.id, pk));
    }
    Ok(out)
}

/// Stores a passkey after a sign-in (its signature counter and backup state move on).
pub fn update_passkey(
    store: &Store,
    user: &str,
    id: &str,
    passkey: &Passkey,
) -> Result<(), StoreError> {
    let json = serde_json::to_vec(passkey)
        .map_err(|e| StoreError::Other(anyhow::anyhow!(e.to_string())))?;
    let (key_id, sealed) = store.keys.seal(&json, &aad(user, id));
    store.execute(
        "UPDATE mfa_factors SET key_id = ?, sealed = ?, last_used_at = ? WHERE id = ? AND user_ref = ?",
        vec![key_id.into(), Bind::Blob(sealed), now().into(), id.into(), user.into()],
    )?;
    Ok(())
}

// ---- recovery codes ----

fn code_hash(salt: &str, code: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(salt.as_bytes()).expect("any key length");
    mac.update(normalize_code(code).as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Makes a new set of recovery codes (the old ones stop working) and returns them, the only time
/// they are ever shown: 10 codes of 24 characters from a 31-letter alphabet (118 bits each, so a
/// salted SHA-256 hash suffices: NIST SP 800-63B asks a key-derivation function only below 112
/// bits), written as four groups of six.
pub fn new_recovery_codes(store: &Store, user: &str) -> Result<Vec<String>, StoreError> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    store.execute(
        "DELETE FROM mfa_recovery_codes WHERE user_ref = ?",
        vec![user.into()],
    )?;
    let mut rng = rand::thread_rng();
    let mut codes = Vec::with_capacity(RECOVERY_CODES);
    for _ in 0..RECOVERY_CODES {
        let raw: String = (0..CODE_CHARS)
            .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
            .collect();
        let code = format!(
            "{}-{}-{}-{}",
            &raw[..6],
            &raw[6..12],
            &raw[12..18],
            &raw[18..]
        );
        let salt = hex(&rng.gen::<[u8; 16]>());
        store.execute(
            "INSERT INTO mfa_recovery_codes (user_ref, salt, code_hash, used_at) VALUES (?, ?, ?, NULL)",
            vec![user.into(), salt.clone().into(), code_hash(&salt, &code).into()],
        )?;
        codes.push(code);
    }
    Ok(codes)
}

#[derive(QueryableByName)]
struct CodeRow {
    #[diesel(sql_type = Text)]
    salt: String,
    #[diesel(sql_type = Text)]
    code_hash: String,
}

/// Uses up a recovery code; true when it was one of the person's unused codes.
pub fn use_recovery_code(store: &Store, user: &str, code: &str) -> Result<bool, StoreError> {
    if normalize_code(code).len() != CODE_CHARS {
        return Ok(false);
    }
    let rows: Vec<CodeRow> = store.query(
        "SELECT salt, code_hash FROM mfa_recovery_codes WHERE user_ref = ? AND used_at IS NULL",
        vec![user.into()],
    )?;
    for r in rows {
        let h = code_hash(&r.salt, code);
        if constant_time_eq(h.as_bytes(), r.code_hash.as_bytes()) {
            let n = store.execute(
                "UPDATE mfa_recovery_codes SET used_at = ? WHERE user_ref = ? AND salt = ? AND used_at IS NULL",
                vec![now().into(), user.into(), r.salt.into()],
            )?;
            return Ok(n == 1);
        }
    }
    Ok(false)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub fn recovery_codes_left(store: &Store, user: &str) -> Result<i64, StoreError> {
    Ok(store
        .query::<CountRow>(
            "SELECT COUNT(*) AS n FROM mfa_recovery_codes WHERE user_ref = ? AND used_at IS NULL",
            vec![user.into()],
        )?
        .first()
        .map_or(0, |r| r.n))
}

// ---- the guard ----

#[derive(QueryableByName)]
struct GuardRow {
    #[diesel(sql_type = BigInt)]
    failures: i64,
    #[diesel(sql_type = BigInt)]
    locked_until: i64,
}

fn guard(store: &Store, user: &str) -> Result<Option<GuardRow>, StoreError> {
    Ok(store
        .query::<GuardRow>(
            "SELECT failures, locked_until FROM mfa_guard WHERE user_ref = ?",
            vec![user.into()],
        )?
        .into_iter()
        .next())
}

/// Until when the person is locked out, if they are.
pub fn locked_until(store: &Store, user: &str) -> Result<Option<i64>, StoreError> {
    let t = now();
    Ok(guard(store, user)?
        .map(|g| g.locked_until)
        .filter(|&until| until > t))
}

/// Whether an attempt at a second factor may go ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    Go,
    /// Locked out until then; `true` when this attempt started the lockout.
    Locked(i64, bool),
}

#[derive(QueryableByName)]
struct Counted {
    #[diesel(sql_type = BigInt)]
    failures: i64,
    #[diesel(sql_type = BigInt)]
    locked_until: i64,
}

/// Counts an attempt before it is checked, in one statement, so that requests racing in parallel
/// cannot make more than [`MAX_FAILURES`] guesses within the window between them; a right answer
/// ([`record_success`]) clears the count. Refused while locked out (and not counted then).
pub fn attempt(store: &Store, user: &str) -> Result<Attempt, StoreError> {
    let t = now();
    let since = t - FAILURE_WINDOW_SECS;
    let row = store
        .query::<Counted>(
            "INSERT INTO mfa_guard (user_ref, failures, window_start, locked_until) VALUES (?, 1, ?, 0) \
             ON CONFLICT (user_ref) DO UPDATE SET \
             failures = CASE WHEN mfa_guard.locked_until > ? THEN mfa_guard.failures \
                             WHEN mfa_guard.window_start < ? THEN 1 ELSE mfa_guard.failures + 1 END, \
             window_start = CASE WHEN mfa_guard.locked_until > ? THEN mfa_guard.window_start \
                                 WHEN mfa_guard.window_start < ? THEN ? ELSE mfa_guard.window_start END \
             RETURNING failures, locked_until",
            vec![
                user.into(),
                t.into(),
                t.into(),
                since.into(),
                t.into(),
                since.into(),
                t.into(),
            ],
        )?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Other(anyhow::anyhow!("the attempt was not counted")))?;
    if row.locked_until > t {
        return Ok(Attempt::Locked(row.locked_until, false));
    }
    if row.failures > MAX_FAILURES {
        return Ok(Attempt::Locked(lock(store, user, t)?, true));
    }
    Ok(Attempt::Go)
}

/// After a wrong answer: the one that used up the allowance starts the lockout. Returns its end.
pub fn failed(store: &Store, user: &str) -> Result<Option<i64>, StoreError> {
    let g = guard(store, user)?;
    match g {
        Some(g) if g.failures >= MAX_FAILURES && g.locked_until <= now() => {
            Ok(Some(lock(store, user, now())?))
        }
        _ => Ok(None),
    }
}

fn lock(store: &Store, user: &str, t: i64) -> Result<i64, StoreError> {
    let until = t + LOCKOUT_SECS;
    // Never shortens a lockout already running.
    store.execute(
        "UPDATE mfa_guard SET locked_until = CASE WHEN locked_until > ? THEN locked_until ELSE ? END, failures = 0, window_start = ? WHERE user_ref = ?",
        vec![until.into(), until.into(), t.into(), user.into()],
    )?;
    Ok(locked_until(store, user)?.unwrap_or(until))
}

/// A right answer clears the count of wrong ones.
pub fn record_success(store: &Store, user: &str) -> Result<(), StoreError> {
    store.execute(
        "DELETE FROM mfa_guard WHERE user_ref = ?",
        vec![user.into()],
    )?;
    Ok(())
}

/// Removes every factor, recovery code and lockout of a person (`courier mfa reset`, erasure):
/// their next sign-in enrols anew. Returns how many factors were removed.
pub fn reset(store: &Store, user: &str) -> Result<usize, StoreError> {
    let n = store.execute(
        "DELETE FROM mfa_factors WHERE user_ref = ?",
        vec![user.into()],
    )?;
    store.execute(
        "DELETE FROM mfa_recovery_codes WHERE user_ref = ?",
        vec![user.into()],
    )?;
    store.execute(
        "DELETE FROM mfa_guard WHERE user_ref = ?",
        vec![user.into()],
    )?;
    store.execute(
        "DELETE FROM mfa_tickets WHERE user_ref = ?",
        vec![user.into()],
    )?;
    Ok(n)
}
