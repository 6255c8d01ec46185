//! Protobuf frames both ways: whatever decodes re-encodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use skylark_protocol::{ClientFrame, ServerFrame};

fuzz_target!(|input: &[u8]| {
    if let Ok(frame) = ClientFrame::decode(input) {
        assert_eq!(ClientFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
    }
    if let Ok(frame) = ServerFrame::decode(input) {
        assert_eq!(ServerFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
    }
});
