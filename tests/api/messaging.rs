//! Messaging: the WebSocket channel (access-filtered, catch-up after a dropped connection, across
//! instances) and per-recipient receipts.

use crate::both_backends;
use crate::helpers::*;
use courier::auth::clients;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Ws {
    stream: Stream,
}

impl Ws {
    /// Opens `/ws`, sends the auth frame, and collects the catch-up events up to `ready`.
    pub async fn open(app: &TestApp, token: &str, since: Option<Value>) -> (Ws, Vec<Value>, Value) {
        let url = format!("{}/ws", app.base.replace("http://", "ws://"));
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        let mut ws = Ws { stream };
        let mut auth = json!({"type": "auth", "token": token});
        if let Some(s) = since {
            auth["since"] = s;
        }
        ws.send(&auth).await;
        let mut events = vec![];
        loop {
            let f = ws.next().await.expect("a frame before ready");
            match f["type"].as_str() {
                Some("ready") => return (ws, events, f["seq"].clone()),
                Some("event") => events.push(f),
                _ => panic!("unexpected frame {f}"),
            }
        }
    }

    pub async fn send(&mut self, v: &Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    /// The next JSON frame within 5 s; `None` on timeout or close.
    pub async fn next(&mut self) -> Option<Value> {
        self.next_within(Duration::from_secs(5)).await
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let m = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()??
                .ok()?;
            match m {
                Message::Text(t) => return Some(serde_json::from_str(&t).unwrap()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// The close frame's code, reading past other frames.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.stream.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return Some(f.code.into()),
                Ok(Some(Ok(Message::Close(None)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }
}

pub fn user_token(app: &TestApp, scope: &str, user: &str, patient: Option<&str>) -> String {
    let client_id = clients::add(
        &app.store,
        "messaging test",
        clients::KeySource::Document(es384_key().1.to_string()),
        "system/*.cruds",
    )
    .unwrap();
    issue(&app.tokens, &client_id, scope, Some(user), patient)
}

pub fn patient_token(app: &TestApp, p: &str) -> String {
    user_token(app, "patient/*.cruds", &format!("Patient/{p}"), Some(p))
}

pub fn clinician_token(app: &TestApp, who: &str) -> String {
    user_token(app, "user/*.cruds", &format!("Practitioner/{who}"), None)
}

pub fn msg(sender: &str, recipients: &[&str], text: &str) -> Value {
    json!({
        "resourceType": "Communication",
        "status": "completed",
        "sender": {"reference": sender},
        "recipient": recipients.iter().map(|r| json!({"reference": r})).collect::<Vec<_>>(),
        "sent": "2026-11-28T10:00:00Z",
        "payload": [{"contentString": text}]
    })
}

pub async fn call(c: &reqwest::Client, app: &TestApp, method: &str, path: &str) -> (u16, Value) {
    let r = match method {
        "POST" => c.post(app.url(path)).send().await.unwrap(),
        _ => c.get(app.url(path)).send().await.unwrap(),
    };
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub fn param<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
}

fn part<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["part"].as_array()?.iter().find(|x| x["name"] == name)
}

both_backends! {
    async fn socket_delivers_what_the_user_may_see_and_nothing_else(app: TestApp) {
        let (mut p1, caught, _) = Ws::open(&app, &patient_token(&app, "p1"), None).await;
        assert!(caught.is_empty(), "no since: nothing replayed");
        let (mut outsider, _, _) = Ws::open(&app, &clinician_token(&app, "dr-9"), None).await;

        let for_p1 = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "Your results are in")).await;
        let for_p2 = app.create(&msg("Practitioner/dr-1", &["Patient/p2"], "Private to p2")).await;
        let for_dr9 = app.create(&msg("Practitioner/dr-1", &["Practitioner/dr-9"], "Hello dr-9")).await;

        let e = p1.next().await.expect("p1 gets its message");
        assert_eq!(e["type"], "event");
        assert_eq!(e["event"], "create");
        assert_eq!(e["id"], for_p1.as_str());
        assert_eq!(e["resource"]["payload"][0]["contentString"], "Your results are in");
        // Nothing about p2's message reaches p1; the outsider's first event is its own message,
        // which was written after the other two, so it saw neither of them.
        assert!(p1.next_within(Duration::from_millis(700)).await.is_none(), "p1 sees no more");
        let e = outsider.next().await.expect("dr-9 gets its own message");
        assert_eq!(e["id"], for_dr9.as_str());
        assert_ne!(e["id"], for_p2.as_str());

        // An update and a delete of p1's message are events too (a delete carries no body).
        let mut body = app.get_json(&format!("/Communication/{for_p1}")).await;
        body["status"] = json!("entered-in-error");
        assert_eq!(app.put(&format!("/Communication/{for_p1}"), &body).await.status(), 200);
        let e = p1.next().await.unwrap();
        assert_eq!((e["event"].as_str(), e["versionId"].as_i64()), (Some("update"), Some(2)));
        let r = app.client.delete(app.url(&format!("/Communication/{for_p1}"))).send().await.unwrap();
        assert_eq!(r.status(), 204);
        let e = p1.next().await.unwrap();
        assert_eq!(e["event"], "delete");
        assert!(e.get("resource").is_none());
    }

    async fn reconnecting_catches_up_on_exactly_what_was_missed(app: TestApp) {
        let token = patient_token(&app, "p1");
        let (mut ws, _, seq) = Ws::open(&app, &token, None).await;
        let first = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "one")).await;
        let e = ws.next().await.unwrap();
        assert_eq!(e["id"], first.as_str());
        // Sealed: a token, not the count of every event Courier recorded (an outside probe
        // watched it move with other patients' messages); each differs.
        let last_seen = e["seq"].clone();
        assert!(last_seen.is_string() && seq.is_string() && last_seen != seq, "{last_seen} {seq}");
        assert!(last_seen.as_str().unwrap().parse::<i64>().is_err());
        drop(ws); // the connection drops

        let a = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "two")).await;
        app.create(&msg("Practitioner/dr-1", &["Patient/p2"], "not yours")).await;
        let b = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "three")).await;

        let (mut ws, caught, ready) = Ws::open(&app, &token, Some(last_seen.clone())).await;
        let ids: Vec<&str> = caught.iter().map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![a.as_str(), b.as_str()], "the two missed, in order, nothing else");
        assert!(ready.is_string() && caught[1]["seq"].is_string());
        // A `since` Courier did not issue is as none: the client is told to resync.
        let (mut forged, _, _) = {
            let url = format!("{}/ws", app.base.replace("http://", "ws://"));
            let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
            let mut f = Ws { stream };
            f.send(&json!({"type": "auth", "token": token, "since": "bm90LWEtdG9rZW4"})).await;
            let first = f.next().await.unwrap();
            assert_eq!(first["type"], "resync", "{first}");
            (f, (), ())
        };
        assert_eq!(forged.next().await.unwrap()["type"], "ready");
        // Nor a number but 0 (from the start): any other would let a client bisect the global
        // event number from what the catch-up returns (a second probe did).
        let url = format!("{}/ws", app.base.replace("http://", "ws://"));
        let (stream, _) = tokio_tungstenite::connect_async(url).await.expect("connect");
        let mut numeric = Ws { stream };
        numeric.send(&json!({"type": "auth", "token": token, "since": 3})).await;
        assert_eq!(numeric.next().await.unwrap()["type"], "resync");
        // And live delivery carries on after the catch-up, without repeats.
        let c = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "four")).await;
        let e = ws.next().await.unwrap();
        assert_eq!(e["id"], c.as_str());
    }

    async fn socket_refuses_bad_tokens_and_frames(app: TestApp) {
        let url = format!("{}/ws", app.base.replace("http://", "ws://"));
        for (frame, code) in [
            (json!({"type": "auth", "token": "not-a-token"}).to_string(), 4401u16),
            ("hello".to_string(), 4400),
            (json!({"type": "subscribe"}).to_string(), 4400),
        ] {
            let (stream, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
            let mut ws = Ws { stream };
            ws.stream.send(Message::Text(frame.into())).await.unwrap();
            let err = ws.next().await.expect("an error frame");
            assert_eq!(err["type"], "error");
            assert_eq!(ws.close_code().await, Some(code));
        }
        // A revoked token is refused at once.
        let token = patient_token(&app, "p1");
        let p = app.tokens.verify(&token).unwrap();
        app.tokens.revoke(&p).unwrap();
        let (stream, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let mut ws = Ws { stream };
        ws.send(&json!({"type": "auth", "token": token})).await;
        assert_eq!(ws.next().await.unwrap()["type"], "error");
        assert_eq!(ws.close_code().await, Some(4401));
        // A token that cannot be checked now (its revocation list unreadable) is not called bad:
        // 1013 "try again later", not 4401 (which sends the app to mint a new token each time).
        let token = patient_token(&app, "p1");
        app.store.execute("ALTER TABLE revoked_tokens RENAME TO revoked_tokens_hidden", vec![]).unwrap();
        let (stream, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        let mut ws = Ws { stream };
        ws.send(&json!({"type": "auth", "token": token})).await;
        let err = ws.next().await.unwrap();
        assert_eq!((err["type"].as_str(), err["code"].as_str()), (Some("error"), Some("unavailable")), "{err}");
        assert_eq!(ws.close_code().await, Some(1013));
        app.store.execute("ALTER TABLE revoked_tokens_hidden RENAME TO revoked_tokens", vec![]).unwrap();
        let (_, _, ready) = Ws::open(&app, &token, None).await;
        assert!(ready.is_string(), "the same token is taken once it can be checked");
    }

    async fn receipts_are_set_by_their_recipient_and_shown_to_the_sender(app: TestApp) {
        let sender = client_with_token(&clinician_token(&app, "dr-1"));
        let p1 = client_with_token(&clinician_token(&app, "dr-2"));
        let p2 = client_with_token(&patient_token(&app, "p2"));
        let outsider = client_with_token(&clinician_token(&app, "dr-9"));
        let (mut sender_ws, _, _) = Ws::open(&app, &clinician_token(&app, "dr-1"), None).await;
        let (mut p2_ws, _, _) = Ws::open(&app, &patient_token(&app, "p2"), None).await;

        let thread = app.create(&json!({
            "resourceType": "Communication", "status": "in-progress",
            "sender": {"reference": "Practitioner/dr-1"},
            "recipient": [{"reference": "Practitioner/dr-2"}, {"reference": "Patient/p2"}],
            "topic": {"text": "Flu clinic"}
        })).await;
        let mut m = msg("Practitioner/dr-1", &["Practitioner/dr-2", "Patient/p2"], "Flu shots on Monday");
        m["partOf"] = json!([{"reference": format!("Communication/{thread}")}]);
        m["priority"] = json!("urgent");
        let id = app.create(&m).await;
        for _ in 0..2 {
            sender_ws.next().await.unwrap(); // the two creates
            p2_ws.next().await.unwrap();
        }

        // Unread before anything is marked: the thread header and the message for each.
        let (s, u) = call(&p2, &app, "GET", "/Communication/$unread").await;
        assert_eq!(s, 200, "{u}");
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 2);
        assert_eq!(param(&u, "urgent").unwrap()["valueInteger"], 1);
        // The header counts in its own thread: the threads' counts add up to the total.
        let t = param(&u, "thread").expect("a thread count");
        assert_eq!(u["parameter"].as_array().unwrap().iter().filter(|x| x["name"] == "thread").count(), 1);
        assert_eq!(part(t, "thread").unwrap()["valueReference"]["reference"], format!("Communication/{thread}"));
        assert_eq!(part(t, "unread").unwrap()["valueInteger"], 2);
        assert_eq!(part(t, "urgent").unwrap()["valueInteger"], 1);
        assert_eq!(part(t, "header").unwrap()["valueBoolean"], true, "its header is among them");

        // A token that may only read messages sets no receipt (the sender would see "read", an
        // urgent message's reminder would stop): p2's read-only session is refused.
        let read_only = client_with_token(&user_token(&app, "patient/Communication.rs", "Patient/p2", Some("p2")));
        for op in ["$mark-read", "$mark-delivered", "$mark-unread"] {
            let (s, oo) = call(&read_only, &app, "POST", &format!("/Communication/{id}/{op}")).await;
            assert_eq!(s, 403, "{op}: {oo}");
        }
        // dr-2 reads it; p2 only has it delivered.
        let (s, r) = call(&p1, &app, "POST", &format!("/Communication/{id}/$mark-read")).await;
        assert_eq!(s, 200, "{r}");
        let receipt = param(&r, "receipt").unwrap();
        assert_eq!(part(receipt, "recipient").unwrap()["valueReference"]["reference"], "Practitioner/dr-2");
        assert!(part(receipt, "delivered").is_some() && part(receipt, "read").is_some());
        let (s, _) = call(&p2, &app, "POST", &format!("/Communication/{id}/$mark-delivered")).await;
        assert_eq!(s, 200);

        // The sender's socket hears both receipts; p2's socket hears only its own.
        let a = sender_ws.next().await.unwrap();
        let b = sender_ws.next().await.unwrap();
        assert_eq!((a["event"].as_str(), b["event"].as_str()), (Some("receipt"), Some("receipt")));
        assert_eq!(a["receipt"]["recipient"]["reference"], "Practitioner/dr-2");
        assert!(a["receipt"]["read"].is_string());
        assert_eq!(b["receipt"]["recipient"]["reference"], "Patient/p2");
        assert!(b["receipt"].get("read").is_none());
        let own = p2_ws.next().await.unwrap();
        assert_eq!(own["receipt"]["recipient"]["reference"], "Patient/p2");
        assert!(p2_ws.next_within(Duration::from_millis(500)).await.is_none(), "dr-2's receipt is not p2's business");

        // The sender sees every receipt; a recipient only their own; an outsider nothing at all.
        let (s, all) = call(&sender, &app, "GET", &format!("/Communication/{id}/$receipts")).await;
        assert_eq!(s, 200);
        assert_eq!(all["parameter"].as_array().unwrap().len(), 2);
        // … and that disclosure (when p2 received and read it) is in p2's accounting.
        let trail = app.get_json("AuditEvent?patient=Patient/p2&agent=Practitioner/dr-1&subtype=operation&_count=200").await;
        let theirs = trail["entry"].as_array().into_iter().flatten().filter(|e| {
            e["resource"]["entity"].as_array().into_iter().flatten().any(|x| x["what"]["reference"] == format!("Communication/{id}").as_str())
        });
        assert_eq!(theirs.count(), 1, "the sender's $receipts is in p2's trail");
        let (_, mine) = call(&p2, &app, "GET", &format!("/Communication/{id}/$receipts")).await;
        assert_eq!(mine["parameter"].as_array().unwrap().len(), 1);
        assert_eq!(mine["parameter"][0]["part"][0]["valueReference"]["reference"], "Patient/p2");
        let (s, _) = call(&outsider, &app, "GET", &format!("/Communication/{id}/$receipts")).await;
        assert_eq!(s, 404, "an outsider cannot even tell the message exists");
        let (s, _) = call(&outsider, &app, "POST", &format!("/Communication/{id}/$mark-read")).await;
        assert_eq!(s, 404);
        // The sender is not a recipient: it cannot mark the message read for anyone.
        let (s, o) = call(&sender, &app, "POST", &format!("/Communication/{id}/$mark-read")).await;
        assert_eq!(s, 403, "{o}");
        assert_eq!(o["resourceType"], "OperationOutcome");

        // Unread now: dr-2 has only the thread header left; p2 still has the message (delivered is
        // not read), so its urgent count stays.
        let (_, u) = call(&p1, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 1);
        assert_eq!(param(&u, "urgent").unwrap()["valueInteger"], 0);
        let (_, u) = call(&p2, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 2);
        // … and lists them by reference, newest first.
        let listed: Vec<&str> = u["parameter"].as_array().unwrap().iter().filter(|x| x["name"] == "message")
            .map(|x| x["valueReference"]["reference"].as_str().unwrap()).collect();
        assert_eq!(listed, vec![format!("Communication/{id}"), format!("Communication/{thread}")]);
        // A grant narrowed by a scope query counts only what it admits.
        let alerts_only = client_with_token(&user_token(&app,
            "patient/Communication.rs?category=http://terminology.hl7.org/CodeSystem/communication-category|alert",
            "Patient/p2", Some("p2")));
        let (_, u) = call(&alerts_only, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 0, "{u}");
        // Marking twice changes nothing (the first read time stays).
        let (_, again) = call(&p1, &app, "POST", &format!("/Communication/{id}/$mark-read")).await;
        assert_eq!(param(&again, "receipt").unwrap(), receipt);
        // A system token has no user to count for.
        let (s, _) = call(&app.client, &app, "GET", "/Communication/$unread").await;
        assert_eq!(s, 403);
        // The sender's own socket got no event for the repeated mark.
        assert!(sender_ws.next_within(Duration::from_millis(500)).await.is_none());
    }
}

/// Two instances on one PostgreSQL: a message posted to A reaches a socket on B (LISTEN/NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_posted_to_one_instance_reaches_a_socket_on_another() {
    let Some(a) = spawn_app(Backend::Postgres).await else {
        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
        return;
    };
    let b = spawn_instance_on(&a).await.unwrap();
    let (mut ws, _, _) = Ws::open(&b, &patient_token(&b, "p1"), None).await;
    let started = std::time::Instant::now();
    let id = a
        .create(&msg(
            "Practitioner/dr-1",
            &["Patient/p1"],
            "across instances",
        ))
        .await;
    let e = ws.next().await.expect("B's socket receives A's message");
    assert_eq!(e["id"], id.as_str());
    // Woken by NOTIFY, not by B's one-second fallback poll.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
}

/// Sends `body` as FHIR JSON with `request`: (status, the JSON answer or null).
pub async fn send_json(request: reqwest::RequestBuilder, body: &Value) -> (u16, Value) {
    let r = request
        .header("content-type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

pub async fn post_as(c: &reqwest::Client, app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    send_json(
        c.post(app.url(path))
            .header("prefer", "return=representation"),
        body,
    )
    .await
}

pub async fn put_as(c: &reqwest::Client, app: &TestApp, path: &str, body: &Value) -> (u16, Value) {
    send_json(c.put(app.url(path)), body).await
}

/// dr-2 sets their out-of-office (their own PractitionerRole, away from an hour ago to an hour
/// from now, `reply` their automatic reply, dr-3 covering): the role as stored.
async fn dr2_away_dr3_covers(app: &TestApp, reply: &str) -> Value {
    let dr2 = client_with_token(&clinician_token(app, "dr-2"));
    let now = chrono::Utc::now();
    let role = json!({"resourceType": "PractitionerRole", "active": true,
        "practitioner": {"reference": "Practitioner/dr-2"},
        "extension": [{"url": courier::messaging::away::EXT_DELEGATE, "valueReference": {"reference": "Practitioner/dr-3"}}],
        "notAvailable": [{"description": reply,
            "during": {"start": (now - chrono::Duration::hours(1)).to_rfc3339(), "end": (now + chrono::Duration::hours(1)).to_rfc3339()}}]});
    let (s, created) = post_as(&dr2, app, "/PractitionerRole", &role).await;
    assert_eq!(
        s, 201,
        "the practitioner sets their own out-of-office: {created}"
    );
    created
}

/// One pass of the out-of-office job (beside the instance's own, which may be running).
async fn away_pass(app: &TestApp) {
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || courier::messaging::away::run(&store))
        .await
        .unwrap()
        .unwrap();
}

both_backends! {
    async fn drafts_are_their_authors_alone_until_sent(app: TestApp) {
        let author = client_with_token(&clinician_token(&app, "dr-1"));
        let p1 = client_with_token(&patient_token(&app, "p1"));
        let (mut p1_ws, _, _) = Ws::open(&app, &patient_token(&app, "p1"), None).await;
        let mut draft = msg("Practitioner/dr-1", &["Patient/p1"], "half-written thought");
        draft["status"] = json!("preparation");
        let (s, saved) = post_as(&author, &app, "/Communication", &draft).await;
        assert_eq!(s, 201, "{saved}");
        let id = saved["id"].as_str().unwrap().to_string();
        // The recipient neither reads, finds, counts nor hears of it.
        assert_eq!(p1.get(app.url(&format!("/Communication/{id}"))).send().await.unwrap().status(), 404);
        let b: Value = p1.get(app.url("/Communication?recipient=Patient/p1")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids(&b), Vec::<String>::new());
        let (_, u) = call(&p1, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 0);
        assert!(p1_ws.next_within(Duration::from_millis(700)).await.is_none());
        // Nor does a clinician it is addressed to, searching as themselves (the search's own
        // "recipient is me" leaves only "and it is not a draft" of that compartment group).
        let mut to_dr2 = msg("Practitioner/dr-1", &["Practitioner/dr-2"], "a note for a colleague");
        to_dr2["status"] = json!("preparation");
        let (s, note) = post_as(&author, &app, "/Communication", &to_dr2).await;
        assert_eq!(s, 201, "{note}");
        let dr2 = client_with_token(&clinician_token(&app, "dr-2"));
        for q in ["/Communication?recipient=Practitioner/dr-2", "/Communication?recipient=Practitioner/dr-2&_summary=count"] {
            let b: Value = dr2.get(app.url(q)).send().await.unwrap().json().await.unwrap();
            assert_eq!((ids(&b), b["total"].as_i64().unwrap_or(0)), (Vec::<String>::new(), 0), "{q}: {b}");
        }
        // The author does.
        let b: Value = author.get(app.url("/Communication?recipient=Patient/p1")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids(&b), vec![id.clone()]);
        let b: Value = author.get(app.url("/Communication?sender=Practitioner/dr-1&recipient=Practitioner/dr-2")).send().await.unwrap().json().await.unwrap();
        assert_eq!(ids(&b), vec![note["id"].as_str().unwrap().to_string()]);
        // Sent: now it arrives.
        let mut sent = saved.clone();
        sent["status"] = json!("completed");
        let r = author.put(app.url(&format!("/Communication/{id}"))).header("content-type", "application/fhir+json").body(sent.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let e = p1_ws.next().await.expect("the sent message arrives");
        assert_eq!((e["id"].as_str(), e["event"].as_str()), (Some(id.as_str()), Some("update")));
        assert_eq!(p1.get(app.url(&format!("/Communication/{id}"))).send().await.unwrap().status(), 200);
    }

    async fn patient_portal_guardrails_and_attachment_types(app: TestApp) {
        let p1 = client_with_token(&patient_token(&app, "p1"));
        let before = app.row_counts();
        let mut m = msg("Patient/p1", &["Practitioner/dr-1"], "When is my appointment?");
        let (s, o) = post_as(&p1, &app, "/Communication", &m).await;
        assert_eq!(s, 422, "{o}");
        assert_eq!(o["issue"][0]["expression"][0], "Communication.category");
        m["category"] = json!([{"coding": [{"system": courier::messaging::rules::CATEGORY_SYSTEM, "code": "appointment"}]}]);
        m["payload"] = json!([{"contentString": "x".repeat(1500)}, {"contentString": "y".repeat(501)}]);
        let (s, o) = post_as(&p1, &app, "/Communication", &m).await;
        assert_eq!(s, 422, "{o}");
        assert_eq!(o["issue"][0]["code"], "too-long");
        assert_eq!(o["issue"][0]["expression"][0], "Communication.payload[1].contentString");
        let mut to_other = m.clone();
        to_other["payload"] = json!([{"contentString": "hi"}]);
        to_other["recipient"] = json!([{"reference": "Patient/p2"}]);
        let (s, _) = post_as(&p1, &app, "/Communication", &to_other).await;
        assert_eq!(s, 403, "a patient cannot message another patient");
        // An attachment of a type not configured.
        let exe = json!({"resourceType": "Binary", "contentType": "application/x-msdownload", "data": "TVo="});
        let (s, o) = post_as(&p1, &app, "/Binary", &exe).await;
        assert_eq!(s, 415, "{o}");
        assert_eq!(o["issue"][0]["expression"][0], "Binary.contentType");
        let r = app.client.post(app.url("/Binary")).header("content-type", "application/x-sh").body("echo hi").send().await.unwrap();
        assert_eq!(r.status(), 415, "raw uploads are held to the same list");
        assert_eq!(app.row_counts().iter().find(|(t, _)| t == "resources"), before.iter().find(|(t, _)| t == "resources"), "refusals changed nothing");
        // Within the rules: accepted, with a picture attached.
        let (s, bin) = post_as(&p1, &app, "/Binary", &json!({"resourceType": "Binary", "contentType": "image/png; charset=binary", "data": "iVBORw0KGgo="})).await;
        assert_eq!(s, 201, "{bin}");
        m["payload"] = json!([{"contentString": "See the photo"}, {"contentAttachment": {"contentType": "image/png", "url": format!("Binary/{}", bin["id"].as_str().unwrap()), "title": "rash.png"}}]);
        let (s, o) = post_as(&p1, &app, "/Communication", &m).await;
        assert_eq!(s, 201, "{o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_app_is_served_under_a_strict_content_security_policy() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.expected_response_notice = "We reply within 1 day.".into();
        s.emergency_number = "112".into();
        s.frame_ancestors = "https://ehr.example.org".into();
    })
    .await
    .unwrap();
    let r = app.anonymous.get(app.url("/app/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(
        csp.contains("frame-ancestors https://ehr.example.org"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let page = r.text().await.unwrap();
    assert!(page.contains("<script src=\"/app/app.js\""));
    let js = app
        .anonymous
        .get(app.url("/app/app.js"))
        .send()
        .await
        .unwrap();
    assert!(js.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(
        !js.text().await.unwrap().contains(".innerHTML"),
        "user content is never parsed as HTML"
    );
    let cfg: Value = app
        .anonymous
        .get(app.url("/app/config.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["expected_response_notice"], "We reply within 1 day.");
    assert_eq!(cfg["patient_max_message_chars"], 2000);
    assert_eq!(
        cfg["emergency_number"], "112",
        "the clinic's emergency number reaches the app"
    );
}

/// Unread urgent messages: reminders every `renotify` seconds, escalation to the backup after
/// `after` seconds, all as a CommunicationRequest that is versioned, audited and pushed; reading
/// the message completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_urgent_messages_are_re_notified_then_escalated_until_read() {
    escalation_case(Backend::Sqlite).await;
}

/// The same on PostgreSQL (the escalation pass's SQL is shaped for SQLite's planner; it must
/// still mean the same there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_urgent_messages_are_re_notified_then_escalated_until_read_on_postgres() {
    escalation_case(Backend::Postgres).await;
}

async fn escalation_case(backend: Backend) {
    let Some(app) = spawn_app_with(backend, |s| {
        s.escalation_renotify_secs = 1;
        s.escalation_after_secs = 3;
        s.escalation_backup = Some("Practitioner/on-call".into());
    })
    .await
    else {
        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
        return;
    };
    let (mut p1_ws, _, _) = Ws::open(&app, &patient_token(&app, "p1"), None).await;
    let (mut backup_ws, _, _) = Ws::open(&app, &clinician_token(&app, "on-call"), None).await;
    let mut urgent = msg("Practitioner/dr-1", &["Patient/p1"], "Call us today");
    urgent["priority"] = json!("stat");
    let id = app.create(&urgent).await;
    let routine = app
        .create(&msg("Practitioner/dr-1", &["Patient/p1"], "No rush"))
        .await;
    for _ in 0..2 {
        p1_ws.next().await.unwrap(); // the two messages
    }
    // The first reminder: a CommunicationRequest about the message, to p1.
    let e = p1_ws
        .next_within(Duration::from_secs(6))
        .await
        .expect("a reminder");
    assert_eq!(
        (e["resourceType"].as_str(), e["event"].as_str()),
        (Some("CommunicationRequest"), Some("create"))
    );
    let cr = &e["resource"];
    assert_eq!(cr["about"][0]["reference"], format!("Communication/{id}"));
    assert_eq!(cr["priority"], "stat");
    assert_eq!(cr["identifier"][0]["value"], format!("{id}:Patient/p1"));
    assert!(
        !cr.to_string().contains("Call us today"),
        "the reminder carries no message text"
    );
    let cr_id = cr["id"].as_str().unwrap().to_string();
    // Later reminders update it; after 3 s the backup is named and hears of it.
    let escalated = backup_ws
        .next_within(Duration::from_secs(10))
        .await
        .expect("the backup is notified");
    assert_eq!(escalated["id"], cr_id.as_str());
    assert!(escalated["resource"]["recipient"]
        .to_string()
        .contains("Practitioner/on-call"));
    let ext = escalated["resource"]["extension"][0]["extension"]
        .as_array()
        .unwrap();
    let reminders = ext.iter().find(|x| x["url"] == "reminders").unwrap()["valueInteger"]
        .as_i64()
        .unwrap();
    assert!(reminders >= 2, "{reminders} reminders");
    assert!(ext.iter().any(|x| x["url"] == "escalatedTo"));
    // p1 reads it: the request is completed.
    let p1 = client_with_token(&patient_token(&app, "p1"));
    assert_eq!(
        call(
            &p1,
            &app,
            "POST",
            &format!("/Communication/{id}/$mark-read")
        )
        .await
        .0,
        200
    );
    let mut completed = false;
    for _ in 0..50 {
        let cr = app
            .get_json(&format!("/CommunicationRequest/{cr_id}"))
            .await;
        if cr["status"] == "completed" {
            completed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(completed, "reading the message completes the escalation");
    // Every step is in the request's history and the audit trail; the routine message never escalated.
    let history = app
        .get_json(&format!("/CommunicationRequest/{cr_id}/_history"))
        .await;
    assert!(history["entry"].as_array().unwrap().len() >= 3, "{history}");
    let audit = app
        .get_json(&format!(
            "/AuditEvent?entity=CommunicationRequest/{cr_id}&_count=50"
        ))
        .await;
    assert!(
        audit["entry"].as_array().unwrap().len() >= 3,
        "create, updates and completion are audited"
    );
    let all = app.get_json("/CommunicationRequest?_count=50").await;
    assert_eq!(
        ids(&all),
        vec![cr_id.clone()],
        "only the urgent message escalated"
    );
    assert!(!all.to_string().contains(&routine));
}

both_backends! {
    async fn a_message_to_a_group_or_care_team_reaches_its_members_only(app: TestApp) {
        let team = app.create(&json!({"resourceType": "CareTeam", "status": "active", "name": "Cardiology",
            "subject": {"reference": "Patient/p1"},
            "participant": [{"member": {"reference": "Practitioner/a"}}, {"member": {"reference": "Practitioner/b"}}]})).await;
        let group = app.create(&json!({"resourceType": "Group", "type": "practitioner", "actual": true,
            "member": [{"entity": {"reference": "Practitioner/c"}}]})).await;
        let (a, b, c, outsider) = (
            client_with_token(&clinician_token(&app, "a")),
            client_with_token(&clinician_token(&app, "b")),
            client_with_token(&clinician_token(&app, "c")),
            client_with_token(&clinician_token(&app, "z")),
        );
        let (mut b_ws, _, _) = Ws::open(&app, &clinician_token(&app, "b"), None).await;
        let (mut z_ws, _, _) = Ws::open(&app, &clinician_token(&app, "z"), None).await;
        let mut m = msg("Patient/p1", &[&format!("CareTeam/{team}")], "Question for the team");
        m["priority"] = json!("urgent");
        let to_team = app.create(&m).await;
        let to_group = app.create(&msg("Practitioner/x", &[&format!("Group/{group}")], "For the group")).await;
        // Members read and find it; others do not, and cannot tell it exists.
        for (who, c_, sees_team, sees_group) in [("a", &a, true, false), ("b", &b, true, false), ("c", &c, false, true), ("z", &outsider, false, false)] {
            let s = c_.get(app.url(&format!("/Communication/{to_team}"))).send().await.unwrap().status().as_u16();
            assert_eq!(s, if sees_team { 200 } else { 404 }, "{who} reads the team's message");
            let s = c_.get(app.url(&format!("/Communication/{to_group}"))).send().await.unwrap().status().as_u16();
            assert_eq!(s, if sees_group { 200 } else { 404 }, "{who} reads the group's message");
            let b: Value = c_.get(app.url("/Communication?_count=50")).send().await.unwrap().json().await.unwrap();
            let expect: Vec<String> = [(sees_team, &to_team), (sees_group, &to_group)].iter().filter(|(s, _)| *s).map(|(_, id)| id.to_string()).collect();
            let mut got = ids(&b);
            got.sort();
            let mut expect = expect;
            expect.sort();
            assert_eq!(got, expect, "{who} searches");
        }
        // A member's socket hears of it; an outsider's does not.
        let e = b_ws.next().await.expect("b hears of the team's message");
        assert_eq!(e["id"], to_team.as_str());
        assert!(z_ws.next_within(Duration::from_millis(600)).await.is_none());
        // Each member's receipt is their own; unread counts include team messages.
        let (_, u) = call(&b, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 1);
        assert_eq!(param(&u, "urgent").unwrap()["valueInteger"], 1);
        let (s, r) = call(&a, &app, "POST", &format!("/Communication/{to_team}/$mark-read")).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(param(&r, "receipt").unwrap()["part"][0]["valueReference"]["reference"], "Practitioner/a");
        let (_, u) = call(&a, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 0);
        let (_, u) = call(&b, &app, "GET", "/Communication/$unread").await;
        assert_eq!(param(&u, "unread").unwrap()["valueInteger"], 1, "a's read is not b's");
        assert_eq!(call(&outsider, &app, "POST", &format!("/Communication/{to_team}/$mark-read")).await.0, 404);
        // Membership is looked up at each use: b leaves the team and loses access at once.
        let mut t = app.get_json(&format!("/CareTeam/{team}")).await;
        t["participant"] = json!([{"member": {"reference": "Practitioner/a"}}]);
        assert_eq!(app.put(&format!("/CareTeam/{team}"), &t).await.status(), 200);
        assert_eq!(b.get(app.url(&format!("/Communication/{to_team}"))).send().await.unwrap().status(), 404);
        // The members read the team itself; others do not.
        assert_eq!(a.get(app.url(&format!("/CareTeam/{team}"))).send().await.unwrap().status(), 200);
        assert_eq!(outsider.get(app.url(&format!("/CareTeam/{team}"))).send().await.unwrap().status(), 404);
    }
}

both_backends! {
    async fn only_the_sender_writes_a_message_and_only_as_themself(app: TestApp) {
        let p1 = client_with_token(&patient_token(&app, "p1"));
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let id = app.create(&msg("Practitioner/dr-1", &["Patient/p1", "Practitioner/dr-2"], "Results are in")).await;
        // A recipient cannot rewrite the message, nor make itself its sender (which would give it
        // everyone's receipts): to it the stored message is not writable at all.
        let mut hijack = app.get_json(&format!("/Communication/{id}")).await;
        hijack["sender"] = json!({"reference": "Patient/p1"});
        hijack["category"] = json!([{"text": "question"}]);
        let r = p1.put(app.url(&format!("/Communication/{id}"))).header("content-type", "application/fhir+json").body(hijack.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let r = p1.delete(app.url(&format!("/Communication/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert_eq!(app.get_json(&format!("/Communication/{id}")).await["meta"]["versionId"], "1");
        // Nobody writes as someone else.
        let mut forged = msg("Practitioner/dr-1", &["Patient/p1"], "I am your doctor");
        forged["category"] = json!([{"text": "question"}]);
        let (s, o) = post_as(&p1, &app, "/Communication", &forged).await;
        assert_eq!(s, 403, "{o}");
        assert_eq!(o["issue"][0]["expression"][0], "Communication.sender");
        // The sender edits its own message.
        let mut edit = app.get_json(&format!("/Communication/{id}")).await;
        edit["status"] = json!("entered-in-error");
        let r = dr.put(app.url(&format!("/Communication/{id}"))).header("content-type", "application/fhir+json").body(edit.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn concurrent_receipts_and_crossing_writes_do_not_fail(app: TestApp) {
        let p1 = client_with_token(&patient_token(&app, "p1"));
        // The app marks delivered and read at once: both succeed, one receipt.
        for _ in 0..10 {
            let id = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "hi")).await;
            let (delivered, read) = (format!("/Communication/{id}/$mark-delivered"), format!("/Communication/{id}/$mark-read"));
            let (a, b) = tokio::join!(call(&p1, &app, "POST", &delivered), call(&p1, &app, "POST", &read));
            assert_eq!((a.0, b.0), (200, 200), "{} {}", a.1, b.1);
            let (_, all) = call(&app.client, &app, "GET", &format!("/Communication/{id}/$receipts")).await;
            assert_eq!(all["parameter"].as_array().unwrap().len(), 1);
        }
        // A transaction updating A then B beside a single update of B: no deadlock, no 500.
        let a = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "a")).await;
        let b = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "b")).await;
        for i in 0..15 {
            let body = |id: &str, n: usize| {
                let mut m = msg("Practitioner/dr-1", &["Patient/p1"], &format!("v{n}"));
                m["id"] = json!(id);
                m
            };
            let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                {"resource": body(&a, i), "request": {"method": "PUT", "url": format!("Communication/{a}")}},
                {"resource": body(&b, i), "request": {"method": "PUT", "url": format!("Communication/{b}")}}]});
            let (path, alone) = (format!("Communication/{b}"), body(&b, 100 + i));
            let (t, single) = tokio::join!(app.post("", &tx), app.put(&path, &alone));
            let (t, single) = (t.status().as_u16(), single.status().as_u16());
            assert!(matches!(t, 200 | 409) && matches!(single, 200 | 409), "transaction {t}, single {single}");
        }
    }
}

/// From an outside probe: a clinician named `Patient/bob` as their out-of-office delegate, and
/// every message sent to them while away was copied to that patient (text, attachments, another
/// patient as subject). A delegate is staff: a write naming anyone else is 422, and a role
/// stored before this rule is not followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_office_delegate_is_staff_only() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let dr2 = client_with_token(&clinician_token(&app, "dr-2"));
    let now = chrono::Utc::now();
    let role = |delegate: &str| {
        json!({"resourceType": "PractitionerRole", "active": true,
        "practitioner": {"reference": "Practitioner/dr-2"},
        "extension": [{"url": courier::messaging::away::EXT_DELEGATE, "valueReference": {"reference": delegate}}],
        "notAvailable": [{"description": "Away.",
            "during": {"start": (now - chrono::Duration::hours(1)).to_rfc3339(), "end": (now + chrono::Duration::hours(1)).to_rfc3339()}}]})
    };
    for bad in [
        "Patient/bob",
        "Group/ward",
        "https://elsewhere.example/fhir/Practitioner/x",
        "RelatedPerson/r",
    ] {
        let (s, oo) = post_as(&dr2, &app, "/PractitionerRole", &role(bad)).await;
        assert_eq!(s, 422, "{bad}: {oo}");
        assert_eq!(
            oo["issue"][0]["expression"][0], "PractitionerRole.extension[0]",
            "{oo}"
        );
        let r = app.post("PractitionerRole", &role(bad)).await;
        assert_eq!(r.status(), 422, "a system client's write too: {bad}");
    }
    let (s, _) = post_as(&dr2, &app, "/PractitionerRole", &role("Practitioner/dr-3")).await;
    assert_eq!(s, 201);
    // A role stored before the rule (written straight to the store), naming a patient.
    let ctx = courier::audit::Context::job(&app.base, "test");
    app.store
        .write(
            vec![courier::store::WriteOp::Create {
                res_type: "PractitionerRole".into(),
                id: "legacy".into(),
                resource: courier::store::Incoming::from_value({
                    let mut r = role("Patient/bob");
                    r["practitioner"] = json!({"reference": "Practitioner/dr-4"});
                    r
                }),
                if_none_exist: None,
            }],
            &ctx,
        )
        .unwrap();
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let mut m = msg(
        "Patient/p1",
        &["Practitioner/dr-4"],
        "BOB-MUST-NOT-READ my results",
    );
    m["category"] = json!([{"text": "question"}]);
    let (s, sent) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201, "{sent}");
    let id = sent["id"].as_str().unwrap().to_string();
    // The automatic reply comes (dr-4 is away); no copy goes to the patient named as delegate.
    let mut replied = false;
    for _ in 0..80 {
        let b = app
            .get_json(&format!("Communication?in-response-to=Communication/{id}"))
            .await;
        if b["entry"].as_array().is_some_and(|e| !e.is_empty()) {
            replied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(replied, "the away job ran");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let to_bob = app.get_json("Communication?recipient=Patient/bob").await;
    assert_eq!(
        to_bob["entry"].as_array().map_or(0, |e| e.len()),
        0,
        "{to_bob}"
    );
    let bob = client_with_token(&patient_token(&app, "bob"));
    let seen = bob
        .get(app.url("Communication"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!seen.contains("BOB-MUST-NOT-READ"), "{seen}");
}

/// Out-of-office: a practitioner's PractitionerRole.notAvailable makes Courier answer for them and
/// copy their delegate; escalation goes to the delegate at once; nothing answers an automatic
/// message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_away_practitioner_answers_automatically_and_their_delegate_covers() {
    let app = spawn_app_with(Backend::Sqlite, |s| s.escalation_renotify_secs = 1)
        .await
        .unwrap();
    let dr2 = client_with_token(&clinician_token(&app, "dr-2"));
    let now = chrono::Utc::now();
    let role = json!({"resourceType": "PractitionerRole", "active": true,
        "practitioner": {"reference": "Practitioner/dr-2"},
        "extension": [{"url": courier::messaging::away::EXT_DELEGATE, "valueReference": {"reference": "Practitioner/dr-3"}}],
        "notAvailable": [{"description": "I am away until Monday; Dr Three covers for me.",
            "during": {"start": (now - chrono::Duration::hours(1)).to_rfc3339(), "end": (now + chrono::Duration::hours(1)).to_rfc3339()}}]});
    let (s, created) = post_as(&dr2, &app, "/PractitionerRole", &role).await;
    assert_eq!(
        s, 201,
        "the practitioner sets their own out-of-office: {created}"
    );
    let (mut p1_ws, _, _) = Ws::open(&app, &patient_token(&app, "p1"), None).await;
    let (mut dr3_ws, _, _) = Ws::open(&app, &clinician_token(&app, "dr-3"), None).await;
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let mut m = msg(
        "Patient/p1",
        &["Practitioner/dr-2"],
        "Can I double my dose?",
    );
    m["category"] = json!([{"text": "question"}]);
    m["priority"] = json!("urgent");
    let (s, sent) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201, "{sent}");
    let id = sent["id"].as_str().unwrap().to_string();
    // p1 gets the automatic reply; dr-3 gets a copy with the text.
    let mut reply = Value::Null;
    while let Some(e) = p1_ws.next_within(Duration::from_secs(6)).await {
        if e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{id}").as_str() {
            reply = e["resource"].clone();
            break;
        }
    }
    assert_eq!(
        reply["payload"][0]["contentString"],
        "I am away until Monday; Dr Three covers for me."
    );
    assert_eq!(reply["sender"]["reference"], "Practitioner/dr-2");
    assert_eq!(reply["extension"][0]["valueCode"], "auto-reply");
    let mut copy = Value::Null;
    while let Some(e) = dr3_ws.next_within(Duration::from_secs(6)).await {
        if e["resourceType"] == "Communication"
            && e["resource"]["extension"][0]["valueCode"] == "forward"
        {
            copy = e["resource"].clone();
            break;
        }
    }
    assert!(copy.to_string().contains("Can I double my dose?"), "{copy}");
    // The urgent message escalates to the delegate straight away (no backup configured).
    let mut escalated = false;
    for _ in 0..60 {
        let crs = app.get_json("/CommunicationRequest?_count=10").await;
        if crs.to_string().contains("Practitioner/dr-3") {
            escalated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(escalated, "escalation went to the delegate");
    // Exactly one reply and one copy: nothing answers the automatic messages.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let all = app.get_json("/Communication?_count=50").await;
    let automatic = all["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["extension"][0]["url"] == courier::messaging::away::EXT_AUTOMATIC)
        .count();
    assert_eq!(automatic, 2, "{all}");
    // Back in the office: no more automatic replies.
    let mut back = created.clone();
    back["notAvailable"] = json!([]);
    back.as_object_mut().unwrap().remove("notAvailable");
    let r = dr2
        .put(app.url(&format!(
            "/PractitionerRole/{}",
            created["id"].as_str().unwrap()
        )))
        .header("content-type", "application/fhir+json")
        .body(back.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let all = app.get_json("/Communication?_count=50").await;
    let automatic = all["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["resource"]["extension"][0]["url"] == courier::messaging::away::EXT_AUTOMATIC)
        .count();
    assert_eq!(automatic, 2, "no automatic reply once back");
    // The patient withdraws the first message: the copy the delegate got is withdrawn too (a
    // second outside probe's delegate kept the text and the photo).
    let mut w = sent.clone();
    w["status"] = json!("entered-in-error");
    let r = p1
        .put(app.url(&format!("/Communication/{id}")))
        .json(&w)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let dr3 = client_with_token(&clinician_token(&app, "dr-3"));
    let copy_id = copy["id"].as_str().unwrap().to_string();
    let mut recalled = Value::Null;
    for _ in 0..60 {
        recalled = dr3
            .get(app.url(&format!("/Communication/{copy_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if recalled["status"] == "entered-in-error" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(recalled["status"], "entered-in-error", "{recalled}");
    assert!(
        !recalled.to_string().contains("double my dose"),
        "{recalled}"
    );
}

// A message sent after its draft was saved makes the notices of a new message (email, SMS, push)
// once, when it is sent: not while it is a draft, not again when it is changed afterwards (before,
// only a message created as sent made them).
both_backends! {
async fn a_draft_makes_its_notices_when_it_is_sent(app: TestApp) {
    let notices = |id: &str| {
        count(
            &app,
            "SELECT COUNT(*) AS n FROM notices WHERE about = ?",
            vec![format!("Communication/{id}").into()],
        )
    };
    // dr-2 can be reached by web push (a subscription: the channel exists).
    app.store
        .execute(
            "INSERT INTO notify_push (id, person, key_id, sealed, created_at) VALUES (?, ?, ?, ?, ?)",
            vec![
                "push-1".into(),
                "Practitioner/dr-2".into(),
                "k".into(),
                courier::store::db::Bind::Blob(vec![1, 2, 3]),
                0i64.into(),
            ],
        )
        .unwrap();
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let mut m = msg("Patient/p1", &["Practitioner/dr-2"], "Sent at once");
    m["category"] = json!([{"text": "question"}]);
    let (s, at_once) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201, "{at_once}");
    assert_eq!(notices(at_once["id"].as_str().unwrap()), 1, "a message sent at once");
    m["status"] = json!("preparation");
    let (s, draft) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201, "{draft}");
    let id = draft["id"].as_str().unwrap().to_string();
    let path = format!("/Communication/{id}");
    assert_eq!(notices(&id), 0, "a draft");
    let mut edited = draft.clone();
    edited["payload"] = json!([{"contentString": "Drafted, edited"}]);
    let (s, edited) = put_as(&p1, &app, &path, &edited).await;
    assert_eq!(s, 200, "{edited}");
    assert_eq!(notices(&id), 0, "a draft edited");
    let mut sent = edited.clone();
    sent["status"] = json!("completed");
    let (s, sent) = put_as(&p1, &app, &path, &sent).await;
    assert_eq!(s, 200, "{sent}");
    assert_eq!(notices(&id), 1, "the draft sent");
    // Sent is sent: it does not become a draft again (to be rewritten and sent anew).
    let mut back = sent.clone();
    back["status"] = json!("preparation");
    let (s, o) = put_as(&p1, &app, &path, &back).await;
    assert_eq!(s, 422, "{o}");
    // Courier's mark of an automatic message is not a client's to set.
    let mut forged = msg("Patient/p1", &["Practitioner/dr-2"], "Not really automatic");
    forged["category"] = json!([{"text": "question"}]);
    forged["extension"] = json!([{"url": courier::messaging::away::EXT_AUTOMATIC, "valueCode": "auto-reply"}]);
    let (s, o) = post_as(&p1, &app, "/Communication", &forged).await;
    assert_eq!(s, 422, "{o}");
    assert!(o.to_string().contains("automatic"), "{o}");
    // Withdrawn afterwards: no new notice.
    let mut withdrawn = sent.clone();
    withdrawn["status"] = json!("entered-in-error");
    let (s, w) = put_as(&p1, &app, &path, &withdrawn).await;
    assert_eq!(s, 200, "{w}");
    assert_eq!(notices(&id), 1, "nothing more");
}
}

// A message the patient saved as a draft first (the app saves what is typed) and then sent, by
// updating it out of `preparation`, is answered and copied like one sent at once (an outside
// walk-through: sent after "Draft saved", it got no auto-reply and the delegate no copy). The
// draft itself is not.
both_backends! {
async fn a_draft_sent_to_an_away_practitioner_is_answered_like_any_message(app: TestApp) {
    dr2_away_dr3_covers(&app, "Away this week.").await;
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let mut m = msg("Patient/p1", &["Practitioner/dr-2"], "Drafted, then sent");
    m["category"] = json!([{"text": "question"}]);
    m["status"] = json!("preparation");
    let (s, draft) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201, "{draft}");
    let id = draft["id"].as_str().unwrap().to_string();
    away_pass(&app).await;
    let answered = || async {
        app.get_json("/Communication?_count=10&sender=Practitioner/dr-2")
            .await["entry"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    assert!(answered().await.is_empty(), "a draft is not answered");
    let mut sent = draft.clone();
    sent["status"] = json!("completed");
    let (s, r) = put_as(&p1, &app, &format!("/Communication/{id}"), &sent).await;
    assert_eq!(s, 200, "{r}");
    away_pass(&app).await;
    let mut got = vec![];
    for _ in 0..20 {
        got = answered().await;
        if got.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kinds: Vec<&str> = got
        .iter()
        .filter(|e| e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{id}").as_str())
        .filter_map(|e| e["resource"]["extension"][0]["valueCode"].as_str())
        .collect();
    assert!(kinds.contains(&"auto-reply") && kinds.contains(&"forward"), "{got:?}");
    assert_eq!(got.len(), 2, "once each: {got:?}");
    // The copy says what it is in words, not by reference.
    let forward = got
        .iter()
        .map(|e| &e["resource"])
        .find(|r| r["extension"][0]["valueCode"] == "forward")
        .unwrap();
    let said = forward["payload"][0]["contentString"].as_str().unwrap();
    assert!(said.contains("while I am away") && said.contains("the patient's message") && !said.contains("Practitioner/"), "{said}");
    assert_eq!(forward["payload"][1]["contentString"], "Drafted, then sent");
    // The covering colleague answers the patient with dr-2 copied in: no auto-reply to them and
    // no copy of their own words back to them.
    let dr3 = client_with_token(&clinician_token(&app, "dr-3"));
    let mut cover = msg("Practitioner/dr-3", &["Patient/p1", "Practitioner/dr-2"], "Covering: yes, with food.");
    cover["subject"] = json!({"reference": "Patient/p1"});
    let (s, c) = post_as(&dr3, &app, "/Communication", &cover).await;
    assert_eq!(s, 201, "{c}");
    away_pass(&app).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(answered().await.len(), 2, "nothing automatic for the colleague who covers");
    // A message that already reaches the delegate: the patient gets the auto-reply, the delegate
    // no second copy.
    let mut both = msg("Patient/p1", &["Practitioner/dr-2", "Practitioner/dr-3"], "To both of you");
    both["category"] = json!([{"text": "question"}]);
    let (s, b) = post_as(&p1, &app, "/Communication", &both).await;
    assert_eq!(s, 201, "{b}");
    away_pass(&app).await;
    let mut kinds = vec![];
    for _ in 0..20 {
        kinds = answered()
            .await
            .iter()
            .filter(|e| e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{}", b["id"].as_str().unwrap()).as_str())
            .filter_map(|e| e["resource"]["extension"][0]["valueCode"].as_str().map(String::from))
            .collect::<Vec<_>>();
        if !kinds.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kinds, vec!["auto-reply".to_string()], "no copy to a delegate already reached");
}
}

// The covering colleague finds the forwarded message in their own list of conversations, without
// that patient open in their EHR, and the patient's replies reach them directly: the delegate
// joins the thread while the cover lasts (an outside walk-through's colleague could not find the
// copy, and the patient's next messages went on to the clinician who was away). Not from a
// staff-only side note into the patient's thread, not into a message that is not a thread
// header; and they leave again when the clinician is back, unless they wrote in the thread.
both_backends! {
async fn the_covering_colleague_joins_the_thread_and_the_patients_replies_reach_them(app: TestApp) {
    let role = dr2_away_dr3_covers(&app, "Away this week; Dr Three covers.").await;
    let p1 = client_with_token(&patient_token(&app, "p1"));
    // dr-1 has the patient open in their EHR (and so reads the patient's threads).
    let dr1 = client_with_token(&user_token(&app, "user/*.cruds", "Practitioner/dr-1", Some("p1")));
    let dr3 = client_with_token(&clinician_token(&app, "dr-3"));
    let thread = |text: &str| {
        let mut h = msg("Patient/p1", &["Practitioner/dr-2"], "");
        h.as_object_mut().unwrap().remove("payload");
        h["status"] = json!("in-progress");
        h["topic"] = json!({"text": text});
        h["subject"] = json!({"reference": "Patient/p1"});
        h["category"] = json!([{"text": "question"}]);
        h
    };
    let in_thread = |from: &str, to: &[&str], hid: &str, text: &str| {
        let mut m = msg(from, to, text);
        m["partOf"] = json!([{"reference": format!("Communication/{hid}")}]);
        m["subject"] = json!({"reference": "Patient/p1"});
        m["category"] = json!([{"text": "question"}]);
        m
    };
    let header_to = |hid: String| {
        let url = app.url(&format!("/Communication/{hid}"));
        let c = app.client.clone();
        async move {
            let h: Value = c.get(url).send().await.unwrap().json().await.unwrap();
            h["recipient"].as_array().unwrap().iter().filter_map(|r| r["reference"].as_str().map(String::from)).collect::<Vec<_>>()
        }
    };
    // Passes until `done` holds (the instance's own job may be in the middle of one).
    macro_rules! until {
        ($what:expr, $done:expr) => {{
            let mut ok = false;
            for _ in 0..50 {
                away_pass(&app).await;
                if $done {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(ok, "{}", $what);
        }};
    }
    // As the app starts a conversation: a header, then the first message in it.
    let (s, header) = post_as(&p1, &app, "/Communication", &thread("My tablets")).await;
    assert_eq!(s, 201, "{header}");
    let hid = header["id"].as_str().unwrap().to_string();
    let threads = |c: reqwest::Client| {
        let url = app.url("/Communication?part-of:missing=true&_count=50");
        async move {
            let b: Value = c.get(url).send().await.unwrap().json().await.unwrap();
            ids(&b)
        }
    };
    assert!(!threads(dr3.clone()).await.contains(&hid), "not theirs before dr-2 is written to");
    let (s, f) = post_as(&p1, &app, "/Communication", &in_thread("Patient/p1", &["Practitioner/dr-2"], &hid, "Can I take them with food?")).await;
    assert_eq!(s, 201, "{f}");
    until!("the covering colleague lists the thread", threads(dr3.clone()).await.contains(&hid));
    // The copy is in it.
    let (s, seen_by_dr3) = call(&dr3, &app, "GET", &format!("/Communication?part-of=Communication/{hid}")).await;
    assert_eq!(s, 200, "{seen_by_dr3}");
    let forwarded: Vec<&Value> = seen_by_dr3["entry"].as_array().into_iter().flatten().map(|e| &e["resource"])
        .filter(|r| r["extension"][0]["valueCode"] == "forward").collect();
    assert_eq!(forwarded.len(), 1, "{seen_by_dr3}");
    assert_eq!(forwarded[0]["payload"][1]["contentString"], "Can I take them with food?");
    // The patient sees who has joined, and the patient's reply, addressed as the app addresses it
    // (the header's participants but themself), reaches dr-3 directly — no copy needed, the
    // auto-reply still goes to the patient.
    let (s, seen) = call(&p1, &app, "GET", &format!("/Communication/{hid}")).await;
    assert_eq!(s, 200, "{seen}");
    let to: Vec<&str> = seen["recipient"].as_array().unwrap().iter().filter_map(|r| r["reference"].as_str()).collect();
    assert_eq!(to, vec!["Practitioner/dr-2", "Practitioner/dr-3"], "{seen}");
    assert_eq!(seen["topic"]["text"], "My tablets", "the header is otherwise unchanged");
    // ... and why: dr-3's entry says whom they cover for.
    assert_eq!(seen["recipient"][1]["extension"][0]["url"], courier::messaging::away::EXT_COVERING, "{seen}");
    assert_eq!(seen["recipient"][1]["extension"][0]["valueReference"]["reference"], "Practitioner/dr-2", "{seen}");
    assert!(seen["recipient"][0].get("extension").is_none(), "{seen}");
    let (s, r) = post_as(&p1, &app, "/Communication", &in_thread("Patient/p1", &to, &hid, "Also: is grapefruit juice all right?")).await;
    assert_eq!(s, 201, "{r}");
    let rid = r["id"].as_str().unwrap().to_string();
    let (s, got) = call(&dr3, &app, "GET", &format!("/Communication/{rid}")).await;
    assert_eq!(s, 200, "the colleague reads the patient's reply: {got}");
    let answers = |c: reqwest::Client| {
        let url = app.url(&format!("/Communication?part-of=Communication/{hid}&sender=Practitioner/dr-2"));
        let rid = rid.clone();
        async move {
            let b: Value = c.get(url).send().await.unwrap().json().await.unwrap();
            b["entry"].as_array().into_iter().flatten()
                .filter(|e| e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{rid}").as_str())
                .filter_map(|e| e["resource"]["extension"][0]["valueCode"].as_str().map(String::from))
                .collect::<Vec<_>>()
        }
    };
    // Told once per conversation and time away: no second automatic reply, and no copy of a
    // message that reaches the colleague (a walk-through: identical replies stacked up).
    for _ in 0..3 {
        away_pass(&app).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(answers(app.client.clone()).await, Vec::<String>::new(), "nothing automatic for the second message");
    let (_, all) = call(&p1, &app, "GET", &format!("/Communication?part-of=Communication/{hid}&sender=Practitioner/dr-2")).await;
    let replies = all["entry"].as_array().into_iter().flatten().filter(|e| e["resource"]["extension"][0]["valueCode"] == "auto-reply").count();
    assert_eq!(replies, 1, "the patient was told once that dr-2 is away: {all}");
    // A header sent as `completed` (no text of its own) is nothing to answer or forward.
    let mut bare = thread("A header sent completed");
    bare["status"] = json!("completed");
    let (s, b) = post_as(&p1, &app, "/Communication", &bare).await;
    assert_eq!(s, 201, "{b}");
    for _ in 0..3 {
        away_pass(&app).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let about_bare = app.get_json("/Communication?sender=Practitioner/dr-2&_count=100").await;
    assert!(
        !about_bare["entry"].as_array().into_iter().flatten().any(|e| e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{}", b["id"].as_str().unwrap()).as_str()),
        "{about_bare}"
    );
    // Joined once: the header has one version more, not one per message.
    let (_, h_now) = call(&p1, &app, "GET", &format!("/Communication/{hid}")).await;
    assert_eq!(h_now["meta"]["versionId"], "2", "{h_now}");

    // A staff-only side note to dr-2 in the patient's thread: dr-3 gets the copy, but does not
    // join a thread the patient reads (the patient would see a new participant appear).
    let (s, h2) = post_as(&p1, &app, "/Communication", &thread("My knee")).await;
    assert_eq!(s, 201, "{h2}");
    let h2 = h2["id"].as_str().unwrap().to_string();
    let mut note = in_thread("Practitioner/dr-1", &["Practitioner/dr-2"], &h2, "Between us: check her INR first.");
    note["meta"] = json!({"security": [{"system": courier::messaging::staff_only::ACT_CODE, "code": "NOPAT"}]});
    let (s, n) = post_as(&dr1, &app, "/Communication", &note).await;
    assert_eq!(s, 201, "{n}");
    let nid = n["id"].as_str().unwrap().to_string();
    let copied = || async {
        let b = app.get_json(&format!("/Communication?part-of=Communication/{h2}&recipient=Practitioner/dr-3")).await;
        b["entry"].as_array().into_iter().flatten().any(|e| e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{nid}").as_str())
    };
    until!("the side note is copied to dr-3", copied().await);
    assert_eq!(header_to(h2.clone()).await, vec!["Practitioner/dr-2"], "the patient's thread is not joined through a staff-only note");
    // A message whose partOf is another message with text of its own (not a header): it is not
    // re-addressed.
    let (s, root) = post_as(&p1, &app, "/Communication", &in_thread("Patient/p1", &["Practitioner/dr-2"], &hid, "A message, not a header")).await;
    assert_eq!(s, 201, "{root}");
    let root_id = root["id"].as_str().unwrap().to_string();
    let mut under = in_thread("Patient/p1", &["Practitioner/dr-2"], &root_id, "Under a message");
    under["partOf"] = json!([{"reference": format!("Communication/{root_id}")}]);
    let (s, u) = post_as(&p1, &app, "/Communication", &under).await;
    assert_eq!(s, 201, "{u}");
    {
        let uid = u["id"].as_str().unwrap().to_string();
        let copied = || async {
            let b = app.get_json("/Communication?recipient=Practitioner/dr-3&_count=100").await;
            b["entry"].as_array().into_iter().flatten().any(|e| e["resource"]["inResponseTo"][0]["reference"] == format!("Communication/{uid}").as_str())
        };
        until!("the message under a message is copied", copied().await);
        assert_eq!(header_to(root_id.clone()).await, vec!["Practitioner/dr-2"], "a message with text is never re-addressed");
    }

    // dr-3 saves a draft in the thread (and withdraws nothing, sends nothing): a draft is not
    // writing in the thread (a probe kept a delegate in a patient's thread with one).
    let mut draft = in_thread("Practitioner/dr-3", &["Patient/p1", "Practitioner/dr-2"], &hid, "half a thought");
    draft["status"] = json!("preparation");
    let (s, d) = post_as(&dr3, &app, "/Communication", &draft).await;
    assert_eq!(s, 201, "{d}");
    // Nor is a staff-only note to themself (it kept a probe's delegate in the thread).
    let mut to_self = in_thread("Practitioner/dr-3", &["Practitioner/dr-3"], &hid, "note to self");
    to_self["meta"] = json!({"security": [{"system": courier::messaging::staff_only::ACT_CODE, "code": "NOPAT"}]});
    let (s, n) = post_as(&dr3, &app, "/Communication", &to_self).await;
    assert_eq!(s, 201, "{n}");
    // A message naming the thread by a version of its header (`…/_history/1`) is in the same
    // thread: no second automatic reply (a probe got one per such message).
    let mut versioned = in_thread("Patient/p1", &["Practitioner/dr-2"], &hid, "Named by version");
    versioned["partOf"] = json!([{"reference": format!("Communication/{hid}/_history/1")}]);
    let (s, v) = post_as(&p1, &app, "/Communication", &versioned).await;
    assert_eq!(s, 201, "{v}");
    for _ in 0..3 {
        away_pass(&app).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, all) = call(&p1, &app, "GET", &format!("/Communication?part-of=Communication/{hid}&sender=Practitioner/dr-2")).await;
    let replies = all["entry"].as_array().into_iter().flatten().filter(|e| e["resource"]["extension"][0]["valueCode"] == "auto-reply").count();
    assert_eq!(replies, 1, "still one automatic reply in the thread: {all}");
    // A second thread, shared by dr-2 and dr-4, both away with dr-3 covering: when dr-2 is back,
    // dr-3 stays there for dr-4.
    let dr4 = client_with_token(&clinician_token(&app, "dr-4"));
    let now = chrono::Utc::now();
    let r4 = json!({"resourceType": "PractitionerRole", "active": true, "practitioner": {"reference": "Practitioner/dr-4"},
        "extension": [{"url": courier::messaging::away::EXT_DELEGATE, "valueReference": {"reference": "Practitioner/dr-3"}}],
        "notAvailable": [{"description": "Away too.", "during": {"start": (now - chrono::Duration::hours(1)).to_rfc3339(), "end": (now + chrono::Duration::hours(1)).to_rfc3339()}}]});
    let (s, r4) = post_as(&dr4, &app, "/PractitionerRole", &r4).await;
    assert_eq!(s, 201, "{r4}");
    let mut shared = thread("Both of you");
    shared["recipient"] = json!([{"reference": "Practitioner/dr-2"}, {"reference": "Practitioner/dr-4"}]);
    let (s, h4) = post_as(&p1, &app, "/Communication", &shared).await;
    assert_eq!(s, 201, "{h4}");
    let h4 = h4["id"].as_str().unwrap().to_string();
    for who in ["Practitioner/dr-2", "Practitioner/dr-4"] {
        let (s, _) = post_as(&p1, &app, "/Communication", &in_thread("Patient/p1", &[who], &h4, "For you")).await;
        assert_eq!(s, 201);
    }
    let joins_of = |h: &str| count(&app, "SELECT COUNT(*) AS n FROM away_joins WHERE header_id = ?", vec![h.into()]);
    until!("dr-3 covers the shared thread for both", joins_of(&h4) == 2);
    assert_eq!(header_to(h4.clone()).await, vec!["Practitioner/dr-2", "Practitioner/dr-4", "Practitioner/dr-3"]);
    // dr-2 is back: dr-3 leaves the thread they joined (they sent nothing in it) ...
    let mut back = role.clone();
    back.as_object_mut().unwrap().remove("notAvailable");
    let dr2 = client_with_token(&clinician_token(&app, "dr-2"));
    let (s, b) = put_as(&dr2, &app, &format!("/PractitionerRole/{}", role["id"].as_str().unwrap()), &back).await;
    assert_eq!(s, 200, "{b}");
    until!("dr-3 leaves the thread when dr-2 is back", header_to(hid.clone()).await == vec!["Practitioner/dr-2".to_string()]);
    assert!(!threads(dr3.clone()).await.contains(&hid), "the thread is no longer in dr-3's list");
    // ... but not the one they still cover for dr-4; when dr-4 is back too, they leave it.
    until!("dr-2's cover of the shared thread ends", joins_of(&h4) == 1);
    assert!(header_to(h4.clone()).await.contains(&"Practitioner/dr-3".to_string()), "still covering for dr-4");
    // ... and said to cover for dr-4 now.
    let (_, shared_now) = call(&p1, &app, "GET", &format!("/Communication/{h4}")).await;
    let dr3_entry = shared_now["recipient"].as_array().unwrap().iter().find(|r| r["reference"] == "Practitioner/dr-3").unwrap().clone();
    assert_eq!(dr3_entry["extension"][0]["valueReference"]["reference"], "Practitioner/dr-4", "{shared_now}");
    // An integrator's update may keep Courier's note, not change whom it names.
    let (s, kept) = put_as(&app.client, &app, &format!("/Communication/{h4}"), &shared_now).await;
    assert_eq!(s, 200, "{kept}");
    assert!(kept.to_string().contains("Practitioner/dr-4"), "{kept}");
    let forged = shared_now.to_string().replace("\"Practitioner/dr-4\"}}", "\"Practitioner/dr-9\"}}");
    assert_ne!(forged, shared_now.to_string());
    let (s, e) = put_as(&app.client, &app, &format!("/Communication/{h4}"), &serde_json::from_str::<Value>(&forged).unwrap()).await;
    assert_eq!(s, 422, "{e}");
    let mut back4 = r4.clone();
    back4.as_object_mut().unwrap().remove("notAvailable");
    let (s, _) = put_as(&dr4, &app, &format!("/PractitionerRole/{}", r4["id"].as_str().unwrap()), &back4).await;
    assert_eq!(s, 200);
    until!("dr-3 leaves the shared thread when dr-4 is back too", !header_to(h4.clone()).await.contains(&"Practitioner/dr-3".to_string()));
    // ... but stays in one they wrote in while covering.
    dr2_away_dr3_covers(&app, "Away again.").await;
    let (s, h3) = post_as(&p1, &app, "/Communication", &thread("My rash")).await;
    assert_eq!(s, 201, "{h3}");
    let h3 = h3["id"].as_str().unwrap().to_string();
    let (s, _) = post_as(&p1, &app, "/Communication", &in_thread("Patient/p1", &["Practitioner/dr-2"], &h3, "It is spreading")).await;
    assert_eq!(s, 201);
    until!("dr-3 joins the third thread", header_to(h3.clone()).await.contains(&"Practitioner/dr-3".to_string()));
    // 205 drafts first, then the real reply: the reply is found behind them (a probe hid it when
    // only 200 of a delegate's messages were read).
    let mut draft = in_thread("Practitioner/dr-3", &["Patient/p1", "Practitioner/dr-2"], &h3, "draft");
    draft["status"] = json!("preparation");
    let entries: Vec<Value> = (0..205).map(|_| json!({"resource": draft, "request": {"method": "POST", "url": "Communication"}})).collect();
    let (s, b) = post_as(&dr3, &app, "/", &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})).await;
    assert_eq!(s, 200, "{}", b.to_string().chars().take(400).collect::<String>());
    let (s, w) = post_as(&dr3, &app, "/Communication", &in_thread("Practitioner/dr-3", &["Patient/p1", "Practitioner/dr-2"], &h3, "Covering: please send a photo.")).await;
    assert_eq!(s, 201, "{w}");
    // That reply cannot be read for now (its data key not found): the cover's end waits for it
    // rather than take dr-3 out of a thread they wrote in.
    let sealed_by = |sign: &str| format!("UPDATE resource_versions SET key_n = {sign}key_n WHERE rid = (SELECT rid FROM resources WHERE res_type = 'Communication' AND fhir_id = ?)");
    let wid = w["id"].as_str().unwrap().to_string();
    app.store.execute(&sealed_by("-"), vec![wid.clone().into()]).unwrap();
    let (_, roles) = call(&app.client, &app, "GET", "/PractitionerRole?practitioner=Practitioner/dr-2").await;
    for e in roles["entry"].as_array().into_iter().flatten() {
        let mut r = e["resource"].clone();
        r.as_object_mut().unwrap().remove("notAvailable");
        let (s, _) = put_as(&dr2, &app, &format!("/PractitionerRole/{}", r["id"].as_str().unwrap()), &r).await;
        assert_eq!(s, 200);
    }
    for _ in 0..3 {
        away_pass(&app).await;
    }
    assert_eq!(count(&app, "SELECT COUNT(*) AS n FROM away_joins WHERE header_id = ?", vec![h3.clone().into()]), 1, "kept for the next pass");
    assert!(header_to(h3.clone()).await.contains(&"Practitioner/dr-3".to_string()), "not taken out on a message it could not read");
    app.store.execute(&sealed_by("-"), vec![wid.into()]).unwrap();
    // A thread that failed is left for ten minutes (a damaged row is not retried every second);
    // once repaired, it may be tried at once.
    courier::messaging::away::retry_failed_covers();
    until!("the cover's record goes", count(&app, "SELECT COUNT(*) AS n FROM away_joins", vec![]) == 0);
    assert!(header_to(h3.clone()).await.contains(&"Practitioner/dr-3".to_string()), "a delegate who wrote in the thread stays in it");
    // ... as a participant of their own: no longer said to be covering.
    let (_, after) = call(&p1, &app, "GET", &format!("/Communication/{h3}")).await;
    assert!(!after.to_string().contains(courier::messaging::away::EXT_COVERING), "{after}");
}
}

// "Covering for" is Courier's to say (the app shows it beside the message box): a patient, a
// clinician or an integrator that puts the note on a message's recipients, elsewhere on it, or on
// a scheduled message's request (whose recipients its messages copy) is refused, and nothing is
// stored. So is an escalation's mark on a request.
both_backends! {
async fn nobody_but_courier_says_who_covers_for_whom(app: TestApp) {
    use courier::messaging::away::EXT_COVERING;
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let dr1 = client_with_token(&clinician_token(&app, "dr-1"));
    let note = json!([{"url": EXT_COVERING, "valueReference": {"reference": "Practitioner/dr-2"}}]);
    let noted = |sender: &str| {
        let to = if sender == "Patient/p1" { "Practitioner/dr-1" } else { "Patient/p1" };
        let mut m = msg(sender, &[to], "Who is this?");
        m["subject"] = json!({"reference": "Patient/p1"});
        m["category"] = json!([{"text": "question"}]);
        m["recipient"][0]["extension"] = note.clone();
        m
    };
    let mut elsewhere = msg("Practitioner/dr-1", &["Patient/p1"], "Hello");
    elsewhere["subject"] = json!({"reference": "Patient/p1"});
    elsewhere["extension"] = note.clone();
    let mut request = json!({"resourceType": "CommunicationRequest", "status": "active",
        "subject": {"reference": "Patient/p1"}, "requester": {"reference": "Practitioner/dr-1"},
        "recipient": [{"reference": "Patient/p1", "extension": note}],
        "payload": [{"contentString": "Take your tablets"}], "occurrenceDateTime": "2030-01-01T09:00:00Z"});
    // Nor is an escalation's (it would page the clinician it names, through quiet hours).
    let paging = |requester: &str| json!({"resourceType": "CommunicationRequest", "status": "active",
        "extension": [{"url": courier::messaging::escalation::EXTENSION, "extension": [
            {"url": "escalatedTo", "valueReference": {"reference": "Practitioner/dr-2"}}]}],
        "category": [{"coding": [{"system": courier::messaging::escalation::CATEGORY_SYSTEM, "code": "unread-urgent"}]}],
        "requester": {"reference": requester}, "recipient": [{"reference": "Practitioner/dr-1"}],
        "payload": [{"contentString": "An urgent message is waiting to be read."}]});
    let mut category_only = paging("Practitioner/dr-1");
    category_only.as_object_mut().unwrap().remove("extension");
    for (who, path, body) in [
        (&p1, "/CommunicationRequest", paging("Patient/p1")),
        (&dr1, "/CommunicationRequest", paging("Practitioner/dr-1")),
        (&app.client, "/CommunicationRequest", paging("Practitioner/dr-1")),
        (&dr1, "/CommunicationRequest", category_only),
    ] {
        let (s, e) = post_as(who, &app, path, &body).await;
        assert_eq!(s, 422, "{e}");
        assert!(e.to_string().contains("escalation"), "{e}");
    }
    assert_eq!(count(&app, "SELECT COUNT(*) AS n FROM notices", vec![]), 0);
    for (who, path, body) in [
        (&p1, "/Communication", noted("Patient/p1")),
        (&dr1, "/Communication", noted("Practitioner/dr-1")),
        (&app.client, "/Communication", noted("Practitioner/dr-1")),
        (&dr1, "/Communication", elsewhere.clone()),
        (&dr1, "/CommunicationRequest", request.clone()),
    ] {
        let (s, e) = post_as(who, &app, path, &body).await;
        assert_eq!(s, 422, "{path}: {e}");
        assert!(e.to_string().contains("covering-for"), "{e}");
    }
    assert_eq!(count(&app, "SELECT COUNT(*) AS n FROM resources WHERE res_type IN ('Communication', 'CommunicationRequest')", vec![]), 0);
    // Without the note, the same writes go in.
    request["recipient"] = json!([{"reference": "Patient/p1"}]);
    let (s, e) = post_as(&dr1, &app, "/CommunicationRequest", &request).await;
    assert_eq!(s, 201, "{e}");
    let mut plain = noted("Patient/p1");
    plain["recipient"][0].as_object_mut().unwrap().remove("extension");
    let (s, e) = post_as(&p1, &app, "/Communication", &plain).await;
    assert_eq!(s, 201, "{e}");
}
}

// A clinician sets their own out-of-office from the web app: its token may write and search their
// own PractitionerRole (the policy confines it to practitioner = them), not anyone else's; a
// patient's may not write one at all.
both_backends! {
async fn a_clinician_sets_their_own_out_of_office_with_the_web_apps_token(app: TestApp) {
    use courier::smart::launch::web_app_scope;
    let dr2 = client_with_token(&user_token(&app, web_app_scope("Practitioner/dr-2"), "Practitioner/dr-2", None));
    let now = chrono::Utc::now();
    let role = |who: &str| json!({"resourceType": "PractitionerRole", "active": true,
        "practitioner": {"reference": who},
        "extension": [{"url": courier::messaging::away::EXT_DELEGATE, "valueReference": {"reference": "Practitioner/dr-3"}}],
        "notAvailable": [{"description": "Away; Dr Three covers.",
            "during": {"start": (now - chrono::Duration::hours(1)).to_rfc3339(), "end": (now + chrono::Duration::days(2)).to_rfc3339()}}]});
    let (s, mine) = post_as(&dr2, &app, "/PractitionerRole", &role("Practitioner/dr-2")).await;
    assert_eq!(s, 201, "{mine}");
    let (s, found) = call(&dr2, &app, "GET", "/PractitionerRole?practitioner=Practitioner/dr-2").await;
    assert_eq!((s, ids(&found)), (200, vec![mine["id"].as_str().unwrap().to_string()]), "{found}");
    // However many other roles dr-2 has, the one last changed counts: 21 plain ones, then the
    // away role touched (a probe's away role went unseen behind ten newer ones).
    for i in 0..21 {
        let plain = json!({"resourceType": "PractitionerRole", "active": i % 2 == 0, "practitioner": {"reference": "Practitioner/dr-2"}});
        let (s, o) = post_as(&dr2, &app, "/PractitionerRole", &plain).await;
        assert_eq!(s, 201, "{o}");
    }
    let (s, mine) = put_as(&dr2, &app, &format!("/PractitionerRole/{}", mine["id"].as_str().unwrap()), &mine).await;
    assert_eq!(s, 200, "{mine}");
    // In force: a message to dr-2 is answered.
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let mut m = msg("Patient/p1", &["Practitioner/dr-2"], "Are you there?");
    m["category"] = json!([{"text": "question"}]);
    let (s, sent) = post_as(&p1, &app, "/Communication", &m).await;
    assert_eq!(s, 201, "{sent}");
    away_pass(&app).await;
    let (_, replies) = call(&p1, &app, "GET", "/Communication?sender=Practitioner/dr-2").await;
    assert_eq!(ids(&replies).len(), 1, "the automatic reply: {replies}");
    // Turned off by the same token: no period, no delegate.
    let mut off = mine.clone();
    off.as_object_mut().unwrap().remove("notAvailable");
    off.as_object_mut().unwrap().remove("extension");
    let (s, o) = put_as(&dr2, &app, &format!("/PractitionerRole/{}", mine["id"].as_str().unwrap()), &off).await;
    assert_eq!(s, 200, "{o}");
    assert!(courier::messaging::away::away(&app.store, "Practitioner/dr-2", courier::clock::now_micros()).unwrap().is_none());
    // Not for someone else: dr-2 cannot make dr-4 "away" with themself as the delegate (they would
    // get copies of dr-4's messages), nor read dr-4's.
    let mut theirs = role("Practitioner/dr-4");
    theirs["extension"][0]["valueReference"]["reference"] = json!("Practitioner/dr-2");
    let (s, o) = post_as(&dr2, &app, "/PractitionerRole", &theirs).await;
    assert_eq!(s, 403, "{o}");
    let (s, other) = post_as(&app.client, &app, "/PractitionerRole", &role("Practitioner/dr-4")).await;
    assert_eq!(s, 201, "{other}");
    let (s, _) = call(&dr2, &app, "GET", &format!("/PractitionerRole/{}", other["id"].as_str().unwrap())).await;
    assert_eq!(s, 404);
    let (_, search) = call(&dr2, &app, "GET", "/PractitionerRole?practitioner=Practitioner/dr-4").await;
    assert_eq!(ids(&search), Vec::<String>::new(), "{search}");
    // A role is read at every lookup and its reply sent to everyone who writes: bounded (422).
    let mut many = role("Practitioner/dr-2");
    many["notAvailable"] = json!((0..21).map(|i| json!({"description": format!("away {i}")})).collect::<Vec<_>>());
    let (s, o) = post_as(&dr2, &app, "/PractitionerRole", &many).await;
    assert_eq!(s, 422, "{o}");
    let mut long = role("Practitioner/dr-2");
    long["notAvailable"][0]["description"] = json!("x".repeat(1001));
    let (s, o) = post_as(&dr2, &app, "/PractitionerRole", &long).await;
    assert_eq!(s, 422, "{o}");
    assert!(o.to_string().contains("1000 characters"), "{o}");
    let mut big = role("Practitioner/dr-2");
    big["telecom"] = json!((0..400).map(|i| json!({"system": "other", "value": format!("{i:0>100}")})).collect::<Vec<_>>());
    let (s, o) = post_as(&dr2, &app, "/PractitionerRole", &big).await;
    assert_eq!(s, 422, "{o}");
    // A patient's web-app token writes no PractitionerRole.
    let pt = client_with_token(&user_token(&app, web_app_scope("Patient/p1"), "Patient/p1", Some("p1")));
    let (s, o) = post_as(&pt, &app, "/PractitionerRole", &role("Practitioner/dr-2")).await;
    assert_eq!(s, 403, "{o}");
}
}

// Whoever writes to a clinician who is away is told so before sending, where the clinician is
// named ($participants, $recipients): away, until when, and their own automatic reply (an outside
// walk-through's patient read "usually replies within 2 business days" while writing to someone
// away for a week). Someone who is in is not marked.
both_backends! {
async fn a_clinician_away_is_said_to_be_away_where_they_are_named(app: TestApp) {
    courier::smart::identity::remember(&app.store, "Practitioner/dr-2", &json!({"name": "Grace Hopper"})).unwrap();
    courier::smart::identity::remember(&app.store, "Practitioner/dr-3", &json!({"name": "Alan Turing"})).unwrap();
    let p1 = client_with_token(&patient_token(&app, "p1"));
    let dr1 = client_with_token(&clinician_token(&app, "dr-1"));
    let mut hello = msg("Patient/p1", &["Practitioner/dr-2", "Practitioner/dr-3"], "Hello both");
    hello["category"] = json!([{"text": "question"}]);
    let (s, h) = post_as(&p1, &app, "/Communication", &hello).await;
    assert_eq!(s, 201, "{h}");
    let person = |b: &Value, who: &str| -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        for x in b["parameter"].as_array().into_iter().flatten() {
            let parts = x["part"].as_array().unwrap();
            if parts[0]["valueReference"]["reference"] != who {
                continue;
            }
            for q in parts {
                let v = q.as_object().unwrap().iter().find(|(k, _)| k.starts_with("value")).unwrap().1.clone();
                m.insert(q["name"].as_str().unwrap().to_string(), v);
            }
        }
        m
    };
    let ask = "/Communication/$participants?reference=Practitioner/dr-2&reference=Practitioner/dr-3";
    let (s, before) = call(&p1, &app, "GET", ask).await;
    assert_eq!(s, 200, "{before}");
    assert_eq!(person(&before, "Practitioner/dr-2")["name"], "Grace Hopper", "{before}");
    assert!(!person(&before, "Practitioner/dr-2").contains_key("away"), "not away yet: {before}");
    let role = dr2_away_dr3_covers(&app, "Away until Friday; Dr Turing covers.").await;
    let end = role["notAvailable"][0]["during"]["end"].clone();
    for (who, c) in [("the patient", &p1), ("a colleague", &dr1)] {
        let (s, now) = call(c, &app, "GET", ask).await;
        assert_eq!(s, 200, "{now}");
        let dr2 = person(&now, "Practitioner/dr-2");
        assert_eq!(dr2.get("away"), Some(&json!(true)), "{who}: {now}");
        assert_eq!(dr2.get("awayUntil"), Some(&end), "{who}: {now}");
        assert_eq!(dr2.get("awayReply"), Some(&json!("Away until Friday; Dr Turing covers.")), "{who}: {now}");
        assert!(!person(&now, "Practitioner/dr-3").contains_key("away"), "{who}: dr-3 is in: {now}");
    }
    // Where the patient picks whom to write to.
    let (s, r) = call(&p1, &app, "GET", "/Communication/$recipients").await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(person(&r, "Practitioner/dr-2").get("away"), Some(&json!(true)), "{r}");
    assert!(!person(&r, "Practitioner/dr-3").contains_key("away"), "{r}");
}
}

// After a burst of messages (an integrator's reminders, a ward's morning), a message to an away
// clinician is answered and copied to their delegate in the next pass, not after the job has
// worked through the burst at 200 events a second (it once did: 2,000 messages meant ten
// seconds' delay, 10,000 nearly a minute).
both_backends! {
async fn an_away_practitioner_is_answered_in_one_pass_after_a_burst(app: TestApp) {
    dr2_away_dr3_covers(&app, "Away today.").await;
    // 2,400 messages to colleagues who are in, then one to dr-2, in one transaction (the job
    // cannot have started on them before they are all there).
    let mut ops: Vec<courier::store::WriteOp> = (0..2400)
        .map(|i| courier::store::WriteOp::Create {
            res_type: "Communication".into(),
            id: courier::fhir::rest::new_id(),
            resource: courier::store::Incoming::from_value(msg(
                "Patient/p1",
                &[&format!("Practitioner/in-{}", i % 40)],
                "Reminder",
            )),
            if_none_exist: None,
        })
        .collect();
    let last_id = courier::fhir::rest::new_id();
    ops.push(courier::store::WriteOp::Create {
        res_type: "Communication".into(),
        id: last_id.clone(),
        // Named by its full URL on this server: the same clinician.
        resource: courier::store::Incoming::from_value(msg(
            "Patient/p1",
            &[&format!("{}/Practitioner/dr-2", app.store.base_url)],
            "Is my result back?",
        )),
        if_none_exist: None,
    });
    let ctx = courier::audit::Context {
        request_id: "burst".into(),
        client_address: "127.0.0.1".into(),
        base_url: app.base.clone(),
        ..Default::default()
    };
    let store = app.store.clone();
    tokio::task::spawn_blocking(move || store.write(ops, &ctx))
        .await
        .unwrap()
        .unwrap();
    // One pass (beside the instance's own, which may be running: whichever claims the message
    // writes its copies).
    away_pass(&app).await;
    let mut found = Value::Null;
    for _ in 0..10 {
        let r = app
            .get_json("/Communication?_count=10&sender=Practitioner/dr-2")
            .await;
        if r["entry"].as_array().is_some_and(|e| e.len() >= 2) {
            found = r;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The auto-reply to the patient and the copy to the delegate, both of that message.
    let automatic = |kind: &str| {
        found["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| &e["resource"])
            .find(|r| r["extension"][0]["valueCode"] == kind)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let reply = automatic("auto-reply");
    assert_eq!(
        reply["inResponseTo"][0]["reference"],
        format!("Communication/{last_id}").as_str(),
        "the auto-reply to the message after the burst, within one pass: {found}"
    );
    assert_eq!(reply["payload"][0]["contentString"], "Away today.");
    assert_eq!(reply["recipient"][0]["reference"], "Patient/p1");
    let copy = automatic("forward");
    assert_eq!(
        copy["recipient"][0]["reference"], "Practitioner/dr-3",
        "{found}"
    );
    assert!(copy.to_string().contains("Is my result back?"), "{copy}");
    assert_eq!(found["entry"].as_array().unwrap().len(), 2, "{found}");
    // Nobody who was in got one.
    let r = app
        .get_json("/Communication?_count=1&_summary=count&sender=Practitioner/in-1")
        .await;
    assert_eq!(r["total"], 0, "{r}");
}
}

/// The event log's commit-order lock is one per schema: a Courier in another schema of the same
/// PostgreSQL database (another deployment, or another test) holding its own never stalls this
/// one's writes, while within one schema event-writing transactions still queue on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_lock_of_another_schema_does_not_stall_writes() {
    let Some(a) = spawn_app(Backend::Postgres).await else {
        eprintln!("skipped: COURIER_TEST_POSTGRES_URL is not set");
        return;
    };
    let b = spawn_app(Backend::Postgres).await.unwrap();
    // B's event lock held by an open transaction in B's schema, as B's own writer would hold it.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let url = b.database_url.clone();
    let holder = std::thread::spawn(move || {
        use diesel::{Connection, PgConnection, RunQueryDsl};
        let mut c = PgConnection::establish(&url).unwrap();
        diesel::sql_query("BEGIN").execute(&mut c).unwrap();
        courier::messaging::events::lock(&mut c).unwrap();
        held_tx.send(()).unwrap();
        release_rx.recv().unwrap();
        diesel::sql_query("ROLLBACK").execute(&mut c).unwrap();
    });
    held_rx.recv().unwrap();
    let body = msg("Practitioner/dr-1", &["Patient/p1"], "not queued behind B");
    // A (another schema) writes its message and its event at once.
    let r = tokio::time::timeout(Duration::from_secs(5), a.post("Communication", &body))
        .await
        .expect("a write in schema A waited for the event lock of schema B");
    assert_eq!(r.status(), 201);
    // B itself queues behind the holder: its event commits in order.
    let b_post = tokio::spawn({
        let (client, url, body) = (b.client.clone(), b.url("/Communication"), body.clone());
        async move {
            client
                .post(url)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !b_post.is_finished(),
        "B's write did not wait for its own schema's event lock"
    );
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), b_post)
        .await
        .expect("B's write finishes once the lock is released")
        .unwrap();
    assert_eq!(status, 201);
}

/// A server told to stop (SIGTERM) closes its sockets at once with 1012 ("restarting"), so the
/// app says it is reconnecting; before, a socket stayed open through the graceful shutdown (up
/// to 10 s) and the app kept saying "Connected" while sends failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_closes_its_sockets_at_once() {
    let app = spawn_app(Backend::Sqlite).await.unwrap();
    let port = free_port();
    let mut child = serve_command(&app, port)
        .env("COURIER_BASE_URL", &app.base)
        .spawn()
        .expect("courier serve starts");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app
        .client
        .get(format!("{base}/metadata"))
        .send()
        .await
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the instance did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stream, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .expect("connect");
    let mut ws = Ws { stream };
    ws.send(&json!({"type": "auth", "token": patient_token(&app, "p1")}))
        .await;
    assert_eq!(ws.next().await.expect("ready")["type"], "ready");
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let asked = std::time::Instant::now();
    assert_eq!(ws.close_code().await, Some(1012), "closed as restarting");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    // The process still ends on its own.
    let ended = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < ended, "the server did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request planted with a reminder's identifier (before clients were refused it, or around the
/// API) is not taken for the reminder: the recipient still gets Courier's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_reminder_identifier_does_not_stop_the_reminder() {
    use courier::store::{Incoming, WriteOp};
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.escalation_renotify_secs = 1;
        s.escalation_after_secs = 3600;
    })
    .await
    .unwrap();
    let (mut p1_ws, _, _) = Ws::open(&app, &patient_token(&app, "p1"), None).await;
    let mut urgent = msg("Practitioner/dr-1", &["Patient/p1"], "Call us today");
    urgent["priority"] = json!("stat");
    let id = app.create(&urgent).await;
    p1_ws.next().await.unwrap(); // the message
    let planted = json!({"resourceType": "CommunicationRequest", "status": "active",
        "identifier": [{"system": "urn:courier:escalation", "value": format!("{id}:Patient/p1")}],
        "recipient": [{"reference": "Practitioner/someone"}],
        "payload": [{"contentString": "not a reminder"}]});
    let planted_id = uuid::Uuid::new_v4().to_string();
    app.store
        .write(
            vec![WriteOp::Create {
                res_type: "CommunicationRequest".into(),
                id: planted_id.clone(),
                resource: Incoming::from_value(planted),
                if_none_exist: None,
            }],
            &courier::audit::Context::job(&app.base, "test"),
        )
        .unwrap();
    let e = p1_ws
        .next_within(Duration::from_secs(8))
        .await
        .expect("a reminder");
    assert_eq!(e["event"], "create", "{e}");
    assert_ne!(e["resource"]["id"], planted_id.as_str());
    assert_eq!(
        e["resource"]["about"][0]["reference"],
        format!("Communication/{id}")
    );
    // The planted request is left as it was.
    let still: Value = app
        .get_json(&format!("CommunicationRequest/{planted_id}"))
        .await;
    assert_eq!(still["payload"][0]["contentString"], "not a reminder");
}

both_backends! {
    // A conversation is about one patient: a message about another cannot join it (it would be
    // read, counted and filed to the chart under the wrong patient; an outside probe joined one).
    // A message about the same patient, or a staff note in it, still can.
    async fn a_message_about_another_patient_cannot_join_a_patients_conversation(app: TestApp) {
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let post = |body: Value| {
            let (dr, url) = (dr.clone(), app.url("Communication"));
            async move {
                let r = dr.post(url).header("content-type", "application/fhir+json").body(body.to_string()).send().await.unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            }
        };
        let (s, h) = post(json!({"resourceType": "Communication", "status": "in-progress",
            "subject": {"reference": "Patient/p2"}, "sender": {"reference": "Practitioner/dr-1"},
            "recipient": [{"reference": "Patient/p2"}], "topic": {"text": "p2's results"}})).await;
        assert_eq!(s, 201, "{h}");
        let thread = format!("Communication/{}", h["id"].as_str().unwrap());
        let before = app.row_counts();
        for wrong in [
            json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": thread}],
                "sender": {"reference": "Practitioner/dr-1"}, "recipient": [{"reference": "Patient/p1"}],
                "payload": [{"contentString": "for p1"}]}),
            json!({"resourceType": "Communication", "status": "completed", "inResponseTo": [{"reference": format!("{}/{thread}", app.base)}],
                "subject": {"reference": "Patient/p1"}, "sender": {"reference": "Practitioner/dr-1"},
                "recipient": [{"reference": "Practitioner/dr-2"}], "payload": [{"contentString": "about p1"}]}),
        ] {
            let (s, oo) = post(wrong).await;
            assert_eq!(s, 422, "{oo}");
            assert!(oo.to_string().contains("another patient"), "{oo}");
        }
        assert_eq!(app.row_counts(), before, "nothing was written");
        let (s, r) = post(json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": thread}],
            "subject": {"reference": "Patient/p2"}, "sender": {"reference": "Practitioner/dr-1"},
            "recipient": [{"reference": "Patient/p2"}], "payload": [{"contentString": "for p2"}]})).await;
        assert_eq!(s, 201, "{r}");
        let (s, r) = post(json!({"resourceType": "Communication", "status": "completed", "partOf": [{"reference": thread}],
            "subject": {"reference": "Patient/p2"}, "sender": {"reference": "Practitioner/dr-1"},
            "recipient": [{"reference": "Practitioner/dr-2"}], "payload": [{"contentString": "side note"}]})).await;
        assert_eq!(s, 201, "a staff note about the same patient: {r}");
    }
}

both_backends! {
    // From an outside walk-through: a message posted without `sent` sorted as the oldest of its
    // thread, so the newest message was missing from the page the app opened. A message sent
    // without one was sent when Courier took it; a draft has none until it is sent.
    async fn a_message_sent_without_a_time_is_given_the_time_it_was_sent(app: TestApp) {
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let post = |c: &reqwest::Client, body: Value| {
            let (c, url) = (c.clone(), app.url("Communication"));
            async move {
                let r = c.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 201);
                r.json::<Value>().await.unwrap()
            }
        };
        let older = post(&dr, msg("Practitioner/dr-1", &["Patient/p1"], "Your results are normal")).await;
        let before = chrono::Utc::now() - chrono::Duration::seconds(1);
        let mut untimed = msg("Practitioner/dr-1", &["Patient/p1"], "Here is your lab report");
        untimed.as_object_mut().unwrap().remove("sent");
        let made = post(&dr, untimed.clone()).await;
        let sent = chrono::DateTime::parse_from_rfc3339(made["sent"].as_str().expect("sent is set")).unwrap();
        assert!(sent >= before && sent <= chrono::Utc::now() + chrono::Duration::seconds(1), "{sent}");
        // Newest first in the thread's order (the app's `_sort=-sent`).
        let b = app.get_json("Communication?recipient=Patient/p1&_sort=-sent").await;
        assert_eq!(b["entry"][0]["resource"]["id"], made["id"], "{b}");
        assert_eq!(b["entry"][1]["resource"]["id"], older["id"]);
        // An integrator's is as it gives it (it may load history whose time is not known).
        let by_system = app.create(&untimed).await;
        assert!(app.get_json(&format!("Communication/{by_system}")).await.get("sent").is_none());
        // A draft has none; sending it gives it one; a later change keeps it.
        let mut draft = untimed.clone();
        draft["status"] = json!("preparation");
        let d = post(&dr, draft).await;
        assert!(d.get("sent").is_none(), "{d}");
        let id = d["id"].as_str().unwrap();
        let mut now_sent = d.clone();
        now_sent["status"] = json!("completed");
        let r = dr.put(app.url(&format!("Communication/{id}"))).json(&now_sent).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["sent"].is_string(), "sent when the draft is sent: {v}");
        // Sent, it is frozen (an outside probe rewrote read messages, and re-addressed one to
        // another patient): a change is 422; the same message again keeps its time.
        let mut later = v.clone();
        later.as_object_mut().unwrap().remove("sent");
        later["priority"] = json!("urgent");
        let r = dr.put(app.url(&format!("Communication/{id}"))).json(&later).send().await.unwrap();
        assert_eq!(r.status(), 422);
        let mut readdressed = v.clone();
        readdressed["recipient"] = json!([{"reference": "Patient/p2"}]);
        readdressed["subject"] = json!({"reference": "Patient/p2"});
        assert_eq!(dr.put(app.url(&format!("Communication/{id}"))).json(&readdressed).send().await.unwrap().status(), 422);
        let patch = json!([{"op": "replace", "path": "/payload/0/contentString", "value": "50 mg"}]);
        let r = dr.patch(app.url(&format!("Communication/{id}"))).header("content-type", "application/json-patch+json").body(patch.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 422);
        // A withdrawal is of the message as it was: it cannot also re-address it.
        let other: Value = post(&dr, msg("Practitioner/dr-1", &["Patient/p1"], "to withdraw")).await;
        let mut moved = other.clone();
        moved["status"] = json!("entered-in-error");
        moved["recipient"] = json!([{"reference": "Practitioner/dr-9"}]);
        let r = dr.put(app.url(&format!("Communication/{}", other["id"].as_str().unwrap()))).json(&moved).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let w: Value = r.json().await.unwrap();
        assert_eq!(w["recipient"][0]["reference"], "Patient/p1", "{w}");
        // Any status but a draft's is frozen (a code review: one sent as in-progress could be
        // rewritten after it was read).
        let mut open = msg("Practitioner/dr-1", &["Patient/p1"], "in progress");
        open["status"] = json!("in-progress");
        let o: Value = post(&dr, open).await;
        let mut rewritten = o.clone();
        rewritten["payload"] = json!([{"contentString": "rewritten"}]);
        let r = dr.put(app.url(&format!("Communication/{}", o["id"].as_str().unwrap()))).json(&rewritten).send().await.unwrap();
        assert_eq!(r.status(), 422);
        let mut same = v.clone();
        same.as_object_mut().unwrap().remove("sent");
        let r = dr.put(app.url(&format!("Communication/{id}"))).json(&same).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v["sent"].is_string(), "the same message again keeps the time it was sent: {v}");
        // Given by a person, it is still Courier's time (an outside probe's patient dated one 1900
        // and another 2099, and the app shows `sent` as fact); `received` is not the writer's.
        let p1 = client_with_token(&patient_token(&app, "p1"));
        for (who, mut m) in [
            (&dr, msg("Practitioner/dr-1", &["Patient/p1"], "x")),
            (&p1, msg("Patient/p1", &["Practitioner/dr-1"], "y")),
        ] {
            m["sent"] = json!("1900-01-01T00:00:00Z");
            m["received"] = json!("2099-01-01T00:00:00Z");
            m["category"] = json!([{"text": "question"}]);
            let v = post(who, m).await;
            let sent = chrono::DateTime::parse_from_rfc3339(v["sent"].as_str().unwrap()).unwrap();
            assert!((chrono::Utc::now().fixed_offset() - sent).num_seconds().abs() < 60, "{v}");
            assert!(v.get("received").is_none(), "{v}");
        }
        // An integrator's is kept as given (it may load history).
        let id = app.create(&msg("Practitioner/dr-1", &["Patient/p1"], "z")).await;
        assert_eq!(app.get_json(&format!("Communication/{id}")).await["sent"], "2026-11-28T10:00:00Z");
    }
}

both_backends! {
    // From an outside walk-through: a clinician withdrew a message sent to the wrong patient,
    // and that patient still read its text through search, `_history` and vread. Withdrawing
    // recalls the content: the withdrawn version has none, and the versions before are the
    // author's (and compliance's) alone.
    async fn a_withdrawn_message_s_content_is_recalled_from_its_readers(app: TestApp) {
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let p1_token = patient_token(&app, "p1");
        let p1 = client_with_token(&p1_token);
        let r = dr.post(app.url("Communication")).json(&msg("Practitioner/dr-1", &["Patient/p1"], "WRONGPATIENT biopsy result")).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let sent: Value = r.json().await.unwrap();
        let id = sent["id"].as_str().unwrap().to_string();
        let (mut ws, _, _) = Ws::open(&app, &p1_token, None).await;
        assert!(p1.get(app.url(&format!("Communication/{id}"))).send().await.unwrap().text().await.unwrap().contains("WRONGPATIENT"));
        // Withdrawn by its author, with the body as read (payload and all).
        let mut w = sent.clone();
        w["status"] = json!("entered-in-error");
        let r = dr.put(app.url(&format!("Communication/{id}"))).json(&w).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(v.get("payload").is_none(), "{v}");
        let e = ws.next().await.expect("the withdrawal reaches the socket");
        assert!(!e.to_string().contains("WRONGPATIENT"), "{e}");
        // The patient: nothing of the text, on any path.
        for path in [
            format!("Communication/{id}"),
            "Communication?status=entered-in-error".to_string(),
            format!("Communication/{id}/_history"),
            "Communication/_history".to_string(),
            format!("Communication?_id={id}"),
        ] {
            let r = p1.get(app.url(&path)).send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert!(!r.text().await.unwrap().contains("WRONGPATIENT"), "{path}");
        }
        let r = p1.get(app.url(&format!("Communication/{id}/_history/1"))).send().await.unwrap();
        assert_eq!(r.status(), 404);
        assert!(!r.text().await.unwrap().contains("WRONGPATIENT"));
        assert_eq!(p1.get(app.url(&format!("Communication/{id}/_history/2"))).send().await.unwrap().status(), 200);
        // Its author and compliance keep the record.
        for c in [&dr, &app.client] {
            let r = c.get(app.url(&format!("Communication/{id}/_history/1"))).send().await.unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.text().await.unwrap().contains("WRONGPATIENT"));
        }
        let h = dr.get(app.url(&format!("Communication/{id}/_history"))).send().await.unwrap().text().await.unwrap();
        assert!(h.contains("WRONGPATIENT"), "the author's history keeps it");
        // A withdrawn message stays withdrawn (put back, its earlier versions would show again).
        let mut back = v.clone();
        back["status"] = json!("completed");
        let r = dr.put(app.url(&format!("Communication/{id}"))).json(&back).send().await.unwrap();
        assert_eq!(r.status(), 422);
        assert!(!p1.get(app.url(&format!("Communication/{id}/_history/1"))).send().await.unwrap().text().await.unwrap().contains("WRONGPATIENT"));

        // Everything that can carry its words goes, not only the payload.
        let mut wordy = msg("Practitioner/dr-1", &["Patient/p1"], "WORDS-PAYLOAD");
        wordy["topic"] = json!({"text": "WORDS-TOPIC"});
        wordy["note"] = json!([{"text": "WORDS-NOTE"}]);
        wordy["reasonCode"] = json!([{"text": "WORDS-REASON"}]);
        // … and wherever else a client can put words (a second probe read these).
        wordy["extension"] = json!([{"url": "https://example.org/note", "valueString": "WORDS-EXT"}]);
        wordy["reasonReference"] = json!([{"reference": "Condition/c1", "display": "WORDS-REASONREF"}]);
        wordy["about"] = json!([{"reference": "DiagnosticReport/d1", "display": "WORDS-ABOUT"}]);
        wordy["category"] = json!([{"text": "WORDS-CATEGORY", "coding": [{"system": "http://terminology.hl7.org/CodeSystem/communication-category", "code": "notification", "display": "WORDS-DISPLAY"}]}]);
        wordy["medium"] = json!([{"text": "WORDS-MEDIUM"}]);
        wordy["identifier"] = json!([{"system": "https://ehr.example/msg", "value": "WORDS-IDENTIFIER"}]);
        wordy["recipient"] = json!([{"reference": "Patient/p1", "display": "WORDS-RECIPIENT"}]);
        wordy["statusReason"] = json!({"text": "WORDS-STATUSREASON"});
        let made: Value = dr.post(app.url("Communication")).json(&wordy).send().await.unwrap().json().await.unwrap();
        let wid = made["id"].as_str().unwrap().to_string();
        let mut w = made.clone();
        w["status"] = json!("entered-in-error");
        assert_eq!(dr.put(app.url(&format!("Communication/{wid}"))).json(&w).send().await.unwrap().status(), 200);
        let now = p1.get(app.url(&format!("Communication/{wid}"))).send().await.unwrap().text().await.unwrap();
        assert!(!now.contains("WORDS-"), "{now}");
        // What it keeps: who, when, which thread, the codes.
        let kept: Value = serde_json::from_str(&now).unwrap();
        assert_eq!(kept["recipient"][0]["reference"], "Patient/p1", "{kept}");
        assert_eq!(kept["category"][0]["coding"][0]["code"], "notification", "{kept}");
        assert_eq!(kept["status"], "entered-in-error");
        // Withdrawn, then deleted: a socket's catch-up replays the events without their content,
        // and no version is the patient's to read.
        assert_eq!(dr.delete(app.url(&format!("Communication/{wid}"))).send().await.unwrap().status(), 204);
        let (_, events, _) = Ws::open(&app, &p1_token, Some(json!(0))).await;
        let replayed = serde_json::to_string(&events).unwrap();
        assert!(!replayed.contains("WORDS-") && !replayed.contains("WRONGPATIENT"), "{replayed}");
        assert_eq!(p1.get(app.url(&format!("Communication/{wid}/_history/1"))).send().await.unwrap().status(), 404);
    }

    // A confined reader's history was paged before hidden versions were left out: a page could
    // be short and still have `next`, which said hidden versions exist. Now every page is full
    // while more follow, `_offset` counts what the reader sees, and the pages together are
    // exactly the versions the reader may see, each once.
    async fn a_patient_s_history_pages_are_full_and_say_nothing_of_hidden_versions(app: TestApp) {
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let p1 = client_with_token(&patient_token(&app, "p1"));
        let mut visible = Vec::new();
        for i in 0..4 {
            // Each withdrawn message: version 1 (its words) is hidden, version 2 is seen.
            let made: Value = dr.post(app.url("Communication")).json(&msg("Practitioner/dr-1", &["Patient/p1"], &format!("HIDDEN-{i}"))).send().await.unwrap().json().await.unwrap();
            let id = made["id"].as_str().unwrap().to_string();
            let mut w = made.clone();
            w["status"] = json!("entered-in-error");
            assert_eq!(dr.put(app.url(&format!("Communication/{id}"))).json(&w).send().await.unwrap().status(), 200);
            visible.push(format!("{id}/2"));
            // And one plain message, seen whole.
            let kept: Value = dr.post(app.url("Communication")).json(&msg("Practitioner/dr-1", &["Patient/p1"], "kept")).send().await.unwrap().json().await.unwrap();
            visible.push(format!("{}/1", kept["id"].as_str().unwrap()));
        }
        let key = |e: &Value| format!("{}/{}", e["resource"]["id"].as_str().unwrap(), e["resource"]["meta"]["versionId"].as_str().unwrap());
        let mut seen = Vec::new();
        let mut next = Some(app.url("Communication/_history?_count=3"));
        let mut pages = 0;
        while let Some(url) = next {
            let r = p1.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            assert!(!text.contains("HIDDEN-"), "{text}");
            let b: Value = serde_json::from_str(&text).unwrap();
            let entries: Vec<Value> = b["entry"].as_array().cloned().unwrap_or_default();
            next = next_link(&b);
            if next.is_some() {
                assert_eq!(entries.len(), 3, "a page with a next link is full: {b}");
            }
            seen.extend(entries.iter().map(key));
            pages += 1;
            assert!(pages < 10);
        }
        visible.reverse();
        assert_eq!(seen, visible, "every visible version once, newest first");
        assert_eq!(pages, 3, "8 versions in pages of 3");
        // The author sees all 12 versions.
        let all: Value = dr.get(app.url("Communication/_history?_count=50")).send().await.unwrap().json().await.unwrap();
        assert_eq!(all["entry"].as_array().unwrap().len(), 12);
    }
}

both_backends! {
    // From an outside probe and walk-through: a patient's message stored the sender display
    // "Dr. Smith, Cardiology" and an invented "on behalf of" extension, which another client
    // (or the chart it was filed to) would show as fact. A person's sender is their reference.
    async fn a_patient_s_message_says_no_more_of_its_sender_than_who_it_is(app: TestApp) {
        let p1 = client_with_token(&patient_token(&app, "p1"));
        let mut m = msg("Patient/p1", &["Practitioner/dr-1"], "About my results");
        m["sender"] = json!({"reference": "Patient/p1", "display": "Dr. Smith, Cardiology",
            "extension": [{"url": "http://example.org/on-behalf-of", "valueReference": {"reference": "Practitioner/dr-1"}}]});
        m["category"] = json!([{"coding": [{"system": "https://courier.example.org/fhir/CodeSystem/message-category", "code": "question"}]}]);
        let r = p1.post(app.url("Communication")).json(&m).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["sender"], json!({"reference": "Patient/p1"}), "{v}");
        // Nor an identifier or a type on it, from a patient app with no user either; and that
        // app's message gets its time too.
        let no_user = client_with_token(&issue(&app.tokens, &app.admin_client_id, "patient/Communication.cruds", None, Some("p1")));
        let mut m = msg("Patient/p1", &["Practitioner/dr-1"], "From the portal app");
        m.as_object_mut().unwrap().remove("sent");
        m["sender"] = json!({"reference": "Patient/p1", "type": "Practitioner", "identifier": {"system": "http://npi", "value": "Dr Smith"},
            "_reference": {"extension": [{"url": "http://example.org/x", "valueString": "Dr Smith"}]}});
        m["category"] = json!([{"coding": [{"system": "https://courier.example.org/fhir/CodeSystem/message-category", "code": "question"}]}]);
        let r = no_user.post(app.url("Communication")).json(&m).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["sender"], json!({"reference": "Patient/p1"}), "{v}");
        assert!(v["sent"].is_string(), "{v}");
        let stored = app.get_json(&format!("Communication/{}", v["id"].as_str().unwrap())).await;
        assert!(!stored.to_string().contains("Dr. Smith") && !stored.to_string().contains("on-behalf-of"));
        // Nor anything else that says who wrote or approved it (an attacker probe filed to the
        // chart a patient's message whose note was "approved by" a clinician): a note's author,
        // extensions but Courier's own, the narrative, the display of any reference.
        let mut m = msg("Patient/p1", &["Practitioner/dr-1"], "Please stop my warfarin");
        m["category"] = json!([{"coding": [{"system": "https://courier.example.org/fhir/CodeSystem/message-category", "code": "question"}]}]);
        m["note"] = json!([{"authorReference": {"reference": "Practitioner/dr-2"}, "text": "Reviewed and approved by me"}]);
        m["extension"] = json!([{"url": "http://hl7.org/fhir/StructureDefinition/event-onBehalfOf", "valueReference": {"reference": "Practitioner/dr-2"}}]);
        m["text"] = json!({"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Message from Dr Vera Victim</div>"});
        m["recipient"][0]["display"] = json!("Dr Vera Victim (approved)");
        let r = p1.post(app.url("Communication")).json(&m).send().await.unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        let stored = app.get_json(&format!("Communication/{}", v["id"].as_str().unwrap())).await;
        for claim in ["dr-2", "Vera Victim", "onBehalfOf"] {
            assert!(!stored.to_string().contains(claim), "{claim}: {stored}");
        }
        assert_eq!(stored["note"][0]["text"], "Reviewed and approved by me", "the note's words stay, as the patient's");
        // Nor a clinician's (a probe's clinician labelled their message "Dr Vera Victim", which
        // an API reader would show as its author): Courier names people from its own records.
        let dr = client_with_token(&clinician_token(&app, "dr-1"));
        let mut m = msg("Practitioner/dr-1", &["Patient/p1"], "Reply");
        m["sender"]["display"] = json!("Dr Vera Victim");
        let v: Value = dr.post(app.url("Communication")).json(&m).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["sender"], json!({"reference": "Practitioner/dr-1"}), "{v}");
        // An integrator's stays (it may mirror an EHR's record as it is).
        let mut m = msg("Practitioner/dr-1", &["Patient/p1"], "Mirrored");
        m["sender"]["display"] = json!("Dr One");
        let v: Value = app.client.post(app.url("Communication")).json(&m).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["sender"]["display"], "Dr One", "{v}");
        // Its author may still send it again unchanged (a version stored with displays is
        // compared as a person's write is stored now; a review: 422 "cannot be changed").
        let (s, again) = put_as(&dr, &app, &format!("/Communication/{}", v["id"].as_str().unwrap()), &v).await;
        assert_eq!(s, 200, "{again}");
    }
}
