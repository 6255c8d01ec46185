//! The request layer: what an authenticated device may ask, one module
//! per area, each turning wire requests into calls of the services and
//! their results back into frames.
//!
//! | module | requests |
//! | --- | --- |
//! | [`messaging`] | `SendMessage`, `MarkRead`, `Ack`, `GetMediaToken` |
//! | [`devices`] | `WhoAmI`, `ApproveLink`, `ListDevices`, `RenameDevice`, `RemoveDevice`, `History` |
//! | [`presence`] | `Typing`, `SubscribePresence`, `SetActive`, `SetPrivacy` |
//! | [`push`] | `RegisterPush` |
//! | [`groups`] | `CreateGroup`, `ChangeGroup`, `GetGroup`, `ListGroups`, `GetMessageInfo`, `OpenDirect` |
//! | [`keys`] | `UploadKeyPackages`, `GetKeyPackageStock`, `ClaimKeyPackages` |
//! | [`blocks`] | `Block`, `ListBlocked`, `SetContactName`, `ListContactNames` |
//! | [`pin`] | `SetPin`, `GetPinStatus` |
//! | [`account`] | `ExportAccount`, `DeleteAccount`, `Report`, `SetProfile`, `GetProfiles` |
//!
//! The session (`session.rs`) owns the connection's state machine and calls
//! [`answer`] for each request frame; this layer knows nothing of
//! handshakes, windows or transports. Every error a device can cause is
//! answered with its documented code and a message in words; store
//! failures are logged here and answered "unavailable".

mod account;
mod blocks;
mod devices;
pub(crate) mod groups;
mod keys;
mod messaging;
mod pin;
mod presence;
mod push;

use crate::Shared;
use skylark_protocol::v1::{self, client_frame, server_frame};
use skylark_protocol::{ClientFrame, ErrorCode, ServerFrame};
use skylark_server::auth::Identity;
use skylark_server::devices::DeviceError;
use skylark_server::messaging::MessagingError;
use skylark_store::StoreError;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::oneshot;

/// An answer that waits for the actor's durable write.
pub(crate) type Deferred = Pin<Box<dyn Future<Output = ServerFrame> + Send>>;

/// How a request is answered.
pub(crate) enum Answer {
    Now(ServerFrame),
    /// Once the actor has made it durable.
    Later(Deferred),
    /// Never (acks, typing).
    None,
}

/// Who is asking: the connection's authenticated device.
pub(crate) struct Caller<'a> {
    pub shared: &'a Shared,
    pub authed: &'a Identity,
    pub connection: u64,
}

pub(crate) fn reply(id: u64, body: server_frame::Body) -> ServerFrame {
    ServerFrame { id, body: Some(body) }
}

pub(crate) fn ok(id: u64) -> ServerFrame {
    reply(id, server_frame::Body::Ok(v1::Ok {}))
}

pub(crate) fn error(id: u64, code: ErrorCode, message: impl Into<String>) -> ServerFrame {
    reply(id, server_frame::Body::Error(v1::Error { code: code as i32, message: message.into(), retry_after_ms: 0 }))
}

fn device_error(id: u64, e: &DeviceError) -> ServerFrame {
    match e {
        DeviceError::Store(e) => unavailable(id, e),
        e => error(id, crate::convert::device_error_code(e), e.to_string()),
    }
}

/// A request that failed because the store did: the details go to the
/// server's log, the device is told in words to retry.
pub(crate) fn unavailable(id: u64, e: &StoreError) -> ServerFrame {
    tracing::error!(error = %e, "store failed while answering a request");
    error(id, ErrorCode::Unavailable, "the server's storage is unavailable; try again shortly")
}

pub(crate) fn messaging_error(id: u64, e: &MessagingError) -> ServerFrame {
    match e {
        MessagingError::Unavailable(e) => return unavailable(id, e),
        MessagingError::Internal(what) => {
            tracing::error!(invariant = what, "internal error answering a request");
            return error(id, ErrorCode::Internal, "internal server error");
        }
        _ => {}
    }
    let mut frame = error(id, crate::convert::messaging_error_code(e), e.to_string());
    if let (MessagingError::RateLimited(wait), Some(server_frame::Body::Error(err))) = (e, frame.body.as_mut()) {
        err.retry_after_ms = (wait.as_millis() as u64).max(1);
    }
    frame
}

/// For a request that acts on another account named by its number
/// (block, name, report): charges the device like a group change (each is a
/// rare durable write), then finds the account. `Err` is the answer to give:
/// rate-limited, a malformed or unknown number, or the caller's own number
/// (`own_number` says, in words, why that makes no sense).
pub(crate) async fn charged_peer(
    caller: &Caller<'_>,
    id: u64,
    phone: &str,
    own_number: &str,
) -> Result<skylark_core::AccountId, ServerFrame> {
    let router = &caller.shared.server.router;
    router.charge_group_change(caller.authed.device).map_err(|e| messaging_error(id, &e))?;
    let phone = skylark_core::PhoneNumber::parse(phone)
        .map_err(|e| messaging_error(id, &MessagingError::InvalidRecipient(e)))?;
    let peer = match router.directory().account(&phone).await {
        Ok(Some(peer)) => peer,
        Ok(None) => return Err(messaging_error(id, &MessagingError::UnknownRecipient)),
        Err(e) => return Err(unavailable(id, &e)),
    };
    if peer == caller.authed.account {
        return Err(error(id, ErrorCode::InvalidArgument, own_number));
    }
    Ok(peer)
}

/// The answer to a request the actor has queued: `done` turns its result
/// into the reply once the write is durable.
pub(crate) fn when_durable<T: Send + 'static>(
    id: u64,
    queued: Result<oneshot::Receiver<Result<T, MessagingError>>, MessagingError>,
    done: impl FnOnce(T) -> ServerFrame + Send + 'static,
) -> Answer {
    match queued {
        Ok(durable) => Answer::Later(Box::pin(async move {
            match durable.await {
                Ok(Ok(value)) => done(value),
                Ok(Err(e)) => messaging_error(id, &e),
                Err(_) => messaging_error(id, &MessagingError::ShuttingDown),
            }
        })),
        Err(e) => Answer::Now(messaging_error(id, &e)),
    }
}

/// The answer to one request from an authenticated device.
pub(crate) async fn answer(shared: &Shared, authed: &Identity, connection: u64, frame: ClientFrame) -> Answer {
    use client_frame::Body;
    let caller = Caller { shared, authed, connection };
    let id = frame.id;
    let Some(body) = frame.body else {
        return Answer::Now(error(id, ErrorCode::UnknownRequest, "frame has no known body"));
    };
    // Notifications: no id needed, never answered.
    match body {
        Body::Ack(ack) => return messaging::ack(&caller, ack).await,
        Body::Typing(typing) => return presence::typing(&caller, typing).await,
        _ if id == 0 => return Answer::Now(error(0, ErrorCode::MissingRequestId, "request id must be non-zero")),
        _ => {}
    }
    match body {
        Body::Ping(_) => {
            Answer::Now(reply(id, server_frame::Body::Pong(v1::Pong { server_time_ms: shared.server.clock.now_ms() })))
        }
        Body::Send(send) => messaging::send(&caller, id, send).await,
        Body::MarkRead(mark) => messaging::mark_read(&caller, id, mark).await,
        Body::WhoAmI(_) => Answer::Now(devices::who_am_i(&caller, id).await),
        Body::ApproveLink(approve) => Answer::Now(devices::approve_link(&caller, id, approve).await),
        Body::ListDevices(_) => Answer::Now(devices::list(&caller, id).await),
        Body::RenameDevice(r) => Answer::Now(devices::rename(&caller, id, r).await),
        Body::RemoveDevice(r) => Answer::Now(devices::remove(&caller, id, r).await),
        Body::History(h) => Answer::Now(devices::history(&caller, id, h).await),
        Body::SubscribePresence(sub) => Answer::Now(presence::subscribe(&caller, id, sub).await),
        Body::SetActive(active) => Answer::Now(presence::set_active(&caller, id, active)),
        Body::SetPrivacy(privacy) => Answer::Now(presence::set_privacy(&caller, id, privacy).await),
        Body::RegisterPush(register) => Answer::Now(push::register(&caller, id, register).await),
        Body::UploadKeyPackages(upload) => Answer::Now(keys::upload(&caller, id, upload).await),
        Body::GetKeyPackageStock(_) => Answer::Now(keys::get_stock(&caller, id).await),
        Body::ClaimKeyPackages(claim) => Answer::Now(keys::claim(&caller, id, claim).await),
        Body::Block(block) => blocks::block(&caller, id, block).await,
        Body::ListBlocked(_) => Answer::Now(blocks::list(&caller, id).await),
        Body::SetContactName(set) => blocks::set_name(&caller, id, set).await,
        Body::ListContactNames(_) => Answer::Now(blocks::names(&caller, id).await),
        Body::SetPin(set) => Answer::Now(pin::set(&caller, id, set).await),
        Body::GetPinStatus(_) => Answer::Now(pin::status(&caller, id).await),
        Body::ExportAccount(_) => Answer::Now(account::export(&caller, id).await),
        Body::DeleteAccount(delete) => Answer::Now(account::delete(&caller, id, delete).await),
        Body::Report(report) => Answer::Now(account::report(&caller, id, report).await),
        Body::SetProfile(set) => Answer::Now(account::set_profile(&caller, id, set).await),
        Body::GetProfiles(get) => Answer::Now(account::profiles(&caller, id, get).await),
        Body::GetMediaToken(_) => Answer::Now(messaging::media_token(&caller, id)),
        body @ (Body::CreateGroup(_)
        | Body::ChangeGroup(_)
        | Body::GetGroup(_)
        | Body::ListGroups(_)
        | Body::GetMessageInfo(_)
        | Body::OpenDirect(_)) => groups::answer(&shared.server.router, authed.account, authed.device, id, body).await,
        Body::Hello(_) | Body::Authenticate(_) => {
            Answer::Now(error(id, ErrorCode::AlreadyAuthenticated, "this connection is already authenticated"))
        }
        Body::Ack(_) | Body::Typing(_) => Answer::None,
    }
}
