//! Out-of-office / do-not-disturb, as FHIR: a practitioner (or an administrator) keeps a
//! `PractitionerRole` with `practitioner` = them and `notAvailable` periods — `during` the time
//! away, `description` the automatic reply — and optionally the extension
//! `https://courier.example.org/fhir/StructureDefinition/delegate` naming who covers for them.
//!
//! While a practitioner is away, a message addressed to them directly gets (run by the leader,
//! once per message and recipient):
//! - an automatic reply to its sender (`inResponseTo` the message, same thread, the description
//!   as text), and
//! - when a delegate is named, a copy to the delegate (`inResponseTo` the message, its text),
//!   and the delegate joins the message's thread (a recipient of its header, [`join_op`]) while
//!   the cover lasts ([`end_covers`]), so that it is in their list and the patient's replies
//!   reach them.
//!
//! Both are marked with the `automatic` extension and are never answered automatically in turn.
//! Escalation (`escalation.rs`) does not remind someone who is away: it goes to their delegate at
//! once (else to the configured backup).

use crate::audit;
use crate::clock::now_micros;
use crate::search::dates::{self, format_instant};
use crate::store::{Incoming, Store, StoreError, WriteOp};
use diesel::sql_types::Text;
use diesel::QueryableByName;
use serde_json::{json, Value};
use std::collections::HashMap;

pub const EXT_DELEGATE: &str = "https://courier.example.org/fhir/StructureDefinition/delegate";
pub const EXT_AUTOMATIC: &str = "https://courier.example.org/fhir/StructureDefinition/automatic";
/// On a thread header's recipient Courier added while a colleague is away: whom they cover for
/// (`valueReference`), so that everyone in the conversation is told why they are there.
pub const EXT_COVERING: &str = "https://courier.example.org/fhir/StructureDefinition/covering-for";
const CURSOR: &str = "away";

/// Away now: the automatic reply and the delegate, if any.
#[derive(Debug, Clone)]
pub struct Away {
    pub reply: String,
    pub delegate: Option<String>,
    /// The end of the time away as its PractitionerRole gives it (a FHIR dateTime), if it has one.
    pub until: Option<String>,
    /// When the time away began (µs), if it says.
    pub since: Option<i64>,
}

#[derive(QueryableByName)]
struct IdRow {
    #[diesel(sql_type = Text)]
    fhir_id: String,
}

/// The live `res_type` resources whose `param` refers to the local `target_type/id`.
fn referrers(
    store: &Store,
    res_type: &str,
    param: &str,
    target_type: &str,
    id: &str,
) -> Result<Vec<IdRow>, StoreError> {
    store.query(
        "SELECT r.fhir_id FROM idx_ref x JOIN resources r ON r.rid = x.rid \
         WHERE x.param = ? AND x.target_type = ? AND x.target_id = ? AND x.url IS NULL \
         AND r.res_type = ? AND r.deleted = 0",
        vec![
            store.registry.index_name(res_type, param).into(),
            crate::search::names::ty(target_type).into(),
            id.into(),
            res_type.into(),
        ],
    )
}

/// At most this many of a practitioner's PractitionerRoles are read (the last changed: the one
/// just set away counts, however many others there are; the app reads as many) to tell whether
/// they are away: each is decrypted and parsed at every lookup, and a probe's practitioner made
/// every automatic reply wait half a minute with sixty roles of a megabyte.
pub const ROLES_READ: i64 = 20;

/// Is `who` (`Practitioner/…`) away at `at` (µs)? Blocking.
pub fn away(store: &Store, who: &str, at: i64) -> Result<Option<Away>, StoreError> {
    let Some(("Practitioner", id)) = who.split_once('/') else {
        return Ok(None);
    };
    let roles: Vec<IdRow> = store.query(
        "SELECT r.fhir_id FROM idx_ref x JOIN resources r ON r.rid = x.rid \
         WHERE x.param = ? AND x.target_type = ? AND x.target_id = ? AND x.url IS NULL \
         AND r.res_type = 'PractitionerRole' AND r.deleted = 0 ORDER BY r.last_updated DESC LIMIT ?",
        vec![
            store
                .registry
                .index_name("PractitionerRole", "practitioner")
                .into(),
            crate::search::names::ty("Practitioner").into(),
            id.into(),
            ROLES_READ.into(),
        ],
    )?;
    for role in roles {
        let Ok(s) = store.read("PractitionerRole", &role.fhir_id) else {
            continue;
        };
        let v = json_of(&s);
        if v["active"] == false {
            continue;
        }
        for n in v["notAvailable"].as_array().into_iter().flatten() {
            let start = n["during"]["start"]
                .as_str()
                .and_then(dates::range)
                .map(|r| r.0);
            let end = n["during"]["end"]
                .as_str()
                .and_then(dates::range)
                .map(|r| r.1);
            if start.is_some_and(|s| s > at) || end.is_some_and(|e| e < at) {
                continue;
            }
            let delegate = delegate_of(&v, &store.base_url);
            return Ok(Some(Away {
                reply: n["description"]
                    .as_str()
                    .unwrap_or("I am away.")
                    .to_string(),
                delegate,
                until: n["during"]["end"].as_str().map(String::from),
                since: start,
            }));
        }
    }
    Ok(None)
}

/// The delegate a PractitionerRole names, when it is staff (a local `Practitioner/…` or
/// `PractitionerRole/…`): a delegate gets copies of every message sent to the one away, so
/// anyone else named (a patient, a group, another server's address) is ignored, and logged.
/// Writes refuse such a delegate ([`check_delegate`]); this holds for what was stored before.
pub fn delegate_of(role: &Value, base: &str) -> Option<String> {
    let named = role["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["url"] == EXT_DELEGATE)
        .and_then(|e| e["valueReference"]["reference"].as_str())?;
    let local = super::hub::local_ref(named, base);
    if is_staff(&local) {
        Some(local)
    } else {
        tracing::warn!("an out-of-office delegate that is not a Practitioner or PractitionerRole of this server is ignored");
        None
    }
}

fn is_staff(r: &str) -> bool {
    r.split_once('/').is_some_and(|(t, id)| {
        matches!(t, "Practitioner" | "PractitionerRole") && fhir_codec::is_valid_id(id)
    })
}

/// A PractitionerRole's delegate, as written: a Practitioner or PractitionerRole of this server
/// (422 otherwise: the delegate is sent a copy of every message to the one away, so a patient
/// named there — by mistake or not — would read other patients' messages).
pub fn check_delegate(role: &Value, base: &str) -> Result<(), String> {
    for (i, e) in role["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if e["url"] != EXT_DELEGATE {
            continue;
        }
        let ok = e["valueReference"]["reference"]
            .as_str()
            .is_some_and(|r| is_staff(&super::hub::local_ref(r, base)));
        if !ok {
            return Err(format!("PractitionerRole.extension[{i}]"));
        }
    }
    Ok(())
}

/// A stored version's body as JSON (`null` when it has none or it cannot be read).
fn json_of(s: &crate::store::Stored) -> Value {
    serde_json::from_slice(s.body.as_deref().unwrap_or_default()).unwrap_or(Value::Null)
}

/// At most this many `notAvailable` periods per PractitionerRole.
pub const MAX_PERIODS: usize = 20;
/// At most this many characters of automatic reply (`notAvailable.description`).
pub const MAX_REPLY_CHARS: usize = 1000;
/// At most this many bytes of PractitionerRole.
pub const MAX_ROLE_BYTES: usize = 32 * 1024;

/// A PractitionerRole is read at every "is this practitioner away" and its description sent to
/// everyone who writes to them: a probe's roles of a megabyte made every automatic reply wait
/// half a minute, and a reply of a megabyte went out for each two-byte message. 422 beyond
/// [`MAX_PERIODS`], [`MAX_REPLY_CHARS`], [`MAX_ROLE_BYTES`]: (where, why).
pub fn check_size(role: &Value) -> Result<(), (String, String)> {
    let periods = role["notAvailable"].as_array().map_or(0, |a| a.len());
    if periods > MAX_PERIODS {
        return Err((
            "PractitionerRole.notAvailable".into(),
            format!("at most {MAX_PERIODS} periods away (got {periods})"),
        ));
    }
    for (i, n) in role["notAvailable"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let chars = n["description"].as_str().map_or(0, |d| d.chars().count());
        if chars > MAX_REPLY_CHARS {
            return Err((
                format!("PractitionerRole.notAvailable[{i}].description"),
                format!("an automatic reply of at most {MAX_REPLY_CHARS} characters (got {chars})"),
            ));
        }
    }
    let bytes = role.to_string().len();
    if bytes > MAX_ROLE_BYTES {
        return Err((
            "PractitionerRole".into(),
            format!("a PractitionerRole of at most {MAX_ROLE_BYTES} bytes (got {bytes})"),
        ));
    }
    Ok(())
}

/// Whether `v` is a message Courier wrote for someone out of office (its [`EXT_AUTOMATIC`] mark).
pub fn is_automatic(v: &Value) -> bool {
    v["extension"]
        .as_array()
        .is_some_and(|x| x.iter().any(|e| e["url"] == EXT_AUTOMATIC))
}

/// The "covering for" notes ([`EXT_COVERING`]) on `v`'s recipients: (the recipient, the
/// colleague they cover for), as written. `None` when the extension appears anywhere else, or
/// without a reference (Courier puts it only on a recipient, naming a colleague).
pub fn covering_notes(v: &Value) -> Option<Vec<(String, String)>> {
    let mut notes = vec![];
    for r in v["recipient"].as_array().into_iter().flatten() {
        for e in r["extension"].as_array().into_iter().flatten() {
            if e["url"] == EXT_COVERING {
                let who = e["valueReference"]["reference"].as_str()?;
                notes.push((r["reference"].as_str()?.to_string(), who.to_string()));
            }
        }
    }
    (extensions_of(v, EXT_COVERING) == notes.len()).then_some(notes)
}

/// How many extensions with this `url` `v` holds, anywhere in it.
pub fn extensions_of(v: &Value, url: &str) -> usize {
    match v {
        Value::Object(m) => {
            usize::from(m.get("url").and_then(Value::as_str) == Some(url))
                + m.values().map(|x| extensions_of(x, url)).sum::<usize>()
        }
        Value::Array(a) => a.iter().map(|x| extensions_of(x, url)).sum(),
        _ => 0,
    }
}

fn ctx(store: &Store) -> audit::Context {
    audit::Context::job(&store.base_url, "out-of-office")
}

/// At start: a database that never ran this job answers only messages that arrive from now on
/// (not its whole history).
pub fn init(store: &Store) -> Result<(), StoreError> {
    super::events::cursor(store, CURSOR).map(|_| ())
}

/// Events read at a time.
const BATCH: i64 = 500;
/// A pass takes batches while the log has more, for at most this long (the next pass, a second
/// later, takes the rest).
const PASS: std::time::Duration = std::time::Duration::from_secs(5);

/// One pass over the new messages: every batch the log holds, up to [`PASS`]. Blocking. Returns
/// the automatic messages written.
///
/// A pass once took 200 events a second whatever the log held: after a burst (an integrator's
/// 10,000 reminders) a message to an away clinician waited its turn for minutes before its
/// auto-reply and its copy to the covering colleague. Now a pass reads on until it has caught up,
/// and a message's body is read only when one of its recipients is away (whose status is looked
/// up once per batch).
pub fn run(store: &Store) -> Result<usize, StoreError> {
    let started = std::time::Instant::now();
    let mut written = end_covers(store)?;
    loop {
        let (n, read) = batch(store)?;
        written += n;
        if read < BATCH as usize || started.elapsed() >= PASS {
            return Ok(written);
        }
    }
}

/// One batch of the log after the job's cursor: (automatic messages written, events read).
///
/// Who is away is looked up once per batch, after the batch is read, so after every message in
/// it was written: a clinician who went away before their message was written is seen as away
/// (a review: remembered for a whole pass, a status looked up before the message could be stale).
fn batch(store: &Store) -> Result<(usize, usize), StoreError> {
    let cursor = super::events::cursor(store, CURSOR)?;
    let rows = super::events::after(store, cursor, BATCH)?;
    let Some(last) = rows.last().map(|r| r.seq) else {
        return Ok((0, 0));
    };
    let mut written = 0;
    let now = now_micros();
    let mut away_now: HashMap<String, Option<Away>> = HashMap::new();
    // Messages sent by this batch: those created as sent, and drafts sent (an update out of
    // `preparation`: the app saves what a patient types as a draft and sends it by updating it;
    // an outside walk-through's patient got no auto-reply, and the covering colleague no copy,
    // for a message sent after "Draft saved").
    let mut sent: Vec<&super::events::EventRow> = rows
        .iter()
        .filter(|e| e.kind == "create" && e.res_type == "Communication")
        .collect();
    // A message withdrawn is withdrawn from the delegate too: its copies go the same way (an
    // outside probe's delegate kept the text and the photo of a message its patient withdrew).
    for e in rows
        .iter()
        .filter(|e| e.kind == "update" && e.res_type == "Communication")
    {
        let Ok(s) = store.vread("Communication", &e.fhir_id, e.version_id) else {
            continue;
        };
        let v = json_of(&s);
        if v["status"] == "entered-in-error" {
            written += recall_copies(store, &e.fhir_id)?;
        } else if v["status"] == "completed" && e.version_id > 1 {
            let was_draft = store
                .vread("Communication", &e.fhir_id, e.version_id - 1)
                .ok()
                .and_then(|s| serde_json::from_slice::<Value>(s.body.as_deref()?).ok())
                .is_some_and(|before| before["status"] == "preparation");
            if was_draft {
                sent.push(e);
            }
        }
    }
    let created = sent;
    let ids: Vec<&str> = created.iter().map(|e| e.fhir_id.as_str()).collect();
    let to_someone_away = to_someone_away(store, &ids, now, &mut away_now)?;
    for e in created {
        if !to_someone_away.contains(&e.fhir_id) {
            continue;
        }
        let Ok(s) = store.vread("Communication", &e.fhir_id, e.version_id) else {
            continue;
        };
        let msg = json_of(&s);
        // A thread's header (no text of its own) is not a message to answer or to copy (a probe:
        // a header sent `completed` got its own reply and an empty forward).
        if msg["status"] != "completed"
            || is_automatic(&msg)
            || msg["payload"].as_array().is_none_or(|p| p.is_empty())
        {
            continue;
        }
        let sender = msg["sender"]["reference"]
            .as_str()
            .map(|r| super::hub::local_ref(r, &store.base_url));
        let mut away_recipients = vec![];
        for to in msg["recipient"].as_array().into_iter().flatten() {
            let Some(to) = to["reference"]
                .as_str()
                .map(|r| super::hub::local_ref(r, &store.base_url))
            else {
                continue;
            };
            if Some(&to) == sender.as_ref() {
                continue;
            }
            let known = match away_now.get(&to) {
                Some(known) => known.clone(),
                None => {
                    let found = away(store, &to, now)?;
                    away_now.insert(to.clone(), found.clone());
                    found
                }
            };
            if let Some(away) = known {
                away_recipients.push((to, away));
            }
        }
        if away_recipients.is_empty() {
            continue;
        }
        // Withdrawn or deleted since (in this batch, or while the job was behind): nothing is
        // copied (a code review: the copy would have outlived the withdrawal).
        let now_stored = store
            .read("Communication", &e.fhir_id)
            .ok()
            .and_then(|s| serde_json::from_slice::<Value>(s.body.as_deref()?).ok());
        if now_stored.is_none_or(|v| v["status"] == "entered-in-error") {
            continue;
        }
        for (to, away) in away_recipients {
            // Once per message and recipient, whoever runs this.
            let claimed = store.execute(
                "INSERT INTO away_handled (comm_id, recipient, at) VALUES (?, ?, ?) ON CONFLICT (comm_id, recipient) DO NOTHING",
                vec![e.fhir_id.clone().into(), to.clone().into(), now.into()],
            )?;
            if claimed == 0 {
                continue;
            }
            let mut ops = vec![];
            let base = json!({
                "resourceType": "Communication",
                "status": "completed",
                "inResponseTo": [{"reference": format!("Communication/{}", e.fhir_id)}],
                "sender": {"reference": to},
                "sent": format_instant(now),
            });
            let with = |mut v: Value, kind: &str, recipient: &str, payload: Value| {
                v["extension"] = json!([{"url": EXT_AUTOMATIC, "valueCode": kind}]);
                v["recipient"] = json!([{"reference": recipient}]);
                v["payload"] = payload;
                for k in ["partOf", "subject", "category", "priority"] {
                    if let Some(x) = msg.get(k) {
                        v[k] = x.clone();
                    }
                }
                // A forward to a colleague is staff-only; a reply to a patient is not.
                super::staff_only::label_derived(store, "Communication", &mut v, &msg);
                v
            };
            // The covering colleague writing in the thread (the away clinician among its
            // recipients) needs neither a reply saying they cover nor a copy of their own words
            // (an outside walk-through's colleague got both); a delegate the message already
            // reaches needs no copy.
            if sender.is_some() && sender == away.delegate {
                continue;
            }
            let reaches = |who: &str| {
                msg["recipient"].as_array().into_iter().flatten().any(|r| {
                    r["reference"]
                        .as_str()
                        .is_some_and(|x| super::hub::local_ref(x, &store.base_url) == who)
                })
            };
            // One automatic reply per conversation and time away: a patient writing three times
            // in a thread is told once (a walk-through: identical replies stacked up).
            let told = match (&sender, thread_of(&msg, &store.base_url)) {
                // A time away without a start: the last week (not any earlier absence).
                (Some(s), Some(t)) => replied_in(
                    store,
                    &t,
                    &to,
                    s,
                    away.since.unwrap_or(now - 7 * 86_400_000_000),
                )?,
                _ => false,
            };
            if let Some(sender) = sender.as_ref().filter(|_| !told) {
                ops.push(with(
                    base.clone(),
                    "auto-reply",
                    sender,
                    json!([{"contentString": away.reply}]),
                ));
            }
            if let Some(d) = away.delegate.as_deref().filter(|d| !reaches(d)) {
                // Said in words, not by reference (the walk-through's colleague read "Forwarded
                // while Practitioner/3JxNk5T50UlwoiWw4BXu3x is away"), with whose words follow:
                // the copy's sender is the one away, and its subject names the patient.
                let whose = match sender.as_deref().and_then(|r| r.split_once('/')) {
                    Some(("Patient", _)) => "the patient's message",
                    Some(("RelatedPerson", _)) => "the message from the patient's relative",
                    Some(("Practitioner" | "PractitionerRole", _)) => "a colleague's message",
                    _ => "the message",
                };
                let mut payload = vec![json!({"contentString": format!(
                    "Forwarded automatically while I am away. Below is {whose}, as it was written."
                )})];
                payload.extend(msg["payload"].as_array().cloned().unwrap_or_default());
                ops.push(with(base.clone(), "forward", d, json!(payload)));
            }
            if ops.is_empty() {
                continue;
            }
            let copies: Vec<WriteOp> = ops
                .into_iter()
                .map(|v| WriteOp::Create {
                    res_type: "Communication".into(),
                    id: crate::fhir::rest::new_id(),
                    resource: Incoming::from_value(v),
                    if_none_exist: None,
                })
                .collect();
            let delegate = away.delegate.as_deref().filter(|d| !reaches(d));
            written += write_copies(store, copies, &msg, &to, delegate)?;
        }
    }
    super::events::move_cursor(store, CURSOR, last)?;
    Ok((written, rows.len()))
}

/// Writes the automatic messages for one message and recipient, and — when a copy goes to a
/// delegate — has the delegate join the thread (see [`join_op`]) in the same transaction: a header
/// changed meanwhile is read again (up to three times, then the copies go without the join), so
/// neither the copies nor the join are lost to a conflict. Returns the resources written.
fn write_copies(
    store: &Store,
    copies: Vec<WriteOp>,
    msg: &Value,
    away_who: &str,
    delegate: Option<&str>,
) -> Result<usize, StoreError> {
    for attempt in 0..4 {
        let join = match delegate {
            Some(d) if attempt < 3 => join_op(store, msg, away_who, d)?,
            _ => None,
        };
        let mut ops = copies.clone();
        if let Some((header, op)) = join {
            let Some(d) = delegate else { break };
            // Recorded before the write (a crash after it leaves no delegate joined for good):
            // the join is undone when the cover ends ([`end_covers`]).
            store.execute(
                "INSERT INTO away_joins (header_id, delegate, away) VALUES (?, ?, ?) ON CONFLICT (header_id, delegate, away) DO NOTHING",
                vec![header.into(), d.into(), away_who.into()],
            )?;
            ops.extend(op);
        }
        let n = ops.len();
        match store.write(ops, &ctx(store)) {
            Ok(_) => return Ok(n),
            Err(StoreError::PreconditionFailed(_) | StoreError::Conflict(_)) if attempt < 3 => {
                continue
            }
            Err(e) => return Err(e),
        }
    }
    Ok(0)
}

/// The update by which the delegate joins the thread of a message forwarded to them: a recipient
/// of its header, so that the conversation is in their own list — not only with that patient open
/// in their EHR — and what is written in it next (the patient's replies, addressed to the header's
/// participants) reaches them directly (an outside walk-through's covering colleague could not
/// find the copy, and the patient's replies went on to the clinician who was away). Made on the
/// version read (If-Match). `None` — the copy alone — unless the message's `partOf` is a thread
/// header (no `partOf` and no text of its own, neither a draft nor withdrawn), about the same
/// patient, that the clinician away takes part in, and which the delegate does not take part in
/// already; and never from a staff-only message into a thread the patient reads (a review: a side
/// note between colleagues would have shown the patient a new participant). The join lasts while
/// the clinician is away with this delegate ([`end_covers`]).
fn join_op(
    store: &Store,
    msg: &Value,
    away_who: &str,
    delegate: &str,
) -> Result<Option<(String, Option<WriteOp>)>, StoreError> {
    let local = |r: &Value| {
        r["reference"]
            .as_str()
            .map(|x| super::hub::local_ref(x, &store.base_url))
    };
    let Some(header) = thread_of(msg, &store.base_url) else {
        return Ok(None);
    };
    let Ok(now) = store.read("Communication", &header) else {
        return Ok(None);
    };
    let Some(mut h) = now
        .body
        .as_deref()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
    else {
        return Ok(None);
    };
    let takes_part = |h: &Value, who: &str| {
        local(&h["sender"]).as_deref() == Some(who)
            || h["recipient"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|r| local(r).as_deref() == Some(who))
    };
    let is_header = h.get("partOf").is_none()
        && h.get("payload").is_none()
        && !matches!(
            h["status"].as_str(),
            Some("preparation" | "entered-in-error")
        );
    if !is_header
        || local(&h["subject"]) != local(&msg["subject"])
        || !takes_part(&h, away_who)
        || (super::staff_only::is_labelled(msg) && !super::staff_only::is_labelled(&h))
    {
        return Ok(None);
    }
    if takes_part(&h, delegate) {
        // Already there: by a cover for another colleague away, this cover is recorded too (so
        // that the delegate stays while either lasts); otherwise they take part of their own.
        let joined: Vec<HeaderRow> = store.query(
            "SELECT header_id FROM away_joins WHERE header_id = ? AND delegate = ? LIMIT 1",
            vec![header.clone().into(), delegate.into()],
        )?;
        return Ok((!joined.is_empty()).then_some((header, None)));
    }
    let joined = json!({"reference": delegate,
        "extension": [{"url": EXT_COVERING, "valueReference": {"reference": away_who}}]});
    match h["recipient"].as_array_mut() {
        Some(to) => to.push(joined),
        None => h["recipient"] = json!([joined]),
    }
    Ok(Some((
        header.clone(),
        Some(WriteOp::Update {
            res_type: "Communication".into(),
            id: header,
            resource: Incoming::from_value(h),
            if_match: Some(now.version_id),
            upsert: false,
            patch: false,
            guard: None,
            may_create: false,
        }),
    )))
}

/// The thread (`Communication/…` id of its `partOf`) a message belongs to, if local, read as the
/// index reads the reference (`Communication/H/_history/1` is thread H: a probe got an automatic
/// reply for each message naming it so).
fn thread_of(msg: &Value, base: &str) -> Option<String> {
    msg["partOf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["reference"].as_str())
        .filter_map(|r| crate::search::index::parse_reference(r, base))
        .find(|p| p.url.is_none() && p.target_type.as_deref() == Some("Communication"))
        .and_then(|p| p.target_id)
}

/// The live messages of `thread` whose reference parameters name each of `refs` (`(param,
/// "Type/id")`), last changed at `since` (µs) or later, after row `after`, in row order, at most
/// `limit`. From the index rows alone.
fn in_thread(
    store: &Store,
    thread: &str,
    refs: &[(&str, &str)],
    since: i64,
    after: i64,
    limit: i64,
) -> Result<Vec<RidRow>, StoreError> {
    let mut joins = String::new();
    let mut conds = String::new();
    let mut binds: Vec<crate::store::db::Bind> = vec![
        store.registry.index_name("Communication", "part-of").into(),
        crate::search::names::ty("Communication").into(),
        thread.into(),
    ];
    for (i, (param, target)) in refs.iter().enumerate() {
        let Some((t, id)) = target.split_once('/') else {
            return Ok(vec![]);
        };
        joins.push_str(&format!(" JOIN idx_ref x{i} ON x{i}.rid = a.rid"));
        conds.push_str(&format!(
            " AND x{i}.param = ? AND x{i}.target_type = ? AND x{i}.target_id = ? AND x{i}.url IS NULL"
        ));
        binds.extend([
            store.registry.index_name("Communication", param).into(),
            crate::search::names::ty(t).into(),
            id.into(),
        ]);
    }
    binds.extend([since.into(), after.into(), limit.into()]);
    store.query(
        &format!(
            "SELECT r.rid, r.fhir_id FROM idx_ref a{joins} JOIN resources r ON r.rid = a.rid \
             WHERE a.param = ? AND a.target_type = ? AND a.target_id = ? AND a.url IS NULL{conds} \
             AND r.res_type = 'Communication' AND r.deleted = 0 AND r.last_updated >= ? AND r.rid > ? \
             ORDER BY r.rid LIMIT ?"
        ),
        binds,
    )
}

/// Has `away_who` already sent `sender` an automatic reply in `thread` since `since` (µs)?
fn replied_in(
    store: &Store,
    thread: &str,
    away_who: &str,
    sender: &str,
    since: i64,
) -> Result<bool, StoreError> {
    let found = in_thread(
        store,
        thread,
        &[("sender", away_who), ("recipient", sender)],
        since,
        0,
        20,
    )?;
    for f in found {
        let Ok(s) = store.read("Communication", &f.fhir_id) else {
            continue;
        };
        let v = json_of(&s);
        if v["extension"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|x| x["url"] == EXT_AUTOMATIC && x["valueCode"] == "auto-reply")
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[derive(QueryableByName)]
struct CoverRow {
    #[diesel(sql_type = Text)]
    away: String,
    #[diesel(sql_type = Text)]
    delegate: String,
}

#[derive(QueryableByName)]
struct RidRow {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    rid: i64,
    #[diesel(sql_type = Text)]
    fhir_id: String,
}

#[derive(QueryableByName)]
struct HeaderRow {
    #[diesel(sql_type = Text)]
    header_id: String,
}

/// Ends the covers that are over: a delegate who joined a thread while a colleague was away
/// ([`join_op`]) leaves it again once that colleague is back, or names another delegate — unless
/// they sent a message in the thread themself meanwhile (then it is their conversation too), or
/// still cover it for someone else away. A review: a delegate named even for an hour would
/// otherwise have stayed in every such conversation, and received the patient's replies, for
/// good. Covers are taken by (clinician away, delegate), so the threads of covers that go on never
/// hold up those of covers that ended (a probe: 200 of them did); each pass looks up each
/// clinician with a cover once ([`away`] reads at most [`ROLES_READ`] roles). Returns the headers
/// changed.
pub fn end_covers(store: &Store) -> Result<usize, StoreError> {
    let covers: Vec<CoverRow> =
        store.query("SELECT DISTINCT away, delegate FROM away_joins", vec![])?;
    let now = now_micros();
    let mut still: HashMap<String, Option<String>> = HashMap::new();
    let (mut changed, mut failed) = (0, 0);
    for cover in covers {
        let covering = delegate_now(store, &mut still, &cover.away, now)?;
        if covering.as_deref() == Some(cover.delegate.as_str()) {
            continue;
        }
        let headers: Vec<HeaderRow> = store.query(
            "SELECT header_id FROM away_joins WHERE away = ? AND delegate = ? LIMIT 500",
            vec![cover.away.clone().into(), cover.delegate.clone().into()],
        )?;
        for h in headers {
            if failed_lately(&h.header_id) {
                continue;
            }
            let done = match end_cover_in(store, &mut still, now, &cover, &h.header_id) {
                Ok(done) => done,
                // One thread that cannot be seen to now (a message unreadable, the database
                // failing) keeps its record for the next pass; the others go on (a pass that
                // stopped at it would leave every cover behind it running, and the new messages
                // waiting). A few in one pass: the database is failing, stop here.
                Err(e) => {
                    failed += 1;
                    note_failed(&h.header_id);
                    tracing::warn!(error = %e, "a cover's end was not carried out in one thread; tried again in 10 minutes");
                    if failed >= 3 {
                        return Ok(changed);
                    }
                    continue;
                }
            };
            match done {
                Leave::Left => changed += 1,
                Leave::Stays => {}
                // Changed meanwhile three times: the next check tries again.
                Leave::Again => continue,
            }
            store.execute(
                "DELETE FROM away_joins WHERE header_id = ? AND delegate = ? AND away = ?",
                vec![
                    h.header_id.into(),
                    cover.delegate.clone().into(),
                    cover.away.clone().into(),
                ],
            )?;
        }
    }
    Ok(changed)
}

/// How long a thread whose cover's end failed is left before it is tried again: a damaged row
/// would otherwise be retried (and logged) every second, and three of them, first in the list,
/// would end every pass before the covers behind them (a review).
const RETRY_FAILED: std::time::Duration = std::time::Duration::from_secs(600);

fn failures() -> &'static std::sync::Mutex<HashMap<String, std::time::Instant>> {
    static FAILED: std::sync::OnceLock<std::sync::Mutex<HashMap<String, std::time::Instant>>> =
        std::sync::OnceLock::new();
    FAILED.get_or_init(Default::default)
}

/// Did ending a cover in `header` fail less than [`RETRY_FAILED`] ago (on this instance)?
fn failed_lately(header: &str) -> bool {
    let mut f = failures().lock().unwrap_or_else(|p| p.into_inner());
    f.retain(|_, at| at.elapsed() < RETRY_FAILED);
    f.contains_key(header)
}

/// Forgets the threads whose cover's end failed, so that the next pass tries each again at once
/// (after a damaged row is repaired; tests).
pub fn retry_failed_covers() {
    failures().lock().unwrap_or_else(|p| p.into_inner()).clear();
}

fn note_failed(header: &str) {
    let mut f = failures().lock().unwrap_or_else(|p| p.into_inner());
    f.insert(header.to_string(), std::time::Instant::now());
}

/// What ending `cover` does in thread `header`: the delegate leaves it, or stays (as a
/// participant of their own, or still covering for another colleague away, said so).
fn end_cover_in(
    store: &Store,
    still: &mut HashMap<String, Option<String>>,
    now: i64,
    cover: &CoverRow,
    header: &str,
) -> Result<Leave, StoreError> {
    // Still covering this thread for another colleague away: stays.
    let others: Vec<CoverRow> = store.query(
        "SELECT away, delegate FROM away_joins WHERE header_id = ? AND delegate = ? AND away <> ?",
        vec![
            header.into(),
            cover.delegate.clone().into(),
            cover.away.clone().into(),
        ],
    )?;
    let mut kept = None;
    for o in others {
        let d = delegate_now(store, still, &o.away, now)?;
        if d.as_deref() == Some(cover.delegate.as_str()) {
            kept = Some(o.away);
        }
    }
    let Some(other) = kept else {
        return leave_thread(store, header, &cover.delegate);
    };
    // Said to cover for the colleague still away (if Courier added them at all). A header that
    // cannot be read now is tried again at the next pass, not taken as having no note.
    let noted = message(store, header)?
        .is_some_and(|s| covering_noted(&json_of(&s), &cover.delegate, &store.base_url));
    if noted {
        edit_entry(store, header, &cover.delegate, Entry::Note(Some(&other)))
    } else {
        Ok(Leave::Stays)
    }
}

/// Does the header say `delegate` covers for someone ([`EXT_COVERING`] on their entry)?
fn covering_noted(h: &Value, delegate: &str, base: &str) -> bool {
    h["recipient"].as_array().into_iter().flatten().any(|r| {
        r["reference"]
            .as_str()
            .is_some_and(|x| super::hub::local_ref(x, base) == delegate)
            && r["extension"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["url"] == EXT_COVERING)
    })
}

/// Who covers for `who` now, if they are away (looked up once per [`end_covers`] pass).
fn delegate_now(
    store: &Store,
    still: &mut HashMap<String, Option<String>>,
    who: &str,
    now: i64,
) -> Result<Option<String>, StoreError> {
    if let Some(d) = still.get(who) {
        return Ok(d.clone());
    }
    let d = away(store, who, now)?.and_then(|a| a.delegate);
    still.insert(who.to_string(), d.clone());
    Ok(d)
}

/// A Communication as stored; `None` when it is not there (deleted, erased), an error when it
/// could not be read now.
fn message(store: &Store, id: &str) -> Result<Option<crate::store::Stored>, StoreError> {
    match store.read("Communication", id) {
        Ok(s) => Ok(Some(s)),
        Err(StoreError::NotFound(..) | StoreError::Gone(..)) => Ok(None),
        Err(e) => Err(e),
    }
}

enum Leave {
    Left,
    Stays,
    Again,
}

/// Takes `delegate` off the header's recipients, unless they sent a message of their own in the
/// thread (a draft, a withdrawn message or an automatic one does not count: a probe kept a
/// delegate in a patient's thread for good with a draft it then deleted); one who stays is no
/// longer said to be covering ([`EXT_COVERING`]). On the version read; a header changed
/// meanwhile is read again.
fn leave_thread(store: &Store, header: &str, delegate: &str) -> Result<Leave, StoreError> {
    if !delegate.contains('/') {
        return Ok(Leave::Stays);
    }
    // Every message of theirs in the thread, a page at a time (a probe hid a real reply behind
    // 205 drafts when only 200 were read), up to 5,000.
    let mut after = 0i64;
    for _ in 0..25 {
        let theirs = in_thread(store, header, &[("sender", delegate)], 0, after, 200)?;
        let Some(last) = theirs.last().map(|r| r.rid) else {
            break;
        };
        for m in &theirs {
            // One that cannot be read now stops the pass (the record is kept and the thread
            // looked at again): skipping it could take out a delegate who replied.
            let Some(s) = message(store, &m.fhir_id)? else {
                continue;
            };
            let v = json_of(&s);
            // Sent, not automatic, and to someone other than themself (a note to self kept a
            // probe's delegate in the patient's thread).
            let to_another = v["recipient"].as_array().into_iter().flatten().any(|r| {
                r["reference"]
                    .as_str()
                    .map(|x| super::hub::local_ref(x, &store.base_url))
                    .is_some_and(|x| x != delegate)
            });
            if matches!(v["status"].as_str(), Some("completed" | "in-progress"))
                && !is_automatic(&v)
                && to_another
            {
                // A participant of their own now: no longer said to be covering.
                return Ok(
                    match edit_entry(store, header, delegate, Entry::Note(None))? {
                        Leave::Again => Leave::Again,
                        Leave::Left | Leave::Stays => Leave::Stays,
                    },
                );
            }
        }
        after = last;
    }
    edit_entry(store, header, delegate, Entry::Remove)
}

/// What [`edit_entry`] does to a delegate's entry among a header's recipients.
enum Entry<'a> {
    Remove,
    /// Its "covering for" note names this colleague, or (`None`) none.
    Note(Option<&'a str>),
}

/// Edits `delegate`'s entry among the header's recipients. `Left` when the header was changed,
/// `Stays` when there was nothing to change, `Again` when it kept changing meanwhile.
fn edit_entry(
    store: &Store,
    header: &str,
    delegate: &str,
    what: Entry,
) -> Result<Leave, StoreError> {
    for _ in 0..3 {
        // A header gone has no entry to edit; one that cannot be read now is tried again at
        // the next pass (an error keeps the record), not taken as nothing to do.
        let Some(now) = message(store, header)? else {
            return Ok(Leave::Stays);
        };
        let Some(mut h) = now
            .body
            .as_deref()
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        else {
            return Ok(Leave::Stays);
        };
        let Some(to) = h["recipient"].as_array_mut() else {
            return Ok(Leave::Stays);
        };
        let theirs = |r: &Value| {
            r["reference"]
                .as_str()
                .map(|x| super::hub::local_ref(x, &store.base_url))
                .as_deref()
                == Some(delegate)
        };
        let before = to.clone();
        match what {
            Entry::Remove => to.retain(|r| !theirs(r)),
            Entry::Note(who) => {
                for r in to.iter_mut().filter(|r| theirs(r)) {
                    let mut ext: Vec<Value> = r["extension"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|e| e["url"] != EXT_COVERING)
                        .cloned()
                        .collect();
                    if let Some(who) = who {
                        ext.push(
                            json!({"url": EXT_COVERING, "valueReference": {"reference": who}}),
                        );
                    }
                    match r.as_object_mut() {
                        Some(o) if ext.is_empty() => {
                            o.remove("extension");
                        }
                        Some(o) => {
                            o.insert("extension".into(), Value::Array(ext));
                        }
                        None => {}
                    }
                }
            }
        }
        if *to == before {
            return Ok(Leave::Stays);
        }
        if to.is_empty() {
            h.as_object_mut().map(|o| o.remove("recipient"));
        }
        let op = WriteOp::Update {
            res_type: "Communication".into(),
            id: header.into(),
            resource: Incoming::from_value(h),
            if_match: Some(now.version_id),
            upsert: false,
            patch: false,
            guard: None,
            may_create: false,
        };
        match store.write(vec![op], &ctx(store)) {
            Ok(_) => return Ok(Leave::Left),
            Err(StoreError::PreconditionFailed(_) | StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(Leave::Again)
}

#[derive(QueryableByName)]
struct RecipientRow {
    #[diesel(sql_type = Text)]
    fhir_id: String,
    #[diesel(sql_type = Text)]
    target_id: String,
}

/// Of the messages `ids`, those with a Practitioner among their recipients who is away at `now`
/// (`away_now` remembers who is, for the batch). From the index rows: most messages go to
/// someone who is in, and their bodies are not read (each would be decrypted and inflated); and
/// only a recipient with a PractitionerRole at all (where an absence is set) is looked up (one
/// lookup per recipient of the batch was one in every eleven statements of a PostgreSQL create).
fn to_someone_away(
    store: &Store,
    ids: &[&str],
    now: i64,
    away_now: &mut HashMap<String, Option<Away>>,
) -> Result<std::collections::HashSet<String>, StoreError> {
    let mut found = std::collections::HashSet::new();
    if ids.is_empty() {
        return Ok(found);
    }
    let marks = vec!["?"; ids.len()].join(", ");
    let mut binds: Vec<crate::store::db::Bind> = vec![
        store
            .registry
            .index_name("Communication", "recipient")
            .into(),
        crate::search::names::ty("Practitioner").into(),
    ];
    binds.extend(ids.iter().map(|i| (*i).into()));
    binds.push(
        store
            .registry
            .index_name("PractitionerRole", "practitioner")
            .into(),
    );
    // SQLite, which has no statistics here, would otherwise read every recipient row of the
    // store through the lookup index (param = ?) and join the messages to it (a review read the
    // plan): its reference rows are pinned to their key, (rid, param, n), so the batch's messages
    // drive.
    let pin = match store.db {
        crate::store::db::Db::Sqlite(..) => " INDEXED BY sqlite_autoindex_idx_ref_1",
        crate::store::db::Db::Postgres(_) => "",
    };
    let rows: Vec<RecipientRow> = store.query(
        &format!(
            "SELECT r.fhir_id, x.target_id FROM resources r JOIN idx_ref x{pin} ON x.rid = r.rid \
             WHERE x.param = ? AND x.target_type = ? AND x.url IS NULL \
             AND r.res_type = 'Communication' AND r.deleted = 0 AND r.fhir_id IN ({marks}) \
             AND EXISTS (SELECT 1 FROM idx_ref y JOIN resources p ON p.rid = y.rid \
             WHERE y.param = ? AND y.target_id = x.target_id AND y.target_type = x.target_type \
             AND y.url IS NULL AND p.res_type = 'PractitionerRole' AND p.deleted = 0)"
        ),
        binds,
    )?;
    for r in rows {
        let who = format!("Practitioner/{}", r.target_id);
        let is_away = match away_now.get(&who) {
            Some(known) => known.is_some(),
            None => {
                let a = away(store, &who, now)?;
                let is = a.is_some();
                away_now.insert(who, a);
                is
            }
        };
        if is_away {
            found.insert(r.fhir_id);
        }
    }
    Ok(found)
}

/// Withdraws the automatic copies of message `id` sent to delegates (see [`run`]). Returns how
/// many were withdrawn now.
fn recall_copies(store: &Store, id: &str) -> Result<usize, StoreError> {
    let copies = referrers(
        store,
        "Communication",
        "in-response-to",
        "Communication",
        id,
    )?;
    let mut n = 0;
    for c in copies {
        let Ok(s) = store.read("Communication", &c.fhir_id) else {
            continue;
        };
        let mut v = json_of(&s);
        let forward = v["extension"].as_array().is_some_and(|x| {
            x.iter()
                .any(|e| e["url"] == EXT_AUTOMATIC && e["valueCode"] == "forward")
        });
        if !forward || v["status"] == "entered-in-error" {
            continue;
        }
        v["status"] = json!("entered-in-error");
        super::rules::recall(&mut v);
        let r = store.write(
            vec![WriteOp::Update {
                res_type: "Communication".into(),
                id: c.fhir_id.clone(),
                resource: Incoming::from_value(v),
                if_match: Some(s.version_id),
                upsert: false,
                patch: false,
                guard: None,
                may_create: false,
            }],
            &ctx(store),
        );
        match r {
            Ok(_) => n += 1,
            // Changed meanwhile: the next pass over its own update sees it.
            Err(StoreError::PreconditionFailed(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Erasure (the store's erase hook): the out-of-office marks of these Communications.
pub fn erase<C: crate::store::db::Conn>(c: &mut C, ids: &[&str]) -> Result<(), StoreError> {
    let marks = vec!["?"; ids.len()].join(", ");
    c.execute(
        &format!("DELETE FROM away_handled WHERE comm_id IN ({marks})"),
        ids.iter().map(|i| (*i).into()).collect(),
    )?;
    c.execute(
        &format!("DELETE FROM away_joins WHERE header_id IN ({marks})"),
        ids.iter().map(|i| (*i).into()).collect(),
    )?;
    Ok(())
}
