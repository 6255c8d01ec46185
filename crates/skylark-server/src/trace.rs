//! A message's lifecycle on demand, for the operator (`skylark admin trace
//! ACCOUNT:SEQ`): read from what the store keeps anyway — the sender's log
//! and outbox, the recipient's log and its devices' cursors, the receipts
//! that came back — so nothing is recorded per message for it, and no
//! content is ever read out. Times are given where the store has them
//! (acceptance, receipts); the rest is said as reached or not.

use crate::Server;
use serde::Serialize;
use skylark_core::AccountId;
use skylark_core::group::GroupBody;
use skylark_core::message::{Forward, LogEntry, MessageId, ReceiptKind};
use skylark_store::StoreError;

/// Log entries read at most while looking for the copy or the receipts.
const SCAN: usize = 5_000;
const PAGE: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Trace {
    /// `ACCOUNT:SEQ` (the sender's account, or the group, and the sequence).
    pub message: String,
    pub sender: AccountId,
    pub sender_device: u64,
    /// The recipient account, or the group.
    pub to: AccountId,
    pub bytes: u64,
    /// Accepted and stored (fsync'd) in the sender's log: one tick.
    pub accepted_at_ms: u64,
    /// For a 1:1 message: still in the sender's outbox (being forwarded)?
    pub forward_pending: bool,
    /// For a 1:1 message: its place in the recipient's log, once stored there.
    pub recipient_log_seq: Option<u64>,
    /// Each device of the recipient (1:1) or each member (group).
    pub reached: Vec<Reached>,
    /// The first delivery receipt covering it that reached the sender (1:1).
    pub delivered_receipt_at_ms: Option<u64>,
    pub read_receipt_at_ms: Option<u64>,
    /// What could not be known within the scan (in words), if anything.
    pub note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reached {
    /// A device id (1:1) or a member's account (group).
    pub who: u64,
    pub name: String,
    /// The device acknowledged it (1:1), or the member's account has it (group).
    pub delivered: bool,
    /// The member read it (groups; a 1:1 message's read receipt is the
    /// account's, in `read_receipt_at_ms`).
    pub read: bool,
}

impl Server {
    /// The lifecycle of message `id`, or `None` if there is no such message.
    pub async fn trace(&self, id: MessageId) -> Result<Option<Trace>, StoreError> {
        let Some((_, entry)) = self.store.read_log(id.sender, id.seq, 1).await?.into_iter().next() else {
            return Ok(None);
        };
        match entry {
            LogEntry::Message(m) if m.id == id => self.trace_direct(id, &m).await.map(Some),
            LogEntry::Group(e) if id.sender.is_group() => {
                let GroupBody::Message { device, payload, .. } = &e.body else { return Ok(None) };
                let mut reached = Vec::new();
                if let Some(meta) = self.store.group(id.sender).await? {
                    for member in meta.members.iter().filter(|m| m.account != e.by && m.joined_seq <= id.seq) {
                        let delivered = self.store.receipt(id.sender, member.account, ReceiptKind::Delivered).await?;
                        let read = self.store.receipt(id.sender, member.account, ReceiptKind::Read).await?;
                        reached.push(Reached {
                            who: member.account.0,
                            name: self.name_of(member.account).await?,
                            delivered: delivered >= id.seq,
                            read: read >= id.seq,
                        });
                    }
                }
                Ok(Some(Trace {
                    message: format!("{}:{}", id.sender.0, id.seq),
                    sender: e.by,
                    sender_device: device.0,
                    to: id.sender,
                    bytes: payload.len() as u64,
                    accepted_at_ms: e.at_ms,
                    forward_pending: false,
                    recipient_log_seq: None,
                    reached,
                    delivered_receipt_at_ms: None,
                    read_receipt_at_ms: None,
                    note: None,
                }))
            }
            _ => Ok(None),
        }
    }

    async fn trace_direct(&self, id: MessageId, m: &skylark_core::message::Message) -> Result<Trace, StoreError> {
        let mut note = None;
        let outbox = self.store.account_state(id.sender).await?.outbox;
        let forward_pending = outbox.iter().any(|(_, item)| matches!(&item.forward, Forward::Message(f) if f.id == id));
        // The copy in the recipient's log, looked for from the newest back
        // to the time it was accepted.
        let mut recipient_log_seq = None;
        let (mut before, mut scanned) = (u64::MAX, 0);
        'search: while scanned < SCAN {
            let page = self.store.read_log_before(m.to, before, PAGE).await?;
            let Some((oldest, _)) = page.last() else { break };
            before = *oldest;
            scanned += page.len();
            for (seq, entry) in &page {
                if let LogEntry::Message(copy) = entry
                    && copy.id == id
                {
                    recipient_log_seq = Some(*seq);
                    break 'search;
                }
                if entry.at_ms() < m.sent_at_ms {
                    break 'search;
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        if recipient_log_seq.is_none() && !forward_pending && scanned >= SCAN {
            note = Some(format!("not found among the recipient's newest {SCAN} log entries"));
        }
        let mut reached = Vec::new();
        if let Some(seq) = recipient_log_seq {
            for device in self.store.active_devices(m.to).await? {
                let cursor = self.store.cursor(m.to, device.id).await?.unwrap_or(0);
                reached.push(Reached {
                    who: device.id.0,
                    name: device.name.clone(),
                    delivered: cursor >= seq,
                    read: false,
                });
            }
        }
        // Receipts come back into the sender's log after the message.
        let (mut delivered_receipt_at_ms, mut read_receipt_at_ms) = (None, None);
        let (mut from, mut scanned) = (id.seq + 1, 0);
        'receipts: while scanned < SCAN && read_receipt_at_ms.is_none() {
            let page = self.store.read_log(id.sender, from, PAGE).await?;
            let Some((newest, _)) = page.last() else { break };
            from = newest + 1;
            scanned += page.len();
            for (_, entry) in &page {
                if let LogEntry::Receipt { peer, kind, up_to, at_ms } = entry
                    && *peer == m.to
                    && *up_to >= id.seq
                {
                    match kind {
                        ReceiptKind::Delivered => delivered_receipt_at_ms = delivered_receipt_at_ms.or(Some(*at_ms)),
                        ReceiptKind::Read => {
                            read_receipt_at_ms = Some(*at_ms);
                            // Read implies delivered (a read receipt may come alone).
                            delivered_receipt_at_ms = delivered_receipt_at_ms.or(Some(*at_ms));
                            break 'receipts;
                        }
                    }
                }
            }
            if page.len() < PAGE {
                break;
            }
        }
        Ok(Trace {
            message: format!("{}:{}", id.sender.0, id.seq),
            sender: id.sender,
            sender_device: m.sender_device.0,
            to: m.to,
            bytes: m.payload.len() as u64,
            accepted_at_ms: m.sent_at_ms,
            forward_pending,
            recipient_log_seq,
            reached,
            delivered_receipt_at_ms,
            read_receipt_at_ms,
            note,
        })
    }

    async fn name_of(&self, account: AccountId) -> Result<String, StoreError> {
        Ok(self.router.directory().phone(account).await?.map(|p| p.to_string()).unwrap_or_default())
    }
}
