//! Push wake-ups for offline devices, against a local stand-in push service.

use crate::harness::{EVENT_WAIT, Peer, TestServer, Transport, test_config};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use skylark_core::DeviceId;
use skylark_protocol::v1::{self, TypingState, register_push::Target};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// One request the stand-in push service received.
#[derive(Debug, Clone)]
struct Captured {
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

#[derive(Clone)]
struct PushService {
    tx: mpsc::UnboundedSender<Captured>,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

/// Answers 410 for paths starting "gone", 503 then 201 for "flaky", else 201.
async fn receive(
    State(s): State<PushService>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned())).collect();
    let _ = s.tx.send(Captured { path: name.clone(), headers, body: body.to_vec() });
    let n = {
        let mut hits = s.hits.lock().unwrap();
        let n = hits.entry(name.clone()).or_default();
        *n += 1;
        *n
    };
    if name.starts_with("gone") {
        StatusCode::GONE
    } else if name.starts_with("flaky") && n == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::CREATED
    }
}

async fn push_service() -> (String, mpsc::UnboundedReceiver<Captured>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let state = PushService { tx, hits: Arc::default() };
    let app = axum::Router::new().route("/push/{name}", post(receive)).with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, rx)
}

const DELAY_MS: u64 = 100;

async fn setup() -> (TestServer, String, mpsc::UnboundedReceiver<Captured>) {
    let (base, rx) = push_service().await;
    let mut config = test_config();
    config.push.delay_ms = DELAY_MS;
    config.push.retry_base_ms = 20;
    config.push.webhook_url = Some(format!("{base}/push/hook"));
    (TestServer::start_with(config).await, base, rx)
}

/// Waits for the next push request.
async fn next(rx: &mut mpsc::UnboundedReceiver<Captured>) -> Captured {
    tokio::time::timeout(EVENT_WAIT, rx.recv()).await.expect("no push arrived").unwrap()
}

/// Asserts that no further push arrives within several push delays.
async fn none_within_delays(rx: &mut mpsc::UnboundedReceiver<Captured>) {
    let extra = tokio::time::timeout(Duration::from_millis(DELAY_MS * 6), rx.recv()).await;
    assert!(extra.is_err(), "unexpected push: {extra:?}");
}

async fn register(peer: &Peer, target: Target) {
    peer.handle().register_push(Some(target)).await.unwrap();
}

#[tokio::test]
async fn a_burst_to_an_offline_device_makes_one_content_free_wake_up() {
    let (server, base, mut pushes) = setup().await;
    let alice_id = server.register("+15551200001").await;
    let bob_id = server.register("+15551200002").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    register(&alice, Target::UnifiedPush(v1::UnifiedPushTarget { endpoint: format!("{base}/push/alice") })).await;
    alice.session.close().await;

    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    for i in 0..10 {
        bob.handle().send("+15551200001", &format!("m{i}"), b"secret words".to_vec()).await.unwrap();
    }
    let push = next(&mut pushes).await;
    assert_eq!(push.path, "alice");
    assert_eq!(push.body, br#"{"type":"wake"}"#, "a wake-up carries no message content");
    none_within_delays(&mut pushes).await;
}

#[tokio::test]
async fn accounts_due_at_different_times_each_get_their_push_and_a_later_burst_another() {
    let (server, base, mut pushes) = setup().await;
    let alice_id = server.register("+15551200021").await;
    let carol_id = server.register("+15551200022").await;
    let bob_id = server.register("+15551200023").await;
    for (id, name) in [(&alice_id, "alice"), (&carol_id, "carol")] {
        let peer = Peer::connect(&server, id, Transport::Tcp).await;
        register(&peer, Target::UnifiedPush(v1::UnifiedPushTarget { endpoint: format!("{base}/push/{name}") })).await;
        peer.session.close().await;
    }
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551200021", "a1", b"one".to_vec()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(DELAY_MS / 2)).await;
    bob.handle().send("+15551200022", "c1", b"two".to_vec()).await.unwrap();
    assert_eq!(next(&mut pushes).await.path, "alice");
    assert_eq!(next(&mut pushes).await.path, "carol");
    // Once its push went out, a new message schedules another.
    bob.handle().send("+15551200021", "a2", b"three".to_vec()).await.unwrap();
    assert_eq!(next(&mut pushes).await.path, "alice");
    none_within_delays(&mut pushes).await;
}

#[tokio::test]
async fn online_devices_and_typing_cause_no_push() {
    let (server, base, mut pushes) = setup().await;
    let alice_id = server.register("+15551200011").await;
    let bob_id = server.register("+15551200012").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    register(&alice, Target::UnifiedPush(v1::UnifiedPushTarget { endpoint: format!("{base}/push/alice") })).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551200011", "m", b"hi".to_vec()).await.unwrap();
    none_within_delays(&mut pushes).await;

    alice.session.close().await;
    bob.handle().typing("+15551200011", TypingState::Composing).await.unwrap();
    bob.handle().ping().await.unwrap();
    none_within_delays(&mut pushes).await;
}

#[tokio::test]
async fn gone_subscriptions_are_removed_and_failures_retried() {
    let (server, base, mut pushes) = setup().await;
    let alice_id = server.register("+15551200021").await;
    let carol_id = server.register("+15551200023").await;
    let bob_id = server.register("+15551200022").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    register(&alice, Target::UnifiedPush(v1::UnifiedPushTarget { endpoint: format!("{base}/push/gone") })).await;
    alice.session.close().await;
    let carol = Peer::connect(&server, &carol_id, Transport::Tcp).await;
    register(&carol, Target::Webhook(v1::WebhookTarget { token: "fcm-token-1".into() })).await;
    carol.session.close().await;

    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551200021", "m", b"x".to_vec()).await.unwrap();
    assert_eq!(next(&mut pushes).await.path, "gone");
    // The 410 removes Alice's registration.
    let device = DeviceId(alice_id.device_id);
    let mut removed = false;
    for _ in 0..100 {
        if server.store.push_target(device).await.unwrap().is_none() {
            removed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(removed, "a 410 removes the registration");

    // The webhook gets the device's token; a 503 is retried.
    let carol_again = Peer::connect(&server, &carol_id, Transport::Tcp).await;
    register(&carol_again, Target::UnifiedPush(v1::UnifiedPushTarget { endpoint: format!("{base}/push/flaky") })).await;
    carol_again.session.close().await;
    bob.handle().send("+15551200023", "m2", b"y".to_vec()).await.unwrap();
    let first = next(&mut pushes).await;
    let second = next(&mut pushes).await;
    assert_eq!((first.path.as_str(), second.path.as_str()), ("flaky", "flaky"), "503, then the retry");
    assert!(server.store.push_target(DeviceId(carol_id.device_id)).await.unwrap().is_some());
}

#[tokio::test]
async fn webhook_targets_carry_the_device_token() {
    let (server, _base, mut pushes) = setup().await;
    let alice_id = server.register("+15551200031").await;
    let bob_id = server.register("+15551200032").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    register(&alice, Target::Webhook(v1::WebhookTarget { token: "apns-token-9".into() })).await;
    alice.session.close().await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551200031", "m", b"zebra-secret".to_vec()).await.unwrap();
    let push = next(&mut pushes).await;
    assert_eq!(push.path, "hook");
    let body: serde_json::Value = serde_json::from_slice(&push.body).unwrap();
    assert_eq!(body["token"], "apns-token-9");
    assert_eq!(body["device_id"], alice_id.device_id);
    assert_eq!(body["type"], "wake");
    assert!(!String::from_utf8_lossy(&push.body).contains("zebra-secret"), "no message content");
}

/// Runs the independent Node.js Web Push user agent.
fn node(args: &[&str]) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/webpush_ua.mjs");
    let out = std::process::Command::new("node").arg(script).args(args).output().unwrap_or_else(|e| {
        panic!("this test needs Node.js (`node` on PATH) as an independent RFC 8291 implementation: {e}")
    });
    assert!(out.status.success(), "webpush_ua.mjs failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn web_push_decrypts_with_an_independent_implementation_and_carries_vapid() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    let (server, base, mut pushes) = setup().await;
    let alice_id = server.register("+15551200041").await;
    let bob_id = server.register("+15551200042").await;

    let ua = node(&["keygen"]);
    let text = |k: &str| ua[k].as_str().unwrap().to_owned();
    let (p256dh, auth, private) = (text("p256dh"), text("auth"), text("private"));
    let endpoint = format!("{base}/push/webpush");
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let target = v1::WebPushTarget {
        endpoint: endpoint.clone(),
        p256dh: B64.decode(&p256dh).unwrap(),
        auth: B64.decode(&auth).unwrap(),
    };
    register(&alice, Target::WebPush(target)).await;
    alice.session.close().await;

    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551200041", "m", b"private".to_vec()).await.unwrap();
    let push = next(&mut pushes).await;
    assert_eq!(push.headers.get("content-encoding").map(String::as_str), Some("aes128gcm"));
    let authorization = push.headers.get("authorization").cloned().unwrap();
    let body = B64.encode(&push.body);
    let opened = tokio::task::spawn_blocking(move || {
        node(&["decrypt", &private, &p256dh, &auth, &body, &authorization, &endpoint])
    })
    .await
    .unwrap();
    assert_eq!(opened["plaintext"], r#"{"type":"wake"}"#);
    assert_eq!(opened["vapid"]["sub"], "mailto:admin@localhost");
    // The VAPID key is the one the server publishes for subscriptions.
    let (status, _, published) = server.api().raw("GET", "/v1/push/vapid", None).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(opened["key"], published["public_key"]);
}

#[tokio::test]
async fn bad_push_registrations_are_refused() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551200051").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let code = |r: Result<(), skylark_client::ClientError>| r.unwrap_err().error_code();
    let bad_url = Target::UnifiedPush(v1::UnifiedPushTarget { endpoint: "ftp://x".into() });
    assert_eq!(
        code(alice.handle().register_push(Some(bad_url)).await),
        Some(skylark_protocol::ErrorCode::InvalidArgument)
    );
    let bad_key = Target::WebPush(v1::WebPushTarget {
        endpoint: "http://127.0.0.1:1/p".into(),
        p256dh: vec![4; 65],
        auth: vec![0; 16],
    });
    assert_eq!(
        code(alice.handle().register_push(Some(bad_key)).await),
        Some(skylark_protocol::ErrorCode::InvalidArgument)
    );
    // No webhook configured on this server.
    let hook = Target::Webhook(v1::WebhookTarget { token: "t".into() });
    assert_eq!(
        code(alice.handle().register_push(Some(hook)).await),
        Some(skylark_protocol::ErrorCode::InvalidArgument)
    );
    assert!(server.store.push_target(DeviceId(alice_id.device_id)).await.unwrap().is_none());
}
