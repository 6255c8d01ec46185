//! The rules of a group's actor, on the same [`Machine`] as an account's.
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
//!
//! Like the rest of the machine, nothing here performs IO: log entries it
//! needs beyond memory are asked for ([`Machine::marks_need`]) and given.

use super::machine::{BatchIds, Effects, Facts, Kind, Machine, Missing, Refusal, duplicate};
use crate::messaging::{GroupReply, GroupRequest, MessageInfo, MessagingError, SendAck};
use skylark_core::group::{GroupBody, GroupChange, GroupError, GroupEvent, GroupMeta};
use skylark_core::message::{Forward, LogEntry, MessageId, ReceiptKind};
use skylark_core::{AccountId, DeviceId};
use skylark_store::AccountWrite;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug)]
pub(crate) struct GroupState {
    pub meta: GroupMeta,
    /// Per current member: highest group sequence delivered to any of its
    /// devices, and highest it read.
    pub positions: HashMap<AccountId, (u64, u64)>,
    /// The lowest delivered and read positions over all members, as the
    /// authors were last told.
    pub marks: (u64, u64),
}

impl GroupState {
    /// The state of a stored group, with the receipt positions stored for
    /// its members (`stored`: member → delivered, read).
    pub fn new(meta: GroupMeta, stored: &HashMap<AccountId, (u64, u64)>) -> GroupState {
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
        state
    }

    fn lowest(&self) -> (u64, u64) {
        let delivered = self.positions.values().map(|p| p.0).min().unwrap_or(self.marks.0);
        let read = self.positions.values().map(|p| p.1).min().unwrap_or(self.marks.1);
        (delivered, read)
    }
}

/// A member's post, as the group's actor takes it.
pub(super) struct Post {
    pub author: AccountId,
    pub device: DeviceId,
    pub client_id: String,
    pub payload: bytes::Bytes,
    pub commit_epoch: Option<u64>,
    pub message_epoch: Option<u64>,
    pub meta: skylark_core::message::MetaRequest,
}

fn refused(e: GroupError) -> Refusal {
    Refusal::Refused(MessagingError::Group(e))
}

impl Machine {
    fn group_state(&self) -> Result<&GroupState, Refusal> {
        match &self.kind {
            Kind::Group(Some(state)) => Ok(state),
            Kind::Group(None) => Err(refused(GroupError::UnknownGroup)),
            Kind::User => Err(Refusal::Refused(MessagingError::Internal("a group request reached an account"))),
        }
    }

    fn group_state_mut(&mut self) -> Option<&mut GroupState> {
        match &mut self.kind {
            Kind::Group(Some(state)) => Some(state),
            _ => None,
        }
    }

    /// A member posts a message (or an MLS commit).
    pub(super) fn post(
        &mut self,
        fx: &mut Effects,
        batch_ids: &mut BatchIds,
        facts: &Facts,
        now_ms: u64,
        post: Post,
        over_rate: Option<Duration>,
    ) -> Result<SendAck, Refusal> {
        let Post { author, device, client_id, payload, commit_epoch, message_epoch, meta } = post;
        self.group_state()?;
        // A resend of an accepted post is answered as such, even if its
        // author has left since: the post happened.
        if let Some(ack) = duplicate(self.account, batch_ids, facts, device, &client_id) {
            return Ok(ack);
        }
        if let Some(wait) = over_rate {
            return Err(Refusal::Refused(MessagingError::RateLimited(wait)));
        }
        // An encryption commit is a commit, nothing else.
        if commit_epoch.is_some() && meta != skylark_core::message::MetaRequest::default() {
            return Err(Refusal::Refused(skylark_core::message::MetaError::OnCommit.into()));
        }
        let meta = self.check_meta(facts, &meta, author, self.account, now_ms)?;
        let change = GroupChange::Post { device, client_id: client_id.clone(), payload, commit_epoch, meta };
        let state = self.group_state()?;
        let body = match state.meta.check(author, change, self.limits.max_group_members) {
            Ok(body) => body,
            Err(e @ GroupError::StaleEpoch(_)) => {
                fx.counts.stale_commits += 1;
                return Err(refused(e));
            }
            Err(e) => return Err(refused(e)),
        };
        // An encrypted message is opened in the epoch it was made in: one
        // made before the last commit would need the members to keep past
        // epochs' keys, so the sender encrypts it again instead.
        if let Some(epoch) = message_epoch
            && epoch != state.meta.mls_epoch
        {
            fx.counts.stale_messages += 1;
            return Err(refused(GroupError::StaleEpoch(state.meta.mls_epoch)));
        }
        // Blocks hold in 1:1 conversations, for messages; commits go to
        // both (the conversation's encryption must stay in step).
        let mut skip = None;
        if commit_epoch.is_none()
            && let Some(peer) = self.account.direct_peer(author)
        {
            if self.blocks(author)? {
                return Err(Refusal::Refused(MessagingError::YouBlocked));
            }
            if self.blocks(peer)? {
                skip = Some(peer);
                fx.counts.dropped_blocked += 1;
            }
            // Writing to someone makes them a contact, as a 1:1 message
            // does (what a profile shown to contacts goes by).
            if self.marks_mut().contacts.insert(author) {
                fx.contacts.push((author, peer));
            }
        }
        let seq = self.record(&mut fx.write, &mut fx.kick, now_ms, author, body, skip);
        if let Some(target) = meta.deletes
            && let Some(entry) = self.log.entry(target, facts).cloned()
        {
            self.log.purge(&mut fx.write, target, &entry);
        }
        if commit_epoch.is_some()
            && let Some(state) = self.group_state_mut()
        {
            // The epoch moves in the same write as the commit's event.
            state.meta.commit_recorded();
            fx.write.group = Some(state.meta.clone());
        }
        // Posting means having seen the conversation up to here.
        self.advance_position(&mut fx.write, author, ReceiptKind::Read, seq);
        fx.write.client_ids.push((device, client_id.clone(), seq));
        let ack = SendAck { id: MessageId { sender: self.account, seq }, sent_at_ms: now_ms, duplicate: false };
        batch_ids.insert((device, client_id), ack);
        fx.counts.group_accepted += 1;
        Ok(ack)
    }

    pub(super) fn group_request(
        &mut self,
        fx: &mut Effects,
        facts: &Facts,
        now_ms: u64,
        from: AccountId,
        request: GroupRequest,
    ) -> Result<GroupReply, Refusal> {
        let max = self.limits.max_group_members;
        match request {
            GroupRequest::Create { subject, members } => {
                if !matches!(self.kind, Kind::Group(None)) || self.log.last_seq() > 0 {
                    // Ids are allocated fresh for every creation.
                    return Err(Refusal::Refused(MessagingError::Internal("group id reused")));
                }
                let (meta, body) =
                    GroupMeta::create(self.account, from, subject, &members, max, now_ms).map_err(refused)?;
                let positions = meta.members.iter().map(|m| (m.account, (0, 0))).collect();
                fx.write.memberships.extend(meta.members.iter().map(|m| (m.account, true)));
                self.kind = Kind::Group(Some(Box::new(GroupState { meta, positions, marks: (0, 0) })));
                self.record(&mut fx.write, &mut fx.kick, now_ms, from, body, None);
            }
            GroupRequest::OpenDirect { with } => {
                if AccountId::direct(from, with) != Some(self.account) {
                    return Err(Refusal::Refused(MessagingError::Internal("a direct group asked by a stranger")));
                }
                if matches!(self.kind, Kind::Group(None)) && self.log.last_seq() == 0 {
                    let (meta, body) = GroupMeta::create_direct(self.account, from, with, now_ms);
                    let positions = meta.members.iter().map(|m| (m.account, (0, 0))).collect();
                    fx.write.memberships.extend(meta.members.iter().map(|m| (m.account, true)));
                    self.kind = Kind::Group(Some(Box::new(GroupState { meta, positions, marks: (0, 0) })));
                    self.record(&mut fx.write, &mut fx.kick, now_ms, from, body, None);
                } else {
                    self.member_check(from)?;
                }
            }
            GroupRequest::Change(change) => {
                let body = self.group_state()?.meta.check(from, change, max).map_err(refused)?;
                self.record(&mut fx.write, &mut fx.kick, now_ms, from, body, None);
            }
            GroupRequest::Info => {
                self.member_check(from)?;
            }
            GroupRequest::MessageInfo { seq } => return self.message_info(facts, from, seq),
        }
        Ok(GroupReply::Info(self.group_state()?.meta.clone()))
    }

    fn member_check(&self, from: AccountId) -> Result<(), Refusal> {
        match self.group_state()?.meta.member(from) {
            Some(_) => Ok(()),
            None => Err(refused(GroupError::NotAMember)),
        }
    }

    fn message_info(&self, facts: &Facts, from: AccountId, seq: u64) -> Result<GroupReply, Refusal> {
        self.member_check(from)?;
        let state = self.group_state()?;
        if seq == 0 || seq > self.log.last_seq() {
            return Err(refused(GroupError::UnknownMessage));
        }
        let entry = self.log.entry(seq, facts).ok_or_else(|| Missing(format!("group log entry {seq}")))?;
        let LogEntry::Group(event) = entry.as_ref() else {
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
    /// by it. Returns its sequence number.
    fn record(
        &mut self,
        write: &mut AccountWrite,
        kick: &mut HashSet<AccountId>,
        now_ms: u64,
        by: AccountId,
        body: GroupBody,
        skip: Option<AccountId>,
    ) -> u64 {
        let seq = self.log.counters.next_seq;
        let event = Arc::new(GroupEvent { group: self.account, seq, by, at_ms: now_ms, body });
        self.log.append(write, LogEntry::Group(event.clone()));
        let Kind::Group(Some(state)) = &mut self.kind else { return seq };
        let mut recipients: Vec<AccountId> =
            state.meta.members.iter().map(|m| m.account).filter(|a| Some(*a) != skip).collect();
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
            self.outbox.put(&mut self.log, write, to, Forward::Group(event.clone()));
            kick.insert(to);
        }
        if let Some(member) = promote {
            let group = self.account;
            self.record(write, kick, now_ms, group, GroupBody::Promoted { member }, None);
        }
        seq
    }

    /// Moves a member's position forward (read implies delivered).
    fn advance_position(&mut self, write: &mut AccountWrite, member: AccountId, kind: ReceiptKind, up_to: u64) {
        let up_to = up_to.min(self.log.last_seq());
        let Some(state) = self.group_state_mut() else { return };
        let Some(position) = state.positions.get_mut(&member) else { return };
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

    /// The log range [`Machine::advance_marks`] will read that is not in
    /// memory, if the marks moved.
    pub fn marks_need(&self) -> Option<(u64, u64)> {
        let Kind::Group(Some(state)) = &self.kind else { return None };
        let (old, new) = (state.marks, state.lowest());
        if new == old {
            return None;
        }
        self.log.missing(old.0.min(old.1) + 1, new.0.max(new.1))
    }

    /// Tells authors when all members have (or have read) their messages:
    /// run after a step, before its write is made durable, with the entries
    /// [`Machine::marks_need`] asked for.
    pub fn advance_marks(&mut self, fx: &mut Effects, facts: &Facts, now_ms: u64) -> Result<(), Missing> {
        let Kind::Group(Some(state)) = &self.kind else { return Ok(()) };
        let (old, new) = (state.marks, state.lowest());
        if new == old {
            return Ok(());
        }
        let mut authors: Vec<(u64, AccountId)> = Vec::new();
        for seq in old.0.min(old.1) + 1..=new.0.max(new.1).min(self.log.last_seq()) {
            let entry = self.log.entry(seq, facts).ok_or_else(|| Missing(format!("group log entry {seq}")))?;
            if let LogEntry::Group(e) = entry.as_ref()
                && matches!(e.body, GroupBody::Message { .. })
                && e.by != self.account
            {
                authors.push((seq, e.by));
            }
        }
        for (kind, before, after) in [(ReceiptKind::Delivered, old.0, new.0), (ReceiptKind::Read, old.1, new.1)] {
            if after <= before {
                continue;
            }
            let mut told: HashSet<AccountId> = HashSet::new();
            for (_, author) in authors.iter().filter(|(seq, _)| *seq > before && *seq <= after) {
                if told.insert(*author) {
                    let receipt = Forward::Receipt { kind, up_to: after, at_ms: now_ms };
                    self.outbox.put(&mut self.log, &mut fx.write, *author, receipt);
                    fx.kick.insert(*author);
                }
            }
        }
        if let Some(state) = self.group_state_mut() {
            state.marks = (new.0.max(old.0), new.1.max(old.1));
        }
        self.seal(&mut fx.write);
        Ok(())
    }
}
