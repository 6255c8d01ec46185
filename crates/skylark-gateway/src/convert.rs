//! Domain ⇄ wire conversions for the message path.

use skylark_core::AccountId;
use skylark_core::message::{LogEntry, MessageId, ReceiptKind};
use skylark_protocol::v1::{self, event, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
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

/// The frame for one event of the device's stream.
pub(crate) async fn event_frame(router: &Router, event: DeviceEvent) -> ServerFrame {
    let body = match event {
        DeviceEvent::CaughtUp { seq } => server_frame::Body::CaughtUp(v1::CaughtUp { seq }),
        DeviceEvent::Entry { seq, entry } => {
            let body = match entry.as_ref() {
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
            };
            server_frame::Body::Event(v1::Event { seq, body: Some(body) })
        }
    };
    ServerFrame { id: 0, body: Some(body) }
}
