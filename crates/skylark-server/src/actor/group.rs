//! The actor of a group: the same actor as an account's, with a roster.
//!
//! A group's actor is the single writer of the group's log. Every post and
//! every change becomes one [`GroupEvent`] with the next group sequence,
//! and goes into the group's durable outbox once per member account, so
//! members receive group events through the same forward-with-retries path
//! as 1:1 messages, in group order. Members that join get events from their
//! join on; members that leave or are removed get the event that says so
//! and nothing after it.
//!
//! Receipts: a member's account acknowledges group events like any other
//! log entries and sends the group cumulative delivered / read positions
//! (in group sequence numbers). The group keeps them per member, answers
//! "message info" from them, and tells a message's author when every
//! member has it (delivered) or has read it, as a receipt in the author's
//! log with the group as its peer.

use super::{Actor, SendFailure, SendMail};
use crate::messaging::{GroupReply, GroupRequest, MessageInfo, MessagingError, SendAck};
use skylark_core::group::{GroupBody, GroupChange, GroupError, GroupEvent, GroupMeta};
use skylark_core::message::{Forward, LogEntry, MessageId, ReceiptKind};
use skylark_core::{AccountId, DeviceId};
use skylark_store::{AccountWrite, Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

pub(crate) struct GroupState {
    meta: GroupMeta,
    /// Per current member: highest group sequence delivered to any of its
    /// devices, and highest it read.
    positions: HashMap<AccountId, (u64, u64)>,
    /// The lowest delivered and read positions over all members, as the
    /// authors were last told.
    marks: (u64, u64),
}

impl GroupState {
    pub(super) async fn load(store: &dyn Store, id: AccountId) -> Result<Option<GroupState>, StoreError> {
        let Some(meta) = store.group(id).await? else { return Ok(None) };
        let stored: HashMap<AccountId, (u64, u64)> =
            store.receipt_state(id).await?.received.into_iter().map(|(m, d, r)| (m, (d, r))).collect();
        let positions = meta
            .members
            .iter()
            .map(|m| {
                let joined = m.joined_seq - 1;
                let (d, r) = stored.get(&m.account).copied().unwrap_or_default();
                (m.account, (d.max(joined), r.max(joined)))
            })
            .collect();
        let mut state = GroupState { meta, positions, marks: (0, 0) };
        // Author receipts go out in the same write as the positions that
        // move the marks, so whatever the marks are now was already told.
        state.marks = state.lowest();
        Ok(Some(state))
    }

    fn lowest(&self) -> (u64, u64) {
        let delivered = self.positions.values().map(|p| p.0).min().unwrap_or(self.marks.0);
        let read = self.positions.values().map(|p| p.1).min().unwrap_or(self.marks.1);
        (delivered, read)
    }
}

fn refused(e: GroupError) -> SendFailure {
    SendFailure::Refused(MessagingError::Group(e))
}

impl Actor {
    fn group_state(&self) -> Result<&GroupState, SendFailure> {
        self.group.as_deref().ok_or_else(|| refused(GroupError::UnknownGroup))
    }

    /// A member posts a message.
    pub(super) async fn post(
        &mut self,
        write: &mut AccountWrite,
        batch_ids: &mut HashMap<(DeviceId, String), SendAck>,
        mail: &SendMail,
        kick: &mut HashSet<AccountId>,
    ) -> Result<SendAck, SendFailure> {
        let state = self.group_state()?;
        // A resend of an accepted post is answered as such, even if its
        // author has left since: the post happened.
        let key = (mail.device, mail.client_id.clone());
        if let Some(ack) = batch_ids.get(&key) {
            return Ok(SendAck { duplicate: true, ..*ack });
        }
        let store = self.router.inner.store.clone();
        if let Some(seq) = store.client_id(self.account, mail.device, &mail.client_id).await? {
            let sent_at_ms = match store.read_log(self.account, seq, 1).await?.first() {
                Some((_, entry)) => entry.at_ms(),
                None => 0,
            };
            return Ok(SendAck { id: MessageId { sender: self.account, seq }, sent_at_ms, duplicate: true });
        }
        self.router.charge_send(mail.device).map_err(SendFailure::Refused)?;
        let change =
            GroupChange::Post { device: mail.device, client_id: mail.client_id.clone(), payload: mail.payload.clone() };
        let body =
            state.meta.check(mail.account, change, self.router.inner.config.max_group_members).map_err(refused)?;
        let (seq, sent_at_ms) = self.record(write, mail.account, body, kick);
        // Posting means having seen the conversation up to here.
        self.advance_position(write, mail.account, ReceiptKind::Read, seq);
        write.client_ids.push((mail.device, mail.client_id.clone(), seq));
        let ack = SendAck { id: MessageId { sender: self.account, seq }, sent_at_ms, duplicate: false };
        batch_ids.insert(key, ack);
        metrics::counter!("skylark_group_messages_accepted_total").increment(1);
        Ok(ack)
    }

    pub(super) async fn group_request(
        &mut self,
        write: &mut AccountWrite,
        from: AccountId,
        request: GroupRequest,
        kick: &mut HashSet<AccountId>,
    ) -> Result<GroupReply, SendFailure> {
        let max = self.router.inner.config.max_group_members;
        match request {
            GroupRequest::Create { subject, members } => {
                if self.group.is_some() || self.last_seq() > 0 {
                    // Ids are allocated fresh for every creation.
                    return Err(SendFailure::Refused(MessagingError::Internal("group id reused")));
                }
                let now = self.now();
                let (meta, body) =
                    GroupMeta::create(self.account, from, subject, &members, max, now).map_err(refused)?;
                let positions = meta.members.iter().map(|m| (m.account, (0, 0))).collect();
                write.memberships.extend(meta.members.iter().map(|m| (m.account, true)));
                self.group = Some(Box::new(GroupState { meta, positions, marks: (0, 0) }));
                self.record(write, from, body, kick);
            }
            GroupRequest::Change(change) => {
                let body = self.group_state()?.meta.check(from, change, max).map_err(refused)?;
                self.record(write, from, body, kick);
            }
            GroupRequest::Info => {
                self.member_check(from)?;
            }
            GroupRequest::MessageInfo { seq } => return self.message_info(from, seq).await,
        }
        Ok(GroupReply::Info(self.group_state()?.meta.clone()))
    }

    fn member_check(&self, from: AccountId) -> Result<(), SendFailure> {
        match self.group_state()?.meta.member(from) {
            Some(_) => Ok(()),
            None => Err(refused(GroupError::NotAMember)),
        }
    }

    async fn message_info(&self, from: AccountId, seq: u64) -> Result<GroupReply, SendFailure> {
        self.member_check(from)?;
        let state = self.group_state()?;
        let entry = if seq == 0 || seq > self.last_seq() { Vec::new() } else { self.entries(seq, seq).await? };
        let Some(LogEntry::Group(event)) = entry.first().map(|(_, e)| e.as_ref()) else {
            return Err(refused(GroupError::UnknownMessage));
        };
        let GroupBody::Message { .. } = &event.body else {
            return Err(refused(GroupError::UnknownMessage));
        };
        if event.by != from {
            return Err(refused(GroupError::NotAuthor));
        }
        let mut recipients: Vec<(AccountId, bool, bool)> = state
            .meta
            .members
            .iter()
            .filter(|m| m.account != from && m.joined_seq < seq)
            .map(|m| {
                let (d, r) = state.positions.get(&m.account).copied().unwrap_or_default();
                (m.account, d >= seq, r >= seq)
            })
            .collect();
        recipients.sort_unstable_by_key(|r| r.0);
        Ok(GroupReply::MessageInfo(MessageInfo { group: self.account, seq, sent_at_ms: event.at_ms, recipients }))
    }

    /// Records an event: appends it to the group's log, applies it to the
    /// roster, and queues it for every account that was or became a member
    /// by it. Returns its sequence number and time.
    fn record(
        &mut self,
        write: &mut AccountWrite,
        by: AccountId,
        body: GroupBody,
        kick: &mut HashSet<AccountId>,
    ) -> (u64, u64) {
        let seq = self.counters.next_seq;
        let at_ms = self.now();
        let event = Arc::new(GroupEvent { group: self.account, seq, by, at_ms, body });
        self.append(write, LogEntry::Group(event.clone()));
        let Some(state) = self.group.as_deref_mut() else { return (seq, at_ms) };
        let mut recipients: Vec<AccountId> = state.meta.members.iter().map(|m| m.account).collect();
        let promote = state.meta.apply(by, seq, &event.body);
        match &event.body {
            GroupBody::Message { .. } => {}
            GroupBody::Added { members } => {
                for m in members {
                    recipients.push(*m);
                    // A member is owed events from its join on.
                    state.positions.insert(*m, (seq - 1, seq - 1));
                    write.receipts.push((*m, ReceiptKind::Delivered, seq - 1));
                    write.receipts.push((*m, ReceiptKind::Read, seq - 1));
                    write.memberships.push((*m, true));
                }
            }
            GroupBody::Removed { member } => {
                state.positions.remove(member);
                write.memberships.push((*member, false));
            }
            GroupBody::Left => {
                state.positions.remove(&by);
                write.memberships.push((by, false));
            }
            _ => {}
        }
        if !matches!(event.body, GroupBody::Message { .. }) {
            write.group = Some(state.meta.clone());
        }
        for to in recipients {
            self.enqueue_forward(write, to, Forward::Group(event.clone()));
            kick.insert(to);
        }
        if let Some(member) = promote {
            let group = self.account;
            self.record(write, group, GroupBody::Promoted { member }, kick);
        }
        (seq, at_ms)
    }

    /// Moves a member's position forward (read implies delivered).
    fn advance_position(&mut self, write: &mut AccountWrite, member: AccountId, kind: ReceiptKind, up_to: u64) {
        let Some(state) = self.group.as_deref_mut() else { return };
        let Some(position) = state.positions.get_mut(&member) else { return };
        let up_to = up_to.min(self.counters.next_seq - 1);
        if up_to > position.0 {
            position.0 = up_to;
            write.receipts.push((member, ReceiptKind::Delivered, up_to));
        }
        if kind == ReceiptKind::Read && up_to > position.1 {
            position.1 = up_to;
            write.receipts.push((member, ReceiptKind::Read, up_to));
        }
    }

    /// A forward from a member's account to the group: its receipts.
    /// Anything else, or anything from a non-member, changes nothing.
    pub(super) fn group_receipt(&mut self, write: &mut AccountWrite, from: AccountId, forward: &Forward) {
        if let Forward::Receipt { kind, up_to, .. } = forward {
            self.advance_position(write, from, *kind, *up_to);
        }
    }

    /// Tells authors when all members have (or have read) their messages.
    pub(super) async fn advance_marks(
        &mut self,
        write: &mut AccountWrite,
        kick: &mut HashSet<AccountId>,
    ) -> Result<(), StoreError> {
        let Some(state) = self.group.as_deref() else { return Ok(()) };
        let (old, new) = (state.marks, state.lowest());
        if new == old {
            return Ok(());
        }
        let from = old.0.min(old.1) + 1;
        let to = new.0.max(new.1);
        let mut authors: Vec<(u64, AccountId)> = Vec::new();
        let mut next = from;
        while next <= to {
            let chunk = self.entries(next, to).await?;
            let Some((last, _)) = chunk.last() else { break };
            next = last + 1;
            for (seq, entry) in chunk {
                if let LogEntry::Group(e) = entry.as_ref() {
                    if matches!(e.body, GroupBody::Message { .. }) && e.by != self.account {
                        authors.push((seq, e.by));
                    }
                }
            }
        }
        let now = self.now();
        for (kind, before, after) in [(ReceiptKind::Delivered, old.0, new.0), (ReceiptKind::Read, old.1, new.1)] {
            if after <= before {
                continue;
            }
            let mut told: HashSet<AccountId> = HashSet::new();
            for (_, author) in authors.iter().filter(|(seq, _)| *seq > before && *seq <= after) {
                if told.insert(*author) {
                    self.enqueue_forward(write, *author, Forward::Receipt { kind, up_to: after, at_ms: now });
                    kick.insert(*author);
                }
            }
        }
        if let Some(state) = self.group.as_deref_mut() {
            state.marks = (new.0.max(old.0), new.1.max(old.1));
        }
        Ok(())
    }
}
