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
    /// What the server must know to act on the message (edits, deletes,
    /// expiry); everything else about it is in the opaque payload.
    pub meta: Meta,
}

/// The little a server must know about a message to act on it, carried
/// beside the opaque payload (a 1:1 message's or a group post's): which
/// earlier message of the same sender it edits or deletes, when its payload
/// expires, and whether the payload was purged. Targets are the sender's
/// log sequence numbers (for a group post, group sequence numbers): a
/// sender can only ever name its own messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Meta {
    /// This message replaces the content of the sender's message `edits`.
    pub edits: Option<u64>,
    /// This message deletes the sender's message `deletes` for everyone:
    /// every copy's payload is purged where it is stored.
    pub deletes: Option<u64>,
    /// A disappearing message: its payload is purged from every store at
    /// this time (server clock) and clients hide it.
    pub expires_at_ms: Option<u64>,
    /// The server purged the payload (deleted for everyone, or expired);
    /// the payload is then empty.
    pub purged: bool,
}

impl Meta {
    pub fn is_default(&self) -> bool {
        *self == Meta::default()
    }

    /// Whether the payload must no longer be handed out at `now_ms`.
    pub fn gone(&self, now_ms: u64) -> bool {
        self.purged || self.expires_at_ms.is_some_and(|at| at <= now_ms)
    }
}

/// What a sender asks of a new message beyond its payload: to edit or
/// delete one of its earlier messages, or to disappear after a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct MetaRequest {
    pub edits: Option<u64>,
    pub deletes: Option<u64>,
    /// 0: the message does not disappear.
    pub expire_after_ms: u64,
}

impl MetaRequest {
    /// The earlier message this one edits or deletes.
    pub fn target(&self) -> Option<u64> {
        self.edits.or(self.deletes)
    }
}

/// The bounds a server keeps on [`Meta`] (`messaging.edit_window_ms` and
/// friends): how long after sending a message its author may still edit
/// or delete it, and which disappearing timers are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaRules {
    pub edit_window_ms: u64,
    pub delete_window_ms: u64,
    /// Shortest and longest disappearing timer accepted.
    pub min_timer_ms: u64,
    pub max_timer_ms: u64,
}

impl Default for MetaRules {
    fn default() -> Self {
        MetaRules {
            edit_window_ms: 15 * 60 * 1000,
            delete_window_ms: 48 * 60 * 60 * 1000,
            min_timer_ms: 1000,
            max_timer_ms: 366 * 24 * 60 * 60 * 1000,
        }
    }
}

/// Why a message's [`Meta`] was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum MetaError {
    #[error("a message cannot both edit and delete")]
    EditAndDelete,
    #[error("only your own messages can be edited or deleted, and only ones that still exist")]
    NotYours,
    #[error("this message was deleted, so it cannot be changed")]
    AlreadyDeleted,
    #[error("messages can be edited only within {} of sending", crate::words::wait(*.0))]
    EditTooLate(u64),
    #[error("messages can be deleted for everyone only within {} of sending", crate::words::wait(*.0))]
    DeleteTooLate(u64),
    #[error("a disappearing timer must be between {} and {}", crate::words::wait(*.0), crate::words::wait(*.1))]
    BadTimer(u64, u64),
    #[error("only a message with text can be edited, and an edit or a deletion cannot itself be changed")]
    NotEditable,
    #[error("an encryption commit cannot edit, delete or disappear")]
    OnCommit,
}

impl MetaRules {
    /// Checks a new message's request (its edit or delete target, found in
    /// the sender's own log: `target` is `(sent_at_ms, meta)` of the
    /// sender's message with that sequence, `None` if the sender has no
    /// such message) and its timer, and returns its meta as stored.
    pub fn check(&self, request: &MetaRequest, target: Option<(u64, Meta)>, now_ms: u64) -> Result<Meta, MetaError> {
        let MetaRequest { edits, deletes, expire_after_ms } = *request;
        if edits.is_some() && deletes.is_some() {
            return Err(MetaError::EditAndDelete);
        }
        if edits.is_some() || deletes.is_some() {
            let (sent_at, meta) = target.ok_or(MetaError::NotYours)?;
            if meta.purged || meta.deletes.is_some() && deletes.is_some() {
                return Err(MetaError::AlreadyDeleted);
            }
            if meta.deletes.is_some() || meta.edits.is_some() {
                return Err(MetaError::NotEditable);
            }
            let age = now_ms.saturating_sub(sent_at);
            if edits.is_some() && age > self.edit_window_ms {
                return Err(MetaError::EditTooLate(self.edit_window_ms));
            }
            if deletes.is_some() && age > self.delete_window_ms {
                return Err(MetaError::DeleteTooLate(self.delete_window_ms));
            }
        }
        let expires_at_ms = match expire_after_ms {
            0 => None,
            t if (self.min_timer_ms..=self.max_timer_ms).contains(&t) => Some(now_ms.saturating_add(t)),
            _ => return Err(MetaError::BadTimer(self.min_timer_ms, self.max_timer_ms)),
        };
        Ok(Meta { edits, deletes, expires_at_ms, purged: false })
    }
}

impl Message {
    /// This message with its payload purged (deleted for everyone, or
    /// expired): the same id, sender, time and meta, no content.
    pub fn purged(&self) -> Message {
        Message { payload: bytes::Bytes::new(), meta: Meta { purged: true, ..self.meta }, ..self.clone() }
    }
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
    fn edits_deletes_and_timers() {
        let rules = MetaRules::default();
        let now = 1_000_000_000;
        let mine = Some((now - 60_000, Meta::default()));
        let edit = MetaRequest { edits: Some(4), ..MetaRequest::default() };
        let delete = MetaRequest { deletes: Some(4), ..MetaRequest::default() };
        assert_eq!(rules.check(&edit, mine, now).unwrap(), Meta { edits: Some(4), ..Meta::default() });
        assert_eq!(rules.check(&delete, mine, now).unwrap(), Meta { deletes: Some(4), ..Meta::default() });
        assert_eq!(rules.check(&edit, None, now), Err(MetaError::NotYours));
        let old = Some((now - rules.edit_window_ms - 1, Meta::default()));
        assert_eq!(rules.check(&edit, old, now), Err(MetaError::EditTooLate(rules.edit_window_ms)));
        assert!(rules.check(&delete, old, now).is_ok(), "the delete window is longer");
        let gone = Some((now, Meta { purged: true, ..Meta::default() }));
        assert_eq!(rules.check(&delete, gone, now), Err(MetaError::AlreadyDeleted));
        let an_edit = Some((now, Meta { edits: Some(1), ..Meta::default() }));
        assert_eq!(rules.check(&edit, an_edit, now), Err(MetaError::NotEditable));
        let both = MetaRequest { edits: Some(4), deletes: Some(4), expire_after_ms: 0 };
        assert_eq!(rules.check(&both, mine, now), Err(MetaError::EditAndDelete));
        let timed = MetaRequest { expire_after_ms: 86_400_000, ..MetaRequest::default() };
        assert_eq!(rules.check(&timed, None, now).unwrap().expires_at_ms, Some(now + 86_400_000));
        let tiny = MetaRequest { expire_after_ms: 10, ..MetaRequest::default() };
        assert!(matches!(rules.check(&tiny, None, now), Err(MetaError::BadTimer(..))));
        assert_eq!(
            MetaError::DeleteTooLate(rules.delete_window_ms).to_string(),
            "messages can be deleted for everyone only within 2 days of sending"
        );
        assert!(Meta { expires_at_ms: Some(now), ..Meta::default() }.gone(now));
        assert!(!Meta { expires_at_ms: Some(now + 1), ..Meta::default() }.gone(now));
    }

    #[test]
    fn payload_sizes() {
        assert!(payload_fits(0, 10) && payload_fits(10, 10));
        assert!(!payload_fits(11, 10));
    }
}
