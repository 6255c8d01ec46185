//! The account as a whole: `ExportAccount` and `DeleteAccount`. The work is
//! `skylark_server::accounts`.

use super::{Caller, error, messaging_error, ok, reply, unavailable};
use skylark_core::PhoneNumber;
use skylark_protocol::v1::{self, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::accounts::AccountError;

fn account_error(id: u64, e: &AccountError) -> ServerFrame {
    match e {
        AccountError::Invalid(why) => error(id, ErrorCode::InvalidArgument, why.clone()),
        AccountError::Store(e) => unavailable(id, e),
        AccountError::Messaging(e) => messaging_error(id, e),
        AccountError::UnknownAccount => error(id, ErrorCode::UnknownDevice, "this account no longer exists"),
    }
}

pub(super) async fn export(caller: &Caller<'_>, id: u64) -> ServerFrame {
    // It reads every group of the account: charged like a group change.
    if let Err(e) = caller.shared.server.router.charge_group_change(caller.authed.device) {
        return messaging_error(id, &e);
    }
    match caller.shared.server.export_account(caller.authed.account).await {
        Ok(export) => match serde_json::to_string_pretty(&export) {
            Ok(json) => reply(id, server_frame::Body::AccountExport(v1::AccountExport { json })),
            Err(_) => error(id, ErrorCode::Internal, "the export could not be written"),
        },
        Err(e) => account_error(id, &e),
    }
}

pub(super) async fn delete(caller: &Caller<'_>, id: u64, delete: v1::DeleteAccount) -> ServerFrame {
    let me = match caller.shared.server.store.account(caller.authed.account).await {
        Ok(Some(account)) => account,
        Ok(None) => return error(id, ErrorCode::Unauthenticated, "this account no longer exists"),
        Err(e) => return unavailable(id, &e),
    };
    // Typed out by the user, as a confirmation.
    if PhoneNumber::parse(&delete.phone).ok().as_ref() != Some(&me.phone) {
        return error(
            id,
            ErrorCode::InvalidArgument,
            format!("to delete the account, confirm with its own number ({})", me.phone),
        );
    }
    // Rare, and heavy: charged like a group change.
    if let Err(e) = caller.shared.server.router.charge_group_change(caller.authed.device) {
        return messaging_error(id, &e);
    }
    match caller.shared.server.delete_account(me.id).await {
        Ok(_) => ok(id),
        Err(e) => account_error(id, &e),
    }
}

pub(super) async fn report(caller: &Caller<'_>, id: u64, report: v1::Report) -> ServerFrame {
    let server = &caller.shared.server;
    let me = caller.authed.account;
    let reported = if report.group != 0 {
        if let Err(e) = server.router.charge_group_change(caller.authed.device) {
            return messaging_error(id, &e);
        }
        let group = skylark_core::AccountId(report.group);
        match server.store.group(group).await {
            Ok(Some(_)) if group.is_group() => group,
            Ok(_) => return error(id, ErrorCode::UnknownGroup, "no group has that id"),
            Err(e) => return unavailable(id, &e),
        }
    } else {
        match super::charged_peer(caller, id, &report.phone, "you cannot report yourself").await {
            Ok(account) => account,
            Err(answer) => return answer,
        }
    };
    match server.report(me, reported, report.block).await {
        Ok(_) => ok(id),
        Err(e) => account_error(id, &e),
    }
}

/// Profiles asked for at once, at most (as presence subscriptions).
const MAX_PROFILES_ASKED: usize = 512;

pub(super) async fn set_profile(caller: &Caller<'_>, id: u64, set: v1::SetProfile) -> ServerFrame {
    let server = &caller.shared.server;
    if let Err(e) = server.router.charge_group_change(caller.authed.device) {
        return messaging_error(id, &e);
    }
    let visible_to = match v1::Visibility::try_from(set.visible_to) {
        Ok(v1::Visibility::Unspecified) => None,
        _ => match crate::convert::visibility(set.visible_to) {
            Some(v) => Some(v),
            None => {
                return error(id, ErrorCode::InvalidArgument, "unknown visibility: use everyone, contacts or nobody");
            }
        },
    };
    match server.set_profile(caller.authed.account, &set.name, &set.about, visible_to).await {
        Ok(()) => ok(id),
        Err(e) => account_error(id, &e),
    }
}

pub(super) async fn profiles(caller: &Caller<'_>, id: u64, get: v1::GetProfiles) -> ServerFrame {
    let server = &caller.shared.server;
    if get.phones.len() > MAX_PROFILES_ASKED {
        return error(id, ErrorCode::InvalidArgument, format!("ask for at most {MAX_PROFILES_ASKED} profiles at once"));
    }
    let mut profiles = Vec::new();
    for phone in get.phones.iter().filter_map(|p| PhoneNumber::parse(p).ok()) {
        let account = match server.router.directory().account(&phone).await {
            Ok(Some(account)) => account,
            Ok(None) => continue,
            Err(e) => return unavailable(id, &e),
        };
        match server.profile_for(account, caller.authed.account).await {
            Ok(view) => profiles.push(v1::ProfileInfo {
                account: account.0,
                phone: phone.to_string(),
                visible: view.visible,
                name: view.name,
                about: view.about,
                visible_to: view.visible_to.map_or(0, |v| crate::convert::visibility_wire(v) as i32),
            }),
            Err(e) => return unavailable(id, &e),
        }
    }
    reply(id, server_frame::Body::Profiles(v1::Profiles { profiles }))
}
