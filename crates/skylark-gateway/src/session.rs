//! The connection session: one task per connection, the same for every
//! transport.
//!
//! ```text
//!  open ──Hello──▶ challenged ──Authenticate(ok)──▶ authenticated ──▶ requests…
//!    │                 │                                 │
//!    └─ timeout, bad frame, failed auth ─▶ closed ◀─ replaced, removed, idle, shutdown
//! ```
//!
//! Before authentication only Hello and Authenticate are accepted, and the
//! whole handshake must finish within `auth_timeout_ms`. Afterwards the
//! connection attaches to the server's session registry, which may close it
//! later ("replaced", "device removed"). Every frame received resets the idle
//! timer; a client that stays quiet past `idle_timeout_ms` is closed.

use crate::Shared;
use crate::requests::{Answer, Deferred, error, reply};
use crate::transport::{Inbound, Transport};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use skylark_core::DeviceId;
use skylark_core::auth::{AuthError, Challenge};
use skylark_protocol::v1::{self, client_frame, server_frame};
use skylark_protocol::{CloseCode, ErrorCode, MAX_VERSION, MIN_VERSION, ServerFrame};
use skylark_server::auth::{AuthFailure, Identity};
use skylark_server::messaging::{DeviceEvent, MessagingError};
use skylark_server::presence::Ephemeral;
use skylark_server::sessions::{Disconnect, SessionGuard};
use skylark_store::StoreError;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::{Instant, sleep_until};

/// Why a session ended, as sent to the peer.
struct Ending {
    code: CloseCode,
    reason: String,
}

impl Ending {
    fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
}

fn auth_error_code(e: AuthError) -> ErrorCode {
    match e {
        AuthError::UnknownDevice => ErrorCode::UnknownDevice,
        AuthError::DeviceRemoved => ErrorCode::DeviceRemoved,
        AuthError::ChallengeMismatch => ErrorCode::ChallengeMismatch,
        AuthError::ChallengeExpired => ErrorCode::ChallengeExpired,
        AuthError::BadSignature => ErrorCode::BadSignature,
        AuthError::Banned => ErrorCode::Banned,
    }
}

/// Answers a frame the transport could not decode, and says how to close.
async fn refuse_bad_input<T: Transport>(t: &mut T, inbound: &Inbound) -> Ending {
    match inbound {
        Inbound::TooLarge { len, max } => {
            let _ = t
                .send(error(0, ErrorCode::FrameTooLarge, format!("frame of {len} bytes exceeds the limit of {max}")))
                .await;
            Ending::new(CloseCode::TooLarge, "frame too large")
        }
        Inbound::Malformed(why) => {
            let _ = t.send(error(0, ErrorCode::MalformedFrame, why.clone())).await;
            Ending::new(CloseCode::ProtocolError, "malformed frame")
        }
        Inbound::Frame(_) | Inbound::Closed => Ending::new(CloseCode::ProtocolError, "protocol error"),
    }
}

/// Serves one connection to its end. Arguments are borrowed, and the
/// authenticated identity boxed, because an async function's arguments are
/// stored in its state (sometimes twice), which every idle connection pays.
pub(crate) async fn run<T: Transport>(shared: &Shared, transport: &mut T, kind: &'static str) {
    // By transport and TLS (every connection is TLS when TLS is configured).
    let kind = match (kind, shared.config.tls.cert_file.is_some()) {
        ("tcp", true) => "tcp+tls",
        ("ws", true) => "wss",
        ("ws-json", true) => "wss-json",
        (kind, _) => kind,
    };
    metrics::counter!("skylark_connections_total", "transport" => kind).increment(1);
    metrics::gauge!("skylark_connections_open", "transport" => kind).increment(1.0);
    let ending = match Box::pin(handshake(shared, transport)).await {
        Ok(Some(authed)) => serve(shared, transport, authed).await,
        Ok(None) => None,
        Err(ending) => Some(ending),
    };
    if let Some(ending) = ending {
        tracing::debug!(code = ?ending.code, reason = %ending.reason, "closing connection");
        transport.close(ending.code, &ending.reason).await;
    }
    metrics::gauge!("skylark_connections_open", "transport" => kind).decrement(1.0);
}

/// The span a connection's task runs in: everything logged for it carries
/// who it is (account, device and connection once authenticated). Debug
/// level, and tasks enter it only when it is enabled
/// ([`skylark_server::spawn_in`]): idle connections are counted in bytes
/// (docs/BENCHMARKS.md). Turn it on with `--log info,skylark_gateway=debug`.
pub(crate) fn connection_span(peer: SocketAddr, kind: &'static str) -> tracing::Span {
    tracing::debug_span!(
        "connection",
        %peer,
        transport = kind,
        account = tracing::field::Empty,
        device = tracing::field::Empty,
        connection = tracing::field::Empty,
    )
}

/// Runs the handshake. `Ok(None)` means the peer went away.
async fn handshake<T: Transport>(shared: &Shared, t: &mut T) -> Result<Option<Identity>, Ending> {
    let limits = shared.config.limits;
    let deadline = Instant::now() + Duration::from_millis(limits.auth_timeout_ms);
    let mut challenge: Option<Challenge> = None;
    loop {
        let inbound = tokio::select! {
            _ = shared.shutdown.cancelled() => return Err(Ending::new(CloseCode::GoingAway, "server shutting down")),
            _ = sleep_until(deadline) => {
                let _ = t.send(error(0, ErrorCode::Unauthenticated, "authentication timed out")).await;
                return Err(Ending::new(CloseCode::Unauthenticated, "authentication timed out"));
            }
            inbound = t.recv() => inbound,
        };
        let frame = match inbound {
            Inbound::Closed => return Ok(None),
            Inbound::Frame(frame) => frame,
            bad => return Err(refuse_bad_input(t, &bad).await),
        };
        let id = frame.id;
        if id == 0 {
            let _ = t.send(error(0, ErrorCode::MissingRequestId, "request id must be non-zero")).await;
            return Err(Ending::new(CloseCode::ProtocolError, "missing request id"));
        }
        match frame.body {
            Some(client_frame::Body::Hello(hello)) => {
                let low = hello.min_version.max(MIN_VERSION);
                let high = hello.max_version.min(MAX_VERSION);
                if low > high {
                    let message = format!("server speaks versions {MIN_VERSION}..={MAX_VERSION}");
                    let _ = t.send(error(id, ErrorCode::UnsupportedVersion, message)).await;
                    return Err(Ending::new(CloseCode::UnsupportedVersion, "no common protocol version"));
                }
                let ch = shared.server.auth.challenge();
                let body = server_frame::Body::Challenge(v1::Challenge {
                    version: high,
                    nonce: ch.nonce.to_vec(),
                    server_id: shared.server.auth.server_id().to_vec(),
                    expires_in_ms: ch.ttl_ms,
                });
                challenge = Some(ch);
                if t.send(reply(id, body)).await.is_err() {
                    return Ok(None);
                }
            }
            Some(client_frame::Body::Authenticate(answer)) => {
                let Some(ch) = challenge.as_ref() else {
                    let _ = t.send(error(id, ErrorCode::Unauthenticated, "send Hello first")).await;
                    return Err(Ending::new(CloseCode::ProtocolError, "authenticate before hello"));
                };
                let device = DeviceId(answer.device_id);
                let auth = &shared.server.auth;
                let transcript = skylark_protocol::auth_transcript(&auth.server_id(), &ch.nonce, device.0);
                return match auth.authenticate(ch, device, transcript, &answer.nonce, &answer.signature).await {
                    Ok(authed) => {
                        let body = server_frame::Body::Authenticated(v1::Authenticated {
                            account_id: authed.account.id.0,
                            phone: authed.account.phone.to_string(),
                            device_id: authed.device.id.0,
                            heartbeat_interval_ms: limits.heartbeat_interval_ms,
                            idle_timeout_ms: limits.idle_timeout_ms,
                            max_payload_bytes: shared.server.config.messaging.max_payload_bytes as u64,
                        });
                        if t.send(reply(id, body)).await.is_err() {
                            return Ok(None);
                        }
                        Ok(Some(authed.identity()))
                    }
                    Err(AuthFailure::Refused(e)) => {
                        let _ = t.send(error(id, auth_error_code(e), e.to_string())).await;
                        let code = if e == AuthError::DeviceRemoved {
                            CloseCode::DeviceRemoved
                        } else {
                            CloseCode::Unauthenticated
                        };
                        Err(Ending::new(code, e.to_string()))
                    }
                    Err(AuthFailure::Store(e)) => {
                        tracing::error!(error = %e, "store failed during authentication");
                        let words = "the server's storage is unavailable; reconnect shortly";
                        let _ = t.send(error(id, ErrorCode::Unavailable, words)).await;
                        Err(Ending::new(CloseCode::TryAgainLater, words))
                    }
                };
            }
            Some(_) => {
                let _ = t.send(error(id, ErrorCode::Unauthenticated, "authenticate first")).await;
                return Err(Ending::new(CloseCode::Unauthenticated, "request before authentication"));
            }
            None => {
                let _ = t.send(error(id, ErrorCode::UnknownRequest, "frame has no known body")).await;
                return Err(Ending::new(CloseCode::ProtocolError, "unknown request"));
            }
        }
    }
}

/// Requests of one connection being worked on at once, at most. When full,
/// the connection is not read until one finishes (back-pressure).
const MAX_IN_FLIGHT: usize = 64;

/// Serves an authenticated device until either side ends the session.
async fn serve<T: Transport>(shared: &Shared, t: &mut T, authed: Identity) -> Option<Ending> {
    let (guard, disconnect) = shared.server.sessions.attach(authed.device);
    // Shutdown ends the sessions attached before it (`Sessions::close_all`);
    // one attached after it ends here.
    if shared.shutdown.is_cancelled() {
        return Some(Ending::new(CloseCode::GoingAway, "server shutting down"));
    }
    let router = &shared.server.router;
    let (account, device, connection) = (authed.account, authed.device, guard.connection());
    // Not kept in a local: the session's future would hold it for its life.
    tracing::Span::current().record("account", account.0).record("device", device.0).record("connection", connection);
    // Attaching and detaching are boxed: each runs once per connection, and
    // held inline their futures (the largest of this one) would be paid for
    // the connection's whole life (docs/BENCHMARKS.md, idle memory).
    let events = match Box::pin(router.attach(account, device, connection)).await {
        Ok(events) => events,
        Err(e @ (MessagingError::Unavailable(_) | MessagingError::Restarted | MessagingError::NodeUnreachable)) => {
            // Storage trouble, or (cluster mode) the account's node is
            // unreachable or its actor moving: a matter of seconds.
            tracing::warn!(%account, error = %e, "could not attach the device to its actor");
            return Some(Ending::new(
                CloseCode::TryAgainLater,
                "your account is unavailable for a moment; reconnect shortly",
            ));
        }
        Err(e) => {
            tracing::warn!(%account, error = %e, "could not attach the device to its actor");
            return Some(Ending::new(CloseCode::InternalError, "messaging unavailable; reconnect"));
        }
    };
    shared.server.devices.touch(device);
    let ephemeral = shared.server.presence.connect(account, device, connection).await;
    let attached_ms = shared.server.clock.now_ms();
    let streams = Streams { guard: &guard, disconnect, events, ephemeral, attached_ms };
    let ending = serve_attached(shared, t, &authed, connection, streams).await;
    Box::pin(router.detach(account, device, connection)).await;
    shared.server.presence.disconnect(account, connection).await;
    shared.server.devices.touch(device);
    ending
}

/// What the server pushes to an authenticated connection.
struct Streams<'a> {
    /// The connection's session: told when the device is heard from, for
    /// the idle timeout (`Sessions::close_idle`).
    guard: &'a SessionGuard,
    /// Fires when the connection must close (replaced, removed, idle too
    /// long; closed without a reason at shutdown).
    disconnect: tokio::sync::oneshot::Receiver<Disconnect>,
    /// The account's log, from the actor.
    events: skylark_server::lane::Receiver<DeviceEvent>,
    /// Presence and typing, never stored.
    ephemeral: skylark_server::lane::Receiver<Ephemeral>,
    /// When the device attached (server clock): messages accepted since are
    /// timed to their delivery here.
    attached_ms: u64,
}

async fn serve_attached<T: Transport>(
    shared: &Shared,
    t: &mut T,
    authed: &Identity,
    connection: u64,
    streams: Streams<'_>,
) -> Option<Ending> {
    let Streams { guard, mut disconnect, mut events, mut ephemeral, attached_ms } = streams;
    // Created on the first deferred answer and dropped when the last one is
    // sent: an idle connection holds no set of futures.
    let mut in_flight: Option<FuturesUnordered<Deferred>> = None;
    loop {
        let step = tokio::select! {
            // Ending a replaced or removed session comes before anything else
            // it might still read or write, so it is never served after losing.
            biased;
            reason = &mut disconnect => {
                return Some(match reason {
                    Ok(reason) => disconnected(reason),
                    // The sessions were closed: the server is shutting down.
                    Err(_) => Ending::new(CloseCode::GoingAway, "server shutting down"),
                });
            }
            Some(reply) = next_answer(&mut in_flight) => {
                if in_flight.as_ref().is_some_and(FuturesUnordered::is_empty) {
                    in_flight = None;
                }
                Step::Reply(reply)
            }
            Some(event) = ephemeral.recv() => Step::Ephemeral(event),
            event = events.recv() => match event {
                // The actor let this connection go: a newer one of the device
                // attached (on any node of a cluster), or it was removed.
                Some(DeviceEvent::Closed(reason)) => return Some(disconnected(reason)),
                Some(event) => Step::Event(event),
                None => return Some(Ending::new(CloseCode::InternalError, "messaging restarted; reconnect")),
            },
            inbound = t.recv(), if in_flight.as_ref().map_or(0, FuturesUnordered::len) < MAX_IN_FLIGHT => {
                if matches!(inbound, Inbound::Frame(_)) {
                    guard.heard();
                }
                Step::Inbound(inbound)
            }
        };
        // Boxed: taking a step (answering a request, converting an event,
        // writing a frame) is the largest state of this loop, and held
        // inline it would be paid by every idle connection.
        match Box::pin(take_step(shared, t, authed, connection, attached_ms, step)).await {
            Ok(Some(deferred)) => in_flight.get_or_insert_with(FuturesUnordered::new).push(deferred),
            Ok(None) => {}
            Err(ending) => return ending,
        }
    }
}

fn disconnected(reason: Disconnect) -> Ending {
    match reason {
        Disconnect::Replaced => Ending::new(CloseCode::Replaced, "device connected elsewhere"),
        Disconnect::DeviceRemoved => Ending::new(CloseCode::DeviceRemoved, "device removed"),
        Disconnect::Operator => Ending::new(CloseCode::GoingAway, "disconnected by the server's operator"),
        Disconnect::IdleTimeout => Ending::new(CloseCode::IdleTimeout, "no heartbeat"),
    }
}

/// What woke an attached session.
enum Step {
    /// A deferred answer is ready.
    Reply(ServerFrame),
    Ephemeral(Ephemeral),
    Event(DeviceEvent),
    Inbound(Inbound),
}

/// Acts on one step. `Ok` carries an answer to wait for, if any; `Err`
/// ends the session (with a close to send, or none when the peer is gone).
async fn take_step<T: Transport>(
    shared: &Shared,
    t: &mut T,
    authed: &Identity,
    connection: u64,
    attached_ms: u64,
    step: Step,
) -> Result<Option<Deferred>, Option<Ending>> {
    // A message from someone else, accepted while this device was connected:
    // how long it took to reach it is timed once it is written.
    let mut delivered_from = None;
    let mut message: Option<(u64, u64)> = None;
    let frame = match step {
        Step::Reply(reply) => reply,
        // An event that cannot be named (the store failed looking up a
        // phone number) is not sent half-filled: the connection closes to
        // be retried, and the unacknowledged entry comes again.
        Step::Ephemeral(event) => match crate::convert::ephemeral_frame(&shared.server.router, event).await {
            Ok(frame) => frame,
            Err(e) => return Err(Some(storage_trouble(&e))),
        },
        Step::Event(event) => {
            let accepted = accepted_at(authed.account, &event);
            delivered_from = accepted.map(|(at, _)| at).filter(|&at| at >= attached_ms);
            message = accepted.map(|(_, id)| id);
            match crate::convert::event_frame(&shared.server.router, event).await {
                Ok(frame) => frame,
                Err(e) => return Err(Some(storage_trouble(&e))),
            }
        }
        Step::Inbound(Inbound::Frame(frame)) => {
            match crate::requests::answer(shared, authed, connection, frame).await {
                Answer::Now(reply) => reply,
                Answer::Later(deferred) => return Ok(Some(deferred)),
                Answer::None => return Ok(None),
            }
        }
        Step::Inbound(Inbound::Closed) => return Err(None),
        Step::Inbound(bad) => return Err(Some(refuse_bad_input(t, &bad).await)),
    };
    // A message from another account: one span per delivery to a device
    // (exported over OTLP when configured), named by the message's id as
    // its `message.send` span is.
    // (The id is formatted only when the span is enabled.)
    let span = match message {
        Some((sender, seq)) => tracing::debug_span!(
            "message.deliver",
            message = %format_args!("{sender}:{seq}"),
            account = authed.account.0,
            device = authed.device.0
        ),
        None => tracing::Span::none(),
    };
    match tracing::Instrument::instrument(t.send(frame), span).await {
        Ok(()) => {
            if let Some(at) = delivered_from {
                let ms = shared.server.clock.now_ms().saturating_sub(at);
                metrics::histogram!("skylark_delivery_seconds").record(ms as f64 / 1000.0);
            }
            Ok(None)
        }
        Err(()) => Err(None),
    }
}

/// When a message or group post by another account was accepted, and its
/// id (sender and sequence; a post's are the group's), if the event is one.
fn accepted_at(me: skylark_core::AccountId, event: &DeviceEvent) -> Option<(u64, (u64, u64))> {
    let DeviceEvent::Entry { entry, .. } = event else { return None };
    match entry.as_ref() {
        skylark_core::message::LogEntry::Message(m) if m.id.sender != me => {
            Some((m.sent_at_ms, (m.id.sender.0, m.id.seq)))
        }
        skylark_core::message::LogEntry::Group(e)
            if e.by != me && matches!(e.body, skylark_core::group::GroupBody::Message { .. }) =>
        {
            Some((e.at_ms, (e.group.0, e.seq)))
        }
        _ => None,
    }
}

/// The next deferred answer that is ready; `None` at once when there are none.
async fn next_answer(in_flight: &mut Option<FuturesUnordered<Deferred>>) -> Option<ServerFrame> {
    match in_flight {
        Some(set) => set.next().await,
        None => None,
    }
}

/// The close for a connection whose events cannot be built for now.
fn storage_trouble(e: &StoreError) -> Ending {
    tracing::error!(error = %e, "store failed while building an event; closing the connection to be retried");
    Ending::new(CloseCode::TryAgainLater, "the server's storage is unavailable; reconnect shortly")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Shared;
    use ed25519_dalek::{Signer, SigningKey};
    use skylark_core::{NewDevice, SystemClock};
    use skylark_protocol::ClientFrame;
    use skylark_server::Server;
    use skylark_server::sms::ConsoleSms;
    use skylark_store::{AccountStore, RedbStore};
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use tokio::time::Instant;

    /// A peer that authenticates, then vanishes without a FIN: nothing
    /// more ever arrives. Records the close and when the silence began.
    struct VanishingPeer {
        key: SigningKey,
        device: u64,
        inbox: VecDeque<ClientFrame>,
        authenticated: bool,
        silent_since: Arc<Mutex<Option<Instant>>>,
        closed: Arc<Mutex<Option<CloseCode>>>,
    }

    impl Transport for VanishingPeer {
        async fn recv(&mut self) -> Inbound {
            if let Some(frame) = self.inbox.pop_front() {
                return Inbound::Frame(frame);
            }
            if self.authenticated && self.silent_since.lock().unwrap().is_none() {
                // From here on, time is virtual: the idle timeout elapses
                // as soon as nothing else is runnable.
                tokio::time::pause();
                *self.silent_since.lock().unwrap() = Some(Instant::now());
            }
            std::future::pending().await
        }

        async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
            match frame.body {
                Some(server_frame::Body::Challenge(c)) => {
                    let transcript = skylark_protocol::auth_transcript(&c.server_id, &c.nonce, self.device);
                    let signature = self.key.sign(&transcript).to_bytes().to_vec();
                    let answer = v1::Authenticate { device_id: self.device, nonce: c.nonce, signature };
                    self.inbox.push_back(ClientFrame { id: 2, body: Some(client_frame::Body::Authenticate(answer)) });
                }
                Some(server_frame::Body::Authenticated(_)) => self.authenticated = true,
                _ => {}
            }
            Ok(())
        }

        async fn close(&mut self, code: CloseCode, _reason: &str) {
            *self.closed.lock().unwrap() = Some(code);
        }
    }

    #[tokio::test]
    async fn a_half_open_connection_is_closed_by_the_idle_timeout_and_goes_offline() {
        let store = Arc::new(RedbStore::in_memory().unwrap());
        let key = SigningKey::from_bytes(&[5; 32]);
        let phone = skylark_core::PhoneNumber::parse("+15551300001").unwrap();
        let reg = store
            .register(&phone, NewDevice { public_key: key.verifying_key().to_bytes(), name: "phone".into() }, 1)
            .await
            .unwrap();
        let server =
            Server::new(Default::default(), store.clone(), Arc::new(ConsoleSms), Arc::new(SystemClock)).await.unwrap();
        let config = crate::GatewayConfig::default();
        let idle = Duration::from_millis(config.limits.idle_timeout_ms);
        assert!(idle < Duration::from_secs(60), "the default detects a vanished peer in under a minute");
        let shared = Shared {
            slots: crate::slots::IpSlots::new(10),
            server: server.clone(),
            config: Arc::new(config),
            shutdown: tokio_util::sync::CancellationToken::new(),
            tracker: tokio_util::task::TaskTracker::new(),
            ready: Arc::default(),
        };
        let (silent_since, closed) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
        let hello = v1::Hello { min_version: 1, max_version: 1, client: "test".into() };
        let mut peer = VanishingPeer {
            key,
            device: reg.device.id.0,
            inbox: VecDeque::from([ClientFrame { id: 1, body: Some(client_frame::Body::Hello(hello)) }]),
            authenticated: false,
            silent_since: silent_since.clone(),
            closed: closed.clone(),
        };

        // The gateway's sweep, which ends silent sessions.
        let sweep = tokio::spawn(crate::idle_sweep(shared.clone()));
        run(&shared, &mut peer, "test").await;
        sweep.abort();

        assert_eq!(*closed.lock().unwrap(), Some(CloseCode::IdleTimeout));
        let waited = Instant::now() - silent_since.lock().unwrap().expect("authenticated first");
        assert!(waited >= idle && waited < idle + Duration::from_secs(1), "closed after {waited:?}, timeout {idle:?}");
        assert!(!server.presence.is_online(reg.account.id), "the account went offline");
        server.devices.flush_last_seen().await;
        let device = store.device(reg.device.id).await.unwrap().unwrap();
        assert!(device.last_seen_ms.is_some(), "last seen was recorded");
    }

    /// Fuzzes the handshake and the request loop behind it with real
    /// services (in-memory store): no input may panic the session or keep it
    /// running once its peer has nothing more to say.
    #[test]
    fn fuzz_session_handshake_and_requests() {
        let fuzzer = crate::fuzzing::SessionFuzzer::new();
        let seeds = fuzzer.seeds();
        // With SKYLARK_WRITE_CORPUS set: the cargo-fuzz target's starting corpus.
        if std::env::var_os("SKYLARK_WRITE_CORPUS").is_some() {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/session");
            std::fs::create_dir_all(&dir).unwrap();
            for (i, seed) in seeds.iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:03}")), seed).unwrap();
            }
        }
        let mut deep = 0u64;
        let report = skylark_fuzz::run("session", &seeds, |input| {
            let got_in = fuzzer.play(input);
            deep += u64::from(got_in);
            got_in
        });
        eprintln!("fuzz session: {deep} of {} inputs reached the request loop", report.executions);
        assert!(deep > 0, "no input got past the handshake");
    }
}
