//! One example of every client frame body, as seeds for fuzzing and for
//! tests that must cover every request type.

use crate::ClientFrame;
use crate::v1::{self, change_group::Change, client_frame::Body};

/// Every `ClientFrame` body once, with plausible field values.
pub fn client_frames() -> Vec<ClientFrame> {
    let group = (1u64 << 62) | 1;
    let bodies = vec![
        Body::Hello(v1::Hello { min_version: 1, max_version: 1, client: "seed/1".into() }),
        Body::Authenticate(v1::Authenticate { device_id: 1, nonce: vec![7; 32], signature: vec![9; 64] }),
        Body::Ping(v1::Ping {}),
        Body::WhoAmI(v1::WhoAmIRequest {}),
        Body::Send(v1::SendMessage {
            client_id: "c1".into(),
            to: "+15550000001".into(),
            group: 0,
            payload: b"hi".as_slice().into(),
            commit_epoch: None,
            message_epoch: None,
            edits: None,
            deletes: Some(1),
            expire_after_ms: 86_400_000,
            attachments: Vec::new(),
        }),
        Body::Send(v1::SendMessage {
            client_id: "c2".into(),
            to: String::new(),
            group,
            payload: b"all".as_slice().into(),
            commit_epoch: None,
            message_epoch: Some(3),
            edits: Some(2),
            deletes: None,
            expire_after_ms: 0,
            attachments: Vec::new(),
        }),
        Body::Ack(v1::Ack { up_to_seq: 3 }),
        Body::MarkRead(v1::MarkRead { peer: 2, up_to_seq: 3 }),
        Body::ApproveLink(v1::ApproveLink { code: "ABCD-EFGH".into() }),
        Body::ListDevices(v1::ListDevices {}),
        Body::RenameDevice(v1::RenameDevice { device_id: 1, name: "phone".into() }),
        Body::RemoveDevice(v1::RemoveDevice { device_id: 2 }),
        Body::History(v1::HistoryRequest { before_seq: 0, limit: 10 }),
        Body::SubscribePresence(v1::SubscribePresence { phones: vec!["+15550000002".into()] }),
        Body::SetActive(v1::SetActive { active: false }),
        Body::Typing(v1::Typing { to: "+15550000002".into(), state: v1::TypingState::Composing as i32 }),
        Body::SetPrivacy(v1::SetPrivacy { presence: v1::Visibility::Contacts as i32 }),
        Body::RegisterPush(v1::RegisterPush {
            target: Some(v1::register_push::Target::Webhook(v1::WebhookTarget { token: "t".into() })),
        }),
        Body::CreateGroup(v1::CreateGroup { subject: "trip".into(), members: vec!["+15550000002".into()] }),
        Body::ChangeGroup(v1::ChangeGroup {
            group,
            change: Some(Change::Add(v1::PhoneList { phones: vec!["+15550000003".into()] })),
        }),
        Body::ChangeGroup(v1::ChangeGroup { group, change: Some(Change::Leave(v1::Leave {})) }),
        Body::ChangeGroup(v1::ChangeGroup { group, change: Some(Change::Subject("new".into())) }),
        Body::GetGroup(v1::GetGroup { group }),
        Body::ListGroups(v1::ListGroups {}),
        Body::GetMessageInfo(v1::GetMessageInfo { group, seq: 2 }),
    ];
    bodies.into_iter().enumerate().map(|(i, body)| ClientFrame { id: i as u64 + 1, body: Some(body) }).collect()
}
