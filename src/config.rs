//! Settings, layered: built-in defaults < optional TOML file (`--config` or `COURIER_CONFIG`) < `COURIER_*`
//! environment variables. Secrets are `SecretString`s so they never print.

use secrecy::SecretString;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on (`COURIER_LISTEN`).
    pub listen: String,
    /// Public base URL of the FHIR API, used in `fullUrl`, `Location` and links (`COURIER_BASE_URL`).
    /// Empty means `http://{listen}`.
    pub base_url: String,
    /// Directory for the embedded database and the generated master key (`COURIER_DATA_DIR`).
    pub data_dir: PathBuf,
    /// `sqlite://path`, a plain path, or `postgres://…` (`COURIER_DATABASE_URL`).
    /// Empty means `{data_dir}/courier.db`.
    pub database_url: String,
    /// Base64 of a 32-byte key-encryption key (`COURIER_MASTER_KEY`); wins over `master_key_file`.
    pub master_key: Option<SecretString>,
    /// File holding the base64 master key (`COURIER_MASTER_KEY_FILE`); created (0600) if absent.
    /// Empty means `{data_dir}/master.key`.
    pub master_key_file: Option<PathBuf>,
    /// Largest accepted resource body in bytes (`COURIER_MAX_RESOURCE_BYTES`).
    pub max_resource_bytes: usize,
    /// Largest accepted Binary in bytes (`COURIER_MAX_BINARY_BYTES`, default 10 MB).
    pub max_binary_bytes: usize,
    /// Page size when `_count` is absent (`COURIER_DEFAULT_COUNT`).
    pub default_count: usize,
    /// Largest `_count` honoured (`COURIER_MAX_COUNT`).
    pub max_count: usize,
    /// Database connections in the pool (`COURIER_DB_POOL_SIZE`).
    pub db_pool_size: u32,
    /// SQLite `synchronous` pragma: `FULL` (durable on power loss) or `NORMAL` (`COURIER_SQLITE_SYNCHRONOUS`).
    pub sqlite_synchronous: String,
    /// SQLite: keep up to this many MiB of the database file in memory, for hosts that reclaim
    /// idle file pages (`COURIER_SQLITE_RESIDENT_MB`; 0, the default, = off; see `store::resident`).
    pub sqlite_resident_mb: u64,
    /// HTTP worker threads; 0 = one per core (`COURIER_WORKERS`).
    pub workers: usize,
    /// Log filter, e.g. `info` or `courier=debug` (`COURIER_LOG`).
    pub log: String,
    /// A signed-in user's session ends after this many seconds without activity
    /// (`COURIER_IDLE_TIMEOUT_SECS`, automatic log-off).
    pub idle_timeout_secs: i64,
    /// EHRs from the config file (`[[ehr]]` tables), registered or updated at start; the same as
    /// `courier ehr add`, which needs no file.
    pub ehr: Vec<EhrConfig>,
    /// Longest message text a patient may send, in characters
    /// (`COURIER_PATIENT_MAX_MESSAGE_CHARS`).
    pub patient_max_message_chars: usize,
    /// Shown to patients when they write (`COURIER_EXPECTED_RESPONSE_NOTICE`).
    pub expected_response_notice: String,
    /// The emergency number the web app tells patients to call (`COURIER_EMERGENCY_NUMBER`).
    pub emergency_number: String,
    /// Shared inboxes patients may write to, as `(label, Group/… or CareTeam/…)`
    /// (`COURIER_MESSAGE_POOLS`: `Nurse line=Group/nurse-line;Billing=Group/billing`).
    pub message_pools: Vec<(String, String)>,
    /// Content types a Binary (attachment) may have (`COURIER_ATTACHMENT_TYPES`, comma-separated).
    pub attachment_types: Vec<String>,
    /// Who may frame the web app: the CSP `frame-ancestors` value (`COURIER_FRAME_ANCESTORS`).
    pub frame_ancestors: String,
    /// An unread urgent (urgent/asap/stat) message is re-notified to its recipient every this
    /// many seconds (`COURIER_ESCALATION_RENOTIFY_SECS`).
    pub escalation_renotify_secs: i64,
    /// … and after this many seconds unread, escalated to the backup recipient
    /// (`COURIER_ESCALATION_AFTER_SECS`).
    pub escalation_after_secs: i64,
    /// The backup recipient of escalations, e.g. `PractitionerRole/on-call`
    /// (`COURIER_ESCALATION_BACKUP`; none: reminders only).
    pub escalation_backup: Option<String>,
    /// May outbound calls (rest-hooks, JWKS URLs, EHRs) reach loopback, private and other
    /// non-public addresses (`COURIER_SUBSCRIPTION_PRIVATE_ENDPOINTS`, default false: a subscriber
    /// could otherwise make Courier probe the hospital's internal network)? See `outbound`.
    pub subscription_private_endpoints: bool,
    /// Networks outbound calls may reach although they are not public, e.g. the EHR's
    /// `10.20.0.0/16` (`COURIER_OUTBOUND_ALLOW`, comma-separated CIDRs or addresses; default none).
    pub outbound_allow: Vec<String>,
    /// How long an instance holds a scheduled send it claimed before another may take it over
    /// (`COURIER_SCHEDULER_LEASE_SECS`).
    pub scheduler_lease_secs: i64,
    /// This instance's name, the same across its restarts and different from every other
    /// instance running on the database (`COURIER_INSTANCE_ID`). Empty: `{host name}:{data dir}`.
    /// A restarted instance releases the scheduled sends it had claimed at once.
    pub instance_id: String,
    /// Previous master keys (base64, comma-separated in `COURIER_PREVIOUS_MASTER_KEYS`): they only
    /// unwrap data keys until the background re-wrap has moved them all to the current key.
    pub previous_master_keys: Vec<SecretString>,
    /// Retention classes (`[[retention]]` tables; `COURIER_RETENTION`, see
    /// `compliance::retention::parse_env`). Default: appointment notices 730 days, messages and
    /// attachments 2190 days, the audit trail 2190 days.
    pub retention: Vec<crate::compliance::retention::RetentionClass>,
    /// The purge job runs every this many seconds on one instance; 0: only `courier purge`
    /// (`COURIER_PURGE_INTERVAL_SECS`).
    pub purge_interval_secs: i64,
    /// How long an emergency-access ("break the glass") grant lasts, in minutes
    /// (`COURIER_EMERGENCY_ACCESS_MINUTES`).
    pub emergency_access_minutes: i64,
    /// Requests per minute one client address may make to the unauthenticated endpoints (token,
    /// launch, callback), and bearer checks per minute it may fail, before 429
    /// (`COURIER_RATE_LIMIT_PER_MINUTE`; 0 = no limit). Valid tokens are never limited by it.
    pub rate_limit_per_minute: u32,
    /// Reverse proxies whose `X-Forwarded-For` is believed (`COURIER_TRUSTED_PROXIES`, IP
    /// addresses, comma-separated). Empty, the default: the client is the TCP peer, header ignored.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Failed authentications from one address are audited as one AuditEvent, with a count, per
    /// this many seconds (`COURIER_AUTH_FAILURE_AUDIT_WINDOW_SECS`; 0 = one event per failure).
    pub auth_failure_audit_window_secs: u64,
    /// A static bearer token for `GET /metrics` (`COURIER_METRICS_TOKEN`, for a scraper); a system
    /// client's access token is accepted too. Unset: an access token only.
    pub metrics_token: Option<SecretString>,
    /// The SMTP server for email notices (`COURIER_SMTP_URL`: `smtp://host:25` plain,
    /// `smtp://user:pass@host:587?tls=required` STARTTLS, `smtps://host:465` TLS). Unset: no email.
    pub smtp_url: Option<SecretString>,
    /// The sender of notices (`COURIER_NOTIFY_FROM`, e.g. `Clinic <no-reply@clinic.example>`).
    pub notify_from: String,
    /// The envelope sender of email notices, where later bounces (DSNs) go
    /// (`COURIER_NOTIFY_BOUNCE_TO`; pipe that mailbox to `courier notify bounce`). Unset: the
    /// From address.
    pub notify_bounce_to: Option<String>,
    /// A new message not read in the app within this many seconds is notified by email
    /// (`COURIER_NOTIFY_AFTER_SECS`).
    pub notify_after_secs: i64,
    /// How long an instance holds the notices it is sending (`COURIER_NOTIFY_LEASE_SECS`, default
    /// 300): a notice still `sending` after that (its instance died mid-send) becomes `uncertain`
    /// and is never sent again. Longer than a batch's sends can take (8 at a time, 20 s each).
    pub notify_lease_secs: i64,
    /// The clinic's name in notices (`COURIER_CLINIC_NAME`).
    pub clinic_name: String,
    /// Urgent messages to clinicians are notified during their quiet hours too
    /// (`COURIER_NOTIFY_URGENT_BREAKS_QUIET`, default true).
    pub notify_urgent_breaks_quiet: bool,
    /// An SMS provider with the Twilio Messages API shape (`COURIER_SMS_URL`, e.g.
    /// `https://api.twilio.com`; `COURIER_SMS_ACCOUNT`, `COURIER_SMS_TOKEN`, `COURIER_SMS_FROM`
    /// an E.164 number). Unset: no SMS.
    pub sms_url: Option<String>,
    pub sms_account: String,
    pub sms_token: Option<SecretString>,
    pub sms_from: String,
    /// Web push to the app's browsers (`COURIER_WEB_PUSH`, default true): the app offers it,
    /// and notices go to the push services the browsers name (they must be reachable).
    pub web_push: bool,
    /// The contact in every VAPID token (`COURIER_VAPID_SUBJECT`, a `mailto:` or `https:` URI,
    /// RFC 8292 §2.1). Unset: the base URL when it is https, else the notices' sender address.
    pub vapid_subject: Option<String>,
    /// The push services browsers' subscriptions may name (`COURIER_PUSH_HOSTS`, comma-separated
    /// host names, `*.domain` for any under it): Chrome's, Firefox's, Safari's and Edge's by
    /// default. Anything else a person posts is refused (no requests into other networks).
    pub push_hosts: Vec<String>,
    /// Bodies compressed before they are sealed (`COURIER_STORE_COMPRESS`, default true; false
    /// only to measure what it saves: rows of both kinds stay readable).
    pub store_compress: bool,
    /// The language of notices to a person whose language is not known
    /// (`COURIER_NOTIFY_LANGUAGE`, a BCP 47 tag; default `en`).
    pub notify_language: String,
    /// Wording of notices per language, over the built-in English and Spanish (config file only:
    /// `[notify_templates.fr]` tables, keys as in `src/notify/templates.toml`).
    pub notify_templates: crate::notify::templates::Texts,
}

/// An `[[ehr]]` table of the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EhrConfig {
    pub name: String,
    pub iss: String,
    pub client_id: String,
    #[serde(default = "default_alg")]
    pub alg: String,
    #[serde(default = "default_launch_scope")]
    pub launch_scope: String,
    #[serde(default = "default_backend_scope")]
    pub backend_scope: String,
    #[serde(default = "default_trusted_systems")]
    pub trusted_systems: String,
    /// Multi-factor policy for EHR launches: off | trust-ehr | always (unset: kept as it is;
    /// trust-ehr for a new EHR).
    #[serde(default)]
    pub mfa: Option<String>,
    /// … and for the portal's standalone launches.
    #[serde(default)]
    pub portal_mfa: Option<String>,
    /// `acr` values of the EHR's id_token that show a second factor (space-separated).
    #[serde(default)]
    pub mfa_acr: Option<String>,
    /// The backend-services token endpoint, when the EHR's is not the discovered one.
    #[serde(default)]
    pub backend_token_url: Option<String>,
    /// The FHIR base that takes Courier's AuditEvents, when not `iss`.
    #[serde(default)]
    pub audit_base: Option<String>,
}

fn default_alg() -> String {
    "ES384".into()
}
/// Parses `COURIER_MESSAGE_POOLS`: `label=Group/id` (or `CareTeam/id`) entries separated by `;`.
pub fn parse_pools(text: &str) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = vec![];
    for entry in text.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (label, reference) = entry.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("COURIER_MESSAGE_POOLS: '{entry}' is not label=Group/id")
        })?;
        let (label, reference) = (label.trim(), reference.trim());
        let valid = reference.split_once('/').is_some_and(|(t, id)| {
            matches!(t, "Group" | "CareTeam") && fhir_codec::is_valid_id(id)
        });
        if label.is_empty() || label.chars().count() > 80 || !valid {
            anyhow::bail!(
                "COURIER_MESSAGE_POOLS: '{entry}' needs a label (≤ 80 characters) and a Group/id or CareTeam/id"
            );
        }
        out.push((label.to_string(), reference.to_string()));
    }
    Ok(out)
}

pub fn default_launch_scope() -> String {
    "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r user/RelatedPerson.r user/CareTeam.rs patient/CareTeam.rs".into()
}
pub fn default_backend_scope() -> String {
    "system/AuditEvent.c system/Communication.c".into()
}
pub fn default_trusted_systems() -> String {
    "http://hl7.org/fhir/sid/us-npi".into()
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".into(),
            base_url: String::new(),
            data_dir: PathBuf::from("data"),
            database_url: String::new(),
            master_key: None,
            master_key_file: None,
            max_resource_bytes: 1024 * 1024,
            max_binary_bytes: 10 * 1024 * 1024,
            default_count: 50,
            max_count: 1000,
            db_pool_size: 8,
            sqlite_synchronous: "FULL".into(),
            sqlite_resident_mb: 0,
            workers: 0,
            log: "info".into(),
            idle_timeout_secs: 900,
            ehr: vec![],
            patient_max_message_chars: 2000,
            expected_response_notice: "Your care team usually replies within 2 business days."
                .into(),
            emergency_number: "911".into(),
            message_pools: vec![],
            attachment_types: [
                "image/jpeg",
                "image/png",
                "image/gif",
                "image/webp",
                "image/heic",
                "application/pdf",
                "text/plain",
            ]
            .map(String::from)
            .to_vec(),
            frame_ancestors: "*".into(),
            escalation_renotify_secs: 900,
            escalation_after_secs: 3600,
            escalation_backup: None,
            subscription_private_endpoints: false,
            outbound_allow: vec![],
            scheduler_lease_secs: 30,
            instance_id: String::new(),
            previous_master_keys: vec![],
            retention: crate::compliance::retention::defaults(),
            purge_interval_secs: 3600,
            emergency_access_minutes: 60,
            rate_limit_per_minute: 120,
            trusted_proxies: vec![],
            auth_failure_audit_window_secs: 60,
            metrics_token: None,
            smtp_url: None,
            notify_from: "Courier <no-reply@localhost>".into(),
            notify_after_secs: 900,
            notify_lease_secs: 300,
            notify_bounce_to: None,
            clinic_name: "your care team".into(),
            notify_urgent_breaks_quiet: true,
            sms_url: None,
            sms_account: String::new(),
            sms_token: None,
            sms_from: String::new(),
            web_push: true,
            vapid_subject: None,
            store_compress: true,
            push_hosts: [
                "fcm.googleapis.com",
                "updates.push.services.mozilla.com",
                "web.push.apple.com",
                "*.push.apple.com",
                "*.notify.windows.com",
            ]
            .map(String::from)
            .to_vec(),
            notify_language: "en".into(),
            notify_templates: Default::default(),
        }
    }
}

impl Settings {
    /// Defaults, then the config file (if any), then the environment.
    pub fn load(config_file: Option<&Path>) -> anyhow::Result<Settings> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let file = config_file
            .map(Path::to_path_buf)
            .or_else(|| env("COURIER_CONFIG").map(PathBuf::from));
        let mut s = match file {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    anyhow::anyhow!("cannot read config file {}: {e}", path.display())
                })?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))?
            }
            None => Settings::default(),
        };
        s.apply_env(env)?;
        s.resolve();
        Ok(s)
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<()> {
        fn num<T: std::str::FromStr>(k: &str, v: String) -> anyhow::Result<T> {
            v.parse()
                .map_err(|_| anyhow::anyhow!("{k} must be a number, got '{v}'"))
        }
        if let Some(v) = env("COURIER_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = env("COURIER_BASE_URL") {
            self.base_url = v;
        }
        if let Some(v) = env("COURIER_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = env("COURIER_DATABASE_URL") {
            self.database_url = v;
        }
        if let Some(v) = env("COURIER_MASTER_KEY") {
            self.master_key = Some(v.into());
        }
        if let Some(v) = env("COURIER_PREVIOUS_MASTER_KEYS") {
            self.previous_master_keys = v
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(|k| SecretString::from(k.to_string()))
                .collect();
        }
        if let Some(v) = env("COURIER_RETENTION") {
            self.retention = crate::compliance::retention::parse_env(&v)?;
        }
        if let Some(v) = env("COURIER_EMERGENCY_ACCESS_MINUTES") {
            self.emergency_access_minutes = num("COURIER_EMERGENCY_ACCESS_MINUTES", v)?;
        }
        if let Some(v) = env("COURIER_PURGE_INTERVAL_SECS") {
            self.purge_interval_secs = num("COURIER_PURGE_INTERVAL_SECS", v)?;
        }
        if let Some(v) = env("COURIER_MASTER_KEY_FILE") {
            self.master_key_file = Some(v.into());
        }
        if let Some(v) = env("COURIER_MAX_RESOURCE_BYTES") {
            self.max_resource_bytes = num("COURIER_MAX_RESOURCE_BYTES", v)?;
        }
        if let Some(v) = env("COURIER_MAX_BINARY_BYTES") {
            self.max_binary_bytes = num("COURIER_MAX_BINARY_BYTES", v)?;
        }
        if let Some(v) = env("COURIER_DEFAULT_COUNT") {
            self.default_count = num("COURIER_DEFAULT_COUNT", v)?;
        }
        if let Some(v) = env("COURIER_MAX_COUNT") {
            self.max_count = num("COURIER_MAX_COUNT", v)?;
        }
        if let Some(v) = env("COURIER_DB_POOL_SIZE") {
            self.db_pool_size = num("COURIER_DB_POOL_SIZE", v)?;
        }
        if let Some(v) = env("COURIER_SQLITE_SYNCHRONOUS") {
            self.sqlite_synchronous = v;
        }
        if let Some(v) = env("COURIER_SQLITE_RESIDENT_MB") {
            self.sqlite_resident_mb = num("COURIER_SQLITE_RESIDENT_MB", v)?;
        }
        if let Some(v) = env("COURIER_WORKERS") {
            self.workers = num("COURIER_WORKERS", v)?;
        }
        if let Some(v) = env("COURIER_IDLE_TIMEOUT_SECS") {
            self.idle_timeout_secs = num("COURIER_IDLE_TIMEOUT_SECS", v)?;
        }
        if let Some(v) = env("COURIER_PATIENT_MAX_MESSAGE_CHARS") {
            self.patient_max_message_chars = num("COURIER_PATIENT_MAX_MESSAGE_CHARS", v)?;
        }
        if let Some(v) = env("COURIER_EXPECTED_RESPONSE_NOTICE") {
            self.expected_response_notice = v;
        }
        if let Some(v) = env("COURIER_EMERGENCY_NUMBER") {
            if v.trim().is_empty() || v.len() > 20 {
                anyhow::bail!(
                    "COURIER_EMERGENCY_NUMBER must be a short number such as 911 or 112, got '{v}'"
                );
            }
            self.emergency_number = v.trim().to_string();
        }
        if let Some(v) = env("COURIER_MESSAGE_POOLS") {
            self.message_pools = parse_pools(&v)?;
        }
        if let Some(v) = env("COURIER_ATTACHMENT_TYPES") {
            self.attachment_types = v
                .split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect();
        }
        if let Some(v) = env("COURIER_FRAME_ANCESTORS") {
            self.frame_ancestors = v;
        }
        if let Some(v) = env("COURIER_ESCALATION_RENOTIFY_SECS") {
            self.escalation_renotify_secs = num("COURIER_ESCALATION_RENOTIFY_SECS", v)?;
        }
        if let Some(v) = env("COURIER_SMTP_URL") {
            anyhow::ensure!(
                v.starts_with("smtp://") || v.starts_with("smtps://"),
                "COURIER_SMTP_URL must be smtp://… or smtps://…"
            );
            self.smtp_url = Some(SecretString::from(v));
        }
        if let Some(v) = env("COURIER_NOTIFY_FROM") {
            anyhow::ensure!(
                v.parse::<lettre::message::Mailbox>().is_ok(),
                "COURIER_NOTIFY_FROM must be an address such as 'Clinic <no-reply@clinic.example>', got '{v}'"
            );
            self.notify_from = v;
        }
        if let Some(v) = env("COURIER_NOTIFY_BOUNCE_TO") {
            anyhow::ensure!(
                v.parse::<lettre::Address>().is_ok(),
                "COURIER_NOTIFY_BOUNCE_TO must be an address such as bounces@clinic.example, got '{v}'"
            );
            self.notify_bounce_to = Some(v);
        }
        if let Some(v) = env("COURIER_NOTIFY_LEASE_SECS") {
            self.notify_lease_secs = num("COURIER_NOTIFY_LEASE_SECS", v)?;
            anyhow::ensure!(
                self.notify_lease_secs >= 2,
                "COURIER_NOTIFY_LEASE_SECS must be at least 2"
            );
        }
        if let Some(v) = env("COURIER_NOTIFY_AFTER_SECS") {
            self.notify_after_secs = num("COURIER_NOTIFY_AFTER_SECS", v)?;
        }
        if let Some(v) = env("COURIER_SMS_URL") {
            let u = url::Url::parse(&v).map_err(|e| anyhow::anyhow!("COURIER_SMS_URL: {e}"))?;
            anyhow::ensure!(
                matches!(u.scheme(), "https" | "http"),
                "COURIER_SMS_URL must be an http(s) URL"
            );
            self.sms_url = Some(v.trim_end_matches('/').to_string());
        }
        if let Some(v) = env("COURIER_SMS_ACCOUNT") {
            self.sms_account = v;
        }
        if let Some(v) = env("COURIER_SMS_TOKEN") {
            self.sms_token = Some(SecretString::from(v));
        }
        if let Some(v) = env("COURIER_SMS_FROM") {
            anyhow::ensure!(
                crate::notify::e164(&v).is_some(),
                "COURIER_SMS_FROM must be an E.164 number such as +15551234567"
            );
            self.sms_from = v;
        }
        if let Some(v) = env("COURIER_NOTIFY_URGENT_BREAKS_QUIET") {
            self.notify_urgent_breaks_quiet = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => anyhow::bail!(
                    "COURIER_NOTIFY_URGENT_BREAKS_QUIET must be true or false, got '{v}'"
                ),
            };
        }
        if let Some(v) = env("COURIER_WEB_PUSH") {
            self.web_push = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => anyhow::bail!("COURIER_WEB_PUSH must be true or false, got '{v}'"),
            };
        }
        if let Some(v) = env("COURIER_STORE_COMPRESS") {
            self.store_compress = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => anyhow::bail!("COURIER_STORE_COMPRESS must be true or false, got '{v}'"),
            };
        }
        if let Some(v) = env("COURIER_PUSH_HOSTS") {
            self.push_hosts = v
                .split(',')
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .collect();
        }
        if let Some(v) = env("COURIER_VAPID_SUBJECT") {
            anyhow::ensure!(
                (v.starts_with("mailto:") && v.contains('@')) || v.starts_with("https://"),
                "COURIER_VAPID_SUBJECT must be a mailto: or https: URI (RFC 8292), got '{v}'"
            );
            self.vapid_subject = Some(v);
        }
        if let Some(v) = env("COURIER_NOTIFY_LANGUAGE") {
            anyhow::ensure!(
                crate::notify::templates::normalize(&v).is_some(),
                "COURIER_NOTIFY_LANGUAGE must be a language tag such as 'en' or 'es', got '{v}'"
            );
            self.notify_language = v;
        }
        crate::notify::templates::validate(&self.notify_templates).map_err(anyhow::Error::msg)?;
        if let Some(v) = env("COURIER_CLINIC_NAME") {
            anyhow::ensure!(
                v.len() <= 100 && !v.chars().any(|c| c.is_control()),
                "COURIER_CLINIC_NAME must be a short name"
            );
            self.clinic_name = v;
        }
        if let Some(v) = env("COURIER_ESCALATION_AFTER_SECS") {
            self.escalation_after_secs = num("COURIER_ESCALATION_AFTER_SECS", v)?;
        }
        if let Some(v) = env("COURIER_ESCALATION_BACKUP") {
            self.escalation_backup = Some(v);
        }
        if let Some(v) = env("COURIER_SUBSCRIPTION_PRIVATE_ENDPOINTS") {
            self.subscription_private_endpoints = matches!(v.as_str(), "true" | "1" | "yes");
        }
        if let Some(v) = env("COURIER_OUTBOUND_ALLOW") {
            self.outbound_allow = v
                .split(',')
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect();
        }
        if let Some(v) = env("COURIER_SCHEDULER_LEASE_SECS") {
            self.scheduler_lease_secs = num("COURIER_SCHEDULER_LEASE_SECS", v)?;
        }
        if let Some(v) = env("COURIER_INSTANCE_ID") {
            self.instance_id = v;
        }
        if let Some(v) = env("COURIER_RATE_LIMIT_PER_MINUTE") {
            self.rate_limit_per_minute = num("COURIER_RATE_LIMIT_PER_MINUTE", v)?;
        }
        if let Some(v) = env("COURIER_TRUSTED_PROXIES") {
            self.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(|a| {
                    a.parse().map_err(|_| {
                        anyhow::anyhow!("COURIER_TRUSTED_PROXIES must list IP addresses, got '{a}'")
                    })
                })
                .collect::<anyhow::Result<_>>()?;
        }
        if let Some(v) = env("COURIER_AUTH_FAILURE_AUDIT_WINDOW_SECS") {
            self.auth_failure_audit_window_secs = num("COURIER_AUTH_FAILURE_AUDIT_WINDOW_SECS", v)?;
        }
        if let Some(v) = env("COURIER_METRICS_TOKEN") {
            self.metrics_token = Some(v.into());
        }
        if let Some(v) = env("COURIER_LOG") {
            self.log = v;
        }
        Ok(())
    }

    /// Fills the values that default to something derived from others.
    fn resolve(&mut self) {
        if self.database_url.is_empty() {
            self.database_url = format!("sqlite://{}", self.data_dir.join("courier.db").display());
        }
        if self.base_url.is_empty() {
            self.base_url = format!("http://{}", self.listen);
        }
        while self.base_url.ends_with('/') {
            self.base_url.pop();
        }
        self.sqlite_synchronous = self.sqlite_synchronous.to_ascii_uppercase();
        self.default_count = self.default_count.clamp(1, self.max_count.max(1));
    }

    pub fn is_postgres(&self) -> bool {
        self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
    }

    /// This instance's id: configured, or `{host name}:{data dir}` (the data directory made
    /// absolute), which a restart of the same instance keeps.
    pub fn instance_id(&self) -> String {
        if !self.instance_id.is_empty() {
            return self.instance_id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let dir = std::fs::canonicalize(&self.data_dir).unwrap_or_else(|_| self.data_dir.clone());
        format!("{host}:{}", dir.display())
    }

    /// The master key file: configured, or `{data_dir}/master.key`.
    pub fn key_file(&self) -> PathBuf {
        self.master_key_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("master.key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_which_overrides_defaults() {
        let mut s: Settings =
            toml::from_str("listen = \"0.0.0.0:9000\"\nmax_count = 200\ndefault_count = 20")
                .unwrap();
        let env = |k: &str| match k {
            "COURIER_LISTEN" => Some("127.0.0.1:7000".to_string()),
            _ => None,
        };
        s.apply_env(env).unwrap();
        s.resolve();
        assert_eq!(s.listen, "127.0.0.1:7000"); // env wins over file
        assert_eq!(s.max_count, 200); // file wins over default
        assert_eq!(s.max_binary_bytes, 10 * 1024 * 1024); // default
        assert_eq!(s.base_url, "http://127.0.0.1:7000");
        assert!(s.database_url.starts_with("sqlite://") && s.database_url.ends_with("courier.db"));
        assert!(!s.is_postgres());
    }

    #[test]
    fn bad_values_and_unknown_keys_are_errors() {
        let mut s = Settings::default();
        assert!(s
            .apply_env(|k: &str| (k == "COURIER_MAX_COUNT").then(|| "many".to_string()))
            .is_err());
        assert!(toml::from_str::<Settings>("listne = \"x\"").is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Settings {
            master_key: Some("c2VjcmV0LWtleS1tYXRlcmlhbA==".to_string().into()),
            ..Settings::default()
        };
        assert!(!format!("{s:?}").contains("c2VjcmV0"));
    }
}
