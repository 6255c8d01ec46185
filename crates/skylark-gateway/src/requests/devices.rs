//! The account's devices: who am I, linking, listing, renaming, removing,
//! and paging back through history.

use super::{Caller, device_error, error, ok, reply, unavailable};
use skylark_core::DeviceId;
use skylark_protocol::v1::{self, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::devices::DeviceInfo;

pub(super) async fn who_am_i(caller: &Caller<'_>, id: u64) -> ServerFrame {
    let (me, store) = (caller.authed, &caller.shared.server.store);
    // The stored records: the device may have been renamed since it connected.
    let (account, device) = match (store.account(me.account).await, store.device(me.device).await) {
        (Ok(Some(account)), Ok(Some(device))) => (account, device),
        (Err(e), _) | (_, Err(e)) => return unavailable(id, &e),
        _ => return error(id, ErrorCode::Unauthenticated, "this device or its account no longer exists"),
    };
    reply(
        id,
        server_frame::Body::WhoAmI(v1::WhoAmI {
            account_id: account.id.0,
            phone: account.phone.to_string(),
            device_id: device.id.0,
            device_name: device.name,
            device_created_at_ms: device.created_at_ms,
        }),
    )
}

pub(super) async fn approve_link(caller: &Caller<'_>, id: u64, approve: v1::ApproveLink) -> ServerFrame {
    match caller.shared.server.devices.approve_link(caller.authed.account, &approve.code).await {
        Ok(device) => {
            let info = DeviceInfo { device, online: false };
            let device = Some(crate::convert::device_info(&info, caller.authed.device));
            reply(id, server_frame::Body::LinkApproved(v1::LinkApproved { device }))
        }
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn list(caller: &Caller<'_>, id: u64) -> ServerFrame {
    match caller.shared.server.devices.list(caller.authed.account).await {
        Ok(list) => {
            let devices = list.iter().map(|d| crate::convert::device_info(d, caller.authed.device)).collect();
            reply(id, server_frame::Body::DeviceList(v1::DeviceList { devices }))
        }
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn rename(caller: &Caller<'_>, id: u64, r: v1::RenameDevice) -> ServerFrame {
    match caller.shared.server.devices.rename(caller.authed.account, DeviceId(r.device_id), &r.name).await {
        Ok(()) => ok(id),
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn remove(caller: &Caller<'_>, id: u64, r: v1::RemoveDevice) -> ServerFrame {
    match caller.shared.server.devices.remove(caller.authed.account, DeviceId(r.device_id)).await {
        Ok(()) => ok(id),
        Err(e) => device_error(id, &e),
    }
}

pub(super) async fn history(caller: &Caller<'_>, id: u64, h: v1::HistoryRequest) -> ServerFrame {
    let limit = if h.limit == 0 { 50 } else { h.limit as usize };
    let server = &caller.shared.server;
    match server.devices.history(caller.authed.account, h.before_seq, limit).await {
        Ok(page) => match crate::convert::history_page(&server.router, page).await {
            Ok(page) => reply(id, server_frame::Body::HistoryPage(page)),
            Err(e) => unavailable(id, &e),
        },
        Err(e) => device_error(id, &e),
    }
}
