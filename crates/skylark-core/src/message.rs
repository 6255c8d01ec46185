//! Messages, receipts and the per-account log.
//!
//! Every account has one ordered log. It holds the messages the account
//! sent (so its other devices show them too), the messages it received,
//! the receipts its correspondents sent back, and read markers its own
//! devices set. Each device of the account reads the same log in the same
//! order from its own cursor. Sequence numbers are per account, dense, and
//! start at 1.
//!
//! Between accounts, actors exchange [`Forward`]s through a durable outbox
//! (see [`OutboxItem`]), in order per destination.

use crate::account::{AccountId, DeviceId};
use crate::group::GroupEvent;
use std::sync::Arc;

/// A message's identity everywhere: the sender's account and the sequence
/// number the sender's log gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    pub sender: AccountId,
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub to: AccountId,
    pub sender_device: DeviceId,
    /// Chosen by the sending device; resends with the same id are one message.
    pub client_id: String,
    /// When the sender's actor accepted it (server clock).
    pub sent_at_ms: u64,
    /// Opaque to the server (ciphertext for end-to-end encrypted clients).
    /// Shared, not copied, by every copy of the message in memory and on
    /// the wire.
    pub payload: bytes::Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReceiptKind {
    Delivered,
    Read,
}

/// One entry of an account's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry {
    /// A message this account sent (`id.sender` is the owner) or received
    /// (`to` is the owner). Shared: the same message is in the sender's
    /// log, its outbox, the forward and the recipient's log.
    Message(Arc<Message>),
    /// `peer` received (or read) this account's messages to it, up to and
    /// including this account's sequence number `up_to`.
    Receipt { peer: AccountId, kind: ReceiptKind, up_to: u64, at_ms: u64 },
    /// One of this account's devices read `peer`'s messages up to the
    /// peer's sequence number `up_to`; the other devices learn it from here.
    ReadSync { peer: AccountId, up_to: u64, at_ms: u64 },
    /// The account's set of devices changed; every device is told.
    Devices { change: DeviceChange, at_ms: u64 },
    /// The account blocked `peer` (or unblocked it, `blocked: false`);
    /// every device is told, so all show the same block list.
    Block { peer: AccountId, blocked: bool, at_ms: u64 },
    /// The account named `peer` in its contacts (empty: the name was
    /// removed); every device is told, so all show the same names.
    ContactName { peer: AccountId, name: String, at_ms: u64 },
    /// An event of a group: in the group's own log, and in the log of
    /// every account that was a member when it happened. Shared, because
    /// one event goes to every member.
    Group(Arc<GroupEvent>),
}

/// A change to an account's devices, as recorded in its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    Linked { device: DeviceId, name: String },
    Renamed { device: DeviceId, name: String },
    Removed { device: DeviceId },
}

impl LogEntry {
    /// When the entry was made (server clock).
    pub fn at_ms(&self) -> u64 {
        match self {
            LogEntry::Message(m) => m.sent_at_ms,
            LogEntry::Receipt { at_ms, .. }
            | LogEntry::ReadSync { at_ms, .. }
            | LogEntry::Devices { at_ms, .. }
            | LogEntry::Block { at_ms, .. }
            | LogEntry::ContactName { at_ms, .. } => *at_ms,
            LogEntry::Group(e) => e.at_ms,
        }
    }
}

/// What one account's actor sends another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    Message(Arc<Message>),
    /// The sending account received or read the destination's messages to
    /// it, up to the destination's sequence number `up_to`.
    Receipt {
        kind: ReceiptKind,
        up_to: u64,
        at_ms: u64,
    },
    /// A group's event, for a member's log. The outbox sequence of a
    /// group's forward is its own; the event carries the group sequence.
    Group(Arc<GroupEvent>),
}

/// A forward waiting in the sender's durable outbox until the destination
/// acknowledges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    pub to: AccountId,
    pub forward: Forward,
}

/// The payload-size rule: a message's payload is at most `max` bytes
/// (`messaging.max_payload_bytes`).
pub fn payload_fits(len: usize, max: usize) -> bool {
    len <= max
}

/// Longest client message id accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 64;

/// The client-id rule: 1 to 64 characters, each a visible ASCII character
/// (`!` through `~`, 0x21–0x7E): no spaces, no control characters, no
/// other Unicode, so "characters" and "bytes" are the same count.
pub fn valid_client_id(id: &str) -> bool {
    (1..=MAX_CLIENT_ID_BYTES).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert!(valid_client_id("m-1"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id(&"x".repeat(65)));
        assert!(!valid_client_id("a\u{0}b"));
        assert!(valid_client_id(&"x".repeat(64)));
        assert!(valid_client_id("!~"), "the ends of the visible range");
        assert!(!valid_client_id("a b"), "no spaces");
        assert!(!valid_client_id("é"), "ASCII only");
        assert!(!valid_client_id("a\tb"));
    }

    #[test]
    fn payload_sizes() {
        assert!(payload_fits(0, 10) && payload_fits(10, 10));
        assert!(!payload_fits(11, 10));
    }
}
