//! A connection's session — handshake, then the request loop — played
//! frame by frame from the input against real services (an in-memory
//! store, one registered device whose Authenticate the harness signs): no
//! input may panic it, and it must end once its peer has nothing more to
//! say. The harness is `skylark_gateway::fuzzing::SessionFuzzer`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skylark_gateway::fuzzing::SessionFuzzer;
use std::sync::OnceLock;

static FUZZER: OnceLock<SessionFuzzer> = OnceLock::new();

fuzz_target!(|input: &[u8]| {
    FUZZER.get_or_init(SessionFuzzer::new).play(input);
});
