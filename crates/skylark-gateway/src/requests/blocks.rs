//! Blocking (`Block`, `ListBlocked`) and contact names (`SetContactName`,
//! `ListContactNames`): the account's own view of other accounts. The rules live in the router
//! (`Router::block`); here numbers become accounts and back.

use super::{Answer, Caller, charged_peer, messaging_error, reply, unavailable, when_durable};
use skylark_protocol::ServerFrame;
use skylark_protocol::v1::{self, server_frame};
use skylark_server::messaging::MessagingError;

pub(super) async fn block(caller: &Caller<'_>, id: u64, block: v1::Block) -> Answer {
    let router = &caller.shared.server.router;
    let me = caller.authed.account;
    let peer = match charged_peer(caller, id, &block.phone, "you cannot block your own number").await {
        Ok(peer) => peer,
        Err(answer) => return Answer::Now(answer),
    };
    let queued = router.block(me, peer, block.blocked).await;
    let presence = caller.shared.server.presence.clone();
    match queued {
        Ok(durable) => Answer::Later(Box::pin(async move {
            match durable.await {
                Ok(Ok(())) => {
                    // The peer's watching connections learn what they may see now.
                    if let Err(e) = presence.retell(me, peer).await {
                        tracing::warn!(error = %e, "could not retell presence after a block");
                    }
                    super::ok(id)
                }
                Ok(Err(e)) => messaging_error(id, &e),
                Err(_) => messaging_error(id, &MessagingError::ShuttingDown),
            }
        })),
        Err(e) => Answer::Now(messaging_error(id, &e)),
    }
}

pub(super) async fn list(caller: &Caller<'_>, id: u64) -> ServerFrame {
    let router = &caller.shared.server.router;
    let blocked = match router.blocked(caller.authed.account).await {
        Ok(blocked) => blocked,
        Err(e) => return messaging_error(id, &e),
    };
    let mut accounts = Vec::with_capacity(blocked.len());
    for (account, since_ms) in blocked {
        let phone = match router.directory().phone(account).await {
            Ok(phone) => phone.map(|p| p.to_string()).unwrap_or_default(),
            Err(e) => return unavailable(id, &e),
        };
        accounts.push(v1::BlockedAccount { account: account.0, phone, since_ms });
    }
    reply(id, server_frame::Body::BlockedList(v1::BlockedList { accounts }))
}

pub(super) async fn set_name(caller: &Caller<'_>, id: u64, set: v1::SetContactName) -> Answer {
    let me = caller.authed.account;
    let peer = match charged_peer(caller, id, &set.phone, "your own number has no contact name").await {
        Ok(peer) => peer,
        Err(answer) => return Answer::Now(answer),
    };
    when_durable(id, caller.shared.server.router.set_contact_name(me, peer, &set.name).await, move |()| super::ok(id))
}

pub(super) async fn names(caller: &Caller<'_>, id: u64) -> ServerFrame {
    let router = &caller.shared.server.router;
    let names = match router.contact_names(caller.authed.account).await {
        Ok(names) => names,
        Err(e) => return messaging_error(id, &e),
    };
    let mut contacts = Vec::with_capacity(names.len());
    for (account, name) in names {
        match router.directory().phone(account).await {
            // A deleted contact's name has no number left to show.
            Ok(Some(phone)) => contacts.push(v1::ContactName { account: account.0, phone: phone.to_string(), name }),
            Ok(None) => {}
            Err(e) => return unavailable(id, &e),
        }
    }
    reply(id, server_frame::Body::ContactNames(v1::ContactNames { contacts }))
}
