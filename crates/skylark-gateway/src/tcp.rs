//! The raw TCP transport: length-prefixed protobuf frames.

use crate::Shared;
use crate::transport::{Inbound, Transport, close_frame, linger};
use futures_util::{SinkExt, StreamExt};
use skylark_protocol::codec::{FrameCodec, FrameError};
use skylark_protocol::{ClientFrame, CloseCode, ServerFrame};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

/// How long to wait before accepting again after `accept` fails (for
/// example when the process is out of file descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Initial read buffer per connection. Most frames are small; the codec
/// grows the buffer for a larger frame once its length is known (and within
/// the limit). tokio-util's default would be 8 KiB for every idle connection.
const READ_BUFFER: usize = 512;

pub(crate) async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let max = shared.server.config.limits.max_frame_bytes;
                let framed = Framed::with_capacity(stream, FrameCodec::new(max), READ_BUFFER);
                let mut transport = TcpTransport { framed };
                match shared.slots.acquire(peer.ip()) {
                    Some(slot) => {
                        let session = crate::session::run(shared.clone(), transport, peer, "tcp");
                        shared.tracker.spawn(async move {
                            session.await;
                            drop(slot);
                        });
                    }
                    None => {
                        shared.tracker.spawn(async move {
                            transport.close(CloseCode::TryAgainLater, "too many connections from this address").await;
                        });
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "tcp accept failed");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

struct TcpTransport {
    framed: Framed<TcpStream, FrameCodec<ClientFrame, ServerFrame>>,
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
