//! Topic-based Subscriptions (R5 Backport IG for R4): rest-hook delivery that the receiver can
//! verify, retries, websocket binding, heartbeats, `$status` and `$events`, confinement to the
//! owner's grant, and one dispatcher across two instances.

use crate::both_backends;
use crate::helpers::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use courier::auth::clients;
use courier::messaging::subscriptions::{EXT_SECRET, TOPIC_COMMUNICATION};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "a-shared-secret-of-at-least-32-characters";
const IG: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";

/// A notification receiver: records every POST (signature header, body), answers 500 to the next
/// `fail` requests.
#[derive(Clone)]
struct Receiver {
    url: String,
    got: Arc<parking_lot::Mutex<Vec<(String, String)>>>,
    attempts: Arc<AtomicUsize>,
    fail: Arc<AtomicUsize>,
}

async fn receiver() -> Receiver {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let r = Receiver {
        url: format!("http://127.0.0.1:{port}/hook"),
        got: Arc::default(),
        attempts: Arc::default(),
        fail: Arc::default(),
    };
    let shared = r.clone();
    let server = HttpServer::new(move || {
        let s = shared.clone();
        App::new().default_service(web::to(move |req: HttpRequest, body: web::Bytes| {
            let s = s.clone();
            async move {
                s.attempts.fetch_add(1, Ordering::SeqCst);
                if s.fail.load(Ordering::SeqCst) > 0 {
                    s.fail.fetch_sub(1, Ordering::SeqCst);
                    return HttpResponse::InternalServerError().finish();
                }
                let sig = req
                    .headers()
                    .get("x-courier-signature")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                s.got
                    .lock()
                    .push((sig, String::from_utf8(body.to_vec()).unwrap()));
                HttpResponse::Ok().finish()
            }
        }))
    })
    .workers(1)
    .listen(listener)
    .unwrap()
    .run();
    tokio::spawn(server);
    r
}

impl Receiver {
    /// Waits for the `n`th notification (1-based) of kind `kind`, checking every signature.
    async fn wait_for(&self, kind: &str, n: usize) -> Value {
        for _ in 0..100 {
            let found: Vec<Value> = self
                .got
                .lock()
                .iter()
                .map(|(sig, body)| {
                    assert!(verify(sig, body), "signature {sig} does not verify");
                    serde_json::from_str::<Value>(body).unwrap()
                })
                .filter(|b| status_param(b, "type")["valueCode"] == kind)
                .collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no {kind} notification #{n} within 10 s; got {:?}",
            self.got.lock()
        );
    }
}

/// What a receiver does: recompute HMAC-SHA256(secret, "<t>.<body>") and compare.
fn verify(header: &str, body: &str) -> bool {
    use hmac::{Hmac, Mac};
    let Some((t, v1)) = header
        .split_once(',')
        .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
    else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex == v1
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut WsStream) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str::<Value>(&t).unwrap(),
            _ => continue,
        }
    }
}

fn status_param<'a>(bundle: &'a Value, name: &str) -> &'a Value {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn event_numbers(bundle: &Value) -> Vec<i64> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "notification-event")
        .map(|p| {
            p["part"][0]["valueString"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect()
}

fn subscription(channel: Value, content: &str, filters: &[&str]) -> Value {
    let mut channel = channel;
    channel["payload"] = json!("application/fhir+json");
    channel["_payload"] = json!({"extension": [{"url": format!("{IG}/backport-payload-content"), "valueCode": content}]});
    let mut s = json!({
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "test",
        "criteria": TOPIC_COMMUNICATION,
        "channel": channel,
    });
    if !filters.is_empty() {
        s["_criteria"] = json!({"extension": filters.iter().map(|f| json!({"url": format!("{IG}/backport-filter-criteria"), "valueString": f})).collect::<Vec<_>>()});
    }
    s
}

fn rest_hook(url: &str) -> Value {
    json!({"type": "rest-hook", "endpoint": url, "extension": [{"url": EXT_SECRET, "valueString": SECRET}]})
}

fn integrator(app: &TestApp, scope: &str, patient: Option<&str>) -> reqwest::Client {
    let id = clients::add(
        &app.store,
        "subscriber",
        clients::KeySource::Document(es384_key().1.to_string()),
        scope,
    )
    .unwrap();
    client_with_token(&issue(&app.tokens, &id, scope, None, patient))
}

async fn post(c: &reqwest::Client, app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    crate::messaging::send_json(c.post(app.url(path)), body).await
}

async fn get(c: &reqwest::Client, app: &TestApp, path: &str) -> (u16, Value) {
    let r = c.get(app.url(path)).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn to(patient: &str, text: &str) -> Value {
    message(&format!("Patient/{patient}"), "2026-11-28T10:00:00Z", text)
}

both_backends! {
    async fn rest_hook_notifications_are_signed_retried_and_confined_to_the_grant(app: TestApp) {
        let hook = receiver().await;
        // An integrator confined to patient p1's compartment.
        let sub_client = integrator(&app, "patient/Communication.rs patient/Subscription.cruds", Some("p1"));
        let (s, created) = post(&sub_client, &app, "Subscription", &subscription(rest_hook(&hook.url), "full-resource", &[])).await;
        assert_eq!(s, 201, "{created}");
        let id = created["id"].as_str().unwrap().to_string();
        assert_eq!(created["status"], "requested");
        assert!(!created.to_string().contains(SECRET), "the secret is never shown");
        // Handshake first, then the subscription is active.
        let hs = hook.wait_for("handshake", 1).await;
        assert_eq!(hs["type"], "history");
        assert_eq!(status_param(&hs, "subscription")["valueReference"]["reference"], app.url(&format!("Subscription/{id}")));
        // Active once the handshake's answer is in (a moment after the receiver has it).
        let mut read = Value::Null;
        for _ in 0..50 {
            read = get(&sub_client, &app, &format!("Subscription/{id}")).await.1;
            if read["status"] == "active" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(read["status"], "active");
        assert!(!read.to_string().contains(SECRET));

        // p2's message is outside the owner's grant: never numbered, never sent.
        let first = app.create(&to("p1", "for p1")).await;
        app.create(&to("p2", "for p2 only")).await;
        let second = app.create(&to("p1", "again for p1")).await;
        let n1 = hook.wait_for("event-notification", 1).await;
        let mut seen: Vec<(i64, String)> = vec![];
        let mut k = 1;
        while seen.len() < 2 {
            let b = hook.wait_for("event-notification", k).await;
            for (num, e) in event_numbers(&b).into_iter().zip(b["entry"].as_array().unwrap().iter().skip(1)) {
                seen.push((num, e["resource"]["id"].as_str().unwrap().to_string()));
                assert_eq!(e["request"]["method"], "POST");
            }
            k += 1;
        }
        assert_eq!(seen, vec![(1, first.clone()), (2, second.clone())]);
        assert_eq!(n1["entry"][1]["resource"]["payload"][0]["contentString"], "for p1", "full-resource content");
        assert!(!hook.got.lock().iter().any(|(_, b)| b.contains("for p2 only")), "nothing outside the grant");
        // Each delivery's AuditEvent names the patient whose message it carried (their
        // accounting of disclosures finds it), and no other.
        let mut delivered = 0;
        for _ in 0..50 {
            let b = app.get_json(&format!("AuditEvent?patient=Patient/p1&entity=Subscription/{id}")).await;
            delivered = b["entry"].as_array().map_or(0, |a| a.len());
            if delivered >= 1 { break; }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(delivered >= 1, "the deliveries are in p1's audit trail: {delivered}");
        assert_eq!(app.get_json(&format!("AuditEvent?patient=Patient/p2&entity=Subscription/{id}&_summary=count")).await["total"], 0);

        // The receiver fails twice: Courier retries with backoff, and the numbering carries on.
        hook.fail.store(2, Ordering::SeqCst);
        let before = hook.attempts.load(Ordering::SeqCst);
        let third = app.create(&to("p1", "third")).await;
        let b = hook.wait_for("event-notification", k).await;
        assert_eq!(event_numbers(&b), vec![3]);
        assert_eq!(b["entry"][1]["resource"]["id"], third.as_str());
        assert!(hook.attempts.load(Ordering::SeqCst) - before >= 3, "two failures, then success");

        // $status and $events (catch-up), with a lower content level on request.
        let (s, st) = get(&sub_client, &app, &format!("Subscription/{id}/$status")).await;
        assert_eq!(s, 200);
        assert_eq!(st["type"], "searchset");
        let p = &st["entry"][0]["resource"];
        assert_eq!(p["parameter"].as_array().unwrap().iter().find(|x| x["name"] == "events-since-subscription-start").unwrap()["valueString"], "3");
        let (_, ev) = get(&sub_client, &app, &format!("Subscription/{id}/$events?eventsSinceNumber=2&content=id-only")).await;
        assert_eq!(event_numbers(&ev), vec![2, 3]);
        assert_eq!(status_param(&ev, "type")["valueCode"], "query-event");
        assert!(ev["entry"][1].get("resource").is_none(), "id-only: no resource");
        assert_eq!(ev["entry"][1]["fullUrl"], app.url(&format!("Communication/{second}")));
        let (_, ev) = get(&sub_client, &app, &format!("Subscription/{id}/$events?content=empty")).await;
        assert_eq!(ev["entry"].as_array().unwrap().len(), 1, "empty: the status only");
        assert!(!ev.to_string().contains(&first));

        // Every delivery is audited (which subscription, which events), without the content.
        let audits = app.get_json(&format!("AuditEvent?entity=Subscription/{id}&_count=200")).await;
        let deliveries = audits["entry"].as_array().unwrap().iter()
            .filter(|e| e["resource"]["outcomeDesc"].as_str().is_some_and(|d| d.starts_with("notified events")))
            .count();
        assert!(deliveries >= 2, "{audits}");
        assert!(!audits.to_string().contains("for p1"), "no message text in the audit trail");
        // Another client sees nothing of it.
        let other = integrator(&app, "system/Subscription.cruds system/Communication.rs", None);
        assert_eq!(get(&other, &app, &format!("Subscription/{id}")).await.0, 404);
        assert_eq!(get(&other, &app, &format!("Subscription/{id}/$events")).await.0, 404);
        let (_, list) = get(&other, &app, "Subscription").await;
        assert_eq!(list["total"], 0);
        // Deleting stops it.
        let r = sub_client.delete(app.url(&format!("Subscription/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(get(&sub_client, &app, &format!("Subscription/{id}")).await.0, 404);
    }

    async fn bad_subscriptions_are_refused_and_change_nothing(app: TestApp) {
        let c = integrator(&app, "system/Communication.rs system/Subscription.cruds", None);
        let hook = "http://127.0.0.1:9/hook";
        let mut unknown_topic = subscription(rest_hook(hook), "id-only", &[]);
        unknown_topic["criteria"] = json!("Communication?status=completed");
        // A signing secret is optional (the IG's subscribers authenticate Courier by
        // channel.header), but one that is given must be long enough.
        let mut short_secret = subscription(rest_hook(hook), "id-only", &[]);
        short_secret["channel"]["extension"] = json!([{"url": EXT_SECRET, "valueString": "short"}]);
        let mut ended = subscription(rest_hook(hook), "id-only", &[]);
        ended["end"] = json!("2020-01-01T00:00:00Z");
        let cases = [
            (ended, 400, "Subscription.end"),
            (unknown_topic, 400, "Subscription.criteria"),
            (short_secret, 400, "Subscription.channel.extension"),
            (subscription(rest_hook("http://example.org/hook"), "id-only", &[]), 400, "Subscription.channel.endpoint"),
            (subscription(rest_hook(hook), "everything", &[]), 400, "Subscription.channel.payload.extension"),
            (subscription(rest_hook(hook), "id-only", &["Communication?sent=2026"]), 400, "Subscription.criteria.extension"),
            (subscription(rest_hook(hook), "id-only", &["CommunicationRequest?status=active"]), 400, "Subscription.criteria.extension"),
            (subscription(json!({"type": "email", "endpoint": "mailto:a@b.c"}), "id-only", &[]), 400, "Subscription.channel.type"),
        ];
        for (body, status, expression) in cases {
            let (s, o) = post(&c, &app, "Subscription", &body).await;
            assert_eq!(s, status, "{o}");
            assert_eq!(o["issue"][0]["expression"][0], expression, "{o}");
        }
        // Without Subscription scopes, or without read on the topic's type: 403.
        let no_sub = integrator(&app, "system/Communication.rs", None);
        assert_eq!(post(&no_sub, &app, "Subscription", &subscription(rest_hook(hook), "id-only", &[])).await.0, 403);
        let no_read = integrator(&app, "system/Subscription.cruds", None);
        assert_eq!(post(&no_read, &app, "Subscription", &subscription(rest_hook(hook), "id-only", &[])).await.0, 403);
        let (_, list) = get(&c, &app, "Subscription").await;
        assert_eq!(list["total"], 0, "nothing was created");
    }

    // FHIR R4 Subscription.end: the time to turn it off. Before, a subscription past its end was
    // listed as active and delivered for ever.
    async fn a_subscription_is_turned_off_at_its_end(app: TestApp) {
        let c = integrator(&app, "system/Communication.rs system/Subscription.cruds", None);
        // Far enough ahead for the create and one message to be numbered on a loaded machine.
        let end = chrono::Utc::now() + chrono::Duration::seconds(8);
        let mut s = subscription(json!({"type": "websocket"}), "id-only", &[]);
        s["end"] = json!(end.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        let (st, made) = post(&c, &app, "Subscription", &s).await;
        assert_eq!(st, 201, "{made}");
        let id = made["id"].as_str().unwrap().to_string();
        assert_eq!(made["status"], "active");
        assert_eq!(made["end"], s["end"]);
        // Before its end it hears of a message.
        app.create(&to("e1", "before the end")).await;
        let mut heard = 0;
        for _ in 0..50 {
            let st = get(&c, &app, &format!("Subscription/{id}/$status")).await.1;
            heard = st["entry"][0]["resource"]["parameter"].as_array().unwrap().iter()
                .find(|x| x["name"] == "events-since-subscription-start").unwrap()["valueString"].as_str().unwrap().parse::<i64>().unwrap();
            if heard >= 1 { break; }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(heard, 1);
        // After its end: off, and a message then is not numbered for it.
        tokio::time::sleep((end - chrono::Utc::now()).to_std().unwrap_or_default() + std::time::Duration::from_millis(200)).await;
        app.create(&to("e1", "after the end")).await;
        let mut read = Value::Null;
        for _ in 0..50 {
            read = get(&c, &app, &format!("Subscription/{id}")).await.1;
            if read["status"] == "off" { break; }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(read["status"], "off", "{read}");
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let st = get(&c, &app, &format!("Subscription/{id}/$status")).await.1;
        let n = st["entry"][0]["resource"]["parameter"].as_array().unwrap().iter()
            .find(|x| x["name"] == "events-since-subscription-start").unwrap()["valueString"].clone();
        assert_eq!(n, "1", "nothing after its end: {st}");
    }

    // From an outside probe: a patient app with no user is one client for every patient it is
    // launched for; in Bob's context it listed Ada's subscription and read her messages through
    // `$events`. A subscription is its owner's in one patient's context.
    async fn a_patient_app_s_subscription_is_one_patient_s(app: TestApp) {
        let scope = "patient/Communication.rs patient/Subscription.cruds";
        let id = clients::add(&app.store, "portal app", clients::KeySource::Document(es384_key().1.to_string()), "system/*.cruds").unwrap();
        let ada = client_with_token(&issue(&app.tokens, &id, scope, None, Some("ada")));
        let bob = client_with_token(&issue(&app.tokens, &id, scope, None, Some("bob")));
        let (s, created) = post(&ada, &app, "Subscription", &subscription(json!({"type": "websocket"}), "full-resource", &[])).await;
        assert_eq!(s, 201, "{created}");
        let sub = created["id"].as_str().unwrap().to_string();
        app.create(&to("ada", "ADA-ONLY results")).await;
        let mut ev = Value::Null;
        for _ in 0..100 {
            ev = get(&ada, &app, &format!("Subscription/{sub}/$events")).await.1;
            if ev.to_string().contains("ADA-ONLY") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ev.to_string().contains("ADA-ONLY"), "the owner reads its events: {ev}");
        for path in [format!("Subscription/{sub}"), format!("Subscription/{sub}/$events"), format!("Subscription/{sub}/$status")] {
            let (s, v) = get(&bob, &app, &path).await;
            assert_eq!(s, 404, "{path}: {v}");
            assert!(!v.to_string().contains("ADA-ONLY"));
        }
        let (s, v) = post(&bob, &app, &format!("Subscription/{sub}/$get-ws-binding-token"), &json!({"resourceType": "Parameters"})).await;
        assert_eq!(s, 404, "{v}");
        let (_, list) = get(&bob, &app, "Subscription").await;
        assert_eq!(list["total"], 0, "{list}");
        let (_, list) = get(&ada, &app, "Subscription").await;
        assert_eq!(list["total"], 1, "{list}");
        // A user's subscription is theirs whichever patient they open next (a second probe: a
        // clinician's, made while launched for Ada, was lost when launched for Bob).
        let scope = "user/Communication.rs user/Subscription.cruds";
        let as_dr = |patient: &str| client_with_token(&issue(&app.tokens, &id, scope, Some("Practitioner/dr"), Some(patient)));
        let (s, made) = post(&as_dr("ada"), &app, "Subscription", &subscription(json!({"type": "websocket"}), "id-only", &[])).await;
        assert_eq!(s, 201, "{made}");
        let (_, list) = get(&as_dr("bob"), &app, "Subscription").await;
        assert_eq!(list["total"], 1, "{list}");
    }

    async fn filters_and_the_websocket_channel_with_heartbeats(app: TestApp) {
        let c = integrator(&app, "system/Communication.rs system/Subscription.cruds", None);
        let mut ws_channel = json!({"type": "websocket"});
        ws_channel["extension"] = json!([{"url": format!("{IG}/backport-heartbeat-period"), "valueUnsignedInt": 1}]);
        let (s, created) = post(&c, &app, "Subscription", &subscription(ws_channel, "id-only", &["Communication?category=alert"])).await;
        assert_eq!(s, 201, "{created}");
        assert_eq!(created["status"], "active");
        let id = created["id"].as_str().unwrap();
        let (s, p) = post(&c, &app, &format!("Subscription/{id}/$get-ws-binding-token"), &json!({"resourceType": "Parameters"})).await;
        assert_eq!(s, 200, "{p}");
        let param = |n: &str| p["parameter"].as_array().unwrap().iter().find(|x| x["name"] == n).unwrap().clone();
        let token = param("token")["valueString"].as_str().unwrap().to_string();
        let url = param("websocket-url")["valueUrl"].as_str().unwrap().to_string();
        let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        ws.send(Message::Text(format!("bind-with-token {token}").into())).await.unwrap();
        let hs = next_frame(&mut ws).await;
        assert_eq!(status_param(&hs, "type")["valueCode"], "handshake");
        // Only the alert matches the filter.
        let mut plain = to("p1", "routine note");
        plain["category"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "notification"}]}]);
        app.create(&plain).await;
        let mut alert = to("p1", "urgent result");
        alert["category"] = json!([{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "alert"}]}]);
        let alert_id = app.create(&alert).await;
        let mut got = next_frame(&mut ws).await;
        while status_param(&got, "type")["valueCode"] == "heartbeat" {
            got = next_frame(&mut ws).await;
        }
        assert_eq!(status_param(&got, "type")["valueCode"], "event-notification");
        assert_eq!(event_numbers(&got), vec![1]);
        assert_eq!(got["entry"][1]["fullUrl"], app.url(&format!("Communication/{alert_id}")));
        assert!(got["entry"][1].get("resource").is_none());
        // Idle: heartbeats.
        let hb = next_frame(&mut ws).await;
        assert_eq!(status_param(&hb, "type")["valueCode"], "heartbeat");
        // A binding token is single use.
        let (mut again, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        again.send(Message::Text(format!("bind-with-token {token}").into())).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), again.next()).await.unwrap().unwrap().unwrap();
        assert!(reply.to_text().unwrap().starts_with("error"), "{reply:?}");
    }
}

/// Two instances on one PostgreSQL: exactly one dispatches, so each event is numbered and sent once,
/// whichever instance it was written through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_notify_each_event_exactly_once() {
    let Some(a) = spawn_app(Backend::Postgres).await else {
        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
        return;
    };
    let b = spawn_instance_on(&a).await.unwrap();
    let hook = receiver().await;
    let c = integrator(
        &a,
        "system/Communication.rs system/Subscription.cruds",
        None,
    );
    let (s, created) = post(
        &c,
        &a,
        "Subscription",
        &subscription(rest_hook(&hook.url), "id-only", &[]),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    hook.wait_for("handshake", 1).await;
    let mut ids = vec![];
    for i in 0..10 {
        let through = if i % 2 == 0 { &a } else { &b };
        ids.push(through.create(&to("p1", &format!("message {i}"))).await);
    }
    let mut numbers = vec![];
    let mut k = 1;
    while numbers.len() < 10 {
        numbers.extend(event_numbers(&hook.wait_for("event-notification", k).await));
        k += 1;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let all: Vec<i64> = hook
        .got
        .lock()
        .iter()
        .map(|(_, body)| serde_json::from_str::<Value>(body).unwrap())
        .filter(|b| status_param(b, "type")["valueCode"] == "event-notification")
        .flat_map(|b| event_numbers(&b))
        .collect();
    assert_eq!(
        all,
        (1..=10).collect::<Vec<i64>>(),
        "each event once, in order"
    );
    assert_eq!(
        hook.got
            .lock()
            .iter()
            .filter(|(_, body)| body.contains("\"handshake\""))
            .count(),
        1
    );
}

/// By default a subscriber cannot point Courier at loopback or private addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_endpoints_are_refused_by_default() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.subscription_private_endpoints = false
    })
    .await
    .unwrap();
    let c = integrator(
        &app,
        "system/Communication.rs system/Subscription.cruds",
        None,
    );
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "https://10.1.2.3/hook",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hook",
    ] {
        let (s, o) = post(
            &c,
            &app,
            "Subscription",
            &subscription(rest_hook(url), "id-only", &[]),
        )
        .await;
        assert_eq!(s, 400, "{url}: {o}");
        assert_eq!(
            o["issue"][0]["expression"][0],
            "Subscription.channel.endpoint"
        );
    }
}
