//! AuditEvent write-back to EHRs through a durable outbox, so that none is ever lost.
//!
//! When an AuditEvent names a person (agent or patient entity) whom an EHR knows — an identity
//! linked to that EHR — the store writes an outbox row for that EHR in the same transaction as the
//! event ([`Store`]'s audit path calls [`enqueue`]). A worker on every instance delivers due rows:
//! it claims a row with a lease, translates the event to the EHR's references (its own reference
//! for each person, else an identifier-only reference, never a guess; Courier's own resources as
//! absolute URLs), and creates it at the EHR conditionally on the row's id
//! (`If-None-Exist: entity:identifier=urn:courier:outbox|{id}`), so a retry after a lost answer,
//! a restart or a second instance never makes a second copy. Failures back off exponentially
//! (1 s doubling to 5 min); the backlog is `courier outbox status` and `/metrics`.
//!
//! EHRs that refuse part of that request (a 400, 412, 422 or 501 to `If-None-Exist` or to
//! `Prefer: handling=strict`) are written to in the next [`WriteMode`]: without `Prefer`, then by
//! searching for the identifier and creating only when no copy exists. A refused request created
//! nothing, so stepping down never doubles an event; the mode that worked is remembered per EHR.
//! AuditEvents go to the registration's AuditEvent base when it has one (`--audit-base`).

use super::backend::{Connections, WriteMode};
use super::{identity, registry};
use crate::store::db::{Bind, Conn};
use crate::store::{Store, StoreError};
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::QueryableByName;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// The identifier system of outbox ids in delivered AuditEvents.
pub const OUTBOX_SYSTEM: &str = "urn:courier:outbox";
/// The identifier system of Communications filed to an EHR's chart (value: Courier's URL).
pub const COMMUNICATION_SYSTEM: &str = "urn:courier:communication";
const LEASE_SECS: i64 = 120;
const MAX_BACKOFF_SECS: i64 = 300;
const BATCH: i64 = 50;
/// After this many failed attempts a row is parked (kept, not retried) for an administrator.
pub const MAX_ATTEMPTS: i64 = 30;

fn now() -> i64 {
    crate::clock::now_micros() / 1_000_000
}

#[derive(QueryableByName)]
struct LinkRow {
    #[diesel(sql_type = Text)]
    person: String,
    #[diesel(sql_type = Text)]
    name: String,
}

/// Inside the AuditEvents' own transaction: for each event, one outbox row per EHR that knows the
/// event's patient (or, for an event about no patient, its user). An EHR that knows only the
/// clinician does not hear about another organisation's patient. A PostgreSQL group's events
/// come together: one lookup of the EHRs that know their people, one INSERT of their rows.
pub fn enqueue<C: Conn>(c: &mut C, events: &[(&str, &Value)]) -> Result<(), StoreError> {
    let people: Vec<(&str, Vec<String>)> = events
        .iter()
        .map(|(id, event)| (*id, people_of(event)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let mut all: Vec<&str> = people
        .iter()
        .flat_map(|(_, p)| p.iter().map(String::as_str))
        .collect();
    all.sort_unstable();
    all.dedup();
    if all.is_empty() {
        return Ok(());
    }
    // At most 256 people per lookup, the list padded to a power of two with its last value: few
    // statement shapes in each connection's prepared-statement cache, however large the group.
    let mut links: Vec<LinkRow> = Vec::new();
    for chunk in all.chunks(256) {
        let width = chunk.len().next_power_of_two();
        let ph = vec!["?"; width].join(", ");
        let mut binds: Vec<Bind> = chunk.iter().map(|p| Bind::from(*p)).collect();
        binds.resize_with(width, || Bind::from(chunk[chunk.len() - 1]));
        links.extend(c.load_cached::<LinkRow>(
            &format!(
                "SELECT DISTINCT l.courier_ref AS person, e.name AS name FROM identity_links l JOIN ehrs e ON e.iss = l.iss \
                 WHERE l.courier_ref IN ({ph})"
            ),
            binds,
        )?);
    }
    if links.is_empty() {
        return Ok(());
    }
    let (t, created) = (now(), crate::clock::now_micros());
    let mut rows: Vec<Bind> = Vec::new();
    for (audit_id, people) in &people {
        let mut ehrs: Vec<&str> = links
            .iter()
            .filter(|l| people.contains(&l.person))
            .map(|l| l.name.as_str())
            .collect();
        ehrs.sort_unstable();
        ehrs.dedup();
        for ehr in ehrs {
            rows.extend([
                uuid::Uuid::now_v7().to_string().into(),
                ehr.into(),
                (*audit_id).into(),
                created.into(),
                t.into(),
            ]);
        }
    }
    crate::store::multi_insert_rows(
        c,
        "INSERT INTO",
        "outbox (id, ehr, res_type, res_id, created_at, attempts, next_attempt_at)",
        "(?, ?, 'AuditEvent', ?, ?, 0, ?)",
        5,
        rows,
    )
}

/// Whom the event is about: its patient entities, else its agents (Courier identities).
fn people_of(event: &Value) -> Vec<String> {
    let person = |r: &&str| {
        identity::KINDS
            .iter()
            .any(|k| r.starts_with(&format!("{k}/")))
    };
    let patients: Vec<&str> = event["entity"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["role"]["code"] == "1")
        .filter_map(|e| e["what"]["reference"].as_str())
        .filter(person)
        .collect();
    let mut out: Vec<String> = if patients.is_empty() {
        event["agent"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["who"]["reference"].as_str())
            .filter(person)
            .map(String::from)
            .collect()
    } else {
        patients.into_iter().map(String::from).collect()
    };
    out.sort();
    out.dedup();
    out
}

#[derive(QueryableByName)]
struct DueRow {
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = Text)]
    ehr: String,
    #[diesel(sql_type = Text)]
    res_type: String,
    #[diesel(sql_type = Text)]
    res_id: String,
    #[diesel(sql_type = BigInt)]
    attempts: i64,
}

/// Runs the delivery loop until the task is dropped.
pub fn spawn(store: Arc<Store>, connections: Arc<Connections>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = deliver_due(&store, &connections).await {
                tracing::error!(error = %e, "outbox delivery round failed");
            }
        }
    })
}

/// Delivers the rows that are due; returns how many were delivered.
pub async fn deliver_due(
    store: &Arc<Store>,
    connections: &Connections,
) -> Result<usize, StoreError> {
    let s = store.clone();
    let due: Vec<DueRow> = tokio::task::spawn_blocking(move || {
        s.query(
            "SELECT id, ehr, res_type, res_id, attempts FROM outbox WHERE delivered_at IS NULL AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
            vec![now().into(), BATCH.into()],
        )
    })
    .await
    .map_err(|e| StoreError::Other(e.into()))??;
    let mut delivered = 0;
    for row in due {
        // Claim it with a lease: another instance (or round) skips it until the lease ends.
        let (s, id) = (store.clone(), row.id.clone());
        let claimed = tokio::task::spawn_blocking(move || {
            let t = now();
            s.execute(
                "UPDATE outbox SET next_attempt_at = ? WHERE id = ? AND delivered_at IS NULL AND next_attempt_at <= ?",
                vec![(t + LEASE_SECS).into(), id.into(), t.into()],
            )
        })
        .await
        .map_err(|e| StoreError::Other(e.into()))??;
        if claimed == 0 {
            continue;
        }
        let result = deliver(store, connections, &row).await;
        let s = store.clone();
        let ok = result.is_ok();
        tokio::task::spawn_blocking(move || match result {
            Ok(()) => s.execute(
                "UPDATE outbox SET delivered_at = ?, last_error = NULL, attempts = attempts + 1 WHERE id = ?",
                vec![crate::clock::now_micros().into(), row.id.into()],
            ),
            Err(why) => {
                let backoff = if row.attempts + 1 >= MAX_ATTEMPTS {
                    // Parked: kept for an administrator (courier outbox status), never dropped.
                    i64::MAX / 4
                } else {
                    (1i64 << row.attempts.clamp(0, 16)).min(MAX_BACKOFF_SECS)
                };
                tracing::warn!(outbox = %row.id, ehr = %row.ehr, attempts = row.attempts + 1, error = %why, "write-back failed; will retry");
                s.execute(
                    "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? WHERE id = ?",
                    vec![(now() + backoff).into(), why.into(), row.id.into()],
                )
            }
        })
        .await
        .map_err(|e| StoreError::Other(e.into()))??;
        delivered += ok as usize;
    }
    Ok(delivered)
}

async fn deliver(
    store: &Arc<Store>,
    connections: &Connections,
    row: &DueRow,
) -> Result<(), String> {
    let (s, ehr_name, rt, rid) = (
        store.clone(),
        row.ehr.clone(),
        row.res_type.clone(),
        row.res_id.clone(),
    );
    let (ehr, stored) = tokio::task::spawn_blocking(move || {
        let ehr = registry::get(&s, &ehr_name).map_err(|e| e.to_string())?;
        let stored = s.read(&rt, &rid).map_err(|e| e.to_string())?;
        Ok::<_, String>((ehr, stored))
    })
    .await
    .map_err(|e| e.to_string())??;
    let ehr = ehr.ok_or("the EHR is no longer registered")?;
    let event: Value = serde_json::from_slice(stored.body.as_deref().unwrap_or_default())
        .map_err(|_| "the stored event is not JSON")?;
    // AuditEvents at the registration's AuditEvent base, if any; everything else at the iss.
    let base = match (&ehr.audit_base, row.res_type.as_str()) {
        (Some(b), "AuditEvent") => b.clone(),
        _ => ehr.iss.clone(),
    };
    let s = store.clone();
    let iss = ehr.iss.clone();
    let outbox_id = row.id.clone();
    // At another base, the EHR's references are made absolute (they are relative to the iss).
    let absolute = base != ehr.iss;
    let (translated, condition) =
        tokio::task::spawn_blocking(move || translate(&s, &iss, absolute, event, &outbox_id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    let token = connections.token(store, &ehr).await?;
    let write = Write {
        connections,
        ehr: &ehr.name,
        url: format!("{base}/{}", row.res_type),
        token: &token,
        body: translated.to_string(),
        condition: &condition,
    };
    // The mode that worked last for this EHR, base and type; a refusal steps to the next one.
    let key = format!("{} {}", ehr.name, write.url);
    let first = connections.write_mode(&key);
    let mut refused = vec![];
    for mode in WriteMode::ALL.into_iter().skip_while(|m| *m != first) {
        match write.attempt(mode).await? {
            Attempt::Done => {
                if mode != first {
                    connections.remember_write_mode(&key, mode);
                    tracing::info!(ehr = %ehr.name, res_type = %row.res_type, conditional = mode.conditional,
                        strict = mode.strict, "write-back: the EHR takes idempotent creates this way");
                }
                return Ok(());
            }
            Attempt::Refused(status) => refused.push(status.to_string()),
        }
    }
    Err(format!(
        "the EHR refused every way of writing (answers {})",
        refused.join(", ")
    ))
}

/// Answers that refuse a request's form (an unsupported `If-None-Exist` or `Prefer`, or a 412 to
/// the condition): nothing was created, and the next [`WriteMode`] is tried.
const REFUSALS: [u16; 4] = [400, 412, 422, 501];

enum Attempt {
    Done,
    Refused(u16),
}

/// One resource to create at the EHR, with its identifier search (`param=system|value`).
struct Write<'a> {
    connections: &'a Connections,
    ehr: &'a str,
    url: String,
    token: &'a str,
    body: String,
    condition: &'a str,
}

impl Write<'_> {
    /// The identifier Courier's copy carries (the condition's `system|value`).
    fn identifier(&self) -> (&str, &str) {
        self.condition
            .split_once('=')
            .and_then(|(_, v)| v.split_once('|'))
            .unwrap_or_default()
    }

    /// Whether `resource` is Courier's copy: it carries the identifier exactly (a Communication's
    /// `identifier`, an AuditEvent's `entity.what.identifier`).
    fn is_ours(&self, resource: &Value) -> bool {
        let (system, value) = self.identifier();
        let ours = |i: &Value| i["system"] == system && i["value"] == value;
        resource["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .any(ours)
            || resource["entity"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| ours(&e["what"]["identifier"]))
    }

    fn unauthorized(&self) -> String {
        self.connections.forget(self.ehr);
        "the EHR refused Courier's token (401)".into()
    }

    /// Creates the resource in `mode`: conditionally (the EHR finds an earlier copy), or after a
    /// search for the identifier that found none.
    async fn attempt(&self, mode: WriteMode) -> Result<Attempt, String> {
        let http = self.connections.discovery().http();
        let unreachable =
            |e: reqwest::Error| format!("the EHR could not be reached: {}", e.without_url());
        if !mode.conditional {
            let (param, id) = self.condition.split_once('=').unwrap_or_default();
            let mut url = reqwest::Url::parse(&self.url).map_err(|e| e.to_string())?;
            url.query_pairs_mut().append_pair(param, id);
            let mut req = http
                .get(url.as_str())?
                .bearer_auth(self.token)
                .header("accept", "application/fhir+json");
            if mode.strict {
                // An EHR that does not know the parameter must refuse, not ignore it.
                req = req.header("prefer", "handling=strict");
            }
            let res = req.send().await.map_err(unreachable)?;
            match res.status().as_u16() {
                200 => {}
                401 => return Err(self.unauthorized()),
                403 => {
                    return Err(
                        "the EHR refused the search for Courier's copy (403): without \
                        conditional create, the backend scope needs search (system/AuditEvent.cs)"
                            .into(),
                    )
                }
                s if REFUSALS.contains(&s) => return Ok(Attempt::Refused(s)),
                s => {
                    return Err(format!(
                        "the EHR answered {s} to the search for Courier's copy"
                    ))
                }
            }
            let bundle: Value = res
                .json()
                .await
                .map_err(|_| "the EHR's search answer is not JSON")?;
            let found: Vec<&Value> = bundle["entry"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| e["search"]["mode"] != "include" && e["search"]["mode"] != "outcome")
                .map(|e| &e["resource"])
                .collect();
            // A server that ignored the parameter answers with other resources: creating then
            // could double the event, so nothing is written.
            if found.iter().any(|r| !self.is_ours(r)) {
                return Err("the EHR's search did not filter by Courier's identifier".into());
            }
            if !found.is_empty() {
                return Ok(Attempt::Done);
            }
            if bundle["resourceType"] != "Bundle" || bundle["total"].as_u64().unwrap_or(0) > 0 {
                return Err("the EHR's search answer cannot be read as no copy".into());
            }
        }
        let mut req = http
            .post(&self.url)?
            .bearer_auth(self.token)
            .header("content-type", "application/fhir+json")
            .header("accept", "application/fhir+json");
        if mode.conditional {
            req = req.header("if-none-exist", self.condition);
        }
        if mode.strict {
            // An EHR that does not understand the condition must refuse, not ignore it.
            req = req.header("prefer", "handling=strict");
        }
        let res = req
            .body(self.body.clone())
            .send()
            .await
            .map_err(unreachable)?;
        match res.status().as_u16() {
            201 => Ok(Attempt::Done),
            200 => {
                // A match: it must be our earlier copy (its identifier exactly), or the EHR
                // ignored the condition and answered with something else.
                let body: Value = res.json().await.unwrap_or(Value::Null);
                if self.is_ours(&body) {
                    Ok(Attempt::Done)
                } else {
                    Err("the EHR answered 200 with a resource that is not Courier's copy".into())
                }
            }
            401 => Err(self.unauthorized()),
            s if REFUSALS.contains(&s) => Ok(Attempt::Refused(s)),
            s => Err(format!("the EHR answered {s}")),
        }
    }
}

/// The resource as the EHR should see it — its references, Courier's resources as absolute URLs —
/// with a stable identifier, and the conditional-create search that finds an earlier copy. An
/// AuditEvent is identified by its outbox id (each event is delivered once); a filed Communication
/// by its Courier URL (filing a thread twice adds nothing).
fn translate(
    store: &Store,
    iss: &str,
    absolute: bool,
    mut event: Value,
    outbox_id: &str,
) -> Result<(Value, String), StoreError> {
    let courier_url = format!(
        "{}/{}/{}",
        store.base_url,
        event["resourceType"].as_str().unwrap_or_default(),
        event["id"].as_str().unwrap_or_default()
    );
    if let Some(o) = event.as_object_mut() {
        o.remove("id");
        // Courier's version and time are not the EHR's; the security labels go with the resource
        // (a staff-only message filed to the chart must still say it is not for the patient).
        let security = o
            .remove("meta")
            .and_then(|mut m| m.get_mut("security").map(Value::take))
            .filter(|s| s.as_array().is_some_and(|a| !a.is_empty()));
        if let Some(security) = security {
            o.insert("meta".into(), serde_json::json!({ "security": security }));
        }
        // Not for another organisation's eyes: the raw search (other people's ids and search
        // terms), the returned OperationOutcome, network addresses.
        o.remove("contained");
    }
    // (`get_mut`, not indexing: indexing a missing key would insert a null)
    for e in event
        .get_mut("entity")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(o) = e.as_object_mut() {
            o.remove("query");
            let contained = o
                .get("what")
                .and_then(|w| w.get("reference"))
                .and_then(Value::as_str)
                == Some("#oo1");
            if contained {
                o.remove("what");
            }
        }
    }
    for a in event
        .get_mut("agent")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if let Some(o) = a.as_object_mut() {
            o.remove("network");
            if let Some(who) = o.get_mut("who").and_then(Value::as_object_mut) {
                if who.get("reference").is_none() {
                    who.remove("display");
                }
            }
        }
    }
    if event["resourceType"] == "Communication" {
        // Who a message is from and to is what its references say, as Courier checked them: an
        // extension on a participant is the writer's own claim (an outside walk-through's
        // patient added an invented "on behalf of" a clinician to her sender, and filing wrote
        // it into the chart as that clinician's). Not filed.
        for element in ["sender", "recipient", "subject"] {
            match event.get_mut(element) {
                Some(Value::Array(a)) => a.iter_mut().for_each(strip_extensions),
                Some(v) => strip_extensions(v),
                None => {}
            }
        }
    }
    rewrite(store, iss, absolute, &mut event)?;
    if event["resourceType"] == "Communication" {
        let id = json!({"system": COMMUNICATION_SYSTEM, "value": courier_url});
        match event.get_mut("identifier").and_then(Value::as_array_mut) {
            Some(a) => a.push(id),
            None => event["identifier"] = json!([id]),
        }
        return Ok((
            event,
            format!("identifier={COMMUNICATION_SYSTEM}|{courier_url}"),
        ));
    }
    let entity = json!({
        "what": {"identifier": {"system": OUTBOX_SYSTEM, "value": outbox_id}},
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
        "description": "Courier outbox delivery id"
    });
    match event.get_mut("entity").and_then(Value::as_array_mut) {
        Some(a) => a.push(entity),
        None => event["entity"] = json!([entity]),
    }
    Ok((
        event,
        format!("entity:identifier={OUTBOX_SYSTEM}|{outbox_id}"),
    ))
}

fn strip_extensions(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("extension");
    }
}

/// Files resources to an EHR's chart through the outbox (the "file to chart" operation).
pub fn enqueue_filing(
    store: &Store,
    ehr: &str,
    items: &[(String, String)],
) -> Result<(), StoreError> {
    let mut c = store.db.get()?;
    crate::with_conn!(c, |c| {
        c.write_tx(|c| {
        for (res_type, id) in items {
            c.execute(
                "INSERT INTO outbox (id, ehr, res_type, res_id, created_at, attempts, next_attempt_at) VALUES (?, ?, ?, ?, ?, 0, ?)",
                vec![
                    uuid::Uuid::now_v7().to_string().into(),
                    ehr.into(),
                    res_type.clone().into(),
                    id.clone().into(),
                    crate::clock::now_micros().into(),
                    now().into(),
                ],
            )?;
        }
        Ok::<_, StoreError>(())
    })
    })
}

/// Courier's references to the EHR's (relative to `iss`, or made absolute when the resource goes to
/// another base), Courier's own resources to absolute URLs.
fn rewrite(store: &Store, iss: &str, absolute: bool, v: &mut Value) -> Result<(), StoreError> {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("reference").cloned() {
                let person = identity::KINDS
                    .iter()
                    .any(|k| r.starts_with(&format!("{k}/")));
                if person {
                    o.remove("reference");
                    o.remove("display");
                    match identity::ehr_reference(store, iss, &r)? {
                        Some(Value::Object(mut m)) => {
                            if let Some(Value::String(theirs)) = m.get_mut("reference") {
                                if absolute && !theirs.contains("://") {
                                    *theirs = format!("{}/{theirs}", iss.trim_end_matches('/'));
                                }
                            }
                            o.extend(m)
                        }
                        _ => {
                            o.insert("display".into(), json!("a person this EHR does not know"));
                        }
                    }
                } else if !r.starts_with('#') && !r.contains("://") && r.contains('/') {
                    o.insert("reference".into(), json!(format!("{}/{r}", store.base_url)));
                }
            }
            for (k, x) in o.iter_mut() {
                if k != "reference" {
                    rewrite(store, iss, absolute, x)?;
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                rewrite(store, iss, absolute, x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[derive(Debug, QueryableByName, serde::Serialize)]
pub struct Backlog {
    #[diesel(sql_type = Text)]
    pub ehr: String,
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
    #[diesel(sql_type = BigInt)]
    pub delivered: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub oldest_pending: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    pub last_error: Option<String>,
}

/// The backlog per EHR: pending and delivered counts, the oldest undelivered item (micros).
pub fn status(store: &Store) -> Result<Vec<Backlog>, StoreError> {
    store.query(
        "SELECT ehr, \
            CAST(SUM(CASE WHEN delivered_at IS NULL THEN 1 ELSE 0 END) AS BIGINT) AS pending, \
            CAST(SUM(CASE WHEN delivered_at IS NULL THEN 0 ELSE 1 END) AS BIGINT) AS delivered, \
            MIN(CASE WHEN delivered_at IS NULL THEN created_at END) AS oldest_pending, \
            MAX(CASE WHEN delivered_at IS NULL THEN last_error END) AS last_error \
         FROM outbox GROUP BY ehr ORDER BY ehr",
        vec![],
    )
}

/// Prometheus text for `/metrics` (counts and ages only).
pub fn metrics(store: &Store) -> Result<String, StoreError> {
    let mut out = String::from(
        "# HELP courier_outbox_pending Items waiting for delivery to an EHR.\n# TYPE courier_outbox_pending gauge\n",
    );
    let rows = status(store)?;
    for r in &rows {
        out.push_str(&format!(
            "courier_outbox_pending{{ehr=\"{}\"}} {}\n",
            r.ehr, r.pending
        ));
    }
    out.push_str("# HELP courier_outbox_delivered Items delivered to an EHR.\n# TYPE courier_outbox_delivered counter\n");
    for r in &rows {
        out.push_str(&format!(
            "courier_outbox_delivered{{ehr=\"{}\"}} {}\n",
            r.ehr, r.delivered
        ));
    }
    out.push_str("# HELP courier_outbox_oldest_pending_seconds Age of the oldest undelivered item.\n# TYPE courier_outbox_oldest_pending_seconds gauge\n");
    for r in &rows {
        let age = r
            .oldest_pending
            .map_or(0, |t| (crate::clock::now_micros() - t) / 1_000_000);
        out.push_str(&format!(
            "courier_outbox_oldest_pending_seconds{{ehr=\"{}\"}} {age}\n",
            r.ehr
        ));
    }
    Ok(out)
}

/// Erasure (the store's erase hook): outbox rows naming these resources (AuditEvents for the EHRs,
/// messages filed to a chart).
pub fn erase<C: Conn>(c: &mut C, res_type: &str, ids: &[&str]) -> Result<(), StoreError> {
    let marks = vec!["?"; ids.len()].join(", ");
    let mut binds: Vec<crate::store::db::Bind> = vec![res_type.into()];
    binds.extend(ids.iter().map(|i| (*i).into()));
    c.execute(
        &format!("DELETE FROM outbox WHERE res_type = ? AND res_id IN ({marks})"),
        binds,
    )?;
    Ok(())
}
