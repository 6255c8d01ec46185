//! The WebSocket transport at `/v1/ws`: binary protobuf frames, or proto3
//! JSON in text frames when the client asks for the `skylark.v1.json`
//! subprotocol.
//!
//! The upgrade is done here (hyper's upgrade plus tokio-tungstenite) rather
//! than through axum's extractor, for two reasons: the per-connection
//! buffers are set exactly, and a closing connection can drain the raw
//! stream, which a WebSocket library that refused an oversized frame will
//! no longer read for us.

use crate::Shared;
use crate::transport::{Inbound, Transport, close_frame, linger};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use skylark_protocol::{ClientFrame, CloseCode, ServerFrame, WS_SUBPROTOCOL_JSON, WS_SUBPROTOCOL_PROTO, json};
use std::net::SocketAddr;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Proto,
    Json,
}

fn bad_upgrade(why: &'static str) -> Response {
    (StatusCode::BAD_REQUEST, why).into_response()
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The subprotocol to answer with, from the client's offer. JSON only when
/// asked for; binary protobuf otherwise (also when nothing was offered).
fn choose_subprotocol(headers: &HeaderMap) -> (Encoding, Option<&'static str>) {
    if header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, WS_SUBPROTOCOL_JSON) {
        (Encoding::Json, Some(WS_SUBPROTOCOL_JSON))
    } else if header_has_token(headers, header::SEC_WEBSOCKET_PROTOCOL, WS_SUBPROTOCOL_PROTO) {
        (Encoding::Proto, Some(WS_SUBPROTOCOL_PROTO))
    } else {
        (Encoding::Proto, None)
    }
}

pub(crate) async fn upgrade(
    State(shared): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    let headers = request.headers();
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return bad_upgrade("expected a WebSocket upgrade request");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return bad_upgrade("unsupported WebSocket version (13 is required)");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad_upgrade("missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let (encoding, protocol) = choose_subprotocol(headers);
    let Some(on_upgrade) = request.extensions_mut().remove::<OnUpgrade>() else {
        return bad_upgrade("connection cannot be upgraded");
    };
    let Some(slot) = shared.slots.acquire(peer.ip()) else {
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, "too many connections from this address").into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return response;
    };

    let limits = shared.config.limits;
    let config = WebSocketConfig::default()
        .read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(limits.max_frame_bytes))
        .max_frame_size(Some(limits.max_frame_bytes));
    let tracker = shared.tracker.clone();
    let kind = if encoding == Encoding::Json { "ws-json" } else { "ws" };
    skylark_server::spawn_in(&tracker, crate::session::connection_span(peer, kind), async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "websocket upgrade failed");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
        let mut transport = WsTransport { ws, encoding, max_frame_bytes: limits.max_frame_bytes };
        crate::session::run(&shared, &mut transport, kind).await;
        drop(slot);
    });

    let mut response = Response::new(axum::body::Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    response
}

struct WsTransport {
    ws: WebSocketStream<TokioIo<Upgraded>>,
    encoding: Encoding,
    max_frame_bytes: usize,
}

impl Transport for WsTransport {
    async fn recv(&mut self) -> Inbound {
        loop {
            let message = match self.ws.next().await {
                None => return Inbound::Closed,
                Some(Err(tungstenite::Error::Capacity(e))) => {
                    // Refused from the frame header, before the body was buffered.
                    let len = match e {
                        tungstenite::error::CapacityError::MessageTooLong { size, .. } => size,
                        _ => self.max_frame_bytes + 1,
                    };
                    return Inbound::TooLarge { len, max: self.max_frame_bytes };
                }
                Some(Err(tungstenite::Error::Protocol(e))) => return Inbound::Malformed(e.to_string()),
                Some(Err(_)) => return Inbound::Closed,
                Some(Ok(m)) => m,
            };
            return match (self.encoding, message) {
                (Encoding::Proto, Message::Binary(bytes)) => match ClientFrame::decode(bytes) {
                    Ok(frame) => Inbound::Frame(frame),
                    Err(e) => Inbound::Malformed(e.to_string()),
                },
                (Encoding::Json, Message::Text(text)) => match json::decode_client(text.as_str()) {
                    Ok(frame) => Inbound::Frame(frame),
                    Err(e) => Inbound::Malformed(e.to_string()),
                },
                (Encoding::Proto, Message::Text(_)) => {
                    Inbound::Malformed(format!("text frame on a binary connection (ask for {WS_SUBPROTOCOL_JSON})"))
                }
                (Encoding::Json, Message::Binary(_)) => Inbound::Malformed("binary frame on a json connection".into()),
                // The WebSocket library answers pings by itself.
                (_, Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                (_, Message::Close(_)) => Inbound::Closed,
            };
        }
    }

    async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
        let message = match self.encoding {
            Encoding::Proto => Message::Binary(frame.encode_to_vec().into()),
            Encoding::Json => Message::Text(json::encode_server(&frame).into()),
        };
        self.ws.send(message).await.map_err(|_| ())
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let _ = self.send(close_frame(code, reason)).await;
        let close = CloseFrame { code: WsCloseCode::from(code as u16), reason: reason.to_owned().into() };
        let _ = self.ws.send(Message::Close(Some(close))).await;
        // Drain the raw stream until the peer closes: unread input at close
        // time would make the kernel reset the connection and could destroy
        // the frames just sent.
        linger(self.ws.get_mut()).await;
    }
}
