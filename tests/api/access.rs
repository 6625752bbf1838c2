//! The access matrix: several patients and practitioners message each other; several kinds of token
//! (system, patient, user, user with a launch patient, scopes for one type only) then try every
//! interaction on every resource. What each may see is computed here by an oracle written from the
//! policy's definition, independently of the server's code, and every answer is checked against
//! it — status codes, search results, totals, includes, history, Bundle entries, Binaries — and no
//! body a token receives may contain the id of anything outside its grant.

use crate::both_backends;
use crate::helpers::*;
use courier::auth::clients;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};

const PEOPLE: &[&str] = &[
    "Patient/p1",
    "Patient/p2",
    "Practitioner/d1",
    "Practitioner/d2",
];

#[derive(Clone, Debug)]
struct Res {
    res_type: &'static str,
    id: String,
    /// sender/requester, recipients, subject
    parties: Vec<(&'static str, String)>,
    binary: Option<String>,
}

struct Who {
    name: &'static str,
    scope: &'static str,
    user: Option<&'static str>,
    patient: Option<&'static str>,
}

const WHO: &[Who] = &[
    Who {
        name: "system, Communication only",
        scope: "system/Communication.rs",
        user: None,
        patient: None,
    },
    Who {
        name: "patient p1, read",
        scope: "patient/Communication.rs patient/CommunicationRequest.rs",
        user: Some("Patient/p1"),
        patient: Some("p1"),
    },
    Who {
        name: "patient p2, everything",
        scope: "patient/*.cruds",
        user: Some("Patient/p2"),
        patient: Some("p2"),
    },
    Who {
        name: "practitioner d1",
        scope: "user/Communication.cruds user/CommunicationRequest.rs",
        user: Some("Practitioner/d1"),
        patient: None,
    },
    Who {
        name: "practitioner d2, patient p1 in context",
        scope: "user/*.rs",
        user: Some("Practitioner/d2"),
        patient: Some("p1"),
    },
    Who {
        name: "system, CommunicationRequest only",
        scope: "system/CommunicationRequest.rs",
        user: None,
        patient: None,
    },
];

/// May `w` use permission `perm` ('r', 's', 'c', 'u', 'd') on resources of this type at all?
fn type_granted(w: &Who, res_type: &str, perm: char) -> bool {
    w.scope.split(' ').any(|s| {
        let (_, rest) = s.split_once('/').unwrap();
        let (t, perms) = rest.rsplit_once('.').unwrap();
        (t == res_type || (t == "*" && res_type != "AuditEvent")) && perms.contains(perm)
    })
}

/// The oracle: is `r` within `w`'s grant? (R4 Patient compartment; a user's participation.)
fn sees(w: &Who, r: &Res) -> bool {
    if !type_granted(w, r.res_type, 'r') {
        return false;
    }
    let context = w.scope.split('/').next().unwrap();
    let involves = |who: &str, roles: &[&str]| {
        r.parties
            .iter()
            .any(|(role, p)| p == who && roles.contains(role))
    };
    let patient_roles: &[&str] = &["sender", "recipient", "subject", "requester"];
    // Staff-only: no patient takes part (sender, recipient, requester). The patient's side
    // (a patient user, or a patient-context grant with no user) never sees it.
    let staff_only = !r
        .parties
        .iter()
        .any(|(role, p)| *role != "subject" && p.starts_with("Patient/"));
    let patient_side = w
        .user
        .map_or(context == "patient", |u| u.starts_with("Patient/"));
    if staff_only && patient_side {
        return false;
    }
    // The patient's side reads what the patient takes part in, not what is only about them; of
    // the requests (messages not sent yet), only those it made (none of these is one of
    // Courier's reminders).
    let participant_roles: &[&str] = if r.res_type == "CommunicationRequest" && patient_side {
        &["sender", "requester"]
    } else {
        &["sender", "recipient", "requester"]
    };
    match context {
        "system" => true,
        "patient" if patient_side => involves(
            &format!("Patient/{}", w.patient.unwrap()),
            participant_roles,
        ),
        "patient" => involves(&format!("Patient/{}", w.patient.unwrap()), patient_roles),
        _ => {
            involves(w.user.unwrap(), &["sender", "recipient", "requester"])
                || w.patient
                    .is_some_and(|p| involves(&format!("Patient/{p}"), patient_roles))
        }
    }
}

async fn seed(app: &TestApp) -> Vec<Res> {
    let mut out = Vec::new();
    for s in PEOPLE {
        for r in PEOPLE.iter().filter(|r| *r != s) {
            let bin = app.create(&json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="})).await;
            let body = json!({"resourceType": "Communication", "status": "completed",
                "sender": {"reference": s}, "recipient": [{"reference": r}], "sent": "2024-03-01T10:00:00Z",
                "payload": [{"contentAttachment": {"contentType": "text/plain", "url": format!("Binary/{bin}")}}]});
            out.push(Res {
                res_type: "Communication",
                id: app.create(&body).await,
                parties: vec![("sender", s.to_string()), ("recipient", r.to_string())],
                binary: Some(bin),
            });
            let body = json!({"resourceType": "CommunicationRequest", "status": "active",
                "requester": {"reference": s}, "recipient": [{"reference": r}], "payload": [{"contentString": "please call"}]});
            out.push(Res {
                res_type: "CommunicationRequest",
                id: app.create(&body).await,
                parties: vec![("requester", s.to_string()), ("recipient", r.to_string())],
                binary: None,
            });
        }
    }
    // A staff-only thread about each patient: two doctors talking about them (labelled NOPAT,
    // hidden from the patient's side although the patient is its subject).
    for p in ["Patient/p1", "Patient/p2"] {
        let body = json!({"resourceType": "Communication", "status": "in-progress", "subject": {"reference": p},
            "sender": {"reference": "Practitioner/d1"}, "recipient": [{"reference": "Practitioner/d2"}]});
        let header = app.create(&body).await;
        let parties = vec![
            ("subject", p.to_string()),
            ("sender", "Practitioner/d1".into()),
            ("recipient", "Practitioner/d2".into()),
        ];
        out.push(Res {
            res_type: "Communication",
            id: header.clone(),
            parties: parties.clone(),
            binary: None,
        });
        let bin = app
            .create(
                &json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8="}),
            )
            .await;
        let body = json!({"resourceType": "Communication", "status": "completed", "subject": {"reference": p},
            "partOf": [{"reference": format!("Communication/{header}")}],
            "sender": {"reference": "Practitioner/d2"}, "recipient": [{"reference": "Practitioner/d1"}],
            "payload": [{"contentAttachment": {"contentType": "text/plain", "url": format!("Binary/{bin}")}}]});
        out.push(Res {
            res_type: "Communication",
            id: app.create(&body).await,
            parties: vec![
                ("subject", p.to_string()),
                ("sender", "Practitioner/d2".into()),
                ("recipient", "Practitioner/d1".into()),
            ],
            binary: Some(bin),
        });
    }
    out
}

/// Everything a token was shown, to check afterwards that nothing outside its grant leaked.
struct Seen(String);

impl Seen {
    async fn take(&mut self, r: reqwest::Response) -> (u16, Value) {
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        self.0.push_str(&text);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// For a request that itself named a resource outside the grant: its 404 may echo the id the
    /// client sent, which tells the client nothing new, so it is not scanned.
    async fn named(&mut self, r: reqwest::Response, visible: bool) -> (u16, Value) {
        if visible {
            return self.take(r).await;
        }
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

fn id_set(bundle: &Value, mode: &str) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| mode.is_empty() || e["search"]["mode"] == mode)
                .filter_map(|e| e["resource"]["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

both_backends! {
    async fn every_interaction_respects_the_grant_and_leaks_nothing(app: TestApp) {
        let all = seed(&app).await;
        // A reply from p2 to d2 answering p1's message to d1: an include must not drag the original along.
        let original = all.iter().find(|r| r.res_type == "Communication" && r.parties == vec![("sender", "Patient/p1".to_string()), ("recipient", "Practitioner/d1".to_string())]).unwrap().clone();
        let reply_body = json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Patient/p2"},
            "recipient": [{"reference": "Practitioner/d2"}], "inResponseTo": [{"reference": format!("Communication/{}", original.id)}]});
        let reply = Res { res_type: "Communication", id: app.create(&reply_body).await,
            parties: vec![("sender", "Patient/p2".into()), ("recipient", "Practitioner/d2".into())], binary: None };
        let mut all = all;
        all.push(reply.clone());
        let client_id = clients::add(&app.store, "matrix", clients::KeySource::Document(es384_key().1.to_string()), "system/*.cruds").unwrap();

        for w in WHO {
            let token = issue(&app.tokens, &client_id, w.scope, w.user, w.patient);
            let c = client_with_token(&token);
            let mut seen = Seen(String::new());
            let name = w.name;
            for t in ["Communication", "CommunicationRequest"] {
                let expected: BTreeSet<String> = all.iter().filter(|r| r.res_type == t && sees(w, r)).map(|r| r.id.clone()).collect();
                // search, with an accurate total and as a count
                let (s, b) = seen.take(c.get(app.url(&format!("{t}?_count=200&_total=accurate"))).send().await.unwrap()).await;
                if type_granted(w, t, 's') {
                    assert_eq!(s, 200, "{name}: search {t}");
                    assert_eq!(id_set(&b, "match"), expected, "{name}: search {t}");
                    assert_eq!(b["total"].as_u64().unwrap() as usize, expected.len(), "{name}: _total {t}");
                    let (_, b) = seen.take(c.get(app.url(&format!("{t}?_summary=count"))).send().await.unwrap()).await;
                    assert_eq!(b["total"].as_u64().unwrap() as usize, expected.len(), "{name}: _summary=count {t}");
                    // a narrowing search only ever finds a subset of the grant
                    let (_, b) = seen.take(c.get(app.url(&format!("{t}?recipient=Patient/p1&_total=accurate"))).send().await.unwrap()).await;
                    let narrowed: BTreeSet<String> = all.iter().filter(|r| r.res_type == t && sees(w, r) && r.parties.iter().any(|(role, p)| *role == "recipient" && p == "Patient/p1")).map(|r| r.id.clone()).collect();
                    assert_eq!(id_set(&b, "match"), narrowed, "{name}: recipient=Patient/p1 on {t}");
                    assert_eq!(b["total"].as_u64().unwrap() as usize, narrowed.len());
                    // paging: small pages add up to exactly the grant
                    let mut paged = BTreeSet::new();
                    let mut next = Some(app.url(&format!("{t}?_count=3")));
                    while let Some(url) = next {
                        let (_, b) = seen.take(c.get(&url).send().await.unwrap()).await;
                        paged.extend(id_set(&b, "match"));
                        next = next_link(&b);
                    }
                    assert_eq!(paged, expected, "{name}: paging {t}");
                } else {
                    assert_eq!(s, 403, "{name}: search {t} without a scope for it");
                }
                // type history
                let (s, b) = seen.take(c.get(app.url(&format!("{t}/_history?_count=500"))).send().await.unwrap()).await;
                if type_granted(w, t, 'r') {
                    assert_eq!(s, 200, "{name}: history {t}");
                    assert_eq!(id_set(&b, ""), expected, "{name}: history {t}");
                } else {
                    assert_eq!(s, 403, "{name}: history {t}");
                }
            }
            // Each resource: read, vread, instance history, a batch GET, and a Binary read.
            let mut batch = Vec::new();
            for r in &all {
                let want = if !type_granted(w, r.res_type, 'r') { 403 } else if sees(w, r) { 200 } else { 404 };
                let path = format!("{}/{}", r.res_type, r.id);
                let v = want == 200;
                let (s, _) = seen.named(c.get(app.url(&path)).send().await.unwrap(), v).await;
                assert_eq!(s, want, "{name}: read {path}");
                let (s, _) = seen.named(c.get(app.url(&format!("{path}/_history/1"))).send().await.unwrap(), v).await;
                assert_eq!(s, want, "{name}: vread {path}");
                let (s, _) = seen.named(c.get(app.url(&format!("{path}/_history"))).send().await.unwrap(), v).await;
                assert_eq!(s, want, "{name}: history {path}");
                batch.push((json!({"request": {"method": "GET", "url": path}}), want));
                if let Some(bin) = &r.binary {
                    // A Binary follows the message that attaches it (each Binary is attached once).
                    let want = if sees(w, r) { 200 } else { 404 };
                    let (s, _) = seen.named(c.get(app.url(&format!("Binary/{bin}"))).header("accept", FHIR_JSON).send().await.unwrap(), want == 200).await;
                    assert_eq!(s, want, "{name}: Binary attached to {path}");
                }
            }
            let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": batch.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>()});
            let (s, b) = seen.named(c.post(app.url("")).header("content-type", FHIR_JSON).body(bundle.to_string()).send().await.unwrap(), false).await;
            assert_eq!(s, 200);
            for (i, (_, want)) in batch.iter().enumerate() {
                let status = b["entry"][i]["response"]["status"].as_str().unwrap();
                assert!(status.starts_with(&want.to_string()), "{name}: batch entry {i}: {status}, want {want}");
                if *want == 200 {
                    seen.0.push_str(&b["entry"][i].to_string());
                }
            }
            // Includes and reverse includes never bring in what the token may not see.
            if type_granted(w, "Communication", 's') {
                // (the self link echoes the _id the client sent, so only a visible one is scanned)
                let (_, b) = seen.named(c.get(app.url(&format!("Communication?_id={}&_include=Communication:in-response-to", reply.id))).send().await.unwrap(), sees(w, &reply)).await;
                let expect: BTreeSet<String> = [&original].iter().filter(|r| sees(w, r) && sees(w, &reply)).map(|r| r.id.clone()).collect();
                assert_eq!(id_set(&b, "include"), expect, "{name}: _include");
                let (_, b) = seen.named(c.get(app.url(&format!("Communication?_id={}&_revinclude=Communication:in-response-to", original.id))).send().await.unwrap(), sees(w, &original)).await;
                let expect: BTreeSet<String> = [&reply].iter().filter(|r| sees(w, r) && sees(w, &original)).map(|r| r.id.clone()).collect();
                assert_eq!(id_set(&b, "include"), expect, "{name}: _revinclude");
            }
            // The audit trail takes a scope that names AuditEvent.
            let (s, _) = seen.take(c.get(app.url("AuditEvent")).send().await.unwrap()).await;
            assert_eq!(s, 403, "{name}: AuditEvent");

            // Writes: outside the grant is 404 (update/patch/delete of what it cannot see) or 403.
            for r in all.iter().filter(|r| r.res_type == "Communication") {
                let path = format!("Communication/{}", r.id);
                let can_update = type_granted(w, "Communication", 'u');
                let visible = sees(w, r);
                if can_update && !visible {
                    let me = w.user.unwrap();
                    let body = json!({"resourceType": "Communication", "id": r.id, "status": "completed", "sender": {"reference": me}, "category": [{"text": "question"}]});
                    let (s, _) = seen.named(c.put(app.url(&path)).header("content-type", FHIR_JSON).body(body.to_string()).send().await.unwrap(), false).await;
                    assert_eq!(s, 404, "{name}: update of {path} it cannot see");
                    let patch = json!([{"op": "replace", "path": "/status", "value": "stopped"}]);
                    let (s, _) = seen.named(c.patch(app.url(&path)).header("content-type", "application/json-patch+json").body(patch.to_string()).send().await.unwrap(), false).await;
                    assert_eq!(s, 404, "{name}: patch of {path}");
                    let (s, _) = seen.named(c.delete(app.url(&path)).send().await.unwrap(), false).await;
                    assert_eq!(s, 404, "{name}: delete of {path}");
                } else if !can_update {
                    let (s, _) = seen.named(c.delete(app.url(&path)).send().await.unwrap(), visible).await;
                    assert_eq!(s, 403, "{name}: delete without the scope");
                }
            }
            let can_create = type_granted(w, "Communication", 'c');
            let stranger = json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Practitioner/d9"}, "recipient": [{"reference": "Practitioner/d8"}]});
            let before = app.row_counts();
            let (s, _) = seen.take(c.post(app.url("Communication")).header("content-type", FHIR_JSON).body(stranger.to_string()).send().await.unwrap()).await;
            assert_eq!(s, 403, "{name}: create outside the grant");
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": stranger, "request": {"method": "POST", "url": "Communication"}}]});
            let (s, _) = seen.take(c.post(app.url("")).header("content-type", FHIR_JSON).body(tx.to_string()).send().await.unwrap()).await;
            assert_eq!(s, 403, "{name}: transaction outside the grant");
            assert_eq!(app.row_counts(), before, "{name}: refused writes change nothing");
            if can_create {
                let me = w.user.unwrap();
                let own = json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": me}, "recipient": [{"reference": "Practitioner/d2"}], "category": [{"text": "question"}]});
                let (s, b) = seen.take(c.post(app.url("Communication")).header("content-type", FHIR_JSON).body(own.to_string()).send().await.unwrap()).await;
                assert_eq!(s, 201, "{name}: create inside the grant");
                let id = b["id"].as_str().unwrap().to_string();
                let (s, _) = seen.take(c.delete(app.url(&format!("Communication/{id}"))).send().await.unwrap()).await;
                assert_eq!(s, 204, "{name}: delete its own");
            }
            if w.user.is_some_and(|u| u.starts_with("Patient/")) && can_create {
                let to_other = json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": w.user.unwrap()}, "recipient": [{"reference": "Patient/p1"}]});
                let (s, b) = seen.take(c.post(app.url("Communication")).header("content-type", FHIR_JSON).body(to_other.to_string()).send().await.unwrap()).await;
                assert_eq!(s, 403, "{name}: a patient addresses another patient: {b}");
            }

            // Zero leaks: no id outside the grant appears in anything this token was shown.
            // (A resource it may see can itself refer to one it may not: the reply names the
            // message it answers. That reference is the reply's content, not a leak.)
            let referenced = if sees(w, &reply) { Some(original.id.clone()) } else { None };
            for r in all.iter().filter(|r| !sees(w, r) && referenced.as_ref() != Some(&r.id)) {
                assert!(!seen.0.contains(&r.id), "{name}: leaked {} {}", r.res_type, r.id);
                if let Some(bin) = &r.binary {
                    assert!(!seen.0.contains(bin.as_str()), "{name}: leaked Binary {bin}");
                }
            }
        }
    }

    async fn granular_scopes_narrow_by_query(app: TestApp) {
        let cat = |code: &str| json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": code}]}]);
        let mut ids: HashMap<&str, String> = HashMap::new();
        for code in ["alert", "notification"] {
            let mut m = message("Patient/p1", "2024-01-01", "x");
            m["category"] = cat(code);
            ids.insert(code, app.create(&m).await);
        }
        let client_id = clients::add(&app.store, "g", clients::KeySource::Document(es384_key().1.to_string()), "system/*.cruds").unwrap();
        let token = issue(&app.tokens, &client_id, "patient/Communication.rs?category=http://terminology.hl7.org/CodeSystem/communication-category|alert", Some("Patient/p1"), Some("p1"));
        let c = client_with_token(&token);
        let b: Value = c.get(app.url("Communication")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids_of(&b), vec![ids["alert"].clone()]);
        assert_eq!(c.get(app.url(&format!("Communication/{}", ids["notification"]))).send().await.unwrap().status(), 404);
        assert_eq!(c.get(app.url(&format!("Communication/{}", ids["alert"]))).send().await.unwrap().status(), 200);
    }
}

fn ids_of(b: &Value) -> Vec<String> {
    ids(b)
}

async fn token_for(
    app: &TestApp,
    scope: &str,
    user: Option<&str>,
    patient: Option<&str>,
) -> reqwest::Client {
    let client_id = clients::add(
        &app.store,
        "edge",
        clients::KeySource::Document(es384_key().1.to_string()),
        "system/*.cruds",
    )
    .unwrap();
    client_with_token(&issue(&app.tokens, &client_id, scope, user, patient))
}

async fn post_json(c: &reqwest::Client, app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    let r = c
        .post(app.url(path))
        .header("content-type", FHIR_JSON)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

both_backends! {
    async fn binaries_follow_their_messages_and_cannot_be_borrowed(app: TestApp) {
        let p1 = token_for(&app, "patient/Communication.crs patient/Binary.c", Some("Patient/p1"), Some("p1")).await;
        let p2 = token_for(&app, "patient/Communication.crs patient/Binary.c", Some("Patient/p2"), Some("p2")).await;
        let d1 = token_for(&app, "user/Communication.rs", Some("Practitioner/d1"), None).await;
        // p2 uploads a photo and sends it to d2.
        let r = p2.post(app.url("Binary")).header("content-type", "image/png").body(b"\x89PNG\r\n\x1a\n\x09\x09\x09".to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let photo = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        assert_eq!(p2.get(app.url(&format!("Binary/{photo}"))).send().await.unwrap().status(), 200, "the uploader reads it back");
        let msg = |sender: &str, recipient: &str, bin: &str| json!({"resourceType": "Communication", "status": "completed",
            "sender": {"reference": sender}, "recipient": [{"reference": recipient}],
            "category": [{"text": "question"}],
            "payload": [{"contentAttachment": {"contentType": "image/png", "url": format!("Binary/{bin}")}}]});
        assert_eq!(post_json(&p2, &app, "Communication", &msg("Patient/p2", "Practitioner/d2", &photo)).await.0, 201);
        // p1 learns the id and tries to attach it to a message of its own: refused, nothing written.
        assert_eq!(p1.get(app.url(&format!("Binary/{photo}"))).send().await.unwrap().status(), 404);
        let before = app.row_counts();
        let (s, b) = post_json(&p1, &app, "Communication", &msg("Patient/p1", "Practitioner/d1", &photo)).await;
        assert_eq!(s, 403, "{b}");
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": msg("Patient/p1", "Practitioner/d1", &photo), "request": {"method": "POST", "url": "Communication"}}]});
        assert_eq!(post_json(&p1, &app, "", &tx).await.0, 403);
        assert_eq!(app.row_counts(), before);
        assert_eq!(p1.get(app.url(&format!("Binary/{photo}"))).send().await.unwrap().status(), 404);
        // p1 sends its own upload to d1 in one transaction (urn:uuid attachment): d1 may then read it.
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:0b0b2f9e-6a4d-4e63-9a55-4c1b0f0d9a01", "resource": {"resourceType": "Binary", "contentType": "text/plain", "data": "aGk="}, "request": {"method": "POST", "url": "Binary"}},
            {"resource": {"resourceType": "Communication", "status": "completed", "sender": {"reference": "Patient/p1"}, "recipient": [{"reference": "Practitioner/d1"}], "category": [{"text": "question"}],
                "payload": [{"contentAttachment": {"contentType": "text/plain", "url": "urn:uuid:0b0b2f9e-6a4d-4e63-9a55-4c1b0f0d9a01"}}]}, "request": {"method": "POST", "url": "Communication"}}]});
        let (s, b) = post_json(&p1, &app, "", &tx).await;
        assert_eq!(s, 200, "{b}");
        let bin = b["entry"][0]["resource"]["id"].as_str().unwrap().to_string();
        assert_eq!(b["entry"][1]["resource"]["payload"][0]["contentAttachment"]["url"], format!("Binary/{bin}"));
        assert_eq!(b["entry"][0]["resource"]["securityContext"]["reference"], "Patient/p1");
        assert_eq!(d1.get(app.url(&format!("Binary/{bin}"))).send().await.unwrap().status(), 200, "the recipient reads the attachment");
        assert_eq!(p2.get(app.url(&format!("Binary/{bin}"))).send().await.unwrap().status(), 404);
    }

    async fn confined_writes_reveal_nothing_and_need_their_permissions(app: TestApp) {
        // p2's message, then deleted (two versions).
        let theirs = app.create(&json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Patient/p2"}, "recipient": [{"reference": "Practitioner/d2"}]})).await;
        assert_eq!(app.client.delete(app.url(&format!("Communication/{theirs}"))).send().await.unwrap().status(), 204);
        let p1 = token_for(&app, "patient/Communication.cruds", Some("Patient/p1"), Some("p1")).await;
        let mine = json!({"resourceType": "Communication", "id": theirs, "status": "completed", "sender": {"reference": "Patient/p1"}, "category": [{"text": "question"}]});
        // Neither 412 (which would tell the version) nor a revival: as if it did not exist... but it does.
        let r = p1.put(app.url(&format!("Communication/{theirs}"))).header("content-type", FHIR_JSON).header("if-match", "W/\"1\"").body(mine.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let r = p1.put(app.url(&format!("Communication/{theirs}"))).header("content-type", FHIR_JSON).body(mine.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 404);
        // An update that would create takes create permission.
        let ru = token_for(&app, "system/Communication.ru", None, None).await;
        let fresh = uuid::Uuid::new_v4().to_string();
        let r = ru.put(app.url(&format!("Communication/{fresh}"))).header("content-type", FHIR_JSON)
            .body(json!({"resourceType": "Communication", "id": fresh, "status": "completed"}).to_string()).send().await.unwrap();
        assert_eq!(r.status(), 403);
        // Type history is a search (`s`); instance history a read (`r`).
        let r_only = token_for(&app, "system/Communication.r", None, None).await;
        assert_eq!(r_only.get(app.url("Communication/_history")).send().await.unwrap().status(), 403);
        let visible = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        assert_eq!(r_only.get(app.url(&format!("Communication/{visible}/_history"))).send().await.unwrap().status(), 200);
        // A patch reads the resource and returns it: it takes read permission too.
        let u_only = token_for(&app, "system/Communication.u", None, None).await;
        let r = u_only.patch(app.url(&format!("Communication/{visible}"))).header("content-type", "application/json-patch+json").body("[]").send().await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(!r.text().await.unwrap().contains("\"payload\""));
    }

    async fn include_iterate_never_walks_through_hidden_resources(app: TestApp) {
        // C (visible to p1) <- B (hidden from p1) <- A (visible to p1), linked by partOf.
        let c = app.create(&json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Practitioner/d1"}, "recipient": [{"reference": "Patient/p1"}]})).await;
        let b = app.create(&json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Patient/p2"}, "recipient": [{"reference": "Practitioner/d2"}],
            "partOf": [{"reference": format!("Communication/{c}")}]})).await;
        let a = app.create(&json!({"resourceType": "Communication", "status": "completed", "sender": {"reference": "Patient/p1"}, "recipient": [{"reference": "Practitioner/d1"}],
            "partOf": [{"reference": format!("Communication/{b}")}]})).await;
        let p1 = token_for(&app, "patient/Communication.rs", Some("Patient/p1"), Some("p1")).await;
        let body: Value = p1.get(app.url(&format!("Communication?_id={a}&_include:iterate=Communication:part-of"))).send().await.unwrap().json().await.unwrap();
        assert_eq!(id_set(&body, "match"), [a.clone()].into_iter().collect());
        assert!(id_set(&body, "include").is_empty(), "reached through a hidden resource: {:?}", id_set(&body, "include"));
        // The same search as the system sees the whole chain.
        let all = app.get_json(&format!("Communication?_id={a}&_include:iterate=Communication:part-of")).await;
        assert_eq!(id_set(&all, "include"), [b, c].into_iter().collect());
    }
}

both_backends! {
    async fn binary_ownership_is_exact_and_cannot_be_claimed(app: TestApp) {
        // Two patients through the same portal client, with no fhirUser: each owns only its own upload.
        let client_id = clients::add(&app.store, "portal", clients::KeySource::Document(es384_key().1.to_string()), "system/*.cruds").unwrap();
        let as_patient = |p: &'static str| client_with_token(&issue(&app.tokens, &client_id, "patient/Communication.crs patient/Binary.cr", None, Some(p)));
        let (p1, p2) = (as_patient("p1"), as_patient("p2"));
        let r = p1.post(app.url("Binary")).header("content-type", "text/plain").body("p1's scan").send().await.unwrap();
        assert_eq!(r.status(), 201);
        let mine = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string();
        assert_eq!(p1.get(app.url(&format!("Binary/{mine}"))).send().await.unwrap().status(), 200);
        assert_eq!(p2.get(app.url(&format!("Binary/{mine}"))).send().await.unwrap().status(), 404);
        // The same client's token without a Binary scope does not read it either.
        let narrow = client_with_token(&issue(&app.tokens, &client_id, "patient/Communication.rs", None, Some("p1")));
        assert_eq!(narrow.get(app.url(&format!("Binary/{mine}"))).send().await.unwrap().status(), 404);
        // Claiming someone else's ownership at upload does not stick.
        let spoof = json!({"resourceType": "Binary", "contentType": "text/plain", "data": "aGk=", "securityContext": {"reference": "Practitioner/d1"}});
        let (s, b) = post_json(&p2, &app, "Binary", &spoof).await;
        assert_eq!(s, 201);
        assert_ne!(b["securityContext"], json!({"reference": "Practitioner/d1"}));
        let d1 = client_with_token(&issue(&app.tokens, &client_id, "user/Binary.r user/Communication.rs", Some("Practitioner/d1"), None));
        assert_eq!(d1.get(app.url(&format!("Binary/{}", b["id"].as_str().unwrap()))).send().await.unwrap().status(), 404);
    }

    async fn bundles_cannot_use_conditional_create_to_read(app: TestApp) {
        let bin = app.create(&json!({"resourceType": "Binary", "contentType": "text/plain", "data": "c2VjcmV0"})).await;
        let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="},
            "request": {"method": "POST", "url": "Binary", "ifNoneExist": format!("_id={bin}")}}]});
        let r: Value = app.post("", &b).await.json().await.unwrap();
        assert!(r["entry"][0]["response"]["status"].as_str().unwrap().starts_with("400"), "{r}");
        assert!(!r.to_string().contains("c2VjcmV0"));
        // A conditional create that matches answers with the match: it takes read permission.
        let msg = app.create(&message("Patient/p1", "2024-01-01", "x")).await;
        let cs = token_for(&app, "system/Communication.cs", None, None).await;
        let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": message("Patient/p1", "2024-01-01", "y"),
            "request": {"method": "POST", "url": "Communication", "ifNoneExist": format!("_id={msg}")}}]});
        let (s, b) = post_json(&cs, &app, "", &tx).await;
        assert_eq!(s, 403, "{b}");
    }

    async fn a_confined_search_does_not_write_into_another_patients_audit_trail(app: TestApp) {
        // (counted by entity: a search by `patient` would itself be an event naming p1)
        let count = || async { app.get_json("AuditEvent?entity=Patient/p1&_summary=count").await["total"].as_i64().unwrap() };
        let before = count().await;
        let p2 = token_for(&app, "patient/Communication.rs", Some("Patient/p2"), Some("p2")).await;
        assert_eq!(p2.get(app.url("Communication?subject=Patient/p1")).send().await.unwrap().status(), 200);
        assert_eq!(count().await, before, "p2's search is not an event in p1's trail");
        let p1 = token_for(&app, "patient/Communication.rs", Some("Patient/p1"), Some("p1")).await;
        assert_eq!(p1.get(app.url("Communication?subject=Patient/p1")).send().await.unwrap().status(), 200);
        assert_eq!(count().await, before + 1, "p1's own search is");
    }
}
