//! The behaviour every [`Store`](crate::Store) backend must show.
//!
//! Each backend's tests call [`run_all`] on a fresh, empty store. The checks
//! follow the contracts written on the trait methods.

use crate::Store;
use skylark_core::verification::VerificationSession;
use skylark_core::{DeviceId, NewDevice, PhoneNumber};

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).expect("test phone numbers are valid")
}

/// Runs every conformance check against an empty store.
pub async fn run_all(store: &dyn Store) {
    registration_creates_then_takes_over(store).await;
    verification_sessions(store).await;
    server_id_is_stable(store).await;
}

async fn registration_creates_then_takes_over(store: &dyn Store) {
    let alice = phone("+15550001000");
    assert_eq!(store.account_by_phone(&alice).await.expect("read"), None);

    let first =
        store.register(&alice, NewDevice { public_key: [1; 32], name: "phone".into() }, 100).await.expect("register");
    assert!(first.created);
    assert!(first.removed_devices.is_empty());
    assert_eq!(first.account.phone, alice);
    assert_eq!(store.account_by_phone(&alice).await.expect("read"), Some(first.account.clone()));
    assert_eq!(store.account(first.account.id).await.expect("read"), Some(first.account.clone()));
    assert_eq!(store.active_devices(first.account.id).await.expect("read"), vec![first.device.clone()]);

    // Another number gets another account and device.
    let bob = store
        .register(&phone("+15550002000"), NewDevice { public_key: [2; 32], name: "b".into() }, 150)
        .await
        .expect("register");
    assert_ne!(bob.account.id, first.account.id);
    assert_ne!(bob.device.id, first.device.id);

    // Re-verifying the number takes the account over: same account, old device removed.
    let second = store
        .register(&alice, NewDevice { public_key: [3; 32], name: "new phone".into() }, 200)
        .await
        .expect("takeover");
    assert!(!second.created);
    assert_eq!(second.account.id, first.account.id);
    assert_eq!(second.removed_devices, vec![first.device.id]);
    let old = store.device(first.device.id).await.expect("read").expect("removed devices are kept");
    assert_eq!(old.removed_at_ms, Some(200));
    assert_eq!(store.active_devices(first.account.id).await.expect("read"), vec![second.device.clone()]);
    assert_eq!(store.device(DeviceId(u64::MAX)).await.expect("read"), None);
    // Bob is untouched.
    assert_eq!(store.active_devices(bob.account.id).await.expect("read"), vec![bob.device]);
}

async fn verification_sessions(store: &dyn Store) {
    let mut session = VerificationSession::start("abc".into(), phone("+15550003000"), "111111".into(), 1_000);
    store.put_verification(&session).await.expect("put");
    assert_eq!(store.verification("abc").await.expect("get"), Some(session.clone()));

    session.wrong_attempts = 2;
    store.put_verification(&session).await.expect("replace");
    assert_eq!(store.verification("abc").await.expect("get").map(|s| s.wrong_attempts), Some(2));

    let newer = VerificationSession::start("def".into(), phone("+15550003001"), "222222".into(), 5_000);
    store.put_verification(&newer).await.expect("put");
    assert_eq!(store.purge_verifications(2_000).await.expect("purge"), 1);
    assert_eq!(store.verification("abc").await.expect("get"), None);

    store.delete_verification("def").await.expect("delete");
    store.delete_verification("def").await.expect("deleting twice is fine");
    assert_eq!(store.verification("def").await.expect("get"), None);
}

async fn server_id_is_stable(store: &dyn Store) {
    let first = store.server_id([4; 16]).await.expect("init");
    assert_eq!(first, [4; 16]);
    assert_eq!(store.server_id([5; 16]).await.expect("read"), first);
}
