//! The messaging API the gateway calls, on domain types.

use skylark_core::AccountId;
use skylark_core::group::{GroupChange, GroupError, GroupMeta};
use skylark_core::message::{LogEntry, MessageId};
use skylark_core::phone::PhoneError;
use skylark_store::StoreError;
use std::sync::Arc;

/// The messaging settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessagingConfig {
    /// Largest message payload accepted, in bytes.
    pub max_payload_bytes: usize,
    /// Log entries sent to one device and not yet acknowledged, at most.
    pub device_window: usize,
    /// An actor with nothing to forward stops after this long without work,
    /// if every device attached to it has all of its log and acknowledged
    /// it; those connections stay open, and the next actor (started by the
    /// next message) serves them. A device that connects with nothing to
    /// catch up on starts no actor at all. The state is reloaded from the
    /// store when needed.
    pub actor_idle_ms: u64,
    /// Acks and forward confirmations need no commit of their own: they
    /// wait this long for a durable write of the same account to ride
    /// along with (the next message of a conversation, usually), and are
    /// written alone after it, or when the actor stops. A crash loses at
    /// most this much of them, which only repeats harmless work: devices
    /// are handed again what they acknowledged meanwhile (clients drop it
    /// by id).
    pub cleanup_delay_ms: u64,
    /// First retry delay of a forward between actors; doubles per attempt,
    /// with full jitter, up to `forward_retry_max_ms`.
    pub forward_retry_base_ms: u64,
    /// The longest delay between two retries of a forward.
    pub forward_retry_max_ms: u64,
    /// A forward not acknowledged within this time is retried.
    pub forward_timeout_ms: u64,
    /// Members of one group, at most (admins included).
    pub max_group_members: usize,
    /// How long after sending a message its author may still edit it.
    pub edit_window_ms: u64,
    /// How long after sending a message its author may still delete it
    /// for everyone.
    pub delete_window_ms: u64,
    /// How often the server purges disappearing messages past their time
    /// from its store (it never hands one out after its time either way).
    pub expiry_sweep_ms: u64,
}

impl MessagingConfig {
    /// The rules for edits, deletions and disappearing timers.
    pub fn meta_rules(&self) -> skylark_core::message::MetaRules {
        skylark_core::message::MetaRules {
            edit_window_ms: self.edit_window_ms,
            delete_window_ms: self.delete_window_ms,
            ..skylark_core::message::MetaRules::default()
        }
    }
}

impl Default for MessagingConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 64 * 1024,
            device_window: 256,
            actor_idle_ms: 5 * 60_000,
            cleanup_delay_ms: 10_000,
            forward_retry_base_ms: 50,
            forward_retry_max_ms: 30_000,
            forward_timeout_ms: 10_000,
            max_group_members: 1024,
            edit_window_ms: skylark_core::message::MetaRules::default().edit_window_ms,
            delete_window_ms: skylark_core::message::MetaRules::default().delete_window_ms,
            expiry_sweep_ms: 10_000,
        }
    }
}

/// A device asks to send a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    pub client_id: String,
    /// The recipient's phone number, as the user typed it (ignored when
    /// `group` is set).
    pub to: String,
    /// Post to this group instead.
    pub group: Option<AccountId>,
    pub payload: bytes::Bytes,
    /// The payload is an MLS commit made in this epoch of the group's
    /// encryption (groups only).
    pub commit_epoch: Option<u64>,
    /// The payload is an MLS application message encrypted in this epoch
    /// of the group's encryption: refused once a commit ended it (groups
    /// only, never with `commit_epoch`).
    pub message_epoch: Option<u64>,
    /// An edit, a deletion or a disappearing timer.
    pub meta: skylark_core::message::MetaRequest,
}

/// A member's request to a group, other than posting (see [`SendRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GroupRequest {
    Create {
        subject: String,
        members: Vec<AccountId>,
    },
    Change(GroupChange),
    /// Opens (creating it the first time) the 1:1 conversation group of
    /// the asker and `with`; sent to the group [`AccountId::direct`] names.
    OpenDirect {
        with: AccountId,
    },
    Info,
    /// Delivery and read state of one of the asker's messages, per member.
    MessageInfo {
        seq: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GroupReply {
    /// The group's state after the request.
    Info(GroupMeta),
    MessageInfo(MessageInfo),
}

/// Who has one group message: every member other than its author that
/// was a member when it was posted and still is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MessageInfo {
    pub group: AccountId,
    pub seq: u64,
    pub sent_at_ms: u64,
    /// (member, delivered to one of its devices, read) by member id.
    pub recipients: Vec<(AccountId, bool, bool)>,
}

/// The single tick: the message is durable in the sender's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAck {
    pub id: MessageId,
    pub sent_at_ms: u64,
    /// True when this was a resend of an already accepted client id.
    pub duplicate: bool,
}

/// What the actor streams to one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    Entry {
        seq: u64,
        entry: Arc<LogEntry>,
    },
    /// Everything up to `seq` was sent; what follows is live.
    CaughtUp {
        seq: u64,
    },
    /// The actor let this connection go: a newer connection of the device
    /// took its place (on any node), or the device was removed. The last
    /// event of the stream.
    Closed(crate::sessions::Disconnect),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum MessagingError {
    #[error("invalid recipient: {0}")]
    InvalidRecipient(#[from] PhoneError),
    #[error("no account has that phone number")]
    UnknownRecipient,
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("client id must be 1 to 64 printable bytes")]
    InvalidClientId,
    #[error(
        "an encryption epoch (commit_epoch for a commit, message_epoch for an encrypted message) can only be given \
         on a post to a group, and only one of them"
    )]
    CommitOutsideGroup,
    #[error("no such account")]
    UnknownAccount,
    #[error("a contact's name is 1 to 64 characters, without control characters")]
    InvalidName,
    /// The sender blocked the recipient (only the blocker is told).
    #[error("you blocked this account; unblock it to send it messages")]
    YouBlocked,
    /// The store failed; nothing was done (retry, with the same client id).
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] StoreError),
    /// The account's actor stopped after a failed write; its successor
    /// reloads from the store (retry, with the same client id).
    #[error("the account is reloading after a storage failure; retry")]
    Restarted,
    /// An invariant of the server was found broken (a bug, never the
    /// client's doing); nothing was done.
    #[error("internal error: {0}")]
    Internal(&'static str),
    #[error("server shutting down")]
    ShuttingDown,
    /// Cluster mode: the node that holds the account did not answer in
    /// time; nothing is known to be done (retry, with the same client id).
    #[error("the server that holds this account did not answer in time; retry")]
    NodeUnreachable,
    #[error("too many messages; try again in {}", skylark_core::words::wait(u64::try_from(.0.as_millis()).unwrap_or(u64::MAX)))]
    RateLimited(std::time::Duration),
    #[error(transparent)]
    Group(#[from] GroupError),
    #[error(transparent)]
    Meta(#[from] skylark_core::message::MetaError),
}

impl From<StoreError> for MessagingError {
    fn from(e: StoreError) -> Self {
        MessagingError::Unavailable(e)
    }
}
