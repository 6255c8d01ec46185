//! The session under a fuzzer: a scripted peer plays the fuzz input as the
//! frames a transport would read, against real services on an in-memory
//! store. Used by the session's own fuzz test (`skylark-fuzz`, in `cargo
//! test`) and by the coverage-guided cargo-fuzz target `session`
//! (`fuzz/fuzz_targets/session.rs`, with the `fuzzing` feature).
//!
//! The peer signs every `Authenticate` of the script that names its device
//! with the challenge it was given, so inputs get past the handshake into
//! the request loop.

use crate::Shared;
use crate::transport::{Inbound, Transport};
use ed25519_dalek::{Signer, SigningKey};
use prost::Message;
use skylark_core::{NewDevice, SystemClock};
use skylark_protocol::v1::{self, client_frame, server_frame};
use skylark_protocol::{ClientFrame, CloseCode, ServerFrame};
use skylark_server::Server;
use skylark_server::sms::ConsoleSms;
use skylark_store::{AccountStore, RedbStore};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// One server (in memory, one registered device) that plays inputs.
pub struct SessionFuzzer {
    rt: tokio::runtime::Runtime,
    shared: Shared,
    key: SigningKey,
    device: u64,
}

impl Default for SessionFuzzer {
    fn default() -> Self {
        Self::new()
    }
}

impl SessionFuzzer {
    pub fn new() -> SessionFuzzer {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        let key = SigningKey::from_bytes(&[6; 32]);
        let (shared, device) = rt.block_on(async {
            let store = Arc::new(RedbStore::in_memory().expect("an in-memory store"));
            let phone = skylark_core::PhoneNumber::parse("+15550000001").expect("a number");
            let new = NewDevice { public_key: key.verifying_key().to_bytes(), name: "fuzz".into() };
            let reg = store.register(&phone, new, 1).await.expect("registered");
            let server = Server::new(Default::default(), store, Arc::new(ConsoleSms), Arc::new(SystemClock))
                .await
                .expect("server");
            let shared = Shared {
                slots: crate::slots::IpSlots::new(10),
                server,
                config: Arc::default(),
                shutdown: tokio_util::sync::CancellationToken::new(),
                tracker: tokio_util::task::TaskTracker::new(),
                ready: Arc::default(),
            };
            (shared, reg.device.id.0)
        });
        SessionFuzzer { rt, shared, key, device }
    }

    /// Plays `input` (length-prefixed frames, as raw TCP carries them) to
    /// a session and returns whether it got past the handshake. Panics if
    /// the session outlives its peer (10 s after the script ends).
    pub fn play(&self, input: &[u8]) -> bool {
        let authenticated = Arc::new(AtomicBool::new(false));
        let mut peer = ScriptedPeer {
            key: self.key.clone(),
            device: self.device,
            script: script(input),
            challenge: None,
            authenticated: authenticated.clone(),
        };
        let ended = self.rt.block_on(async {
            let session = crate::session::run(&self.shared, &mut peer, "fuzz");
            tokio::time::timeout(Duration::from_secs(10), session).await
        });
        assert!(ended.is_ok(), "the session outlived its peer");
        authenticated.load(Ordering::Relaxed)
    }

    /// Starting inputs: Hello, Authenticate as the device, then each
    /// sample request; and every sample in a row.
    pub fn seeds(&self) -> Vec<Vec<u8>> {
        let frame = |f: &ClientFrame| {
            let body = f.encode_to_vec();
            let mut out = (body.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&body);
            out
        };
        let samples = skylark_protocol::samples::client_frames();
        let hello = frame(&samples[0]);
        let auth = frame(&ClientFrame {
            id: 2,
            body: Some(client_frame::Body::Authenticate(v1::Authenticate {
                device_id: self.device,
                ..Default::default()
            })),
        });
        let mut seeds: Vec<Vec<u8>> =
            samples.iter().map(|f| [hello.clone(), auth.clone(), frame(f)].concat()).collect();
        seeds.push(samples.iter().map(frame).collect::<Vec<_>>().concat());
        seeds
    }
}

struct ScriptedPeer {
    key: SigningKey,
    device: u64,
    script: VecDeque<Inbound>,
    challenge: Option<v1::Challenge>,
    /// Set once the server authenticated the peer.
    authenticated: Arc<AtomicBool>,
}

impl Transport for ScriptedPeer {
    async fn recv(&mut self) -> Inbound {
        let Some(mut next) = self.script.pop_front() else { return Inbound::Closed };
        if let (Inbound::Frame(frame), Some(c)) = (&mut next, &self.challenge)
            && let Some(client_frame::Body::Authenticate(a)) = &mut frame.body
            && a.device_id == self.device
        {
            let transcript = skylark_protocol::auth_transcript(&c.server_id, &c.nonce, self.device);
            a.signature = self.key.sign(&transcript).to_bytes().to_vec();
            a.nonce = c.nonce.clone();
        }
        next
    }

    async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
        match frame.body {
            Some(server_frame::Body::Challenge(c)) => self.challenge = Some(c),
            Some(server_frame::Body::Authenticated(_)) => self.authenticated.store(true, Ordering::Relaxed),
            _ => {}
        }
        Ok(())
    }

    async fn close(&mut self, _code: CloseCode, _reason: &str) {}
}

/// The fuzz input as what a transport would read: frames in order, then
/// the first undecodable or oversized one, then nothing.
fn script(input: &[u8]) -> VecDeque<Inbound> {
    use tokio_util::codec::Decoder;
    let mut codec: skylark_protocol::codec::FrameCodec<ClientFrame, ServerFrame> =
        skylark_protocol::codec::FrameCodec::new(4096);
    let mut buf = bytes::BytesMut::from(input);
    let mut out = VecDeque::new();
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => out.push_back(Inbound::Frame(frame)),
            Ok(None) => return out,
            Err(skylark_protocol::codec::FrameError::TooLarge { len, max }) => {
                out.push_back(Inbound::TooLarge { len, max });
                return out;
            }
            Err(e) => {
                out.push_back(Inbound::Malformed(e.to_string()));
                return out;
            }
        }
    }
}
