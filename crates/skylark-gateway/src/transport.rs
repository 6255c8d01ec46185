//! What the session state machine needs from a transport.

use skylark_protocol::{ClientFrame, CloseCode, ServerFrame};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One thing read from a connection.
#[derive(Debug)]
pub(crate) enum Inbound {
    Frame(ClientFrame),
    /// A complete frame that is not a valid message.
    Malformed(String),
    /// A frame over the size limit; nothing of it was buffered.
    TooLarge {
        len: usize,
        max: usize,
    },
    /// The peer closed the connection or it broke.
    Closed,
}

pub(crate) trait Transport: Send {
    /// Reads the next frame. Must be cancel-safe: the session drops this
    /// future whenever another branch of its `select!` wins.
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;

    fn send(&mut self, frame: ServerFrame) -> impl Future<Output = Result<(), ()>> + Send;

    /// Sends a final `Close` frame (and on WebSocket a close with the same
    /// status) and shuts the connection.
    fn close(&mut self, code: CloseCode, reason: &str) -> impl Future<Output = ()> + Send;
}

/// How long a closing connection keeps reading (and discarding) what the
/// peer still sends. Closing a socket with unread input makes the kernel
/// send a reset, which can destroy our final frames before the peer reads
/// them; draining briefly lets the Close frame arrive.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// At most this much input is drained while lingering.
const LINGER_BYTES: usize = 256 * 1024;

/// Half-closes `stream` (after the final frames were written), then reads
/// and discards input until the peer closes, `LINGER` passes, or
/// `LINGER_BYTES` were read.
pub(crate) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let _ = stream.shutdown().await;
    let drain = async {
        // On the heap: an array here would make every connection's task
        // 4 KiB larger for its whole life, not just while it closes.
        let mut scratch = vec![0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

pub(crate) fn close_frame(code: CloseCode, reason: &str) -> ServerFrame {
    ServerFrame {
        id: 0,
        body: Some(skylark_protocol::v1::server_frame::Body::Close(skylark_protocol::v1::Close {
            code: code as i32,
            reason: reason.to_owned(),
        })),
    }
}
