//! EHRs that differ within the SMART spec (issue 22's compatibility matrix): each behaviour the
//! test EHR can take, and Courier working with it.

use crate::both_backends;
use crate::ehr::{launch_as, new_ehr, person, spawn_ehr, TestEhr};
use crate::helpers::*;
use courier::smart::launch::in_the_ehrs_syntax;
use courier::smart::registry;
use serde_json::json;

async fn fixture(app: &TestApp, ehr: &TestEhr) {
    let mut ada = person("Patient", "a1", &[]);
    ada["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
    let mut grace = person("Practitioner", "dr-a", &[]);
    grace["name"] = json!([{"given": ["Grace"], "family": "Hopper"}]);
    ehr.control(reqwest::Method::POST, "seed", Some(json!([ada, grace])))
        .await;
    let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
    n.launch_scopes = courier::config::default_launch_scope().leak();
    registry::add(&app.store, &n).unwrap();
    ehr.register_courier(app, "courier").await;
}

#[test]
fn v2_scopes_are_asked_in_v1_of_an_ehr_that_speaks_only_v1() {
    let v1 = vec!["permission-v1".to_string()];
    let both = vec!["permission-v1".to_string(), "permission-v2".to_string()];
    let scopes = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    let asked = scopes("openid fhirUser launch user/Patient.r user/Practitioner.rs patient/CareTeam.rs user/Communication.cruds system/AuditEvent.c patient/Observation.rs?category=vital-signs");
    assert_eq!(
        in_the_ehrs_syntax(asked.clone(), &v1),
        scopes("openid fhirUser launch user/Patient.read user/Practitioner.read patient/CareTeam.read user/Communication.* system/AuditEvent.write patient/Observation.rs?category=vital-signs")
    );
    assert_eq!(in_the_ehrs_syntax(asked.clone(), &both), asked);
    assert_eq!(
        in_the_ehrs_syntax(asked.clone(), &["permission-v2".to_string()]),
        asked
    );
    // Neither advertised (an EHR from before SMART 2, or known by its CapabilityStatement
    // alone): v1.
    assert_eq!(
        in_the_ehrs_syntax(asked.clone(), &[]),
        in_the_ehrs_syntax(asked.clone(), &v1),
        "no permission-v2: v1"
    );
}

both_backends! {
    async fn an_ehr_that_speaks_only_smart_v1_scopes_launches(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        let set = ehr.control(reqwest::Method::POST, "settings", Some(json!({"scopes_version": 1}))).await;
        assert_eq!(set["scopes_version"], 1);
        // The EHR ignores v2 scopes: asked in v2, the launch would get no read of the user.
        let s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert!(s["fhirUser"].as_str().unwrap().starts_with("Practitioner/"), "{s}");
        assert_eq!(s["user_display"]["name"], "Grace Hopper");
        assert_eq!(s["patient_display"]["name"], "Ada Lovelace");
        // An EHR that speaks only v1 and advertises no permission at all (its CapabilityStatement
        // alone: from before SMART 2) gets v1 too, and the people are named.
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"metadata_oauth_uris": "same", "smart_configuration": false}))).await;
        app.ehrs.discovery().forget(&ehr.base);
        let s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(s["user_display"]["name"], "Grace Hopper", "{s}");
        assert_eq!(s["patient_display"]["name"], "Ada Lovelace");
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"smart_configuration": true}))).await;
        // And an EHR that speaks only v2 gets v2.
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"scopes_version": 2}))).await;
        app.ehrs.discovery().forget(&ehr.base);
        let s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(s["user_display"]["name"], "Grace Hopper");
    }
}

both_backends! {
    async fn a_narrower_grant_signs_in_and_keeps_what_an_earlier_launch_named(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // Granted in full: Grace is read and named.
        let full = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(full["user_display"]["name"], "Grace Hopper");
        // Now the EHR grants no read of Practitioner records (registered for less).
        ehr.control(reqwest::Method::POST, "clients", Some(json!({"client_id": "courier",
            "jwks_url": app.url("smart/jwks"), "redirect_uris": [app.url("smart/callback")],
            "scopes": "openid fhirUser launch launch/patient online_access user/Patient.r"}))).await;
        let narrow = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(narrow["fhirUser"], full["fhirUser"], "the same Courier identity: {narrow}");
        assert_eq!(narrow["user_display"]["name"], "Grace Hopper", "the earlier summary is kept");
        assert_eq!(narrow["patient_display"]["name"], "Ada Lovelace");
        // Someone never read in full gets a working sign-in without a name.
        let mut alan = person("Practitioner", "dr-b", &[]);
        alan["name"] = json!([{"given": ["Alan"], "family": "Turing"}]);
        ehr.control(reqwest::Method::POST, "seed", Some(json!([alan]))).await;
        let unnamed = launch_as(&app, &ehr, "a1", "Practitioner/dr-b").await;
        assert!(unnamed["fhirUser"].as_str().unwrap().starts_with("Practitioner/"), "{unnamed}");
        assert_ne!(unnamed["fhirUser"], full["fhirUser"]);
        assert!(unnamed["user_display"]["name"].is_null(), "{unnamed}");
        let token = unnamed["access_token"].as_str().unwrap();
        assert_eq!(client_with_token(token).get(app.url("Communication")).send().await.unwrap().status(), 200);
    }
}

both_backends! {
    async fn a_launch_without_a_patient_and_a_related_person_user_sign_in(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // A clinician opens Courier from the EHR with no patient in context: all their patients.
        let s = launch_as(&app, &ehr, "", "Practitioner/dr-a").await;
        assert!(s["patient"].is_null(), "{s}");
        assert_eq!(s["user_display"]["name"], "Grace Hopper");
        let token = s["access_token"].as_str().unwrap();
        assert_eq!(client_with_token(token).get(app.url("Communication")).send().await.unwrap().status(), 200);
        // A mother (RelatedPerson) signs in about her child: patient-side scopes, the child in
        // context, her relationship shown.
        let mut mother = json!({"resourceType": "RelatedPerson", "id": "r1", "patient": {"reference": "Patient/a1"},
            "name": [{"given": ["Anne"], "family": "Byron"}],
            "relationship": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH", "display": "mother"}]}]});
        mother["active"] = json!(true);
        ehr.control(reqwest::Method::POST, "seed", Some(json!([mother]))).await;
        let m = launch_as(&app, &ehr, "a1", "RelatedPerson/r1").await;
        assert!(m["fhirUser"].as_str().unwrap().starts_with("RelatedPerson/"), "{m}");
        assert!(m["patient"].as_str().unwrap().starts_with("Patient/"), "{m}");
        assert_eq!(m["user_display"]["name"], "Anne Byron");
        assert_eq!(m["user_display"]["role"], "mother");
        assert_eq!(m["patient_display"]["name"], "Ada Lovelace");
        let t = m["access_token"].as_str().unwrap();
        // Her token is a patient-side one: she cannot search the audit trail.
        assert_eq!(client_with_token(t).get(app.url("AuditEvent")).send().await.unwrap().status(), 403);
        assert_eq!(client_with_token(t).get(app.url("Communication")).send().await.unwrap().status(), 200);
    }
}

both_backends! {
    async fn id_tokens_signed_es384_with_relative_fhir_user_and_skewed_clocks_are_checked(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        let set = |v: serde_json::Value| {
            let ehr = &ehr;
            async move { ehr.control(reqwest::Method::POST, "settings", Some(v)).await }
        };
        // ES384 (a P-384 key beside the RS256 one in the JWKS), fhirUser relative.
        let s = set(json!({"id_token_alg": "ES384", "fhir_user_form": "relative"})).await;
        assert_eq!(s["id_token_alg"], "ES384");
        let l = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(l["user_display"]["name"], "Grace Hopper", "{l}");
        // The EHR's clock 90 s behind, its id_tokens living 60 s: expired 30 s ago by Courier's
        // clock, within the 60 s of skew allowed.
        set(json!({"id_token_alg": "RS256", "fhir_user_form": "absolute", "token_ttl": 60, "clock_skew_secs": -90})).await;
        let l = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(l["user_display"]["name"], "Grace Hopper", "{l}");
        // 60 s ahead: issued "in the future" by Courier's clock, accepted.
        set(json!({"clock_skew_secs": 60})).await;
        launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        // An id_token issued for another app: refused, said in words (not the library's name).
        set(json!({"id_token_aud": "another-app"})).await;
        let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a"}))).await;
        let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
        let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
        let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("for another app") && !page.contains("InvalidAudience"), "{page}");
        // Several audiences: Courier among them is not enough without azp naming Courier
        // (OpenID Connect Core §3.1.3.7), and an azp naming another app is refused.
        for (aud, azp, ok) in [
            (json!(["$client", "another-app"]), serde_json::Value::Null, false),
            (json!(["$client", "another-app"]), json!("another-app"), false),
            (json!("$client"), json!("another-app"), false),
            (json!(["$client", "another-app"]), json!("$client"), true),
        ] {
            set(json!({"id_token_aud": aud, "id_token_azp": azp})).await;
            let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a"}))).await;
            let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
            let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
            let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
            assert_eq!(status == 200, ok, "{aud} {azp}: {page}");
            if !ok {
                assert!(page.contains("azp"), "{page}");
            }
        }
        set(json!({"id_token_aud": null, "id_token_azp": null})).await;
        // A token that is not a bearer token (SMART's token_type is "Bearer", in any case).
        set(json!({"token_type": "MAC"})).await;
        let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a"}))).await;
        let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
        let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
        let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("bearer tokens only"), "{page}");
        set(json!({"token_type": "bearer"})).await;
        launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        set(json!({"token_type": "Bearer"})).await;
        // expires_in as a string of digits, or with a fraction: RFC 6749 makes it a number, EHRs
        // in use send both, and the sign-in once failed on them as a malformed token response.
        for form in ["string", "fraction"] {
            let s = set(json!({"expires_in_form": form})).await;
            assert_eq!(s["expires_in_form"], form);
            let l = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
            assert_eq!(l["user_display"]["name"], "Grace Hopper", "{form}: {l}");
        }
        set(json!({"expires_in_form": "number"})).await;
        // 200 s behind: expired beyond the skew allowed, refused with a page that says so.
        set(json!({"clock_skew_secs": -200})).await;
        let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a"}))).await;
        let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
        let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
        let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("id_token"), "{page}");
        assert!(page.contains("Reference: "), "a reference to give the administrator: {page}");
        // 10 minutes ahead: issued "in the future" beyond any drift, a wrong clock; refused.
        set(json!({"clock_skew_secs": 600, "token_ttl": 3600})).await;
        let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a"}))).await;
        let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
        let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
        let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("clock"), "{page}");
        // A right clock again. An `iss` whose scheme is upper case, with a trailing slash, names
        // the same EHR (RFC 3986 §6.2.2.1), and a banner hint sent as the string "true" is taken.
        set(json!({"clock_skew_secs": 0, "token_ttl": 300})).await;
        let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a", "need_patient_banner": "true"}))).await;
        let upper = format!("{}/", ehr.base.replacen("http://", "HTTP://", 1));
        let (_, to_ehr, page) = crate::ehr::step(&app.url(&format!("launch?iss={upper}&launch={}", launch["launch"].as_str().unwrap()))).await;
        let to_ehr = to_ehr.unwrap_or_else(|| panic!("the launch goes to the EHR: {page}"));
        let (_, back, _) = crate::ehr::step(&to_ehr).await;
        let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(crate::ehr::session_of(&page)["need_patient_banner"], true, "{page}");
        // Other spellings of the hint are read; with none, or one that cannot be read, the app
        // shows a clinician which patient is in context (the banner is the safe side: a
        // clinician must see whose record they are writing in). Only an explicit "no" hides it.
        // (A patient in their own portal is not shown their own banner unless the EHR asks:
        // `ehr::ehr_and_standalone_launch_end_in_a_courier_user_token`.)
        for (hint, banner) in [(json!("yes"), true), (json!(1), true), (json!("no"), false), (json!(0), false), (json!(false), false), (json!("maybe"), true), (serde_json::Value::Null, true)] {
            let mut body = json!({"patient": "a1", "user": "Practitioner/dr-a"});
            if !hint.is_null() {
                body["need_patient_banner"] = hint.clone();
            }
            let launch = ehr.control(reqwest::Method::POST, "launches", Some(body)).await;
            let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
            let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
            let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
            assert_eq!(status, 200, "{hint}: {page}");
            assert_eq!(crate::ehr::session_of(&page)["need_patient_banner"], banner, "{hint}");
        }
    }
}

both_backends! {
    async fn an_ehr_that_gives_no_refresh_token_ends_the_session_with_its_token(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // Asked without online_access/offline_access, the EHR gives no refresh token; its access
        // token lives 66 s (Courier renews an EHR token when less than a minute is left).
        let mut n = new_ehr("ehr-b", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch user/Patient.r user/Practitioner.r";
        registry::remove(&app.store, "ehr-a").unwrap();
        registry::add(&app.store, &n).unwrap();
        ehr.register_courier(&app, "courier").await;
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"token_ttl": 66}))).await;
        let s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let handle = s["session"].as_str().unwrap().to_string();
        // While the EHR's token lives, the session refreshes Courier's token.
        let (st, fresh) = crate::ehr::session_post(&app, "smart/session/refresh", &handle, None).await;
        assert_eq!(st, 200, "{fresh}");
        // Once it is due for renewal it cannot be renewed: the session ends, plainly.
        tokio::time::sleep(std::time::Duration::from_millis(7000)).await;
        let (st, body) = crate::ehr::session_post(&app, "smart/session/refresh", &handle, None).await;
        assert_eq!(st, 401, "{body}");
        assert!(body.to_string().contains("sign in again"), "{body}");
        let t = fresh["access_token"].as_str().unwrap();
        assert_eq!(client_with_token(t).get(app.url("Communication")).send().await.unwrap().status(), 401, "every token of the session is revoked");
    }
}

both_backends! {
    async fn discovery_by_smart_configuration_first_and_the_capability_statement_when_it_is_missing(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // Both documents, disagreeing: the CapabilityStatement names endpoints that answer
        // nothing. The SMART configuration is authoritative (SMART App Launch 2 §Discovery).
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"metadata_oauth_uris": "elsewhere"}))).await;
        let l = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(l["user_display"]["name"], "Grace Hopper", "{l}");
        // Only the CapabilityStatement (an older EHR): its oauth-uris are used.
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"metadata_oauth_uris": "same", "smart_configuration": false}))).await;
        app.ehrs.discovery().forget(&ehr.base);
        let l = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        assert_eq!(l["user_display"]["name"], "Grace Hopper", "{l}");
    }
}

// --- write-back (the outbox) to EHRs that differ ------------------------------------------------

/// Ada (patient a1) and Grace (dr-a) in `ehr`, which takes `settings`; Courier registered there as
/// `name`, with the registration's overrides. Returns the test EHR's settings as set.
async fn write_back_fixture(
    app: &TestApp,
    ehr: &TestEhr,
    name: &str,
    settings: serde_json::Value,
    overrides: impl FnOnce(&serde_json::Value) -> (Option<String>, Option<String>),
) -> serde_json::Value {
    let mut ada = person("Patient", "a1", &[]);
    ada["name"] = json!([{"given": ["Ada"], "family": "Lovelace"}]);
    let grace = person("Practitioner", "dr-a", &[]);
    ehr.control(reqwest::Method::POST, "seed", Some(json!([ada, grace])))
        .await;
    let set = ehr
        .control(reqwest::Method::POST, "settings", Some(settings))
        .await;
    let (token_url, audit_base) = overrides(&set);
    let mut n = new_ehr(name, &ehr.base, "ES384");
    n.launch_scopes = "openid fhirUser launch online_access user/Patient.r user/Practitioner.r";
    n.backend_token_url = token_url.as_deref();
    n.audit_base = audit_base.as_deref();
    registry::add(&app.store, &n).unwrap();
    ehr.register_courier(app, "courier").await;
    set
}

/// Launches (each signs in, so audits, about Ada and Grace: events for `name`), the second time
/// with the EHR dropping its answers to the next two writes after committing them. Every event
/// must reach the EHR exactly once. Returns the EHR's write log.
async fn delivers_each_event_exactly_once(
    app: &TestApp,
    ehr: &TestEhr,
    name: &str,
) -> Vec<serde_json::Value> {
    use crate::ehr::{delivered, drained};
    let backlog = |app: &TestApp| {
        courier::smart::outbox::status(&app.store)
            .unwrap()
            .into_iter()
            .find(|r| r.ehr == name)
            .expect("events for this EHR")
    };
    launch_as(app, ehr, "a1", "Practitioner/dr-a").await;
    assert!(
        drained(app).await,
        "{name}: delivered: {:?}",
        backlog(app).last_error
    );
    let first = backlog(app).delivered;
    assert!(first >= 1);
    // Lost answers: committed at the EHR, never heard by Courier, retried.
    ehr.control(
        reqwest::Method::POST,
        "faults",
        Some(json!({"drop_response_after_write": 2})),
    )
    .await;
    launch_as(app, ehr, "a1", "Practitioner/dr-a").await;
    launch_as(app, ehr, "a1", "Practitioner/dr-a").await;
    assert!(
        drained(app).await,
        "{name}: delivered after lost answers: {:?}",
        backlog(app).last_error
    );
    let counters = ehr.control(reqwest::Method::GET, "counters", None).await;
    assert_eq!(
        counters["dropped_responses"], 2,
        "{name}: two answers were lost"
    );
    let got = delivered(ehr).await;
    let b = backlog(app);
    assert_eq!(b.pending, 0);
    assert!(b.delivered > first);
    assert_eq!(got.len() as i64, b.delivered, "{name}: every event arrived");
    assert!(
        got.values().all(|copies| copies.len() == 1),
        "{name}: each exactly once: {:?}",
        got.values().map(Vec::len).collect::<Vec<_>>()
    );
    ehr.control(reqwest::Method::GET, "writes", None).await["writes"]
        .as_array()
        .unwrap()
        .clone()
}

both_backends! {
    async fn write_back_goes_through_the_backend_token_endpoint_of_the_registration(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        // Backend Services at /backend/token, which discovery does not name; /token turns
        // client_credentials away.
        let set = write_back_fixture(&app, &ehr, "ehr-a", json!({"backend_token_path": "/backend/token", "token_client_credentials": false}),
            |s| (s["backend_token_url"].as_str().map(String::from), None)).await;
        let url = set["backend_token_url"].as_str().unwrap();
        let registered = registry::get(&app.store, "ehr-a").unwrap().unwrap();
        assert_eq!(registered.backend_token_url.as_deref(), Some(url));
        // Without the override, the discovered (launch) endpoint refuses the connection.
        let mut discovered = registered.clone();
        discovered.backend_token_url = None;
        let err = app.ehrs.token(&app.store, &discovered).await.unwrap_err();
        assert!(err.contains("unsupported_grant_type"), "{err}");
        delivers_each_event_exactly_once(&app, &ehr, "ehr-a").await;
        let tokens = &ehr.control(reqwest::Method::GET, "counters", None).await["token"];
        // The assertion named the backend endpoint (the EHR checks aud = its own URL): no refusals
        // there. The launches' codes went to /token.
        assert!(tokens["by_endpoint"]["/backend/token"].as_u64().unwrap() >= 1, "{tokens}");
        assert_eq!(tokens["errors"]["invalid_client"], serde_json::Value::Null, "{tokens}");
        assert_eq!(tokens["errors"]["unsupported_grant_type"], 1, "only the probe without the override: {tokens}");
        assert!(tokens["by_endpoint"]["/token"].as_u64().unwrap() >= 3, "{tokens}");
    }
}

both_backends! {
    async fn write_back_is_exactly_once_to_ehrs_that_refuse_if_none_exist(app: TestApp) {
        // Servers without conditional create refuse it variously (400, 412, 501).
        let mut alive = vec![];
        for status in [400, 412, 501] {
            let name = format!("ehr-{status}");
            let Some(ehr) = spawn_ehr(&name) else { return };
            write_back_fixture(&app, &ehr, &name, json!({"if_none_exist": status}), |_| (None, None)).await;
            let writes = delivers_each_event_exactly_once(&app, &ehr, &name).await;
            // Searched for, then created plainly: no write carries the refused header.
            assert!(writes.iter().all(|w| w["if_none_exist"].is_null() && w["status"] == 201), "{name}: {writes:?}");
            // Only the first event paid for the refused tries (with and without Prefer); the rest
            // went the way that worked.
            let c = ehr.control(reqwest::Method::GET, "counters", None).await;
            assert_eq!(c["fhir"]["refused"]["if_none_exist"], 2, "{name}: {c}");
            assert_eq!(c["fhir"]["by_status"][status.to_string()], 2, "{name}: {c}");
            alive.push(ehr);
        }
    }
}

both_backends! {
    async fn write_back_is_exactly_once_to_ehrs_that_refuse_prefer_handling(app: TestApp) {
        // 400 to `Prefer: handling=strict`: the conditional create without it.
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        write_back_fixture(&app, &ehr, "ehr-a", json!({"prefer_handling": "refused"}), |_| (None, None)).await;
        let writes = delivers_each_event_exactly_once(&app, &ehr, "ehr-a").await;
        assert!(writes.iter().all(|w| w["prefer"].is_null() && w["if_none_exist"].is_string()), "{writes:?}");
        // Two lost answers: each retry found the committed write (a 200 match).
        assert_eq!(writes.iter().filter(|w| w["status"] == 200).count(), 2, "{writes:?}");
        let c = ehr.control(reqwest::Method::GET, "counters", None).await;
        assert_eq!(c["fhir"]["refused"]["prefer"], 1, "{c}");
        // Refusing both: searched for without Prefer, then created.
        let Some(both) = spawn_ehr("ehr-b") else { return };
        write_back_fixture(&app, &both, "ehr-b", json!({"prefer_handling": "refused", "if_none_exist": 400}), |_| (None, None)).await;
        let writes = delivers_each_event_exactly_once(&app, &both, "ehr-b").await;
        assert!(writes.iter().all(|w| w["prefer"].is_null() && w["if_none_exist"].is_null()), "{writes:?}");
        let c = both.control(reqwest::Method::GET, "counters", None).await;
        assert_eq!((c["fhir"]["refused"]["prefer"].as_u64(), c["fhir"]["refused"]["if_none_exist"].as_u64()), (Some(2), Some(1)), "{c}");
    }
}

both_backends! {
    async fn write_back_goes_to_the_audit_base_of_the_registration(app: TestApp) {
        // AuditEvents only at {iss}/audit: the FHIR base has no AuditEvent type.
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        let set = write_back_fixture(&app, &ehr, "ehr-a", json!({"audit_path": "/fhir/audit"}),
            |s| (None, s["audit_base"].as_str().map(String::from))).await;
        let audit_base = set["audit_base"].as_str().unwrap();
        assert_eq!(audit_base, format!("{}/audit", ehr.base));
        let writes = delivers_each_event_exactly_once(&app, &ehr, "ehr-a").await;
        assert!(writes.iter().all(|w| w["base"] == audit_base && w["resourceType"] == "AuditEvent"), "{writes:?}");
        // Written at another base, the EHR's references are absolute (they belong to the iss).
        let events = ehr.control(reqwest::Method::GET, "resources/AuditEvent", None).await;
        let text = events.to_string();
        assert!(text.contains(&format!("\"{}/Practitioner/dr-a\"", ehr.base)), "{text}");
        assert!(!text.contains("\"Practitioner/dr-a\""), "{text}");
    }
}

/// The overrides through `courier ehr add`, and bad ones refused with a clear error.
#[test]
fn ehr_overrides_are_checked_at_registration() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| run_cli(dir.path(), args);
    let add = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "ehr",
            "add",
            "--name",
            name,
            "--iss",
            "https://ehr.example.org/fhir",
            "--client-id",
            "c",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    for (extra, why) in [
        (
            ["--backend-token-url", "http://ehr.example.org/token"],
            "the backend token URL must be https",
        ),
        (
            ["--backend-token-url", "token"],
            "the backend token URL is not a URL",
        ),
        (
            ["--audit-base", "ftp://ehr.example.org/audit"],
            "the AuditEvent base must be https",
        ),
        (
            ["--audit-base", "https://u:p@ehr.example.org/audit"],
            "plain URL",
        ),
        (
            ["--audit-base", "https://ehr.example.org/audit?x=1"],
            "plain URL",
        ),
    ] {
        let (ok, _, err) = add("bad", &extra);
        assert!(!ok && err.contains(why), "{extra:?}: {err}");
    }
    let (ok, _, err) = add(
        "good",
        &[
            "--backend-token-url",
            "http://127.0.0.1:9/backend/token",
            "--audit-base",
            "https://audit.example.org/fhir/",
        ],
    );
    assert!(ok, "{err}");
    let (ok, list, _) = run(&["ehr", "list"]);
    assert!(ok && list.contains("\tbackend_token_url=http://127.0.0.1:9/backend/token\taudit_base=https://audit.example.org/fhir\n"), "{list}");
}

both_backends! {
    async fn the_launch_context_reaches_the_app_and_ehr_ids_stay_out_of_courier_tokens(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // An EHR launch with an encounter, fhirContext (SMART 2.0), an intent, a tenant, the banner.
        let l = ehr
            .control(
                reqwest::Method::POST,
                "launches",
                Some(json!({"patient": "a1", "user": "Practitioner/dr-a", "encounter": "e1",
                    "fhirContext": [{"reference": "Encounter/e1"}, {"reference": "DocumentReference/d9"}],
                    "intent": "reconcile-medications", "tenant": "clinic-7", "need_patient_banner": true})),
            )
            .await;
        let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!(
            "launch?iss={}&launch={}",
            ehr.base,
            l["launch"].as_str().unwrap()
        )))
        .await;
        let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
        let (s, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(s, 200, "{page}");
        let session = crate::ehr::session_of(&page);
        assert_eq!(session["encounter"], "e1", "{session}");
        assert_eq!(session["fhirContext"], json!([{"reference": "Encounter/e1"}, {"reference": "DocumentReference/d9"}]));
        assert_eq!(session["intent"], "reconcile-medications");
        assert_eq!(session["tenant"], "clinic-7");
        assert_eq!(session["need_patient_banner"], true);
        // The token names Courier's own patient; the EHR's encounter id is not a Courier id.
        let payload = session["access_token"].as_str().unwrap().split('.').nth(1).unwrap().to_string();
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert!(claims["encounter"].is_null(), "{claims}");
        assert_eq!(format!("Patient/{}", claims["patient"].as_str().unwrap()), session["patient"].as_str().unwrap());
        assert_ne!(claims["patient"], "a1");
    }

    async fn offline_access_refreshes_like_online_access_and_never_outlives_the_session(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // A registration that asks offline_access instead of online_access.
        let scope = courier::config::default_launch_scope().replace("online_access", "offline_access");
        assert!(scope.contains("offline_access"));
        app.store
            .execute("UPDATE ehrs SET launch_scopes = ? WHERE name = 'ehr-a'", vec![scope.into()])
            .unwrap();
        // …from an EHR that does not rotate refresh tokens (a refresh answer carries none, as
        // Oracle Health documents): Courier keeps using the first one.
        ehr.control(reqwest::Method::POST, "settings", Some(json!({"token_ttl": 2, "refresh_rotation": false}))).await;
        let s = launch_as(&app, &ehr, "a1", "Practitioner/dr-a").await;
        let handle = s["session"].as_str().unwrap().to_string();
        let grants = |c: serde_json::Value| c["token"]["by_grant_type"]["refresh_token"].as_u64().unwrap_or(0);
        for _ in 0..2 {
            tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            let before = grants(ehr.control(reqwest::Method::GET, "counters", None).await);
            let (st, fresh) = crate::ehr::session_post(&app, "smart/session/refresh", &handle, None).await;
            assert_eq!(st, 200, "{fresh}");
            assert_eq!(grants(ehr.control(reqwest::Method::GET, "counters", None).await), before + 1);
        }
        // Signing out ends it, offline_access or not: Courier keeps no EHR token past the session.
        let (st, _) = crate::ehr::session_post(&app, "smart/logout", &handle, None).await;
        assert_eq!(st, 200);
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let left: Vec<N> = app.store.query("SELECT COUNT(*) AS n FROM ehr_sessions", vec![]).unwrap();
        assert_eq!(left[0].n, 0, "the EHR's tokens went with the session");
        assert_eq!(crate::ehr::session_post(&app, "smart/session/refresh", &handle, None).await.0, 401);
    }
}
