//! The published conformance test kits, played from the client side against Courier (issue 25):
//! - the Inferno **Subscriptions Test Kit**, R4 server suite (`subscriptions_r5_backport_r4_server`,
//!   Subscriptions R5 Backport IG STU 1.1): one test per kit test, named by its short id, each
//!   doing what the kit sends and checking what the kit asserts — with a Subscription that
//!   carries only IG elements, as a generic subscriber (an EHR's integration engine, Inferno)
//!   writes it: `channel.header` `Authorization: Bearer …` for the endpoint, no Courier extension;
//! - the Inferno **SMART App Launch Test Kit**'s server-side checks for an authorization server:
//!   discovery, Backend Services token requests and their refusals, token introspection.
//!
//! The mapping kit test → test here is the table in docs/conformance.md.

use crate::auth::{assertion, es384, get_token, token_request, token_url};
use crate::both_backends;
use crate::helpers::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use courier::auth::clients;
use courier::messaging::subscriptions::{EXT_SECRET, TOPICS, TOPIC_COMMUNICATION};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const IG: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
/// What Inferno asks the tester for: the token its listener routes notifications by.
const NOTIFICATION_TOKEN: &str = "inferno-notification-token-4f1c";

/// Inferno's notification listener: records every POST (its headers and body), answers 200.
#[derive(Clone)]
struct Listener {
    url: String,
    got: Arc<parking_lot::Mutex<Vec<(Vec<(String, String)>, String)>>>,
}

async fn listener() -> Listener {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let me = Listener {
        url: format!("http://127.0.0.1:{port}/custom/subscriptions_r5_backport_r4_server/subscription/channel/notification_listener"),
        got: Arc::default(),
    };
    let shared = me.clone();
    let server = HttpServer::new(move || {
        let s = shared.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let s = s.clone();
            async move {
                let headers = req
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                s.got
                    .lock()
                    .push((headers, String::from_utf8_lossy(&body).to_string()));
                HttpResponse::Ok().finish()
            }
        }))
    })
    .workers(1)
    .listen(l)
    .unwrap()
    .run();
    tokio::spawn(server);
    me
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn status_of(bundle: &Value) -> &Value {
    &bundle["entry"][0]["resource"]
}

fn param<'a>(status: &'a Value, name: &str) -> Vec<&'a Value> {
    status["parameter"]
        .as_array()
        .map(|ps| ps.iter().filter(|p| p["name"] == name).collect())
        .unwrap_or_default()
}

fn code(status: &Value, name: &str) -> String {
    param(status, name)
        .first()
        .and_then(|p| p["valueCode"].as_str())
        .unwrap_or_default()
        .to_string()
}

impl Listener {
    /// The notifications of one kind for one subscription, as Inferno tags them: by the
    /// `Authorization` header it gave, the status's `type`, and the subscription reference's id.
    fn of(&self, kind: &str, id: &str) -> Vec<(Vec<(String, String)>, Value)> {
        self.got
            .lock()
            .iter()
            .filter(|(h, _)| {
                header(h, "authorization") == Some(&format!("Bearer {NOTIFICATION_TOKEN}"))
            })
            .filter_map(|(h, b)| Some((h.clone(), serde_json::from_str::<Value>(b).ok()?)))
            .filter(|(_, b)| {
                let s = status_of(b);
                code(s, "type") == kind
                    && param(s, "subscription")
                        .first()
                        .and_then(|p| p["valueReference"]["reference"].as_str())
                        .is_some_and(|r| r.ends_with(&format!("/{id}")))
            })
            .collect()
    }

    async fn wait(&self, kind: &str, id: &str, n: usize) -> Vec<(Vec<(String, String)>, Value)> {
        for _ in 0..150 {
            let got = self.of(kind, id);
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no {kind} notification for Subscription/{id} within 15 s: {:?}",
            self.got.lock()
        );
    }
}

/// A Subscription as the kit's samples write it (only IG elements), with Inferno's rewrite:
/// its listener as the endpoint, `application/fhir+json`, `Authorization: Bearer <token>`.
fn kit_subscription(endpoint: &str, content: &str, heartbeat: Option<u64>) -> Value {
    let mut channel_ext = vec![
        json!({"url": format!("{IG}/backport-timeout"), "valueUnsignedInt": 60}),
        json!({"url": format!("{IG}/backport-max-count"), "valuePositiveInt": 20}),
    ];
    if let Some(h) = heartbeat {
        channel_ext
            .push(json!({"url": format!("{IG}/backport-heartbeat-period"), "valueUnsignedInt": h}));
    }
    json!({
        "resourceType": "Subscription",
        "meta": {"profile": [format!("{IG}/backport-subscription")]},
        "status": "requested",
        "reason": "Inferno R4 server suite",
        "criteria": TOPIC_COMMUNICATION,
        "_criteria": {"extension": [{"url": format!("{IG}/backport-filter-criteria"), "valueString": "Communication?recipient=Patient/p-kit"}]},
        "channel": {
            "extension": channel_ext,
            "type": "rest-hook",
            "header": [format!("Authorization: Bearer {NOTIFICATION_TOKEN}")],
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "_payload": {"extension": [{"url": format!("{IG}/backport-payload-content"), "valueCode": content}]},
        }
    })
}

/// The tester's client (Inferno's `smart_auth_info`): may subscribe and read messages.
fn subscriber(app: &TestApp) -> reqwest::Client {
    let scope = "system/Subscription.cruds system/Communication.rs";
    let id = clients::add(
        &app.store,
        "inferno",
        clients::KeySource::Document(es384_key().1.to_string()),
        scope,
    )
    .unwrap();
    client_with_token(&issue(&app.tokens, &id, scope, None, None))
}

async fn create(c: &reqwest::Client, app: &TestApp, body: &Value) -> (u16, Value) {
    crate::messaging::send_json(c.post(app.url("Subscription")), body).await
}

/// 1.1.02 as the kit runs it: create, wait for the handshake, trigger an event ("the tester
/// triggers an event in Courier, then clicks resume"), wait for its notification.
async fn workflow(
    app: &TestApp,
    hook: &Listener,
    content: &str,
    heartbeat: Option<u64>,
) -> (String, Value, reqwest::Client) {
    let c = subscriber(app);
    let (s, created) = create(&c, app, &kit_subscription(&hook.url, content, heartbeat)).await;
    assert_eq!(s, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    hook.wait("handshake", &id, 1).await;
    // Active once the handshake is answered: the event after it is notified.
    for _ in 0..50 {
        let r: Value = c
            .get(app.url(&format!("Subscription/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if r["status"] == "active" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.create(&message(
        "Patient/p-kit",
        "2026-12-06T10:00:00Z",
        "Your lab results are ready",
    ))
    .await;
    hook.wait("event-notification", &id, 1).await;
    (id, created, c)
}

/// The history-Bundle checks every kit notification test makes (1.2.02, 4.01, 4.02).
fn assert_notification_bundle(b: &Value, id: &str, kind: &str) {
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "history", "{b}");
    let entries = b["entry"].as_array().expect("entries");
    assert!(!entries.is_empty());
    for e in entries {
        assert!(
            e.get("request").is_some() && e.get("response").is_some(),
            "every entry has request and response: {e}"
        );
    }
    assert!(
        entries[0]["request"]["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("Subscription/{id}/$status")),
        "{b}"
    );
    let status = status_of(b);
    assert_eq!(status["resourceType"], "Parameters");
    assert_eq!(
        status["meta"]["profile"][0],
        format!("{IG}/backport-subscription-status-r4")
    );
    assert_eq!(code(status, "type"), kind);
    // The profile's required parameters (what the kit's validator checks).
    for p in ["subscription", "status", "type"] {
        assert_eq!(param(status, p).len(), 1, "{p}: {status}");
    }
}

both_backends! {
    // 1.1.02 subscriptions_r4_server_notification_delivery (@133).
    async fn kit_subscriptions_1_1_02_notification_delivery(app: TestApp) {
        let hook = listener().await;
        let (id, _, _) = workflow(&app, &hook, "id-only", None).await;
        // Every POST carries the subscription's channel.header (how Inferno routes it) and the
        // channel.payload type, and no signature: the subscriber asked for none.
        let all = hook.got.lock().clone();
        assert!(all.len() >= 2);
        for (h, _) in &all {
            assert_eq!(header(h, "authorization"), Some(format!("Bearer {NOTIFICATION_TOKEN}").as_str()));
            assert_eq!(header(h, "content-type"), Some("application/fhir+json"));
            assert!(header(h, "x-courier-signature").is_none());
        }
        assert_eq!(hook.of("event-notification", &id).len(), 1);
    }

    // 1.1.03 subscriptions_r4_server_creation_response_conformance (@7, @25, @29, @49).
    async fn kit_subscriptions_1_1_03_creation_response_conformance(app: TestApp) {
        let hook = listener().await;
        let c = subscriber(&app);
        let (s, created) = create(&c, &app, &kit_subscription(&hook.url, "id-only", None)).await;
        assert_eq!(s, 201, "{created}");
        assert_eq!(created["resourceType"], "Subscription");
        assert!(created["id"].as_str().is_some_and(|i| !i.is_empty()));
        assert_eq!(created["channel"]["type"], "rest-hook");
        assert_eq!(created["status"], "requested");
        // channel.header values are the endpoint's credentials: never shown, in the answer to the
        // create or in any read or search.
        assert!(!created.to_string().contains(NOTIFICATION_TOKEN), "{created}");
        assert_eq!(created["channel"]["header"][0], "Authorization: ***");
        let id = created["id"].as_str().unwrap();
        hook.wait("handshake", id, 1).await;
        let read = c.get(app.url(&format!("Subscription/{id}"))).send().await.unwrap().text().await.unwrap();
        let list = c.get(app.url("Subscription")).send().await.unwrap().text().await.unwrap();
        assert!(!read.contains(NOTIFICATION_TOKEN) && !list.contains(NOTIFICATION_TOKEN));
        assert!(read.contains("Authorization: ***"));
    }

    // 1.2.01 subscriptions_r4_server_notification_presence.
    async fn kit_subscriptions_1_2_01_notification_presence(app: TestApp) {
        let hook = listener().await;
        let (id, _, _) = workflow(&app, &hook, "id-only", None).await;
        assert!(!hook.of("handshake", &id).is_empty() && !hook.of("event-notification", &id).is_empty());
    }

    // 1.2.02 subscriptions_r4_server_notification_conformance (@14, @15, @28, @69, @70, @138, @139).
    async fn kit_subscriptions_1_2_02_notification_conformance(app: TestApp) {
        let hook = listener().await;
        let (id, _, _) = workflow(&app, &hook, "id-only", None).await;
        for (_, b) in hook.of("event-notification", &id) {
            assert_notification_bundle(&b, &id, "event-notification");
            let status = status_of(&b);
            assert_eq!(code(status, "status"), "active");
            assert_eq!(param(status, "topic")[0]["valueCanonical"], TOPIC_COMMUNICATION);
            assert_eq!(param(status, "events-since-subscription-start")[0]["valueString"], "1");
            let event = &param(status, "notification-event")[0]["part"];
            assert_eq!(event[0]["name"], "event-number");
            assert_eq!(event[0]["valueString"], "1");
        }
    }

    // 2.01 subscriptions_r4_server_cs_conformance (@52, @114, @120) and
    // 2.02 subscriptions_r4_server_topic_discovery (@2, @48).
    async fn kit_subscriptions_2_01_and_2_02_capability_statement_and_topic_discovery(app: TestApp) {
        let cs = app.get_json("metadata").await;
        assert_eq!(cs["resourceType"], "CapabilityStatement");
        let rest = cs["rest"].as_array().unwrap().iter().find(|r| r["mode"] == "server").expect("a server rest");
        let sub = rest["resource"].as_array().unwrap().iter().find(|r| r["type"] == "Subscription").expect("Subscription");
        assert!(sub["supportedProfile"].as_array().unwrap().iter().any(|p| p == &json!(format!("{IG}/backport-subscription"))));
        let topics: Vec<&str> = sub["extension"].as_array().unwrap().iter()
            .filter(|e| e["url"] == format!("{IG}/capabilitystatement-subscriptiontopic-canonical"))
            .filter_map(|e| e["valueCanonical"].as_str())
            .collect();
        // Every criteria a Subscription may be created with is discoverable.
        for (t, _) in TOPICS {
            assert!(topics.contains(t), "{t}");
        }
        let hook = listener().await;
        let (s, created) = create(&subscriber(&app), &app, &kit_subscription(&hook.url, "empty", None)).await;
        assert_eq!(s, 201);
        assert!(topics.contains(&created["criteria"].as_str().unwrap()));
    }

    // 3.1.2.03 subscriptions_r4_server_empty_conformance (and 3.1.1.01–3.1.2.02 for empty).
    async fn kit_subscriptions_3_1_empty_content(app: TestApp) {
        let hook = listener().await;
        let (id, created, _) = workflow(&app, &hook, "empty", None).await;
        assert_eq!(created["status"], "requested");
        for (_, b) in hook.of("event-notification", &id) {
            assert_notification_bundle(&b, &id, "event-notification");
            assert_eq!(b["entry"].as_array().unwrap().len(), 1, "empty: the status only");
            let events = param(status_of(&b), "notification-event");
            assert!(!events.is_empty());
            for e in events {
                assert!(!e["part"].as_array().unwrap().iter().any(|p| p["name"] == "focus" || p["name"] == "additional-context"));
            }
            assert!(!b.to_string().contains("lab results"));
        }
    }

    // 3.2.2.03 subscriptions_r4_server_id_only_conformance (and 3.2.1.01–3.2.2.02 for id-only).
    async fn kit_subscriptions_3_2_id_only_content(app: TestApp) {
        let hook = listener().await;
        let (id, _, _) = workflow(&app, &hook, "id-only", None).await;
        for (_, b) in hook.of("event-notification", &id) {
            assert_notification_bundle(&b, &id, "event-notification");
            let events = param(status_of(&b), "notification-event");
            assert!(!events.is_empty());
            for e in &events {
                assert!(e["part"].as_array().unwrap().iter().any(|p| p["name"] == "focus"), "{e}");
            }
            for entry in b["entry"].as_array().unwrap().iter().skip(1) {
                assert!(entry.get("resource").is_none(), "id-only: no resource");
                assert!(entry["fullUrl"].as_str().is_some_and(|u| !u.is_empty()));
            }
        }
    }

    // 3.3.2.03 subscriptions_r4_server_full_resource_conformance (and 3.3.1.01–3.3.2.02).
    async fn kit_subscriptions_3_3_full_resource_content(app: TestApp) {
        let hook = listener().await;
        let (id, _, _) = workflow(&app, &hook, "full-resource", None).await;
        for (_, b) in hook.of("event-notification", &id) {
            assert_notification_bundle(&b, &id, "event-notification");
            let status = status_of(&b);
            assert_eq!(param(status, "topic").len(), 1, "full-resource SHOULD carry the topic");
            let entries = b["entry"].as_array().unwrap();
            for e in param(status, "notification-event") {
                let focus = e["part"].as_array().unwrap().iter().find(|p| p["name"] == "focus").expect("focus");
                let reference = focus["valueReference"]["reference"].as_str().unwrap();
                // Resolves to an entry, as the kit resolves it.
                assert!(entries.iter().skip(1).any(|x| {
                    let r = &x["resource"];
                    r.is_object() && reference.contains(&format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap()))
                }), "{b}");
            }
            assert_eq!(entries[1]["resource"]["payload"][0]["contentString"], "Your lab results are ready");
        }
    }

    // 4.01 subscriptions_r4_server_handshake_conformance (@14, @15, @24, @25, @28, …).
    async fn kit_subscriptions_4_01_handshake_conformance(app: TestApp) {
        let hook = listener().await;
        let c = subscriber(&app);
        let (_, created) = create(&c, &app, &kit_subscription(&hook.url, "id-only", None)).await;
        let id = created["id"].as_str().unwrap().to_string();
        let hs = hook.wait("handshake", &id, 1).await;
        assert_eq!(hs.len(), 1, "one handshake");
        let (h, b) = &hs[0];
        assert_notification_bundle(b, &id, "handshake");
        assert_eq!(code(status_of(b), "status"), "requested", "the handshake comes before active");
        assert_eq!(header(h, "authorization"), Some(format!("Bearer {NOTIFICATION_TOKEN}").as_str()));
    }

    // 4.02 subscriptions_r4_server_heartbeat_conformance (@93, @94, …): heartbeats when a period
    // is given, never without one.
    async fn kit_subscriptions_4_02_heartbeat_conformance(app: TestApp) {
        let hook = listener().await;
        let c = subscriber(&app);
        let (_, with) = create(&c, &app, &kit_subscription(&hook.url, "empty", Some(1))).await;
        let (_, without) = create(&c, &app, &kit_subscription(&hook.url, "empty", None)).await;
        let (with, without) = (with["id"].as_str().unwrap().to_string(), without["id"].as_str().unwrap().to_string());
        hook.wait("handshake", &without, 1).await;
        let beats = hook.wait("heartbeat", &with, 1).await;
        assert_notification_bundle(&beats[0].1, &with, "heartbeat");
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(hook.of("heartbeat", &with).len() >= 2, "a heartbeat each period");
        assert!(hook.of("heartbeat", &without).is_empty(), "no heartbeat without a period");
    }

    // 5.01 subscriptions_r4_server_status_invocation (@20, @30, @47).
    async fn kit_subscriptions_5_01_status_invocation(app: TestApp) {
        let hook = listener().await;
        let (id, _, c) = workflow(&app, &hook, "id-only", None).await;
        let r = c.get(app.url(&format!("Subscription/{id}/$status"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["resourceType"], "Bundle");
        assert_eq!(b["type"], "searchset");
        let status = b["entry"].as_array().unwrap().iter().map(|e| &e["resource"])
            .find(|r| r["resourceType"] == "Parameters" && param(r, "subscription").first().and_then(|p| p["valueReference"]["reference"].as_str()).is_some_and(|x| x.ends_with(&format!("/{id}"))))
            .expect("the subscription's status");
        assert_eq!(code(status, "status"), "active");
        assert_eq!(code(status, "type"), "query-status");
        assert_eq!(status["meta"]["profile"][0], format!("{IG}/backport-subscription-status-r4"));
    }

    // 6.01–6.07 subscriptions_r4_server_reject_subscription_*: each unsupported value is refused
    // (a 201 would have to change it), with a clear OperationOutcome, and nothing is created.
    async fn kit_subscriptions_6_01_to_6_07_rejections(app: TestApp) {
        let hook = listener().await;
        let c = subscriber(&app);
        let base = kit_subscription(&hook.url, "id-only", None);
        let with = |f: &dyn Fn(&mut Value)| { let mut s = base.clone(); f(&mut s); s };
        let cases: Vec<(&str, Value, &str)> = vec![
            ("6.01 cross-version extension", with(&|s| s["_criteria"] = json!({"extension": [{"url": "http://hl7.org/fhir/5.0/subscriptions-backport/StructureDefinition/backport-filter-criteria", "valueString": "Encounter?patient=Patient/123"}]})), "Subscription.criteria.extension"),
            ("6.02 topic", with(&|s| s["criteria"] = json!("http://inferno.healthit.gov/suites/custom/subscriptions_r5_backport_r4_client/topics/patient-admission")), "Subscription.criteria"),
            ("6.03 filter", with(&|s| s["_criteria"] = json!({"extension": [{"url": format!("{IG}/backport-filter-criteria"), "valueString": "Encounter.patient=Patient/123"}]})), "Subscription.criteria.extension"),
            ("6.04 channel type", with(&|s| s["channel"]["type"] = json!("email")), "Subscription.channel.type"),
            ("6.05 endpoint", with(&|s| s["channel"]["endpoint"] = json!("http://example.org/not-https")), "Subscription.channel.endpoint"),
            ("6.06 payload type", with(&|s| s["channel"]["payload"] = json!("application/fhir+xml")), "Subscription.channel.payload"),
            ("6.07 channel and payload", with(&|s| { s["channel"]["type"] = json!("message"); s["channel"]["payload"] = json!("text/plain"); }), "Subscription.channel.type"),
        ];
        for (what, body, expression) in cases {
            let (s, o) = create(&c, &app, &body).await;
            assert_eq!(s, 400, "{what}: {o}");
            assert_eq!(o["resourceType"], "OperationOutcome", "{what}");
            assert_eq!(o["issue"][0]["expression"][0], expression, "{what}: {o}");
        }
        let list: Value = c.get(app.url("Subscription")).send().await.unwrap().json().await.unwrap();
        assert_eq!(list["total"], 0, "nothing was created");
    }

    // Beyond the kit (the IG, issue 25): the HMAC signature is an extra a subscriber may ask
    // for; reserved headers are refused; backport-max-count bounds each Bundle.
    async fn ig_signing_is_optional_and_max_count_bounds_each_notification(app: TestApp) {
        let hook = listener().await;
        let c = subscriber(&app);
        let secret = "a-secret-the-subscriber-chose-of-32+chars";
        let mut signed = kit_subscription(&hook.url, "id-only", None);
        signed["channel"]["extension"].as_array_mut().unwrap().push(json!({"url": EXT_SECRET, "valueString": secret}));
        let (s, created) = create(&c, &app, &signed).await;
        assert_eq!(s, 201, "{created}");
        assert!(!created.to_string().contains(secret));
        let id = created["id"].as_str().unwrap().to_string();
        let hs = hook.wait("handshake", &id, 1).await;
        assert!(header(&hs[0].0, "x-courier-signature").is_some_and(|v| v.starts_with("t=")), "signed on request");
        let mut short = kit_subscription(&hook.url, "id-only", None);
        short["channel"]["extension"].as_array_mut().unwrap().push(json!({"url": EXT_SECRET, "valueString": "too-short"}));
        assert_eq!(create(&c, &app, &short).await.0, 400);
        for bad in ["Content-Type: text/plain", "X-Courier-Signature: t=1,v1=00", "Host: evil.example", "no colon", "Bad Name: x"] {
            let mut s = kit_subscription(&hook.url, "id-only", None);
            s["channel"]["header"] = json!([bad]);
            let (st, o) = create(&c, &app, &s).await;
            assert_eq!(st, 400, "{bad}: {o}");
            assert_eq!(o["issue"][0]["expression"][0], "Subscription.channel.header");
        }
        // max-count 1: two events while the endpoint is slow to be told come in two Bundles.
        let mut one = kit_subscription(&hook.url, "id-only", None);
        one["channel"]["extension"][1]["valuePositiveInt"] = json!(1);
        let (_, created) = create(&c, &app, &one).await;
        let id = created["id"].as_str().unwrap().to_string();
        hook.wait("handshake", &id, 1).await;
        for _ in 0..50 {
            let r: Value = c.get(app.url(&format!("Subscription/{id}"))).send().await.unwrap().json().await.unwrap();
            if r["status"] == "active" { break; }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        app.create(&message("Patient/p-kit", "2026-12-06T10:00:00Z", "one")).await;
        app.create(&message("Patient/p-kit", "2026-12-06T10:01:00Z", "two")).await;
        let got = hook.wait("event-notification", &id, 2).await;
        for (_, b) in &got {
            assert_eq!(param(status_of(b), "notification-event").len(), 1, "at most max-count events per Bundle");
        }
    }
}

// ---- SMART App Launch Test Kit: the authorization server's side ----

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

both_backends! {
    // smart_discovery_stu2_2: well_known_endpoint_stu2_2, well_known_capabilities_stu2,
    // smart_cors_support_stu2_2, smart_cors_enabled_metadata_request.
    async fn kit_smart_discovery(app: TestApp) {
        let r = app.anonymous.get(app.url(".well-known/smart-configuration"))
            .header("accept", "application/json").header("origin", "https://inferno.example").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
        let cors = r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
        assert!(matches!(cors.as_deref(), Some("*") | Some("https://inferno.example")), "{cors:?}");
        let c: Value = r.json().await.unwrap();
        assert!(c["token_endpoint"].as_str().is_some_and(|u| !u.is_empty()));
        assert!(c["capabilities"].as_array().unwrap().iter().all(|x| x.is_string()));
        assert!(c["grant_types_supported"].as_array().unwrap().iter().any(|g| g == "client_credentials"));
        let pkce = c["code_challenge_methods_supported"].as_array().unwrap();
        assert!(pkce.iter().any(|m| m == "S256") && !pkce.iter().any(|m| m == "plain"));
        assert!(c["introspection_endpoint"].as_str().is_some());
        let r = app.anonymous.get(app.url("metadata")).header("origin", "https://inferno.example").send().await.unwrap();
        assert_eq!(r.status(), 200);
        let cors = r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_string());
        assert!(matches!(cors.as_deref(), Some("*") | Some("https://inferno.example")), "{cors:?}");
    }

    // backend_services_authorization: invalid_grant_type, invalid_client_assertion,
    // invalid_jwt, auth_request_success, auth_response_body — with the assertion the kit signs
    // (iss, sub, aud, exp, jti only; no iat) and no client_id form parameter.
    async fn kit_smart_backend_services(app: TestApp) {
        let (signer, jwks) = es384();
        let scope = "system/Communication.rs";
        let id = clients::add(&app.store, "inferno", clients::KeySource::Document(jwks.to_string()), scope).unwrap();
        let good = || assertion(&signer, &id, &token_url(&app), json!({}));
        let a = good();
        let (s, _, _) = token_request(&app, &[("scope", scope), ("grant_type", "not_a_grant_type"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &a)]).await;
        assert_eq!(s, 400, "invalid_grant_type");
        let a = good();
        let (s, _, _) = token_request(&app, &[("scope", scope), ("grant_type", "client_credentials"), ("client_assertion_type", "not_an_assertion_type"), ("client_assertion", &a)]).await;
        assert!(s == 400 || s == 401, "invalid_client_assertion: {s}");
        let a = assertion(&signer, &id, &token_url(&app), json!({"iss": "not_a_valid_iss"}));
        let (s, _, _) = token_request(&app, &[("scope", scope), ("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &a)]).await;
        assert!(s == 400 || s == 401, "invalid_jwt: {s}");
        let a = good();
        let (s, body, headers) = token_request(&app, &[("scope", scope), ("grant_type", "client_credentials"), ("client_assertion_type", ASSERTION_TYPE), ("client_assertion", &a)]).await;
        assert!(s == 200 || s == 201, "auth_request_success: {s} {body}");
        for f in ["access_token", "token_type", "expires_in", "scope"] {
            assert!(!body[f].is_null() && body[f] != "", "{f}: {body}");
        }
        assert!(body["token_type"].as_str().unwrap().eq_ignore_ascii_case("bearer"));
        assert_eq!(headers["cache-control"], "no-store");
    }

    // smart_token_introspection_stu2_2: an active token's response (active, client_id, scope,
    // exp), and an invalid token asked without any credentials: 200 {"active": false}.
    async fn kit_smart_token_introspection(app: TestApp) {
        let (signer, jwks) = es384();
        let scope = "system/Communication.rs system/Subscription.rs";
        let id = clients::add(&app.store, "inferno", clients::KeySource::Document(jwks.to_string()), scope).unwrap();
        let (s, t) = get_token(&app, &signer, &id, scope).await;
        assert_eq!(s, 200);
        let token = t["access_token"].as_str().unwrap();
        let r = app.anonymous.post(app.url("auth/introspect")).bearer_auth(token)
            .header("accept", "application/json").header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["active"], true);
        assert_eq!(v["client_id"].as_str().unwrap().trim(), id);
        let mut got: Vec<&str> = v["scope"].as_str().unwrap().split_whitespace().collect();
        let mut want: Vec<&str> = t["scope"].as_str().unwrap().split_whitespace().collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert!(v["exp"].as_i64().unwrap() >= chrono::Utc::now().timestamp() - 600);
        let r = app.anonymous.post(app.url("auth/introspect"))
            .header("accept", "application/json").header("content-type", "application/x-www-form-urlencoded")
            .body("token=invalid_token_value").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"active": false}));
        // Without credentials even a live token is reported inactive: nothing is learnt.
        let r = app.anonymous.post(app.url("auth/introspect")).header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}")).send().await.unwrap();
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"active": false}));
    }
}

both_backends! {
    // The IG's status transitions: requested → active after a handshake the endpoint accepted,
    // requested → error when it cannot be reached (a few tries, about 3 s); the reason is in
    // Subscription.error (R4: a string) and in $status.
    async fn ig_a_subscription_whose_handshake_fails_goes_to_error(app: TestApp) {
        let c = subscriber(&app);
        // Nothing listens on port 9 of loopback.
        let (s, created) = create(&c, &app, &kit_subscription("http://127.0.0.1:9/hook", "id-only", None)).await;
        assert_eq!(s, 201, "{created}");
        assert_eq!(created["status"], "requested");
        let id = created["id"].as_str().unwrap().to_string();
        let mut read = Value::Null;
        for _ in 0..100 {
            read = c.get(app.url(&format!("Subscription/{id}"))).send().await.unwrap().json().await.unwrap();
            if read["status"] == "error" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(read["status"], "error", "{read}");
        assert!(read["error"].as_str().is_some_and(|e| e.contains("could not be reached")), "{read}");
        let st: Value = c.get(app.url(&format!("Subscription/{id}/$status"))).send().await.unwrap().json().await.unwrap();
        assert_eq!(code(&st["entry"][0]["resource"], "status"), "error");
    }
}
