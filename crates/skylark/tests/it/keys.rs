//! End-to-end encryption's key directory over the real protocol: devices
//! publish MLS key packages, another account claims one of every device
//! (each one-time package once, oldest first, then the last-resort one),
//! bad uploads are refused in words with nothing stored, claims are
//! rate-limited, and a removed device's packages go with it.

use crate::harness::{Peer, TestServer, Transport, test_config};
use bytes::Bytes;
use skylark_client::ClientError;
use skylark_core::keys::{MAX_KEY_PACKAGE_BYTES, MAX_KEY_PACKAGES_PER_DEVICE, MAX_KEY_PACKAGES_PER_UPLOAD};
use skylark_protocol::ErrorCode;
use skylark_protocol::v1::ClaimedKeyPackages;

fn package(tag: &str) -> Bytes {
    Bytes::from(format!("key-package-{tag}").into_bytes())
}

/// (device, package, last resort) of each device in a claim.
fn claimed(c: &ClaimedKeyPackages) -> Vec<(u64, Bytes, bool)> {
    c.devices.iter().map(|d| (d.device_id, d.key_package.clone(), d.last_resort)).collect()
}

fn refused(result: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Refused { code, message, .. }) => (code, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn key_packages_are_published_claimed_once_and_go_with_their_device() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551700001").await;
    let bob_id = server.register("+15551700002").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let laptop_id = crate::devices::link(&server, &alice, "laptop").await;
    // The JSON mapping too: packages travel as base64 there.
    let laptop = Peer::connect(&server, &laptop_id, Transport::WsJson).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    let (phone_dev, laptop_dev) = (alice_id.device_id, laptop_id.device_id);

    let stock = alice.handle().key_package_stock().await.unwrap();
    assert_eq!(
        (stock.available, stock.has_last_resort, stock.replenish_below, stock.max_available),
        (0, false, 20, MAX_KEY_PACKAGES_PER_DEVICE)
    );
    let stock =
        alice.handle().upload_key_packages(vec![package("p1"), package("p2")], Some(package("p-last"))).await.unwrap();
    assert_eq!((stock.available, stock.has_last_resort), (2, true));
    let stock = laptop.handle().upload_key_packages(vec![package("l1")], None).await.unwrap();
    assert_eq!((stock.available, stock.has_last_resort), (1, false));

    // Bob claims Alice's number (written any way a person writes it): one
    // package of each of her devices, in device order, oldest first.
    let first = bob.handle().claim_key_packages("+1 555 170 0001").await.unwrap();
    assert_eq!((first.account_id, first.phone.as_str()), (alice_id.account_id, "+15551700001"));
    assert_eq!(claimed(&first), vec![(phone_dev, package("p1"), false), (laptop_dev, package("l1"), false)]);
    let second = bob.handle().claim_key_packages("+15551700001").await.unwrap();
    assert_eq!(claimed(&second), vec![(phone_dev, package("p2"), false), (laptop_dev, Bytes::new(), false)]);
    // The stock is empty: the last-resort package, again and again.
    for _ in 0..2 {
        let next = bob.handle().claim_key_packages("+15551700001").await.unwrap();
        assert_eq!(claimed(&next), vec![(phone_dev, package("p-last"), true), (laptop_dev, Bytes::new(), false)]);
    }
    let stock = alice.handle().key_package_stock().await.unwrap();
    assert_eq!((stock.available, stock.has_last_resort), (0, true));

    // A device claiming its own number gets its account's other devices.
    laptop.handle().upload_key_packages(vec![package("l2")], None).await.unwrap();
    let own = alice.handle().claim_key_packages("+15551700001").await.unwrap();
    assert_eq!(claimed(&own), vec![(laptop_dev, package("l2"), false)]);

    // Refusals say what is wrong, and store nothing.
    let (code, message) = refused(bob.handle().claim_key_packages("+15559999999").await);
    assert_eq!(code, ErrorCode::UnknownRecipient);
    assert_eq!(message, "no account has that phone number");
    let (code, _) = refused(bob.handle().claim_key_packages("not a number").await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    let big = Bytes::from(vec![7u8; MAX_KEY_PACKAGE_BYTES + 1]);
    let (code, message) = refused(alice.handle().upload_key_packages(vec![package("ok"), big], None).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("exceeds the limit of 8192 bytes"), "{message}");
    let many: Vec<Bytes> = (0..=MAX_KEY_PACKAGES_PER_UPLOAD).map(|i| package(&format!("m{i}"))).collect();
    let (code, message) = refused(alice.handle().upload_key_packages(many, None).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("at most 100 are accepted at a time"), "{message}");
    assert_eq!(alice.handle().key_package_stock().await.unwrap().available, 0, "nothing of a refused upload kept");
    for round in 0..2 {
        let batch: Vec<Bytes> = (0..100).map(|i| package(&format!("full{round}-{i}"))).collect();
        alice.handle().upload_key_packages(batch, None).await.unwrap();
    }
    let (code, message) = refused(alice.handle().upload_key_packages(vec![package("one-more")], None).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("already holds 200 unclaimed key packages"), "{message}");

    // Alice removes her laptop: nobody can claim it any more.
    alice.handle().remove_device(laptop_dev).await.unwrap();
    let after = bob.handle().claim_key_packages("+15551700001").await.unwrap();
    assert_eq!(claimed(&after), vec![(phone_dev, package("full0-0"), false)]);
}

#[tokio::test]
async fn claims_are_rate_limited_per_device() {
    let mut config = test_config();
    config.rate_limits.key_claims_per_device = skylark_server::config::Quota { burst: 2, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15551700011").await;
    let bob_id = server.register("+15551700012").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    alice.handle().upload_key_packages(vec![package("a"), package("b"), package("c")], None).await.unwrap();
    for _ in 0..2 {
        bob.handle().claim_key_packages("+15551700011").await.unwrap();
    }
    match bob.handle().claim_key_packages("+15551700011").await {
        Err(ClientError::Refused { code, message, retry_after_ms }) => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(retry_after_ms > 50_000, "{retry_after_ms}");
            assert!(message.starts_with("too many key package requests; try again in"), "{message}");
        }
        other => panic!("expected a rate limit, got {other:?}"),
    }
    assert_eq!(alice.handle().key_package_stock().await.unwrap().available, 1, "a refused claim takes nothing");
}

/// Several numbers in one claim: one answer per number in the order asked,
/// one package of each device taken, each number charged to the rate
/// limit; a claim naming an unknown number, a number twice, or too many
/// numbers is refused in words and takes nothing.
#[tokio::test]
async fn several_numbers_are_claimed_in_one_request_all_or_nothing() {
    let mut config = test_config();
    config.rate_limits.key_claims_per_device = skylark_server::config::Quota { burst: 4, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15551700021").await;
    let bob_id = server.register("+15551700022").await;
    let carol_id = server.register("+15551700023").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let bob = Peer::connect(&server, &bob_id, Transport::WsJson).await;
    let carol = Peer::connect(&server, &carol_id, Transport::Ws).await;
    alice.handle().upload_key_packages(vec![package("a1"), package("a2")], None).await.unwrap();
    bob.handle().upload_key_packages(vec![package("b1"), package("b2")], None).await.unwrap();
    let phones = |list: &[&str]| list.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>();

    let (code, message) =
        refused(carol.handle().claim_key_packages_of(&phones(&["+15551700022", "+15559999999"])).await);
    assert_eq!(code, ErrorCode::UnknownRecipient);
    assert_eq!(message, "no account has the phone number +15559999999; nothing was claimed");
    let (code, message) =
        refused(carol.handle().claim_key_packages_of(&phones(&["+15551700022", "+1 555 170 0022"])).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("named +15551700022 twice"), "{message}");
    let too_many: Vec<String> = (0..51).map(|i| format!("+1555180{i:04}")).collect();
    let (code, message) = refused(carol.handle().claim_key_packages_of(&too_many).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("from 1 to 50 phone numbers"), "{message}");
    for (who, stock) in [(&alice, 2), (&bob, 2)] {
        assert_eq!(who.handle().key_package_stock().await.unwrap().available, stock, "a refused claim takes nothing");
    }

    // Bob before Alice, as asked; one package each, oldest first.
    let answers = carol.handle().claim_key_packages_of(&phones(&["+15551700022", "+15551700021"])).await.unwrap();
    let accounts: Vec<u64> = answers.iter().map(|c| c.account_id).collect();
    assert_eq!(accounts, vec![bob_id.account_id, alice_id.account_id]);
    assert_eq!(claimed(&answers[0]), vec![(bob_id.device_id, package("b1"), false)]);
    assert_eq!(claimed(&answers[1]), vec![(alice_id.device_id, package("a1"), false)]);
    // Each number is charged as one claim, the unknown one's too (so the
    // directory cannot be probed for free): with a burst of 4, the claim
    // naming an unknown number took 2 and this one 2; one more is refused.
    let (code, _) = refused(carol.handle().claim_key_packages("+15551700021").await);
    assert_eq!(code, ErrorCode::RateLimited);
    // A claim naming more numbers than the burst could ever hold says so.
    let mut config = test_config();
    config.rate_limits.key_claims_per_device = skylark_server::config::Quota { burst: 1, per_ms: 1 };
    let strict = TestServer::start_with(config).await;
    let dave_id = strict.register("+15551700024").await;
    strict.register("+15551700025").await;
    strict.register("+15551700026").await;
    let dave = Peer::connect(&strict, &dave_id, Transport::Tcp).await;
    let (code, message) =
        refused(dave.handle().claim_key_packages_of(&phones(&["+15551700025", "+15551700026"])).await);
    assert_eq!(code, ErrorCode::InvalidArgument);
    assert!(message.contains("more than this server's rate limit allows at once"), "{message}");
}
