//! People by name (issue 20): the summary Courier keeps of each person from the EHR (name, birth
//! date, MRN, role), sealed at rest, named only to who may know the person; whom a patient may
//! write to (shared inboxes, the EHR's care team, their clinicians); erased with the patient.

use crate::ehr::{launch_as, new_ehr, person, spawn_ehr, TestEhr};
use crate::helpers::*;
use crate::{both_backends, both_backends_with};
use courier::smart::{identity, registry};
use serde_json::{json, Value};

const MR: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";

async fn fixture(app: &TestApp, ehr: &TestEhr) {
    let mut ada = person("Patient", "a1", &[]);
    ada["name"] = json!([{"use": "official", "given": ["Ada"], "family": "Lovelace"}]);
    ada["birthDate"] = json!("1990-12-10");
    ada["gender"] = json!("female");
    ada["identifier"] = json!([{"type": {"coding": [{"system": MR, "code": "MR"}]}, "system": "urn:mrn", "value": "MRN-0042"}]);
    let mut bob = person("Patient", "b2", &[]);
    bob["name"] = json!([{"given": ["Bob"], "family": "Other"}]);
    let mut grace = person("Practitioner", "dr-a", &[]);
    grace["name"] = json!([{"given": ["Grace"], "family": "Hopper"}]);
    grace["qualification"] = json!([{"code": {"text": "Cardiologist"}}]);
    let mut alan = person("Practitioner", "dr-b", &[]);
    alan["name"] = json!([{"given": ["Alan"], "family": "Turing"}]);
    let mut edsger = person("Practitioner", "dr-c", &[]);
    edsger["name"] = json!([{"given": ["Edsger"], "family": "Dijkstra"}]);
    let team = json!({"resourceType": "CareTeam", "id": "team-a1", "status": "active",
        "subject": {"reference": "Patient/a1"},
        "participant": [{"member": {"reference": "Practitioner/dr-b"}}, {"member": {"reference": "Organization/o1"}}]});
    ehr.control(
        reqwest::Method::POST,
        "seed",
        Some(json!([ada, bob, grace, alan, edsger, team])),
    )
    .await;
    let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
    n.launch_scopes = "openid fhirUser launch online_access user/Patient.r user/Practitioner.r user/CareTeam.rs patient/CareTeam.rs patient/Patient.r";
    registry::add(&app.store, &n).unwrap();
    ehr.register_courier(app, "courier").await;
}

fn named(p: &Value) -> std::collections::BTreeMap<String, Value> {
    p["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|x| {
            let mut m = serde_json::Map::new();
            for part in x["part"].as_array().unwrap() {
                let v = part
                    .as_object()
                    .unwrap()
                    .iter()
                    .find(|(k, _)| k.starts_with("value"))
                    .unwrap()
                    .1;
                m.insert(part["name"].as_str().unwrap().to_string(), v.clone());
            }
            (
                m["reference"]["reference"].as_str().unwrap().to_string(),
                Value::Object(m),
            )
        })
        .collect()
}

async fn participants(app: &TestApp, token: &str, refs: &[&str]) -> (u16, Value) {
    let q: Vec<String> = refs.iter().map(|r| format!("reference={r}")).collect();
    let r = client_with_token(token)
        .get(app.url(&format!("Communication/$participants?{}", q.join("&"))))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn send(app: &TestApp, token: &str, body: Value) -> Value {
    let r = client_with_token(token)
        .post(app.url("Communication"))
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=representation")
        .json(&body)
        .send()
        .await
        .unwrap();
    let st = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(st, 201, "{v}");
    v
}

#[derive(diesel::QueryableByName)]
struct Raw {
    #[diesel(sql_type = diesel::sql_types::Binary)]
    sealed: Vec<u8>,
}

both_backends_with! {
    |s| { s.message_pools = vec![("Nurse line".into(), "Group/nurse-line".into()), ("Front desk".into(), "Group/front-desk".into())]; }

    async fn people_are_named_from_the_ehr_only_to_who_may_know_them(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // Grace launches with Ada in context, then with Bob; Edsger once (so he is known).
        let g1 = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let g2 = launch_as(&app, &ehr, "b2", "Practitioner/dr-a").await;
        let e = launch_as(&app, &ehr, "a1", "Practitioner/dr-c").await;
        let (grace, ada, bob) = (g1["fhirUser"].as_str().unwrap(), g1["patient"].as_str().unwrap(), g2["patient"].as_str().unwrap());
        let edsger = e["fhirUser"].as_str().unwrap();
        let gt = g1["access_token"].as_str().unwrap();
        // Sealed at rest: the stored summaries do not hold the names or the MRN in the clear.
        let raw: Vec<Raw> = app.store.query("SELECT sealed FROM person_summaries", vec![]).unwrap();
        assert!(raw.len() >= 4, "{}", raw.len());
        for r in &raw {
            let text = String::from_utf8_lossy(&r.sealed);
            assert!(!text.contains("Lovelace") && !text.contains("MRN-0042") && !text.contains("Hopper"));
        }
        // The patient in context, the user, and any colleague are named to the clinician; Bob is
        // not (no message names him yet, and he is not this launch's patient).
        let (st, p) = participants(&app, gt, &[ada, bob, grace, edsger]).await;
        assert_eq!(st, 200, "{p}");
        let n = named(&p);
        assert_eq!(n[ada]["name"], "Ada Lovelace", "{p}");
        assert_eq!(n[ada]["birthDate"], "1990-12-10");
        assert_eq!(n[ada]["gender"], "female");
        assert_eq!(n[ada]["mrn"], "MRN-0042");
        assert_eq!(n[grace]["role"], "Cardiologist");
        assert_eq!(n[edsger]["name"], "Edsger Dijkstra");
        assert!(!n.contains_key(bob), "{p}");
        // Once Grace writes with Bob (from his launch), his name is hers to see in any context.
        let g2t = g2["access_token"].as_str().unwrap();
        send(&app, g2t, json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": bob}, "sender": {"reference": grace}, "recipient": [{"reference": bob}],
            "payload": [{"contentString": "Knee results"}]})).await;
        let n = named(&participants(&app, gt, &[bob]).await.1);
        assert_eq!(n[bob]["name"], "Bob Other");

        // Ada (patient) launches: her care team (dr-b, from the EHR's CareTeam) is named, Grace
        // is not until she writes to Ada, and Edsger never through a staff-only message.
        let a = launch_as(&app, &ehr, "a1", "Patient/a1").await;
        assert_eq!(a["fhirUser"], ada);
        let at = a["access_token"].as_str().unwrap();
        let alan = identity::care_team(&app.store, ada).unwrap();
        assert_eq!(alan.len(), 1, "{alan:?}");
        let alan = alan[0].clone();
        let n = named(&participants(&app, at, &[ada, grace, edsger, &alan, bob]).await.1);
        assert_eq!(n[ada]["name"], "Ada Lovelace");
        assert_eq!(n[&alan]["name"], "Alan Turing");
        assert!(!n.contains_key(grace) && !n.contains_key(edsger) && !n.contains_key(bob), "{n:?}");
        send(&app, gt, json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": ada}, "sender": {"reference": grace}, "recipient": [{"reference": edsger}],
            "payload": [{"contentString": "Staff only: check her meds"}]})).await;
        let n = named(&participants(&app, at, &[grace, edsger]).await.1);
        assert!(n.is_empty(), "a staff-only message names no one to the patient: {n:?}");
        send(&app, gt, json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": ada}, "sender": {"reference": grace}, "recipient": [{"reference": ada}],
            "payload": [{"contentString": "Your results are fine"}]})).await;
        let n = named(&participants(&app, at, &[grace, edsger]).await.1);
        assert_eq!(n[grace]["name"], "Grace Hopper");
        assert!(!n.contains_key(edsger));

        // Whom Ada may write to: the nurse line, her care team, the clinician who wrote to her.
        // A shared inbox Courier holds no members for (the front desk's Group was never loaded)
        // is not offered: her message would reach no one.
        let group = json!({"resourceType": "Group", "id": "nurse-line", "type": "practitioner", "actual": true,
            "member": [{"entity": {"reference": "Practitioner/nurse-1"}}]});
        assert!(app.put("Group/nurse-line", &group).await.status().is_success());
        let r = client_with_token(at).get(app.url("Communication/$recipients")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let p: Value = r.json().await.unwrap();
        let n = named(&p);
        assert_eq!(n["Group/nurse-line"]["name"], "Nurse line", "{p}");
        assert_eq!(n["Group/nurse-line"]["source"], "pool");
        assert!(!n.contains_key("Group/front-desk"), "a pool that reaches no one: {p}");
        assert_eq!(n[&alan]["source"], "care-team");
        assert_eq!(n[grace]["source"], "correspondent");
        assert!(!n.contains_key(edsger), "{p}");
        // … and only about herself.
        let r = client_with_token(at).get(app.url(&format!("Communication/$recipients?patient={bob}"))).send().await.unwrap();
        assert_eq!(r.status(), 403);

        // Bad input is refused, and says why.
        for q in ["reference=Observation/1", "reference=Patient/", "name=x", "reference=Patient/a%20b"] {
            let r = client_with_token(gt).get(app.url(&format!("Communication/$participants?{q}"))).send().await.unwrap();
            assert_eq!(r.status(), 400, "{q}");
            let o: Value = r.json().await.unwrap();
            assert_eq!(o["resourceType"], "OperationOutcome");
        }
        let many: Vec<String> = (0..101).map(|i| format!("Patient/p{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(participants(&app, gt, &many).await.0, 400);
        assert_eq!(app.anonymous.get(app.url("Communication/$participants?reference=Patient/x")).send().await.unwrap().status(), 401);

        // Erasing Ada erases what Courier showed of her, and her care team.
        let r = app.client.post(app.url(&format!("{ada}/$erase"))).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
        assert!(identity::summaries(&app.store, &[ada.to_string()]).unwrap().is_empty());
        assert!(identity::care_team(&app.store, ada).unwrap().is_empty());
        assert!(!identity::summaries(&app.store, &[bob.to_string()]).unwrap().is_empty());
    }
}

#[test]
fn summaries_take_what_the_app_shows_and_nothing_else() {
    let s = identity::summary_of(&json!({"resourceType": "Patient", "id": "x",
        "name": [{"use": "nickname", "given": ["Addie"]}, {"use": "official", "text": "Ada King, Countess of Lovelace"}],
        "birthDate": "1815-12-10", "gender": "female", "telecom": [{"value": "555-0100"}],
        "identifier": [{"system": "urn:ssn", "value": "123-45-6789"}, {"type": {"coding": [{"code": "MR"}]}, "value": "M1"}]}));
    assert_eq!(
        s,
        json!({"name": "Ada King, Countess of Lovelace", "birthDate": "1815-12-10", "gender": "female", "mrn": "M1", "role": null})
    );
    let s = identity::summary_of(&json!({"resourceType": "RelatedPerson", "id": "r",
        "name": [{"given": ["Ann"], "family": "Byron"}], "relationship": [{"coding": [{"display": "Mother"}]}], "birthDate": "<script>"}));
    assert_eq!(s["name"], "Ann Byron");
    assert_eq!(s["role"], "Mother");
    assert_eq!(s["birthDate"], Value::Null);
}

both_backends! {
    async fn mark_unread_is_the_readers_own_flag_and_leaves_the_receipt_true(app: TestApp) {
        use crate::messaging::{call, clinician_token, msg, param, patient_token};
        let p1 = client_with_token(&patient_token(&app, "p1"));
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let other = client_with_token(&patient_token(&app, "p2"));
        let id = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "Your results")).await;
        let unread = |c: reqwest::Client| {
            let app = &app;
            async move { param(&call(&c, app, "GET", "/Communication/$unread").await.1, "unread").unwrap()["valueInteger"].as_i64().unwrap() }
        };
        assert_eq!(unread(p1.clone()).await, 1);
        // Unread before it was ever read: nothing to mark, still unread.
        assert_eq!(call(&p1, &app, "POST", &format!("/Communication/{id}/$mark-unread")).await.0, 200);
        assert_eq!(unread(p1.clone()).await, 1);
        assert_eq!(call(&p1, &app, "POST", &format!("/Communication/{id}/$mark-read")).await.0, 200);
        assert_eq!(unread(p1.clone()).await, 0);
        let (s, r) = call(&p1, &app, "POST", &format!("/Communication/{id}/$mark-unread")).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(unread(p1.clone()).await, 1);
        // The sender still sees that it was read.
        let (_, receipts) = call(&dr, &app, "GET", &format!("/Communication/{id}/$receipts")).await;
        assert!(receipts.to_string().contains("\"read\""), "{receipts}");
        // Reading it again clears the flag.
        assert_eq!(call(&p1, &app, "POST", &format!("/Communication/{id}/$mark-read")).await.0, 200);
        assert_eq!(unread(p1.clone()).await, 0);
        // Only a recipient, for themself; the sender cannot; someone who cannot see it gets 404.
        assert_eq!(call(&dr, &app, "POST", &format!("/Communication/{id}/$mark-unread")).await.0, 403);
        assert_eq!(call(&other, &app, "POST", &format!("/Communication/{id}/$mark-unread")).await.0, 404);
    }
}

both_backends! {
    async fn a_message_about_one_patient_is_never_sent_to_another(app: TestApp) {
        use crate::messaging::clinician_token;
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let post = |body: Value| {
            let dr = dr.clone();
            let url = app.url("Communication");
            async move { dr.post(url).json(&body).send().await.unwrap() }
        };
        let about_ada = |to: &str| json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": "Patient/ada"}, "sender": {"reference": "Practitioner/dr-1"},
            "recipient": [{"reference": to}], "payload": [{"contentString": "Your results"}]});
        let r = post(about_ada("Patient/annabella")).await;
        assert_eq!(r.status(), 422);
        let o: Value = r.json().await.unwrap();
        assert!(o.to_string().contains("another patient"), "{o}");
        assert!(ids(&app.get_json("Communication?recipient=Patient/annabella").await).is_empty(), "nothing written");
        assert_eq!(post(about_ada("Patient/ada")).await.status(), 201);
        assert_eq!(post(about_ada("Practitioner/dr-2")).await.status(), 201, "staff about Ada");
        assert_eq!(post(about_ada("RelatedPerson/ada-mother")).await.status(), 201, "her mother");
    }
}

both_backends! {
    async fn names_cannot_be_learnt_through_drafts_broadcasts_or_groups(app: TestApp) {
        use crate::messaging::{clinician_token, patient_token};
        for who in ["Patient/a", "Patient/b", "Patient/c", "RelatedPerson/rb"] {
            identity::remember(&app.store, who, &json!({"name": format!("Secret {who}"), "mrn": "M"})).unwrap();
        }
        let names = |token: String, r: &'static str| {
            let app = &app;
            async move { named(&participants(app, &token, &[r]).await.1) }
        };
        let post = |token: String, body: Value| {
            let url = app.url("Communication");
            async move { client_with_token(&token).post(url).json(&body).send().await.unwrap().status().as_u16() }
        };
        // A draft about anyone proves no acquaintance.
        let y = clinician_token(&app, "y");
        assert_eq!(post(y.clone(), json!({"resourceType": "Communication", "status": "preparation",
            "subject": {"reference": "Patient/c"}, "sender": {"reference": "Practitioner/y"},
            "recipient": [{"reference": "Practitioner/y"}]})).await, 201);
        assert!(names(y, "Patient/c").await.is_empty(), "a draft revealed a patient's name");
        // A broadcast to two patients is refused (a message reaches one patient at most); one to
        // a patient and a relative names the relative to no one through the patient.
        assert_eq!(post(clinician_token(&app, "x"), json!({"resourceType": "Communication", "status": "completed",
            "sender": {"reference": "Practitioner/x"}, "recipient": [{"reference": "Patient/a"}, {"reference": "Patient/b"}, {"reference": "RelatedPerson/rb"}],
            "payload": [{"contentString": "Flu clinic on Monday"}]})).await, 422);
        assert_eq!(post(clinician_token(&app, "x"), json!({"resourceType": "Communication", "status": "completed",
            "sender": {"reference": "Practitioner/x"}, "recipient": [{"reference": "Patient/b"}, {"reference": "RelatedPerson/rb"}],
            "payload": [{"contentString": "Flu clinic on Monday"}]})).await, 201);
        let b = patient_token(&app, "b");
        assert!(names(b.clone(), "Patient/a").await.is_empty(), "a broadcast named another patient");
        assert!(names(b.clone(), "RelatedPerson/rb").await.is_empty(), "a broadcast named a relative");
        assert_eq!(names(b, "Patient/b").await["Patient/b"]["name"], "Secret Patient/b");
        // A message about a patient reaches no other patient through a Group.
        let g = app.create(&json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/b"}}, {"entity": {"reference": "Practitioner/y"}}]})).await;
        assert_eq!(post(clinician_token(&app, "x"), json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": "Patient/a"}, "sender": {"reference": "Practitioner/x"},
            "recipient": [{"reference": format!("Group/{g}")}, {"reference": "Patient/a"}],
            "payload": [{"contentString": "About Ada"}]})).await, 422);
    }
}
