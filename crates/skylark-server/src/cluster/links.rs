//! Device links across nodes. A pending link lives in the memory of the
//! node the new device asked; its id ends with that node's name, so a wait
//! goes straight there, and an approval on another node is offered to
//! every node on one subject, where only the holder of the code answers
//! (the code is taken out under the holder's lock, so it stays single-use).

use super::{Cluster, LINK_APPROVE_SUBJECT, LINK_APPROVE_WAIT, links_subject};
use crate::devices::{DeviceError, Devices, LinkPeers, LinkState};
use skylark_core::{AccountId, Device};
use skylark_store::StoreError;
use std::sync::Weak;
use std::time::Duration;

#[derive(serde::Serialize, serde::Deserialize)]
enum Request {
    Approve { account: AccountId, code: String },
    Wait { link_id: String, wait_ms: u64 },
}

#[derive(serde::Serialize, serde::Deserialize)]
enum Reply {
    Device(Device),
    State(LinkState),
    Error(Refusal),
}

/// A [`DeviceError`] as it crosses the bus.
#[derive(serde::Serialize, serde::Deserialize)]
enum Refusal {
    UnknownCode,
    Expired,
    UnknownLink,
    LimitReached(usize),
    UnknownDevice,
    Other(String),
}

impl From<DeviceError> for Refusal {
    fn from(e: DeviceError) -> Self {
        match e {
            DeviceError::UnknownCode => Refusal::UnknownCode,
            DeviceError::Expired => Refusal::Expired,
            DeviceError::UnknownLink => Refusal::UnknownLink,
            DeviceError::LimitReached(n) => Refusal::LimitReached(n),
            DeviceError::UnknownDevice => Refusal::UnknownDevice,
            other => Refusal::Other(other.to_string()),
        }
    }
}

impl From<Refusal> for DeviceError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::UnknownCode => DeviceError::UnknownCode,
            Refusal::Expired => DeviceError::Expired,
            Refusal::UnknownLink => DeviceError::UnknownLink,
            Refusal::LimitReached(n) => DeviceError::LimitReached(n),
            Refusal::UnknownDevice => DeviceError::UnknownDevice,
            Refusal::Other(text) => DeviceError::Store(StoreError::Unusable(text)),
        }
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Answers another node's request, or `None` when this node has no say
/// (an approval of a code it does not hold).
pub(super) async fn serve(devices: &Devices, payload: &[u8]) -> Option<Vec<u8>> {
    let request: Request = serde_json::from_slice(payload).ok()?;
    let reply = match request {
        Request::Approve { account, code } => match devices.approve_here(account, &code).await {
            Err(DeviceError::UnknownCode) => return None,
            Ok(device) => Reply::Device(device),
            Err(e) => Reply::Error(e.into()),
        },
        Request::Wait { link_id, wait_ms } => match devices.wait_link(&link_id, Duration::from_millis(wait_ms)).await {
            Ok(state) => Reply::State(state),
            Err(e) => Reply::Error(e.into()),
        },
    };
    Some(encode(&reply))
}

/// This node's way to the others' links.
pub(super) struct Peers {
    pub cluster: Weak<Cluster>,
    pub node: String,
}

impl Peers {
    async fn ask(&self, subject: String, request: &Request, timeout: Duration) -> Option<Reply> {
        let cluster = self.cluster.upgrade()?;
        let request = async_nats::Request::new().payload(encode(request).into()).timeout(Some(timeout));
        let message = cluster.nats.send_request(subject, request).await.ok()?;
        serde_json::from_slice(&message.payload).ok()
    }
}

#[async_trait::async_trait]
impl LinkPeers for Peers {
    fn node(&self) -> &str {
        &self.node
    }

    async fn approve(&self, account: AccountId, code: &str) -> Option<Result<Device, DeviceError>> {
        let request = Request::Approve { account, code: code.to_owned() };
        match self.ask(LINK_APPROVE_SUBJECT.to_owned(), &request, LINK_APPROVE_WAIT).await? {
            Reply::Device(device) => Some(Ok(device)),
            Reply::Error(refusal) => Some(Err(refusal.into())),
            Reply::State(_) => None,
        }
    }

    async fn wait(&self, node: &str, link_id: &str, wait: Duration) -> Result<LinkState, DeviceError> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let request = Request::Wait { link_id: link_id.to_owned(), wait_ms };
        // The node that made the link is gone (or never was): so is the link.
        match self.ask(links_subject(node), &request, wait + LINK_APPROVE_WAIT).await {
            Some(Reply::State(state)) => Ok(state),
            Some(Reply::Error(refusal)) => Err(refusal.into()),
            _ => Err(DeviceError::UnknownLink),
        }
    }
}
