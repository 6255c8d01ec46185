//! Where to wake this device when it has no connection.

use super::{Caller, error, ok, unavailable};
use skylark_protocol::v1;
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::push::PushError;

pub(super) async fn register(caller: &Caller<'_>, id: u64, register: v1::RegisterPush) -> ServerFrame {
    match crate::convert::push_target(register) {
        Ok(target) => match caller.shared.server.pusher.register(caller.authed.device, target).await {
            Ok(()) => ok(id),
            Err(PushError::Store(e)) => unavailable(id, &e),
            Err(e) => error(id, ErrorCode::InvalidArgument, e.to_string()),
        },
        Err(why) => error(id, ErrorCode::InvalidArgument, why),
    }
}
