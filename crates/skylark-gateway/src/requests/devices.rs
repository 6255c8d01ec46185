//! The account's devices: who am I, linking, listing, renaming, removing,
//! and paging back through history.

use super::{Caller, device_error, ok, reply, unavailable};
use skylark_core::DeviceId;
use skylark_protocol::ServerFrame;
use skylark_protocol::v1::{self, server_frame};
use skylark_server::devices::DeviceInfo;

pub(super) async fn who_am_i(caller: &Caller<'_>, id: u64) -> ServerFrame {
    let authed = caller.authed;
    // The stored name: the device may have been renamed since it connected.
    let name = match caller.shared.server.store.device(authed.device.id).await {
        Ok(Some(d)) => d.name,
        _ => authed.device.name.clone(),
    };
    reply(
        id,
        server_frame::Body::WhoAmI(v1::WhoAmI {
            account_id: authed.account.id.0,
            phone: authed.account.phone.to_string(),
            device_id: authed.device.id.0,
            device_name: name,
            device_created_at_ms: authed.device.created_at_ms,
        }),
    )
}

pub(super) async fn approve_link(caller: &Caller<'_>, id: u64, approve: v1::ApproveLink) -> ServerFrame {
    match caller.shared.server.devices.approve_link(caller.authed.account.id, &approve.code).await {
        Ok(device) => {
            let info = DeviceInfo { device, online: false };
            let device = Some(crate::convert::device_info(&info, caller.authed.device.id));
            reply(id, server_frame::Body::LinkApproved(v1::LinkApproved { device }))
        }
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn list(caller: &Caller<'_>, id: u64) -> ServerFrame {
    match caller.shared.server.devices.list(caller.authed.account.id).await {
        Ok(list) => {
            let devices = list.iter().map(|d| crate::convert::device_info(d, caller.authed.device.id)).collect();
            reply(id, server_frame::Body::DeviceList(v1::DeviceList { devices }))
        }
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn rename(caller: &Caller<'_>, id: u64, r: v1::RenameDevice) -> ServerFrame {
    match caller.shared.server.devices.rename(caller.authed.account.id, DeviceId(r.device_id), &r.name).await {
        Ok(()) => ok(id),
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn remove(caller: &Caller<'_>, id: u64, r: v1::RemoveDevice) -> ServerFrame {
    match caller.shared.server.devices.remove(caller.authed.account.id, DeviceId(r.device_id)).await {
        Ok(()) => ok(id),
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn history(caller: &Caller<'_>, id: u64, h: v1::HistoryRequest) -> ServerFrame {
    let limit = if h.limit == 0 { 50 } else { h.limit as usize };
    let server = &caller.shared.server;
    match server.devices.history(caller.authed.account.id, h.before_seq, limit).await {
        Ok(page) => match crate::convert::history_page(&server.router, page).await {
            Ok(page) => reply(id, server_frame::Body::HistoryPage(page)),
            Err(e) => unavailable(id, &e),
        },
        Err(e) => device_error(id, &e),
    }
}
