//! Group requests: wire ⇄ the router's group API.

use super::{Answer, error, messaging_error, reply, unavailable};
use skylark_core::group::{GroupChange, GroupError};
use skylark_core::{AccountId, DeviceId, PhoneNumber};
use skylark_protocol::v1::{self, change_group::Change, client_frame::Body, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::messaging::{GroupReply, GroupRequest, MessagingError};
use skylark_server::router::Router;
use tokio::sync::oneshot;

/// Resolves phone numbers to accounts; the first that is invalid or has
/// no account is the error.
async fn accounts(router: &Router, phones: &[String]) -> Result<Vec<AccountId>, MessagingError> {
    let mut out = Vec::with_capacity(phones.len());
    for p in phones {
        match router.account_by_phone(&PhoneNumber::parse(p)?).await? {
            Some(a) => out.push(a),
            None => return Err(MessagingError::UnknownRecipient),
        }
    }
    Ok(out)
}

async fn account(router: &Router, phone: &str) -> Result<AccountId, MessagingError> {
    Ok(accounts(router, &[phone.to_owned()]).await?[0])
}

async fn change(router: &Router, change: Change) -> Result<GroupChange, MessagingError> {
    Ok(match change {
        Change::Add(list) => {
            if skylark_core::group::too_many(list.phones.len(), router.config().max_group_members) {
                return Err(GroupError::Full(router.config().max_group_members).into());
            }
            GroupChange::Add { members: accounts(router, &list.phones).await? }
        }
        Change::Remove(p) => GroupChange::Remove { member: account(router, &p).await? },
        Change::Leave(_) => GroupChange::Leave,
        Change::Promote(p) => GroupChange::Promote { member: account(router, &p).await? },
        Change::Demote(p) => GroupChange::Demote { member: account(router, &p).await? },
        Change::Subject(subject) => GroupChange::Subject { subject },
        Change::AdminOnly(admin_only) => GroupChange::AdminOnly { admin_only },
    })
}

/// Sends the group's answer once the group's actor has made it durable.
fn later(router: &Router, id: u64, answer: oneshot::Receiver<Result<GroupReply, MessagingError>>) -> Answer {
    let router = router.clone();
    Answer::Later(Box::pin(async move {
        match answer.await {
            Ok(Ok(reply)) => group_reply(&router, id, reply).await,
            Ok(Err(e)) => messaging_error(id, &e),
            Err(_) => messaging_error(id, &MessagingError::ShuttingDown),
        }
    }))
}

async fn group_reply(router: &Router, id: u64, answer: GroupReply) -> ServerFrame {
    match answer {
        GroupReply::Info(meta) => match crate::convert::group_info(router, &meta).await {
            Ok(info) => reply(id, server_frame::Body::GroupInfo(info)),
            Err(e) => unavailable(id, &e),
        },
        GroupReply::MessageInfo(info) => {
            let mut recipients = Vec::with_capacity(info.recipients.len());
            for (account, delivered, read) in &info.recipients {
                let phone = match router.directory().phone(*account).await {
                    Ok(phone) => phone.map(|p| p.to_string()).unwrap_or_default(),
                    Err(e) => return unavailable(id, &e),
                };
                recipients.push(v1::MemberReceipt { account: account.0, phone, delivered: *delivered, read: *read });
            }
            let delivered = info.recipients.iter().filter(|r| r.1).count() as u32;
            let read = info.recipients.iter().filter(|r| r.2).count() as u32;
            reply(
                id,
                server_frame::Body::MessageInfo(v1::MessageInfo {
                    group: info.group.0,
                    seq: info.seq,
                    sent_at_ms: info.sent_at_ms,
                    recipients,
                    delivered,
                    read,
                }),
            )
        }
    }
}

/// Answers a group request (`body` is one of the group bodies).
pub(crate) async fn answer(router: &Router, account: AccountId, device: DeviceId, id: u64, body: Body) -> Answer {
    let asked = match body {
        Body::CreateGroup(create) => {
            // The creator counts too.
            if skylark_core::group::too_many(create.members.len() + 1, router.config().max_group_members) {
                let e = MessagingError::from(GroupError::Full(router.config().max_group_members));
                return Answer::Now(messaging_error(id, &e));
            }
            // Charged before the phone numbers are resolved.
            if let Err(e) = router.charge_group_change(device) {
                return Answer::Now(messaging_error(id, &e));
            }
            match accounts(router, &create.members).await {
                Ok(members) => router.create_group(account, create.subject, members).await,
                Err(e) => Err(e),
            }
        }
        Body::ChangeGroup(c) => match c.change {
            None => return Answer::Now(error(id, ErrorCode::InvalidArgument, "no change named")),
            Some(c_body) => {
                if let Err(e) = router.charge_group_change(device) {
                    return Answer::Now(messaging_error(id, &e));
                }
                match change(router, c_body).await {
                    Ok(ch) => router.group_request(account, AccountId(c.group), GroupRequest::Change(ch)).await,
                    Err(e) => Err(e),
                }
            }
        },
        Body::GetGroup(g) => router.group_request(account, AccountId(g.group), GroupRequest::Info).await,
        Body::OpenDirect(open) => {
            if let Err(e) = router.charge_group_change(device) {
                return Answer::Now(messaging_error(id, &e));
            }
            match self::account(router, &open.phone).await {
                Ok(with) => router.open_direct(account, with).await,
                Err(e) => Err(e),
            }
        }
        Body::GetMessageInfo(m) => {
            router.group_request(account, AccountId(m.group), GroupRequest::MessageInfo { seq: m.seq }).await
        }
        Body::ListGroups(_) => {
            return Answer::Now(match router.groups_of(account).await {
                Ok(metas) => {
                    let mut groups = Vec::with_capacity(metas.len());
                    for meta in &metas {
                        match crate::convert::group_info(router, meta).await {
                            Ok(info) => groups.push(info),
                            Err(e) => return Answer::Now(unavailable(id, &e)),
                        }
                    }
                    reply(id, server_frame::Body::GroupList(v1::GroupList { groups }))
                }
                Err(e) => messaging_error(id, &e),
            });
        }
        _ => return Answer::Now(error(id, ErrorCode::UnknownRequest, "not a group request")),
    };
    match asked {
        Ok(answer) => later(router, id, answer),
        // Named by number: "account 17" means nothing to a user.
        Err(MessagingError::Group(GroupError::AddRefused(member))) => {
            Answer::Now(match router.directory().phone(member).await {
                Ok(phone) => {
                    let who = phone.map(|p| p.to_string()).unwrap_or_else(|| "someone you named".into());
                    error(
                        id,
                        ErrorCode::Forbidden,
                        format!("{who} cannot be added to groups by you; nothing was changed"),
                    )
                }
                Err(e) => unavailable(id, &e),
            })
        }
        Err(e) => Answer::Now(messaging_error(id, &e)),
    }
}
