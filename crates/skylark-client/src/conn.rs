//! One raw connection to a server: frames in, frames out, nothing else.
//!
//! [`FrameConn`] speaks every transport of protocol v1 — TCP with
//! length-prefixed frames, WebSocket with binary protobuf, WebSocket with
//! proto3 JSON — behind one interface. It has no handshake or retry logic;
//! [`crate::session`] builds that on top. Tests use it directly to send the
//! server frames a well-behaved client never would.

use crate::ClientError;
use crate::tls::TlsClient;
use bytes::{BufMut, BytesMut};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use skylark_protocol::codec::{FrameCodec, FrameError};
use skylark_protocol::v1::server_frame::Body;
use skylark_protocol::{ClientFrame, CloseCode, ServerFrame, WS_SUBPROTOCOL_JSON, WS_SUBPROTOCOL_PROTO, json};
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::codec::Framed;

/// Largest frame the client accepts from a server.
pub const CLIENT_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// Where and how to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Raw TCP, `host:port`.
    Tcp(String),
    /// WebSocket URL such as `ws://127.0.0.1:7480/v1/ws`; `json` selects the
    /// JSON mapping instead of binary protobuf.
    WebSocket { url: String, json: bool },
    /// The inner endpoint inside TLS, trusting what `TlsClient` trusts:
    /// TCP with TLS, or a `wss://` WebSocket with a chosen CA. (A plain
    /// `WebSocket` with a `wss://` URL trusts the web PKI roots.)
    Tls(Box<Endpoint>, TlsClient),
    /// Several servers (the nodes of a cluster, docs/CLUSTER.md): each
    /// connect tries them in turn from a random one, and fails only when
    /// none answers, so the client's back-off applies between full rounds.
    /// (A host name with several addresses is tried address by address by
    /// any endpoint.)
    Any(Vec<Endpoint>),
}

impl Endpoint {
    /// The WebSocket endpoint of a server whose HTTP API is at `http_base`
    /// (`http://host:port`).
    pub fn websocket_for(http_base: &str, json: bool) -> Endpoint {
        let base = http_base.trim_end_matches('/');
        let url = if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}/v1/ws")
        } else {
            format!("ws://{}/v1/ws", base.strip_prefix("http://").unwrap_or(base))
        };
        Endpoint::WebSocket { url, json }
    }
}

#[cfg(test)]
mod display_tests {
    use super::Endpoint;

    #[test]
    fn endpoints_read_as_addresses() {
        let ws = Endpoint::websocket_for("http://127.0.0.1:7480", false);
        assert_eq!(ws.to_string(), "ws://127.0.0.1:7480/v1/ws");
        assert_eq!(Endpoint::Tcp("127.0.0.1:7481".into()).to_string(), "tcp://127.0.0.1:7481");
        let tls = crate::tls::TlsClient::new(None).expect("web PKI roots");
        let over_tls = Endpoint::Tls(Box::new(Endpoint::Tcp("example.org:7481".into())), tls.clone());
        assert_eq!(over_tls.to_string(), "tls://example.org:7481");
        let wss = Endpoint::Tls(Box::new(Endpoint::websocket_for("https://example.org", true)), tls);
        assert_eq!(wss.to_string(), "wss://example.org/v1/ws");
        let any = Endpoint::Any(vec![Endpoint::Tcp("a:1".into()), Endpoint::Tcp("b:2".into())]);
        assert_eq!(any.to_string(), "tcp://a:1 or tcp://b:2");
    }
}

/// The address as a person reads it: `ws://host:port/v1/ws`,
/// `tcp://host:port`, `tls://host:port` (TCP inside TLS), or a list.
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "tcp://{addr}"),
            Endpoint::WebSocket { url, .. } => f.write_str(url),
            Endpoint::Tls(inner, _) => match inner.as_ref() {
                Endpoint::Tcp(addr) => write!(f, "tls://{addr}"),
                other => write!(f, "{other}"),
            },
            Endpoint::Any(list) => {
                for (i, endpoint) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    write!(f, "{endpoint}")?;
                }
                Ok(())
            }
        }
    }
}

/// What the server sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    Frame(ServerFrame),
    /// The connection ended. `code` comes from the server's Close frame or
    /// WebSocket close status, if there was one.
    Closed {
        code: Option<CloseCode>,
        reason: String,
    },
}

/// A byte stream, plain or in TLS.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
type Boxed = Box<dyn Stream>;

type Ws = WebSocketStream<Boxed>;

enum Inner {
    Tcp(Framed<Boxed, FrameCodec<ServerFrame, ClientFrame>>),
    Ws { ws: Ws, json: bool },
}

pub struct FrameConn {
    inner: Inner,
    /// A Close frame seen before the transport ended, so the code survives.
    pending_close: Option<(CloseCode, String)>,
}

impl std::fmt::Debug for FrameConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameConn").finish_non_exhaustive()
    }
}

fn io<E: std::fmt::Display>(e: E) -> ClientError {
    ClientError::Io(e.to_string())
}

fn tcp_framed(stream: Boxed) -> Inner {
    Inner::Tcp(Framed::new(stream, FrameCodec::new(CLIENT_MAX_FRAME_BYTES)))
}

/// A WebSocket session at `url`; `wss://` URLs go through TLS with `tls`
/// (or the web PKI roots).
async fn websocket(
    url: &str,
    json: bool,
    tls: Option<&TlsClient>,
    local: Option<IpAddr>,
) -> Result<Inner, ClientError> {
    let mut request = url.into_client_request().map_err(io)?;
    let protocol = if json { WS_SUBPROTOCOL_JSON } else { WS_SUBPROTOCOL_PROTO };
    request.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    let config = WebSocketConfig::default()
        .max_message_size(Some(CLIENT_MAX_FRAME_BYTES))
        .max_frame_size(Some(CLIENT_MAX_FRAME_BYTES));
    let secure = request.uri().scheme_str() == Some("wss");
    let host = request.uri().host().unwrap_or("localhost").to_owned();
    let port = request.uri().port_u16().unwrap_or(if secure { 443 } else { 80 });
    let plain = tcp(&format!("{host}:{port}"), local).await?;
    let stream: Boxed = if secure {
        let tls = tls.cloned().unwrap_or_else(TlsClient::web_pki);
        Box::new(tls.connect(&host, plain).await?)
    } else {
        Box::new(plain)
    };
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await.map_err(io)?;
    Ok(Inner::Ws { ws, json })
}

/// A TCP connection to `addr` (`host:port`), from `local` if given.
async fn tcp(addr: &str, local: Option<IpAddr>) -> Result<TcpStream, ClientError> {
    let stream = match local {
        None => TcpStream::connect(addr).await.map_err(io)?,
        Some(ip) => {
            let remote = tokio::net::lookup_host(addr).await.map_err(io)?.next().ok_or_else(|| io("no address"))?;
            let socket = if remote.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(io)?;
            socket.bind(SocketAddr::new(ip, 0)).map_err(io)?;
            socket.connect(remote).await.map_err(io)?
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

impl FrameConn {
    pub async fn connect(endpoint: &Endpoint) -> Result<FrameConn, ClientError> {
        Self::connect_from(endpoint, None).await
    }

    /// Connects from a chosen local address (for example 127.0.0.2, to look
    /// like a second network), or from any when `local` is `None`.
    pub async fn connect_from(endpoint: &Endpoint, local: Option<IpAddr>) -> Result<FrameConn, ClientError> {
        let inner = match endpoint {
            Endpoint::Any(endpoints) => return Box::pin(Self::connect_any(endpoints, local)).await,
            Endpoint::Tcp(addr) => tcp_framed(Box::new(tcp(addr, local).await?)),
            Endpoint::WebSocket { url, json } => websocket(url, *json, None, local).await?,
            Endpoint::Tls(inner, tls) => match inner.as_ref() {
                Endpoint::Tcp(addr) => {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                    let stream = tls.connect(host, tcp(addr, local).await?).await?;
                    tcp_framed(Box::new(stream))
                }
                Endpoint::WebSocket { url, json } => websocket(url, *json, Some(tls), local).await?,
                Endpoint::Tls(..) | Endpoint::Any(_) => return Err(io("TLS around that is not an endpoint")),
            },
        };
        Ok(FrameConn { inner, pending_close: None })
    }

    /// The first of `endpoints` that answers, starting at a random one.
    async fn connect_any(endpoints: &[Endpoint], local: Option<IpAddr>) -> Result<FrameConn, ClientError> {
        let start = if endpoints.is_empty() { 0 } else { rand::random_range(0..endpoints.len()) };
        let mut last = io("no server address given");
        for endpoint in endpoints.iter().cycle().skip(start).take(endpoints.len()) {
            match Self::connect_from(endpoint, local).await {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    tracing::debug!(?endpoint, error = %e, "server did not answer; trying the next");
                    last = e;
                }
            }
        }
        Err(last)
    }

    pub async fn send(&mut self, frame: ClientFrame) -> Result<(), ClientError> {
        match &mut self.inner {
            Inner::Tcp(framed) => framed.send(frame).await.map_err(io),
            Inner::Ws { ws, json: false } => ws.send(Message::Binary(frame.encode_to_vec().into())).await.map_err(io),
            Inner::Ws { ws, json: true } => {
                ws.send(Message::Text(json::encode_client(&frame).into())).await.map_err(io)
            }
        }
    }

    /// Sends bytes exactly as given: on TCP straight onto the stream (so a
    /// test can write a bogus length prefix), on WebSocket as one binary
    /// message, or as one text message when `text` is set.
    pub async fn send_raw(&mut self, bytes: &[u8], text: bool) -> Result<(), ClientError> {
        match &mut self.inner {
            Inner::Tcp(framed) => {
                framed.get_mut().write_all(bytes).await.map_err(io)?;
                framed.get_mut().flush().await.map_err(io)
            }
            Inner::Ws { ws, .. } => {
                let message = if text {
                    Message::Text(String::from_utf8_lossy(bytes).into_owned().into())
                } else {
                    Message::Binary(bytes.to_vec().into())
                };
                ws.send(message).await.map_err(io)
            }
        }
    }

    /// Wraps `body` in a length prefix (for TCP raw sends).
    pub fn length_prefixed(body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::with_capacity(4 + body.len());
        out.put_u32(body.len() as u32);
        out.put_slice(body);
        out.to_vec()
    }

    /// The next frame, or how the connection ended. Cancel-safe.
    pub async fn recv(&mut self) -> Received {
        loop {
            let frame = match &mut self.inner {
                Inner::Tcp(framed) => match framed.next().await {
                    Some(Ok(frame)) => frame,
                    Some(Err(FrameError::Io(e))) => return self.closed(e.to_string()),
                    // A TLS record where a frame's length should be: the
                    // port speaks TLS (0x15/0x16 alert/handshake, version 3.x).
                    Some(Err(FrameError::TooLarge { len, .. }))
                        if (len >> 24 == 0x15 || len >> 24 == 0x16) && (len >> 16) & 0xff == 3 =>
                    {
                        return self.closed(
                            "the server speaks TLS on this port: connect with TLS (the CLI's --tls, with --ca FILE for \
                             a certificate of your own)"
                                .into(),
                        );
                    }
                    Some(Err(e)) => return self.closed(format!("bad frame from server: {e}")),
                    None => return self.closed("connection closed".into()),
                },
                Inner::Ws { ws, json } => match ws.next().await {
                    None => return self.closed("connection closed".into()),
                    Some(Err(e)) => return self.closed(e.to_string()),
                    Some(Ok(Message::Binary(bytes))) if !*json => match ServerFrame::decode(bytes) {
                        Ok(frame) => frame,
                        Err(e) => return self.closed(format!("bad frame from server: {e}")),
                    },
                    Some(Ok(Message::Text(text))) if *json => match json::decode_server(text.as_str()) {
                        Ok(frame) => frame,
                        Err(e) => return self.closed(format!("bad frame from server: {e}")),
                    },
                    Some(Ok(Message::Close(close))) => {
                        if self.pending_close.is_none()
                            && let Some(c) = close
                        {
                            let code = CloseCode::from_ws_status(u16::from(c.code));
                            return Received::Closed { code, reason: c.reason.to_string() };
                        }
                        return self.closed("connection closed".into());
                    }
                    Some(Ok(_)) => continue,
                },
            };
            if let Some(Body::Close(close)) = &frame.body {
                let code = CloseCode::try_from(close.code).unwrap_or(CloseCode::Unspecified);
                self.pending_close = Some((code, close.reason.clone()));
            }
            return Received::Frame(frame);
        }
    }

    fn closed(&mut self, fallback: String) -> Received {
        match self.pending_close.take() {
            Some((code, reason)) => Received::Closed { code: Some(code), reason },
            None => Received::Closed { code: None, reason: fallback },
        }
    }

    /// Closes politely (WebSocket close handshake or TCP shutdown).
    pub async fn close(&mut self) {
        match &mut self.inner {
            Inner::Tcp(framed) => {
                let _ = framed.get_mut().shutdown().await;
            }
            Inner::Ws { ws, .. } => {
                let frame = tungstenite::protocol::CloseFrame {
                    code: tungstenite::protocol::frame::coding::CloseCode::Normal,
                    reason: "bye".into(),
                };
                let _ = ws.close(Some(frame)).await;
            }
        }
    }
}
