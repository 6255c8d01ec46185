//! The node-to-node encoding: the mail one node hands another's actors,
//! their answers, and the events of a device stream attached across nodes.
//!
//! Fields use the store's record rules ([`skylark_store::record::Writer`]:
//! varints and length-prefixed bytes, every length checked on reading), and
//! log entries and forwards travel in the record encoding itself, so a
//! message's payload is never re-encoded between its store rows and the
//! bus. The rare group requests and replies ride as JSON inside a field.
//! Only nodes of one cluster read this; it is versioned by its first byte so
//! a rolling upgrade can tell an older node's mail from garbage.

use crate::messaging::{DeviceEvent, GroupReply, GroupRequest, MessagingError, SendAck};
use crate::presence::{PresenceNote, TypingState};
use crate::sessions::Disconnect;
use bytes::Bytes;
use skylark_core::group::GroupError;
use skylark_core::message::{DeviceChange, Forward, LogEntry, MessageId, MetaRequest};
use skylark_core::{AccountId, DeviceId};
use skylark_store::StoreError;
use skylark_store::record::{Reader, Writer, decode_entry, encode_entry};
use std::sync::Arc;

const VERSION: u8 = 1;

/// Mail for an actor owned by the receiving node.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Mail {
    Send {
        account: AccountId,
        device: DeviceId,
        client_id: String,
        to: AccountId,
        payload: Bytes,
        meta: MetaRequest,
    },
    Post {
        group: AccountId,
        author: AccountId,
        device: DeviceId,
        client_id: String,
        payload: Bytes,
        commit_epoch: Option<u64>,
        message_epoch: Option<u64>,
        meta: MetaRequest,
    },
    Group {
        group: AccountId,
        from: AccountId,
        request: GroupRequest,
    },
    Deliver {
        to: AccountId,
        from: AccountId,
        items: Vec<(u64, Forward)>,
    },
    /// Attach a device whose connection lives on node `origin`; its events
    /// go to that node's stream subject for `connection`.
    Attach {
        account: AccountId,
        device: DeviceId,
        connection: u64,
        origin: String,
    },
    Detach {
        account: AccountId,
        device: DeviceId,
        connection: u64,
    },
    Ack {
        account: AccountId,
        device: DeviceId,
        connection: u64,
        up_to: u64,
    },
    MarkRead {
        account: AccountId,
        peer: AccountId,
        up_to: u64,
    },
    DeviceChange {
        account: AccountId,
        change: DeviceChange,
    },
    Block {
        account: AccountId,
        peer: AccountId,
        blocked: bool,
    },
    Deleted {
        account: AccountId,
    },
    ContactName {
        account: AccountId,
        peer: AccountId,
        name: String,
    },
}

/// The answer to one piece of mail.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer {
    Send(SendAck),
    Deliver(u64),
    Group(GroupReply),
    Done,
}

impl Answer {
    pub(crate) fn into_send(self) -> Option<SendAck> {
        if let Answer::Send(ack) = self { Some(ack) } else { None }
    }
    pub(crate) fn into_deliver(self) -> Option<u64> {
        if let Answer::Deliver(up_to) = self { Some(up_to) } else { None }
    }
    pub(crate) fn into_group(self) -> Option<GroupReply> {
        if let Answer::Group(reply) = self { Some(reply) } else { None }
    }
    pub(crate) fn into_done(self) -> Option<()> {
        matches!(self, Answer::Done).then_some(())
    }
}

/// One event of a device stream across nodes, numbered so a gap (a bus
/// that dropped something) ends the stream instead of skipping entries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamEvent {
    Event(DeviceEvent),
    /// The actor let the connection go (it moved, stopped or restarted).
    End,
}

#[derive(Debug, thiserror::Error)]
#[error("bad cluster message: {0}")]
pub(crate) struct BadMessage(String);

fn bad(what: impl Into<String>) -> BadMessage {
    BadMessage(what.into())
}

impl From<StoreError> for BadMessage {
    fn from(e: StoreError) -> Self {
        BadMessage(e.to_string())
    }
}

fn start(tag: u8) -> Writer {
    let mut w = Writer::default();
    w.u8(VERSION);
    w.u8(tag);
    w
}

fn open(bytes: &[u8]) -> Result<(Reader<'_>, u8), BadMessage> {
    let mut r = Reader::new(bytes);
    if r.u8()? != VERSION {
        return Err(bad("unknown version"));
    }
    let tag = r.u8()?;
    Ok((r, tag))
}

fn json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, BadMessage> {
    serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))
}

/// A forward travels as the log entry it becomes (a receipt's peer is the
/// sender, known from the mail).
fn forward_entry(forward: &Forward) -> LogEntry {
    match forward {
        Forward::Message(m) => LogEntry::Message(m.clone()),
        Forward::Group(e) => LogEntry::Group(e.clone()),
        Forward::Receipt { kind, up_to, at_ms } => {
            LogEntry::Receipt { peer: AccountId(0), kind: *kind, up_to: *up_to, at_ms: *at_ms }
        }
    }
}

fn entry_forward(entry: LogEntry) -> Result<Forward, BadMessage> {
    Ok(match entry {
        LogEntry::Message(m) => Forward::Message(m),
        LogEntry::Group(e) => Forward::Group(e),
        LogEntry::Receipt { kind, up_to, at_ms, .. } => Forward::Receipt { kind, up_to, at_ms },
        _ => return Err(bad("a forward of an unknown kind")),
    })
}

/// A send's edit, deletion and timer: each target as its sequence plus one
/// (0: none), then the timer.
fn write_meta_request(w: &mut Writer, meta: &MetaRequest) {
    w.u64(meta.edits.map_or(0, |s| s.saturating_add(1)));
    w.u64(meta.deletes.map_or(0, |s| s.saturating_add(1)));
    w.u64(meta.expire_after_ms);
}

fn read_meta_request(r: &mut Reader<'_>) -> Result<MetaRequest, BadMessage> {
    Ok(MetaRequest { edits: r.u64()?.checked_sub(1), deletes: r.u64()?.checked_sub(1), expire_after_ms: r.u64()? })
}

impl Mail {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Mail::Send { account, device, client_id, to, payload, meta } => {
                let mut w = start(1);
                w.u64(account.0);
                w.u64(device.0);
                w.bytes(client_id.as_bytes());
                w.u64(to.0);
                w.bytes(payload);
                write_meta_request(&mut w, meta);
                w.0
            }
            Mail::Post { group, author, device, client_id, payload, commit_epoch, message_epoch, meta } => {
                let mut w = start(2);
                w.u64(group.0);
                w.u64(author.0);
                w.u64(device.0);
                w.bytes(client_id.as_bytes());
                w.bytes(payload);
                // 0: not a commit; otherwise the epoch plus one.
                w.u64(commit_epoch.map_or(0, |e| e.saturating_add(1)));
                write_meta_request(&mut w, meta);
                // Only when set, last: a post without it reads as before
                // on a node of the previous release.
                if let Some(epoch) = message_epoch {
                    w.u64(*epoch);
                }
                w.0
            }
            Mail::Group { group, from, request } => {
                let mut w = start(3);
                w.u64(group.0);
                w.u64(from.0);
                w.bytes(&json(request));
                w.0
            }
            Mail::Deliver { to, from, items } => {
                let mut w = start(4);
                w.u64(to.0);
                w.u64(from.0);
                w.u64(items.len() as u64);
                for (seq, forward) in items {
                    w.u64(*seq);
                    w.bytes(&encode_entry(&forward_entry(forward)));
                }
                w.0
            }
            Mail::Attach { account, device, connection, origin } => {
                let mut w = start(5);
                w.u64(account.0);
                w.u64(device.0);
                w.u64(*connection);
                w.bytes(origin.as_bytes());
                w.0
            }
            Mail::Detach { account, device, connection } => {
                let mut w = start(6);
                w.u64(account.0);
                w.u64(device.0);
                w.u64(*connection);
                w.0
            }
            Mail::Ack { account, device, connection, up_to } => {
                let mut w = start(7);
                w.u64(account.0);
                w.u64(device.0);
                w.u64(*connection);
                w.u64(*up_to);
                w.0
            }
            Mail::MarkRead { account, peer, up_to } => {
                let mut w = start(8);
                w.u64(account.0);
                w.u64(peer.0);
                w.u64(*up_to);
                w.0
            }
            Mail::DeviceChange { account, change } => {
                let mut w = start(9);
                w.u64(account.0);
                w.bytes(&encode_entry(&LogEntry::Devices { change: change.clone(), at_ms: 0 }));
                w.0
            }
            Mail::Block { account, peer, blocked } => {
                let mut w = start(10);
                w.u64(account.0);
                w.u64(peer.0);
                w.u8(u8::from(*blocked));
                w.0
            }
            Mail::Deleted { account } => {
                let mut w = start(11);
                w.u64(account.0);
                w.0
            }
            Mail::ContactName { account, peer, name } => {
                let mut w = start(12);
                w.u64(account.0);
                w.u64(peer.0);
                w.bytes(name.as_bytes());
                w.0
            }
        }
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, BadMessage> {
        let (mut r, tag) = open(bytes)?;
        let mail = match tag {
            1 => Mail::Send {
                account: AccountId(r.u64()?),
                device: DeviceId(r.u64()?),
                client_id: r.string()?,
                to: AccountId(r.u64()?),
                payload: Bytes::copy_from_slice(r.bytes()?),
                meta: read_meta_request(&mut r)?,
            },
            2 => Mail::Post {
                group: AccountId(r.u64()?),
                author: AccountId(r.u64()?),
                device: DeviceId(r.u64()?),
                client_id: r.string()?,
                payload: Bytes::copy_from_slice(r.bytes()?),
                commit_epoch: r.u64()?.checked_sub(1),
                meta: read_meta_request(&mut r)?,
                message_epoch: if r.is_done() { None } else { Some(r.u64()?) },
            },
            3 => Mail::Group { group: AccountId(r.u64()?), from: AccountId(r.u64()?), request: from_json(r.bytes()?)? },
            4 => {
                let (to, from) = (AccountId(r.u64()?), AccountId(r.u64()?));
                let count = r.u64()?;
                // Each item takes at least two bytes: bound the count by the input.
                if count > bytes.len() as u64 / 2 {
                    return Err(bad("more forwards than bytes"));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    let seq = r.u64()?;
                    items.push((seq, entry_forward(decode_entry(r.bytes()?)?)?));
                }
                Mail::Deliver { to, from, items }
            }
            5 => Mail::Attach {
                account: AccountId(r.u64()?),
                device: DeviceId(r.u64()?),
                connection: r.u64()?,
                origin: r.string()?,
            },
            6 => Mail::Detach { account: AccountId(r.u64()?), device: DeviceId(r.u64()?), connection: r.u64()? },
            7 => Mail::Ack {
                account: AccountId(r.u64()?),
                device: DeviceId(r.u64()?),
                connection: r.u64()?,
                up_to: r.u64()?,
            },
            8 => Mail::MarkRead { account: AccountId(r.u64()?), peer: AccountId(r.u64()?), up_to: r.u64()? },
            9 => {
                let account = AccountId(r.u64()?);
                match decode_entry(r.bytes()?)? {
                    LogEntry::Devices { change, .. } => Mail::DeviceChange { account, change },
                    _ => return Err(bad("a device change that is not one")),
                }
            }
            11 => Mail::Deleted { account: AccountId(r.u64()?) },
            12 => Mail::ContactName { account: AccountId(r.u64()?), peer: AccountId(r.u64()?), name: r.string()? },
            10 => Mail::Block {
                account: AccountId(r.u64()?),
                peer: AccountId(r.u64()?),
                blocked: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(bad("a block's flag")),
                },
            },
            _ => return Err(bad("unknown mail")),
        };
        r.finish()?;
        Ok(mail)
    }

    /// The actor this mail is for.
    pub(crate) fn actor(&self) -> AccountId {
        match self {
            Mail::Send { account, .. }
            | Mail::Attach { account, .. }
            | Mail::Detach { account, .. }
            | Mail::Ack { account, .. }
            | Mail::MarkRead { account, .. }
            | Mail::DeviceChange { account, .. }
            | Mail::Block { account, .. }
            | Mail::Deleted { account }
            | Mail::ContactName { account, .. } => *account,
            Mail::Post { group, .. } | Mail::Group { group, .. } => *group,
            Mail::Deliver { to, .. } => *to,
        }
    }
}

// Error kinds on the bus. A remote "shutting down" arrives as "restarted":
// for the asker it is a node to retry, not its own shutdown.
const E_UNKNOWN_RECIPIENT: u8 = 1;
const E_UNKNOWN_ACCOUNT: u8 = 2;
const E_RATE_LIMITED: u8 = 3;
const E_GROUP: u8 = 4;
const E_UNAVAILABLE: u8 = 5;
const E_RESTARTED: u8 = 6;
const E_INTERNAL: u8 = 7;
const E_TOO_LARGE: u8 = 8;
const E_INVALID_CLIENT_ID: u8 = 9;
const E_UNREACHABLE: u8 = 10;
const E_YOU_BLOCKED: u8 = 11;
const E_INVALID_NAME: u8 = 12;
const E_META: u8 = 13;

pub(crate) fn encode_answer(answer: &Result<Answer, MessagingError>) -> Vec<u8> {
    match answer {
        Ok(Answer::Send(ack)) => {
            let mut w = start(1);
            w.u64(ack.id.sender.0);
            w.u64(ack.id.seq);
            w.u64(ack.sent_at_ms);
            w.u8(u8::from(ack.duplicate));
            w.0
        }
        Ok(Answer::Deliver(up_to)) => {
            let mut w = start(2);
            w.u64(*up_to);
            w.0
        }
        Ok(Answer::Group(reply)) => {
            let mut w = start(3);
            w.bytes(&json(reply));
            w.0
        }
        Ok(Answer::Done) => start(4).0,
        Err(e) => {
            let mut w = start(5);
            let (kind, number, text) = match e {
                MessagingError::UnknownRecipient => (E_UNKNOWN_RECIPIENT, 0, Vec::new()),
                MessagingError::UnknownAccount => (E_UNKNOWN_ACCOUNT, 0, Vec::new()),
                MessagingError::RateLimited(wait) => {
                    (E_RATE_LIMITED, u64::try_from(wait.as_millis()).unwrap_or(u64::MAX), Vec::new())
                }
                MessagingError::Group(g) => (E_GROUP, 0, json(g)),
                MessagingError::Unavailable(s) => (E_UNAVAILABLE, 0, s.to_string().into_bytes()),
                MessagingError::Restarted | MessagingError::ShuttingDown => (E_RESTARTED, 0, Vec::new()),
                MessagingError::NodeUnreachable => (E_UNREACHABLE, 0, Vec::new()),
                MessagingError::TooLarge { len, max } => (E_TOO_LARGE, *len as u64, max.to_string().into_bytes()),
                MessagingError::InvalidClientId => (E_INVALID_CLIENT_ID, 0, Vec::new()),
                MessagingError::YouBlocked => (E_YOU_BLOCKED, 0, Vec::new()),
                MessagingError::InvalidName => (E_INVALID_NAME, 0, Vec::new()),
                MessagingError::Meta(m) => (E_META, 0, json(m)),
                // Checked at the edge, before any mail: never on the bus.
                MessagingError::InvalidRecipient(_)
                | MessagingError::CommitOutsideGroup
                | MessagingError::Internal(_) => (E_INTERNAL, 0, e.to_string().into_bytes()),
            };
            w.u8(kind);
            w.u64(number);
            w.bytes(&text);
            w.0
        }
    }
}

pub(crate) fn decode_answer(bytes: &[u8]) -> Result<Result<Answer, MessagingError>, BadMessage> {
    let (mut r, tag) = open(bytes)?;
    let answer = match tag {
        1 => Ok(Answer::Send(SendAck {
            id: MessageId { sender: AccountId(r.u64()?), seq: r.u64()? },
            sent_at_ms: r.u64()?,
            duplicate: r.u8()? == 1,
        })),
        2 => Ok(Answer::Deliver(r.u64()?)),
        3 => Ok(Answer::Group(from_json(r.bytes()?)?)),
        4 => Ok(Answer::Done),
        5 => {
            let (kind, number, text) = (r.u8()?, r.u64()?, r.bytes()?);
            Err(match kind {
                E_UNKNOWN_RECIPIENT => MessagingError::UnknownRecipient,
                E_UNKNOWN_ACCOUNT => MessagingError::UnknownAccount,
                E_RATE_LIMITED => MessagingError::RateLimited(std::time::Duration::from_millis(number)),
                E_GROUP => MessagingError::Group(from_json::<GroupError>(text)?),
                E_UNAVAILABLE => {
                    MessagingError::Unavailable(StoreError::Unusable(String::from_utf8_lossy(text).into_owned()))
                }
                E_RESTARTED => MessagingError::Restarted,
                E_TOO_LARGE => MessagingError::TooLarge {
                    len: usize::try_from(number).unwrap_or(usize::MAX),
                    max: String::from_utf8_lossy(text).parse().unwrap_or(0),
                },
                E_INVALID_CLIENT_ID => MessagingError::InvalidClientId,
                E_UNREACHABLE => MessagingError::NodeUnreachable,
                E_YOU_BLOCKED => MessagingError::YouBlocked,
                E_INVALID_NAME => MessagingError::InvalidName,
                E_META => MessagingError::Meta(from_json(text)?),
                _ => MessagingError::Internal("another node failed to answer"),
            })
        }
        _ => return Err(bad("unknown answer")),
    };
    r.finish()?;
    Ok(answer)
}

pub(crate) fn encode_event(number: u64, event: &StreamEvent) -> Vec<u8> {
    let mut w = match event {
        StreamEvent::Event(DeviceEvent::Entry { .. }) => start(1),
        StreamEvent::Event(DeviceEvent::CaughtUp { .. }) => start(2),
        StreamEvent::Event(DeviceEvent::Closed(_)) => start(3),
        StreamEvent::End => start(4),
    };
    w.u64(number);
    match event {
        StreamEvent::Event(DeviceEvent::Entry { seq, entry }) => {
            w.u64(*seq);
            w.bytes(&encode_entry(entry));
        }
        StreamEvent::Event(DeviceEvent::CaughtUp { seq }) => w.u64(*seq),
        StreamEvent::Event(DeviceEvent::Closed(reason)) => w.u8(match reason {
            Disconnect::Replaced => 1,
            Disconnect::DeviceRemoved => 2,
            Disconnect::Operator => 3,
            Disconnect::IdleTimeout => 4,
        }),
        StreamEvent::End => {}
    }
    w.0
}

pub(crate) fn decode_event(bytes: &[u8]) -> Result<(u64, StreamEvent), BadMessage> {
    let (mut r, tag) = open(bytes)?;
    let number = r.u64()?;
    let event = match tag {
        1 => StreamEvent::Event(DeviceEvent::Entry { seq: r.u64()?, entry: Arc::new(decode_entry(r.bytes()?)?) }),
        2 => StreamEvent::Event(DeviceEvent::CaughtUp { seq: r.u64()? }),
        3 => StreamEvent::Event(DeviceEvent::Closed(match r.u8()? {
            1 => Disconnect::Replaced,
            2 => Disconnect::DeviceRemoved,
            3 => Disconnect::Operator,
            4 => Disconnect::IdleTimeout,
            _ => return Err(bad("unknown close reason")),
        })),
        4 => StreamEvent::End,
        _ => return Err(bad("unknown stream event")),
    };
    r.finish()?;
    Ok((number, event))
}

/// A node's broadcast on the presence subject: a note of its connections
/// or typing, or a newcomer's request that every node repeat its
/// connections (`Hello`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Broadcast {
    Note(PresenceNote),
    Hello,
}

fn typing_byte(state: TypingState) -> u8 {
    match state {
        TypingState::Composing => 0,
        TypingState::Paused => 1,
        TypingState::Recording => 2,
    }
}

pub(crate) fn encode_broadcast(node: &str, broadcast: &Broadcast) -> Vec<u8> {
    let mut w = match broadcast {
        Broadcast::Hello => start(1),
        Broadcast::Note(PresenceNote::Connected { .. }) => start(2),
        Broadcast::Note(PresenceNote::Disconnected { .. }) => start(3),
        Broadcast::Note(PresenceNote::Typing { .. }) => start(4),
    };
    w.bytes(node.as_bytes());
    match broadcast {
        Broadcast::Hello => {}
        Broadcast::Note(PresenceNote::Connected { account, device }) => {
            w.u64(account.0);
            w.u64(device.0);
        }
        Broadcast::Note(PresenceNote::Disconnected { account, device, at_ms }) => {
            w.u64(account.0);
            w.u64(device.0);
            w.u64(*at_ms);
        }
        Broadcast::Note(PresenceNote::Typing { from, device, to, state }) => {
            w.u64(from.0);
            w.u64(device.0);
            w.u64(to.0);
            w.u8(typing_byte(*state));
        }
    }
    w.0
}

pub(crate) fn decode_broadcast(bytes: &[u8]) -> Result<(String, Broadcast), BadMessage> {
    let (mut r, tag) = open(bytes)?;
    let node = r.string()?;
    let broadcast = match tag {
        1 => Broadcast::Hello,
        2 => Broadcast::Note(PresenceNote::Connected { account: AccountId(r.u64()?), device: DeviceId(r.u64()?) }),
        3 => Broadcast::Note(PresenceNote::Disconnected {
            account: AccountId(r.u64()?),
            device: DeviceId(r.u64()?),
            at_ms: r.u64()?,
        }),
        4 => Broadcast::Note(PresenceNote::Typing {
            from: AccountId(r.u64()?),
            device: DeviceId(r.u64()?),
            to: AccountId(r.u64()?),
            state: match r.u8()? {
                0 => TypingState::Composing,
                1 => TypingState::Paused,
                2 => TypingState::Recording,
                _ => return Err(bad("unknown typing state")),
            },
        }),
        _ => return Err(bad("unknown broadcast")),
    };
    r.finish()?;
    Ok((node, broadcast))
}

#[cfg(test)]
mod tests {
    use super::*;
    use skylark_core::message::{Message, ReceiptKind};

    fn message() -> Arc<Message> {
        Arc::new(Message {
            meta: Default::default(),
            id: MessageId { sender: AccountId(5), seq: 9 },
            to: AccountId(6),
            sender_device: DeviceId(7),
            client_id: "c-1".into(),
            sent_at_ms: 1_700_000_000_000,
            payload: Bytes::from_static(b"\x00hello\xff"),
        })
    }

    #[test]
    fn mail_answers_and_events_round_trip() {
        let mails = vec![
            Mail::Send {
                meta: Default::default(),
                account: AccountId(1),
                device: DeviceId(2),
                client_id: "id".into(),
                to: AccountId(3),
                payload: Bytes::from_static(b"p"),
            },
            Mail::Send {
                meta: MetaRequest { edits: None, deletes: Some(0), expire_after_ms: 86_400_000 },
                account: AccountId(1),
                device: DeviceId(2),
                client_id: "id2".into(),
                to: AccountId(3),
                payload: Bytes::new(),
            },
            Mail::Post {
                group: AccountId::group(4),
                author: AccountId(1),
                device: DeviceId(2),
                client_id: "p1".into(),
                payload: Bytes::from_static(b"edited"),
                commit_epoch: None,
                message_epoch: None,
                meta: MetaRequest { edits: Some(7), deletes: None, expire_after_ms: 0 },
            },
            Mail::Post {
                group: AccountId::group(4),
                author: AccountId(1),
                device: DeviceId(2),
                client_id: "p2".into(),
                payload: Bytes::from_static(b"\0SKMLS1sealed"),
                commit_epoch: None,
                message_epoch: Some(300),
                meta: MetaRequest::default(),
            },
            Mail::Deliver {
                to: AccountId(6),
                from: AccountId(5),
                items: vec![
                    (4, Forward::Message(message())),
                    (5, Forward::Receipt { kind: ReceiptKind::Read, up_to: 3, at_ms: 8 }),
                ],
            },
            Mail::Attach { account: AccountId(1), device: DeviceId(2), connection: u64::MAX, origin: "n2".into() },
            Mail::Group { group: AccountId::group(4), from: AccountId(1), request: GroupRequest::Info },
            Mail::DeviceChange { account: AccountId(1), change: DeviceChange::Removed { device: DeviceId(3) } },
            Mail::Block { account: AccountId(1), peer: AccountId(8), blocked: true },
            Mail::Block { account: AccountId(1), peer: AccountId(8), blocked: false },
            Mail::Deleted { account: AccountId(9) },
            Mail::ContactName { account: AccountId(9), peer: AccountId(3), name: "Zoë".into() },
        ];
        for mail in mails {
            assert_eq!(Mail::decode(&mail.encode()).unwrap(), mail);
        }
        let answers = vec![
            Ok(Answer::Deliver(12)),
            Ok(Answer::Done),
            Err(MessagingError::Group(GroupError::NotAnAdmin)),
            Err(MessagingError::RateLimited(std::time::Duration::from_millis(1500))),
            Err(MessagingError::Meta(skylark_core::message::MetaError::EditTooLate(900_000))),
        ];
        for answer in answers {
            let back = decode_answer(&encode_answer(&answer)).unwrap();
            assert_eq!(format!("{back:?}"), format!("{answer:?}"));
        }
        let event = StreamEvent::Event(DeviceEvent::Entry { seq: 3, entry: Arc::new(LogEntry::Message(message())) });
        assert_eq!(decode_event(&encode_event(41, &event)).unwrap(), (41, event));
        let typing = PresenceNote::Typing {
            from: AccountId(1),
            device: DeviceId(2),
            to: AccountId(3),
            state: TypingState::Recording,
        };
        for broadcast in [Broadcast::Hello, Broadcast::Note(typing)] {
            assert_eq!(decode_broadcast(&encode_broadcast("n1", &broadcast)).unwrap(), ("n1".into(), broadcast));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic_or_an_allocation() {
        let good =
            Mail::Deliver { to: AccountId(6), from: AccountId(5), items: vec![(4, Forward::Message(message()))] };
        let bytes = good.encode();
        for cut in 0..bytes.len() {
            assert!(Mail::decode(&bytes[..cut]).is_err(), "a prefix of {cut} bytes");
        }
        assert!(Mail::decode(&[VERSION, 4, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(decode_answer(&[9, 1]).is_err());
    }
}
