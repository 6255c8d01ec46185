//! The store's record decoder (log entries and outbox items on disk): a
//! corrupt record is an error, never a panic or a huge allocation, and
//! whatever decodes re-encodes to the same record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skylark_store::record::{StoredOutbox, decode_entry, decode_outbox, encode_entry, encode_outbox};

fuzz_target!(|input: &[u8]| {
    if let Ok(entry) = decode_entry(input) {
        assert_eq!(decode_entry(&encode_entry(&entry)).unwrap(), entry);
    }
    if let Ok(StoredOutbox::Item(item)) = decode_outbox(input) {
        assert_eq!(decode_outbox(&encode_outbox(&item)).unwrap(), StoredOutbox::Item(item));
    }
});
