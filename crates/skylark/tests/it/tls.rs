//! TLS on both listeners: the SDK and the CLI connect with a trusted CA,
//! are refused without it, and a client that never finishes its handshake
//! is dropped.

use crate::harness::{TestServer, test_config};
use skylark_client::api::Api;
use skylark_client::identity::generate_key;
use skylark_client::{Endpoint, Identity, Session, TlsClient};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncReadExt;

struct TlsServer {
    server: TestServer,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsServer {
    async fn start() -> TlsServer {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = skylark_gateway::tls::dev_certificate(dir.path()).unwrap();
        let mut config = test_config();
        config.tls.cert_file = Some(cert.clone());
        config.tls.key_file = Some(key);
        config.limits.auth_timeout_ms = 500;
        TlsServer { server: TestServer::start_with(config).await, ca: cert, _dir: dir }
    }

    fn https(&self) -> String {
        format!("https://{}", self.server.gateway.as_ref().unwrap().http_addr())
    }

    fn tcp(&self) -> String {
        self.server.gateway.as_ref().unwrap().tcp_addr().to_string()
    }

    fn trusted(&self) -> TlsClient {
        TlsClient::new(Some(&self.ca)).unwrap()
    }

    async fn register(&self, phone: &str) -> Identity {
        let api = Api::with_tls(&self.https(), &self.trusted()).unwrap();
        let session = api.start_verification(phone).await.unwrap();
        let key = generate_key();
        let code = self.server.sms.last_code(phone);
        let r = api.verify(&session.session_id, &code, &key.verifying_key().to_bytes(), "tls").await.unwrap();
        Identity::new(self.https(), r.account_id, r.device_id, r.phone, &key)
    }
}

#[tokio::test]
async fn the_sdk_talks_tls_on_every_transport_with_a_trusted_ca() {
    let s = TlsServer::start().await;
    let alice = s.register("+15554000001").await;
    let bob = s.register("+15554000002").await;
    let tcp = Endpoint::Tls(Box::new(Endpoint::Tcp(s.tcp())), s.trusted());
    let wss = Endpoint::Tls(Box::new(Endpoint::websocket_for(&s.https(), false)), s.trusted());
    let wss_json = Endpoint::Tls(Box::new(Endpoint::websocket_for(&s.https(), true)), s.trusted());
    let (a, _) = Session::open(&tcp, &alice).await.unwrap();
    let (b, mut b_events) = Session::open(&wss, &bob).await.unwrap();
    a.handle().send("+15554000002", "t1", b"over tls".to_vec()).await.unwrap();
    let got = loop {
        let event = tokio::time::timeout(crate::harness::EVENT_WAIT, b_events.recv()).await.unwrap().unwrap();
        if let skylark_client::session::Event::Frame(frame) = event
            && let Some(skylark_client::session::LogEvent::Entry(e)) = skylark_client::session::log_event(&frame)
            && let Some(skylark_protocol::v1::event::Body::Message(m)) = &e.body
        {
            break m.payload.clone();
        }
    };
    assert_eq!(got, b"over tls".as_slice());
    b.close().await;
    // The JSON mapping over wss, as browsers use it.
    let (b, _) = Session::open(&wss_json, &bob).await.unwrap();
    assert_eq!(b.handle().who_am_i().await.unwrap().phone, "+15554000002");
    // Counted by transport and TLS.
    let page = skylark_gateway::metrics_endpoint::render();
    for transport in ["tcp+tls", "wss", "wss-json"] {
        let line = format!("skylark_connections_total{{transport=\"{transport}\"}}");
        let counted = page.lines().find(|l| l.starts_with(&line)).unwrap_or_else(|| panic!("{line} missing"));
        assert!(!counted.ends_with(" 0"), "{counted}");
    }
}

#[tokio::test]
async fn without_the_ca_or_without_tls_nothing_connects() {
    let s = TlsServer::start().await;
    let alice = s.register("+15554100001").await;
    // The web PKI roots alone do not vouch for a self-signed certificate.
    for endpoint in [
        Endpoint::Tls(Box::new(Endpoint::Tcp(s.tcp())), TlsClient::web_pki()),
        Endpoint::websocket_for(&s.https(), false),
    ] {
        let err = Session::open(&endpoint, &alice).await.unwrap_err().to_string();
        assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    }
    let err = Api::new(&s.https()).unwrap().start_verification("+15554100002").await.unwrap_err().to_string();
    assert!(
        err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer") || err.contains("connect"),
        "{err}"
    );
    // Plain protocol on a TLS port gets nowhere.
    assert!(Session::open(&Endpoint::Tcp(s.tcp()), &alice).await.is_err());
}

#[tokio::test]
async fn a_client_that_never_finishes_the_handshake_is_dropped() {
    let s = TlsServer::start().await;
    for addr in [s.tcp(), s.server.gateway.as_ref().unwrap().http_addr().to_string()] {
        let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        // Sends nothing: the server gives up at the authentication deadline (500 ms here).
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await.expect("server kept it open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(started.elapsed() >= Duration::from_millis(400), "dropped too early: {:?}", started.elapsed());
    }
}
