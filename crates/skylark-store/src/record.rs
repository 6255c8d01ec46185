//! The binary encoding of log entries, outbox items and the embedded
//! store's marks rows on disk.
//!
//! A record is a format version byte, a tag byte, then fields: integers as
//! LEB128 varints, strings and byte strings as a varint length and the
//! bytes. Compact (payloads stay raw bytes), and decoding checks every
//! length against the remaining input, so a corrupt record is an error,
//! never a panic or a huge allocation.

use crate::StoreError;
use skylark_core::group::{GroupBody, GroupEvent, Role};
use skylark_core::message::{DeviceChange, Forward, LogEntry, Message, MessageId, Meta, OutboxItem, ReceiptKind};
use skylark_core::{AccountId, DeviceId};
use std::sync::Arc;

const VERSION: u8 = 1;

const TAG_MESSAGE: u8 = 1;
const TAG_RECEIPT: u8 = 2;
const TAG_READ_SYNC: u8 = 3;
const TAG_DEVICE_LINKED: u8 = 4;
const TAG_DEVICE_RENAMED: u8 = 5;
const TAG_DEVICE_REMOVED: u8 = 6;
const TAG_GROUP: u8 = 7;
const TAG_BLOCK: u8 = 8;
const TAG_CONTACT_NAME: u8 = 9;
const TAG_FORWARD_MESSAGE: u8 = 11;
const TAG_FORWARD_RECEIPT: u8 = 12;
/// A group's forward of one of its own events: a reference into the
/// group's log, not a copy (one is stored per member).
const TAG_FORWARD_GROUP_REF: u8 = 13;

// Group event bodies.
const GROUP_MESSAGE: u8 = 1;
const GROUP_CREATED: u8 = 2;
const GROUP_ADDED: u8 = 3;
const GROUP_REMOVED: u8 = 4;
const GROUP_LEFT: u8 = 5;
const GROUP_PROMOTED: u8 = 6;
const GROUP_DEMOTED: u8 = 7;
const GROUP_SUBJECT: u8 = 8;
const GROUP_ADMIN_ONLY: u8 = 9;

/// Writes the fields of a record (also used by the cluster's node-to-node
/// encoding, so both share one set of rules).
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u64(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b);
    }
}

/// Reads the fields [`Writer`] wrote; every length is checked against the
/// input left.
pub struct Reader<'a> {
    buf: &'a [u8],
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("record: {what}"))
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    pub fn u8(&mut self) -> Result<u8, StoreError> {
        let (&first, rest) = self.buf.split_first().ok_or_else(|| corrupt("truncated"))?;
        self.buf = rest;
        Ok(first)
    }
    pub fn u64(&mut self) -> Result<u64, StoreError> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(corrupt("varint too long"))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let len = usize::try_from(self.u64()?).map_err(|_| corrupt("length"))?;
        if len > self.buf.len() {
            return Err(corrupt("length beyond the record"));
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }
    pub fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| corrupt("string is not utf-8"))
    }
    fn kind(&mut self) -> Result<ReceiptKind, StoreError> {
        match self.u8()? {
            0 => Ok(ReceiptKind::Delivered),
            1 => Ok(ReceiptKind::Read),
            _ => Err(corrupt("receipt kind")),
        }
    }
    /// Whether everything has been read (for a field a newer writer
    /// appends only when it has one).
    pub fn is_done(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn finish(self) -> Result<(), StoreError> {
        if self.buf.is_empty() { Ok(()) } else { Err(corrupt("trailing bytes")) }
    }
}

/// Slots of the per-peer marks (PostgreSQL's `receipts` table, the embedded
/// store's peer rows), in both backends: the receipt kinds
/// (`kind_byte`: 0 delivered, 1 read) received from the peer, then these.
/// The account's read marker for the peer's messages.
pub(crate) const READ_MARKER_SLOT: u8 = 2;
/// The highest of the peer's sequence numbers the account received.
pub(crate) const RECEIVED_SLOT: u8 = 3;

/// One account's marks rows, (peer, slot, high-water mark) by ascending
/// peer, as the [`crate::ReceiptState`] callers see.
pub(crate) fn receipt_state(rows: impl IntoIterator<Item = (u64, u8, u64)>) -> crate::ReceiptState {
    let mut received: std::collections::BTreeMap<u64, (u64, u64)> = std::collections::BTreeMap::new();
    let mut state = crate::ReceiptState::default();
    for (peer, slot, hwm) in rows {
        match slot {
            READ_MARKER_SLOT => state.read_markers.push((AccountId(peer), hwm)),
            RECEIVED_SLOT => {}
            s if s == kind_byte(ReceiptKind::Delivered) => received.entry(peer).or_default().0 = hwm,
            _ => received.entry(peer).or_default().1 = hwm,
        }
    }
    state.received = received.into_iter().map(|(p, (d, r))| (AccountId(p), d, r)).collect();
    state
}

/// Where the embedded store keeps an account's inbound position from a
/// source (the highest of its outbox sequence numbers applied): a slot of
/// the same row as the receipts (see [`PeerMarks`]).
pub(crate) const INBOUND_SLOT: u8 = 4;
const PEER_SLOTS: usize = 5;
const CONTACT_FLAG: u8 = 1 << PEER_SLOTS;
const MARKS_VERSION: u8 = 1;

/// A reader past the version byte of a marks row.
fn marks_reader(bytes: &[u8]) -> Result<Reader<'_>, StoreError> {
    let mut r = Reader::new(bytes);
    if r.u8()? != MARKS_VERSION {
        return Err(corrupt("marks version"));
    }
    Ok(r)
}

/// What one account keeps about one peer, as one row of the embedded
/// store's `marks` table: the slots above (receipts received from the
/// peer, the read marker, how far the peer's messages were received, how
/// far its outbox was applied) and whether the account wrote to it. The
/// small changes a message makes at either end land in one row instead of
/// three tables. An absent slot is one never written (kept apart from 0,
/// so a copy to PostgreSQL yields the same rows as before the merge).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PeerMarks {
    pub slots: [Option<u64>; PEER_SLOTS],
    pub contact: bool,
}

impl PeerMarks {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(MARKS_VERSION);
        let mut flags = if self.contact { CONTACT_FLAG } else { 0 };
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.is_some() {
                flags |= 1 << i;
            }
        }
        w.u8(flags);
        for v in self.slots.iter().flatten() {
            w.u64(*v);
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = marks_reader(bytes)?;
        let flags = r.u8()?;
        if flags & !(CONTACT_FLAG | (CONTACT_FLAG - 1)) != 0 {
            return Err(corrupt("marks flags"));
        }
        let mut marks = Self { contact: flags & CONTACT_FLAG != 0, ..Self::default() };
        for (i, slot) in marks.slots.iter_mut().enumerate() {
            if flags & (1 << i) != 0 {
                *slot = Some(r.u64()?);
            }
        }
        r.finish()?;
        Ok(marks)
    }

    pub fn slot(&self, slot: u8) -> Option<u64> {
        self.slots.get(usize::from(slot)).copied().flatten()
    }

    pub fn set(&mut self, slot: u8, value: u64) {
        if let Some(s) = self.slots.get_mut(usize::from(slot)) {
            *s = Some(value);
        }
    }

    /// The rows of the receipt slots (0 to 3) as the former `receipts`
    /// table held them: (slot, high-water mark).
    pub fn receipt_rows(&self) -> impl Iterator<Item = (u8, u64)> + '_ {
        (0..=RECEIVED_SLOT).filter_map(|slot| self.slot(slot).map(|v| (slot, v)))
    }
}

/// An account's own row of the `marks` table (peer 0, which no account
/// has): its sequence counters and its devices' delivery cursors, so an
/// ack and the receipt it sends change one row.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct OwnMarks {
    pub counters: Option<crate::Counters>,
    /// (device, highest log sequence it acknowledged), by device.
    pub cursors: Vec<(u64, u64)>,
}

impl OwnMarks {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(MARKS_VERSION);
        match self.counters {
            Some(c) => {
                w.u8(1);
                w.u64(c.next_seq);
                w.u64(c.next_outbox);
            }
            None => w.u8(0),
        }
        w.u64(self.cursors.len() as u64);
        for (device, seq) in &self.cursors {
            w.u64(*device);
            w.u64(*seq);
        }
        w.0
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let mut r = marks_reader(bytes)?;
        let counters = match r.u8()? {
            0 => None,
            1 => Some(crate::Counters { next_seq: r.u64()?, next_outbox: r.u64()? }),
            _ => return Err(corrupt("marks counters")),
        };
        let count = r.u64()?;
        // Each cursor takes at least two bytes: the count cannot ask for
        // more than the record holds, and nothing is reserved from it.
        let mut cursors = Vec::new();
        for _ in 0..count {
            cursors.push((r.u64()?, r.u64()?));
        }
        r.finish()?;
        Ok(Self { counters, cursors })
    }

    pub fn cursor(&self, device: u64) -> Option<u64> {
        self.cursors.iter().find(|(d, _)| *d == device).map(|(_, seq)| *seq)
    }

    pub fn set_cursor(&mut self, device: u64, seq: u64) {
        match self.cursors.binary_search_by_key(&device, |(d, _)| *d) {
            Ok(i) => self.cursors[i].1 = seq,
            Err(i) => self.cursors.insert(i, (device, seq)),
        }
    }

    pub fn remove_cursor(&mut self, device: u64) {
        self.cursors.retain(|(d, _)| *d != device);
    }
}

pub(crate) fn kind_byte(kind: ReceiptKind) -> u8 {
    match kind {
        ReceiptKind::Delivered => 0,
        ReceiptKind::Read => 1,
    }
}

/// Starts the optional last section of a message or a group post: its
/// [`Meta`], written only when it is not the default (records written
/// before it existed have none and read as the default).
const META_MARK: u8 = 0xA5;
const META_EDITS: u8 = 1;
const META_DELETES: u8 = 2;
const META_EXPIRES: u8 = 4;
const META_PURGED: u8 = 8;

fn write_meta(w: &mut Writer, meta: &Meta) {
    if meta.is_default() {
        return;
    }
    w.u8(META_MARK);
    let flags = [
        (meta.edits.is_some(), META_EDITS),
        (meta.deletes.is_some(), META_DELETES),
        (meta.expires_at_ms.is_some(), META_EXPIRES),
        (meta.purged, META_PURGED),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .fold(0, |f, (_, bit)| f | bit);
    w.u8(flags);
    for v in [meta.edits, meta.deletes, meta.expires_at_ms].into_iter().flatten() {
        w.u64(v);
    }
}

/// Reads the meta section if the record has one (it is always last).
fn read_meta(r: &mut Reader<'_>) -> Result<Meta, StoreError> {
    if r.buf.first() != Some(&META_MARK) {
        return Ok(Meta::default());
    }
    r.u8()?;
    let flags = r.u8()?;
    if flags == 0 || flags & !(META_EDITS | META_DELETES | META_EXPIRES | META_PURGED) != 0 {
        return Err(corrupt("message meta flags"));
    }
    let mut field = |bit: u8| if flags & bit != 0 { r.u64().map(Some) } else { Ok(None) };
    let edits = field(META_EDITS)?;
    let deletes = field(META_DELETES)?;
    let expires_at_ms = field(META_EXPIRES)?;
    Ok(Meta { edits, deletes, expires_at_ms, purged: flags & META_PURGED != 0 })
}

fn write_message(w: &mut Writer, m: &Message) {
    w.u64(m.id.sender.0);
    w.u64(m.id.seq);
    w.u64(m.to.0);
    w.u64(m.sender_device.0);
    w.bytes(m.client_id.as_bytes());
    w.u64(m.sent_at_ms);
    w.bytes(&m.payload);
    write_meta(w, &m.meta);
}

fn read_message(r: &mut Reader<'_>) -> Result<Message, StoreError> {
    Ok(Message {
        id: MessageId { sender: AccountId(r.u64()?), seq: r.u64()? },
        to: AccountId(r.u64()?),
        sender_device: DeviceId(r.u64()?),
        client_id: r.string()?,
        sent_at_ms: r.u64()?,
        payload: bytes::Bytes::copy_from_slice(r.bytes()?),
        meta: read_meta(r)?,
    })
}

fn write_group(w: &mut Writer, e: &GroupEvent) {
    w.u64(e.group.0);
    w.u64(e.seq);
    w.u64(e.by.0);
    w.u64(e.at_ms);
    match &e.body {
        GroupBody::Message { device, client_id, payload, meta } => {
            w.u8(GROUP_MESSAGE);
            w.u64(device.0);
            w.bytes(client_id.as_bytes());
            w.bytes(payload);
            write_meta(w, meta);
        }
        GroupBody::Created { subject, members } => {
            w.u8(GROUP_CREATED);
            w.bytes(subject.as_bytes());
            w.u64(members.len() as u64);
            for (m, role) in members {
                w.u64(m.0);
                w.u8(u8::from(*role == Role::Admin));
            }
        }
        GroupBody::Added { members } => {
            w.u8(GROUP_ADDED);
            w.u64(members.len() as u64);
            for m in members {
                w.u64(m.0);
            }
        }
        GroupBody::Removed { member } => {
            w.u8(GROUP_REMOVED);
            w.u64(member.0);
        }
        GroupBody::Left => w.u8(GROUP_LEFT),
        GroupBody::Promoted { member } => {
            w.u8(GROUP_PROMOTED);
            w.u64(member.0);
        }
        GroupBody::Demoted { member } => {
            w.u8(GROUP_DEMOTED);
            w.u64(member.0);
        }
        GroupBody::Subject { subject } => {
            w.u8(GROUP_SUBJECT);
            w.bytes(subject.as_bytes());
        }
        GroupBody::AdminOnly { admin_only } => {
            w.u8(GROUP_ADMIN_ONLY);
            w.u8(u8::from(*admin_only));
        }
    }
}

/// A count read from a record, bounded by what the rest of the record can
/// hold (every element takes at least one byte), so a corrupt count never
/// drives a large allocation.
fn count(r: &mut Reader<'_>) -> Result<usize, StoreError> {
    let n = usize::try_from(r.u64()?).map_err(|_| corrupt("count"))?;
    if n > r.buf.len() {
        return Err(corrupt("count beyond the record"));
    }
    Ok(n)
}

fn read_group(r: &mut Reader<'_>) -> Result<GroupEvent, StoreError> {
    let group = AccountId(r.u64()?);
    let seq = r.u64()?;
    let by = AccountId(r.u64()?);
    let at_ms = r.u64()?;
    let body = match r.u8()? {
        GROUP_MESSAGE => GroupBody::Message {
            device: DeviceId(r.u64()?),
            client_id: r.string()?,
            payload: bytes::Bytes::copy_from_slice(r.bytes()?),
            meta: read_meta(r)?,
        },
        GROUP_CREATED => {
            let subject = r.string()?;
            let n = count(r)?;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                let m = AccountId(r.u64()?);
                let role = if r.u8()? == 1 { Role::Admin } else { Role::Member };
                members.push((m, role));
            }
            GroupBody::Created { subject, members }
        }
        GROUP_ADDED => {
            let n = count(r)?;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                members.push(AccountId(r.u64()?));
            }
            GroupBody::Added { members }
        }
        GROUP_REMOVED => GroupBody::Removed { member: AccountId(r.u64()?) },
        GROUP_LEFT => GroupBody::Left,
        GROUP_PROMOTED => GroupBody::Promoted { member: AccountId(r.u64()?) },
        GROUP_DEMOTED => GroupBody::Demoted { member: AccountId(r.u64()?) },
        GROUP_SUBJECT => GroupBody::Subject { subject: r.string()? },
        GROUP_ADMIN_ONLY => GroupBody::AdminOnly { admin_only: r.u8()? == 1 },
        _ => return Err(corrupt("unknown group event")),
    };
    Ok(GroupEvent { group, seq, by, at_ms, body })
}

pub fn encode_entry(entry: &LogEntry) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(VERSION);
    match entry {
        LogEntry::Message(m) => {
            w.u8(TAG_MESSAGE);
            write_message(&mut w, m);
        }
        LogEntry::Receipt { peer, kind, up_to, at_ms } => {
            w.u8(TAG_RECEIPT);
            w.u64(peer.0);
            w.u8(kind_byte(*kind));
            w.u64(*up_to);
            w.u64(*at_ms);
        }
        LogEntry::ReadSync { peer, up_to, at_ms } => {
            w.u8(TAG_READ_SYNC);
            w.u64(peer.0);
            w.u64(*up_to);
            w.u64(*at_ms);
        }
        LogEntry::Devices { change, at_ms } => {
            match change {
                DeviceChange::Linked { device, name } => {
                    w.u8(TAG_DEVICE_LINKED);
                    w.u64(device.0);
                    w.bytes(name.as_bytes());
                }
                DeviceChange::Renamed { device, name } => {
                    w.u8(TAG_DEVICE_RENAMED);
                    w.u64(device.0);
                    w.bytes(name.as_bytes());
                }
                DeviceChange::Removed { device } => {
                    w.u8(TAG_DEVICE_REMOVED);
                    w.u64(device.0);
                }
            }
            w.u64(*at_ms);
        }
        LogEntry::Block { peer, blocked, at_ms } => {
            w.u8(TAG_BLOCK);
            w.u64(peer.0);
            w.u8(u8::from(*blocked));
            w.u64(*at_ms);
        }
        LogEntry::ContactName { peer, name, at_ms } => {
            w.u8(TAG_CONTACT_NAME);
            w.u64(peer.0);
            w.bytes(name.as_bytes());
            w.u64(*at_ms);
        }
        LogEntry::Group(e) => {
            w.u8(TAG_GROUP);
            write_group(&mut w, e);
        }
    }
    w.0
}

pub fn decode_entry(bytes: &[u8]) -> Result<LogEntry, StoreError> {
    let mut r = Reader { buf: bytes };
    if r.u8()? != VERSION {
        return Err(corrupt("unknown version"));
    }
    let entry = match r.u8()? {
        TAG_MESSAGE => LogEntry::Message(Arc::new(read_message(&mut r)?)),
        TAG_RECEIPT => {
            LogEntry::Receipt { peer: AccountId(r.u64()?), kind: r.kind()?, up_to: r.u64()?, at_ms: r.u64()? }
        }
        TAG_READ_SYNC => LogEntry::ReadSync { peer: AccountId(r.u64()?), up_to: r.u64()?, at_ms: r.u64()? },
        TAG_DEVICE_LINKED => {
            let change = DeviceChange::Linked { device: DeviceId(r.u64()?), name: r.string()? };
            LogEntry::Devices { change, at_ms: r.u64()? }
        }
        TAG_DEVICE_RENAMED => {
            let change = DeviceChange::Renamed { device: DeviceId(r.u64()?), name: r.string()? };
            LogEntry::Devices { change, at_ms: r.u64()? }
        }
        TAG_DEVICE_REMOVED => {
            LogEntry::Devices { change: DeviceChange::Removed { device: DeviceId(r.u64()?) }, at_ms: r.u64()? }
        }
        TAG_GROUP => LogEntry::Group(Arc::new(read_group(&mut r)?)),
        TAG_BLOCK => {
            let peer = AccountId(r.u64()?);
            let blocked = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(corrupt("a block's flag")),
            };
            LogEntry::Block { peer, blocked, at_ms: r.u64()? }
        }
        TAG_CONTACT_NAME => LogEntry::ContactName { peer: AccountId(r.u64()?), name: r.string()?, at_ms: r.u64()? },
        _ => return Err(corrupt("unknown log entry tag")),
    };
    r.finish()?;
    Ok(entry)
}

pub fn encode_outbox(item: &OutboxItem) -> Vec<u8> {
    let mut w = Writer::default();
    w.u8(VERSION);
    match &item.forward {
        Forward::Message(m) => {
            w.u8(TAG_FORWARD_MESSAGE);
            w.u64(item.to.0);
            write_message(&mut w, m);
        }
        Forward::Receipt { kind, up_to, at_ms } => {
            w.u8(TAG_FORWARD_RECEIPT);
            w.u64(item.to.0);
            w.u8(kind_byte(*kind));
            w.u64(*up_to);
            w.u64(*at_ms);
        }
        Forward::Group(e) => {
            w.u8(TAG_FORWARD_GROUP_REF);
            w.u64(item.to.0);
            w.u64(e.seq);
        }
    }
    w.0
}

/// An outbox record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredOutbox {
    Item(OutboxItem),
    /// The group's own event `seq` for `to`; the event is in the group's
    /// log (the store joins it back in when it loads the outbox).
    GroupEvent {
        to: AccountId,
        seq: u64,
    },
}

pub fn decode_outbox(bytes: &[u8]) -> Result<StoredOutbox, StoreError> {
    let mut r = Reader { buf: bytes };
    if r.u8()? != VERSION {
        return Err(corrupt("unknown version"));
    }
    let item = match r.u8()? {
        TAG_FORWARD_MESSAGE => {
            OutboxItem { to: AccountId(r.u64()?), forward: Forward::Message(Arc::new(read_message(&mut r)?)) }
        }
        TAG_FORWARD_RECEIPT => OutboxItem {
            to: AccountId(r.u64()?),
            forward: Forward::Receipt { kind: r.kind()?, up_to: r.u64()?, at_ms: r.u64()? },
        },
        TAG_FORWARD_GROUP_REF => {
            let stored = StoredOutbox::GroupEvent { to: AccountId(r.u64()?), seq: r.u64()? };
            r.finish()?;
            return Ok(stored);
        }
        _ => return Err(corrupt("unknown outbox tag")),
    };
    r.finish()?;
    Ok(StoredOutbox::Item(item))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message {
            id: MessageId { sender: AccountId(7), seq: 300 },
            to: AccountId(u64::MAX),
            sender_device: DeviceId(9),
            client_id: "c-1".into(),
            sent_at_ms: 1_700_000_000_000,
            payload: vec![0, 1, 2, 255].into(),
            meta: Meta::default(),
        }
    }

    #[test]
    fn entries_round_trip() {
        for entry in [
            LogEntry::Message(std::sync::Arc::new(message())),
            LogEntry::Message(std::sync::Arc::new(Message {
                meta: Meta { edits: Some(299), deletes: None, expires_at_ms: Some(1 << 50), purged: false },
                ..message()
            })),
            LogEntry::Message(std::sync::Arc::new(Message {
                meta: Meta { edits: None, deletes: Some(7), expires_at_ms: None, purged: false },
                ..message()
            })),
            LogEntry::Message(std::sync::Arc::new(message().purged())),
            LogEntry::Receipt { peer: AccountId(3), kind: ReceiptKind::Read, up_to: 12, at_ms: 5 },
            LogEntry::ReadSync { peer: AccountId(4), up_to: 1 << 40, at_ms: 6 },
            LogEntry::Devices { change: DeviceChange::Linked { device: DeviceId(5), name: "laptop".into() }, at_ms: 7 },
            LogEntry::Devices { change: DeviceChange::Renamed { device: DeviceId(5), name: "work".into() }, at_ms: 8 },
            LogEntry::Devices { change: DeviceChange::Removed { device: DeviceId(5) }, at_ms: 9 },
            LogEntry::Block { peer: AccountId(12), blocked: true, at_ms: 10 },
            LogEntry::Block { peer: AccountId(12), blocked: false, at_ms: 11 },
            LogEntry::ContactName { peer: AccountId(12), name: "Ana María".into(), at_ms: 12 },
            LogEntry::ContactName { peer: AccountId(12), name: String::new(), at_ms: 13 },
        ]
        .into_iter()
        .chain(group_events().into_iter().map(LogEntry::Group))
        {
            assert_eq!(decode_entry(&encode_entry(&entry)).unwrap(), entry);
        }
        for item in [
            OutboxItem { to: AccountId(2), forward: Forward::Message(std::sync::Arc::new(message())) },
            OutboxItem {
                to: AccountId(2),
                forward: Forward::Receipt { kind: ReceiptKind::Delivered, up_to: 3, at_ms: 4 },
            },
        ] {
            assert_eq!(decode_outbox(&encode_outbox(&item)).unwrap(), StoredOutbox::Item(item));
        }
        // A group's forwards are stored as references to its log.
        for e in group_events() {
            let item = OutboxItem { to: AccountId(5), forward: Forward::Group(e.clone()) };
            let stored = encode_outbox(&item);
            assert!(stored.len() < 16, "a reference, not a copy: {} bytes", stored.len());
            assert_eq!(decode_outbox(&stored).unwrap(), StoredOutbox::GroupEvent { to: AccountId(5), seq: e.seq });
        }
    }

    fn group_events() -> Vec<Arc<GroupEvent>> {
        let g = AccountId::group(3);
        [
            GroupBody::Message {
                device: DeviceId(4),
                client_id: "g-1".into(),
                payload: vec![9; 3].into(),
                meta: Meta::default(),
            },
            GroupBody::Message {
                device: DeviceId(4),
                client_id: "g-2".into(),
                payload: bytes::Bytes::new(),
                meta: Meta { edits: None, deletes: Some(1), expires_at_ms: Some(u64::MAX), purged: true },
            },
            GroupBody::Created {
                subject: "trip".into(),
                members: vec![(AccountId(1), Role::Admin), (AccountId(2), Role::Member)],
            },
            GroupBody::Added { members: vec![AccountId(3), AccountId(4)] },
            GroupBody::Removed { member: AccountId(3) },
            GroupBody::Left,
            GroupBody::Promoted { member: AccountId(2) },
            GroupBody::Demoted { member: AccountId(2) },
            GroupBody::Subject { subject: "plans".into() },
            GroupBody::AdminOnly { admin_only: true },
        ]
        .into_iter()
        .enumerate()
        .map(|(i, body)| Arc::new(GroupEvent { group: g, seq: i as u64 + 1, by: AccountId(1), at_ms: 77, body }))
        .collect()
    }

    #[test]
    fn a_corrupt_member_count_is_an_error_not_an_allocation() {
        let mut w = Writer::default();
        w.u8(VERSION);
        w.u8(TAG_GROUP);
        for v in [1, 1, 1, 1] {
            w.u64(v);
        }
        w.u8(GROUP_ADDED);
        w.u64(u64::MAX >> 1);
        assert!(decode_entry(&w.0).is_err());
    }

    #[test]
    fn marks_rows_keep_which_slots_were_written() {
        let empty = PeerMarks::default();
        assert_eq!(PeerMarks::decode(&empty.encode()).unwrap(), empty);
        let mut peer = PeerMarks { contact: true, ..PeerMarks::default() };
        peer.set(INBOUND_SLOT, u64::MAX);
        peer.set(READ_MARKER_SLOT, 0);
        let decoded = PeerMarks::decode(&peer.encode()).unwrap();
        assert_eq!(decoded, peer);
        assert_eq!(decoded.slot(READ_MARKER_SLOT), Some(0), "a zero is not an absence");
        assert_eq!(decoded.slot(RECEIVED_SLOT), None);
        assert_eq!(decoded.receipt_rows().collect::<Vec<_>>(), vec![(READ_MARKER_SLOT, 0)]);
        let mut own = OwnMarks { counters: Some(crate::Counters { next_seq: 9, next_outbox: 2 }), cursors: vec![] };
        own.set_cursor(5, 1);
        own.set_cursor(2, 0);
        own.set_cursor(5, 3);
        assert_eq!(own.cursors, vec![(2, 0), (5, 3)], "one per device, by device");
        assert_eq!(OwnMarks::decode(&own.encode()).unwrap(), own);
        own.remove_cursor(2);
        assert_eq!(own.cursor(2), None);
        assert_eq!(own.cursor(5), Some(3));
        let (peer_bytes, own_bytes) = (peer.encode(), own.encode());
        for cut in 0..peer_bytes.len() {
            assert!(PeerMarks::decode(&peer_bytes[..cut]).is_err(), "truncated at {cut}");
        }
        for cut in 0..own_bytes.len() {
            assert!(OwnMarks::decode(&own_bytes[..cut]).is_err(), "truncated at {cut}");
        }
        // Unknown flags, a count beyond the record, trailing bytes.
        assert!(PeerMarks::decode(&[MARKS_VERSION, 0x80]).is_err());
        assert!(OwnMarks::decode(&[MARKS_VERSION, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(OwnMarks::decode(&[MARKS_VERSION, 0, 0, 0]).is_err());
    }

    #[test]
    fn corrupt_records_are_errors() {
        let good = encode_entry(&LogEntry::Message(std::sync::Arc::new(message())));
        for cut in 0..good.len() {
            assert!(decode_entry(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode_entry(&long).is_err());
        // A length prefix claiming more than the record holds.
        assert!(decode_entry(&[VERSION, TAG_MESSAGE, 1, 1, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]).is_err());
        assert!(decode_outbox(&good).is_err(), "a log entry is not an outbox item");
    }
}
