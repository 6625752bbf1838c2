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
        in_the_ehrs_syntax(asked.clone(), &[]),
        asked,
        "no capabilities: as configured"
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
        // 200 s behind: expired beyond the skew allowed, refused with a page that says so.
        set(json!({"clock_skew_secs": -200})).await;
        let launch = ehr.control(reqwest::Method::POST, "launches", Some(json!({"patient": "a1", "user": "Practitioner/dr-a"}))).await;
        let (_, to_ehr, _) = crate::ehr::step(&app.url(&format!("launch?iss={}&launch={}", ehr.base, launch["launch"].as_str().unwrap()))).await;
        let (_, back, _) = crate::ehr::step(&to_ehr.unwrap()).await;
        let (status, _, page) = crate::ehr::step(&back.unwrap()).await;
        assert_eq!(status, 502, "{page}");
        assert!(page.contains("id_token"), "{page}");
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
