//! Length-prefixed frames for the raw TCP transport.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! protobuf message (`ClientFrame` or `ServerFrame`). The decoder checks the
//! length against the configured maximum *before* reserving any memory for
//! the body, so a bogus prefix costs nothing but the four bytes read. It is a
//! plain `tokio_util` codec: no sockets, testable on byte buffers.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use std::marker::PhantomData;
use tokio_util::codec::{Decoder, Encoder};

/// Bytes in the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more than the limit. The stream cannot be
    /// resynchronised after this, so the connection must close.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The frame had the right length but was not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `Out` messages and decodes `In` messages, each as one
/// length-prefixed protobuf frame.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame_bytes: usize,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    pub fn new(max_frame_bytes: usize) -> Self {
        Self { max_frame_bytes, _types: PhantomData }
    }
}

/// Splits one complete frame body off `src`, or asks for more bytes.
/// Reserves room for the rest of a frame only once its length is known to be
/// within `max`.
pub fn split_frame(src: &mut BytesMut, max: usize) -> Result<Option<Bytes>, FrameError> {
    if src.len() < LENGTH_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let total = LENGTH_PREFIX + len;
    if src.len() < total {
        src.reserve(total - src.len());
        return Ok(None);
    }
    src.advance(LENGTH_PREFIX);
    Ok(Some(src.split_to(len).freeze()))
}

impl<In: Message + Default, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        match split_frame(src, self.max_frame_bytes)? {
            None => Ok(None),
            Some(body) => In::decode(body).map(Some).map_err(|e| FrameError::Malformed(e.to_string())),
        }
    }
}

impl<In, Out: Message> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        let len = item.encoded_len();
        // Our own frames obey the same limit we impose on peers.
        if len > self.max_frame_bytes {
            return Err(FrameError::TooLarge { len, max: self.max_frame_bytes });
        }
        dst.reserve(LENGTH_PREFIX + len);
        dst.put_u32(len as u32);
        item.encode(dst).map_err(|e| FrameError::Malformed(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientFrame;
    use crate::v1::{Hello, client_frame::Body};

    fn hello(id: u64) -> ClientFrame {
        ClientFrame { id, body: Some(Body::Hello(Hello { min_version: 1, max_version: 1, client: "t".into() })) }
    }

    #[test]
    fn round_trip_byte_by_byte() {
        let mut enc = FrameCodec::<ClientFrame, ClientFrame>::new(1024);
        let mut wire = BytesMut::new();
        enc.encode(hello(1), &mut wire).unwrap();
        enc.encode(hello(2), &mut wire).unwrap();

        let mut dec = FrameCodec::<ClientFrame, ClientFrame>::new(1024);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire {
            buf.put_u8(b);
            while let Some(frame) = dec.decode(&mut buf).unwrap() {
                got.push(frame);
            }
        }
        assert_eq!(got, vec![hello(1), hello(2)]);
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocating() {
        let mut dec = FrameCodec::<ClientFrame, ClientFrame>::new(1024);
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        let before = buf.capacity();
        match dec.decode(&mut buf) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as usize);
                assert_eq!(max, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(buf.capacity(), before, "no memory reserved for the refused body");
    }

    #[test]
    fn garbage_body_is_malformed_not_fatal_to_framing() {
        let mut dec = FrameCodec::<ClientFrame, ClientFrame>::new(1024);
        let mut buf = BytesMut::new();
        buf.put_u32(3);
        buf.put_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(dec.decode(&mut buf), Err(FrameError::Malformed(_))));
        assert!(buf.is_empty(), "the bad frame was consumed whole");
    }
}
