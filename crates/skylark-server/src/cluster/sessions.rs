//! The operator's view of live sessions across nodes. A device's
//! connection lives on whichever node it reached, so "disconnect this
//! device" and "how many are connected" are asked of every node on one
//! subject; each answers for its own sessions, and the asker adds the
//! answers up (waiting at most `SESSIONS_WAIT` for the live nodes).

use super::{Cluster, SESSIONS_SUBJECT, SESSIONS_WAIT};
use crate::sessions::{Disconnect, Sessions};
use futures_util::StreamExt;
use skylark_core::DeviceId;
use std::sync::{Arc, Weak};

#[derive(serde::Serialize, serde::Deserialize)]
enum Request {
    /// End these devices' live sessions (the operator's doing).
    Disconnect(Vec<u64>),
    /// How many sessions are live here.
    Count,
}

/// How many sessions one node ended, or holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Reply(usize);

fn serve(sessions: &Sessions, payload: &[u8]) -> Option<Vec<u8>> {
    let n = match serde_json::from_slice(payload).ok()? {
        Request::Disconnect(devices) => {
            devices.into_iter().filter(|d| sessions.disconnect(DeviceId(*d), Disconnect::Operator)).count()
        }
        Request::Count => sessions.live_count(),
    };
    serde_json::to_vec(&Reply(n)).ok()
}

impl Cluster {
    /// Answers the other nodes' questions about this node's sessions.
    pub async fn carry_sessions(self: &Arc<Self>, sessions: &Arc<Sessions>) -> Result<(), super::ClusterError> {
        let subscription = self
            .nats
            .subscribe(SESSIONS_SUBJECT)
            .await
            .map_err(|e| super::ClusterError::Nats { urls: self.config.nats.join(", "), reason: e.to_string() })?;
        self.tracker.spawn(self.clone().sessions_loop(subscription, Arc::downgrade(sessions)));
        Ok(())
    }

    async fn sessions_loop(self: Arc<Self>, mut subscription: async_nats::Subscriber, sessions: Weak<Sessions>) {
        loop {
            let Some(message) = self.next_message(&mut subscription).await else { return };
            let (Some(sessions), Some(reply)) = (sessions.upgrade(), message.reply) else { continue };
            if let Some(answer) = serve(&sessions, &message.payload) {
                let _ = self.nats.publish(reply, answer.into()).await;
            }
        }
    }

    /// Asks every live node (this one too) and adds up their answers; the
    /// nodes that did not answer in time (gone, or cut off) are counted.
    async fn ask_every_node(&self, request: &Request) -> (usize, usize) {
        let expected = self.current().live.len().max(1);
        let Ok(payload) = serde_json::to_vec(request) else { return (0, expected) };
        let inbox = self.nats.new_inbox();
        let Ok(mut answers) = self.nats.subscribe(inbox.clone()).await else { return (0, expected) };
        if self.nats.publish_with_reply(SESSIONS_SUBJECT, inbox, payload.into()).await.is_err() {
            return (0, expected);
        }
        let (mut total, mut heard) = (0, 0);
        let deadline = tokio::time::Instant::now() + SESSIONS_WAIT;
        while heard < expected {
            match tokio::time::timeout_at(deadline, answers.next()).await {
                Ok(Some(message)) => {
                    if let Ok(Reply(n)) = serde_json::from_slice(&message.payload) {
                        total += n;
                        heard += 1;
                    }
                }
                _ => break,
            }
        }
        (total, expected - heard)
    }

    /// Ends the live sessions of `devices` on every node; returns how many
    /// ended, and how many nodes did not answer.
    pub async fn disconnect_everywhere(&self, devices: &[DeviceId]) -> (usize, usize) {
        self.ask_every_node(&Request::Disconnect(devices.iter().map(|d| d.0).collect())).await
    }

    /// Live sessions on every node; and how many nodes did not answer.
    pub async fn live_sessions(&self) -> (usize, usize) {
        self.ask_every_node(&Request::Count).await
    }
}
