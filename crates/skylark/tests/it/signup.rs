//! Phone sign-up through the HTTP API.

use crate::harness::{ALL_TRANSPORTS, TestServer, test_config};
use skylark_client::identity::generate_key;
use skylark_client::{ClientError, Session};
use skylark_server::config::Quota;

fn api_error(e: ClientError) -> (u16, String, Option<u64>, serde_json::Value) {
    match e {
        ClientError::Api { status, error, retry_after_secs, body, .. } => (status, error, retry_after_secs, body),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn sign_up_then_authenticate_over_every_transport() {
    let server = TestServer::start().await;
    let identity = server.register("+1 (555) 010-0001").await;
    assert_eq!(identity.phone, "+15550100001", "the number is normalised to E.164");
    for transport in ALL_TRANSPORTS {
        let (session, _events) = Session::open(&server.endpoint(transport), &identity).await.unwrap();
        assert_eq!(session.info.account_id, identity.account_id, "{transport:?}");
        let me = session.who_am_i().await.unwrap();
        assert_eq!(me.phone, "+15550100001");
        assert_eq!(me.device_id, identity.device_id);
        assert_eq!(me.device_name, "test");
        session.close().await;
    }
}

#[tokio::test]
async fn wrong_codes_count_down_then_lock_the_code() {
    let server = TestServer::start().await;
    let api = server.api();
    let session = api.start_verification("+15550100002").await.unwrap();
    let right = server.sms.last_code("+15550100002");
    let wrong = if right == "000000" { "111111" } else { "000000" };
    let key = generate_key().verifying_key().to_bytes();
    for left in (1..5).rev() {
        let (status, error, _, body) = api_error(api.verify(&session.session_id, wrong, &key, "x").await.unwrap_err());
        assert_eq!((status, error.as_str()), (400, "wrong_code"));
        assert_eq!(body["attempts_left"], left);
    }
    let (status, error, ..) = api_error(api.verify(&session.session_id, wrong, &key, "x").await.unwrap_err());
    assert_eq!((status, error.as_str()), (410, "attempts_exhausted"));
    // The right code no longer helps, and no account was made.
    let (status, error, ..) = api_error(api.verify(&session.session_id, &right, &key, "x").await.unwrap_err());
    assert_eq!((status, error.as_str()), (410, "attempts_exhausted"));
    let phone = skylark_core::PhoneNumber::parse("+15550100002").unwrap();
    assert_eq!(server.store.account_by_phone(&phone).await.unwrap(), None);
}

#[tokio::test]
async fn codes_expire_after_ten_minutes() {
    let server = TestServer::start().await;
    let api = server.api();
    let session = api.start_verification("+15550100003").await.unwrap();
    assert_eq!(session.code_expires_in_ms, 10 * 60_000);
    let code = server.sms.last_code("+15550100003");
    server.clock.advance_ms(10 * 60_000 + 1);
    let key = generate_key().verifying_key().to_bytes();
    let (status, error, ..) = api_error(api.verify(&session.session_id, &code, &key, "x").await.unwrap_err());
    assert_eq!((status, error.as_str()), (410, "code_expired"));
}

#[tokio::test]
async fn resend_waits_its_turn_and_replaces_the_code() {
    let server = TestServer::start().await;
    let api = server.api();
    let session = api.start_verification("+15550100004").await.unwrap();
    let first = server.sms.last_code("+15550100004");

    let (status, error, retry_after, _) = api_error(api.resend(&session.session_id).await.unwrap_err());
    assert_eq!((status, error.as_str()), (429, "resend_too_soon"));
    assert_eq!(retry_after, Some(30));

    server.clock.advance_ms(30_000);
    api.resend(&session.session_id).await.unwrap();
    let second = server.sms.last_code("+15550100004");
    assert_eq!(server.sms.count(), 2);

    let key = generate_key();
    if first != second {
        let (_, error, ..) =
            api_error(api.verify(&session.session_id, &first, &key.verifying_key().to_bytes(), "x").await.unwrap_err());
        assert_eq!(error, "wrong_code", "the old code died with the resend");
    }
    api.verify(&session.session_id, &second, &key.verifying_key().to_bytes(), "x").await.unwrap();
    // A verified session is consumed.
    let (status, error, ..) = api_error(api.verification(&session.session_id).await.unwrap_err());
    assert_eq!((status, error.as_str()), (404, "unknown_session"));
}

#[tokio::test]
async fn starting_a_session_does_not_reveal_existing_accounts() {
    let server = TestServer::start().await;
    server.register("+15550100005").await;
    let api = server.api();
    let (s1, _, _) = api.raw("POST", "/v1/verification", Some(br#"{"phone":"+15550100005"}"#.to_vec())).await.unwrap();
    let (s2, _, fresh) =
        api.raw("POST", "/v1/verification", Some(br#"{"phone":"+15550100006"}"#.to_vec())).await.unwrap();
    let (_, _, existing) =
        api.raw("POST", "/v1/verification", Some(br#"{"phone":"+15550100005"}"#.to_vec())).await.unwrap();
    assert_eq!((s1, s2), (200, 200));
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&existing), keys(&fresh));
    assert_eq!(existing["sms"], fresh["sms"]);
    assert_eq!(existing["next_resend_in_ms"], fresh["next_resend_in_ms"]);
}

#[tokio::test]
async fn bad_requests_get_precise_errors() {
    let server = TestServer::start().await;
    let api = server.api();
    let (status, _, body) =
        api.raw("POST", "/v1/verification", Some(br#"{"phone":"5551234"}"#.to_vec())).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_phone")));
    let (status, _, body) = api.raw("POST", "/v1/verification", Some(b"{nope".to_vec())).await.unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("malformed_request")));
    let (status, _, body) = api
        .raw("POST", "/v1/verification/nope/verify", Some(br#"{"code":"1","public_key":"AAAA"}"#.to_vec()))
        .await
        .unwrap();
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_public_key")));
    let key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    let body_text = format!(r#"{{"code":"1","public_key":"{key}"}}"#);
    let (status, _, body) =
        api.raw("POST", "/v1/verification/nope/verify", Some(body_text.into_bytes())).await.unwrap();
    assert!(status == 400 || status == 404, "{status} {body}");
    let (status, _, body) = api.raw("POST", "/v1/verification", Some(vec![b' '; 64 * 1024])).await.unwrap();
    assert_eq!(status, 413, "bodies over the limit are refused");
    // In the API's own error shape, like every other refusal.
    assert_eq!(body["error"].as_str(), Some("too_large"), "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("bytes")), "{body}");
}

#[tokio::test]
async fn sms_rate_limit_per_number_answers_retry_after() {
    let mut config = test_config();
    config.rate_limits.sms_per_number = Quota { burst: 2, per_ms: 3_600_000 };
    let server = TestServer::start_with(config).await;
    let api = server.api();
    api.start_verification("+15550100007").await.unwrap();
    api.start_verification("+15550100007").await.unwrap();
    let (status, error, retry_after, body) = api_error(api.start_verification("+15550100007").await.unwrap_err());
    assert_eq!((status, error.as_str()), (429, "rate_limited"));
    let retry_after = retry_after.expect("Retry-After header");
    assert!((3_000..=3_600).contains(&retry_after), "{retry_after}");
    assert!(body["retry_after_ms"].as_u64().unwrap() > 3_000_000);
    assert_eq!(server.sms.count(), 2, "no SMS for the refused request");
    // Another number is not affected.
    api.start_verification("+15550100008").await.unwrap();
}

#[tokio::test]
async fn sms_rate_limit_per_ip_and_per_prefix() {
    let mut config = test_config();
    config.rate_limits.sms_per_ip = Quota { burst: 3, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let api = server.api();
    for n in 0..3 {
        api.start_verification(&format!("+1555020000{n}")).await.unwrap();
    }
    let (status, _, retry_after, body) = api_error(api.start_verification("+15550300000").await.unwrap_err());
    assert_eq!(status, 429);
    assert!(retry_after.is_some());
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("too many codes were asked for from this address; try again in"), "{body}");

    let mut config = test_config();
    config.rate_limits.sms_per_prefix = Quota { burst: 2, per_ms: 60_000 };
    config.rate_limits.prefix_digits = 6;
    let server = TestServer::start_with(config).await;
    let api = server.api();
    api.start_verification("+447700900001").await.unwrap();
    api.start_verification("+447700900002").await.unwrap();
    let (status, _, _, body) = api_error(api.start_verification("+447700900003").await.unwrap_err());
    assert_eq!(status, 429);
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("too many codes were sent to numbers that start like this one"), "{body}");
    api.start_verification("+447800900003").await.expect("another prefix is fine");
}

#[tokio::test]
async fn code_checks_are_rate_limited_per_number() {
    let mut config = test_config();
    config.rate_limits.checks_per_number = Quota { burst: 3, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let api = server.api();
    let key = generate_key().verifying_key().to_bytes();
    // Two sessions for one number share the per-number budget.
    let a = api.start_verification("+15550100009").await.unwrap();
    let b = api.start_verification("+15550100009").await.unwrap();
    api.verify(&a.session_id, "000001", &key, "x").await.unwrap_err();
    api.verify(&a.session_id, "000002", &key, "x").await.unwrap_err();
    api.verify(&b.session_id, "000003", &key, "x").await.unwrap_err();
    let (status, error, retry_after, _) = api_error(api.verify(&b.session_id, "000004", &key, "x").await.unwrap_err());
    assert_eq!((status, error.as_str()), (429, "rate_limited"));
    assert!(retry_after.is_some());
}

#[tokio::test]
async fn a_failing_sms_provider_is_reported_retried_and_loses_nothing() {
    use std::sync::atomic::Ordering;
    let server = TestServer::start().await;
    let api = server.api();
    server.sms.down.store(true, Ordering::SeqCst);
    let session = api.start_verification("+15550100010").await.unwrap();
    assert_eq!(session.sms.status, "failed");
    assert!(session.sms.error.as_deref().unwrap().contains("unreachable"), "{:?}", session.sms);
    assert_eq!(server.sms.attempts.load(Ordering::SeqCst), 3, "retried before giving up");
    // The session survived the failure: it can be read and resent.
    assert_eq!(api.verification(&session.session_id).await.unwrap().sms.status, "failed");
    server.sms.down.store(false, Ordering::SeqCst);
    server.clock.advance_ms(30_000);
    let resent = api.resend(&session.session_id).await.unwrap();
    assert_eq!(resent.sms.status, "sent");
    let code = server.sms.last_code("+15550100010");
    let key = generate_key();
    api.verify(&session.session_id, &code, &key.verifying_key().to_bytes(), "x").await.unwrap();
}
