//! Domain ⇄ wire conversions for the message path.

use skylark_core::AccountId;
use skylark_core::DeviceId;
use skylark_core::group::{GroupBody, GroupError, GroupEvent, GroupMeta, Role};
use skylark_core::message::DeviceChange;
use skylark_core::message::MetaError;
use skylark_core::message::{LogEntry, MessageId, ReceiptKind};
use skylark_protocol::v1::{self, event, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::devices::{DeviceError, DeviceInfo, HistoryPage};
use skylark_server::messaging::{DeviceEvent, MessagingError};
use skylark_server::presence::{Ephemeral, PresenceInfo, TypingState};
use skylark_server::router::Router;
use skylark_store::{PushTarget, StoreError, Visibility};

pub(crate) fn messaging_error_code(e: &MessagingError) -> ErrorCode {
    match e {
        MessagingError::InvalidRecipient(_)
        | MessagingError::InvalidClientId
        | MessagingError::CommitOutsideGroup
        | MessagingError::InvalidName
        | MessagingError::UnknownAccount => ErrorCode::InvalidArgument,
        MessagingError::UnknownRecipient => ErrorCode::UnknownRecipient,
        MessagingError::YouBlocked => ErrorCode::Blocked,
        MessagingError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        MessagingError::Unavailable(_)
        | MessagingError::Restarted
        | MessagingError::ShuttingDown
        | MessagingError::NodeUnreachable => ErrorCode::Unavailable,
        MessagingError::Internal(_) => ErrorCode::Internal,
        MessagingError::RateLimited(_) => ErrorCode::RateLimited,
        MessagingError::Meta(e) => match e {
            MetaError::NotYours => ErrorCode::UnknownMessage,
            MetaError::EditAndDelete | MetaError::BadTimer(..) | MetaError::OnCommit => ErrorCode::InvalidArgument,
            MetaError::AlreadyDeleted
            | MetaError::EditTooLate(_)
            | MetaError::DeleteTooLate(_)
            | MetaError::NotEditable => ErrorCode::MessageNotChangeable,
        },
        MessagingError::Group(e) => match e {
            GroupError::UnknownGroup => ErrorCode::UnknownGroup,
            GroupError::NotAMember => ErrorCode::NotAMember,
            GroupError::NotAnAdmin | GroupError::AdminOnly | GroupError::LastAdmin | GroupError::NotAuthor => {
                ErrorCode::Forbidden
            }
            GroupError::Full(_) => ErrorCode::GroupFull,
            GroupError::UnknownMessage => ErrorCode::UnknownMessage,
            GroupError::StaleEpoch(_) => ErrorCode::StaleEpoch,
            GroupError::Direct | GroupError::AddRefused(_) => ErrorCode::Forbidden,
            GroupError::NotMember(_)
            | GroupError::AlreadyMember(_)
            | GroupError::InvalidSubject
            | GroupError::NoMembers => ErrorCode::InvalidArgument,
        },
    }
}

pub(crate) fn message_id(id: MessageId) -> v1::MessageId {
    v1::MessageId { sender: id.sender.0, seq: id.seq }
}

fn receipt_kind(kind: ReceiptKind) -> v1::ReceiptKind {
    match kind {
        ReceiptKind::Delivered => v1::ReceiptKind::Delivered,
        ReceiptKind::Read => v1::ReceiptKind::Read,
    }
}

/// The phone number shown for `account`: empty for a group (which has
/// none) or for an account that does not exist; a store failure is an error,
/// never an empty or made-up number (see `skylark_server::directory`).
async fn phone(router: &Router, account: AccountId) -> Result<String, StoreError> {
    Ok(router.directory().phone(account).await?.map(|p| p.to_string()).unwrap_or_default())
}

pub(crate) fn device_error_code(e: &DeviceError) -> ErrorCode {
    match e {
        DeviceError::RateLimited(_) => ErrorCode::RateLimited,
        DeviceError::InvalidKey | DeviceError::InvalidName(_) => ErrorCode::InvalidArgument,
        DeviceError::UnknownCode | DeviceError::UnknownLink => ErrorCode::UnknownLinkCode,
        DeviceError::Expired => ErrorCode::LinkExpired,
        DeviceError::LimitReached(_) => ErrorCode::DeviceLimit,
        DeviceError::UnknownDevice => ErrorCode::UnknownDevice,
        DeviceError::Store(_) => ErrorCode::Unavailable,
    }
}

pub(crate) fn device_info(info: &DeviceInfo, current: DeviceId) -> v1::DeviceInfo {
    v1::DeviceInfo {
        id: info.device.id.0,
        name: info.device.name.clone(),
        created_at_ms: info.device.created_at_ms,
        last_seen_ms: info.device.last_seen_ms.unwrap_or(0),
        online: info.online,
        current: info.device.id == current,
    }
}

fn named(device: DeviceId, name: &str) -> v1::DeviceInfo {
    v1::DeviceInfo { id: device.0, name: name.to_owned(), ..v1::DeviceInfo::default() }
}

async fn member(
    router: &Router,
    account: AccountId,
    role: Role,
    joined_seq: u64,
) -> Result<v1::GroupMember, StoreError> {
    Ok(v1::GroupMember {
        account: account.0,
        phone: phone(router, account).await?,
        admin: role == Role::Admin,
        joined_seq,
    })
}

/// A member named in an event (role and join are in the group's info).
async fn named_member(router: &Router, account: AccountId) -> Result<v1::GroupMember, StoreError> {
    member(router, account, Role::Member, 0).await
}

pub(crate) async fn group_info(router: &Router, meta: &GroupMeta) -> Result<v1::GroupInfo, StoreError> {
    let mut members = Vec::with_capacity(meta.members.len());
    for m in &meta.members {
        members.push(member(router, m.account, m.role, m.joined_seq).await?);
    }
    Ok(v1::GroupInfo {
        id: meta.id.0,
        subject: meta.subject.clone(),
        created_by: meta.created_by.0,
        created_at_ms: meta.created_at_ms,
        admin_only: meta.admin_only,
        members,
        direct: meta.id.is_direct(),
    })
}

async fn group_event(router: &Router, e: &GroupEvent) -> Result<v1::GroupEvent, StoreError> {
    use v1::group_event::Body;
    let body = match &e.body {
        GroupBody::Message { device, client_id, payload, meta } => Body::Message(v1::GroupMessage {
            sender_device: device.0,
            client_id: client_id.clone(),
            payload: if meta.gone(router.now_ms()) { bytes::Bytes::new() } else { payload.clone() },
            edits: meta.edits,
            deletes: meta.deletes,
            expires_at_ms: meta.expires_at_ms.unwrap_or(0),
            purged: meta.gone(router.now_ms()),
        }),
        GroupBody::Created { subject, members } => {
            let mut out = Vec::with_capacity(members.len());
            for (m, role) in members {
                out.push(member(router, *m, *role, e.seq).await?);
            }
            Body::Created(v1::GroupCreated { subject: subject.clone(), members: out, direct: e.group.is_direct() })
        }
        GroupBody::Added { members } => {
            let mut out = Vec::with_capacity(members.len());
            for m in members {
                out.push(member(router, *m, Role::Member, e.seq).await?);
            }
            Body::Added(v1::GroupMembers { members: out })
        }
        GroupBody::Removed { member } => Body::Removed(named_member(router, *member).await?),
        GroupBody::Left => Body::Left(v1::Leave {}),
        GroupBody::Promoted { member } => Body::Promoted(named_member(router, *member).await?),
        GroupBody::Demoted { member } => Body::Demoted(named_member(router, *member).await?),
        GroupBody::Subject { subject } => Body::Subject(subject.clone()),
        GroupBody::AdminOnly { admin_only } => Body::AdminOnly(*admin_only),
    };
    Ok(v1::GroupEvent {
        group: e.group.0,
        group_seq: e.seq,
        by: e.by.0,
        by_phone: phone(router, e.by).await?,
        at_ms: e.at_ms,
        body: Some(body),
    })
}

/// One log entry as a wire event.
pub(crate) async fn event(router: &Router, seq: u64, entry: &LogEntry) -> Result<v1::Event, StoreError> {
    let body = match entry {
        LogEntry::Message(m) => event::Body::Message(v1::Message {
            id: Some(message_id(m.id)),
            from_phone: phone(router, m.id.sender).await?,
            to: m.to.0,
            to_phone: phone(router, m.to).await?,
            sender_device: m.sender_device.0,
            client_id: m.client_id.clone(),
            sent_at_ms: m.sent_at_ms,
            // A disappearing message past its time is never handed out,
            // even before the sweeper has purged the stored copy.
            payload: if m.meta.gone(router.now_ms()) { bytes::Bytes::new() } else { m.payload.clone() },
            edits: m.meta.edits,
            deletes: m.meta.deletes,
            expires_at_ms: m.meta.expires_at_ms.unwrap_or(0),
            purged: m.meta.gone(router.now_ms()),
        }),
        LogEntry::Receipt { peer, kind, up_to, at_ms } => event::Body::Receipt(v1::Receipt {
            peer: peer.0,
            peer_phone: phone(router, *peer).await?,
            kind: receipt_kind(*kind) as i32,
            up_to_seq: *up_to,
            at_ms: *at_ms,
        }),
        LogEntry::ReadSync { peer, up_to, at_ms } => event::Body::ReadSync(v1::ReadSync {
            peer: peer.0,
            peer_phone: phone(router, *peer).await?,
            up_to_seq: *up_to,
            at_ms: *at_ms,
        }),
        LogEntry::ContactName { peer, name, at_ms } => event::Body::ContactName(v1::ContactNameChange {
            peer: peer.0,
            peer_phone: phone(router, *peer).await?,
            name: name.clone(),
            at_ms: *at_ms,
        }),
        LogEntry::Block { peer, blocked, at_ms } => event::Body::BlockChange(v1::BlockChange {
            peer: peer.0,
            peer_phone: phone(router, *peer).await?,
            blocked: *blocked,
            at_ms: *at_ms,
        }),
        LogEntry::Devices { change, .. } => event::Body::DeviceChange(v1::DeviceChange {
            change: Some(match change {
                DeviceChange::Linked { device, name } => v1::device_change::Change::Linked(named(*device, name)),
                DeviceChange::Renamed { device, name } => v1::device_change::Change::Renamed(named(*device, name)),
                DeviceChange::Removed { device } => v1::device_change::Change::Removed(device.0),
            }),
        }),
        LogEntry::Group(e) => event::Body::Group(group_event(router, e).await?),
    };
    Ok(v1::Event { seq, body: Some(body) })
}

/// The frame for one event of the device's stream.
pub(crate) async fn event_frame(router: &Router, event: DeviceEvent) -> Result<ServerFrame, StoreError> {
    let body = match event {
        DeviceEvent::CaughtUp { seq } => server_frame::Body::CaughtUp(v1::CaughtUp { seq }),
        DeviceEvent::Entry { seq, entry } => server_frame::Body::Event(self::event(router, seq, &entry).await?),
        // The session ends the connection on a close instead (session.rs).
        DeviceEvent::Closed(_) => return Err(StoreError::Invariant("a stream's close is not a frame".into())),
    };
    Ok(ServerFrame { id: 0, body: Some(body) })
}

pub(crate) async fn history_page(router: &Router, page: HistoryPage) -> Result<v1::HistoryPage, StoreError> {
    let mut events = Vec::with_capacity(page.entries.len());
    for (seq, entry) in &page.entries {
        events.push(event(router, *seq, entry).await?);
    }
    let mut receipts: std::collections::BTreeMap<u64, v1::PeerReceipts> = std::collections::BTreeMap::new();
    for (peer, delivered, read) in page.receipts.received {
        let r = receipts.entry(peer.0).or_insert_with(|| v1::PeerReceipts { peer: peer.0, ..Default::default() });
        r.delivered_up_to = delivered.max(read);
        r.read_up_to = read;
    }
    for (peer, up_to) in page.receipts.read_markers {
        receipts
            .entry(peer.0)
            .or_insert_with(|| v1::PeerReceipts { peer: peer.0, ..Default::default() })
            .read_by_me_up_to = up_to;
    }
    let mut out = Vec::with_capacity(receipts.len());
    for (peer, mut r) in receipts {
        r.peer_phone = phone(router, AccountId(peer)).await?;
        out.push(r);
    }
    Ok(v1::HistoryPage { events, has_more: page.has_more, receipts: out })
}

pub(crate) fn typing_state(state: i32) -> Option<TypingState> {
    match v1::TypingState::try_from(state).ok()? {
        v1::TypingState::Composing => Some(TypingState::Composing),
        v1::TypingState::Paused => Some(TypingState::Paused),
        v1::TypingState::Recording => Some(TypingState::Recording),
        v1::TypingState::Unspecified => None,
    }
}

fn wire_typing(state: TypingState) -> v1::TypingState {
    match state {
        TypingState::Composing => v1::TypingState::Composing,
        TypingState::Paused => v1::TypingState::Paused,
        TypingState::Recording => v1::TypingState::Recording,
    }
}

pub(crate) fn visibility(v: i32) -> Option<Visibility> {
    match v1::Visibility::try_from(v).ok()? {
        v1::Visibility::Everyone => Some(Visibility::Everyone),
        v1::Visibility::Contacts => Some(Visibility::Contacts),
        v1::Visibility::Nobody => Some(Visibility::Nobody),
        v1::Visibility::Unspecified => None,
    }
}

pub(crate) fn visibility_wire(v: Visibility) -> v1::Visibility {
    match v {
        Visibility::Everyone => v1::Visibility::Everyone,
        Visibility::Contacts => v1::Visibility::Contacts,
        Visibility::Nobody => v1::Visibility::Nobody,
    }
}

pub(crate) async fn presence_info(router: &Router, info: PresenceInfo) -> Result<v1::PresenceInfo, StoreError> {
    Ok(v1::PresenceInfo {
        account: info.account.0,
        phone: phone(router, info.account).await?,
        visible: info.visible,
        online: info.online,
        last_seen_ms: info.last_seen_ms,
    })
}

pub(crate) async fn ephemeral_frame(router: &Router, event: Ephemeral) -> Result<ServerFrame, StoreError> {
    let body = match event {
        Ephemeral::Presence(info) => server_frame::Body::Presence(presence_info(router, info).await?),
        Ephemeral::Typing { from, device, state, expires_in_ms } => {
            server_frame::Body::TypingUpdate(v1::TypingUpdate {
                from: from.0,
                from_phone: phone(router, from).await?,
                device: device.0,
                state: wire_typing(state) as i32,
                expires_in_ms,
            })
        }
    };
    Ok(ServerFrame { id: 0, body: Some(body) })
}

/// Longest push endpoint or token accepted.
const MAX_PUSH_FIELD: usize = 4096;

/// A push registration from the wire, checked for shape; `None` target
/// means "remove".
pub(crate) fn push_target(register: v1::RegisterPush) -> Result<Option<PushTarget>, String> {
    use v1::register_push::Target;
    let check_url = |url: &str| {
        if url.len() > MAX_PUSH_FIELD || !(url.starts_with("http://") || url.starts_with("https://")) {
            Err("push endpoint must be an http(s) URL of at most 4096 bytes".to_owned())
        } else {
            Ok(())
        }
    };
    Ok(match register.target {
        None => None,
        Some(Target::WebPush(w)) => {
            check_url(&w.endpoint)?;
            if w.p256dh.len() != 65 || w.auth.len() != 16 {
                return Err("web push keys must be a 65-byte P-256 key and a 16-byte auth secret".into());
            }
            Some(PushTarget::WebPush { endpoint: w.endpoint, p256dh: w.p256dh, auth: w.auth })
        }
        Some(Target::UnifiedPush(u)) => {
            check_url(&u.endpoint)?;
            Some(PushTarget::UnifiedPush { endpoint: u.endpoint })
        }
        Some(Target::Webhook(h)) => {
            if h.token.is_empty() || h.token.len() > MAX_PUSH_FIELD {
                return Err("webhook token must be 1 to 4096 bytes".into());
            }
            Some(PushTarget::Webhook { token: h.token })
        }
    })
}
