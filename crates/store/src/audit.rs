//! AuditEvents shaped per IHE Basic Audit Log Patterns (BALP): one for every interaction, success or
//! failure. Writes record theirs in the write's own transaction (see `Store::write`); reads,
//! searches and failures record theirs on their own.
//!
//! The agents are the client (network peer; later also the OAuth client), the server, and — once
//! authorization exists — the user (`Context::user`), so adding the user adds no second path.

use base64::Engine;
use serde_json::{json, Value};

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const BALP: &str = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.";

/// Who and what a request is, for its AuditEvents.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub request_id: String,
    /// The network peer's address.
    pub client_address: String,
    pub base_url: String,
    /// The authenticated user (`fhirUser` reference), once authorization provides one.
    pub user: Option<String>,
    /// The OAuth client id of the access token.
    pub client_id: Option<String>,
    /// The access token's `jti` (BALP OAuth: `agent.policy`).
    pub token_id: Option<String>,
    /// For searches: the raw request (`GET <url>`, plus the form body for `POST _search`).
    pub query: Option<String>,
    /// The user acts under an emergency-access grant: the AuditEvent's purpose is BTG.
    pub emergency: bool,
    /// Patients whose data the interaction disclosed besides the one it names (a search's
    /// results, a socket's or subscription's deliveries): each is a Patient entity, so that
    /// `AuditEvent?patient=` — a patient's accounting of disclosures — finds the event.
    pub disclosed: Vec<String>,
}

impl Context {
    /// Courier's own background work (`job`: escalation, scheduler, …) as the acting client
    /// `courier-{job}`, at address `courier {job}`.
    pub fn job(base_url: &str, job: &str) -> Context {
        Context {
            request_id: uuid::Uuid::new_v4().to_string(),
            client_address: format!("courier {job}"),
            base_url: base_url.to_string(),
            client_id: Some(format!("courier-{job}")),
            ..Context::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Read,
    Vread,
    Update,
    Patch,
    Delete,
    SearchType,
    SearchSystem,
    HistoryInstance,
    HistoryType,
    Capabilities,
    Transaction,
    Batch,
    /// An operation such as `$file-to-chart`.
    Operation,
}

impl Interaction {
    /// The `http://hl7.org/fhir/restful-interaction` code.
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Read => "read",
            Interaction::Vread => "vread",
            Interaction::Update => "update",
            Interaction::Patch => "patch",
            Interaction::Delete => "delete",
            Interaction::SearchType => "search-type",
            Interaction::SearchSystem => "search-system",
            Interaction::HistoryInstance => "history-instance",
            Interaction::HistoryType => "history-type",
            Interaction::Capabilities => "capabilities",
            Interaction::Transaction => "transaction",
            Interaction::Batch => "batch",
            Interaction::Operation => "operation",
        }
    }

    /// Does it only read (no write of the client's can have been made by it)?
    pub fn reads_only(self) -> bool {
        matches!(
            self,
            Interaction::Read
                | Interaction::Vread
                | Interaction::SearchType
                | Interaction::SearchSystem
                | Interaction::HistoryInstance
                | Interaction::HistoryType
                | Interaction::Capabilities
        )
    }

    fn action(self) -> &'static str {
        match self {
            Interaction::Create => "C",
            Interaction::Update | Interaction::Patch => "U",
            Interaction::Delete => "D",
            Interaction::SearchType | Interaction::SearchSystem => "E",
            Interaction::Transaction | Interaction::Batch | Interaction::Operation => "E",
            _ => "R",
        }
    }

    /// BALP profile base name, when BALP defines one for the interaction.
    fn profile(self) -> Option<&'static str> {
        match self {
            Interaction::Create => Some("Create"),
            Interaction::Read | Interaction::Vread => Some("Read"),
            Interaction::Update | Interaction::Patch => Some("Update"),
            Interaction::Delete => Some("Delete"),
            Interaction::SearchType | Interaction::SearchSystem => Some("Query"),
            _ => None,
        }
    }

    /// (client agent type, server agent type) codings per BALP: the party that receives data is the
    /// destination; delete uses application/custodian.
    fn agent_types(self) -> (Value, Value) {
        let dcm = |code: &str, display: &str| json!({"coding": [{"system": DCM, "code": code, "display": display}]});
        let source = dcm("110153", "Source Role ID");
        let dest = dcm("110152", "Destination Role ID");
        match self {
            Interaction::Delete => (
                dcm("110150", "Application"),
                json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "custodian", "display": "Custodian"}]}),
            ),
            Interaction::Create | Interaction::Update | Interaction::Patch => (source, dest),
            Interaction::SearchType
            | Interaction::SearchSystem
            | Interaction::Transaction
            | Interaction::Batch => (source, dest),
            _ => (dest, source),
        }
    }
}

/// A failed interaction: HTTP status and the OperationOutcome returned.
pub struct Failure<'a> {
    pub status: u16,
    pub outcome: &'a Value,
}

/// A JSON object of these members, in this order, moved in (`json!` would copy each Value by
/// serialising it, which was half the cost of building an AuditEvent).
fn obj<const N: usize>(members: [(&str, Value); N]) -> Value {
    Value::Object(
        members
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
    )
}

/// Builds an AuditEvent. `what` is the resource (`Type/id[/_history/v]`) for instance interactions;
/// `patient` the patient involved (`Patient/id`), which selects the BALP `Patient*` profile.
pub fn event(
    ctx: &Context,
    interaction: Interaction,
    what: Option<&str>,
    patient: Option<&str>,
    failure: Option<Failure>,
) -> Value {
    let agents = agents_of(ctx, interaction);
    let mut entities = entities_of(ctx, interaction, what, patient);
    let mut named: std::collections::BTreeSet<&str> = patient.into_iter().collect();
    for p in &ctx.disclosed {
        if named.insert(p.as_str()) {
            entities.push(patient_entity(p));
        }
    }
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "Restful Operation"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": interaction.code(), "display": interaction.code()}],
        "action": interaction.action(),
        "recorded": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "outcome": "0",
        "agent": null,
        "source": {
            "observer": {"identifier": {"system": "urn:ietf:rfc:3986", "value": ctx.base_url}, "display": "Courier"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]
        },
    });
    // Moved in rather than interpolated: `json!` copies an interpolated Value by serialising it.
    ev["agent"] = Value::Array(agents);
    match failure {
        // BALP's Patient* profiles name one patient; more disclosed take the plain profile.
        None => claim_profile(&mut ev, interaction, named.len() == 1),
        Some(f) => record_failure(&mut ev, &mut entities, f),
    }
    if !entities.is_empty() {
        ev["entity"] = Value::Array(entities);
    }
    if ctx.emergency {
        ev["purposeOfEvent"] = json!([{"coding": [BTG.clone()]}]);
    }
    ev
}

/// The agents of an interaction: the client, the server, and the user if there is one.
fn agents_of(ctx: &Context, interaction: Interaction) -> Vec<Value> {
    let (client_type, server_type) = interaction.agent_types();
    let mut agents = vec![
        client_agent(ctx, client_type),
        server_agent(ctx, server_type),
    ];
    if let Some(user) = &ctx.user {
        agents.push(user_agent(ctx, user, interaction));
    }
    agents
}

/// The client (the network peer, with its OAuth client id): the requestor unless a user acts
/// through it; without a user, the access token's `jti` is its policy.
fn client_agent(ctx: &Context, client_type: Value) -> Value {
    let client_who = match &ctx.client_id {
        Some(id) => json!({"identifier": {"value": id}, "display": ctx.client_address}),
        None => json!({"display": ctx.client_address}),
    };
    let mut client = obj([
        ("type", client_type),
        ("who", client_who),
        ("requestor", Value::Bool(ctx.user.is_none())),
        (
            "network",
            json!({"address": ctx.client_address, "type": "2"}),
        ),
    ]);
    if let (Some(jti), None) = (&ctx.token_id, &ctx.user) {
        client["policy"] = json!([jti]);
    }
    client
}

/// Courier itself, at its base URL.
fn server_agent(ctx: &Context, server_type: Value) -> Value {
    let server_who = json!({"identifier": {"system": "urn:ietf:rfc:3986", "value": ctx.base_url}, "display": "Courier"});
    obj([
        ("type", server_type),
        ("who", server_who),
        ("name", json!("Courier")),
        ("requestor", Value::Bool(false)),
        ("network", json!({"address": ctx.base_url, "type": "5"})),
    ])
}

/// The user (the requestor): recipient of what is read or searched, author of what is written;
/// with the access token's `jti` as policy, and break-the-glass as purpose under emergency access.
fn user_agent(ctx: &Context, user: &str, interaction: Interaction) -> Value {
    let code = match interaction.action() {
        "R" | "E" => ("IRCP", "information recipient"),
        _ => ("AUT", "author (originator)"),
    };
    let mut agent = json!({
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": code.0, "display": code.1}]},
        "who": {"reference": user}, "requestor": true
    });
    if let Some(jti) = &ctx.token_id {
        agent["policy"] = json!([jti]);
    }
    if ctx.emergency {
        agent["purposeOfUse"] = json!([{"coding": [BTG.clone()]}]);
    }
    agent
}

/// The entities of an interaction: the request id, then the search's query or the resource
/// acted on, then the patient.
fn entities_of(
    ctx: &Context,
    interaction: Interaction,
    what: Option<&str>,
    patient: Option<&str>,
) -> Vec<Value> {
    let mut entities = Vec::new();
    if !ctx.request_id.is_empty() {
        entities.push(json!({
            "what": {"identifier": {"value": ctx.request_id}},
            "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType", "code": "XrequestId"}
        }));
    }
    match (&ctx.query, what) {
        (Some(q), _)
            if matches!(
                interaction,
                Interaction::SearchType | Interaction::SearchSystem
            ) =>
        {
            entities.push(query_entity(q))
        }
        (_, Some(w)) => entities.push(obj([
            ("what", json!({"reference": w})),
            ("type", system_object()),
            ("role", object_role("4", "Domain Resource")),
        ])),
        _ => {}
    }
    if let Some(p) = patient {
        entities.push(patient_entity(p));
    }
    entities
}

/// The BALP Patient entity for `p` (`Patient/id`).
fn patient_entity(p: &str) -> Value {
    obj([
        ("what", json!({"reference": p})),
        (
            "type",
            json!({"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"}),
        ),
        ("role", object_role("1", "Patient")),
    ])
}

/// The four elements [`patients_of`] reads, parsed alone from a stored body (the rest of the
/// body is skipped, not built: a search names the patients of every resource it returns).
#[derive(serde::Deserialize)]
struct Participants {
    subject: Option<Value>,
    patient: Option<Value>,
    sender: Option<Value>,
    recipient: Option<Value>,
}

/// [`patients_of`] the stored bodies (JSON bytes) `bodies`.
pub fn patients_of_bodies<'a>(
    bodies: impl IntoIterator<Item = &'a [u8]>,
    base: &str,
) -> Vec<String> {
    let parts: Vec<Value> = bodies
        .into_iter()
        .filter_map(|b| serde_json::from_slice::<Participants>(b).ok())
        .map(|p| {
            json!({"subject": p.subject, "patient": p.patient, "sender": p.sender, "recipient": p.recipient})
        })
        .collect();
    patients_of(&parts, base)
}

/// Every patient `resources` concern — each Patient among their subject, patient, senders and
/// recipients, relative or written in full under `base` — once each, in first-seen order: whose
/// data an answer disclosed (a message to two patients discloses both).
pub fn patients_of<'a>(resources: impl IntoIterator<Item = &'a Value>, base: &str) -> Vec<String> {
    let mut seen = std::collections::BTreeSet::new();
    let mut out = vec![];
    for r in resources {
        for field in ["subject", "patient", "sender", "recipient"] {
            let refs: Vec<&Value> = match &r[field] {
                Value::Array(a) => a.iter().collect(),
                v @ Value::Object(_) => vec![v],
                _ => vec![],
            };
            for x in refs {
                let Some(s) = x["reference"].as_str() else {
                    continue;
                };
                let s = s
                    .strip_prefix(base)
                    .and_then(|t| t.strip_prefix('/'))
                    .unwrap_or(s);
                let s = s.split("/_history").next().unwrap_or(s);
                if s.starts_with("Patient/") && seen.insert(s.to_string()) {
                    out.push(s.to_string());
                }
            }
        }
    }
    out
}

/// A search's query (the raw request, base64) as a BALP Query entity.
fn query_entity(q: &str) -> Value {
    obj([
        ("type", system_object()),
        ("role", object_role("24", "Query")),
        (
            "query",
            Value::String(base64::engine::general_purpose::STANDARD.encode(q.as_bytes())),
        ),
    ])
}

/// The audit entity type "System Object".
fn system_object() -> Value {
    json!({"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"})
}

/// An `object-role` coding.
fn object_role(code: &str, display: &str) -> Value {
    json!({"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": code, "display": display})
}

/// A successful interaction claims its BALP profile (the `Patient*` one when a patient is
/// involved), if BALP defines one.
fn claim_profile(ev: &mut Value, interaction: Interaction, one_patient: bool) {
    if let Some(profile) = interaction.profile() {
        let name = if one_patient {
            format!("{BALP}Patient{profile}")
        } else {
            format!("{BALP}{profile}")
        };
        ev["meta"] = json!({"profile": [name]});
    }
}

/// A failed interaction's outcome (4, or 8 for a server error) and why.
fn record_failure(ev: &mut Value, entities: &mut Vec<Value>, f: Failure) {
    // BALP profiles fix outcome 0; a failure follows the pattern without claiming the profile,
    // and carries the OperationOutcome that was returned (as FHIR's error example does).
    ev["outcome"] = json!(if f.status >= 500 { "8" } else { "4" });
    ev["outcomeDesc"] = json!(format!("HTTP {}", f.status));
    let mut oo = f.outcome.clone();
    oo["id"] = json!("oo1");
    ev["contained"] = json!([oo]);
    entities.push(json!({"what": {"reference": "#oo1"},
        "type": {"system": "http://hl7.org/fhir/resource-types", "code": "OperationOutcome"}}));
}

/// HL7 v3 ActReason "break the glass": the purpose of what a user does under emergency access.
pub static BTG: std::sync::LazyLock<Value> = std::sync::LazyLock::new(
    || json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "BTG", "display": "break the glass"}),
);

/// An authentication attempt (a token request, or a request with a missing or bad access token):
/// DICOM "User Authentication" / "Login", outcome 0 or, with `failure`, 4 and why.
pub fn authentication(ctx: &Context, failure: Option<&str>) -> Value {
    let client_who = match &ctx.client_id {
        Some(id) => json!({"identifier": {"value": id}, "display": ctx.client_address}),
        None => json!({"display": ctx.client_address}),
    };
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "type": {"system": DCM, "code": "110114", "display": "User Authentication"},
        "subtype": [{"system": DCM, "code": "110122", "display": "Login"}],
        "action": "E",
        "recorded": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "outcome": "0",
        "agent": [
            {"type": {"coding": [{"system": DCM, "code": "110153", "display": "Source Role ID"}]},
             "who": client_who, "requestor": true, "network": {"address": ctx.client_address, "type": "2"}},
            {"type": {"coding": [{"system": DCM, "code": "110152", "display": "Destination Role ID"}]},
             "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": ctx.base_url}, "display": "Courier"},
             "requestor": false, "network": {"address": ctx.base_url, "type": "5"}}
        ],
        "source": {
            "observer": {"identifier": {"system": "urn:ietf:rfc:3986", "value": ctx.base_url}, "display": "Courier"},
            "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}]
        },
    });
    if !ctx.request_id.is_empty() {
        ev["entity"] = json!([{
            "what": {"identifier": {"value": ctx.request_id}},
            "type": {"system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType", "code": "XrequestId"}
        }]);
    }
    if let Some(user) = &ctx.user {
        // The person who signed in (after a SMART launch): the requestor.
        ev["agent"][0]["requestor"] = json!(false);
        ev["agent"].as_array_mut().expect("agents").push(json!({
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type", "code": "humanuser", "display": "human user"}]},
            "who": {"reference": user}, "requestor": true
        }));
    }
    if let Some(why) = failure {
        ev["outcome"] = json!("4");
        ev["outcomeDesc"] = json!(why);
    }
    ev
}

/// The patient a resource concerns: its `subject` if a Patient, else the first Patient among
/// sender and recipients.
pub fn patient_of(resource: &Value) -> Option<String> {
    let is_patient = |r: &&str| r.starts_with("Patient/");
    let refs = |v: &Value| -> Vec<String> {
        match v {
            Value::Array(a) => a
                .iter()
                .filter_map(|x| x["reference"].as_str().map(String::from))
                .collect(),
            Value::Object(_) => v["reference"]
                .as_str()
                .map(String::from)
                .into_iter()
                .collect(),
            _ => vec![],
        }
    };
    for field in ["subject", "patient", "sender", "recipient"] {
        if let Some(p) = refs(&resource[field])
            .iter()
            .map(String::as_str)
            .find(is_patient)
        {
            return Some(p.split("/_history").next().unwrap_or(p).to_string());
        }
    }
    None
}

#[cfg(test)]
mod disclosed_tests {
    use super::*;

    #[test]
    fn patients_are_read_from_the_bodies_as_from_the_resources() {
        let base = "https://courier.example";
        let bodies = [
            json!({"resourceType": "Communication", "subject": {"reference": "Patient/a"},
                "recipient": [{"reference": "Patient/b"}, {"reference": "https://courier.example/Patient/c"},
                    {"reference": "https://elsewhere.example/Patient/x"}, {"reference": "Practitioner/d"}],
                "payload": [{"contentString": "Patient/y"}]}),
            json!({"resourceType": "Communication", "sender": {"reference": "Patient/b/_history/2"}}),
            json!({"resourceType": "AuditEvent", "entity": [{"what": {"reference": "Patient/z"}}]}),
        ];
        let raw: Vec<Vec<u8>> = bodies
            .iter()
            .map(|b| serde_json::to_vec(b).unwrap())
            .collect();
        let want = vec![
            "Patient/a".to_string(),
            "Patient/b".into(),
            "Patient/c".into(),
        ];
        assert_eq!(patients_of(&bodies, base), want);
        assert_eq!(
            patients_of_bodies(raw.iter().map(Vec::as_slice), base),
            want
        );
    }
}
