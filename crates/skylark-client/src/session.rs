//! An authenticated connection.
//!
//! [`Session::open`] connects, negotiates the version, answers the challenge
//! with the device key, then hands the connection to a background task. The
//! task matches replies to requests by id, sends a Ping every heartbeat
//! interval, and passes frames the server sends on its own (id 0) to the
//! event channel. Requests go through a cloneable [`SessionHandle`].

use crate::conn::{Endpoint, FrameConn, Received};
use crate::{ClientError, Identity};
use skylark_protocol::v1::{self, client_frame, server_frame};
use skylark_protocol::{ClientFrame, CloseCode, ErrorCode, MAX_VERSION, MIN_VERSION, ServerFrame};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Requests queued towards the session task. Small: callers wait for their
/// replies anyway, so a deep queue would only hide back-pressure.
const COMMAND_QUEUE: usize = 64;
/// Server-initiated frames not yet taken by the application. When full, the
/// session stops reading the socket, which pushes back on the server.
const EVENT_QUEUE: usize = 1024;

/// The most phone numbers one key-package claim may name (the server's limit).
pub const MAX_CLAIM_NUMBERS: usize = 50;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum To<'a> {
    /// A 1:1 message to this phone number.
    Phone(&'a str),
    /// A post to this group.
    Group(u64),
}

/// What a message does beyond carrying its payload. `edits` and `deletes`
/// name one of your own earlier messages by its sequence (the `seq` of its
/// `MessageId`: for a post, the group sequence), within the server's edit
/// and delete windows; `expire_after_ms` (0: never) makes it disappear;
/// `attachments` names the uploaded blobs the payload points to;
/// `message_epoch` is the epoch of the group's encryption an encrypted
/// post was made in (the group refuses it once a commit ended that epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendOptions {
    pub edits: Option<u64>,
    pub deletes: Option<u64>,
    pub expire_after_ms: u64,
    pub attachments: Vec<String>,
    pub message_epoch: Option<u64>,
}

/// What the server told us when the session was established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub version: u32,
    pub account_id: u64,
    pub device_id: u64,
    pub phone: String,
    pub heartbeat_interval_ms: u64,
    pub idle_timeout_ms: u64,
    /// The largest payload the server takes in one post.
    pub max_payload_bytes: u64,
}

/// Something the server sent without being asked, or the end of the session.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Frame(ServerFrame),
    Closed { code: Option<CloseCode>, reason: String },
}

type Reply = oneshot::Sender<Result<server_frame::Body, ClientError>>;

enum Command {
    Request {
        body: client_frame::Body,
        reply: Reply,
    },
    /// A frame that gets no answer (acks).
    Notify {
        body: client_frame::Body,
    },
    Close,
}

/// Sends requests on a session; cheap to clone.
#[derive(Clone, Debug)]
pub struct SessionHandle {
    commands: mpsc::Sender<Command>,
    /// How the session ended, once it has: what a request made after the
    /// end reports, rather than a bare "ended".
    ended: Arc<OnceLock<(Option<CloseCode>, String)>>,
    /// The largest payload the server takes in one post.
    max_payload_bytes: u64,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl SessionHandle {
    fn closed_unexpectedly(&self) -> ClientError {
        match self.ended.get() {
            Some((code, reason)) => ClientError::Closed { code: *code, reason: reason.clone() },
            None => ClientError::Closed { code: None, reason: "session ended".into() },
        }
    }
}

impl SessionHandle {
    /// The largest payload the server takes in one post (it says so when
    /// the session starts).
    pub fn max_payload_bytes(&self) -> u64 {
        self.max_payload_bytes
    }

    /// Sends one request and waits for its reply. An error frame becomes
    /// [`ClientError::Refused`].
    pub async fn request(&self, body: client_frame::Body) -> Result<server_frame::Body, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Request { body, reply }).await.map_err(|_| self.closed_unexpectedly())?;
        rx.await.map_err(|_| self.closed_unexpectedly())?
    }

    pub async fn who_am_i(&self) -> Result<v1::WhoAmI, ClientError> {
        match self.request(client_frame::Body::WhoAmI(v1::WhoAmIRequest {})).await? {
            server_frame::Body::WhoAmI(w) => Ok(w),
            other => Err(ClientError::Protocol(format!("expected WhoAmI, got {other:?}"))),
        }
    }

    pub async fn ping(&self) -> Result<v1::Pong, ClientError> {
        match self.request(client_frame::Body::Ping(v1::Ping {})).await? {
            server_frame::Body::Pong(p) => Ok(p),
            other => Err(ClientError::Protocol(format!("expected Pong, got {other:?}"))),
        }
    }

    /// Sends a message; returns once it is durable on the server (one tick).
    /// Resending with the same `client_id` is safe: the server returns the
    /// first ack with `duplicate` set.
    pub async fn send(&self, to: &str, client_id: &str, payload: Vec<u8>) -> Result<v1::SendAck, ClientError> {
        self.send_with(To::Phone(to), client_id, payload, SendOptions::default()).await
    }

    /// Sends a message that edits or deletes one of yours, or disappears
    /// (see [`SendOptions`]); otherwise as [`Session::send`] and
    /// [`Session::send_to_group`].
    pub async fn send_with(
        &self,
        to: To<'_>,
        client_id: &str,
        payload: Vec<u8>,
        options: SendOptions,
    ) -> Result<v1::SendAck, ClientError> {
        let (to, group) = match to {
            To::Phone(phone) => (phone.to_owned(), 0),
            To::Group(group) => (String::new(), group),
        };
        let body = client_frame::Body::Send(v1::SendMessage {
            client_id: client_id.to_owned(),
            to,
            group,
            payload: payload.into(),
            commit_epoch: None,
            message_epoch: options.message_epoch,
            edits: options.edits,
            deletes: options.deletes,
            expire_after_ms: options.expire_after_ms,
            attachments: options.attachments.clone(),
        });
        self.send_body(body).await
    }

    /// Posts a message to a group; returns once it is durable in the
    /// group's log. The ack's id is (group, group sequence).
    pub async fn send_to_group(
        &self,
        group: u64,
        client_id: &str,
        payload: Vec<u8>,
    ) -> Result<v1::SendAck, ClientError> {
        self.post(group, client_id, payload, None).await
    }

    /// Posts an MLS commit made in `epoch` to a group. The group takes one
    /// commit per epoch: a later one for the same epoch is refused with
    /// `ERROR_CODE_STALE_EPOCH` ([`ClientError::Refused`]).
    pub async fn commit_to_group(
        &self,
        group: u64,
        client_id: &str,
        epoch: u64,
        payload: Vec<u8>,
    ) -> Result<v1::SendAck, ClientError> {
        self.post(group, client_id, payload, Some(epoch)).await
    }

    /// As [`SessionHandle::commit_to_group`], for a commit kept out of
    /// line: `payload` names the blobs `attachments` holding its parts.
    pub async fn commit_to_group_with(
        &self,
        group: u64,
        client_id: &str,
        epoch: u64,
        payload: Vec<u8>,
        attachments: Vec<String>,
    ) -> Result<v1::SendAck, ClientError> {
        self.post_with(group, client_id, payload, Some(epoch), attachments).await
    }

    async fn post(
        &self,
        group: u64,
        client_id: &str,
        payload: Vec<u8>,
        commit_epoch: Option<u64>,
    ) -> Result<v1::SendAck, ClientError> {
        self.post_with(group, client_id, payload, commit_epoch, Vec::new()).await
    }

    async fn post_with(
        &self,
        group: u64,
        client_id: &str,
        payload: Vec<u8>,
        commit_epoch: Option<u64>,
        attachments: Vec<String>,
    ) -> Result<v1::SendAck, ClientError> {
        let body = client_frame::Body::Send(v1::SendMessage {
            client_id: client_id.to_owned(),
            to: String::new(),
            group,
            payload: payload.into(),
            commit_epoch,
            message_epoch: None,
            edits: None,
            deletes: None,
            expire_after_ms: 0,
            attachments,
        });
        self.send_body(body).await
    }

    async fn send_body(&self, body: client_frame::Body) -> Result<v1::SendAck, ClientError> {
        match self.request(body).await? {
            server_frame::Body::SendAck(ack) => Ok(ack),
            other => Err(ClientError::Protocol(format!("expected SendAck, got {other:?}"))),
        }
    }

    /// Creates a group (you are its admin) with members given by phone number.
    pub async fn create_group(&self, subject: &str, members: &[&str]) -> Result<v1::GroupInfo, ClientError> {
        let members = members.iter().map(|p| (*p).to_owned()).collect();
        self.group_info_of(client_frame::Body::CreateGroup(v1::CreateGroup { subject: subject.to_owned(), members }))
            .await
    }

    /// Opens the group of the 1:1 conversation with `phone` (created on
    /// first use by either side; it orders the conversation's encryption).
    pub async fn open_direct(&self, phone: &str) -> Result<v1::GroupInfo, ClientError> {
        self.group_info_of(client_frame::Body::OpenDirect(v1::OpenDirect { phone: phone.to_owned() })).await
    }

    /// Changes a group; returns the group after the change.
    pub async fn change_group(
        &self,
        group: u64,
        change: v1::change_group::Change,
    ) -> Result<v1::GroupInfo, ClientError> {
        self.group_info_of(client_frame::Body::ChangeGroup(v1::ChangeGroup { group, change: Some(change) })).await
    }

    pub async fn group_info(&self, group: u64) -> Result<v1::GroupInfo, ClientError> {
        self.group_info_of(client_frame::Body::GetGroup(v1::GetGroup { group })).await
    }

    async fn group_info_of(&self, body: client_frame::Body) -> Result<v1::GroupInfo, ClientError> {
        match self.request(body).await? {
            server_frame::Body::GroupInfo(info) => Ok(info),
            other => Err(ClientError::Protocol(format!("expected GroupInfo, got {other:?}"))),
        }
    }

    /// The groups this account is a member of.
    pub async fn list_groups(&self) -> Result<Vec<v1::GroupInfo>, ClientError> {
        match self.request(client_frame::Body::ListGroups(v1::ListGroups {})).await? {
            server_frame::Body::GroupList(list) => Ok(list.groups),
            other => Err(ClientError::Protocol(format!("expected GroupList, got {other:?}"))),
        }
    }

    /// Who has one of your group messages (`seq`: its group sequence).
    pub async fn message_info(&self, group: u64, seq: u64) -> Result<v1::MessageInfo, ClientError> {
        match self.request(client_frame::Body::GetMessageInfo(v1::GetMessageInfo { group, seq })).await? {
            server_frame::Body::MessageInfo(info) => Ok(info),
            other => Err(ClientError::Protocol(format!("expected MessageInfo, got {other:?}"))),
        }
    }

    /// Tells the server this device has every event up to `up_to_seq`.
    pub async fn ack(&self, up_to_seq: u64) -> Result<(), ClientError> {
        let body = client_frame::Body::Ack(v1::Ack { up_to_seq });
        self.commands.send(Command::Notify { body }).await.map_err(|_| self.closed_unexpectedly())
    }

    /// Marks `peer`'s messages read up to the peer's sequence `up_to_seq`.
    pub async fn mark_read(&self, peer: u64, up_to_seq: u64) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::MarkRead(v1::MarkRead { peer, up_to_seq })).await
    }

    /// Approves a new device's link code, adding it to this account.
    pub async fn approve_link(&self, code: &str) -> Result<v1::DeviceInfo, ClientError> {
        match self.request(client_frame::Body::ApproveLink(v1::ApproveLink { code: code.to_owned() })).await? {
            server_frame::Body::LinkApproved(a) => {
                a.device.ok_or_else(|| ClientError::Protocol("LinkApproved without a device".into()))
            }
            other => Err(ClientError::Protocol(format!("expected LinkApproved, got {other:?}"))),
        }
    }

    pub async fn list_devices(&self) -> Result<Vec<v1::DeviceInfo>, ClientError> {
        match self.request(client_frame::Body::ListDevices(v1::ListDevices {})).await? {
            server_frame::Body::DeviceList(list) => Ok(list.devices),
            other => Err(ClientError::Protocol(format!("expected DeviceList, got {other:?}"))),
        }
    }

    pub async fn rename_device(&self, device_id: u64, name: &str) -> Result<(), ClientError> {
        let body = client_frame::Body::RenameDevice(v1::RenameDevice { device_id, name: name.to_owned() });
        self.expect_ok(body).await
    }

    pub async fn remove_device(&self, device_id: u64) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::RemoveDevice(v1::RemoveDevice { device_id })).await
    }

    /// A page of the account's history before `before_seq` (0: newest), newest first.
    pub async fn history(&self, before_seq: u64, limit: u32) -> Result<v1::HistoryPage, ClientError> {
        match self.request(client_frame::Body::History(v1::HistoryRequest { before_seq, limit })).await? {
            server_frame::Body::HistoryPage(page) => Ok(page),
            other => Err(ClientError::Protocol(format!("expected HistoryPage, got {other:?}"))),
        }
    }

    /// Watches these accounts' presence; returns their presence now.
    /// Changes then arrive as `PresenceInfo` frames.
    pub async fn subscribe_presence(&self, phones: &[&str]) -> Result<Vec<v1::PresenceInfo>, ClientError> {
        let phones = phones.iter().map(|p| (*p).to_owned()).collect();
        match self.request(client_frame::Body::SubscribePresence(v1::SubscribePresence { phones })).await? {
            server_frame::Body::PresenceList(list) => Ok(list.presences),
            other => Err(ClientError::Protocol(format!("expected PresenceList, got {other:?}"))),
        }
    }

    /// Client state indication: `false` while the app is in the background.
    pub async fn set_active(&self, active: bool) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::SetActive(v1::SetActive { active })).await
    }

    /// Tells `to`'s online devices that this user is typing (not stored).
    pub async fn typing(&self, to: &str, state: v1::TypingState) -> Result<(), ClientError> {
        let body = client_frame::Body::Typing(v1::Typing { to: to.to_owned(), state: state as i32 });
        self.commands.send(Command::Notify { body }).await.map_err(|_| self.closed_unexpectedly())
    }

    pub async fn set_privacy(&self, presence: v1::Visibility) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::SetPrivacy(v1::SetPrivacy { presence: presence as i32 })).await
    }

    /// Blocks (or with `blocked: false`, unblocks) the account of `phone`.
    pub async fn block(&self, phone: &str, blocked: bool) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::Block(v1::Block { phone: phone.into(), blocked })).await
    }

    /// The accounts this account blocked.
    pub async fn list_blocked(&self) -> Result<Vec<v1::BlockedAccount>, ClientError> {
        match self.request(client_frame::Body::ListBlocked(v1::ListBlocked {})).await? {
            server_frame::Body::BlockedList(list) => Ok(list.accounts),
            other => Err(ClientError::Protocol(format!("expected BlockedList, got {other:?}"))),
        }
    }

    /// Sets the account's two-step verification PIN (6 digits; `None`
    /// removes it).
    pub async fn set_pin(&self, pin: Option<&str>) -> Result<v1::PinStatus, ClientError> {
        self.pin_request(client_frame::Body::SetPin(v1::SetPin { pin: pin.unwrap_or_default().into() })).await
    }

    /// Whether the account has a two-step verification PIN.
    pub async fn pin_status(&self) -> Result<v1::PinStatus, ClientError> {
        self.pin_request(client_frame::Body::GetPinStatus(v1::GetPinStatus {})).await
    }

    async fn pin_request(&self, body: client_frame::Body) -> Result<v1::PinStatus, ClientError> {
        match self.request(body).await? {
            server_frame::Body::PinStatus(status) => Ok(status),
            other => Err(ClientError::Protocol(format!("expected PinStatus, got {other:?}"))),
        }
    }

    /// Everything the server keeps about the account (no messages), as JSON.
    pub async fn export_account(&self) -> Result<String, ClientError> {
        match self.request(client_frame::Body::ExportAccount(v1::ExportAccount {})).await? {
            server_frame::Body::AccountExport(export) => Ok(export.json),
            other => Err(ClientError::Protocol(format!("expected AccountExport, got {other:?}"))),
        }
    }

    /// Deletes the account for good; `phone` is its own number, typed as a
    /// confirmation. Every device is signed out, this one too: the session
    /// may end (closed as "device removed") before the answer arrives.
    pub async fn delete_account(&self, phone: &str) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::DeleteAccount(v1::DeleteAccount { phone: phone.into() })).await
    }

    /// Reports the 1:1 conversation with `phone` (or, with `group` not 0,
    /// that group) to the server's operator; `block` also blocks `phone`.
    pub async fn report(&self, phone: &str, group: u64, block: bool) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::Report(v1::Report { phone: phone.into(), group, block })).await
    }

    /// Names the contact `phone` on every device of the account (an empty
    /// name forgets it).
    pub async fn set_contact_name(&self, phone: &str, name: &str) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::SetContactName(v1::SetContactName {
            phone: phone.into(),
            name: name.into(),
        }))
        .await
    }

    /// The names this account gave its contacts.
    pub async fn contact_names(&self) -> Result<Vec<v1::ContactName>, ClientError> {
        match self.request(client_frame::Body::ListContactNames(v1::ListContactNames {})).await? {
            server_frame::Body::ContactNames(list) => Ok(list.contacts),
            other => Err(ClientError::Protocol(format!("expected ContactNames, got {other:?}"))),
        }
    }

    /// Sets this account's profile (name, about) and, unless
    /// `Unspecified`, who may see it.
    pub async fn set_profile(&self, name: &str, about: &str, visible_to: v1::Visibility) -> Result<(), ClientError> {
        let body = v1::SetProfile { name: name.into(), about: about.into(), visible_to: visible_to as i32 };
        self.expect_ok(client_frame::Body::SetProfile(body)).await
    }

    /// The profiles of these numbers, as this account may see them.
    pub async fn profiles(&self, phones: &[&str]) -> Result<Vec<v1::ProfileInfo>, ClientError> {
        let phones = phones.iter().map(|p| (*p).to_owned()).collect();
        match self.request(client_frame::Body::GetProfiles(v1::GetProfiles { phones })).await? {
            server_frame::Body::Profiles(list) => Ok(list.profiles),
            other => Err(ClientError::Protocol(format!("expected Profiles, got {other:?}"))),
        }
    }

    /// Registers (or with `None`, removes) this device's push target.
    pub async fn register_push(&self, target: Option<v1::register_push::Target>) -> Result<(), ClientError> {
        self.expect_ok(client_frame::Body::RegisterPush(v1::RegisterPush { target })).await
    }

    /// Publishes MLS key packages for this device (and, when given, its
    /// last-resort package); answers the stock after the upload.
    pub async fn upload_key_packages(
        &self,
        key_packages: Vec<bytes::Bytes>,
        last_resort: Option<bytes::Bytes>,
    ) -> Result<v1::KeyPackageStock, ClientError> {
        let body = client_frame::Body::UploadKeyPackages(v1::UploadKeyPackages {
            key_packages,
            last_resort: last_resort.unwrap_or_default(),
        });
        match self.request(body).await? {
            server_frame::Body::KeyPackageStock(stock) => Ok(stock),
            other => Err(ClientError::Protocol(format!("expected KeyPackageStock, got {other:?}"))),
        }
    }

    /// How many of this device's key packages are unclaimed.
    /// A token for the attachments' HTTP endpoints (`media::Transfer`).
    pub async fn media_token(&self) -> Result<v1::MediaToken, ClientError> {
        match self.request(client_frame::Body::GetMediaToken(v1::GetMediaToken {})).await? {
            server_frame::Body::MediaToken(token) => Ok(token),
            other => Err(ClientError::Protocol(format!("expected MediaToken, got {other:?}"))),
        }
    }

    pub async fn key_package_stock(&self) -> Result<v1::KeyPackageStock, ClientError> {
        match self.request(client_frame::Body::GetKeyPackageStock(v1::GetKeyPackageStock {})).await? {
            server_frame::Body::KeyPackageStock(stock) => Ok(stock),
            other => Err(ClientError::Protocol(format!("expected KeyPackageStock, got {other:?}"))),
        }
    }

    /// One key package of every active device of `phone`'s account (of
    /// this account's other devices, for this device's own number).
    pub async fn claim_key_packages(&self, phone: &str) -> Result<v1::ClaimedKeyPackages, ClientError> {
        let body =
            client_frame::Body::ClaimKeyPackages(v1::ClaimKeyPackages { phone: phone.to_owned(), phones: Vec::new() });
        match self.request(body).await? {
            server_frame::Body::ClaimedKeyPackages(claimed) => Ok(claimed),
            other => Err(ClientError::Protocol(format!("expected ClaimedKeyPackages, got {other:?}"))),
        }
    }

    /// As [`SessionHandle::claim_key_packages`] for up to
    /// [`MAX_CLAIM_NUMBERS`] numbers in one request (each once): one answer
    /// per number, in the order given. All or nothing.
    pub async fn claim_key_packages_of(&self, phones: &[String]) -> Result<Vec<v1::ClaimedKeyPackages>, ClientError> {
        let body = client_frame::Body::ClaimKeyPackages(v1::ClaimKeyPackages {
            phone: String::new(),
            phones: phones.to_vec(),
        });
        match self.request(body).await? {
            server_frame::Body::ClaimedKeyPackages(claimed) if claimed.accounts.len() == phones.len() => {
                Ok(claimed.accounts)
            }
            other => Err(ClientError::Protocol(format!("expected {} ClaimedKeyPackages, got {other:?}", phones.len()))),
        }
    }

    async fn expect_ok(&self, body: client_frame::Body) -> Result<(), ClientError> {
        match self.request(body).await? {
            server_frame::Body::Ok(_) => Ok(()),
            other => Err(ClientError::Protocol(format!("expected Ok, got {other:?}"))),
        }
    }

    /// Asks the session to close; returns at once.
    pub async fn close(&self) {
        let _ = self.commands.send(Command::Close).await;
    }
}

pub struct Session {
    pub info: SessionInfo,
    handle: SessionHandle,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("info", &self.info).finish_non_exhaustive()
    }
}

/// Turns a reply frame into the caller's result.
fn reply_result(body: Option<server_frame::Body>) -> Result<server_frame::Body, ClientError> {
    match body {
        Some(server_frame::Body::Error(e)) => Err(ClientError::Refused {
            code: ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }),
        Some(body) => Ok(body),
        None => Err(ClientError::Protocol("reply without a body".into())),
    }
}

/// Sends a request on a bare connection and waits for its reply, as during
/// the handshake, before the session task exists.
pub async fn call(conn: &mut FrameConn, id: u64, body: client_frame::Body) -> Result<server_frame::Body, ClientError> {
    conn.send(ClientFrame { id, body: Some(body) }).await?;
    loop {
        match conn.recv().await {
            Received::Frame(frame) if frame.id == id => return reply_result(frame.body),
            // A connection-level error (id 0) during a call, for example a
            // timeout; the close that follows carries the code.
            Received::Frame(_) => continue,
            Received::Closed { code, reason } => return Err(ClientError::Closed { code, reason }),
        }
    }
}

/// Negotiates the version and authenticates as `identity` on `conn`.
pub async fn handshake(conn: &mut FrameConn, identity: &Identity) -> Result<SessionInfo, ClientError> {
    let hello = v1::Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        client: concat!("skylark-client/", env!("CARGO_PKG_VERSION")).into(),
    };
    let challenge = match call(conn, 1, client_frame::Body::Hello(hello)).await? {
        server_frame::Body::Challenge(c) => c,
        other => return Err(ClientError::Protocol(format!("expected Challenge, got {other:?}"))),
    };
    let signature = identity.sign_challenge(&challenge.server_id, &challenge.nonce)?;
    let answer = v1::Authenticate { device_id: identity.device_id, nonce: challenge.nonce, signature };
    match call(conn, 2, client_frame::Body::Authenticate(answer)).await? {
        server_frame::Body::Authenticated(a) => Ok(SessionInfo {
            version: challenge.version,
            account_id: a.account_id,
            device_id: a.device_id,
            phone: a.phone,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            idle_timeout_ms: a.idle_timeout_ms,
            // A server older than the field: its default.
            max_payload_bytes: if a.max_payload_bytes == 0 { 64 * 1024 } else { a.max_payload_bytes },
        }),
        other => Err(ClientError::Protocol(format!("expected Authenticated, got {other:?}"))),
    }
}

/// A log event or the caught-up marker, if `frame` is one.
pub fn log_event(frame: &ServerFrame) -> Option<LogEvent<'_>> {
    match frame.body.as_ref()? {
        server_frame::Body::Event(event) => Some(LogEvent::Entry(event)),
        server_frame::Body::CaughtUp(c) => Some(LogEvent::CaughtUp(c.seq)),
        _ => None,
    }
}

/// What the server streams from the account's log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LogEvent<'a> {
    Entry(&'a v1::Event),
    CaughtUp(u64),
}

impl Session {
    /// Connects and authenticates. Server-initiated frames arrive on the
    /// returned receiver, which ends with [`Event::Closed`].
    pub async fn open(
        endpoint: &Endpoint,
        identity: &Identity,
    ) -> Result<(Session, mpsc::Receiver<Event>), ClientError> {
        Self::open_from(endpoint, identity, None).await
    }

    /// As [`Session::open`], from a chosen local address.
    pub async fn open_from(
        endpoint: &Endpoint,
        identity: &Identity,
        local: Option<std::net::IpAddr>,
    ) -> Result<(Session, mpsc::Receiver<Event>), ClientError> {
        let mut conn = FrameConn::connect_from(endpoint, local).await?;
        let info = handshake(&mut conn, identity).await?;
        let (commands_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let heartbeat = Duration::from_millis(info.heartbeat_interval_ms.max(1_000));
        let ended = Arc::new(OnceLock::new());
        let task = tokio::spawn(run(conn, commands, events_tx, heartbeat, ended.clone()));
        let handle = SessionHandle { commands: commands_tx, ended, max_payload_bytes: info.max_payload_bytes };
        Ok((Session { info, handle, task }, events))
    }

    pub fn handle(&self) -> SessionHandle {
        self.handle.clone()
    }

    pub async fn who_am_i(&self) -> Result<v1::WhoAmI, ClientError> {
        self.handle.who_am_i().await
    }

    /// Closes the connection and waits for the session task to end.
    pub async fn close(self) {
        self.handle.close().await;
        let _ = self.task.await;
    }
}

async fn run(
    mut conn: FrameConn,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    heartbeat: Duration,
    ended: Arc<OnceLock<(Option<CloseCode>, String)>>,
) {
    // Handshake used ids 1 and 2.
    let mut next_id: u64 = 3;
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let (code, reason) = loop {
        tokio::select! {
            command = commands.recv() => match command {
                None | Some(Command::Close) => {
                    conn.close().await;
                    break (Some(CloseCode::Normal), "closed by client".to_owned());
                }
                Some(Command::Notify { body }) => {
                    if let Err(e) = conn.send(ClientFrame { id: 0, body: Some(body) }).await {
                        tracing::debug!(error = %e, "notification not sent");
                    }
                }
                Some(Command::Request { body, reply }) => {
                    let id = next_id;
                    next_id += 1;
                    match conn.send(ClientFrame { id, body: Some(body) }).await {
                        Ok(()) => {
                            pending.insert(id, reply);
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            },
            _ = ping.tick() => {
                let id = next_id;
                next_id += 1;
                // The Pong needs no waiter: its only job is to keep the
                // connection from looking idle. Replies for unknown ids are dropped.
                let _ = conn.send(ClientFrame { id, body: Some(client_frame::Body::Ping(v1::Ping {})) }).await;
            }
            received = conn.recv() => match received {
                Received::Frame(frame) if frame.id != 0 => {
                    if let Some(reply) = pending.remove(&frame.id) {
                        let _ = reply.send(reply_result(frame.body));
                    }
                }
                Received::Frame(frame) => {
                    // The Close frame is followed by the end of the stream,
                    // which reports its code; nothing to pass on here.
                    if !matches!(frame.body, Some(server_frame::Body::Close(_))) {
                        let _ = events.send(Event::Frame(frame)).await;
                    }
                }
                Received::Closed { code, reason } => break (code, reason),
            },
        }
    };
    // Before `commands` is dropped: a request still queued there learns this.
    let _ = ended.set((code, reason.clone()));
    for (_, reply) in pending.drain() {
        let _ = reply.send(Err(ClientError::Closed { code, reason: reason.clone() }));
    }
    let _ = events.send(Event::Closed { code, reason }).await;
}
