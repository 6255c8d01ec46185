//! Starting servers and registering devices for tests.

use async_trait::async_trait;
use skylark_client::api::Api;
use skylark_client::conn::{FrameConn, Received};
use skylark_client::identity::generate_key;
use skylark_client::{Endpoint, Identity};
use skylark_core::{Clock, ManualClock, PhoneNumber, SystemClock};
use skylark_gateway::Gateway;
use skylark_gateway::Settings as Config;
use skylark_protocol::CloseCode;
use skylark_server::Server;
use skylark_server::sms::{SmsError, SmsSender};
use skylark_store::{RedbStore, Store};
use std::sync::{Arc, Mutex};

/// Records every code "sent", so tests can read them like a phone would.
/// While `down` is set it fails like an unreachable gateway.
#[derive(Default)]
pub struct CapturedSms {
    pub sent: Mutex<Vec<(String, String)>>,
    pub down: std::sync::atomic::AtomicBool,
    pub attempts: std::sync::atomic::AtomicUsize,
}

impl CapturedSms {
    /// The newest code sent to `phone`.
    pub fn last_code(&self, phone: &str) -> String {
        let normal = PhoneNumber::parse(phone).expect("valid test number").to_string();
        self.sent
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(to, _)| *to == normal)
            .map(|(_, code)| code.clone())
            .unwrap_or_else(|| panic!("no code was sent to {phone}"))
    }

    pub fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

#[async_trait]
impl SmsSender for CapturedSms {
    async fn send(&self, to: &PhoneNumber, _text: &str, code: &str) -> Result<(), SmsError> {
        use std::sync::atomic::Ordering;
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(SmsError::Transient("gateway unreachable".into()));
        }
        self.sent.lock().unwrap().push((to.to_string(), code.to_owned()));
        Ok(())
    }
}

/// The transports a test can run over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
    WsJson,
}

pub const ALL_TRANSPORTS: [Transport; 3] = [Transport::Tcp, Transport::Ws, Transport::WsJson];

pub struct TestServer {
    pub gateway: Option<Gateway>,
    pub server: Arc<Server>,
    pub sms: Arc<CapturedSms>,
    pub clock: ManualClock,
    pub store: Arc<dyn Store>,
    /// Attachments' directory, when the config named none (removed with the server).
    pub media_dir: Option<Arc<tempfile::TempDir>>,
}

/// The admin API's token in tests.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A config listening on ephemeral loopback ports with generous rate
/// limits, so only the tests about limits meet them.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.listen.http = "127.0.0.1:0".parse().unwrap();
    config.listen.tcp = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = "127.0.0.1:0".parse().unwrap();
    let loose = skylark_server::config::Quota { burst: 1_000, per_ms: 1 };
    config.rate_limits.sms_per_number = loose;
    config.rate_limits.sms_per_ip = loose;
    config.rate_limits.sms_per_prefix = loose;
    config.rate_limits.checks_per_number = loose;
    config.rate_limits.checks_per_ip = loose;
    config.rate_limits.key_claims_per_device = loose;
    config
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(test_config()).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        let store: Arc<dyn Store> = Arc::new(RedbStore::in_memory().unwrap());
        Self::start_on(config, store).await
    }

    /// Starts on an existing store (to restart a server over the same data).
    pub async fn start_on(config: Config, store: Arc<dyn Store>) -> TestServer {
        Self::start_audited(config, store, None).await
    }

    /// As [`TestServer::start_on`], with the admin API's audit log at `audit`.
    pub async fn start_audited(
        mut config: Config,
        store: Arc<dyn Store>,
        audit: Option<std::path::PathBuf>,
    ) -> TestServer {
        let mut media_dir = None;
        if config.media.dir.as_os_str().is_empty() {
            let dir = tempfile::tempdir().unwrap();
            config.media.dir = dir.path().to_owned();
            media_dir = Some(Arc::new(dir));
        }
        let sms = Arc::new(CapturedSms::default());
        let clock = ManualClock::new(SystemClock.now_ms());
        let (services, mut transport) = config.split();
        transport.admin = skylark_gateway::admin::AdminConfig { token: Some(ADMIN_TOKEN.to_owned()), audit_log: audit };
        let server = Server::new(services, store.clone(), sms.clone(), Arc::new(clock.clone())).await.unwrap();
        let gateway = Gateway::start(server.clone(), transport).await.unwrap();
        // As `skylark serve` does: forwards a restart left pending go on.
        server.resume_forwards().await.unwrap();
        TestServer { gateway: Some(gateway), server, sms, clock, store, media_dir }
    }

    fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("server is running")
    }

    pub fn http_base(&self) -> String {
        format!("http://{}", self.gateway().http_addr())
    }

    /// The admin listener (admin API and metrics).
    pub fn admin_base(&self) -> String {
        format!("http://{}", self.gateway().admin_addr())
    }

    pub fn api(&self) -> Api {
        Api::new(&self.http_base()).unwrap()
    }

    pub fn endpoint(&self, transport: Transport) -> Endpoint {
        match transport {
            Transport::Tcp => Endpoint::Tcp(self.gateway().tcp_addr().to_string()),
            Transport::Ws => Endpoint::websocket_for(&self.http_base(), false),
            Transport::WsJson => Endpoint::websocket_for(&self.http_base(), true),
        }
    }

    pub async fn raw(&self, transport: Transport) -> FrameConn {
        FrameConn::connect(&self.endpoint(transport)).await.unwrap()
    }

    /// Signs `phone` up through the HTTP API, as a new device.
    pub async fn register(&self, phone: &str) -> Identity {
        let api = self.api();
        let session = api.start_verification(phone).await.unwrap();
        let key = generate_key();
        let code = self.sms.last_code(phone);
        let registered = api.verify(&session.session_id, &code, &key.verifying_key().to_bytes(), "test").await.unwrap();
        Identity::new(self.http_base(), registered.account_id, registered.device_id, registered.phone, &key)
    }

    pub async fn shutdown(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.shutdown(std::time::Duration::from_secs(5)).await;
            self.server.shutdown().await;
        }
    }
}

/// Reads frames until the connection closes; returns the close code.
pub async fn close_code(conn: &mut FrameConn) -> Option<CloseCode> {
    loop {
        if let Received::Closed { code, .. } = conn.recv().await {
            return code;
        }
    }
}

/// How long a test waits for an expected event before failing.
pub const EVENT_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// One entry of an account's log, as a device received it.
#[derive(Debug, Clone, PartialEq)]
pub enum Log {
    Entry(skylark_protocol::v1::Event),
    CaughtUp(u64),
}

/// A connected device and its event stream.
pub struct Peer {
    pub identity: Identity,
    pub session: skylark_client::Session,
    pub events: tokio::sync::mpsc::Receiver<skylark_client::session::Event>,
}

impl Peer {
    pub async fn connect(server: &TestServer, identity: &Identity, transport: Transport) -> Peer {
        let (session, events) = skylark_client::Session::open(&server.endpoint(transport), identity).await.unwrap();
        Peer { identity: identity.clone(), session, events }
    }

    pub fn handle(&self) -> skylark_client::session::SessionHandle {
        self.session.handle()
    }

    /// The next log event; panics if none comes in time or the session ends.
    pub async fn next_log(&mut self) -> Log {
        use skylark_client::session::{Event, LogEvent, log_event};
        loop {
            let event = tokio::time::timeout(EVENT_WAIT, self.events.recv())
                .await
                .expect("timed out waiting for a log event")
                .expect("session ended");
            match event {
                Event::Frame(frame) => match log_event(&frame) {
                    Some(LogEvent::Entry(e)) => return Log::Entry(e.clone()),
                    Some(LogEvent::CaughtUp(seq)) => return Log::CaughtUp(seq),
                    None => continue,
                },
                Event::Closed { code, reason } => panic!("session closed ({code:?}): {reason}"),
            }
        }
    }

    /// The next log entry, skipping the caught-up marker.
    pub async fn next_entry(&mut self) -> skylark_protocol::v1::Event {
        loop {
            if let Log::Entry(e) = self.next_log().await {
                return e;
            }
        }
    }

    /// Collects `n` messages received from others, acknowledging each
    /// event (when `ack`) as it arrives.
    pub async fn received(&mut self, n: usize, ack: bool) -> Vec<skylark_protocol::v1::Message> {
        use skylark_protocol::v1::event::Body;
        let mut out = Vec::new();
        while out.len() < n {
            let event = self.next_entry().await;
            if ack {
                self.handle().ack(event.seq).await.unwrap();
            }
            if let Some(Body::Message(m)) = event.body
                && m.id.as_ref().unwrap().sender != self.identity.account_id
            {
                out.push(m);
            }
        }
        out
    }

    /// Waits for a receipt from `peer` of `kind` covering `seq`.
    pub async fn receipt(
        &mut self,
        kind: skylark_protocol::v1::ReceiptKind,
        seq: u64,
    ) -> skylark_protocol::v1::Receipt {
        use skylark_protocol::v1::event::Body;
        loop {
            let event = self.next_entry().await;
            self.handle().ack(event.seq).await.unwrap();
            if let Some(Body::Receipt(r)) = event.body
                && r.kind == kind as i32
                && r.up_to_seq >= seq
            {
                return r;
            }
        }
    }
}

/// What a crash leaves when it strikes after a send was acknowledged and
/// before its forward ran: the message, with `client_id` and `payload`, in
/// the sender's log and outbox (after `counters`), nothing of it at the
/// recipient. Written to the store directly, as the sender's actor would.
pub async fn leave_a_forward(
    store: &dyn Store,
    sender: &Identity,
    to: u64,
    client_id: &str,
    payload: &[u8],
) -> skylark_core::message::MessageId {
    use skylark_core::message::{Forward, LogEntry, Message, MessageId, OutboxItem};
    use skylark_core::{AccountId, DeviceId};
    use skylark_store::{AccountWrite, Counters};

    let account = AccountId(sender.account_id);
    let Counters { next_seq, next_outbox } = store.account_state(account).await.unwrap().counters;
    let id = MessageId { sender: account, seq: next_seq };
    let message = Arc::new(Message {
        id,
        to: AccountId(to),
        sender_device: DeviceId(sender.device_id),
        client_id: client_id.into(),
        sent_at_ms: SystemClock.now_ms(),
        payload: payload.to_vec().into(),
        meta: Default::default(),
    });
    let mut write = AccountWrite::new(account);
    write.appends.push((next_seq, Arc::new(LogEntry::Message(message.clone()))));
    write.outbox_puts.push((next_outbox, OutboxItem { to: message.to, forward: Forward::Message(message) }));
    write.client_ids.push((DeviceId(sender.device_id), client_id.into(), next_seq));
    write.counters = Some(Counters { next_seq: next_seq + 1, next_outbox: next_outbox + 1 });
    store.apply(write).await.unwrap();
    id
}
