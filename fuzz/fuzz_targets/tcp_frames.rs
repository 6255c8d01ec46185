//! The TCP frame decoder, fed in uneven pieces as a socket would: frames
//! within the limit decode and re-encode to themselves, a length over the
//! limit is refused before anything is allocated for it, and the buffer
//! never holds more than one frame's worth.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use skylark_protocol::codec::{FrameCodec, FrameError, LENGTH_PREFIX};
use skylark_protocol::{ClientFrame, ServerFrame};
use tokio_util::codec::Decoder;

const MAX: usize = 1024;

fuzz_target!(|input: &[u8]| {
    let mut codec: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(MAX);
    let mut buf = BytesMut::new();
    for chunk in input.chunks(7) {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert_eq!(ClientFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { len, max }) => {
                    assert!(len > max);
                    return;
                }
                Err(_) => return,
            }
            assert!(buf.capacity() <= input.len().max(64) + LENGTH_PREFIX + MAX, "capacity {}", buf.capacity());
        }
    }
});
