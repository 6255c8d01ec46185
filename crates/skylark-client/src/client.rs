//! A session that comes back by itself.
//!
//! [`Client`] keeps one authenticated session open for an identity. When the
//! connection drops, it reconnects after an exponential back-off with full
//! jitter (reset after each successful connect). It stops for good when the
//! server closes with a code that forbids reconnecting (replaced, device
//! removed, unauthenticated) or refuses authentication, and says why.

use crate::backoff::Backoff;
use crate::conn::Endpoint;
use crate::session::{Event, Session, SessionHandle, SessionInfo};
use crate::{ClientError, Identity};
use skylark_protocol::v1::{client_frame, server_frame};
use skylark_protocol::{CloseCode, ServerFrame};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Events of a client across reconnects. Small queue: the application is
/// expected to drain it; server frames back up into the socket otherwise.
const CLIENT_EVENT_QUEUE: usize = 1024;

#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Connected(SessionInfo),
    Frame(ServerFrame),
    /// The connection dropped (or a connect attempt failed); a reconnect follows.
    Disconnected {
        code: Option<CloseCode>,
        reason: String,
    },
    /// The client gave up and will not reconnect.
    Stopped(ClientError),
}

#[derive(Debug, Clone)]
enum State {
    Connecting,
    Connected(SessionHandle),
    Stopped(ClientError),
}

pub struct Client {
    state: watch::Receiver<State>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Starts connecting in the background.
    pub fn start(endpoint: Endpoint, identity: Identity, backoff: Backoff) -> (Client, mpsc::Receiver<ClientEvent>) {
        Self::start_from(endpoint, identity, backoff, None)
    }

    /// As [`Client::start`], connecting from the local address `local`
    /// (a load test spreads its clients over 127.0.0.x this way).
    pub fn start_from(
        endpoint: Endpoint,
        identity: Identity,
        backoff: Backoff,
        local: Option<std::net::IpAddr>,
    ) -> (Client, mpsc::Receiver<ClientEvent>) {
        let (state_tx, state) = watch::channel(State::Connecting);
        let (events_tx, events) = mpsc::channel(CLIENT_EVENT_QUEUE);
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(endpoint, identity, local, backoff, state_tx, events_tx, stop.clone()));
        (Client { state, stop, task }, events)
    }

    /// Waits for a live session, then sends `body` on it. A request that
    /// was on a connection when it dropped fails with `Closed`; the caller
    /// decides whether to resend.
    pub async fn request(&self, body: client_frame::Body) -> Result<server_frame::Body, ClientError> {
        let handle = self.connected().await?;
        handle.request(body).await
    }

    /// Waits until a session is live (or the client stopped).
    pub async fn connected(&self) -> Result<SessionHandle, ClientError> {
        let mut state = self.state.clone();
        let current = state
            .wait_for(|s| !matches!(s, State::Connecting))
            .await
            .map_err(|_| ClientError::Closed { code: None, reason: "client ended".into() })?
            .clone();
        match current {
            State::Connected(handle) => Ok(handle),
            State::Stopped(e) => Err(e),
            State::Connecting => Err(ClientError::Closed { code: None, reason: "client ended".into() }),
        }
    }

    /// Stops reconnecting and closes the session, without waiting (for a
    /// client shared between tasks).
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Closes the session and stops reconnecting.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn supervise(
    endpoint: Endpoint,
    identity: Identity,
    local: Option<std::net::IpAddr>,
    mut backoff: Backoff,
    state: watch::Sender<State>,
    events: mpsc::Sender<ClientEvent>,
    stop: CancellationToken,
) {
    loop {
        let opened = tokio::select! {
            _ = stop.cancelled() => return,
            opened = Session::open_from(&endpoint, &identity, local) => opened,
        };
        match opened {
            Ok((session, mut session_events)) => {
                backoff.reset();
                state.send_replace(State::Connected(session.handle()));
                let _ = events.send(ClientEvent::Connected(session.info.clone())).await;
                let (code, reason) = loop {
                    tokio::select! {
                        _ = stop.cancelled() => {
                            state.send_replace(State::Stopped(ClientError::Closed { code: Some(CloseCode::Normal), reason: "stopped".into() }));
                            session.close().await;
                            return;
                        }
                        event = session_events.recv() => match event {
                            Some(Event::Frame(frame)) => {
                                let _ = events.send(ClientEvent::Frame(frame)).await;
                            }
                            Some(Event::Closed { code, reason }) => break (code, reason),
                            None => break (None, "session ended".to_owned()),
                        },
                    }
                };
                state.send_replace(State::Connecting);
                let _ = events.send(ClientEvent::Disconnected { code, reason: reason.clone() }).await;
                if code.is_some_and(|c| !c.allows_reconnect()) {
                    let error = ClientError::Closed { code, reason };
                    state.send_replace(State::Stopped(error.clone()));
                    let _ = events.send(ClientEvent::Stopped(error)).await;
                    return;
                }
            }
            Err(error) if !error.is_retryable() => {
                state.send_replace(State::Stopped(error.clone()));
                let _ = events.send(ClientEvent::Stopped(error)).await;
                return;
            }
            Err(error) => {
                tracing::debug!(%error, "connect failed; backing off");
                let _ = events.send(ClientEvent::Disconnected { code: None, reason: error.to_string() }).await;
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
