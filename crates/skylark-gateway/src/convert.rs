//! Domain ⇄ wire conversions for the message path.

use skylark_core::AccountId;
use skylark_core::DeviceId;
use skylark_core::message::DeviceChange;
use skylark_core::message::{LogEntry, MessageId, ReceiptKind};
use skylark_protocol::v1::{self, event, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::devices::{DeviceError, DeviceInfo, HistoryPage};
use skylark_server::messaging::{DeviceEvent, MessagingError};
use skylark_server::router::Router;

pub(crate) fn messaging_error_code(e: &MessagingError) -> ErrorCode {
    match e {
        MessagingError::InvalidRecipient(_) | MessagingError::InvalidClientId | MessagingError::UnknownAccount => {
            ErrorCode::InvalidArgument
        }
        MessagingError::UnknownRecipient => ErrorCode::UnknownRecipient,
        MessagingError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        MessagingError::Unavailable(_) | MessagingError::ShuttingDown => ErrorCode::Unavailable,
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

async fn phone(router: &Router, account: AccountId) -> String {
    match router.phone_of(account).await {
        Ok(Some(phone)) => phone.to_string(),
        _ => String::new(),
    }
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

/// One log entry as a wire event.
pub(crate) async fn event(router: &Router, seq: u64, entry: &LogEntry) -> v1::Event {
    let body = match entry {
        LogEntry::Message(m) => event::Body::Message(v1::Message {
            id: Some(message_id(m.id)),
            from_phone: phone(router, m.id.sender).await,
            to: m.to.0,
            to_phone: phone(router, m.to).await,
            sender_device: m.sender_device.0,
            client_id: m.client_id.clone(),
            sent_at_ms: m.sent_at_ms,
            payload: m.payload.clone(),
        }),
        LogEntry::Receipt { peer, kind, up_to, at_ms } => event::Body::Receipt(v1::Receipt {
            peer: peer.0,
            peer_phone: phone(router, *peer).await,
            kind: receipt_kind(*kind) as i32,
            up_to_seq: *up_to,
            at_ms: *at_ms,
        }),
        LogEntry::ReadSync { peer, up_to, at_ms } => event::Body::ReadSync(v1::ReadSync {
            peer: peer.0,
            peer_phone: phone(router, *peer).await,
            up_to_seq: *up_to,
            at_ms: *at_ms,
        }),
        LogEntry::Devices { change, .. } => event::Body::DeviceChange(v1::DeviceChange {
            change: Some(match change {
                DeviceChange::Linked { device, name } => v1::device_change::Change::Linked(named(*device, name)),
                DeviceChange::Renamed { device, name } => v1::device_change::Change::Renamed(named(*device, name)),
                DeviceChange::Removed { device } => v1::device_change::Change::Removed(device.0),
            }),
        }),
    };
    v1::Event { seq, body: Some(body) }
}

/// The frame for one event of the device's stream.
pub(crate) async fn event_frame(router: &Router, event: DeviceEvent) -> ServerFrame {
    let body = match event {
        DeviceEvent::CaughtUp { seq } => server_frame::Body::CaughtUp(v1::CaughtUp { seq }),
        DeviceEvent::Entry { seq, entry } => server_frame::Body::Event(self::event(router, seq, &entry).await),
    };
    ServerFrame { id: 0, body: Some(body) }
}

pub(crate) async fn history_page(router: &Router, page: HistoryPage) -> v1::HistoryPage {
    let mut events = Vec::with_capacity(page.entries.len());
    for (seq, entry) in &page.entries {
        events.push(event(router, *seq, entry).await);
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
        r.peer_phone = phone(router, AccountId(peer)).await;
        out.push(r);
    }
    v1::HistoryPage { events, has_more: page.has_more, receipts: out }
}
