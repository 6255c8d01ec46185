//! Sending, acknowledging and marking read.

use super::{Answer, Caller, ok, reply, when_durable};
use skylark_core::AccountId;
use skylark_protocol::v1::{self, server_frame};
use skylark_server::messaging::SendRequest;

pub(super) async fn send(caller: &Caller<'_>, id: u64, send: v1::SendMessage) -> Answer {
    let (account, device) = (caller.authed.account.id, caller.authed.device.id);
    let group = (send.group != 0).then_some(AccountId(send.group));
    let request = SendRequest {
        client_id: send.client_id,
        to: send.to,
        group,
        payload: send.payload,
        commit_epoch: send.commit_epoch,
        meta: skylark_core::message::MetaRequest {
            edits: send.edits,
            deletes: send.deletes,
            expire_after_ms: send.expire_after_ms,
        },
    };
    let started = std::time::Instant::now();
    let queued = caller.shared.server.router.send(account, device, request).await;
    when_durable(id, queued, move |ack| {
        metrics::histogram!("skylark_send_ack_seconds").record(started.elapsed().as_secs_f64());
        reply(
            id,
            server_frame::Body::SendAck(v1::SendAck {
                id: Some(crate::convert::message_id(ack.id)),
                sent_at_ms: ack.sent_at_ms,
                duplicate: ack.duplicate,
            }),
        )
    })
}

pub(super) async fn mark_read(caller: &Caller<'_>, id: u64, mark: v1::MarkRead) -> Answer {
    let (account, device) = (caller.authed.account.id, caller.authed.device.id);
    let queued = caller.shared.server.router.mark_read(account, device, AccountId(mark.peer), mark.up_to_seq).await;
    when_durable(id, queued, move |()| ok(id))
}

/// Acks are notifications: never answered.
pub(super) async fn ack(caller: &Caller<'_>, ack: v1::Ack) -> Answer {
    let (account, device) = (caller.authed.account.id, caller.authed.device.id);
    caller.shared.server.router.ack(account, device, caller.connection, ack.up_to_seq).await;
    Answer::None
}
