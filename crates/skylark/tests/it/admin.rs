//! The operator's listener: the admin API behind its token, the audit log,
//! the `skylark admin` verbs, and a backup taken under load then restored.

use crate::harness::{ADMIN_TOKEN, TestServer, Transport, test_config};
use serde_json::{Value, json};
use skylark_client::Session;
use skylark_client::api::Api;
use skylark_client::session::Event;
use skylark_protocol::CloseCode;
use skylark_store::{RedbStore, Store};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn skylark(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skylark")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

async fn closed(events: &mut tokio::sync::mpsc::Receiver<Event>) -> Option<CloseCode> {
    loop {
        match events.recv().await.expect("events end with Closed") {
            Event::Closed { code, .. } => return code,
            Event::Frame(_) => continue,
        }
    }
}

/// Client ids of the messages `identity`'s account holds, read back through
/// history as a device sees it.
async fn history_ids(server: &TestServer, identity: &skylark_client::Identity) -> BTreeSet<String> {
    let (session, _events) = Session::open(&server.endpoint(Transport::Tcp), identity).await.unwrap();
    let (mut ids, mut before) = (BTreeSet::new(), 0);
    loop {
        let page = session.handle().history(before, 200).await.unwrap();
        for event in &page.events {
            if let Some(skylark_protocol::v1::event::Body::Message(m)) = &event.body {
                ids.insert(m.client_id.clone());
            }
        }
        match page.events.last() {
            Some(last) if page.has_more => before = last.seq,
            _ => return ids,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_under_load_restores_every_message_acknowledged_before_it_began() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("live.redb")).unwrap());
    let audit = dir.path().join("audit.log");
    let mut server = TestServer::start_audited(test_config(), store, Some(audit.clone())).await;
    let alice = server.register("+15552600001").await;
    let bob = server.register("+15552600002").await;

    // Alice sends without pause; every acknowledged id is recorded in order.
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (session, _events) = Session::open(&server.endpoint(Transport::Tcp), &alice).await.unwrap();
    let sender = tokio::spawn({
        let (acked, stop) = (acked.clone(), stop.clone());
        async move {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("m{n}");
                session.handle().send("+15552600002", &id, vec![b'x'; 200]).await.unwrap();
                acked.lock().unwrap().push(id);
                n += 1;
            }
        }
    });
    let count = || acked.lock().unwrap().len();
    while count() < 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Without the token: refused, and audited as refused.
    let admin = Api::new(&server.admin_base()).unwrap();
    let (status, ..) = admin.raw("GET", "/admin/v1/stats", None).await.unwrap();
    assert_eq!(status, 401);
    let admin = admin.with_bearer(ADMIN_TOKEN);

    let before: Vec<String> = acked.lock().unwrap().clone();
    let dest = dir.path().join("backup.redb");
    let made: Value = admin.call("POST", "/admin/v1/backup", Some(json!({ "dest": dest }))).await.unwrap();
    assert!(made["rows"].as_u64().unwrap() > before.len() as u64, "{made}");
    let at_backup = count();
    while count() < at_backup + 100 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    sender.await.unwrap();
    assert!(at_backup > before.len(), "messages were acknowledged while the backup ran or right after");
    // A second backup to the same file is refused: nothing is overwritten.
    let again = admin.call::<Value>("POST", "/admin/v1/backup", Some(json!({ "dest": dest }))).await.unwrap_err();
    assert!(again.to_string().contains("exists already"), "{again}");
    server.shutdown().await;

    // Restored with the command line into a new data directory and served:
    // Bob's device finds every message acknowledged before the backup began.
    let restored = dir.path().join("restored");
    let (ok, out) = skylark(&["restore", dest.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = skylark(&["restore", dest.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()]);
    assert!(!ok && out.contains("--force"), "an existing store is not replaced silently: {out}");
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&restored.join("skylark.redb")).unwrap());
    let server = TestServer::start_on(test_config(), store).await;
    // An acknowledgement means durable in the sender's log and outbox; the
    // forward to Bob may still have been on its way when the backup was
    // taken. It resumes when Alice's actor starts (here, as her device
    // connects), so Bob's history is read until it is all there.
    let (_alice, _alice_events) = Session::open(&server.endpoint(Transport::Tcp), &alice).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let held = loop {
        let held = history_ids(&server, &bob).await;
        if before.iter().all(|id| held.contains(id)) || tokio::time::Instant::now() > deadline {
            break held;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let missing: Vec<&String> = before.iter().filter(|id| !held.contains(*id)).collect();
    assert!(missing.is_empty(), "{} acknowledged before the backup are missing: {missing:?}", missing.len());
    assert!(held.len() >= before.len() && held.len() <= at_backup + 1, "{} held", held.len());

    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(log.contains(r#""action":"stats""#) && log.contains("refused: no valid token"), "{log}");
    assert!(log.contains(r#""action":"backup""#) && log.contains(r#""outcome":"done""#), "{log}");
    assert!(!log.contains("xxxx"), "no message content in the audit log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_verbs_show_an_account_and_disconnect_a_device_in_words() {
    let server = TestServer::start().await;
    let carol = server.register("+15552600003").await;
    let (_session, mut events) = Session::open(&server.endpoint(Transport::Ws), &carol).await.unwrap();
    let url = server.admin_base();
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--admin", url.as_str(), "--token", ADMIN_TOKEN];
        all.extend_from_slice(args);
        skylark(&all)
    };

    let (ok, out) = admin(&["stats"]);
    assert!(ok && out.contains("1 live connection;") && out.contains("ready"), "{out}");
    let (ok, out) = admin(&["account", "+15552600003"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("+15552600003 is account {}", carol.account_id)), "{out}");
    assert!(out.contains(&format!("device {} \"", carol.device_id)) && out.contains("connected"), "{out}");
    let (ok, out) = admin(&["account", "+15552609999"]);
    assert!(!ok && out.contains("no account has +15552609999"), "{out}");

    let (ok, out) = admin(&["disconnect", &carol.device_id.to_string()]);
    assert!(ok && out.contains("was disconnected"), "{out}");
    assert_eq!(closed(&mut events).await, Some(CloseCode::GoingAway));

    // A ban: her device's connection ends, connecting again and signing up
    // again are refused in words; lifted, she connects again.
    let (_session, mut events) = Session::open(&server.endpoint(Transport::Tcp), &carol).await.unwrap();
    let (ok, out) = admin(&["ban", "+15552600003"]);
    assert!(ok && out.contains("+15552600003 is banned") && out.contains("1 device disconnected"), "{out}");
    assert_eq!(closed(&mut events).await, Some(CloseCode::GoingAway));
    let refused = Session::open(&server.endpoint(Transport::Ws), &carol).await.unwrap_err().to_string();
    assert!(refused.contains("this number is banned from this server"), "{refused}");
    let signup = server.api().start_verification("+15552600003").await.unwrap_err().to_string();
    assert!(signup.contains("banned"), "{signup}");
    // A session started before its number was banned goes no further.
    let api = server.api();
    let started = api.start_verification("+15552600005").await.unwrap();
    let (ok, out) = admin(&["ban", "+15552600005"]);
    assert!(ok && out.contains("0 devices disconnected"), "{out}");
    let resend = api.resend(&started.session_id).await.unwrap_err().to_string();
    assert!(resend.contains("banned"), "{resend}");
    let code = server.sms.last_code("+15552600005");
    let verify = api.verify(&started.session_id, &code, &[9; 32], "x").await.unwrap_err().to_string();
    assert!(verify.contains("banned"), "{verify}");
    let (ok, out) = admin(&["bans"]);
    assert!(ok && out.contains("+15552600003"), "{out}");
    let (ok, out) = admin(&["unban", "+15552600003"]);
    assert!(ok && out.contains("no longer banned"), "{out}");
    Session::open(&server.endpoint(Transport::Ws), &carol).await.expect("connects once the ban is lifted");
    let (ok, out) = admin(&["unban", "+15552600003"]);
    assert!(ok && out.contains("was not banned"), "{out}");

    // The providers, tested: an SMS (no code in it) and a push to a device
    // that has no registration.
    let (ok, out) = admin(&["test-sms", "+15552600004"]);
    assert!(ok && out.contains("accepted a test message to +15552600004"), "{out}");
    let last = server.sms.sent.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last, ("+15552600004".to_owned(), String::new()), "sent there, with no code");
    let (ok, out) = admin(&["test-push", &carol.device_id.to_string()]);
    assert!(ok && out.contains("has no push registration"), "{out}");

    // A wrong token, or none: refused in words.
    let (ok, out) = skylark(&["admin", "--admin", &url, "--token", "wrong", "stats"]);
    assert!(!ok && out.contains("a valid admin token is needed"), "{out}");
    let (ok, out) = skylark(&["admin", "--admin", "http://127.0.0.1:1", "--token", "x", "stats"]);
    assert!(!ok && out.contains("cannot reach the admin API at http://127.0.0.1:1"), "{out}");
}

/// `[tracing] otlp_endpoint`: the real server exports a span per message
/// sent (request to durable ack, with its id), per forward to the
/// recipient's actor and per delivery to a device (with the same id), to an
/// OTLP/HTTP collector (a stand-in here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_each_message_reach_an_opentelemetry_collector() {
    use crate::crash::{ServerProcess, free_port, register, sms_gateway};
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let kept = received.clone();
    let collector = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                for resource in request["resourceSpans"].as_array().cloned().unwrap_or_default() {
                    for scope in resource["scopeSpans"].as_array().cloned().unwrap_or_default() {
                        kept.lock().unwrap().extend(scope["spans"].as_array().cloned().unwrap_or_default());
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, collector).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let http = free_port();
    let config = dir.path().join("skylark.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[listen]\nhttp = \"127.0.0.1:{http}\"\ntcp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
             [sms]\nprovider = \"http\"\nurl = \"http://{sms}/sms\"\n\
             [tracing]\notlp_endpoint = \"http://{otlp}\"\nservice_name = \"skylark-it\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let server = ServerProcess::start(&config, &dir.path().join("server.log"));
    let api = Api::new(&format!("http://127.0.0.1:{http}")).unwrap();
    let ids = register(&api, &["+15552700001", "+15552700002"], &mut codes).await;
    let endpoint = skylark_client::Endpoint::websocket_for(api.base(), false);
    let (alice, _events) = Session::open(&endpoint, &ids[0]).await.unwrap();
    let ack = alice.handle().send("+15552700002", "otlp-1", b"traced".to_vec()).await.unwrap();
    let seq = ack.id.unwrap().seq.to_string();
    // Bob's device connects and is handed the message.
    let (_bob, _bob_events) = Session::open(&endpoint, &ids[1]).await.unwrap();

    let spans = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let spans = received.lock().unwrap().clone();
            let has = |name: &str| spans.iter().any(|s| s["name"] == name);
            if has("message.send") && has("forward") && has("message.forward") && has("message.deliver") {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("spans did not arrive: {:?}", received.lock().unwrap()));
    server.kill();
    let attribute = |span: &Value, key: &str| {
        span["attributes"].as_array().unwrap().iter().find(|a| a["key"] == key).map(|a| a["value"].clone())
    };
    let send = spans.iter().find(|s| s["name"] == "message.send").unwrap();
    assert_eq!(attribute(send, "seq"), Some(json!({ "intValue": seq })), "{send}");
    assert_eq!(attribute(send, "account"), Some(json!({ "intValue": ids[0].account_id.to_string() })), "{send}");
    assert_eq!(attribute(send, "bytes"), Some(json!({ "intValue": "6" })), "{send}");
    let forward = spans.iter().find(|s| s["name"] == "forward").unwrap();
    assert_eq!(attribute(forward, "to"), Some(json!({ "stringValue": ids[1].account_id.to_string() })), "{forward}");
    // The message's id names it at every hop: accepted, then delivered.
    let id = format!("{}:{seq}", ids[0].account_id);
    assert_eq!(attribute(send, "message"), Some(json!({ "stringValue": id })), "{send}");
    let deliver = spans.iter().find(|s| s["name"] == "message.deliver").unwrap();
    assert_eq!(attribute(deliver, "message"), Some(json!({ "stringValue": id })), "{deliver}");
    assert_eq!(attribute(deliver, "account"), Some(json!({ "intValue": ids[1].account_id.to_string() })), "{deliver}");
    // And its spans are one trace, rooted at the send, though they ran in
    // the sender's connection, its actor's forward and the recipient's
    // connection.
    let hop = spans.iter().find(|s| s["name"] == "message.forward").unwrap();
    assert_eq!(attribute(hop, "message"), Some(json!({ "stringValue": id })), "{hop}");
    assert_eq!(attribute(hop, "attempts"), Some(json!({ "intValue": "1" })), "{hop}");
    for span in [hop, deliver] {
        assert_eq!(span["traceId"], send["traceId"], "one trace: {span}");
        assert_eq!(span["parentSpanId"], send["spanId"], "under the send: {span}");
    }
    assert_eq!(hop["links"][0]["spanId"], forward["spanId"], "the hop links to its batch's forward");
    // No content in any span.
    assert!(!serde_json::to_string(&spans).unwrap().contains("traced"), "no payload in the spans");
}
