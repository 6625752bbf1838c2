//! The access policy: what a [`Principal`] may do with resources of a type, expressed as search
//! conditions so that one definition serves every path — added to a search's SQL (so counts,
//! `_total` and paging never see outside the grant), checked against a single resource's index
//! entries (reads, includes, history versions, the body of a write), and checked in SQL inside a
//! write's transaction against the stored version it replaces.
//!
//! - `system/` scopes: every resource of the granted types.
//! - `patient/` scopes: the patient's compartment (R4 CompartmentDefinition `Patient`:
//!   Communication subject/sender/recipient, CommunicationRequest also requester, AuditEvent
//!   patient); a patient cannot address another patient.
//! - `user/` scopes: what the user takes part in (sender, recipient, requester; AuditEvent agent),
//!   plus the launch patient's compartment when a patient is in context.
//! - A scope with a query (`patient/Communication.rs?category=alert`) adds its conditions.
//! - `*` never names AuditEvent; a Binary follows the Communication/CommunicationRequest that
//!   attaches it (see `fhir::access`).

use super::scopes::{Context, Perm, Scope};
use super::{Principal, SubjectKind};
use crate::search::index::{self, Entry, RefParts};
use crate::search::query::{self, Condition, Limits, TokenValue};
use crate::search::Registry;
use serde_json::Value;

/// What a principal may reach of one type for one permission.
#[derive(Debug, Clone)]
pub enum Access {
    /// Every resource of the type.
    All,
    /// Only the resources matching this condition.
    Only(Condition),
}

/// Why access was refused: a sentence for the OperationOutcome that names nothing it may not see.
#[derive(Debug)]
pub struct Denied(pub String);

/// The R4 Patient compartment's parameters for the types Courier stores.
fn patient_params(res_type: &str) -> &'static [&'static str] {
    match res_type {
        "Communication" => &["subject", "sender", "recipient"],
        "CommunicationRequest" => &["subject", "sender", "recipient", "requester"],
        "AuditEvent" => &["patient"],
        "CareTeam" => &["patient", "participant"],
        "Group" => &["member"],
        _ => &[],
    }
}

/// The Patient compartment's parameters without `subject`: the patient as a participant.
fn participant_params_of_patient(res_type: &str) -> &'static [&'static str] {
    match res_type {
        "Communication" => &["sender", "recipient"],
        "CommunicationRequest" => &["sender", "recipient", "requester"],
        other => patient_params(other),
    }
}

/// The parameters that make a user a participant.
fn participant_params(res_type: &str) -> &'static [&'static str] {
    match res_type {
        "Communication" => &["sender", "recipient"],
        "CommunicationRequest" => &["sender", "recipient", "requester"],
        "AuditEvent" => &["agent"],
        "CareTeam" => &["participant"],
        "Group" => &["member"],
        "PractitionerRole" => &["practitioner"],
        _ => &[],
    }
}

/// A message addressed to a Group or CareTeam is each member's (membership is looked up when the
/// token is used: `Principal::groups`).
fn via_groups(p: &Principal, registry: &Registry, res_type: &str) -> Vec<Vec<Condition>> {
    p.groups
        .iter()
        .flat_map(|g| refers(registry, res_type, &["recipient"], g))
        .collect()
}

/// [`via_groups`] for the patient's side: through a group, only what is about the patient `me`.
/// A member is added to a Group or CareTeam when the EHR says so, and must not read what was sent
/// to it before about someone else (an outside probe read an earlier message about another
/// patient, which would have been refused had the member been in the group then).
fn via_groups_about(
    p: &Principal,
    registry: &Registry,
    res_type: &str,
    me: &str,
) -> Vec<Vec<Condition>> {
    let about_me = refers(registry, res_type, &["subject"], me);
    via_groups(p, registry, res_type)
        .into_iter()
        .map(|mut via| {
            for s in &about_me {
                via.extend(s.iter().cloned());
            }
            via
        })
        .collect()
}

/// One group per parameter: "`param` refers to `target`" (a local `Type/id`).
fn refers(
    registry: &Registry,
    res_type: &str,
    params: &[&str],
    target: &str,
) -> Vec<Vec<Condition>> {
    let Some((t, id)) = target.split_once('/') else {
        return vec![];
    };
    params
        .iter()
        .filter_map(|code| registry.get(res_type, code))
        .map(|p| {
            vec![Condition::Reference {
                key: p.key.clone(),
                values: vec![RefParts {
                    target_type: Some(t.to_string()),
                    target_id: Some(id.to_string()),
                    url: None,
                }],
            }]
        })
        .collect()
}

/// The compartment a scope's context confines it to: `Some(None)` for no confinement, `None`
/// when the scope cannot apply (no patient in context, no user, or a type without a compartment).
fn compartment(
    p: &Principal,
    registry: &Registry,
    res_type: &str,
    context: Context,
    perm: Perm,
) -> Option<Option<Condition>> {
    let groups = match context {
        Context::System => return Some(None),
        Context::Patient => {
            let patient = p.patient.as_ref()?;
            // The patient's side reads the messages the patient takes part in (sent, received
            // directly or through a group), not every message that names them as its subject: a
            // clinician's message to another patient, or to the patient's relative, that is
            // "about" them is not theirs to read. Writes keep the compartment (the writer becomes
            // the sender, and a message from the patient's side cannot be staff-only).
            let params = if p.kind() != SubjectKind::Practitioner
                && matches!(perm, Perm::Read | Perm::Search)
            {
                participant_params_of_patient(res_type)
            } else {
                patient_params(res_type)
            };
            let me = format!("Patient/{patient}");
            let mut g = refers(registry, res_type, params, &me);
            if p.kind() == SubjectKind::Patient {
                g.extend(via_groups_about(p, registry, res_type, &me));
            }
            // A relative (proxy) reads, besides the patient's, what they sent or received
            // themself about this patient (an outside probe's proxy lost sight of their own
            // message, and of the clinician's reply to them, the moment it was sent).
            if let (SubjectKind::RelatedPerson, Some(user)) = (p.kind(), &p.fhir_user) {
                let about = refers(registry, res_type, &["subject"], &me);
                for mut mine in refers(registry, res_type, participant_params(res_type), user) {
                    for s in &about {
                        mine.extend(s.iter().cloned());
                    }
                    g.push(mine);
                }
            }
            g
        }
        Context::User => {
            let user = p.fhir_user.as_ref()?;
            let mut g = refers(registry, res_type, participant_params(res_type), user);
            match p.kind() {
                // A patient signed in with user scopes: through a group, only what is about them
                // (as with patient scopes); a relative: nothing through a group (whom it is about
                // is not theirs to judge).
                SubjectKind::Patient => g.extend(via_groups_about(p, registry, res_type, user)),
                SubjectKind::RelatedPerson => {}
                _ => g.extend(via_groups(p, registry, res_type)),
            }
            if let Some(patient) = &p.patient {
                g.extend(refers(
                    registry,
                    res_type,
                    patient_params(res_type),
                    &format!("Patient/{patient}"),
                ));
            }
            // Emergency access: the patient's compartment, to read only.
            if matches!(perm, Perm::Read | Perm::Search) {
                for patient in &p.emergency {
                    g.extend(refers(
                        registry,
                        res_type,
                        patient_params(res_type),
                        &format!("Patient/{patient}"),
                    ));
                }
            }
            g
        }
    };
    let patient_side = match context {
        Context::Patient => p.kind() != SubjectKind::Practitioner,
        Context::User => matches!(p.kind(), SubjectKind::Patient | SubjectKind::RelatedPerson),
        Context::System => false,
    };
    let groups = if patient_side && matches!(perm, Perm::Read | Perm::Search) {
        only_own_requests(p, registry, res_type, groups)
    } else {
        groups
    };
    let groups = hide_others_drafts(p, registry, res_type, groups);
    (!groups.is_empty()).then_some(Some(Condition::AnyOf(groups)))
}

/// A CommunicationRequest is a message not sent yet (a scheduled send, a medication schedule, a
/// draft): what reaches a patient is the Communication it becomes, at its time. The patient's
/// side reads the requests it made itself (as requester or sender: the user, or the patient in
/// context), and of those addressed to it only Courier's own reminders of an unread urgent
/// message (identifier `urn:courier:escalation`, which no client can write; they carry no
/// text) — never a clinician's scheduled or draft request: a result scheduled for release after
/// a consultation must not be read the day before.
fn only_own_requests(
    p: &Principal,
    registry: &Registry,
    res_type: &str,
    groups: Vec<Vec<Condition>>,
) -> Vec<Vec<Condition>> {
    if res_type != "CommunicationRequest" {
        return groups;
    }
    let keys: Vec<&str> = ["requester", "sender"]
        .iter()
        .filter_map(|c| registry.get(res_type, c))
        .map(|p| p.key.as_str())
        .collect();
    let own: Vec<String> = p
        .fhir_user
        .iter()
        .cloned()
        .chain(p.patient.iter().map(|id| format!("Patient/{id}")))
        .collect();
    let reminder = registry
        .get(res_type, "identifier")
        .map(|p| Condition::Token {
            key: p.key.clone(),
            not: false,
            values: vec![TokenValue::SystemCode(
                Some(crate::messaging::escalation::IDENTIFIER_SYSTEM.to_string()),
                None,
            )],
        });
    let recipient = registry.get(res_type, "recipient").map(|p| p.key.as_str());
    groups
        .into_iter()
        .filter_map(|mut g| match g.as_slice() {
            [Condition::Reference { key, values }]
                if keys.contains(&key.as_str())
                    && values.iter().all(|v| {
                        v.url.is_none()
                            && v.target_type
                                .as_deref()
                                .zip(v.target_id.as_deref())
                                .is_some_and(|(t, id)| own.contains(&format!("{t}/{id}")))
                    }) =>
            {
                Some(g)
            }
            [Condition::Reference { key, .. }] if Some(key.as_str()) == recipient => {
                g.push(reminder.clone()?);
                Some(g)
            }
            _ => None,
        })
        .collect()
}

/// A draft message (a Communication in `preparation`, a CommunicationRequest in `draft`) is its
/// author's alone: every group of a compartment but "the principal is the sender" (or, of a
/// request, its requester) also requires that it is not a draft. (A system client, unconfined,
/// sees drafts as it sees everything.)
fn hide_others_drafts(
    p: &Principal,
    registry: &Registry,
    res_type: &str,
    mut groups: Vec<Vec<Condition>>,
) -> Vec<Vec<Condition>> {
    let (draft, authors): (&str, &[&str]) = match res_type {
        "Communication" => ("preparation", &["sender"]),
        "CommunicationRequest" => ("draft", &["sender", "requester"]),
        _ => return groups,
    };
    let Some(status) = registry.get(res_type, "status") else {
        return groups;
    };
    let authors: Vec<&str> = authors
        .iter()
        .filter_map(|c| registry.get(res_type, c))
        .map(|p| p.key.as_str())
        .collect();
    let me = p.fhir_user.as_deref();
    let not_draft = Condition::Token {
        key: status.key.clone(),
        not: true,
        values: vec![TokenValue::Code(draft.into())],
    };
    for g in groups.iter_mut() {
        // The author's own group: "author is me", alone or narrowed further (a relative's is
        // "sender is me, about this patient").
        let own = matches!(g.first(), Some(Condition::Reference { key, values })
        if authors.contains(&key.as_str()) && values.iter().any(|v| {
            me.is_some_and(|m| Some(m) == v.target_type.as_deref().zip(v.target_id.as_deref())
                .map(|(t, id)| format!("{t}/{id}")).as_deref())
        }));
        if !own {
            g.push(not_draft.clone());
        }
    }
    groups
}

/// The conditions of a scope's query, if every one is a token or reference condition (the kinds
/// the policy can check on a single resource). Anything else makes the scope grant nothing.
fn scope_query(scope: &Scope, registry: &Registry, base_url: &str) -> Option<Vec<Condition>> {
    let Some(q) = &scope.query else {
        return Some(vec![]);
    };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes()).into_owned().collect();
    let limits = Limits {
        default_count: 1,
        max_count: 1,
        strict: true,
    };
    let req = query::parse(registry, &scope.resource, &pairs, base_url, &limits).ok()?;
    // Positive token and reference conditions only: `:not` would also pass deleted resources
    // (which have no index rows) and is refused. And only on parameters that have index rows: a
    // search's access condition must select its candidates in SQL, or a search by a token
    // limited to, say, `AuditEvent?subtype=read` would check every AuditEvent's body (a cost,
    // and a "too costly" answer, that depend on what the token cannot see).
    let ok = !req.conditions.is_empty()
        && req.conditions.iter().all(|c| {
            matches!(
                c,
                Condition::Token { not: false, .. } | Condition::Reference { .. }
            ) && !courier_store::search::eval::needs_body(c)
        });
    ok.then_some(req.conditions)
}

/// Is `scope` usable as a granular scope query? (Checked when a token is issued.)
pub fn scope_query_supported(scope: &Scope, registry: &Registry, base_url: &str) -> bool {
    scope_query(scope, registry, base_url).is_some()
}

/// Does `scope`, used by `p`, speak for the patient's side (the patient, a RelatedPerson, or an
/// app in a patient's context with no clinician signed in)? Such a grant never reaches a
/// staff-only resource (`messaging::staff_only`).
fn patient_facing(p: &Principal, scope: &Scope) -> bool {
    match p.kind() {
        SubjectKind::Patient | SubjectKind::RelatedPerson => true,
        SubjectKind::Practitioner => false,
        SubjectKind::System => scope.context == Context::Patient,
    }
}

/// "Not labelled staff-only (`NOPAT`)", for the types that carry the label.
fn not_staff_only(registry: &Registry, res_type: &str) -> Option<Condition> {
    let param = registry.get(res_type, "_security")?;
    Some(Condition::Token {
        key: param.key.clone(),
        not: true,
        values: vec![TokenValue::SystemCode(
            Some(crate::messaging::staff_only::ACT_CODE.into()),
            Some(crate::messaging::staff_only::NOPAT.into()),
        )],
    })
}

/// The one decision: may `p` use `perm` on resources of `res_type`, and on which of them?
pub fn decide(
    p: &Principal,
    registry: &Registry,
    base_url: &str,
    res_type: &str,
    perm: Perm,
) -> Result<Access, Denied> {
    // The patient's side reads its audit trail only through `Patient/$everything`, cut down to
    // who accessed what and when: a BALP AuditEvent carries client ids, network addresses, token
    // ids and queries, and names staff-only messages.
    if res_type == "AuditEvent"
        && p.scopes
            .iter()
            .any(|s| s.names(res_type) && patient_facing(p, s))
    {
        return Err(Denied(
            "the patient's side reads its audit trail through Patient/[id]/$everything".into(),
        ));
    }
    // Nor does it read Groups: a group's members are other people (other patients among them),
    // whose ids a patient learnt by reading the groups they belong to (an outside probe).
    if matches!(res_type, "Group" | "CareTeam")
        && p.scopes
            .iter()
            .any(|s| s.names(res_type) && patient_facing(p, s))
    {
        return Err(Denied(format!(
            "the patient's side does not read {res_type}s: their members are other people"
        )));
    }
    let mut groups: Vec<Vec<Condition>> = Vec::new();
    let mut named = false;
    let mut unusable_filter = false;
    for scope in p
        .scopes
        .iter()
        .filter(|s| s.names(res_type) && s.allows(perm))
    {
        named = true;
        // A Binary is content without a compartment: any context may upload one; reading one
        // follows the resource that attaches it (fhir::access), so only system scopes reach all.
        let confinement = if res_type == "Binary" {
            match (scope.context, perm) {
                (Context::System, _) | (_, Perm::Create) => Some(None),
                _ => None,
            }
        } else {
            compartment(p, registry, res_type, scope.context, perm)
        };
        let query = scope_query(scope, registry, base_url);
        unusable_filter |= query.is_none();
        let (Some(confinement), Some(mut conditions)) = (confinement, query) else {
            continue;
        };
        if let Some(c) = confinement {
            conditions.insert(0, c);
        }
        if patient_facing(p, scope) {
            conditions.extend(not_staff_only(registry, res_type));
        }
        if conditions.is_empty() {
            return Ok(Access::All);
        }
        groups.push(conditions);
    }
    if groups.is_empty() {
        let why = if named && unusable_filter {
            format!(
                "the token's scope for {res_type} filters by a parameter Courier cannot apply as an \
                 access condition (positive token and reference parameters with an index only)"
            )
        } else if named {
            format!(
                "the token's scopes name {res_type} but cannot apply here (no {} in context)",
                if p.fhir_user.is_none() {
                    "user"
                } else {
                    "patient"
                }
            )
        } else {
            format!(
                "the token's scopes do not allow '{}' on {res_type}",
                perm.letter()
            )
        };
        return Err(Denied(why));
    }
    Ok(Access::Only(Condition::AnyOf(groups)))
}

/// Is `p` an administrator for `needs`: a system client (no user) unconfined for each (type,
/// permission)? For operations that reach across every compartment (export, erasure, holds).
pub fn is_administrator(
    p: &Principal,
    registry: &Registry,
    base_url: &str,
    needs: &[(&str, Perm)],
) -> bool {
    p.kind() == SubjectKind::System
        && needs
            .iter()
            .all(|(t, perm)| matches!(decide(p, registry, base_url, t, *perm), Ok(Access::All)))
}

/// Does a resource with these index entries satisfy `c`? The in-memory twin of the SQL in
/// `search::sql` ([`courier_store::search::eval`]); a condition on the resource row itself
/// (`_id`, `_lastUpdated`), which the policy never makes, is refused rather than guessed.
pub fn admits(c: &Condition, entries: &[Entry]) -> bool {
    courier_store::search::eval::admits(c, entries, None)
}

/// May `p` see this resource (for `perm`, Read or Search)? Binaries are decided in `fhir::access`.
pub fn may_see(
    p: &Principal,
    registry: &Registry,
    base_url: &str,
    res_type: &str,
    resource: &Value,
    perm: Perm,
) -> bool {
    match decide(p, registry, base_url, res_type, perm) {
        Ok(Access::All) => true,
        Ok(Access::Only(c)) => admits(&c, &index::entries(registry, res_type, resource, base_url)),
        Err(_) => false,
    }
}

/// `patient`'s compartment of `res_type` (R4 CompartmentDefinition Patient), labels aside: for an
/// administrator's export of everything about the patient.
pub fn patient_compartment(
    registry: &Registry,
    res_type: &str,
    patient: &str,
) -> Option<Condition> {
    let groups = refers(
        registry,
        res_type,
        patient_params(res_type),
        &format!("Patient/{patient}"),
    );
    (!groups.is_empty()).then_some(Condition::AnyOf(groups))
}

/// Resources of `res_type` that name `target` (`Type/id`) as a party: subject, sender,
/// recipient, requester. `None` for a type without such parameters.
pub fn mentions(registry: &Registry, res_type: &str, target: &str) -> Option<Condition> {
    const PARTIES: &[&str] = &["subject", "sender", "recipient", "requester"];
    let groups = refers(registry, res_type, PARTIES, target);
    (!groups.is_empty()).then_some(Condition::AnyOf(groups))
}

/// The patient a writer is bound to for `perm`, when it writes from the patient's side (a patient
/// or RelatedPerson user, or a grant whose only scopes for `res_type` and `perm` are
/// patient-context ones): such a writer may not address any other patient. `Some("")` when no
/// patient is known (then no patient may be addressed at all).
pub fn patient_bound_for(p: &Principal, res_type: &str, perm: Perm) -> Option<String> {
    let bound = matches!(p.kind(), SubjectKind::Patient | SubjectKind::RelatedPerson)
        || !p
            .scopes
            .iter()
            .any(|s| s.names(res_type) && s.allows(perm) && s.context != Context::Patient);
    bound.then(|| {
        p.patient
            .clone()
            .or_else(|| {
                p.fhir_user
                    .as_deref()
                    .and_then(|u| u.strip_prefix("Patient/"))
                    .map(String::from)
            })
            .unwrap_or_default()
    })
}

/// [`patient_bound_for`] a write that may create or update: bound if the token is for either
/// permission it holds (a grant without a permission is not bound by it).
pub fn patient_bound(p: &Principal, res_type: &str) -> Option<String> {
    let patient_side = matches!(p.kind(), SubjectKind::Patient | SubjectKind::RelatedPerson);
    [Perm::Create, Perm::Update]
        .into_iter()
        .filter(|perm| {
            patient_side
                || p.scopes
                    .iter()
                    .any(|s| s.names(res_type) && s.allows(*perm))
        })
        .find_map(|perm| patient_bound_for(p, res_type, perm))
}

/// May `p` write this resource body (create, or the new version of an update)? Returns the
/// access, whose condition must also hold for the version being replaced.
pub fn check_write(
    p: &Principal,
    registry: &Registry,
    base_url: &str,
    res_type: &str,
    perm: Perm,
    resource: Option<&Value>,
) -> Result<Access, Denied> {
    let access = decide(p, registry, base_url, res_type, perm)?;
    // A patient writes only about themself: no other patient may be subject, sender or recipient.
    let bound = patient_bound_for(p, res_type, perm);
    let Some(resource) = resource else {
        return Ok(access);
    };
    if matches!(access, Access::All) && bound.is_none() {
        return Ok(access);
    }
    let entries = index::entries(registry, res_type, resource, base_url);
    if matches!(&access, Access::Only(c) if !admits(c, &entries)) {
        return Err(Denied(format!(
            "this {res_type} is outside what the token may write: it must involve {}",
            match (&p.fhir_user, &p.patient) {
                (Some(u), Some(pt)) if *u == format!("Patient/{pt}") => u.clone(),
                (Some(u), Some(pt)) => format!("{u} or Patient/{pt}"),
                (Some(u), None) => u.clone(),
                (None, Some(pt)) => format!("Patient/{pt}"),
                (None, None) => "the token's subject".into(),
            }
        )));
    }
    if let Some(me) = bound {
        let keys: Vec<String> = patient_params(res_type)
            .iter()
            .filter_map(|code| registry.get(res_type, code).map(|sp| sp.key.clone()))
            .collect();
        let other = entries.iter().any(|e| match e {
            Entry::Ref {
                param,
                target_type: Some(t),
                target_id: Some(id),
                ..
            } => keys.contains(param) && t == "Patient" && *id != me,
            _ => false,
        });
        if other {
            return Err(Denied("a patient cannot address another patient".into()));
        }
    }
    Ok(access)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scopes::parse_all;
    use serde_json::json;

    fn principal(scopes: &str, user: Option<&str>, patient: Option<&str>) -> Principal {
        Principal {
            client_id: "c".into(),
            jti: "j".into(),
            exp: i64::MAX,
            scopes: parse_all(scopes).unwrap(),
            fhir_user: user.map(String::from),
            patient: patient.map(String::from),
            encounter: None,
            groups: vec![],
            emergency: vec![],
        }
    }

    fn msg(sender: &str, recipient: &str) -> Value {
        json!({"resourceType": "Communication", "status": "completed",
               "sender": {"reference": sender}, "recipient": [{"reference": recipient}],
               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "alert"}]}]})
    }

    /// `SearchRequest::confine` on what `decide` really builds (the compartment nested in a
    /// scope's group): it drops what the search implies, and admits exactly the same messages.
    #[test]
    fn confining_a_search_drops_only_what_it_implies() {
        use crate::search::query::SearchRequest;
        let r = Registry::load().unwrap();
        let base = "http://x";
        let mut x = principal("user/Communication.rs", Some("Practitioner/x"), None);
        x.groups = vec!["CareTeam/t".into()];
        let Ok(Access::Only(policy)) = decide(&x, &r, base, "Communication", Perm::Search) else {
            panic!("a user is confined")
        };
        let mut draft_to_x = msg("Practitioner/y", "Practitioner/x");
        draft_to_x["status"] = json!("preparation");
        let mut own_draft = msg("Practitioner/x", "Practitioner/y");
        own_draft["status"] = json!("preparation");
        let messages = [
            msg("Practitioner/y", "Practitioner/x"),
            msg("Practitioner/x", "Practitioner/y"),
            msg("Practitioner/y", "Practitioner/z"),
            msg("Practitioner/y", "CareTeam/t"),
            msg("Practitioner/x", "Practitioner/x"),
            msg("Patient/x", "Patient/x"),
            draft_to_x,
            own_draft,
        ];
        let limits = Limits {
            default_count: 10,
            max_count: 10,
            strict: true,
        };
        for (search, shrinks) in [
            ("recipient=Practitioner/x", true),
            ("sender=Practitioner/x", true),
            ("recipient=Practitioner/x,CareTeam/t", false),
            ("recipient=x", false),
            ("recipient=Practitioner/x,Practitioner/z", false),
            ("status=completed", false),
            ("category=alert&recipient:Practitioner=x", true),
        ] {
            let pairs: Vec<(String, String)> = search
                .split('&')
                .map(|kv| kv.split_once('=').unwrap())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let own = query::parse(&r, "Communication", &pairs, base, &limits).unwrap();
            let mut confined = SearchRequest::of(own.conditions.clone(), 10);
            confined.confine(policy.clone());
            let mut whole = own.conditions.clone();
            whole.push(policy.clone());
            let added = &confined.conditions[own.conditions.len()..];
            let smaller = format!("{added:?}").len() < format!("{policy:?}").len();
            assert_eq!(smaller, shrinks, "{search}: {added:?}");
            if search == "recipient=Practitioner/x" {
                // Left: x sent it, or it is not a draft, or it went to x's CareTeam (and is not a
                // draft). "x is a recipient" is gone; someone else's draft to x stays hidden.
                let recipients = format!("{added:?}")
                    .matches("Communication.recipient")
                    .count();
                assert_eq!(recipients, 1, "{added:?}");
            }
            for m in &messages {
                let e = index::entries(&r, "Communication", m, base);
                let all = |cs: &[Condition]| cs.iter().all(|c| admits(c, &e));
                assert_eq!(all(&confined.conditions), all(&whole), "{search} on {m}");
            }
        }
    }

    /// The decision every path shares (reads, searches, sockets, subscription notifications,
    /// unread counts): a staff-only message about p1 is hidden from p1's side only.
    #[test]
    fn staff_only_messages_are_hidden_from_the_patients_side_only() {
        let r = Registry::load().unwrap();
        let mut m = msg("Practitioner/d", "Practitioner/e");
        m["subject"] = json!({"reference": "Patient/p1"});
        crate::messaging::staff_only::add_label(&mut m);
        let sees = |scopes: &str, user: Option<&str>, patient: Option<&str>| {
            may_see(
                &principal(scopes, user, patient),
                &r,
                "http://x",
                "Communication",
                &m,
                Perm::Read,
            )
        };
        assert!(!sees(
            "patient/Communication.rs",
            Some("Patient/p1"),
            Some("p1")
        ));
        assert!(
            !sees("patient/Communication.rs", None, Some("p1")),
            "a patient app without a user"
        );
        assert!(!sees(
            "patient/Communication.rs",
            Some("RelatedPerson/r1"),
            Some("p1")
        ));
        assert!(!sees("system/Communication.rs", Some("Patient/p1"), None));
        assert!(
            sees(
                "patient/Communication.rs",
                Some("Practitioner/e"),
                Some("p1")
            ),
            "a clinician in the patient's context"
        );
        assert!(sees("user/Communication.rs", Some("Practitioner/e"), None));
        assert!(sees("system/Communication.rs", None, None));
        // Unlabelled but only *about* p1 (a message between clinicians, or to another patient):
        // not p1's to read either; addressed to p1, it is.
        let p1 = principal("patient/Communication.rs", Some("Patient/p1"), Some("p1"));
        let mut about_p1 = m.clone();
        about_p1["meta"] = json!({});
        assert!(!may_see(
            &p1,
            &r,
            "http://x",
            "Communication",
            &about_p1,
            Perm::Read
        ));
        let mut to_p1 = about_p1.clone();
        to_p1["recipient"] = json!([{"reference": "Patient/p1"}]);
        assert!(may_see(
            &p1,
            &r,
            "http://x",
            "Communication",
            &to_p1,
            Perm::Read
        ));
    }

    #[test]
    fn system_scopes_see_everything_of_their_types_only() {
        let r = Registry::load().unwrap();
        let p = principal("system/Communication.rs", None, None);
        assert!(matches!(
            decide(&p, &r, "http://x", "Communication", Perm::Read),
            Ok(Access::All)
        ));
        assert!(decide(&p, &r, "http://x", "Communication", Perm::Create).is_err());
        assert!(decide(&p, &r, "http://x", "CommunicationRequest", Perm::Read).is_err());
    }

    #[test]
    fn patient_scopes_confine_to_the_compartment() {
        let r = Registry::load().unwrap();
        let p = principal("patient/Communication.rs", None, Some("p1"));
        assert!(may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/d", "Patient/p1"),
            Perm::Read
        ));
        assert!(may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Patient/p1", "Practitioner/d"),
            Perm::Read
        ));
        assert!(!may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/d", "Patient/p2"),
            Perm::Read
        ));
        let no_context = principal("patient/Communication.rs", None, None);
        assert!(decide(&no_context, &r, "http://x", "Communication", Perm::Read).is_err());
    }

    #[test]
    fn a_patient_cannot_address_another_patient() {
        let r = Registry::load().unwrap();
        let p = principal(
            "patient/Communication.cruds",
            Some("Patient/p1"),
            Some("p1"),
        );
        let to_other = msg("Patient/p1", "Patient/p2");
        assert!(check_write(
            &p,
            &r,
            "http://x",
            "Communication",
            Perm::Create,
            Some(&to_other)
        )
        .is_err());
        let to_doctor = msg("Patient/p1", "Practitioner/d");
        assert!(check_write(
            &p,
            &r,
            "http://x",
            "Communication",
            Perm::Create,
            Some(&to_doctor)
        )
        .is_ok());
    }

    #[test]
    fn user_scopes_cover_participation_and_the_launch_patient() {
        let r = Registry::load().unwrap();
        let p = principal("user/Communication.rs", Some("Practitioner/d"), Some("p1"));
        assert!(may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/e", "Practitioner/d"),
            Perm::Read
        ));
        assert!(may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/e", "Patient/p1"),
            Perm::Read
        ));
        assert!(!may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/e", "Patient/p2"),
            Perm::Read
        ));
    }

    #[test]
    fn scope_queries_narrow_the_grant() {
        let r = Registry::load().unwrap();
        let p = principal(
            "system/Communication.rs?category=http://terminology.hl7.org/CodeSystem/communication-category|notification",
            None,
            None,
        );
        assert!(!may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/d", "Patient/p1"),
            Perm::Read
        ));
        // A negated scope query grants nothing (deleted resources have no index rows to negate).
        let p = principal("system/Communication.rs?category:not=alert", None, None);
        assert!(decide(&p, &r, "http://x", "Communication", Perm::Read).is_err());
        let p = principal("system/Communication.rs?category=alert", None, None);
        assert!(may_see(
            &p,
            &r,
            "http://x",
            "Communication",
            &msg("Practitioner/d", "Patient/p1"),
            Perm::Read
        ));
    }
}
