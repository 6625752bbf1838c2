//! Web push: notices to the person's browsers, through their push services (RFC 8030).
//!
//! - **Subscriptions.** The app subscribes the browser (`PushManager.subscribe`, with Courier's
//!   VAPID public key as `applicationServerKey`) and posts the subscription here
//!   (`POST /notify/push`). The endpoint is a capability URL, so it is kept sealed like an email
//!   address; the row's id is the endpoint's SHA-256, so a device turned on again (by whoever
//!   signs in on it next) is one row and belongs to the last person who turned it on.
//! - **Payloads** are encrypted for the browser (RFC 8291, `aes128gcm` per RFC 8188, through
//!   `web-push-native`), and carry what an email notice does: the clinic's name, that there is a
//!   message, a link. No name, no text: a notification can show on a locked screen.
//! - **VAPID** (RFC 8292): every request carries `Authorization: vapid t=<ES256 JWT>, k=<key>`,
//!   `aud` the push service's origin, `exp` 12 hours at most, `sub` `COURIER_VAPID_SUBJECT`. The
//!   P-256 key is made at first use, shared by every instance, its private half sealed.
//! - **Answers.** 2xx: delivered to the push service. 404/410: the subscription is gone (the
//!   person turned notifications off, or the browser dropped it): the row is deleted. 429, 5xx
//!   and network failures: tried again. Other 4xx (a refused VAPID signature, 413): parked.
//! - Requests go through [`Outbound`]: a push endpoint can name no private address.

use crate::config::Settings;
use crate::outbound::Outbound;
use crate::store::db::Bind;
use crate::store::{Store, StoreError};
use base64::Engine;
use diesel::sql_types::{BigInt, Binary, Text};
use diesel::QueryableByName;
use serde_json::json;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
/// At most this many devices per person; turning on another drops the oldest.
pub const MAX_DEVICES: i64 = 10;
const VAPID_AAD: &str = "notify-vapid";

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

fn aad(person: &str, id: &str) -> String {
    format!("notify-push/{person}/{id}")
}

/// A browser subscription, as the app posts it (`PushSubscription.toJSON()`).
#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Subscription {
    pub endpoint: String,
    pub keys: Keys,
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug)]
pub struct Keys {
    pub p256dh: String,
    pub auth: String,
}

/// A device to push to.
#[derive(Clone, Debug)]
pub struct Device {
    pub id: String,
    pub sub: Subscription,
}

fn decode(v: &str) -> Option<Vec<u8>> {
    let v = v.trim().trim_end_matches('=');
    B64.decode(v).ok().or_else(|| {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(v)
            .ok()
    })
}

fn device_id(endpoint: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(endpoint.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a subscription the app posts; `Err` says what is wrong, in words for the person.
pub fn validate(settings: &Settings, s: &Subscription) -> Result<(), String> {
    if s.endpoint.len() > 2048 {
        return Err("the push endpoint is too long".into());
    }
    let url = url::Url::parse(&s.endpoint).map_err(|_| "the push endpoint is not a URL")?;
    let https = url.scheme() == "https";
    if !https && !(url.scheme() == "http" && settings.subscription_private_endpoints) {
        return Err("the push endpoint must be an https URL".into());
    }
    if url.host_str().is_none() || !url.username().is_empty() || url.password().is_some() {
        return Err("the push endpoint must name a host and no credentials".into());
    }
    if !service_allowed(settings, &url) {
        return Err(format!(
            "the push endpoint is not at a push service Courier sends to ({}; COURIER_PUSH_HOSTS)",
            settings.push_hosts.join(", ")
        ));
    }
    let key = decode(&s.keys.p256dh).ok_or("keys.p256dh is not base64url")?;
    if key.len() != 65 || p256::PublicKey::from_sec1_bytes(&key).is_err() {
        return Err("keys.p256dh is not an uncompressed P-256 public key".into());
    }
    match decode(&s.keys.auth) {
        Some(a) if a.len() == 16 => Ok(()),
        _ => Err("keys.auth must be 16 bytes, base64url".into()),
    }
}

/// Whether `url` is at one of the push services Courier sends to (`COURIER_PUSH_HOSTS`: exact
/// host names, or `*.domain` for any host under it) on the https port. Browsers' push services
/// are few and public; anything else a person posts (an address inside the hospital's network)
/// is not a push service.
pub fn service_allowed(settings: &Settings, url: &url::Url) -> bool {
    let Some(host) = url
        .host_str()
        .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
    else {
        return false;
    };
    let port_ok = match url.scheme() {
        "https" => url.port().is_none_or(|p| p == 443),
        // Plain http only where address rules are lifted (closed networks, tests).
        "http" => settings.subscription_private_endpoints,
        _ => false,
    };
    port_ok
        && settings.push_hosts.iter().any(|h| {
            let h = h.trim().to_ascii_lowercase();
            match h.strip_prefix("*.") {
                Some(domain) => host.ends_with(&format!(".{domain}")),
                None => host == h,
            }
        })
}

/// Keeps the subscription for `person` (moving it from whoever had this device before), and
/// drops their oldest beyond [`MAX_DEVICES`]. Returns how many devices they now have.
pub fn register(store: &Store, person: &str, s: &Subscription) -> Result<i64, StoreError> {
    let id = device_id(&s.endpoint);
    let plain = serde_json::to_vec(s).map_err(|e| StoreError::Other(e.into()))?;
    let (key_id, sealed) = store.keys.seal(&plain, &aad(person, &id));
    store.execute(
        "INSERT INTO notify_push (id, person, key_id, sealed, created_at) VALUES (?, ?, ?, ?, ?) \
         ON CONFLICT (id) DO UPDATE SET person = excluded.person, key_id = excluded.key_id, sealed = excluded.sealed, created_at = excluded.created_at",
        vec![id.clone().into(), person.into(), key_id.into(), Bind::Blob(sealed), now().into()],
    )?;
    store.execute(
        "DELETE FROM notify_push WHERE person = ? AND id NOT IN \
         (SELECT id FROM notify_push WHERE person = ? ORDER BY created_at DESC, id LIMIT ?)",
        vec![person.into(), person.into(), MAX_DEVICES.into()],
    )?;
    count(store, person)
}

/// Forgets the device with this endpoint, if it is `person`'s. True if there was one.
pub fn unregister(store: &Store, person: &str, endpoint: &str) -> Result<bool, StoreError> {
    Ok(store.execute(
        "DELETE FROM notify_push WHERE id = ? AND person = ?",
        vec![device_id(endpoint).into(), person.into()],
    )? > 0)
}

pub fn forget(store: &Store, id: &str) -> Result<(), StoreError> {
    store.execute("DELETE FROM notify_push WHERE id = ?", vec![id.into()])?;
    Ok(())
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

pub fn count(store: &Store, person: &str) -> Result<i64, StoreError> {
    Ok(store
        .query::<CountRow>(
            "SELECT COUNT(*) AS n FROM notify_push WHERE person = ?",
            vec![person.into()],
        )?
        .first()
        .map_or(0, |r| r.n))
}

#[derive(QueryableByName)]
struct DeviceRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    sealed: Vec<u8>,
}

/// The person's devices, unsealed.
pub fn devices(store: &Store, person: &str) -> Result<Vec<Device>, StoreError> {
    let rows: Vec<DeviceRow> = store.query(
        "SELECT id, key_id, sealed FROM notify_push WHERE person = ? ORDER BY created_at, id",
        vec![person.into()],
    )?;
    let mut out = vec![];
    for r in rows {
        let plain = store.open_sealed(&r.key_id, &r.sealed, &aad(person, &r.id))?;
        if let Ok(sub) = serde_json::from_slice::<Subscription>(&plain) {
            out.push(Device { id: r.id, sub });
        }
    }
    Ok(out)
}

/// Courier's VAPID key: (PKCS#8 DER private key, base64url uncompressed public key). Made at
/// first use; two instances making it at once keep the one that was written first.
pub fn vapid(store: &Store) -> Result<(Vec<u8>, String), StoreError> {
    #[derive(QueryableByName)]
    struct Row {
        #[diesel(sql_type = Text)]
        key_id: String,
        #[diesel(sql_type = Binary)]
        sealed: Vec<u8>,
        #[diesel(sql_type = Text)]
        public_key: String,
    }
    let read = || {
        store.query::<Row>(
            "SELECT key_id, sealed, public_key FROM notify_vapid WHERE id = 1",
            vec![],
        )
    };
    let mut rows = read()?;
    if rows.is_empty() {
        use p256::elliptic_curve::sec1::ToEncodedPoint;
        use p256::pkcs8::EncodePrivateKey;
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let der = secret
            .to_pkcs8_der()
            .map_err(|e| StoreError::Other(anyhow::anyhow!("cannot encode the VAPID key: {e}")))?;
        let public = B64.encode(secret.public_key().to_encoded_point(false).as_bytes());
        let (key_id, sealed) = store.keys.seal(der.as_bytes(), VAPID_AAD);
        store.execute(
            "INSERT INTO notify_vapid (id, key_id, sealed, public_key, created_at) VALUES (1, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
            vec![key_id.into(), Bind::Blob(sealed), public.into(), now().into()],
        )?;
        rows = read()?;
    }
    let r = rows
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Other(anyhow::anyhow!("no VAPID key")))?;
    let der = store.open_sealed(&r.key_id, &r.sealed, VAPID_AAD)?;
    Ok((der, r.public_key))
}

/// The VAPID `sub`: `COURIER_VAPID_SUBJECT`, else the base URL when it is https, else the
/// sender address of notices as a mailto: URI.
pub fn subject(settings: &Settings) -> String {
    if let Some(s) = &settings.vapid_subject {
        return s.clone();
    }
    if settings.base_url.starts_with("https://") {
        return settings.base_url.clone();
    }
    let addr = settings
        .notify_from
        .parse::<lettre::message::Mailbox>()
        .map(|m| m.email.to_string())
        .unwrap_or_else(|_| "no-reply@localhost".into());
    format!("mailto:{addr}")
}

/// What the notification says: the clinic, that there is something, where to sign in.
pub fn payload(
    settings: &Settings,
    kind: &str,
    count: i64,
    link: &str,
    lang: Option<&str>,
) -> Vec<u8> {
    let w = super::templates::words(settings, lang);
    let key = match kind {
        "escalation" => "push_escalation",
        "reminder" => "push_reminder",
        _ if count > 1 => "push_many",
        _ => "push",
    };
    serde_json::to_vec(&json!({
        "title": settings.clinic_name,
        "body": w.get(key, count, link),
        "url": link,
        "tag": format!("courier-{kind}"),
        "lang": w.lang(),
    }))
    .unwrap_or_default()
}

/// How one push went.
pub enum Pushed {
    Delivered,
    /// The subscription no longer exists (404/410): forget the device.
    Gone,
    Failed(super::Failed),
}

/// Sends one push: the payload encrypted for the device, signed with the VAPID key.
#[allow(clippy::too_many_arguments)]
pub async fn send(
    settings: &Settings,
    http: &Outbound,
    vapid_der: &[u8],
    vapid_public: &str,
    subject: &str,
    device: &Device,
    payload: &[u8],
    urgent: bool,
    ttl_secs: u64,
) -> Pushed {
    let failed =
        |permanent: bool, reason: String| Pushed::Failed(super::Failed { permanent, reason });
    let (Some(key), Some(auth)) = (
        decode(&device.sub.keys.p256dh),
        decode(&device.sub.keys.auth),
    ) else {
        return failed(true, "the device's keys are unreadable".into());
    };
    let Ok(ua_public) = p256::PublicKey::from_sec1_bytes(&key) else {
        return failed(true, "the device's key is not a P-256 key".into());
    };
    let Ok(url) = url::Url::parse(&device.sub.endpoint) else {
        return failed(true, "the push endpoint is not a URL".into());
    };
    if !service_allowed(settings, &url) {
        return Pushed::Gone;
    }
    // RFC 8292 §2: `aud` is the origin of the push resource.
    let audience = url.origin().ascii_serialization();
    let Ok(uri) = device.sub.endpoint.parse() else {
        return failed(true, "the push endpoint is not a URL".into());
    };
    let builder = web_push_native::WebPushBuilder::new(
        uri,
        ua_public,
        web_push_native::Auth::clone_from_slice(&auth),
    )
    .with_valid_duration(std::time::Duration::from_secs(ttl_secs));
    let request = match builder.build(payload.to_vec()) {
        Ok(r) => r,
        Err(e) => return failed(true, format!("cannot encrypt the payload: {e}")),
    };
    let claims = json!({"aud": audience, "exp": now() + 12 * 3600, "sub": subject});
    let jwt = match jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(vapid_der),
    ) {
        Ok(t) => t,
        Err(e) => return failed(true, format!("cannot sign the VAPID token: {e}")),
    };
    let mut out = match http.post(&device.sub.endpoint) {
        Ok(b) => b,
        Err(e) => return failed(true, e.0),
    };
    for (name, value) in request.headers() {
        if name.as_str() != "content-length" {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    let answer = out
        .header("authorization", format!("vapid t={jwt}, k={vapid_public}"))
        .header("urgency", if urgent { "high" } else { "normal" })
        .body(request.into_body())
        .send()
        .await;
    match answer.map(|r| r.status().as_u16()) {
        Ok(200..=299) => Pushed::Delivered,
        Ok(404) | Ok(410) => Pushed::Gone,
        Ok(429) | Ok(500..=599) => failed(false, "the push service is busy or failing".into()),
        Ok(413) => failed(
            true,
            "the push service refused the payload as too large (413)".into(),
        ),
        Ok(s) => failed(true, format!("the push service refused it ({s})")),
        Err(e) => failed(
            false,
            format!(
                "the push service could not be reached: {}",
                crate::outbound::why(e)
            ),
        ),
    }
}
