//! Multi-factor sign-in (issue 22 §3): each EHR's policy (off, trust-ehr, always), Courier's own
//! second factor through its HTTP steps (an authenticator app whose codes the test computes,
//! recovery codes), replayed and wrong codes, lockout, `courier mfa reset`, the token's `amr`, and
//! the audit trail of each step. Passkeys in a real browser: `browser::a_clinician_signs_in_with_a_passkey_and_a_patient_with_an_authenticator_app`.

use crate::ehr::{back_with, new_ehr, person, session_of, spawn_ehr, standalone, step, TestEhr};
use crate::helpers::*;
use crate::{both_backends, both_backends_with};
use courier::mfa;
use courier::smart::registry;
use serde_json::{json, Value};

async fn fixture(app: &TestApp, ehr: &TestEhr) {
    ehr.control(
        reqwest::Method::POST,
        "seed",
        Some(json!([
            person("Patient", "a1", &[]),
            person("Practitioner", "dr-a", &[])
        ])),
    )
    .await;
    let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
    n.launch_scopes = "openid fhirUser launch launch/patient online_access user/Patient.r user/Practitioner.r patient/Patient.r";
    registry::add(&app.store, &n).unwrap();
    ehr.register_courier(app, "courier").await;
}

async fn amr(ehr: &TestEhr, amr: Value, acr: Value) {
    ehr.control(
        reqwest::Method::POST,
        "settings",
        Some(json!({"id_token_amr": amr, "id_token_acr": acr})),
    )
    .await;
}

/// An EHR launch as far as Courier's answer to the EHR's redirect: its status and page.
async fn launch_page(app: &TestApp, ehr: &TestEhr, user: &str) -> (u16, String) {
    let l = ehr
        .control(
            reqwest::Method::POST,
            "launches",
            Some(json!({"patient": "a1", "user": user})),
        )
        .await;
    let (_, to_ehr, _) = step(&app.url(&format!(
        "launch?iss={}&launch={}",
        ehr.base,
        l["launch"].as_str().unwrap()
    )))
    .await;
    let (_, back, _) = step(&to_ehr.unwrap()).await;
    let (s, _, page) = step(&back.unwrap()).await;
    (s, page)
}

/// The ticket the callback's answer puts in the tab's sessionStorage.
fn ticket_of(page: &str) -> String {
    let key = "sessionStorage.setItem(\"courier.mfa\",\"";
    let start = page.find(key).expect("the second-factor bootstrap") + key.len();
    let end = page[start..].find('"').unwrap() + start;
    page[start..end].to_string()
}

/// The second-step page for the ticket a callback answer holds (`/smart/mfa/view`).
async fn view_of(app: &TestApp, page: &str) -> String {
    let (s, v) = mfa_step(app, "view", json!({"ticket": ticket_of(page)})).await;
    assert_eq!(s, 200, "{v}");
    v["html"].as_str().unwrap().to_string()
}

fn is_hand_off(page: &str) -> bool {
    page.contains("sessionStorage.setItem(\"courier.session\"")
}

async fn mfa_step(app: &TestApp, path: &str, body: Value) -> (u16, Value) {
    let r = app
        .anonymous
        .post(app.url(&format!("smart/mfa/{path}")))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn complete(app: &TestApp, ticket: &str) -> (u16, String) {
    let r = app
        .anonymous
        .post(app.url("smart/mfa/complete"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("ticket={ticket}"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn code_at(secret_b32: &str, at: i64) -> String {
    let secret = totp_rs::Secret::try_from_base32(secret_b32).unwrap();
    mfa::factors::totp(secret.as_bytes(), "t")
        .unwrap()
        .generate(at as u64)
        .to_string()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// How many AuditEvents record the step `code` (a subtype of Courier's mfa-step system).
async fn audited(app: &TestApp, code: &str) -> usize {
    let b: Value = app
        .client
        .get(app.url(&format!(
            "AuditEvent?subtype={}|{code}&_count=100",
            mfa::STEP_SYSTEM
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    b["entry"].as_array().map_or(0, |e| e.len())
}

#[test]
fn which_amr_values_show_a_second_factor() {
    let v =
        |a: &[&str]| mfa::shows_second_factor(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    for yes in [
        &["mfa"][..],
        &["pwd", "otp"],
        &["pwd", "mfa", "otp"],
        &["swk", "pin"],
        &["hwk", "fpt"],
        &["pwd", "fpt"],
        &["pwd", "sms"],
        &["mca", "pwd"],
    ] {
        assert!(v(yes), "{yes:?} shows a second factor");
    }
    // One method alone is one factor (amr lists every method used: ["sms"] is a passwordless
    // sign-in by text message), and two of one kind are still one kind.
    for no in [
        &[][..],
        &["pwd"],
        &["otp"],
        &["sms"],
        &["hwk"],
        &["swk"],
        &["pin"],
        &["user"],
        &["mca"],
        &["pwd", "kba"],
        &["fpt", "face"],
    ] {
        assert!(!v(no), "{no:?} shows one factor at most");
    }
    assert!(mfa::Policy::parse("sometimes").is_err());
}

both_backends! {
    async fn each_ehr_policy_decides_whether_courier_asks_for_its_own_second_factor(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // trust-ehr (the default) with an id_token whose amr shows a password and a one-time code:
        // no step-up; the token says how the user signed in.
        assert_eq!(mfa::settings(&app.store, "ehr-a").unwrap().launch, mfa::Policy::TrustEhr);
        amr(&ehr, json!(["pwd", "otp"]), Value::Null).await;
        let (s, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert_eq!(s, 200, "{page}");
        assert!(is_hand_off(&page), "{page}");
        let session = session_of(&page);
        let c = claims(session["access_token"].as_str().unwrap());
        assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
        assert_eq!(audited(&app, "ehr-asserted").await, 1);
        // An id_token with only a password, or no amr at all: Courier's own second factor, and
        // no session, no token until it passes.
        for a in [json!(["pwd"]), Value::Null] {
            amr(&ehr, a, Value::Null).await;
            let (s, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
            assert_eq!(s, 200);
            assert!(!is_hand_off(&page) && !page.contains("access_token"), "{page}");
            assert!(view_of(&app, &page).await.contains("Set up a second step"), "{page}");
            assert!(!ticket_of(&page).is_empty());
        }
        // An acr the registration names vouches too.
        mfa::set_settings(&app.store, "ehr-a", None, None, Some("urn:example:loa:mfa")).unwrap();
        amr(&ehr, Value::Null, json!("urn:example:loa:mfa")).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(is_hand_off(&page), "{page}");
        amr(&ehr, Value::Null, json!("urn:example:loa:1")).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(!is_hand_off(&page));
        // always: even an EHR's mfa is not enough.
        mfa::set_settings(&app.store, "ehr-a", Some("always"), None, None).unwrap();
        amr(&ehr, json!(["mfa"]), Value::Null).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(!is_hand_off(&page));
        // off: the EHR's sign-in is enough, and the token claims no second factor.
        mfa::set_settings(&app.store, "ehr-a", Some("off"), None, None).unwrap();
        amr(&ehr, json!(["pwd"]), Value::Null).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(is_hand_off(&page));
        let c = claims(session_of(&page)["access_token"].as_str().unwrap());
        assert_eq!(c["amr"], json!(["pwd"]));
        // The portal has a policy of its own: EHR launches off, the portal always.
        mfa::set_settings(&app.store, "ehr-a", None, Some("always"), None).unwrap();
        ehr.control(
            reqwest::Method::POST,
            "settings",
            Some(json!({"auto_approve_user": "Patient/a1", "standalone_patient": "a1"})),
        )
        .await;
        let (to_ehr, cookie) = standalone(&app).await;
        let (_, back, _) = step(&to_ehr).await;
        let (s, page) = back_with(&back.unwrap(), &cookie).await;
        assert_eq!(s, 200, "{page}");
        assert!(!is_hand_off(&page) && page.contains("courier.mfa"), "{page}");
        // Bad policies are refused and change nothing.
        assert!(mfa::set_settings(&app.store, "ehr-a", Some("maybe"), None, None).is_err());
        assert_eq!(mfa::settings(&app.store, "ehr-a").unwrap().launch, mfa::Policy::Off);
    }

    async fn a_person_enrols_an_authenticator_app_and_wrong_replayed_and_locked_out_codes_are_refused(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        amr(&ehr, json!(["pwd"]), Value::Null).await;
        // First sign-in: enrolment.
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let ticket = ticket_of(&page);
        // Nothing completes before a factor passes.
        let (s, body) = complete(&app, &ticket).await;
        assert_eq!(s, 400);
        assert!(!is_hand_off(&body));
        let (s, begun) = mfa_step(&app, "totp/enrol/begin", json!({"ticket": ticket})).await;
        assert_eq!(s, 200, "{begun}");
        let secret = begun["secret"].as_str().unwrap().to_string();
        assert!(begun["uri"].as_str().unwrap().starts_with("otpauth://totp/"));
        assert!(begun["qr"].as_str().unwrap().starts_with("data:image/svg+xml;base64,"));
        let (s, e) = mfa_step(&app, "totp/enrol/finish", json!({"ticket": ticket, "code": "000000x"})).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("wrong")));
        let first = code_at(&secret, now());
        let (s, done) = mfa_step(&app, "totp/enrol/finish", json!({"ticket": ticket, "code": first})).await;
        assert_eq!(s, 200, "{done}");
        let recovery: Vec<String> = done["recovery_codes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect();
        assert_eq!(recovery.len(), 10);
        let (s, page) = complete(&app, &ticket).await;
        assert_eq!(s, 200, "{page}");
        let session = session_of(&page);
        let c = claims(session["access_token"].as_str().unwrap());
        assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
        // The session's later tokens say the same.
        let (s, refreshed) = crate::ehr::session_post(&app, "smart/session/refresh", session["session"].as_str().unwrap(), None).await;
        assert_eq!(s, 200);
        assert_eq!(claims(refreshed["access_token"].as_str().unwrap())["amr"], json!(["pwd", "otp", "mfa"]));
        // The ticket is used up.
        assert_eq!(complete(&app, &ticket).await.0, 400);
        // No secret is stored in the clear.
        let user = c["fhirUser"].as_str().unwrap().to_string();
        let raw = totp_rs::Secret::try_from_base32(&secret).unwrap().as_bytes().to_vec();
        #[derive(diesel::QueryableByName)]
        struct Sealed {
            #[diesel(sql_type = diesel::sql_types::Binary)]
            sealed: Vec<u8>,
        }
        let rows: Vec<Sealed> = app.store.query("SELECT sealed FROM mfa_factors", vec![]).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(!rows[0].sealed.windows(raw.len()).any(|w| w == raw.as_slice()), "the TOTP secret is sealed");
        let factors = mfa::factors::list(&app.store, &user).unwrap();
        assert_eq!(factors.len(), 1);
        assert_eq!(factors[0].kind, "totp");
        assert_eq!(audited(&app, "totp-enrolled").await, 1);

        // Second sign-in: the app's code, never enrolment again.
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(view_of(&app, &page).await.contains("Confirm it's you"), "{page}");
        let ticket = ticket_of(&page);
        let (s, _) = mfa_step(&app, "totp/enrol/begin", json!({"ticket": ticket})).await;
        assert_eq!(s, 409, "a second app cannot be enrolled without the first");
        let (s, _) = mfa_step(&app, "passkey/register/begin", json!({"ticket": ticket})).await;
        assert_eq!(s, 409);
        // The code that enrolled is used up (RFC 6238 §5.2).
        let (s, e) = mfa_step(&app, "totp/verify", json!({"ticket": ticket, "code": first})).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("wrong")), "{e}");
        assert_eq!(audited(&app, "totp-replayed").await, 1);
        // The next step's code (one step of skew) passes once…
        let next = code_at(&secret, now() + 30);
        let (s, e) = mfa_step(&app, "totp/verify", json!({"ticket": ticket, "code": next})).await;
        assert_eq!(s, 200, "{e}");
        assert!(e["recovery_codes"].is_null());
        let (s, page) = complete(&app, &ticket).await;
        assert_eq!(s, 200);
        assert!(is_hand_off(&page));
        // …and an earlier step's code is refused from then on, whatever the ticket.
        let (_, page2) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let ticket2 = ticket_of(&page2);
        let (s, _) = mfa_step(&app, "totp/verify", json!({"ticket": ticket2, "code": next})).await;
        assert_eq!(s, 400);
        // A person has one sign-in waiting at a time: a newer one ends the older.
        let (_, newer) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let (s, e) = mfa_step(&app, "totp/verify", json!({"ticket": ticket2, "code": "123456"})).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("expired")), "{e}");
        let ticket2 = ticket_of(&newer);

        // A recovery code lets the person in once.
        let (s, e) = mfa_step(&app, "recovery/verify", json!({"ticket": ticket2, "code": recovery[0].to_uppercase()})).await;
        assert_eq!(s, 200, "{e}");
        assert_eq!(complete(&app, &ticket2).await.0, 200);
        let (_, page3) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let ticket3 = ticket_of(&page3);
        let (s, _) = mfa_step(&app, "recovery/verify", json!({"ticket": ticket3, "code": recovery[0]})).await;
        assert_eq!(s, 400, "a recovery code works once");
        assert_eq!(mfa::factors::recovery_codes_left(&app.store, &user).unwrap(), 9);
        // That used recovery code was one wrong answer (a right one clears the count); four more
        // make five within the window: the person is locked out, and then even a right code is
        // refused.
        for i in 0..4 {
            let (s, e) = mfa_step(&app, "totp/verify", json!({"ticket": ticket3, "code": "123456"})).await;
            if i < 3 {
                assert_eq!(s, 400, "{e}");
            } else {
                assert_eq!((s, e["error"].as_str()), (429, Some("locked")), "{e}");
            }
        }
        let (s, _) = mfa_step(&app, "recovery/verify", json!({"ticket": ticket3, "code": recovery[1]})).await;
        assert_eq!(s, 429, "locked out: a right recovery code is refused too");
        assert_eq!(complete(&app, &ticket3).await.0, 400);
        assert!(audited(&app, "locked-out").await >= 2);
        assert!(audited(&app, "totp-refused").await >= 3);
        // The recovery code tried while locked out is still unused.
        assert_eq!(mfa::factors::recovery_codes_left(&app.store, &user).unwrap(), 9);

        // An administrator's reset (a lost phone): factors, codes and lockout go; the next
        // sign-in enrols anew. Audited.
        let n = mfa::reset(&app.store, &user, "helpdesk ticket 42").unwrap();
        assert_eq!(n, 1);
        assert_eq!(mfa::factors::recovery_codes_left(&app.store, &user).unwrap(), 0);
        assert_eq!(audited(&app, "reset").await, 1);
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(view_of(&app, &page).await.contains("Set up a second step"), "{page}");
        // The app's old codes mean nothing now.
        let t = ticket_of(&page);
        let (s, _) = mfa_step(&app, "totp/verify", json!({"ticket": t, "code": code_at(&secret, now())})).await;
        assert_eq!(s, 400);
    }

    async fn second_factor_steps_refuse_bad_input_and_forged_passkeys(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        amr(&ehr, Value::Null, Value::Null).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let ticket = ticket_of(&page);
        // No ticket, an unknown ticket, not JSON, too large.
        for (body, status) in [
            (json!({}), 400),
            (json!({"ticket": "not-a-ticket"}), 400),
            (json!({"ticket": "x".repeat(500)}), 400),
        ] {
            let (s, e) = mfa_step(&app, "totp/verify", body).await;
            assert_eq!(s, status, "{e}");
            assert_eq!(e["error"], "expired");
        }
        let r = app.anonymous.post(app.url("smart/mfa/totp/verify")).body("ticket=abc").send().await.unwrap();
        assert_eq!(r.status(), 400);
        let r = app.anonymous.post(app.url("smart/mfa/totp/verify")).body(vec![b'a'; 70_000]).send().await.unwrap();
        assert_eq!(r.status(), 413);
        // Passkeys: a challenge is needed first, and a forged credential fails (and counts).
        let (s, _) = mfa_step(&app, "passkey/register/finish", json!({"ticket": ticket, "credential": {}})).await;
        assert_eq!(s, 400);
        let (s, options) = mfa_step(&app, "passkey/register/begin", json!({"ticket": ticket})).await;
        // The test server's base URL is an IP address: no relying-party id, so no passkeys.
        assert_eq!(s, 400, "{options}");
        assert_eq!(options["error"], "no_passkeys");
        assert!(view_of(&app, &page).await.contains("id=\"enrol-passkey\" hidden"), "the page does not offer passkeys");
        // A form another site posts is refused (login CSRF: an attacker's finished sign-in
        // completed in the victim's tab), as is a step from another origin.
        let r = app.anonymous.post(app.url("smart/mfa/complete"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("sec-fetch-site", "cross-site")
            .body(format!("ticket={ticket}")).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let r = app.anonymous.post(app.url("smart/mfa/totp/verify"))
            .header("origin", "https://attacker.example")
            .json(&json!({"ticket": ticket, "code": "123456"})).send().await.unwrap();
        assert_eq!(r.status(), 403);
        let r = app.anonymous.post(app.url("smart/mfa/step-up"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("sec-fetch-site", "same-site")
            .body("session=x").send().await.unwrap();
        assert_eq!(r.status(), 403);
        // The page may be framed by Courier and the launching EHR only.
        let (_, launch) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(launch.contains("courier.mfa"));
        // The callback's answer only hands the ticket to the tab and moves on: no ticket in a URL,
        // and a reload of /smart/mfa shows the step again.
        assert!(launch.contains("location.replace(\"/smart/mfa\")"));
        let shell = app.anonymous.get(app.url("smart/mfa")).send().await.unwrap();
        assert_eq!(shell.status(), 200);
        assert!(shell.headers()["content-security-policy"].to_str().unwrap().contains("frame-ancestors"));
        assert!(view_of(&app, &launch).await.contains("data-ticket"));
        // The second-factor page is never cached, never framed by strangers, never leaks a Referer.
        let r = app.anonymous.get(app.url("smart/mfa.js")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));
    }
}

both_backends_with! {
    |s| { s.base_url = "http://localhost:0".into(); }
    async fn passkey_steps_refuse_forged_and_replayed_credentials(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        // Courier calls itself localhost here (a relying-party id passkeys accept).
        ehr.control(
            reqwest::Method::POST,
            "seed",
            Some(json!([person("Patient", "a1", &[]), person("Practitioner", "dr-a", &[])])),
        )
        .await;
        let mut n = new_ehr("ehr-a", &ehr.base, "ES384");
        n.launch_scopes = "openid fhirUser launch user/Patient.r user/Practitioner.r";
        registry::add(&app.store, &n).unwrap();
        let local = app.url("").replace("127.0.0.1", "localhost");
        ehr.control(
            reqwest::Method::POST,
            "clients",
            Some(json!({"client_id": "courier", "jwks_url": app.url("smart/jwks"),
                "redirect_uris": [format!("{local}smart/callback")], "scopes": "*"})),
        )
        .await;
        amr(&ehr, json!(["pwd"]), Value::Null).await;
        let (s, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert_eq!(s, 200, "{page}");
        assert!(!view_of(&app, &page).await.contains("id=\"enrol-passkey\" hidden"), "passkeys are offered");
        let ticket = ticket_of(&page);
        let (s, options) = mfa_step(&app, "passkey/register/begin", json!({"ticket": ticket})).await;
        assert_eq!(s, 200, "{options}");
        assert_eq!(options["publicKey"]["rp"]["id"], "localhost");
        assert!(options["publicKey"]["challenge"].as_str().unwrap().len() >= 22);
        // A made-up attestation is refused; the challenge is used up with it.
        let forged = json!({"id": "AAAA", "rawId": "AAAA", "type": "public-key",
            "response": {"attestationObject": "o2NmbXRkbm9uZQ", "clientDataJSON": "e30"}});
        let (s, e) = mfa_step(&app, "passkey/register/finish", json!({"ticket": ticket, "credential": forged})).await;
        assert_eq!(s, 400, "{e}");
        let (s, e) = mfa_step(&app, "passkey/register/finish", json!({"ticket": ticket, "credential": forged})).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("no_challenge")));
        assert_eq!(audited(&app, "passkey-enrolment-refused").await, 1);
        // With no passkey, there is nothing to sign in with.
        let (s, e) = mfa_step(&app, "passkey/begin", json!({"ticket": ticket})).await;
        assert_eq!((s, e["error"].as_str()), (400, Some("no_passkey")));
        assert_eq!(complete(&app, &ticket).await.0, 400);
    }
}

both_backends! {
    async fn administrators_set_policies_and_reset_factors_from_the_command_line(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        // Courier knows dr-a after one launch.
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let user = claims(session_of(&page)["access_token"].as_str().unwrap())["fhirUser"]
            .as_str()
            .unwrap()
            .to_string();
        let cli = |args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_courier"))
                .args(args)
                .env("COURIER_DATA_DIR", app.dir.path())
                .env("COURIER_DATABASE_URL", &app.database_url)
                .env("COURIER_MASTER_KEY", "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=")
                .env("COURIER_LOG", "error")
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
            )
        };
        let (ok, out) = cli(&["mfa", "policy", "--ehr", "ehr-a", "--launch", "always", "--portal", "off", "--acr", "urn:a urn:b"]);
        assert!(ok, "{out}");
        assert!(out.contains("launch=always") && out.contains("portal=off"), "{out}");
        let s = mfa::settings(&app.store, "ehr-a").unwrap();
        assert_eq!((s.launch, s.portal, s.acr.len()), (mfa::Policy::Always, mfa::Policy::Off, 2));
        let (ok, _) = cli(&["mfa", "policy", "--ehr", "ehr-a", "--launch", "sometimes"]);
        assert!(!ok);
        let (ok, out) = cli(&["mfa", "policy", "--ehr", "no-such-ehr", "--launch", "off"]);
        assert!(!ok, "{out}");
        assert_eq!(mfa::settings(&app.store, "ehr-a").unwrap().launch, mfa::Policy::Always);
        // A person with an authenticator app, by Courier identity or by the EHR's reference.
        mfa::factors::add_totp(&app.store, &user, &mfa::factors::new_totp_secret(), 1).unwrap();
        let (ok, out) = cli(&["mfa", "status", "--ehr", "ehr-a", "--user", "Practitioner/dr-a"]);
        assert!(ok && out.contains("totp") && out.contains(&user), "{out}");
        assert!(!out.to_lowercase().contains("secret"), "{out}");
        let (ok, out) = cli(&["mfa", "reset", "--user", &user, "--reason", " "]);
        assert!(!ok, "a reset needs a reason: {out}");
        let (ok, out) = cli(&["mfa", "reset", "--ehr", "ehr-a", "--user", "Practitioner/nobody", "--reason", "x"]);
        assert!(!ok, "{out}");
        let (ok, out) = cli(&["mfa", "reset", "--ehr", "ehr-a", "--user", "Practitioner/dr-a", "--reason", "lost phone, ticket 42"]);
        assert!(ok, "{out}");
        assert!(mfa::factors::list(&app.store, &user).unwrap().is_empty());
        assert_eq!(audited(&app, "reset").await, 1);
    }
}

/// The token the step-up's page hands the app.
fn upgraded_token(page: &str) -> Value {
    let start =
        page.find("Object.assign(s,").expect("the step-up hand-off") + "Object.assign(s,".len();
    let end = page[start..].find(");delete").unwrap() + start;
    serde_json::from_str(&page[start..end]).unwrap()
}

both_backends! {
    async fn under_the_writes_policy_a_session_reads_until_the_person_confirms_it_is_them(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        mfa::set_settings(&app.store, "ehr-a", Some("writes"), None, None).unwrap();
        amr(&ehr, json!(["pwd"]), Value::Null).await;
        // Signed in at once, reading only.
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        assert!(is_hand_off(&page), "{page}");
        let session = session_of(&page);
        assert_eq!(session["step_up"], "writes");
        let token = session["access_token"].as_str().unwrap().to_string();
        let c = claims(&token);
        assert_eq!(c["scope"], "user/Communication.rs user/CommunicationRequest.rs user/Binary.r user/PractitionerRole.rs");
        let (user, patient) = (c["fhirUser"].as_str().unwrap().to_string(), format!("Patient/{}", c["patient"].as_str().unwrap()));
        let message = json!({"resourceType": "Communication", "status": "completed",
            "subject": {"reference": patient}, "sender": {"reference": user},
            "recipient": [{"reference": patient}], "payload": [{"contentString": "Your results are in"}]});
        let reader = client_with_token(&token);
        let r = reader.post(app.url("Communication")).json(&message).send().await.unwrap();
        assert_eq!(r.status(), 403, "a read-only session cannot write");
        let r = reader.get(app.url("Communication")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        // Filing to the chart writes to the patient's record: not before the second factor.
        let r = reader.post(app.url("Communication/any-thread/$file-to-chart")).send().await.unwrap();
        assert_eq!(r.status(), 403);
        // No session, an ended one: refused in words.
        let step_up = |handle: String| {
            let c = app.anonymous.clone();
            let url = app.url("smart/mfa/step-up");
            async move {
                let r = c.post(url).header("content-type", "application/x-www-form-urlencoded").body(format!("session={handle}")).send().await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(step_up("nope".into()).await.0, 400);
        // The step-up: Courier's second factor (enrolment here, the first time).
        let handle = session["session"].as_str().unwrap().to_string();
        let (s, page) = step_up(handle.clone()).await;
        assert_eq!(s, 200, "{page}");
        let ticket = ticket_of(&page);
        let (_, begun) = mfa_step(&app, "totp/enrol/begin", json!({"ticket": ticket})).await;
        let secret = begun["secret"].as_str().unwrap().to_string();
        let (s, _) = mfa_step(&app, "totp/enrol/finish", json!({"ticket": ticket, "code": code_at(&secret, now())})).await;
        assert_eq!(s, 200);
        // A session already holding 30 tokens still valid gets no more from a step-up either
        // (as from a refresh): refused in words, and nothing of the session changes.
        let stuffed: String = (0..30).map(|i| format!(" stuffed-{i}:{}", now() + 600)).collect();
        app.store.execute("UPDATE ehr_sessions SET token_jtis = token_jtis || ?", vec![stuffed.clone().into()]).unwrap();
        let (s, page) = complete(&app, &ticket).await;
        assert_eq!(s, 502, "{page}");
        assert!(page.contains("30 tokens still valid"), "{page}");
        assert_eq!(count(&app, "SELECT COUNT(*) AS n FROM ehr_sessions WHERE amr = 'pwd' AND scope NOT LIKE '%cruds%'", vec![]), 1);
        app.store.execute("UPDATE ehr_sessions SET token_jtis = replace(token_jtis, ?, '')", vec![stuffed.into()]).unwrap();
        // Once the list has room, a new step-up (a later step's code: the first is used up).
        let (s, page) = step_up(handle.clone()).await;
        assert_eq!(s, 200, "{page}");
        let ticket = ticket_of(&page);
        let (s, e) = mfa_step(&app, "totp/verify", json!({"ticket": ticket, "code": code_at(&secret, now() + 30)})).await;
        assert_eq!(s, 200, "{e}");
        let (s, page) = complete(&app, &ticket).await;
        assert_eq!(s, 200, "{page}");
        let upgraded = upgraded_token(&page);
        let writer_token = upgraded["access_token"].as_str().unwrap();
        let c = claims(writer_token);
        assert_eq!(c["scope"], "user/Communication.cruds user/CommunicationRequest.cruds user/Binary.cr user/PractitionerRole.crus");
        assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
        assert_eq!(upgraded["amr"], json!(["pwd", "otp", "mfa"]));
        let r = client_with_token(writer_token).post(app.url("Communication")).json(&message).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        // The session's later tokens may write too, and say how the person signed in.
        let (s, refreshed) = crate::ehr::session_post(&app, "smart/session/refresh", &handle, None).await;
        assert_eq!(s, 200);
        let c = claims(refreshed["access_token"].as_str().unwrap());
        assert_eq!(c["scope"], "user/Communication.cruds user/CommunicationRequest.cruds user/Binary.cr user/PractitionerRole.crus");
        assert_eq!(c["amr"], json!(["pwd", "otp", "mfa"]));
        let (_, again) = step_up(handle.clone()).await;
        assert!(again.contains("already"), "{again}");
        // Ending the session revokes the token the step-up gave.
        let (s, _) = crate::ehr::session_post(&app, "smart/logout", &handle, None).await;
        assert_eq!(s, 200);
        let r = client_with_token(writer_token).get(app.url("Communication")).send().await.unwrap();
        assert_eq!(r.status(), 401);
        // An EHR that shows a second factor: writing from the start.
        amr(&ehr, json!(["pwd", "otp"]), Value::Null).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let session = session_of(&page);
        assert!(session["step_up"].is_null());
        assert_eq!(claims(session["access_token"].as_str().unwrap())["scope"], "user/Communication.cruds user/CommunicationRequest.cruds user/Binary.cr user/PractitionerRole.crus");
    }
}

#[test]
fn read_only_keeps_reads_and_searches() {
    assert_eq!(
        mfa::read_only(
            "patient/Communication.cruds patient/CommunicationRequest.crs patient/Binary.cr"
        ),
        "patient/Communication.rs patient/CommunicationRequest.rs patient/Binary.r"
    );
    assert_eq!(mfa::read_only("user/Binary.c openid"), "");
}

both_backends! {
    async fn guesses_sent_in_parallel_are_counted_before_they_are_checked(app: TestApp) {
        let Some(ehr) = spawn_ehr("ehr-a") else { return };
        fixture(&app, &ehr).await;
        amr(&ehr, json!(["pwd"]), Value::Null).await;
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let ticket = ticket_of(&page);
        let (_, begun) = mfa_step(&app, "totp/enrol/begin", json!({"ticket": ticket})).await;
        let secret = begun["secret"].as_str().unwrap().to_string();
        mfa_step(&app, "totp/enrol/finish", json!({"ticket": ticket, "code": code_at(&secret, now())})).await;
        assert_eq!(complete(&app, &ticket).await.0, 200);
        let (_, page) = launch_page(&app, &ehr, "Practitioner/dr-a").await;
        let ticket = ticket_of(&page);
        // Twenty wrong codes at once: no more than five are ever checked; the rest are refused
        // as locked out, and the lockout holds for the right code after them.
        let wrong = if code_at(&secret, now()) == "000000" { "111111" } else { "000000" };
        let answers = futures_util::future::join_all((0..20).map(|_| mfa_step(&app, "totp/verify", json!({"ticket": ticket, "code": wrong})))).await;
        let checked = answers.iter().filter(|(s, _)| *s == 400).count();
        let locked = answers.iter().filter(|(s, _)| *s == 429).count();
        assert!(checked <= 5, "{checked} guesses were checked: {answers:?}");
        assert_eq!(checked + locked, 20, "{answers:?}");
        let (s, e) = mfa_step(&app, "totp/verify", json!({"ticket": ticket, "code": code_at(&secret, now() + 30)})).await;
        assert_eq!(s, 429, "{e}");
        assert!(audited(&app, "totp-refused").await <= 5);
    }
}
