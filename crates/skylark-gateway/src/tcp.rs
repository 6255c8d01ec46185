//! The raw TCP transport: length-prefixed protobuf frames.

use crate::Shared;
use crate::tls::{Io, accept_loop, handshake};
use crate::transport::{Inbound, Transport, close_frame, linger};
use futures_util::{SinkExt, StreamExt};
use skylark_protocol::codec::{FrameCodec, FrameError};
use skylark_protocol::{ClientFrame, CloseCode, ServerFrame};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;

/// Initial read buffer per connection. Most frames are small; the codec
/// grows the buffer for a larger frame once its length is known (and within
/// the limit). tokio-util's default would be 8 KiB for every idle connection.
const READ_BUFFER: usize = 512;

pub(crate) async fn serve(listener: TcpListener, shared: Shared, tls: Option<TlsAcceptor>) {
    let deadline = Duration::from_millis(shared.server.config.limits.auth_timeout_ms);
    let each = shared.clone();
    accept_loop(listener, shared, move |stream, peer| {
        // The address's slot is taken before the handshake, so a flood of
        // half-open TLS handshakes from one address is bounded too.
        let slot = each.slots.acquire(peer.ip());
        let (shared, tls) = (each.clone(), tls.clone());
        each.tracker.spawn(async move {
            let Some(io) = handshake(tls.as_ref(), stream, deadline).await else { return };
            let max = shared.server.config.limits.max_frame_bytes;
            let framed = Framed::with_capacity(io, FrameCodec::new(max), READ_BUFFER);
            let mut transport = TcpTransport { framed };
            match slot {
                Some(slot) => {
                    crate::session::run(shared, transport, peer, "tcp").await;
                    drop(slot);
                }
                None => transport.close(CloseCode::TryAgainLater, "too many connections from this address").await,
            }
        });
    })
    .await;
}

struct TcpTransport {
    framed: Framed<Io, FrameCodec<ClientFrame, ServerFrame>>,
}

impl Transport for TcpTransport {
    async fn recv(&mut self) -> Inbound {
        match self.framed.next().await {
            None => Inbound::Closed,
            Some(Ok(frame)) => Inbound::Frame(frame),
            Some(Err(FrameError::TooLarge { len, max })) => Inbound::TooLarge { len, max },
            Some(Err(FrameError::Malformed(why))) => Inbound::Malformed(why),
            Some(Err(FrameError::Io(_))) => Inbound::Closed,
        }
    }

    async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
        self.framed.send(frame).await.map_err(|_| ())
    }

    async fn close(&mut self, code: CloseCode, reason: &str) {
        let _ = self.framed.send(close_frame(code, reason)).await;
        linger(self.framed.get_mut()).await;
    }
}
