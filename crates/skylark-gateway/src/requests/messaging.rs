//! Sending, acknowledging and marking read; media tokens for attachments.

use super::{Answer, Caller, error, ok, reply, unavailable, when_durable};
use skylark_core::AccountId;
use skylark_protocol::v1::{self, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::media::{Audience, MediaError};
use skylark_server::messaging::SendRequest;

pub(super) fn media_token(caller: &Caller<'_>, id: u64) -> ServerFrame {
    let grant = caller.shared.server.media.grant(caller.authed.account, caller.authed.device);
    reply(
        id,
        server_frame::Body::MediaToken(v1::MediaToken {
            token: grant.token,
            expires_at_ms: grant.expires_at_ms,
            max_upload_bytes: grant.max_upload_bytes,
        }),
    )
}

/// Makes a message's attachments readable by its recipients (before the
/// message can reach them). A 1:1 recipient that cannot be found is left
/// to the send itself to report.
async fn share_attachments(caller: &Caller<'_>, id: u64, send: &v1::SendMessage) -> Result<(), ServerFrame> {
    let server = &caller.shared.server;
    let audience = if send.group != 0 {
        Audience::Group(AccountId(send.group))
    } else {
        let Ok(phone) = skylark_core::PhoneNumber::parse(&send.to) else { return Ok(()) };
        match server.router.directory().account(&phone).await {
            Ok(Some(peer)) => Audience::Account(peer),
            Ok(None) => return Ok(()),
            Err(e) => return Err(unavailable(id, &e)),
        }
    };
    // A commit's parts outlive ordinary attachments: a device away for
    // long still needs them to follow the group's encryption.
    let commit = send.commit_epoch.is_some();
    match server.media.share(caller.authed.account, &send.attachments, audience, commit).await {
        Ok(()) => Ok(()),
        Err(MediaError::Store(e)) => Err(unavailable(id, &e)),
        Err(e @ (MediaError::BadId(_) | MediaError::NotShareable(_) | MediaError::TooManyAttachments)) => {
            Err(error(id, ErrorCode::InvalidArgument, e.to_string()))
        }
        Err(e) => {
            tracing::error!(error = %e, "sharing attachments failed");
            Err(error(id, ErrorCode::Unavailable, "the attachments' storage is unavailable; try again shortly"))
        }
    }
}

pub(super) async fn send(caller: &Caller<'_>, id: u64, send: v1::SendMessage) -> Answer {
    let (account, device) = (caller.authed.account, caller.authed.device);
    if !send.attachments.is_empty()
        && let Err(frame) = share_attachments(caller, id, &send).await
    {
        return Answer::Now(frame);
    }
    let group = (send.group != 0).then_some(AccountId(send.group));
    let request = SendRequest {
        client_id: send.client_id,
        to: send.to,
        group,
        payload: send.payload,
        commit_epoch: send.commit_epoch,
        message_epoch: send.message_epoch,
        meta: skylark_core::message::MetaRequest {
            edits: send.edits,
            deletes: send.deletes,
            expire_after_ms: send.expire_after_ms,
        },
    };
    // One span per message, from the request to its durable ack (exported
    // over OTLP when configured; disabled, and free, otherwise).
    let span = tracing::debug_span!(
        "message.send",
        account = account.0,
        device = device.0,
        group = request.group.map_or(0, |g| g.0),
        bytes = request.payload.len() as u64,
        message = tracing::field::Empty,
        seq = tracing::field::Empty,
        duplicate = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let queued =
        tracing::Instrument::instrument(caller.shared.server.router.send(account, device, request), span.clone()).await;
    let acked = span.clone();
    let answer = when_durable(id, queued, move |ack| {
        acked.record("message", tracing::field::display(format_args!("{}:{}", ack.id.sender.0, ack.id.seq)));
        acked.record("seq", ack.id.seq);
        acked.record("duplicate", ack.duplicate);
        metrics::histogram!("skylark_send_ack_seconds").record(started.elapsed().as_secs_f64());
        reply(
            id,
            server_frame::Body::SendAck(v1::SendAck {
                id: Some(crate::convert::message_id(ack.id)),
                sent_at_ms: ack.sent_at_ms,
                duplicate: ack.duplicate,
            }),
        )
    });
    match answer {
        Answer::Later(durable) => Answer::Later(Box::pin(tracing::Instrument::instrument(durable, span))),
        now => now,
    }
}

pub(super) async fn mark_read(caller: &Caller<'_>, id: u64, mark: v1::MarkRead) -> Answer {
    let (account, device) = (caller.authed.account, caller.authed.device);
    let queued = caller.shared.server.router.mark_read(account, device, AccountId(mark.peer), mark.up_to_seq).await;
    when_durable(id, queued, move |()| ok(id))
}

/// Acks are notifications: never answered.
pub(super) async fn ack(caller: &Caller<'_>, ack: v1::Ack) -> Answer {
    let (account, device) = (caller.authed.account, caller.authed.device);
    caller.shared.server.router.ack(account, device, caller.connection, ack.up_to_seq).await;
    Answer::None
}
