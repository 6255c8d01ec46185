//! Two-step verification: `SetPin` and `GetPinStatus`. The rules live in
//! `skylark_server::registration` (the lock is checked at sign-up).

use super::{Caller, error, messaging_error, reply, unavailable};
use skylark_protocol::v1::{self, server_frame};
use skylark_protocol::{ErrorCode, ServerFrame};
use skylark_server::registration::RegistrationError;

pub(super) async fn set(caller: &Caller<'_>, id: u64, set: v1::SetPin) -> ServerFrame {
    let server = &caller.shared.server;
    // Hashing a PIN is slow on purpose: charged like a group change.
    if let Err(e) = server.router.charge_group_change(caller.authed.device) {
        return messaging_error(id, &e);
    }
    let pin = Some(set.pin.as_str()).filter(|p| !p.is_empty());
    match server.registration.set_pin(caller.authed.account, pin).await {
        Ok(()) => {
            tracing::info!(account = %caller.authed.account, enabled = pin.is_some(), "two-step verification changed");
            status(caller, id).await
        }
        Err(RegistrationError::Store(e)) => unavailable(id, &e),
        Err(e) => error(id, ErrorCode::InvalidArgument, e.to_string()),
    }
}

pub(super) async fn status(caller: &Caller<'_>, id: u64) -> ServerFrame {
    let registration = &caller.shared.server.registration;
    match registration.pin_set_at(caller.authed.account).await {
        Ok(set_at) => reply(
            id,
            server_frame::Body::PinStatus(v1::PinStatus {
                enabled: set_at.is_some(),
                set_at_ms: set_at.unwrap_or(0),
                lapse_ms: registration.policy().pin_lapse_ms,
            }),
        ),
        Err(RegistrationError::Store(e)) => unavailable(id, &e),
        Err(e) => error(id, ErrorCode::Internal, e.to_string()),
    }
}
