//! The JSON mapping (the browser's wire format) both ways: whatever decodes
//! re-encodes and decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skylark_protocol::json;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(frame) = json::decode_client(text) {
        assert_eq!(json::decode_client(&json::encode_client(&frame)).unwrap(), frame);
    }
    if let Ok(frame) = json::decode_server(text) {
        assert_eq!(json::decode_server(&json::encode_server(&frame)).unwrap(), frame);
    }
});
