//! Attachments over the real protocol and HTTP: tus uploads cut off and
//! resumed (also across a restart), downloads with ranges, who may fetch a
//! blob, sizes and quotas refused before storing, the client's digest
//! check, and the collector keeping exactly what is still referenced.

use crate::harness::{Peer, TestServer, Transport, test_config};
use skylark_client::ClientError;
use skylark_client::media::{FileError, Transfer, open, seal};
use skylark_client::session::{SendOptions, To};
use skylark_core::Clock;
use skylark_protocol::ErrorCode;
use skylark_protocol::v1::event::Body;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ALICE: &str = "+15552500001";
const BOB: &str = "+15552500002";
const CAROL: &str = "+15552500003";
const DAY_MS: u64 = 86_400_000;

fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut out = vec![0u8; n];
    rand::rng().fill_bytes(&mut out);
    out
}

async fn token(peer: &Peer) -> String {
    peer.handle().media_token().await.unwrap().token
}

/// One HTTP/1.1 request on a fresh socket, answered in full: (status, headers, body).
async fn http(server: &TestServer, request: String, body: &[u8]) -> (u16, String, Vec<u8>) {
    let addr = server.gateway.as_ref().unwrap().http_addr();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket.write_all(request.as_bytes()).await.unwrap();
    socket.write_all(body).await.unwrap();
    let mut raw = Vec::new();
    socket.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_ascii_lowercase(), raw[split + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

async fn send_file(from: &Peer, to: To<'_>, blob: &str, text: &str) -> Result<(), ClientError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = format!("media-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let options = SendOptions { attachments: vec![blob.to_owned()], ..Default::default() };
    from.handle().send_with(to, &id, text.as_bytes().to_vec(), options).await.map(|_| ())
}

fn files_in(dir: &std::path::Path) -> usize {
    walk(dir).len()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test]
async fn an_upload_cut_off_midway_resumes_and_only_its_recipient_can_fetch_it() {
    let server = TestServer::start().await;
    let alice = Peer::connect(&server, &server.register(ALICE).await, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &server.register(BOB).await, Transport::Ws).await;
    let carol = Peer::connect(&server, &server.register(CAROL).await, Transport::Tcp).await;
    let api = server.api();

    let plain = random_bytes(3 * 1024 * 1024 + 17);
    let sealed = seal(&plain);
    let alice_token = token(&alice).await;
    let transfer = Transfer::new(&api, &alice_token);
    let id = transfer.create(sealed.ciphertext.len() as u64).await.unwrap();

    // The first PATCH dies halfway: its connection closes mid-body.
    let half = sealed.ciphertext.len() / 2;
    let addr = server.gateway.as_ref().unwrap().http_addr();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PATCH /v1/uploads/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\nTus-Resumable: 1.0.0\r\n\
         Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {}\r\n\r\n",
        sealed.ciphertext.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    socket.write_all(&sealed.ciphertext[..half]).await.unwrap();
    socket.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(socket);
    // What arrived is kept (and reported only once durable).
    let mut kept = 0;
    for _ in 0..50 {
        kept = transfer.offset(&id).await.unwrap();
        if kept == half as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(kept, half as u64, "the bytes before the cut are kept");

    // The client resumes from there.
    let mut seen = Vec::new();
    transfer.resume(&id, &sealed.ciphertext, &mut |done, _| seen.push(done)).await.unwrap();
    assert_eq!(seen.first(), Some(&(half as u64)), "resumed from the server's offset, not from zero");
    assert_eq!(seen.last(), Some(&(sealed.ciphertext.len() as u64)));
    assert_eq!(transfer.offset(&id).await.unwrap(), sealed.ciphertext.len() as u64, "a finished upload says so");

    // Before it is sent, only Alice may read it.
    let bob_token = token(&bob).await;
    let refused = Transfer::new(&api, &bob_token).download(&id, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 403, .. }), "{refused}");
    assert!(refused.to_string().contains("not shared with you"), "{refused}");

    // Sent to Bob: his devices may read it; Carol still may not.
    send_file(&alice, To::Phone(BOB), &id, "a photo").await.unwrap();
    let got = bob.received(1, true).await;
    assert_eq!(&got[0].payload[..], b"a photo");
    let mut progress = 0;
    let downloaded = Transfer::new(&api, &bob_token).download(&id, &mut |done, _| progress = done).await.unwrap();
    assert_eq!(progress, sealed.ciphertext.len() as u64);
    let file = sealed.reference(&id, "photo.jpg", "image/jpeg", plain.len() as u64);
    assert_eq!(open(&file, &downloaded).unwrap(), plain, "Bob reads exactly what Alice sent");
    let carol_token = token(&carol).await;
    let refused = Transfer::new(&api, &carol_token).download(&id, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 403, .. }), "{refused}");

    // Without a token, or with a forged one: refused in words.
    let (status, head, body) =
        http(&server, format!("GET /v1/blobs/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), b"").await;
    assert_eq!(status, 401);
    assert_eq!(header(&head, "www-authenticate"), Some("bearer"));
    assert!(String::from_utf8_lossy(&body).contains("ask for a new one over your connection"));
    let mut forged = bob_token.clone().into_bytes();
    forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let refused = Transfer::new(&api, &forged).download(&id, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 401, .. }), "{refused}");

    // A range (206), served as opaque bytes; a range past the end (416).
    let (status, head, body) = http(
        &server,
        format!(
            "GET /v1/blobs/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob_token}\r\nRange: bytes=10-19\r\n\
             Connection: close\r\n\r\n"
        ),
        b"",
    )
    .await;
    assert_eq!(status, 206);
    assert_eq!(body, sealed.ciphertext[10..20]);
    assert_eq!(header(&head, "content-range"), Some(format!("bytes 10-19/{}", sealed.ciphertext.len()).as_str()));
    assert_eq!(header(&head, "content-type"), Some("application/octet-stream"));
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "content-disposition"), Some("attachment"));
    let (status, _, _) = http(
        &server,
        format!(
            "GET /v1/blobs/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob_token}\r\nRange: bytes=99999999-\r\n\
             Connection: close\r\n\r\n"
        ),
        b"",
    )
    .await;
    assert_eq!(status, 416);

    // A message naming a blob the sender cannot read is refused.
    let err = send_file(&carol, To::Phone(BOB), &id, "not mine").await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::InvalidArgument), "{err}");
    assert!(err.to_string().contains("not yours to share"), "{err}");
    // Forwarding: Bob received it, so he may share it on, without uploading again.
    send_file(&bob, To::Phone(CAROL), &id, "fwd").await.unwrap();
    let downloaded = Transfer::new(&api, &carol_token).download(&id, &mut |_, _| {}).await.unwrap();
    assert_eq!(open(&file, &downloaded).unwrap(), plain);
}

#[tokio::test]
async fn an_upload_resumes_across_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.media.dir = dir.path().to_owned();
    let mut server = TestServer::start_with(config.clone()).await;
    let identity = server.register(ALICE).await;
    let alice = Peer::connect(&server, &identity, Transport::Tcp).await;
    let sealed = seal(&random_bytes(100_000));
    let alice_token = token(&alice).await;
    let api = server.api();
    let transfer = Transfer::new(&api, &alice_token);
    let id = transfer.create(sealed.ciphertext.len() as u64).await.unwrap();
    let (status, head, _) = http(
        &server,
        format!(
            "PATCH /v1/uploads/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\n\
             Tus-Resumable: 1.0.0\r\nUpload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n\
             Content-Length: 40000\r\nConnection: close\r\n\r\n"
        ),
        &sealed.ciphertext[..40_000],
    )
    .await;
    assert_eq!(status, 204);
    assert_eq!(header(&head, "upload-offset"), Some("40000"));
    drop(alice);
    let store = server.store.clone();
    server.shutdown().await;

    // The same data (store and media directory), a new process's worth of server.
    let server = TestServer::start_on(config, store).await;
    let alice = Peer::connect(&server, &identity, Transport::Ws).await;
    let alice_token = token(&alice).await;
    let api = server.api();
    let transfer = Transfer::new(&api, &alice_token);
    assert_eq!(transfer.offset(&id).await.unwrap(), 40_000, "the offset survived the restart");
    transfer.resume(&id, &sealed.ciphertext, &mut |_, _| {}).await.unwrap();
    let back = transfer.download(&id, &mut |_, _| {}).await.unwrap();
    assert_eq!(back, sealed.ciphertext);
}

#[tokio::test]
async fn sizes_quotas_and_the_tus_rules_are_enforced_before_anything_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.media.dir = dir.path().to_owned();
    config.media.max_upload_bytes = 10_000;
    config.media.daily_quota_bytes = 25_000;
    let server = TestServer::start_with(config).await;
    let alice = Peer::connect(&server, &server.register(ALICE).await, Transport::Tcp).await;
    let alice_token = token(&alice).await;
    let before = files_in(dir.path());

    // Discovery.
    let (status, head, _) =
        http(&server, "OPTIONS /v1/uploads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into(), b"").await;
    assert_eq!(status, 204);
    assert_eq!(header(&head, "tus-version"), Some("1.0.0"));
    assert_eq!(header(&head, "tus-extension"), Some("creation"));
    assert_eq!(header(&head, "tus-max-size"), Some("10000"));

    let create = |length: u64, tus: bool| {
        let tus = if tus { "Tus-Resumable: 1.0.0\r\n" } else { "" };
        format!(
            "POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\n{tus}\
             Upload-Length: {length}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    // Too large: refused, nothing stored.
    let (status, head, body) = http(&server, create(10_001, true), b"").await;
    assert_eq!(status, 413);
    assert_eq!(header(&head, "tus-resumable"), Some("1.0.0"));
    assert!(String::from_utf8_lossy(&body).contains("the largest this server accepts is 10000 bytes"));
    assert_eq!(files_in(dir.path()), before, "an oversize upload stores nothing");
    // Without the tus version: 412.
    let (status, _, _) = http(&server, create(10, false), b"").await;
    assert_eq!(status, 412);

    // The daily quota: two uploads of 10,000 fit, a third does not.
    let api = server.api();
    let transfer = Transfer::new(&api, &alice_token);
    let id = transfer.create(10_000).await.unwrap();
    transfer.create(10_000).await.unwrap();
    let refused = transfer.create(10_000).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 429, retry_after_secs: Some(_), .. }), "{refused}");
    assert!(refused.to_string().contains("upload quota"), "{refused}");

    // A PATCH at the wrong offset (409), of the wrong type (415), past the length (400).
    let patch = |offset: u64, kind: &str, length: usize| {
        format!(
            "PATCH /v1/uploads/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\n\
             Tus-Resumable: 1.0.0\r\nUpload-Offset: {offset}\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n\
             Connection: close\r\n\r\n"
        )
    };
    let (status, _, body) = http(&server, patch(5, "application/offset+octet-stream", 3), b"abc").await;
    assert_eq!(status, 409);
    assert!(String::from_utf8_lossy(&body).contains("the upload is at byte 0, not 5"));
    let (status, _, _) = http(&server, patch(0, "application/json", 3), b"abc").await;
    assert_eq!(status, 415);
    let (status, _, body) =
        http(&server, patch(0, "application/offset+octet-stream", 10_001), &vec![7u8; 10_001]).await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("past the declared Upload-Length"));
    // A stranger's upload does not exist for Bob.
    let bob = Peer::connect(&server, &server.register(BOB).await, Transport::Tcp).await;
    let bob_token = token(&bob).await;
    let refused = Transfer::new(&api, &bob_token).offset(&id).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 404, .. }), "{refused}");
}

/// Uploads started faster than the server's limit per account are not
/// failed: the client waits as long as the server says (a few seconds) and
/// starts them then; a 1,024-device group's start uploads about 64 blobs
/// at once.
#[tokio::test]
async fn uploads_started_faster_than_the_limit_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.media.dir = dir.path().to_owned();
    config.media.uploads_per_account = skylark_server::config::Quota { burst: 1, per_ms: 1_000 };
    let server = TestServer::start_with(config).await;
    let alice = Peer::connect(&server, &server.register(ALICE).await, Transport::Tcp).await;
    let api = server.api();
    let alice_token = token(&alice).await;
    let transfer = Transfer::new(&api, &alice_token);
    let mut ids = Vec::new();
    for i in 0..3u8 {
        ids.push(transfer.upload(&[i; 100], &mut |_, _| {}).await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 3, "three blobs");
    // The limit is the server's still: a raw request past it is refused.
    let create = format!(
        "POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice_token}\r\nTus-Resumable: 1.0.0\r\n\
         Upload-Length: 10\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let (status, head, _) = http(&server, create, b"").await;
    assert_eq!(status, 429);
    assert_eq!(header(&head, "retry-after"), Some("1"));
}

#[tokio::test]
async fn the_client_refuses_a_file_whose_digest_does_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.media.dir = dir.path().to_owned();
    let server = TestServer::start_with(config).await;
    let alice = Peer::connect(&server, &server.register(ALICE).await, Transport::Tcp).await;
    let bob = Peer::connect(&server, &server.register(BOB).await, Transport::Tcp).await;
    let api = server.api();
    let plain = b"the real contract".repeat(100);
    let sealed = seal(&plain);
    let id = Transfer::new(&api, &token(&alice).await).upload(&sealed.ciphertext, &mut |_, _| {}).await.unwrap();
    send_file(&alice, To::Phone(BOB), &id, "contract").await.unwrap();
    // Someone with access to the server's disk changes the stored bytes.
    let stored = walk(dir.path()).into_iter().find(|p| p.ends_with(&id)).expect("the blob is a file in the media dir");
    let mut bytes = std::fs::read(&stored).unwrap();
    assert_eq!(bytes, sealed.ciphertext, "the server stores only the ciphertext");
    bytes[3] ^= 0x20;
    std::fs::write(&stored, &bytes).unwrap();
    let downloaded = Transfer::new(&api, &token(&bob).await).download(&id, &mut |_, _| {}).await.unwrap();
    let file = sealed.reference(&id, "contract.pdf", "application/pdf", plain.len() as u64);
    let refused = open(&file, &downloaded).unwrap_err();
    assert_eq!(refused, FileError::DigestMismatch);
    assert!(refused.to_string().contains("altered or damaged"), "{refused}");
}

#[tokio::test]
async fn the_collector_removes_expired_and_abandoned_blobs_and_nothing_still_referenced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.media.dir = dir.path().to_owned();
    let server = TestServer::start_with(config).await;
    let alice = Peer::connect(&server, &server.register(ALICE).await, Transport::Tcp).await;
    let bob = Peer::connect(&server, &server.register(BOB).await, Transport::Tcp).await;
    let carol = Peer::connect(&server, &server.register(CAROL).await, Transport::Tcp).await;
    let api = server.api();
    let upload = |bytes: Vec<u8>, token: String| {
        let api = server.api();
        async move { Transfer::new(&api, &token).upload(&bytes, &mut |_, _| {}).await.unwrap() }
    };
    let old = upload(random_bytes(5_000), token(&alice).await).await;
    let kept = upload(random_bytes(5_000), token(&alice).await).await;
    send_file(&alice, To::Phone(BOB), &old, "old").await.unwrap();
    send_file(&alice, To::Phone(BOB), &kept, "kept").await.unwrap();
    // An upload abandoned halfway.
    let abandoned = Transfer::new(&api, &token(&alice).await).create(5_000).await.unwrap();
    let never_sent = upload(random_bytes(1_000), token(&alice).await).await;

    // What crashes leave: a part file whose upload state was never written
    // (a crash inside the upload's creation), and a reference marker whose
    // blob never arrived (a crash between the two writes that finish one).
    let stray_part = dir.path().join("uploads").join("00000000000000000000000000000001.part");
    std::fs::write(&stray_part, b"half").unwrap();
    let stray_ref = dir.path().join("blobs").join("refs").join("00000000000000000000000000000002");
    std::fs::create_dir_all(&stray_ref).unwrap();
    std::fs::write(stray_ref.join(format!("a1-{}", server.clock.now_ms())), b"").unwrap();

    // Twenty days on, Bob forwards `kept` to Carol: it is referenced again.
    server.clock.advance_ms(20 * DAY_MS);
    send_file(&bob, To::Phone(CAROL), &kept, "still useful").await.unwrap();
    let done = server.server.collect_media().await.unwrap();
    assert_eq!(done.blobs, 0, "nothing is past its retention yet");
    assert_eq!(done.uploads, 2, "the upload abandoned 20 days ago is gone, and the stray part");
    assert!(!stray_part.exists());
    // `kept` has been shared with Bob twice (sent to him, then by him): one
    // marker per reader is left — Alice, Bob and Carol.
    let markers = std::fs::read_dir(dir.path().join("blobs").join("refs").join(&kept)).unwrap().count();
    assert_eq!(markers, 3, "older markers of the same reader are collected");
    assert!(walk(dir.path()).iter().all(|p| !p.to_string_lossy().contains(&abandoned)), "no trace of it remains");

    // Thirty-one days after the first messages: `old` and the never-sent
    // upload go; `kept`, referenced eleven days ago, stays and still reads.
    server.clock.advance_ms(11 * DAY_MS);
    let done = server.server.collect_media().await.unwrap();
    assert_eq!(done.blobs, 2);
    let bob_token = token(&bob).await;
    let gone = Transfer::new(&api, &bob_token).download(&old, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(gone, ClientError::Api { status: 404, .. }), "{gone}");
    let gone = Transfer::new(&api, &token(&alice).await).download(&never_sent, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(gone, ClientError::Api { status: 404, .. }), "{gone}");
    Transfer::new(&api, &token(&carol).await).download(&kept, &mut |_, _| {}).await.unwrap();
    // A re-share of the expired blob is refused: it must be uploaded again.
    let err = send_file(&alice, To::Phone(CAROL), &old, "again").await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::InvalidArgument), "{err}");

    // Past the forward's retention too: everything is gone, markers included.
    server.clock.advance_ms(20 * DAY_MS);
    let done = server.server.collect_media().await.unwrap();
    assert_eq!(done.blobs, 1);
    assert_eq!(files_in(dir.path()), 0, "{:?}", walk(dir.path()));
}

#[tokio::test]
async fn a_group_post_shares_its_file_with_the_members_and_a_removed_device_loses_access() {
    let server = TestServer::start().await;
    let alice = Peer::connect(&server, &server.register(ALICE).await, Transport::Tcp).await;
    let bob_identity = server.register(BOB).await;
    let mut bob = Peer::connect(&server, &bob_identity, Transport::Tcp).await;
    let carol = Peer::connect(&server, &server.register(CAROL).await, Transport::Tcp).await;
    let api = server.api();
    let group = alice.handle().create_group("Photos", &[BOB]).await.unwrap().id;
    let sealed = seal(b"holiday");
    let id = Transfer::new(&api, &token(&alice).await).upload(&sealed.ciphertext, &mut |_, _| {}).await.unwrap();
    send_file(&alice, To::Group(group), &id, "look").await.unwrap();
    loop {
        let event = bob.next_entry().await;
        if matches!(&event.body, Some(Body::Group(g)) if matches!(g.body, Some(skylark_protocol::v1::group_event::Body::Message(_))))
        {
            break;
        }
    }
    let bob_token = token(&bob).await;
    assert_eq!(Transfer::new(&api, &bob_token).download(&id, &mut |_, _| {}).await.unwrap(), sealed.ciphertext);
    let refused = Transfer::new(&api, &token(&carol).await).download(&id, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 403, .. }), "not a member: {refused}");

    // Bob's device is removed: the token it holds stops working at once.
    let bob_id = bob_identity.device_id;
    let now = server.clock.now_ms();
    assert!(
        server
            .store
            .remove_device(skylark_core::AccountId(bob_identity.account_id), skylark_core::DeviceId(bob_id), now)
            .await
            .unwrap()
    );
    let refused = Transfer::new(&api, &bob_token).download(&id, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 401, .. }), "{refused}");
    assert!(refused.to_string().contains("removed"), "{refused}");
}

/// A throwaway S3-compatible server: moto's (`moto_server`, from PyPI), on
/// a free loopback port, with one empty bucket; stopped when dropped.
struct S3Server {
    child: std::process::Child,
    endpoint: String,
}

const BUCKET: &str = "skylark-test";

impl S3Server {
    async fn start() -> S3Server {
        let port = crate::crash::free_port();
        let child = std::process::Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "the S3 test needs an S3-compatible server: moto's `moto_server` (pip install 'moto[server]'), \
                     which could not be started: {e}"
                )
            });
        let server = S3Server { child, endpoint: format!("http://127.0.0.1:{port}") };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "moto_server did not start listening on port {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, _) = server.call("PUT", &format!("/{BUCKET}")).await;
        assert_eq!(status, 200, "creating the test bucket");
        server
    }

    /// One request to the S3 server (moto checks no signatures): status and body.
    async fn call(&self, method: &str, path: &str) -> (u16, String) {
        let addr = self.endpoint.trim_start_matches("http://").to_owned();
        let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request =
            format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        socket.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, text)
    }

    /// The bucket's keys under `prefix`.
    async fn keys(&self, prefix: &str) -> Vec<String> {
        let (_, body) = self.call("GET", &format!("/{BUCKET}?list-type=2&prefix={prefix}")).await;
        body.split("<Key>").skip(1).filter_map(|s| s.split("</Key>").next()).map(str::to_owned).collect()
    }

    fn config(&self) -> skylark_server::media::S3Config {
        skylark_server::media::S3Config {
            bucket: BUCKET.to_owned(),
            endpoint: self.endpoint.clone(),
            region: "us-east-1".to_owned(),
            access_key_id: "test".to_owned(),
            secret_access_key: "test".to_owned(),
        }
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn the_s3_backend_stores_shares_serves_and_collects_blobs() {
    let s3 = S3Server::start().await;
    let staging = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.media.dir = staging.path().to_owned();
    config.media.s3 = Some(s3.config());
    let mut server = TestServer::start_with(config.clone()).await;
    let alice_identity = server.register(ALICE).await;
    let alice = Peer::connect(&server, &alice_identity, Transport::Tcp).await;
    let bob_identity = server.register(BOB).await;
    let api = server.api();

    // Half an upload, then a restart: the rest follows on the new server.
    let plain = random_bytes(9 * 1024 * 1024 + 5);
    let sealed = seal(&plain);
    let alice_token = token(&alice).await;
    let transfer = Transfer::new(&api, &alice_token);
    let id = transfer.create(sealed.ciphertext.len() as u64).await.unwrap();
    // Only the first chunk goes now (resuming with a prefix of the bytes).
    let first = &sealed.ciphertext[..skylark_client::media::CHUNK];
    transfer.resume(&id, first, &mut |_, _| {}).await.unwrap();
    assert_eq!(transfer.offset(&id).await.unwrap(), skylark_client::media::CHUNK as u64);
    assert!(s3.keys("blobs/").await.is_empty(), "nothing reaches the bucket before the upload is whole");
    drop(alice);
    let store = server.store.clone();
    server.shutdown().await;
    let server = TestServer::start_on(config, store).await;
    let api = server.api();
    let alice = Peer::connect(&server, &alice_identity, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_identity, Transport::Ws).await;
    let alice_token = token(&alice).await;
    Transfer::new(&api, &alice_token).resume(&id, &sealed.ciphertext, &mut |_, _| {}).await.unwrap();
    assert_eq!(s3.keys("blobs/").await, vec![format!("blobs/{id}")], "the finished blob is in the bucket");
    assert!(!walk(staging.path()).iter().any(|p| p.to_string_lossy().contains(&id)), "and no longer staged");

    // Shared with Bob, fetched whole and by range, checked and opened.
    send_file(&alice, To::Phone(BOB), &id, "big file").await.unwrap();
    bob.received(1, true).await;
    let bob_token = token(&bob).await;
    let downloaded = Transfer::new(&api, &bob_token).download(&id, &mut |_, _| {}).await.unwrap();
    let file = sealed.reference(&id, "big.bin", "application/octet-stream", plain.len() as u64);
    assert_eq!(open(&file, &downloaded).unwrap(), plain);
    let (status, _, body) = http(
        &server,
        format!(
            "GET /v1/blobs/{id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob_token}\r\nRange: bytes=-100\r\n\
             Connection: close\r\n\r\n"
        ),
        b"",
    )
    .await;
    assert_eq!(status, 206);
    assert_eq!(body, sealed.ciphertext[sealed.ciphertext.len() - 100..]);
    let carol = Peer::connect(&server, &server.register(CAROL).await, Transport::Tcp).await;
    let refused = Transfer::new(&api, &token(&carol).await).download(&id, &mut |_, _| {}).await.unwrap_err();
    assert!(matches!(refused, ClientError::Api { status: 403, .. }), "{refused}");

    // Past its retention, the collector empties the bucket.
    server.clock.advance_ms(29 * DAY_MS);
    assert_eq!(server.server.collect_media().await.unwrap().blobs, 0);
    server.clock.advance_ms(2 * DAY_MS);
    assert_eq!(server.server.collect_media().await.unwrap().blobs, 1);
    assert_eq!(s3.keys("").await, Vec::<String>::new(), "blob and markers are gone");
}
