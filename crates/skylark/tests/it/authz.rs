//! The authorization matrix: every request type, asked by every kind of
//! caller. Whatever is refused is refused with the documented code and
//! changes nothing (the state every party can observe is compared before
//! and after each refused request).

use crate::devices::link;
use crate::harness::{Peer, TestServer, Transport, close_code};
use skylark_client::conn::Received;
use skylark_client::session::SessionHandle;
use skylark_protocol::v1::{self, change_group::Change, client_frame::Body};
use skylark_protocol::{ClientFrame, CloseCode, ErrorCode};

/// Who asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    /// The device that owns the resource (Alice's phone; the group's admin).
    Own,
    /// Another device of the same account (Alice's laptop).
    Sibling,
    /// Another account that is a plain member of the group (Bob).
    Other,
    /// An account that never was in the group (Dave).
    NonMember,
    /// An account removed from the group (Carol).
    RemovedMember,
}

/// The ids the requests refer to.
struct Ids {
    alice_phone_device: u64,
    alice_laptop_device: u64,
    group: u64,
    alice_post: u64,
}

/// One request of each type (notifications, which are never answered, are
/// covered by the unauthenticated part below).
fn requests(ids: &Ids) -> Vec<(&'static str, Body)> {
    let g = ids.group;
    vec![
        ("ping", Body::Ping(v1::Ping {})),
        ("who_am_i", Body::WhoAmI(v1::WhoAmIRequest {})),
        (
            "send 1:1",
            Body::Send(v1::SendMessage {
                edits: None,
                deletes: None,
                expire_after_ms: 0,
                attachments: Vec::new(),
                client_id: "x".into(),
                to: "+15556000009".into(),
                group: 0,
                payload: b"m".to_vec().into(),
                commit_epoch: None,
                message_epoch: None,
            }),
        ),
        (
            "post to group",
            Body::Send(v1::SendMessage {
                edits: None,
                deletes: None,
                expire_after_ms: 0,
                attachments: Vec::new(),
                client_id: "y".into(),
                to: String::new(),
                group: g,
                payload: b"p".to_vec().into(),
                commit_epoch: None,
                message_epoch: None,
            }),
        ),
        ("mark_read", Body::MarkRead(v1::MarkRead { peer: g, up_to_seq: 1 })),
        ("list_devices", Body::ListDevices(v1::ListDevices {})),
        (
            "rename alice's laptop",
            Body::RenameDevice(v1::RenameDevice { device_id: ids.alice_laptop_device, name: "pwned".into() }),
        ),
        ("remove alice's phone", Body::RemoveDevice(v1::RemoveDevice { device_id: ids.alice_phone_device })),
        ("history", Body::History(v1::HistoryRequest { before_seq: 0, limit: 10 })),
        ("subscribe_presence", Body::SubscribePresence(v1::SubscribePresence { phones: vec!["+15556000001".into()] })),
        ("set_active", Body::SetActive(v1::SetActive { active: true })),
        ("set_privacy", Body::SetPrivacy(v1::SetPrivacy { presence: v1::Visibility::Everyone as i32 })),
        ("register_push", Body::RegisterPush(v1::RegisterPush { target: None })),
        // Key packages: a device publishes its own; anyone may claim a
        // registered number's (rate-limited), as contact discovery needs.
        (
            "upload_key_packages",
            Body::UploadKeyPackages(v1::UploadKeyPackages {
                key_packages: vec![bytes::Bytes::from_static(b"key package")],
                last_resort: bytes::Bytes::new(),
            }),
        ),
        ("key_package_stock", Body::GetKeyPackageStock(v1::GetKeyPackageStock {})),
        (
            "claim alice's key packages",
            Body::ClaimKeyPackages(v1::ClaimKeyPackages { phone: "+15556000001".into(), phones: Vec::new() }),
        ),
        (
            "create_group",
            Body::CreateGroup(v1::CreateGroup { subject: "mine".into(), members: vec!["+15556000002".into()] }),
        ),
        ("get_group", Body::GetGroup(v1::GetGroup { group: g })),
        ("open_direct with alice", Body::OpenDirect(v1::OpenDirect { phone: "+15556000001".into() })),
        ("list_groups", Body::ListGroups(v1::ListGroups {})),
        ("message_info", Body::GetMessageInfo(v1::GetMessageInfo { group: g, seq: ids.alice_post })),
        (
            "group: add",
            Body::ChangeGroup(v1::ChangeGroup {
                group: g,
                change: Some(Change::Add(v1::PhoneList { phones: vec!["+15556000004".into()] })),
            }),
        ),
        (
            "group: remove alice",
            Body::ChangeGroup(v1::ChangeGroup { group: g, change: Some(Change::Remove("+15556000001".into())) }),
        ),
        (
            "group: promote",
            Body::ChangeGroup(v1::ChangeGroup { group: g, change: Some(Change::Promote("+15556000002".into())) }),
        ),
        (
            "group: subject",
            Body::ChangeGroup(v1::ChangeGroup { group: g, change: Some(Change::Subject("hijacked".into())) }),
        ),
        ("group: admin_only", Body::ChangeGroup(v1::ChangeGroup { group: g, change: Some(Change::AdminOnly(true)) })),
    ]
}

/// What each caller may do; `None` means allowed.
fn expected(caller: Caller, request: &str) -> Option<ErrorCode> {
    use Caller::*;
    let group_read = matches!(request, "post to group" | "get_group" | "mark_read");
    let group_admin = request.starts_with("group: ");
    match (caller, request) {
        // Device management reaches only the caller's own account.
        (Other | NonMember | RemovedMember, "rename alice's laptop" | "remove alice's phone") => {
            Some(ErrorCode::UnknownDevice)
        }
        (NonMember | RemovedMember, _) if group_read || group_admin || request == "message_info" => {
            Some(ErrorCode::NotAMember)
        }
        (Other, _) if group_admin => Some(ErrorCode::Forbidden),
        // A 1:1 conversation needs two accounts.
        (Own | Sibling, "open_direct with alice") => Some(ErrorCode::Forbidden),
        // Message info is for the post's sender (Alice's account).
        (Other, "message_info") => Some(ErrorCode::Forbidden),
        _ => None,
    }
}

/// Everything the parties can observe that a refused request might change.
async fn snapshot(alice: &SessionHandle, bob: &SessionHandle, group: u64) -> String {
    let devices = alice.list_devices().await.unwrap();
    let names: Vec<(u64, String)> = devices.iter().map(|d| (d.id, d.name.clone())).collect();
    let info = alice.group_info(group).await.unwrap();
    let members: Vec<(String, bool)> = info.members.iter().map(|m| (m.phone.clone(), m.admin)).collect();
    let alice_log = alice.history(0, 1).await.unwrap().events.first().map(|e| e.seq);
    let bob_log = bob.history(0, 1).await.unwrap().events.first().map(|e| e.seq);
    format!("{names:?} {} {} {members:?} {alice_log:?} {bob_log:?}", info.subject, info.admin_only)
}

/// A snapshot once earlier (allowed) requests have finished rippling
/// through the logs: two equal readings 50 ms apart.
async fn settled(alice: &SessionHandle, bob: &SessionHandle, group: u64) -> String {
    let mut last = snapshot(alice, bob, group).await;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let now = snapshot(alice, bob, group).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn every_request_type_by_every_kind_of_caller() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15556000001").await;
    let bob_id = server.register("+15556000002").await;
    let carol_id = server.register("+15556000003").await;
    let dave_id = server.register("+15556000004").await;
    server.register("+15556000009").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let laptop_id = link(&server, &alice, "laptop").await;
    let old_id = link(&server, &alice, "old tablet").await;
    alice.handle().remove_device(old_id.device_id).await.unwrap();

    let group = alice.handle().create_group("club", &["+15556000002", "+15556000003"]).await.unwrap().id;
    let alice_post = alice.handle().send_to_group(group, "a1", b"hello".to_vec()).await.unwrap().id.unwrap().seq;
    alice.handle().change_group(group, Change::Remove("+15556000003".into())).await.unwrap();
    let ids =
        Ids { alice_phone_device: alice_id.device_id, alice_laptop_device: laptop_id.device_id, group, alice_post };

    let laptop = Peer::connect(&server, &laptop_id, Transport::Ws).await;
    let bob = Peer::connect(&server, &bob_id, Transport::WsJson).await;
    let carol = Peer::connect(&server, &carol_id, Transport::Tcp).await;
    let dave = Peer::connect(&server, &dave_id, Transport::Ws).await;
    let (a, b) = (alice.handle(), bob.handle());

    let mut refused = 0;
    // Own last: its "remove alice's phone" ends the phone's session.
    for (caller, peer) in [
        (Caller::Other, &bob),
        (Caller::NonMember, &dave),
        (Caller::RemovedMember, &carol),
        (Caller::Sibling, &laptop),
        (Caller::Own, &alice),
    ] {
        for (name, body) in requests(&ids) {
            // Allowed requests that would end the test (Alice logging out or
            // leaving) or cannot repeat (adding Dave twice) are covered
            // elsewhere: the phone's removal at the end, the rest in groups.rs.
            let skip = match caller {
                Caller::Own => matches!(name, "remove alice's phone" | "group: remove alice" | "group: add"),
                Caller::Sibling => matches!(name, "remove alice's phone" | "group: remove alice"),
                _ => false,
            };
            if skip {
                continue;
            }
            let before = settled(&a, &b, group).await;
            let outcome = peer.handle().request(body).await;
            match (expected(caller, name), outcome) {
                (None, Ok(_)) => {}
                (None, Err(e)) => panic!("{caller:?} {name}: refused but allowed: {e}"),
                (Some(code), Ok(reply)) => panic!("{caller:?} {name}: allowed ({reply:?}) but must be {code:?}"),
                (Some(code), Err(e)) => {
                    assert_eq!(e.error_code(), Some(code), "{caller:?} {name}: {e}");
                    // Anything it set off would show within the settling time.
                    assert_eq!(settled(&a, &b, group).await, before, "{caller:?} {name} changed something");
                    refused += 1;
                }
            }
        }
    }
    // Bob: 2 device + 5 group changes + message info; Dave and Carol: 2 device + 8 group
    // (post, info, mark read, message info and the group changes); Alice's
    // two devices: a 1:1 conversation with herself.
    assert_eq!(refused, 8 + 11 + 11 + 2, "every refusal in the table was exercised");

    // A removed device cannot even authenticate.
    let err = skylark_client::Session::open(&server.endpoint(Transport::Tcp), &old_id).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::DeviceRemoved));
    // The laptop (a sibling) may remove the phone: a logout of another own device.
    laptop.handle().remove_device(alice_id.device_id).await.unwrap();
}

#[tokio::test]
async fn nothing_is_served_before_authentication() {
    let server = TestServer::start().await;
    let ids = Ids { alice_phone_device: 1, alice_laptop_device: 2, group: 1 << 62 | 1, alice_post: 2 };
    let mut bodies = requests(&ids);
    bodies.push(("ack", Body::Ack(v1::Ack { up_to_seq: 1 })));
    bodies.push(("typing", Body::Typing(v1::Typing { to: "+15556000001".into(), state: 1 })));
    bodies.push(("approve_link", Body::ApproveLink(v1::ApproveLink { code: "ABCD-EFGH".into() })));
    for (name, body) in bodies {
        let mut conn = server.raw(Transport::Tcp).await;
        conn.send(ClientFrame { id: 7, body: Some(body) }).await.unwrap();
        match conn.recv().await {
            Received::Frame(frame) => match frame.body {
                Some(skylark_protocol::v1::server_frame::Body::Error(e)) => {
                    assert_eq!(e.code, ErrorCode::Unauthenticated as i32, "{name}");
                }
                other => panic!("{name}: expected an error, got {other:?}"),
            },
            other => panic!("{name}: expected an error frame, got {other:?}"),
        }
        assert_eq!(close_code(&mut conn).await, Some(CloseCode::Unauthenticated), "{name}");
    }
}
