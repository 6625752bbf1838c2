//! Reaching people outside the app (issue 23, first part): "you have a new secure message" by
//! email, with no PHI.
//!
//! - **Decided with the message.** A new message (a Communication created `completed` or
//!   `in-progress`) gets one `notices` row per person it is addressed to (Patient, Practitioner,
//!   RelatedPerson; not its sender), in the message's own transaction ([`on_written`]). So a
//!   notice can be neither lost (the message is there, so is its notice) nor made for a message
//!   that was not.
//! - **Sent when due, only if still unread.** A worker on every instance claims due rows with a
//!   lease ([`run`]); a notice is due `COURIER_NOTIFY_AFTER_SECS` after its message, and is
//!   skipped if the person has read the message in the app meanwhile, has opted out, or has no
//!   email address.
//! - **No PHI, ever.** The email names neither the patient nor the sender, carries no message
//!   text or subject, only the clinic's name and a link to sign in ([`render`]). Contact points
//!   come from the EHR's record (`telecom` with `system` email) at each launch, sealed.
//! - **Once.** A claimed row is `sending` under a lease; a success is `sent`; an SMTP 4xx or a
//!   network failure is retried with backoff (1 s … 5 min, 10 tries, then `parked`); a 5xx is
//!   `parked` at once with its reason. A row whose lease ran out while `sending` (the instance died
//!   mid-send: whether the server took it is unknown) becomes `uncertain` and is never sent again:
//!   never twice, and counted for the operator (`courier notify status`).
//! - **Unsubscribe.** Every email carries `List-Unsubscribe` (one click, RFC 8058) to
//!   `/notify/unsubscribe?t=…`, a random token per person.
//! - Each sent notice is audited (who was told, about which message reference; no address).

use crate::config::Settings;
use crate::store::db::{Bind, Conn};
use crate::store::{Store, StoreError};
use actix_web::http::header;
use actix_web::{web, HttpResponse};
use diesel::sql_types::{BigInt, Binary, Nullable, Text};
use diesel::QueryableByName;
use secrecy::ExposeSecret;
use serde_json::{json, Value};

pub mod bounce;
pub mod push;
pub mod templates;

/// The code system of notice AuditEvent subtypes.
pub const NOTICE_SYSTEM: &str = "https://courier.example.org/fhir/CodeSystem/notice";
const PARTICIPATION_MODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationMode";
const MAX_ATTEMPTS: i64 = 10;
const BATCH: i64 = 50;

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

fn person_ref(v: &Value) -> Option<String> {
    let r = v["reference"].as_str()?;
    ["Patient/", "Practitioner/", "RelatedPerson/"]
        .iter()
        .any(|p| r.starts_with(p))
        .then(|| r.to_string())
}

/// A person's notices a message calls for: made by [`flush`] once the person's channels are known.
pub struct Want {
    person: String,
    kind: &'static str,
    about: String,
    urgent: bool,
    /// A reminder goes only through the channels its message names.
    only: Option<Vec<&'static str>>,
    at: i64,
}

/// In the transaction that writes a message: one notice per person it is addressed to (a Group or
/// CareTeam's row now; each person's, once their channels are looked up, in [`flush`]).
pub fn on_written<C: Conn>(
    c: &mut C,
    id: &str,
    body: &[u8],
    wants: &mut Vec<Want>,
) -> Result<(), StoreError> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Ok(());
    };
    if !matches!(v["status"].as_str(), Some("completed" | "in-progress")) {
        return Ok(());
    }
    let sender = person_ref(&v["sender"]);
    let mut people: Vec<String> = v["recipient"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(person_ref)
        .filter(|r| Some(r) != sender.as_ref())
        .collect();
    people.sort();
    people.dedup();
    // A Group or CareTeam recipient: one row now, expanded to its members (who may change) by the
    // worker, which knows the store's index of memberships.
    let mut groups: Vec<String> = v["recipient"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["reference"].as_str())
        .filter(|r| r.starts_with("Group/") || r.starts_with("CareTeam/"))
        .map(String::from)
        .collect();
    groups.sort();
    groups.dedup();
    let urgent = matches!(v["priority"].as_str(), Some("urgent" | "asap" | "stat"));
    // A scheduled reminder or dose (sent from a CommunicationRequest) whose `medium` names email
    // or SMS (v3-ParticipationMode EMAILWRIT, SMSWRIT) or web push (Courier's notice system, code
    // `push`) goes through that channel at once, as well
    // as into the app; any other message is notified only if it stays unread.
    let scheduled = v["basedOn"].as_array().is_some_and(|b| {
        b.iter().any(|r| {
            r["reference"]
                .as_str()
                .is_some_and(|x| x.starts_with("CommunicationRequest/"))
        })
    });
    let media: Vec<&str> = v["medium"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["coding"].as_array().into_iter().flatten())
        .filter_map(|c| match (c["system"].as_str(), c["code"].as_str()) {
            (Some(PARTICIPATION_MODE), Some("EMAILWRIT")) => Some("email"),
            (Some(PARTICIPATION_MODE), Some("SMSWRIT")) => Some("sms"),
            // v3-ParticipationMode has no code for web push: Courier's own.
            (Some(NOTICE_SYSTEM), Some("push")) => Some("push"),
            _ => None,
        })
        .collect();
    let reminder = scheduled && !media.is_empty();
    let t = now();
    for group in groups {
        c.execute(
            "INSERT INTO notices (id, person, kind, about, state, urgent, next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?)",
            vec![
                uuid::Uuid::new_v4().to_string().into(),
                group.into(),
                (if reminder { "reminder" } else { "new-message" }).into(),
                format!("Communication/{id}").into(),
                i64::from(urgent).into(),
                t.into(),
                t.into(),
            ],
        )?;
    }
    let only = reminder.then(|| media.clone());
    for person in people {
        wants.push(Want {
            person,
            kind: if reminder { "reminder" } else { "new-message" },
            about: format!("Communication/{id}"),
            urgent,
            only: only.clone(),
            at: t,
        });
    }
    Ok(())
}

/// The notices of a transaction's messages ([`on_written`]): every person's channels in one
/// query, the notices in one INSERT (a query per recipient and an INSERT per notice were one in
/// every eleven statements of a PostgreSQL create).
pub fn flush<C: Conn>(c: &mut C, wants: Vec<Want>) -> Result<(), StoreError> {
    if wants.is_empty() {
        return Ok(());
    }
    let mut people: Vec<&str> = wants.iter().map(|w| w.person.as_str()).collect();
    people.sort_unstable();
    people.dedup();
    let mut rows = Vec::new();
    for chunk in people.chunks(REACH_CHUNK) {
        let (sql, binds) = reach_query(chunk);
        rows.extend(c.load_cached::<ReachRow>(&sql, binds)?);
    }
    let mut binds = Vec::new();
    for w in &wants {
        for ch in channels(&rows, &w.person, w.kind) {
            if w.only.as_ref().is_some_and(|only| !only.contains(&ch)) {
                continue;
            }
            binds.extend([
                uuid::Uuid::new_v4().to_string().into(),
                w.person.clone().into(),
                w.kind.into(),
                w.about.clone().into(),
                ch.to_string().into(),
                i64::from(w.urgent).into(),
                w.at.into(),
                w.at.into(),
            ]);
        }
    }
    crate::store::multi_insert_rows(
        c,
        "INSERT INTO",
        "notices (id, person, kind, about, state, channel, urgent, next_attempt_at, created_at)",
        "(?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
        8,
        binds,
    )
}

/// People looked up by one [`reach_query`], at most.
const REACH_CHUNK: usize = 128;

/// How each of `people` can be reached: their verified contacts and push subscriptions, with what
/// they turned off ([`channels`] reads it). The list is padded (its last person repeated) to a
/// power of two, so the statement has one of eight shapes, each prepared once per connection.
fn reach_query(people: &[&str]) -> (String, Vec<Bind>) {
    let n = people.len().next_power_of_two();
    let padded: Vec<&str> = (0..n).map(|i| people[i.min(people.len() - 1)]).collect();
    let marks = vec!["?"; n].join(", ");
    let sql = format!(
        "SELECT k.person AS person, k.kind AS kind, COALESCE(p.email_off, 0) AS email_off, \
         COALESCE(p.sms_off, 0) AS sms_off, COALESCE(p.kinds_off, '') AS kinds_off \
         FROM (SELECT person, kind FROM notify_contacts WHERE person IN ({marks}) \
         AND verified_at IS NOT NULL AND bounced_at IS NULL \
         UNION SELECT DISTINCT person, 'push' AS kind FROM notify_push WHERE person IN ({marks})) k \
         LEFT JOIN notify_prefs p ON p.person = k.person ORDER BY k.person, k.kind"
    );
    let mut binds: Vec<Bind> = padded.iter().map(|p| (*p).into()).collect();
    binds.extend(padded.iter().map(|p| Bind::from(*p)));
    (sql, binds)
}

#[derive(QueryableByName)]
struct ReachRow {
    #[diesel(sql_type = Text)]
    person: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = BigInt)]
    email_off: i64,
    #[diesel(sql_type = BigInt)]
    sms_off: i64,
    #[diesel(sql_type = Text)]
    kinds_off: String,
}

/// The channels (`email`, `push`, `sms`: by name) by which `person` takes notices of `kind`: a
/// verified contact, the channel not turned off, the kind not turned off.
fn channels<'a>(rows: &'a [ReachRow], person: &str, kind: &str) -> Vec<&'a str> {
    let word = format!(" {kind} ");
    rows.iter()
        .filter(|r| r.person == person)
        .filter(|r| !(r.kind == "email" && r.email_off > 0))
        .filter(|r| !(r.kind == "sms" && r.sms_off > 0))
        .filter(|r| !format!(" {} ", r.kinds_off).contains(&word))
        .map(|r| r.kind.as_str())
        .collect()
}

/// A phone number in E.164 form (`+` and 8 to 15 digits), spaces, dashes and brackets removed.
pub fn e164(v: &str) -> Option<String> {
    let v = v.trim().trim_start_matches("tel:");
    let digits: String = v.chars().filter(|c| c.is_ascii_digit()).collect();
    let ok = v.starts_with('+')
        && v.chars()
            .all(|c| c.is_ascii_digit() || " +-().".contains(c))
        && (8..=15).contains(&digits.len());
    ok.then(|| format!("+{digits}"))
}

/// The mobile number an EHR record gives (`telecom` `sms`, or `phone` with `use` mobile).
pub fn mobile_of(resource: &Value) -> Option<String> {
    let t = chrono::Utc::now().to_rfc3339();
    resource["telecom"]
        .as_array()?
        .iter()
        .filter(|c| c["system"] == "sms" || (c["system"] == "phone" && c["use"] == "mobile"))
        .filter(|c| c["use"] != "old")
        .filter(|c| {
            c["period"]["end"]
                .as_str()
                .is_none_or(|end| end > t.as_str())
        })
        .filter_map(|c| c["value"].as_str())
        .find_map(e164)
}

/// In the transaction that escalates an unread urgent message to the backup (the on-call
/// clinician, `COURIER_ESCALATION_BACKUP`): a notice to the backup's phone (and email) at once,
/// through quiet hours. One per escalation and channel, however often the request is updated.
pub fn on_escalation<C: Conn>(c: &mut C, id: &str, body: &[u8]) -> Result<(), StoreError> {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Ok(());
    };
    let escalation = v["category"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["coding"].as_array().into_iter().flatten())
        .any(|c| {
            c["system"] == crate::messaging::escalation::CATEGORY_SYSTEM
                && c["code"] == "unread-urgent"
        });
    if !escalation || v["status"] != "active" {
        return Ok(());
    }
    let backup = v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"] == crate::messaging::escalation::EXTENSION)
        .flat_map(|e| e["extension"].as_array().into_iter().flatten())
        .find(|e| e["url"] == "escalatedTo")
        .and_then(|e| person_ref(&e["valueReference"]));
    let Some(backup) = backup else {
        return Ok(());
    };
    let (sql, binds) = reach_query(&[&backup]);
    let rows: Vec<ReachRow> = c.load_cached(&sql, binds)?;
    let t = now();
    for ch in channels(&rows, &backup, "escalation") {
        c.execute(
            "INSERT INTO notices (id, person, kind, about, state, channel, urgent, next_attempt_at, created_at) VALUES (?, ?, 'escalation', ?, 'pending', ?, 1, ?, ?) ON CONFLICT (id) DO NOTHING",
            vec![
                format!("escalation-{id}-{}", ch).into(),
                backup.clone().into(),
                format!("CommunicationRequest/{id}").into(),
                ch.into(),
                t.into(),
                t.into(),
            ],
        )?;
    }
    Ok(())
}

fn contact_aad(person: &str, kind: &str) -> String {
    format!("notify-contact/{person}/{kind}")
}

/// The email address an EHR record gives (`telecom`, `system` email, not old or ended).
pub fn email_of(resource: &Value) -> Option<String> {
    let t = chrono::Utc::now().to_rfc3339();
    resource["telecom"]
        .as_array()?
        .iter()
        .filter(|c| c["system"] == "email" && c["use"] != "old")
        .filter(|c| {
            c["period"]["end"]
                .as_str()
                .is_none_or(|end| end > t.as_str())
        })
        .filter_map(|c| c["value"].as_str())
        .map(|v| v.trim().trim_start_matches("mailto:").to_string())
        .find(|v| v.parse::<lettre::Address>().is_ok())
}

/// Keeps (or refreshes) a person's email address and mobile number from their EHR record, sealed.
pub fn remember_contacts(store: &Store, person: &str, resource: &Value) -> Result<(), StoreError> {
    for (kind, value) in [("email", email_of(resource)), ("sms", mobile_of(resource))] {
        let Some(value) = value else {
            continue;
        };
        let (key_id, sealed) = store
            .keys
            .seal(value.as_bytes(), &contact_aad(person, kind));
        let t = now();
        store.execute(
            "INSERT INTO notify_contacts (person, kind, key_id, sealed, source, verified_at, updated_at) VALUES (?, ?, ?, ?, 'ehr', ?, ?) \
             ON CONFLICT (person, kind) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed, source = excluded.source, verified_at = excluded.verified_at, updated_at = excluded.updated_at \
             WHERE notify_contacts.source = 'ehr'",
            vec![person.into(), kind.into(), key_id.into(), Bind::Blob(sealed), t.into(), t.into()],
        )?;
    }
    // The record's preferred language, unless the person chose one in the app.
    if let Some(lang) = language_of(resource) {
        prefs(store, person)?;
        store.execute(
            "UPDATE notify_prefs SET language = ? WHERE person = ? AND language_chosen = 0",
            vec![lang.into(), person.into()],
        )?;
    }
    Ok(())
}

/// The language an EHR record prefers: `Patient.communication` (the one marked `preferred`, else
/// the first), or `Practitioner.communication` (R4: a list of CodeableConcepts); a BCP 47 code's
/// primary subtag.
pub fn language_of(resource: &Value) -> Option<String> {
    let list = resource["communication"].as_array()?;
    let concept = |c: &Value| -> Option<String> {
        let concept = if c["language"].is_object() {
            &c["language"]
        } else {
            c
        };
        concept["coding"]
            .as_array()?
            .iter()
            .filter_map(|k| k["code"].as_str())
            .find_map(templates::normalize)
    };
    list.iter()
        .find(|c| c["preferred"] == true)
        .and_then(concept)
        .or_else(|| list.iter().find_map(concept))
}

#[derive(QueryableByName)]
struct ContactRow {
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    sealed: Vec<u8>,
}

fn contact(store: &Store, person: &str, kind: &str) -> Result<Option<String>, StoreError> {
    read_contact(store, person, kind, true)
}

/// A person's contact point, unsealed: only a verified one when `verified_only` (what is sent
/// to), or either (what their export shows).
fn read_contact(
    store: &Store,
    person: &str,
    kind: &str,
    verified_only: bool,
) -> Result<Option<String>, StoreError> {
    let Some(r) = store
        .query::<ContactRow>(
            "SELECT key_id, sealed FROM notify_contacts WHERE person = ? AND kind = ? AND (verified_at IS NOT NULL OR ? = 0)",
            vec![person.into(), kind.into(), i64::from(verified_only).into()],
        )?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let plain = store.open_sealed(&r.key_id, &r.sealed, &contact_aad(person, kind))?;
    Ok(String::from_utf8(plain).ok())
}

/// Whether email to the person's address bounced (a DSN) since they last set it.
fn bounced(store: &Store, person: &str) -> Result<bool, StoreError> {
    Ok(store
        .query::<Read>(
            "SELECT COUNT(*) AS n FROM notify_contacts WHERE person = ? AND kind = 'email' AND bounced_at IS NOT NULL",
            vec![person.into()],
        )?
        .first()
        .is_some_and(|r| r.n > 0))
}

#[derive(QueryableByName)]
struct PrefRow {
    #[diesel(sql_type = BigInt)]
    email_off: i64,
    #[diesel(sql_type = BigInt)]
    sms_off: i64,
    #[diesel(sql_type = Text)]
    unsubscribe: String,
    #[diesel(sql_type = Nullable<Text>)]
    quiet_from: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    quiet_to: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    time_zone: Option<String>,
    #[diesel(sql_type = Text)]
    kinds_off: String,
    #[diesel(sql_type = BigInt)]
    digest_minutes: i64,
    #[diesel(sql_type = Nullable<Text>)]
    language: Option<String>,
}

impl PrefRow {
    fn kind_off(&self, kind: &str) -> bool {
        self.kinds_off.split_whitespace().any(|k| k == kind)
    }

    /// When the person's quiet hours that hold at `t` end (Unix seconds), if they hold.
    fn quiet_until(&self, t: i64) -> Option<i64> {
        let (from, to, tz) = (
            self.quiet_from.as_deref()?,
            self.quiet_to.as_deref()?,
            self.time_zone.as_deref()?,
        );
        let tz: chrono_tz::Tz = tz.parse().ok()?;
        let from = chrono::NaiveTime::parse_from_str(from, "%H:%M").ok()?;
        let to = chrono::NaiveTime::parse_from_str(to, "%H:%M").ok()?;
        let local = chrono::DateTime::from_timestamp(t, 0)?.with_timezone(&tz);
        let now = local.time();
        let inside = if from <= to {
            now >= from && now < to
        } else {
            now >= from || now < to
        };
        if !inside {
            return None;
        }
        // The next `to` after now, in the person's zone (a gap at a DST change: the hour after).
        let mut day = local.date_naive();
        if now >= to {
            day = day.succ_opt()?;
        }
        let end = day.and_time(to);
        use chrono::TimeZone;
        let end = tz.from_local_datetime(&end).earliest().or_else(|| {
            tz.from_local_datetime(&(end + chrono::Duration::hours(1)))
                .earliest()
        })?;
        Some(end.timestamp())
    }
}

/// The person's choices, made on first need (with their unsubscribe token).
fn prefs(store: &Store, person: &str) -> Result<PrefRow, StoreError> {
    store.execute(
        "INSERT INTO notify_prefs (person, email_off, unsubscribe, updated_at) VALUES (?, 0, ?, ?) ON CONFLICT (person) DO NOTHING",
        vec![person.into(), oauth2::CsrfToken::new_random().secret().clone().into(), now().into()],
    )?;
    store
        .query::<PrefRow>(
            "SELECT email_off, sms_off, unsubscribe, quiet_from, quiet_to, time_zone, kinds_off, digest_minutes, language FROM notify_prefs WHERE person = ?",
            vec![person.into()],
        )?
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::Other(anyhow::anyhow!("no preferences row")))
}

/// What an email notice says: no names, no message text, no subject — only that there is a
/// message, from which clinic, and where to sign in.
pub struct Rendered {
    pub subject: String,
    pub text: String,
}

pub fn render(
    settings: &Settings,
    staff: bool,
    kind: &str,
    count: i64,
    link: &str,
    unsubscribe: &str,
    lang: Option<&str>,
) -> Rendered {
    let w = templates::words(settings, lang);
    let t = |key: &str| w.get(key, count, link);
    let many = count > 1;
    let (subject, line, privacy) = match kind {
        "escalation" => (t("escalation_subject"), t("escalation_line"), None),
        "reminder" => (
            t("reminder_subject"),
            t("reminder_line"),
            Some(t("privacy_reminder")),
        ),
        _ => {
            let (s, l) = match (staff, many) {
                (true, true) => ("staff_subject_many", "staff_line_many"),
                (true, false) => ("staff_subject", "staff_line"),
                (false, true) => ("subject_many", "line_many"),
                (false, false) => ("subject", "line"),
            };
            (t(s), t(l), Some(t("privacy")))
        }
    };
    let mut text = String::new();
    if privacy.is_some() {
        text.push_str(&format!("{}\r\n\r\n", t("greeting")));
    }
    text.push_str(&format!("{line}\r\n\r\n{}\r\n{link}\r\n\r\n", t("sign_in")));
    if let Some(p) = privacy {
        text.push_str(&format!("{p}\r\n\r\n"));
    }
    text.push_str(&format!("{} {unsubscribe}\r\n", t("unsubscribe")));
    Rendered { subject, text }
}

#[derive(QueryableByName, Debug)]
struct Claimed {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    person: String,
    #[diesel(sql_type = Text)]
    kind: String,
    #[diesel(sql_type = Text)]
    about: String,
    #[diesel(sql_type = Nullable<Text>)]
    channel: Option<String>,
    #[diesel(sql_type = BigInt)]
    urgent: i64,
    #[diesel(sql_type = BigInt)]
    attempts: i64,
}

#[derive(QueryableByName)]
struct Read {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Why a send failed, and whether trying again could help.
pub struct Failed {
    pub permanent: bool,
    pub reason: String,
}

/// One pass of the worker: rows cut off mid-send become `uncertain`; due rows are claimed under
/// a lease and sent (or skipped, retried, parked). Returns how many were sent.
pub fn run(store: &Store, settings: &Settings) -> anyhow::Result<usize> {
    let t = now();
    store.execute(
        "UPDATE notices SET state = 'uncertain', reason = 'the instance sending it stopped; it may or may not have been sent' WHERE state = 'sending' AND lease_until < ?",
        vec![t.into()],
    )?;
    if settings.smtp_url.is_none() && settings.sms_url.is_none() && !settings.web_push {
        return Ok(0);
    }
    let owner = format!("{}#{}", settings.instance_id, uuid::Uuid::new_v4());
    let due = t - settings.notify_after_secs;
    // Made at the first due notice: a pass with nothing to send opens no connection and
    // unseals no key.
    let mut made: Option<Senders> = None;
    let mut sent = 0;
    let started = std::time::Instant::now();
    // Batches while there are due notices (up to 10 s a pass: another instance, or the next
    // pass, takes the rest).
    loop {
        let t = now();
        let claimed: Vec<Claimed> = store.query(
        "UPDATE notices SET state = 'sending', lease_owner = ?, lease_until = ?, attempts = attempts + 1 \
         WHERE id IN (SELECT id FROM notices WHERE state = 'pending' AND next_attempt_at <= ? AND (kind <> 'new-message' OR created_at <= ?) ORDER BY next_attempt_at LIMIT ?) \
         AND state = 'pending' RETURNING id, person, kind, about, channel, urgent, attempts",
        vec![owner.clone().into(), (t + settings.notify_lease_secs.max(2)).into(), t.into(), due.into(), BATCH.into()],
    )?;
        if claimed.is_empty() {
            break;
        }
        let full = claimed.len() as i64 == BATCH;
        if made.is_none() {
            match Senders::new(store, settings) {
                Ok(s) => made = Some(s),
                Err(e) => {
                    // Nothing was sent: the claimed notices wait for the next pass.
                    store.execute(
                        "UPDATE notices SET state = 'pending', attempts = attempts - 1 WHERE lease_owner = ? AND state = 'sending'",
                        vec![owner.clone().into()],
                    )?;
                    return Err(e);
                }
            }
        }
        let Some(senders) = made.as_ref() else {
            break;
        };
        // 1. What to send, decided one by one (the store's reads and the person's choices).
        let mut ready: Vec<Ready> = vec![];
        // (person, channel) whose due new-message notices a digest of this batch tells of.
        let mut digested = std::collections::HashSet::new();
        for n in claimed {
            if n.kind == "new-message" && digested.contains(&(n.person.clone(), n.channel.clone()))
            {
                continue;
            }
            if n.person.starts_with("Group/") || n.person.starts_with("CareTeam/") {
                expand(store, &n, &owner)?;
                continue;
            }
            let id = n.id.clone();
            match decide(store, settings, senders, &owner, n, t) {
                Ok(Some(r)) => {
                    if r.count > 1 {
                        digested.insert((r.n.person.clone(), r.n.channel.clone()));
                    }
                    ready.push(r);
                }
                Ok(None) => {}
                // One notice that cannot be decided (an unreadable contact, a store error) waits
                // for the next pass; the rest of the batch goes on.
                Err(e) => {
                    tracing::warn!(notice = %id, error = %e, "a notice could not be prepared; it waits");
                    let _ = store.execute(
                        "UPDATE notices SET state = 'pending', reason = 'could not be prepared; tried again', next_attempt_at = ? WHERE id = ? AND lease_owner = ? AND state = 'sending'",
                        vec![(t + 60).into(), id.into(), owner.clone().into()],
                    );
                }
            }
        }
        // 2. Sent side by side (the SMTP pool's connections, the HTTP clients' connections):
        // each send waits on another server, not on this machine.
        let results = senders.send_all(&ready);
        // 3. Recorded.
        let mut sent_ids: Vec<String> = vec![];
        let mut audits: Vec<Value> = vec![];
        for (r, result) in ready.into_iter().zip(results) {
            let Ready {
                n, channel, count, ..
            } = r;
            let done = |state: &str, reason: Option<&str>| {
                store.execute(
                "UPDATE notices SET state = ?, reason = ?, next_attempt_at = ?, sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END WHERE id = ? AND lease_owner = ? AND state = 'sending'",
                vec![state.into(), reason.map(String::from).into(), t.into(), state.into(), now().into(), n.id.clone().into(), owner.clone().into()],
            )
            };
            // A digest that did not go leaves the notices it stood for to the next pass.
            let release_digested = || {
                store.execute(
                    "UPDATE notices SET state = 'pending', attempts = attempts - 1 WHERE person = ? AND channel = ? AND kind = 'new-message' AND id <> ? \
                     AND state = 'sending' AND lease_owner = ?",
                    vec![n.person.clone().into(), channel.clone().into(), n.id.clone().into(), owner.clone().into()],
                )
            };
            match result {
                Outcome::NotTried => {
                    store.execute(
                        "UPDATE notices SET state = 'pending', attempts = attempts - 1, next_attempt_at = ? WHERE id = ? AND lease_owner = ? AND state = 'sending'",
                        vec![t.into(), n.id.clone().into(), owner.clone().into()],
                    )?;
                    release_digested()?;
                }
                Outcome::Sent if count == 1 => {
                    // Marked sent, and audited, with the rest of the batch (one write for all;
                    // a crash before it leaves them `sending`, hence `uncertain`: never resent).
                    sent_ids.push(n.id.clone());
                    audits.push(audit_event(store, &n.person, &n.about, &channel, None));
                    sent += 1;
                }
                Outcome::Sent => {
                    done("sent", None)?;
                    // The others this digest told of are told.
                    store.execute(
                        "UPDATE notices SET state = 'sent', reason = 'in a digest', sent_at = ? WHERE person = ? AND channel = ? AND kind = 'new-message' AND id <> ? \
                         AND created_at <= ? AND (state = 'pending' OR (state = 'sending' AND lease_owner = ?))",
                        vec![t.into(), n.person.clone().into(), channel.clone().into(), n.id.clone().into(), t.into(), owner.clone().into()],
                    )?;
                    audit(store, &n.person, &n.about, &channel, None)?;
                    sent += 1;
                }
                Outcome::Gone => {
                    done(
                        "skipped",
                        Some("the browser's push subscription has expired"),
                    )?;
                    release_digested()?;
                }
                Outcome::Failed(f) if f.permanent || n.attempts >= MAX_ATTEMPTS => {
                    done("parked", Some(&f.reason))?;
                    release_digested()?;
                    audit(store, &n.person, &n.about, &channel, Some(&f.reason))?;
                }
                Outcome::Failed(f) => {
                    let backoff = (1i64 << (n.attempts - 1).clamp(0, 9)).min(300);
                    store.execute(
                    "UPDATE notices SET state = 'pending', reason = ?, next_attempt_at = ? WHERE id = ? AND lease_owner = ? AND state = 'sending'",
                    vec![f.reason.into(), (t + backoff).into(), n.id.clone().into(), owner.clone().into()],
                )?;
                    release_digested()?;
                }
            }
        }
        if !sent_ids.is_empty() {
            let marks = vec!["?"; sent_ids.len()].join(", ");
            let mut binds: Vec<Bind> = vec![now().into(), owner.clone().into()];
            binds.extend(sent_ids.into_iter().map(Bind::from));
            store.execute(
                &format!("UPDATE notices SET state = 'sent', reason = NULL, sent_at = ? WHERE lease_owner = ? AND state = 'sending' AND id IN ({marks})"),
                binds,
            )?;
        }
        // Recorded side by side, so that they share the store's group commits.
        let failed = std::thread::scope(|scope| {
            let handles: Vec<_> = audits
                .into_iter()
                .map(|ev| scope.spawn(move || store.record_audit(ev)))
                .collect();
            handles.into_iter().any(|h| !matches!(h.join(), Ok(Ok(()))))
        });
        if failed {
            anyhow::bail!("a notice's AuditEvent could not be recorded");
        }
        if !full || started.elapsed() > std::time::Duration::from_secs(10) {
            break;
        }
    }
    Ok(sent)
}

/// A claimed notice ready to go: who, by which channel, how many messages it tells of, what.
struct Ready {
    n: Claimed,
    channel: String,
    count: i64,
    job: Job,
}

enum Job {
    Email {
        to: String,
        rendered: Rendered,
        unsubscribe: String,
    },
    Sms {
        to: String,
        body: String,
    },
    Push {
        devices: Vec<push::Device>,
        payload: Vec<u8>,
        urgent: bool,
        ttl: u64,
    },
}

enum Outcome {
    /// Not sent in this pass (the pass ran out of time): back to pending, no try counted.
    NotTried,
    Sent,
    /// Every browser subscription of the person has expired (and was forgotten).
    Gone,
    Failed(Failed),
}

/// Step 1 for one claimed notice: skipped (read, opted out, no contact), postponed (digest,
/// quiet hours, channel not configured) — written at once — or ready to send.
fn decide(
    store: &Store,
    settings: &Settings,
    senders: &Senders<'_>,
    owner: &str,
    n: Claimed,
    t: i64,
) -> anyhow::Result<Option<Ready>> {
    let done = |state: &str, reason: &str| {
        store.execute(
            "UPDATE notices SET state = ?, reason = ?, next_attempt_at = ? WHERE id = ? AND lease_owner = ? AND state = 'sending'",
            vec![state.into(), reason.to_string().into(), t.into(), n.id.clone().into(), owner.into()],
        )
    };
    let postpone = |reason: &str, until: i64, retry: bool| {
        store.execute(
            &format!("UPDATE notices SET state = 'pending', reason = ?, {}next_attempt_at = ? WHERE id = ? AND lease_owner = ? AND state = 'sending'",
                if retry { "" } else { "attempts = attempts - 1, " }),
            vec![reason.to_string().into(), until.into(), n.id.clone().into(), owner.into()],
        )
    };
    let comm = n
        .about
        .strip_prefix("Communication/")
        .unwrap_or_default()
        .to_string();
    let read = store
        .query::<Read>(
            "SELECT COUNT(*) AS n FROM receipts WHERE comm_id = ? AND recipient = ? AND read_at IS NOT NULL",
            vec![comm.into(), n.person.clone().into()],
        )?
        .first()
        .is_some_and(|r| r.n > 0);
    if read && n.kind == "new-message" {
        done("skipped", "read in the app")?;
        return Ok(None);
    }
    let channel = n.channel.clone().unwrap_or_else(|| "email".into());
    let p = prefs(store, &n.person)?;
    let off = match channel.as_str() {
        "sms" => p.sms_off,
        "email" => p.email_off,
        _ => 0,
    };
    if off > 0 {
        done("skipped", &format!("opted out of {channel}"))?;
        return Ok(None);
    }
    if n.kind != "escalation" && p.kind_off(&n.kind) {
        done("skipped", &format!("opted out of {} notices", n.kind))?;
        return Ok(None);
    }
    // A digest: at most one notice of new messages per channel in the interval; the one sent
    // says how many are waiting, and stands for the others due with it.
    let mut count = 1;
    if n.kind == "new-message" && p.digest_minutes > 0 {
        #[derive(QueryableByName)]
        struct Last {
            #[diesel(sql_type = Nullable<BigInt>)]
            last: Option<i64>,
        }
        let last = store
            .query::<Last>(
                "SELECT MAX(sent_at) AS last FROM notices WHERE person = ? AND channel = ? AND kind = 'new-message' AND state = 'sent'",
                vec![n.person.clone().into(), channel.clone().into()],
            )?
            .first()
            .and_then(|l| l.last);
        if let Some(next) = last
            .map(|l| l + p.digest_minutes * 60)
            .filter(|&next| next > t)
        {
            postpone("digest", next, false)?;
            return Ok(None);
        }
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        count += store
            .query::<Count>(
                "SELECT COUNT(*) AS n FROM notices WHERE person = ? AND channel = ? AND kind = 'new-message' AND id <> ? \
                 AND created_at <= ? AND (state = 'pending' OR (state = 'sending' AND lease_owner = ?))",
                vec![n.person.clone().into(), channel.clone().into(), n.id.clone().into(), t.into(), owner.into()],
            )?
            .first()
            .map_or(0, |c| c.n);
    }
    // Quiet hours: the notice waits for their end — unless it is an urgent message to a
    // clinician and the clinic lets those break through.
    let breaks = n.urgent > 0
        && n.person.starts_with("Practitioner/")
        && settings.notify_urgent_breaks_quiet;
    if let Some(until) = p.quiet_until(t).filter(|_| !breaks) {
        postpone("quiet hours", until, false)?;
        return Ok(None);
    }
    let configured = match channel.as_str() {
        "email" => senders.smtp.is_some(),
        "sms" => settings.sms_url.is_some(),
        "push" => senders.vapid.is_some(),
        _ => false,
    };
    if !configured {
        // The channel is not configured on this server (any more): wait for it.
        postpone(
            &format!("no {channel} provider is configured"),
            t + 300,
            true,
        )?;
        return Ok(None);
    }
    let link = sign_in_link(store, settings, &n.person)?;
    let job = if channel == "push" {
        let devices = push::devices(store, &n.person)?;
        if devices.is_empty() {
            done("skipped", "no browser has push notifications turned on")?;
            return Ok(None);
        }
        Job::Push {
            devices,
            payload: push::payload(settings, &n.kind, count, &link, p.language.as_deref()),
            urgent: n.urgent > 0 || n.kind == "escalation",
            ttl: if n.kind == "escalation" { 3600 } else { 86_400 },
        }
    } else {
        let Some(to) = contact(store, &n.person, &channel)? else {
            done("skipped", &format!("no {channel} contact"))?;
            return Ok(None);
        };
        if channel == "email" && bounced(store, &n.person)? {
            done("skipped", "the email address bounced")?;
            return Ok(None);
        }
        if channel == "sms" {
            Job::Sms {
                to,
                body: sms_text(settings, &n.kind, count, &link, p.language.as_deref()),
            }
        } else {
            let unsubscribe = format!(
                "{}/notify/unsubscribe?t={}",
                settings.base_url, p.unsubscribe
            );
            let staff = n.person.starts_with("Practitioner/");
            Job::Email {
                to,
                rendered: render(
                    settings,
                    staff,
                    &n.kind,
                    count,
                    &link,
                    &unsubscribe,
                    p.language.as_deref(),
                ),
                unsubscribe,
            }
        }
    };
    Ok(Some(Ready {
        n,
        channel,
        count,
        job,
    }))
}

/// How many sends are in flight at once: each mostly waits on the mail server or provider.
const SENDERS: usize = 8;

/// What the worker sends with, made once a pass: the SMTP connection pool, the HTTP clients,
/// the VAPID key.
struct Senders<'a> {
    store: &'a Store,
    settings: &'a Settings,
    smtp: Option<lettre::SmtpTransport>,
    sms: Option<reqwest::Client>,
    push: Outbound,
    /// (private key DER, public key, subject) when web push is on.
    vapid: Option<(Vec<u8>, String, String)>,
    runtime: RuntimeRef,
}

enum RuntimeRef {
    Handle(tokio::runtime::Handle),
    Own(tokio::runtime::Runtime),
}

impl RuntimeRef {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            RuntimeRef::Handle(h) => h.block_on(f),
            RuntimeRef::Own(r) => r.handle().block_on(f),
        }
    }
}

use crate::outbound::Outbound;

/// The HTTP client for push services, one per process and address policy (its connections to
/// a push service stay open from one pass to the next).
fn push_client(settings: &Settings) -> anyhow::Result<Outbound> {
    // Public addresses only, whatever COURIER_OUTBOUND_ALLOW opens for EHRs: a push endpoint is
    // chosen by whoever signs in. (Address rules lifted altogether only where configured so:
    // closed networks, tests.)
    static PUBLIC: std::sync::OnceLock<Outbound> = std::sync::OnceLock::new();
    static ANY: std::sync::OnceLock<Outbound> = std::sync::OnceLock::new();
    Ok(if settings.subscription_private_endpoints {
        ANY.get_or_init(Outbound::any_address).clone()
    } else {
        PUBLIC.get_or_init(Outbound::public_only).clone()
    })
}

impl<'a> Senders<'a> {
    fn new(store: &'a Store, settings: &'a Settings) -> anyhow::Result<Senders<'a>> {
        let smtp = match &settings.smtp_url {
            Some(url) => Some(
                lettre::SmtpTransport::from_url(url.expose_secret())
                    .map_err(|e| anyhow::anyhow!("COURIER_SMTP_URL: {e}"))?
                    .timeout(Some(std::time::Duration::from_secs(20)))
                    .pool_config(
                        lettre::transport::smtp::PoolConfig::new().max_size(SENDERS as u32),
                    )
                    .build(),
            ),
            None => None,
        };
        let sms = match &settings.sms_url {
            Some(_) => Some(sms_client()?),
            None => None,
        };
        let runtime = match tokio::runtime::Handle::try_current() {
            Ok(h) => RuntimeRef::Handle(h),
            Err(_) => RuntimeRef::Own(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()?,
            ),
        };
        // A VAPID key that cannot be read stops web push only, never email or SMS.
        let vapid = match settings.web_push.then(|| push::vapid(store)) {
            Some(Ok((der, public))) => Some((der, public, push::subject(settings))),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "the VAPID key cannot be read: web push notices wait");
                None
            }
            None => None,
        };
        Ok(Senders {
            store,
            settings,
            smtp,
            sms,
            push: push_client(settings)?,
            vapid,
            runtime,
        })
    }

    fn send_all(&self, ready: &[Ready]) -> Vec<Outcome> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results: Vec<parking_lot::Mutex<Option<Outcome>>> = ready
            .iter()
            .map(|_| parking_lot::Mutex::new(None))
            .collect();
        // No new send starts after half the lease: what is left goes back to pending, so a slow
        // server (or a person's slow push endpoints) cannot keep notices past their lease.
        let started = std::time::Instant::now();
        let budget =
            std::time::Duration::from_secs((self.settings.notify_lease_secs.max(2) / 2) as u64);
        std::thread::scope(|scope| {
            for _ in 0..SENDERS.min(ready.len()) {
                scope.spawn(|| loop {
                    if started.elapsed() > budget {
                        break;
                    }
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(r) = ready.get(i) else { break };
                    *results[i].lock() = Some(self.send_one(r));
                });
            }
        });
        results
            .into_iter()
            .map(|m| m.into_inner().unwrap_or(Outcome::NotTried))
            .collect()
    }

    fn send_one(&self, r: &Ready) -> Outcome {
        let result = match &r.job {
            Job::Email {
                to,
                rendered,
                unsubscribe,
            } => match &self.smtp {
                Some(tr) => send(tr, self.settings, to, rendered, &r.n.id, unsubscribe),
                None => Err(Failed {
                    permanent: false,
                    reason: "no SMTP server is configured".into(),
                }),
            },
            Job::Sms { to, body } => match &self.sms {
                Some(c) => self.runtime.block_on(send_sms(c, self.settings, to, body)),
                None => Err(Failed {
                    permanent: false,
                    reason: "no SMS provider is configured".into(),
                }),
            },
            Job::Push {
                devices,
                payload,
                urgent,
                ttl,
            } => {
                let Some((der, public, subject)) = &self.vapid else {
                    return Outcome::Failed(Failed {
                        permanent: false,
                        reason: "web push is off".into(),
                    });
                };
                return self.runtime.block_on(async {
                    let (mut delivered, mut gone, mut failure) = (0, 0, None::<Failed>);
                    for d in devices {
                        match push::send(
                            self.settings,
                            &self.push,
                            der,
                            public,
                            subject,
                            d,
                            payload,
                            *urgent,
                            *ttl,
                        )
                        .await {
                            push::Pushed::Delivered => {
                                delivered += 1;
                                // When the device last took a notice (for the operator; no content).
                                let _ = self.store.execute(
                                    "UPDATE notify_push SET last_sent_at = ? WHERE id = ?",
                                    vec![now().into(), d.id.clone().into()],
                                );
                            }
                            push::Pushed::Gone => {
                                gone += 1;
                                if let Err(e) = push::forget(self.store, &d.id) {
                                    tracing::warn!(error = %e, "could not forget an expired push subscription");
                                }
                            }
                            push::Pushed::Failed(f) => {
                                // A retryable failure outranks a permanent one.
                                if failure.as_ref().is_none_or(|old| old.permanent) {
                                    failure = Some(f);
                                }
                            }
                        }
                    }
                    if delivered > 0 {
                        Outcome::Sent
                    } else if let Some(f) = failure {
                        Outcome::Failed(f)
                    } else {
                        debug_assert!(gone > 0);
                        Outcome::Gone
                    }
                });
            }
        };
        match result {
            Ok(()) => Outcome::Sent,
            Err(f) => Outcome::Failed(f),
        }
    }
}

/// A notice to a Group or CareTeam becomes one per member and channel (their own choices apply),
/// dated as the message, with ids made from the group notice's, so doing it twice adds nothing.
fn expand(store: &Store, n: &Claimed, owner: &str) -> Result<(), StoreError> {
    let sender = n
        .about
        .strip_prefix("Communication/")
        .and_then(|id| store.read("Communication", id).ok())
        .and_then(|s| s.body)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|v| person_ref(&v["sender"]));
    #[derive(QueryableByName)]
    struct Created {
        #[diesel(sql_type = BigInt)]
        created_at: i64,
    }
    let created = store
        .query::<Created>(
            "SELECT created_at FROM notices WHERE id = ?",
            vec![n.id.clone().into()],
        )?
        .first()
        .map_or(now(), |c| c.created_at);
    for member in crate::messaging::groups::members(store, &n.person)? {
        if person_ref(&json!({"reference": member})).is_none() || Some(&member) == sender.as_ref() {
            continue;
        }
        let (sql, binds) = reach_query(&[&member]);
        let rows: Vec<ReachRow> = store.query(&sql, binds)?;
        for ch in channels(&rows, &member, &n.kind) {
            store.execute(
                "INSERT INTO notices (id, person, kind, about, state, channel, urgent, next_attempt_at, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                vec![
                    format!("{}:{}:{}", n.id, member, ch).into(),
                    member.clone().into(),
                    n.kind.clone().into(),
                    n.about.clone().into(),
                    ch.into(),
                    n.urgent.into(),
                    created.into(),
                    created.into(),
                ],
            )?;
        }
    }
    store.execute(
        "UPDATE notices SET state = 'expanded', reason = 'one notice per member' WHERE id = ? AND lease_owner = ?",
        vec![n.id.clone().into(), owner.into()],
    )?;
    Ok(())
}

/// Where a person signs in: their portal (the standalone launch of an EHR that knows them).
fn sign_in_link(store: &Store, settings: &Settings, person: &str) -> Result<String, StoreError> {
    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = Text)]
        name: String,
    }
    let ehr = store
        .query::<Name>(
            "SELECT e.name AS name FROM identity_links l JOIN ehrs e ON e.iss = l.iss WHERE l.courier_ref = ? ORDER BY e.name LIMIT 1",
            vec![person.into()],
        )?
        .into_iter()
        .next();
    Ok(match ehr {
        Some(e) => format!("{}/smart/launch?ehr={}", settings.base_url, e.name),
        None => format!("{}/app/", settings.base_url),
    })
}

fn send(
    transport: &lettre::SmtpTransport,
    settings: &Settings,
    to: &str,
    r: &Rendered,
    id: &str,
    unsubscribe: &str,
) -> Result<(), Failed> {
    use lettre::message::header::ContentType;
    use lettre::Transport;
    let permanent = |reason: String| Failed {
        permanent: true,
        reason,
    };
    let from: lettre::message::Mailbox = settings
        .notify_from
        .parse()
        .map_err(|e| permanent(format!("the sender address is invalid: {e}")))?;
    let to: lettre::message::Mailbox = to
        .parse()
        .map_err(|_| permanent("the recipient address is invalid".into()))?;
    let domain = from.email.domain().to_string();
    // Bounces go to the bounce mailbox when there is one (read by `courier notify bounce`).
    let envelope = match &settings.notify_bounce_to {
        Some(b) => Some(
            lettre::address::Envelope::new(
                b.parse::<lettre::Address>().ok(),
                vec![to.email.clone()],
            )
            .map_err(|e| permanent(format!("cannot address the email: {e}")))?,
        ),
        None => None,
    };
    let email = lettre::Message::builder()
        .from(from)
        .to(to)
        .subject(&r.subject)
        .message_id(Some(format!("<{id}@{domain}>")))
        .raw_header(lettre::message::header::HeaderValue::new(
            lettre::message::header::HeaderName::new_from_ascii_str("List-Unsubscribe"),
            format!("<{unsubscribe}>"),
        ))
        .raw_header(lettre::message::header::HeaderValue::new(
            lettre::message::header::HeaderName::new_from_ascii_str("List-Unsubscribe-Post"),
            "List-Unsubscribe=One-Click".to_string(),
        ))
        .header(ContentType::TEXT_PLAIN);
    let email = match envelope {
        Some(e) => email.envelope(e),
        None => email,
    };
    let email = email
        .body(r.text.clone())
        .map_err(|e| permanent(format!("cannot build the email: {e}")))?;
    transport.send(&email).map(|_| ()).map_err(|e| Failed {
        permanent: e.is_permanent(),
        reason: if e.is_permanent() {
            format!(
                "the mail server refused it: {}",
                e.status().map(|c| c.to_string()).unwrap_or_default()
            )
        } else {
            "the mail server could not be reached or deferred it".to_string()
        },
    })
}

/// An SMS notice: the clinic, that there is a message, the link. No name, no content.
pub fn sms_text(
    settings: &Settings,
    kind: &str,
    count: i64,
    link: &str,
    lang: Option<&str>,
) -> String {
    let w = templates::words(settings, lang);
    let key = match kind {
        "escalation" => "sms_escalation",
        "reminder" => "sms_reminder",
        _ if count > 1 => "sms_many",
        _ => "sms",
    };
    w.get(key, count, link)
}

/// The HTTP client for the SMS provider (no redirects followed: the token is never forwarded).
fn sms_client() -> reqwest::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(20))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// Sends through the provider's Messages API (the Twilio shape: `POST
/// {base}/2010-04-01/Accounts/{account}/Messages.json`, HTTP Basic account:token, form `To`,
/// `From`, `Body`; 201 with the message's `sid`). 4xx: parked with the provider's code and
/// message (a bad number, an opted-out recipient); 429, 5xx and timeouts: tried again.
async fn send_sms(
    client: &reqwest::Client,
    settings: &Settings,
    to: &str,
    body: &str,
) -> Result<(), Failed> {
    let base = settings.sms_url.as_deref().unwrap_or_default();
    let url = format!(
        "{base}/2010-04-01/Accounts/{}/Messages.json",
        settings.sms_account
    );
    let token = settings
        .sms_token
        .as_ref()
        .map(|t| t.expose_secret().to_string())
        .unwrap_or_default();
    let form = form_urlencoded::Serializer::new(String::new())
        .append_pair("To", to)
        .append_pair("From", &settings.sms_from)
        .append_pair("Body", body)
        .finish();
    let request = client
        .post(url)
        .basic_auth(&settings.sms_account, Some(token))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send();
    let answer = async {
        let r = request.await?;
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Ok::<_, reqwest::Error>((status, body))
    }
    .await;
    match answer {
        Ok((200..=299, _)) => Ok(()),
        Ok((429, _)) | Ok((500..=599, _)) => Err(Failed {
            permanent: false,
            reason: "the SMS provider is busy or failing".into(),
        }),
        Ok((status, body)) => Err(Failed {
            permanent: true,
            reason: format!(
                "the SMS provider refused it ({status}, code {}: {})",
                body["code"]
                    .as_i64()
                    .map(|c| c.to_string())
                    .unwrap_or_default(),
                body["message"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(200)
                    .collect::<String>()
            ),
        }),
        Err(_) => Err(Failed {
            permanent: false,
            reason: "the SMS provider could not be reached".into(),
        }),
    }
}

/// Audits a notice (DICOM 110106 Export: information sent out of Courier), naming the person told
/// and the message it is about — never the address or any content.
fn audit(
    store: &Store,
    person: &str,
    about: &str,
    channel: &str,
    failure: Option<&str>,
) -> Result<(), StoreError> {
    store.record_audit(audit_event(store, person, about, channel, failure))
}

fn audit_event(
    store: &Store,
    person: &str,
    about: &str,
    channel: &str,
    failure: Option<&str>,
) -> Value {
    let ctx = crate::audit::Context::job(&store.base_url, "notify");
    let mut ev = crate::audit::authentication(&ctx, failure);
    ev["type"] = json!({"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110106", "display": "Export"});
    ev["subtype"] = json!([{"system": NOTICE_SYSTEM, "code": format!("{channel}-notice")}]);
    ev["action"] = json!("R");
    if let Some(agents) = ev["agent"].as_array_mut() {
        agents.push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient"}]},
            "who": {"reference": person}, "requestor": false
        }));
    }
    ev["entity"] = json!([{"what": {"reference": about}, "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"}}]);
    ev
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/notify/unsubscribe", web::get().to(unsubscribe_page))
        .route("/notify/unsubscribe", web::post().to(unsubscribe))
        .route("/notify/preferences", web::get().to(get_preferences))
        .route("/notify/preferences", web::put().to(put_preferences))
        .route("/notify/contacts", web::post().to(change_contact))
        .route("/notify/contacts/verify", web::post().to(verify_contact))
        .route("/notify/push", web::post().to(add_push))
        .route("/notify/push", web::delete().to(remove_push));
}

/// `POST /notify/push` (a `PushSubscription` as JSON: `{"endpoint", "keys": {"p256dh",
/// "auth"}}`): this browser gets the signed-in person's notices by web push. 201 with
/// `{"devices": n}`; a malformed subscription, or an endpoint Courier may not reach, is a 400.
async fn add_push(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let person = match person_of(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    if !state.settings.web_push {
        return outcome(
            409,
            "push",
            "Web push is turned off on this server (COURIER_WEB_PUSH).",
        );
    }
    let sub = match serde_json::from_slice::<push::Subscription>(&body) {
        Ok(s) => s,
        Err(_) => {
            return outcome(
                400,
                "push",
                "Send the browser's push subscription: {\"endpoint\": …, \"keys\": {\"p256dh\": …, \"auth\": …}}.",
            )
        }
    };
    if let Err(why) = push::validate(&state.settings, &sub) {
        return outcome(
            400,
            "push",
            &format!("This push subscription cannot be used: {why}."),
        );
    }
    let http = match push_client(&state.settings) {
        Ok(h) => h,
        Err(_) => return HttpResponse::ServiceUnavailable().finish(),
    };
    if let Err(e) = http.check(&sub.endpoint).await {
        return outcome(
            400,
            "push.endpoint",
            &format!("This push service cannot be used: {e}."),
        );
    }
    let store = state.store.clone();
    match web::block(move || push::register(&store, &person, &sub)).await {
        Ok(Ok(n)) => HttpResponse::Created()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(json!({"devices": n})),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// `DELETE /notify/push` (`{"endpoint"}`): this browser gets no more notices. 204 whether or
/// not it had them (another person's device is not touched, and not told of).
async fn remove_push(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let person = match person_of(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let Some(endpoint) = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["endpoint"].as_str().map(String::from))
    else {
        return outcome(
            400,
            "push",
            "Send {\"endpoint\": …} of the subscription to remove.",
        );
    };
    let store = state.store.clone();
    match web::block(move || push::unregister(&store, &person, &endpoint)).await {
        Ok(Ok(_)) => HttpResponse::NoContent().finish(),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

const CODE_SECS: i64 = 600;
const CODE_TRIES: i64 = 5;

fn code_hash(person: &str, kind: &str, code: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{person}\n{kind}\n{code}").as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn outcome(status: u16, what: &str, why: &str) -> HttpResponse {
    actix_web::ResponseError::error_response(&crate::fhir::outcome::FhirError::at(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST),
        if status == 429 {
            "throttled"
        } else {
            "invalid"
        },
        what,
        why,
    ))
}

/// `POST /notify/contacts` (`{"kind": "email" | "sms", "value": …}`): a new address or number
/// for the signed-in person, used only once the 6-digit code sent to it comes back
/// (`/notify/contacts/verify`); until then the old one stays.
async fn change_contact(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let person = match person_of(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return outcome(400, "contact", "the request is not JSON");
    };
    let kind = v["kind"].as_str().unwrap_or_default().to_string();
    let raw = v["value"].as_str().unwrap_or_default().trim().to_string();
    let value = match kind.as_str() {
        "email" if raw.len() <= 254 && raw.parse::<lettre::Address>().is_ok() => raw.to_lowercase(),
        "email" => return outcome(400, "contact.value", "that is not an email address"),
        "sms" => match e164(&raw) {
            Some(n) => n,
            None => {
                return outcome(
                    400,
                    "contact.value",
                    "a mobile number in international form, such as +1 555 010 0199",
                )
            }
        },
        _ => return outcome(400, "contact.kind", "kind is email or sms"),
    };
    let configured = match kind.as_str() {
        "email" => state.settings.smtp_url.is_some(),
        _ => state.settings.sms_url.is_some(),
    };
    if !configured {
        return outcome(
            400,
            "contact.kind",
            &format!(
                "this clinic does not send notices by {}",
                if kind == "sms" {
                    "text message"
                } else {
                    "email"
                }
            ),
        );
    }
    use rand::Rng;
    let code = format!("{:06}", rand::thread_rng().gen_range(0..1_000_000));
    let store = state.store.clone();
    let settings = state.settings.clone();
    let (p2, k2, v2, c2) = (person.clone(), kind.clone(), value.clone(), code.clone());
    let sent = web::block(move || -> Result<Result<(), Failed>, StoreError> {
        // One code a minute per person and channel: the endpoint cannot be made to send texts
        // in bulk to numbers someone else chose.
        #[derive(QueryableByName)]
        struct Recent {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let recent = store.query::<Recent>(
            "SELECT COUNT(*) AS n FROM notify_pending_contacts WHERE person = ? AND kind = ? AND expires_at > ?",
            vec![p2.clone().into(), k2.clone().into(), (now() + CODE_SECS - 60).into()],
        )?;
        if recent.first().is_some_and(|r| r.n > 0) {
            return Ok(Err(Failed { permanent: false, reason: "wait a minute before asking for another code".into() }));
        }
        let (key_id, sealed) = store.keys.seal(v2.as_bytes(), &format!("notify-pending/{p2}/{k2}"));
        store.execute(
            "INSERT INTO notify_pending_contacts (person, kind, key_id, sealed, code_hash, tries, expires_at) VALUES (?, ?, ?, ?, ?, 0, ?) \
             ON CONFLICT (person, kind) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed, code_hash = excluded.code_hash, tries = 0, expires_at = excluded.expires_at",
            vec![p2.clone().into(), k2.clone().into(), key_id.into(), Bind::Blob(sealed), code_hash(&p2, &k2, &c2).into(), (now() + CODE_SECS).into()],
        )?;
        let lang = prefs(&store, &p2)?.language;
        let w = templates::words(&settings, lang.as_deref());
        let text = w.code(&c2);
        Ok(match k2.as_str() {
            "email" => {
                let tr = lettre::SmtpTransport::from_url(settings.smtp_url.as_ref().map(|u| u.expose_secret().to_string()).unwrap_or_default().as_str())
                    .map_err(|e| StoreError::Other(anyhow::anyhow!("COURIER_SMTP_URL: {e}")))?
                    .timeout(Some(std::time::Duration::from_secs(20)))
                    .build();
                let r = Rendered { subject: w.get("code_subject", 0, ""), text: format!("{text}\r\n") };
                send(&tr, &settings, &v2, &r, &uuid::Uuid::new_v4().to_string(), &format!("{}/app/", settings.base_url))
            }
            _ => {
                let client = sms_client().map_err(|e| StoreError::Other(e.into()))?;
                tokio::runtime::Handle::current().block_on(send_sms(&client, &settings, &v2, &text))
            }
        })
    })
    .await;
    match sent {
        Ok(Ok(Ok(()))) => HttpResponse::Accepted()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(json!({"pending": masked(&kind, &value), "expires_in": CODE_SECS})),
        Ok(Ok(Err(f))) if f.reason.starts_with("wait a minute") => outcome(
            429,
            "contact",
            "Wait a minute before asking for another code.",
        ),
        Ok(Ok(Err(f))) => outcome(
            if f.permanent { 400 } else { 503 },
            "contact.value",
            &format!("the code could not be sent: {}", f.reason),
        ),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[derive(QueryableByName)]
struct PendingContact {
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = Binary)]
    sealed: Vec<u8>,
    #[diesel(sql_type = Text)]
    code_hash: String,
    #[diesel(sql_type = BigInt)]
    tries: i64,
    #[diesel(sql_type = BigInt)]
    expires_at: i64,
}

/// `POST /notify/contacts/verify` (`{"kind", "code"}`): the code sent to the new address or
/// number; right, it replaces the old one (and the EHR's next launch does not put that back).
async fn verify_contact(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let person = match person_of(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return outcome(400, "contact", "the request is not JSON");
    };
    let kind = v["kind"].as_str().unwrap_or_default().to_string();
    let code: String = v["code"]
        .as_str()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let store = state.store.clone();
    let done = web::block(move || -> Result<Result<Value, (u16, &'static str)>, StoreError> {
        // One try counted before it is checked: five guesses at most, however sent.
        store.execute(
            "UPDATE notify_pending_contacts SET tries = tries + 1 WHERE person = ? AND kind = ?",
            vec![person.clone().into(), kind.clone().into()],
        )?;
        let Some(p) = store
            .query::<PendingContact>(
                "SELECT key_id, sealed, code_hash, tries, expires_at FROM notify_pending_contacts WHERE person = ? AND kind = ?",
                vec![person.clone().into(), kind.clone().into()],
            )?
            .into_iter()
            .next()
        else {
            return Ok(Err((400, "there is no code waiting: ask for a new one")));
        };
        if p.expires_at < now() || p.tries > CODE_TRIES {
            store.execute("DELETE FROM notify_pending_contacts WHERE person = ? AND kind = ?", vec![person.clone().into(), kind.clone().into()])?;
            return Ok(Err((400, "that code has expired or was tried too often: ask for a new one")));
        }
        if code.len() != 6 || code_hash(&person, &kind, &code) != p.code_hash {
            return Ok(Err((400, "that code is not right")));
        }
        let value = store.open_sealed(&p.key_id, &p.sealed, &format!("notify-pending/{person}/{kind}"))?;
        let (key_id, sealed) = store.keys.seal(&value, &contact_aad(&person, &kind));
        let t = now();
        store.execute(
            "INSERT INTO notify_contacts (person, kind, key_id, sealed, source, verified_at, updated_at) VALUES (?, ?, ?, ?, 'app', ?, ?) \
             ON CONFLICT (person, kind) DO UPDATE SET key_id = excluded.key_id, sealed = excluded.sealed, source = 'app', verified_at = excluded.verified_at, updated_at = excluded.updated_at, bounced_at = NULL",
            vec![person.clone().into(), kind.clone().into(), key_id.into(), Bind::Blob(sealed), t.into(), t.into()],
        )?;
        store.execute("DELETE FROM notify_pending_contacts WHERE person = ? AND kind = ?", vec![person.clone().into(), kind.clone().into()])?;
        Ok(Ok(preferences_of(&store, &person)?))
    })
    .await;
    match done {
        Ok(Ok(Ok(v))) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(v),
        Ok(Ok(Err((status, why)))) => outcome(status, "contact.code", why),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// An address or number as the person sees it in the app: enough to recognise it, not to use it.
fn masked(kind: &str, v: &str) -> String {
    match kind {
        "email" => match v.split_once('@') {
            Some((local, domain)) => format!("{}***@{domain}", local.chars().next().unwrap_or('*')),
            None => "***".into(),
        },
        _ => {
            let digits: Vec<char> = v.chars().filter(|c| c.is_ascii_digit()).collect();
            let last: String = digits[digits.len().saturating_sub(4)..].iter().collect();
            format!("••• {last}")
        }
    }
}

fn person_of(req: &actix_web::HttpRequest) -> Result<String, crate::fhir::outcome::FhirError> {
    let p = crate::fhir::access::principal(req)?;
    p.fhir_user
        .clone()
        .filter(|u| person_ref(&json!({"reference": u})).is_some())
        .ok_or_else(|| {
            crate::fhir::outcome::FhirError::new(
                actix_web::http::StatusCode::FORBIDDEN,
                "forbidden",
                "notice preferences belong to a signed-in person (a token with fhirUser)",
            )
        })
}

/// Everything the app shows in its Notifications dialog (GET and PUT answer the same).
fn preferences_full(store: &Store, settings: &Settings, person: &str) -> Result<Value, StoreError> {
    let mut v = preferences_of(store, person)?;
    // The key the browser subscribes with (`applicationServerKey`), when web push is on.
    v["push"]["public_key"] = match settings.web_push {
        true => json!(push::vapid(store)?.1),
        false => Value::Null,
    };
    v["languages"] = templates::languages(settings)
        .into_iter()
        .map(|(code, name)| json!({"code": code, "name": name}))
        .collect();
    v["default_language"] = json!(templates::words(settings, None).lang());
    Ok(v)
}

fn preferences_of(store: &Store, person: &str) -> Result<Value, StoreError> {
    let p = prefs(store, person)?;
    let mut out = json!({});
    for (kind, off) in [("email", p.email_off), ("sms", p.sms_off)] {
        out[kind] = match contact(store, person, kind)? {
            Some(v) if kind == "email" && bounced(store, person)? => {
                json!({"to": masked(kind, &v), "on": off == 0, "bounced": true})
            }
            Some(v) => json!({"to": masked(kind, &v), "on": off == 0}),
            None => json!({"to": null, "on": false}),
        };
    }
    out["push"] = json!({"devices": push::count(store, person)?});
    out["kinds"] =
        json!({"new-message": !p.kind_off("new-message"), "reminder": !p.kind_off("reminder")});
    out["digest_minutes"] = json!(p.digest_minutes);
    out["language"] = json!(p.language);
    out["quiet"] = match (&p.quiet_from, &p.quiet_to, &p.time_zone) {
        (Some(f), Some(t), Some(z)) => json!({"from": f, "to": t, "time_zone": z}),
        _ => Value::Null,
    };
    Ok(out)
}

/// What Courier holds to reach `person` outside the app, for their export (GDPR Art. 15, HIPAA
/// right of access): a Parameters resource, or `None` when there is nothing.
pub fn export_of(store: &Store, person: &str) -> Result<Option<Value>, StoreError> {
    use crate::search::dates::format_instant;
    let at = |secs: i64| json!(format_instant(secs * 1_000_000));
    let mut parameter = vec![];
    #[derive(QueryableByName)]
    struct C {
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = Text)]
        source: String,
        #[diesel(sql_type = Nullable<BigInt>)]
        verified_at: Option<i64>,
    }
    let contacts: Vec<C> = store.query(
        "SELECT kind, source, verified_at FROM notify_contacts WHERE person = ? ORDER BY kind",
        vec![person.into()],
    )?;
    for c in contacts {
        let Some(value) = read_contact(store, person, &c.kind, false)? else {
            continue;
        };
        let mut part = vec![
            json!({"name": "channel", "valueCode": c.kind}),
            json!({"name": "value", "valueString": value}),
            json!({"name": "source", "valueCode": c.source}),
        ];
        if let Some(v) = c.verified_at {
            part.push(json!({"name": "verified", "valueInstant": at(v)}));
        }
        parameter.push(json!({"name": "contact", "part": part}));
    }
    let has_prefs = store
        .query::<Read>(
            "SELECT COUNT(*) AS n FROM notify_prefs WHERE person = ?",
            vec![person.into()],
        )?
        .first()
        .is_some_and(|r| r.n > 0);
    if has_prefs {
        let p = preferences_of(store, person)?;
        let mut part = vec![
            json!({"name": "email", "valueBoolean": p["email"]["on"].as_bool().unwrap_or(false)}),
            json!({"name": "sms", "valueBoolean": p["sms"]["on"].as_bool().unwrap_or(false)}),
            json!({"name": "new-message-notices", "valueBoolean": p["kinds"]["new-message"].as_bool().unwrap_or(true)}),
            json!({"name": "reminder-notices", "valueBoolean": p["kinds"]["reminder"].as_bool().unwrap_or(true)}),
            json!({"name": "digest-minutes", "valueInteger": p["digest_minutes"].as_i64().unwrap_or(0)}),
        ];
        if let (Some(f), Some(t), Some(z)) = (
            p["quiet"]["from"].as_str(),
            p["quiet"]["to"].as_str(),
            p["quiet"]["time_zone"].as_str(),
        ) {
            part.push(json!({"name": "quiet-hours", "valueString": format!("{f}-{t} {z}")}));
        }
        parameter.push(json!({"name": "preferences", "part": part}));
    }
    let devices = push::count(store, person)?;
    if devices > 0 {
        parameter.push(json!({"name": "push-devices", "valueInteger": devices}));
    }
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = Text)]
        kind: String,
        #[diesel(sql_type = Nullable<Text>)]
        channel: Option<String>,
        #[diesel(sql_type = Text)]
        state: String,
        #[diesel(sql_type = Text)]
        about: String,
        #[diesel(sql_type = BigInt)]
        created_at: i64,
        #[diesel(sql_type = Nullable<BigInt>)]
        sent_at: Option<i64>,
    }
    let notices: Vec<N> = store.query(
        "SELECT kind, channel, state, about, created_at, sent_at FROM notices WHERE person = ? ORDER BY created_at, id",
        vec![person.into()],
    )?;
    for n in notices {
        let mut part = vec![
            json!({"name": "kind", "valueCode": n.kind}),
            json!({"name": "channel", "valueCode": n.channel.unwrap_or_else(|| "email".into())}),
            json!({"name": "state", "valueCode": n.state}),
            json!({"name": "about", "valueReference": {"reference": n.about}}),
            json!({"name": "created", "valueInstant": at(n.created_at)}),
        ];
        if let Some(s) = n.sent_at {
            part.push(json!({"name": "sent", "valueInstant": at(s)}));
        }
        parameter.push(json!({"name": "notice", "part": part}));
    }
    Ok((!parameter.is_empty()).then(|| {
        json!({"resourceType": "Parameters", "id": "notification-settings", "parameter": parameter})
    }))
}

/// `GET /notify/preferences`: the signed-in person's channels (masked) and quiet hours.
async fn get_preferences(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
) -> HttpResponse {
    let person = match person_of(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    let store = state.store.clone();
    let settings = state.settings.clone();
    let got = web::block(move || preferences_full(&store, &settings, &person));
    match got.await {
        Ok(Ok(v)) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(v),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

/// `PUT /notify/preferences` (`{"email": {"on"}, "sms": {"on"}, "quiet": {"from": "22:00",
/// "to": "07:00", "time_zone": "Europe/London"} | null}`): bad input is a 400 OperationOutcome
/// and changes nothing.
async fn put_preferences(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    use crate::fhir::outcome::FhirError;
    let bad = |what: &str, why: &str| {
        actix_web::ResponseError::error_response(&FhirError::at(
            actix_web::http::StatusCode::BAD_REQUEST,
            "invalid",
            what,
            why,
        ))
    };
    let person = match person_of(&req) {
        Ok(p) => p,
        Err(e) => return actix_web::ResponseError::error_response(&e),
    };
    if body.len() > 4096 {
        return bad("preferences", "the request is too large");
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return bad("preferences", "the request is not JSON");
    };
    let flag = |k: &str| match &v[k]["on"] {
        Value::Null => Ok(None),
        Value::Bool(b) => Ok(Some(*b)),
        _ => Err(format!("{k}.on must be true or false")),
    };
    let (email, sms) = match (flag("email"), flag("sms")) {
        (Ok(e), Ok(s)) => (e, s),
        (Err(e), _) | (_, Err(e)) => return bad("preferences", &e),
    };
    let mut kinds_off: Option<Vec<&str>> = None;
    if let Some(k) = v.get("kinds").filter(|k| !k.is_null()) {
        let Some(obj) = k.as_object() else {
            return bad(
                "kinds",
                "kinds is an object such as {\"new-message\": true, \"reminder\": false}",
            );
        };
        let mut off = vec![];
        for (name, on) in obj {
            let known = ["new-message", "reminder"].into_iter().find(|x| x == name);
            match (known, on.as_bool()) {
                (Some(kn), Some(false)) => off.push(kn),
                (Some(_), Some(true)) => {}
                _ => {
                    return bad(
                        "kinds",
                        "kinds are new-message and reminder, each true or false",
                    )
                }
            }
        }
        kinds_off = Some(off);
    }
    let digest = match &v["digest_minutes"] {
        Value::Null => None,
        d => match d.as_i64().filter(|m| (0..=1440).contains(m)) {
            Some(m) => Some(m),
            None => {
                return bad(
                    "digest_minutes",
                    "digest_minutes is a whole number of minutes from 0 (none) to 1440",
                )
            }
        },
    };
    let quiet_given = v.get("quiet").is_some();
    let quiet = match &v["quiet"] {
        Value::Null => None,
        q => {
            let time = |k: &str| {
                q[k].as_str().filter(|s| {
                    chrono::NaiveTime::parse_from_str(s, "%H:%M").is_ok() && s.len() == 5
                })
            };
            let (Some(from), Some(to)) = (time("from"), time("to")) else {
                return bad("quiet", "quiet hours are two times as HH:MM, from and to");
            };
            let Some(zone) = q["time_zone"]
                .as_str()
                .filter(|z| z.parse::<chrono_tz::Tz>().is_ok())
            else {
                return bad(
                    "quiet.time_zone",
                    "the time zone must be an IANA name such as Europe/London",
                );
            };
            if from == to {
                return bad(
                    "quiet",
                    "quiet hours must not start and end at the same time",
                );
            }
            Some((from.to_string(), to.to_string(), zone.to_string()))
        }
    };
    // `language`: one of the languages notices are written in, or null for the record's.
    let language: Option<Option<String>> = match v.get("language") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(l))
            if templates::languages(&state.settings)
                .iter()
                .any(|(c, _)| c == l) =>
        {
            Some(Some(l.clone()))
        }
        Some(_) => {
            let known: Vec<String> = templates::languages(&state.settings)
                .into_iter()
                .map(|(c, _)| c)
                .collect();
            return bad(
                "language",
                &format!("language is one of {} (or null)", known.join(", ")),
            );
        }
    };
    let store = state.store.clone();
    let settings = state.settings.clone();
    let done = web::block(move || -> Result<Value, StoreError> {
        prefs(&store, &person)?;
        let t = now();
        if let Some(on) = email {
            store.execute("UPDATE notify_prefs SET email_off = ?, updated_at = ? WHERE person = ?", vec![(if on { 0 } else { t }).into(), t.into(), person.clone().into()])?;
        }
        if let Some(on) = sms {
            store.execute("UPDATE notify_prefs SET sms_off = ?, updated_at = ? WHERE person = ?", vec![(if on { 0 } else { t }).into(), t.into(), person.clone().into()])?;
        }
        if let Some(off) = &kinds_off {
            store.execute("UPDATE notify_prefs SET kinds_off = ? WHERE person = ?", vec![off.join(" ").into(), person.clone().into()])?;
        }
        if let Some(m) = digest {
            store.execute("UPDATE notify_prefs SET digest_minutes = ? WHERE person = ?", vec![m.into(), person.clone().into()])?;
        }
        let (f, to, z) = match &quiet {
            Some((f, to, z)) => (Some(f.clone()), Some(to.clone()), Some(z.clone())),
            None => (None, None, None),
        };
        // Quiet hours change only when the request names them (null: none).
        if quiet_given {
            store.execute(
                "UPDATE notify_prefs SET quiet_from = ?, quiet_to = ?, time_zone = ?, updated_at = ? WHERE person = ?",
                vec![f.into(), to.into(), z.into(), t.into(), person.clone().into()],
            )?;
        }
        if let Some(lang) = &language {
            // Chosen in the app: the EHR's record no longer sets it (null: back to the record's
            // at the next launch, else the clinic's default).
            store.execute(
                "UPDATE notify_prefs SET language = ?, language_chosen = ? WHERE person = ?",
                vec![lang.clone().into(), i64::from(lang.is_some()).into(), person.clone().into()],
            )?;
        }
        preferences_full(&store, &settings, &person)
    })
    .await;
    match done {
        Ok(Ok(v)) => HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(v),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

fn token_of(q: &str) -> Option<String> {
    form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "t")
        .map(|(_, v)| v.into_owned())
        .filter(|t| !t.is_empty() && t.len() <= 64)
}

fn small_page(title: &str, body: &str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CONTENT_SECURITY_POLICY, "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"))
        .content_type("text/html; charset=utf-8")
        .body(format!(
            "<!doctype html><html lang=\"en\"><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{title}</title><main style=\"font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em\"><h1>{title}</h1>{body}</main></html>"
        ))
}

/// `GET /notify/unsubscribe?t=…`: a page with one button (a link checker must not unsubscribe).
async fn unsubscribe_page(req: actix_web::HttpRequest) -> HttpResponse {
    let Some(t) = token_of(req.query_string()) else {
        return small_page("Email notices", "<p>This link is not complete.</p>");
    };
    let t = t.replace('"', "");
    small_page(
        "Stop email notices?",
        &format!("<p>You will no longer get emails telling you about new secure messages. You can still read them when you sign in.</p>\
         <form method=\"post\" action=\"/notify/unsubscribe?t={t}\"><button type=\"submit\" style=\"min-height:44px;font-size:1em\">Stop these emails</button></form>"),
    )
}

/// `POST /notify/unsubscribe?t=…` (RFC 8058 one-click, or the page's button).
async fn unsubscribe(
    state: web::Data<crate::api::AppState>,
    req: actix_web::HttpRequest,
) -> HttpResponse {
    let Some(t) = token_of(req.query_string()) else {
        return small_page("Email notices", "<p>This link is not complete.</p>");
    };
    let store = state.store.clone();
    let n = web::block(move || {
        store.execute(
            "UPDATE notify_prefs SET email_off = ?, updated_at = ? WHERE unsubscribe = ?",
            vec![now().into(), now().into(), t.into()],
        )
    })
    .await;
    match n {
        Ok(Ok(1)) => small_page(
            "You will get no more email notices",
            "<p>Sign in to read your secure messages whenever you like.</p>",
        ),
        // The same answer for an unknown token: it says nothing about who has one.
        Ok(Ok(_)) => small_page(
            "You will get no more email notices",
            "<p>Sign in to read your secure messages whenever you like.</p>",
        ),
        _ => HttpResponse::ServiceUnavailable().finish(),
    }
}

#[derive(QueryableByName)]
pub struct StateCount {
    #[diesel(sql_type = Text)]
    pub state: String,
    #[diesel(sql_type = BigInt)]
    pub n: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub oldest: Option<i64>,
}

/// Prometheus text for `/metrics`: notices per state (the backlog is `pending`, failures
/// `parked` and `uncertain`), and the age of the oldest pending one.
pub fn metrics(store: &Store) -> Result<String, StoreError> {
    let rows = status(store)?;
    let mut out = String::from("# HELP courier_notices Notices of messages outside the app, by state.\n# TYPE courier_notices gauge\n");
    for s in [
        "pending",
        "sending",
        "sent",
        "skipped",
        "parked",
        "uncertain",
        "expanded",
    ] {
        let n = rows.iter().find(|r| r.state == s).map_or(0, |r| r.n);
        out.push_str(&format!("courier_notices{{state=\"{s}\"}} {n}\n"));
    }
    let oldest = rows
        .iter()
        .find(|r| r.state == "pending")
        .and_then(|r| r.oldest)
        .map_or(0, |t| (now() - t).max(0));
    out.push_str(&format!("# HELP courier_notices_oldest_pending_seconds Age of the oldest pending notice.\n# TYPE courier_notices_oldest_pending_seconds gauge\ncourier_notices_oldest_pending_seconds {oldest}\n"));
    Ok(out)
}

/// `courier notify status`: notices per state, with the oldest of each.
pub fn status(store: &Store) -> Result<Vec<StateCount>, StoreError> {
    store.query(
        "SELECT state, COUNT(*) AS n, MIN(created_at) AS oldest FROM notices GROUP BY state ORDER BY state",
        vec![],
    )
}
