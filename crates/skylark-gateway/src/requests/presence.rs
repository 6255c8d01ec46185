//! Presence, client state and typing: all ephemeral, nothing stored.

use super::{Answer, Caller, error, messaging_error, ok, reply, unavailable};
use skylark_core::PhoneNumber;
use skylark_protocol::v1::{self, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::messaging::MessagingError;

/// Typing is a notification: best effort, never answered. A number that
/// cannot be resolved now (unknown, or the store failing) drops it.
pub(super) async fn typing(caller: &Caller<'_>, typing: v1::Typing) -> Answer {
    let server = &caller.shared.server;
    let from = caller.authed.account;
    if let (Ok(phone), Some(state)) = (PhoneNumber::parse(&typing.to), crate::convert::typing_state(typing.state))
        && let Ok(Some(to)) = server.router.directory().account(&phone).await
        // Nobody who blocked the typist sees it type (nor learns of the block).
        && let Ok(false) = server.router.is_blocked_by(to, from).await
    {
        server.presence.typing(from, caller.authed.device, to, state);
    }
    Answer::None
}

pub(super) async fn subscribe(caller: &Caller<'_>, id: u64, sub: v1::SubscribePresence) -> ServerFrame {
    let server = &caller.shared.server;
    let mut targets = Vec::new();
    for phone in sub.phones.iter().filter_map(|p| PhoneNumber::parse(p).ok()) {
        // Numbers without an account are left out of the answer.
        match server.router.directory().account(&phone).await {
            Ok(Some(target)) => targets.push(target),
            Ok(None) => {}
            Err(e) => return unavailable(id, &e),
        }
    }
    match server.presence.subscribe(caller.authed.account, caller.connection, &targets).await {
        Ok(list) => {
            let mut presences = Vec::with_capacity(list.len());
            for info in list {
                match crate::convert::presence_info(&server.router, info).await {
                    Ok(info) => presences.push(info),
                    Err(e) => return unavailable(id, &e),
                }
            }
            reply(id, server_frame::Body::PresenceList(v1::PresenceList { presences }))
        }
        Err(e) => messaging_error(id, &MessagingError::from(e)),
    }
}

pub(super) fn set_active(caller: &Caller<'_>, id: u64, active: v1::SetActive) -> ServerFrame {
    caller.shared.server.presence.set_active(caller.authed.account, caller.connection, active.active);
    ok(id)
}

pub(super) async fn set_privacy(caller: &Caller<'_>, id: u64, privacy: v1::SetPrivacy) -> ServerFrame {
    match crate::convert::visibility(privacy.presence) {
        Some(visibility) => {
            match caller.shared.server.presence.set_visibility(caller.authed.account, visibility).await {
                Ok(()) => ok(id),
                Err(e) => unavailable(id, &e),
            }
        }
        None => error(id, ErrorCode::InvalidArgument, "unknown visibility: use everyone, contacts or nobody"),
    }
}
