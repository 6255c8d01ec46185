//! Two-step verification (the registration lock), over the real API: a
//! PIN set on a device guards the number's sign-up, wrong guesses wait and
//! then lock out, and the lock lapses once the account goes unused.

use crate::harness::{Peer, TestServer, Transport, test_config};
use skylark_client::ClientError;
use skylark_client::identity::generate_key;
use skylark_protocol::{CloseCode, ErrorCode};

const DAY: u64 = 86_400_000;

/// A server whose codes outlive the clock jumps these tests make.
async fn server() -> TestServer {
    let mut config = test_config();
    config.verification.code_ttl_ms = 60 * DAY;
    TestServer::start_with(config).await
}

fn api_error(e: ClientError) -> (u16, String, serde_json::Value, Option<u64>) {
    match e {
        ClientError::Api { status, error, body, retry_after_secs, .. } => (status, error, body, retry_after_secs),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Someone with the SMS code (a new phone, or a thief with the SIM) tries to
/// register `phone`: the session and its right code.
async fn code_for(server: &TestServer, phone: &str) -> (String, String) {
    let session = server.api().start_verification(phone).await.unwrap();
    (session.session_id, server.sms.last_code(phone))
}

#[tokio::test]
async fn a_pin_guards_the_number_wrong_guesses_wait_then_lock_out() {
    let server = server().await;
    let phone = "+15552200001";
    let owner_id = server.register(phone).await;
    let mut owner = Peer::connect(&server, &owner_id, Transport::Tcp).await;
    let status = owner.handle().pin_status().await.unwrap();
    assert!(!status.enabled);
    assert_eq!(status.lapse_ms, 7 * DAY);
    let refused = owner.handle().set_pin(Some("12")).await.unwrap_err();
    assert_eq!(refused.error_code(), Some(ErrorCode::InvalidArgument));
    assert!(refused.to_string().contains("6 digits"), "{refused}");
    let status = owner.handle().set_pin(Some("246810")).await.unwrap();
    assert!(status.enabled && status.set_at_ms > 0);
    assert!(owner.handle().pin_status().await.unwrap().enabled);

    let api = server.api();
    let key = generate_key().verifying_key().to_bytes();
    let (session, code) = code_for(&server, phone).await;
    // The right code alone is not enough, and the session stays usable.
    let (status, error, body, _) = api_error(api.verify(&session, &code, &key, "new").await.unwrap_err());
    assert_eq!((status, error.as_str()), (423, "registration_locked"));
    assert!(body["message"].as_str().unwrap().contains("PIN"), "{body}");
    // Three wrong guesses cost nothing but the attempts; then waits grow.
    for left in [9, 8] {
        let (status, error, body, retry) =
            api_error(api.verify_with_pin(&session, &code, &key, "new", Some("000000")).await.unwrap_err());
        assert_eq!(
            (status, error.as_str(), body["attempts_left"].as_u64(), retry),
            (403, "wrong_pin", Some(left), None)
        );
    }
    // A malformed PIN is a wrong one too (it is never hashed).
    let (_, error, body, retry) =
        api_error(api.verify_with_pin(&session, &code, &key, "new", Some("abc")).await.unwrap_err());
    assert_eq!((error.as_str(), body["attempts_left"].as_u64(), retry), ("wrong_pin", Some(7), Some(60)));
    assert!(body["message"].as_str().unwrap().contains("7 attempts left"), "{body}");
    // Too soon: not even checked (the right PIN would not help now).
    let (status, error, _, retry) =
        api_error(api.verify_with_pin(&session, &code, &key, "new", Some("246810")).await.unwrap_err());
    assert_eq!((status, error.as_str(), retry), (429, "pin_wait", Some(60)));
    let mut wait_ms = 60_000;
    for left in (0..7).rev() {
        server.clock.advance_ms(wait_ms);
        let (_, error, body, retry) =
            api_error(api.verify_with_pin(&session, &code, &key, "new", Some("999999")).await.unwrap_err());
        assert_eq!((error.as_str(), body["attempts_left"].as_u64()), ("wrong_pin", Some(left)));
        wait_ms = retry.unwrap_or(0) * 1000;
        if left > 0 {
            assert!(wait_ms >= 60_000, "waits grow: {retry:?}");
        }
    }
    // Ten wrong: locked out, whatever the wait, even for the right PIN.
    server.clock.advance_ms(2 * DAY);
    let (status, error, body, _) =
        api_error(api.verify_with_pin(&session, &code, &key, "new", Some("246810")).await.unwrap_err());
    assert_eq!((status, error.as_str()), (423, "pin_locked"), "{body}");
    // The owner's device never noticed, and is still signed in.
    owner.handle().ping().await.unwrap();
    let count = server.store.pin(skylark_core::AccountId(owner_id.account_id)).await.unwrap().unwrap().failures;
    assert_eq!(count, 10, "counted on the account, not the session");

    // The owner sets a new PIN: the count starts again, and their new phone
    // registers with it — keeping the PIN, and signing out the old device.
    owner.handle().set_pin(Some("135790")).await.unwrap();
    let registered = api.verify_with_pin(&session, &code, &key, "new", Some("135790")).await.unwrap();
    assert_eq!(registered.account_id, owner_id.account_id, "the same account");
    loop {
        match tokio::time::timeout(crate::harness::EVENT_WAIT, owner.events.recv()).await.expect("timed out") {
            Some(skylark_client::session::Event::Closed { code, .. }) => {
                assert_eq!(code, Some(CloseCode::DeviceRemoved));
                break;
            }
            Some(_) => continue,
            None => panic!("ended without a close"),
        }
    }
    let record = server.store.pin(skylark_core::AccountId(owner_id.account_id)).await.unwrap().unwrap();
    assert_eq!(record.failures, 0);
    assert!(!record.hash.contains("135790"), "stored as a hash");
    assert!(record.hash.starts_with("$argon2id$"), "{}", record.hash);
}

#[tokio::test]
async fn the_lock_lapses_once_the_account_goes_unused_and_the_pin_goes_with_it() {
    let server = server().await;
    let phone = "+15552200002";
    let owner_id = server.register(phone).await;
    let owner = Peer::connect(&server, &owner_id, Transport::Ws).await;
    owner.handle().set_pin(Some("112233")).await.unwrap();
    let api = server.api();
    let key = generate_key().verifying_key().to_bytes();

    // Connected: in use, however long it has been.
    server.clock.advance_ms(30 * DAY);
    let (session, code) = code_for(&server, phone).await;
    let (_, error, ..) = api_error(api.verify(&session, &code, &key, "new").await.unwrap_err());
    assert_eq!(error, "registration_locked");

    owner.session.close().await;
    // The server has seen it go (its last-seen time is taken then, and the
    // clock must not jump before that).
    let account = skylark_core::AccountId(owner_id.account_id);
    while server.server.presence.is_online(account) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // Six days unused: still locked.
    server.clock.advance_ms(6 * DAY);
    let (_, error, ..) = api_error(api.verify(&session, &code, &key, "new").await.unwrap_err());
    assert_eq!(error, "registration_locked");
    // Past seven: the SMS code alone registers the number, and the old PIN
    // is gone (a new owner of the number does not inherit it).
    server.clock.advance_ms(2 * DAY);
    let registered = api.verify(&session, &code, &key, "new").await.unwrap();
    assert_eq!(registered.account_id, owner_id.account_id);
    assert_eq!(server.store.pin(skylark_core::AccountId(owner_id.account_id)).await.unwrap(), None);
}
