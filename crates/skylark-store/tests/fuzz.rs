//! Fuzz target for the on-disk record decoder: a corrupt or hostile record
//! is an error, never a panic or a huge allocation, and whatever decodes
//! re-encodes to the same record.

#![allow(clippy::unwrap_used)]

use skylark_core::group::{GroupBody, GroupEvent, Role};
use skylark_core::message::{DeviceChange, Forward, LogEntry, Message, MessageId, OutboxItem, ReceiptKind};
use skylark_core::{AccountId, DeviceId};
use skylark_store::record::{StoredOutbox, decode_entry, decode_outbox, encode_entry, encode_outbox};
use std::sync::Arc;

fn seeds() -> Vec<Vec<u8>> {
    let message = Message {
        id: MessageId { sender: AccountId(7), seq: 300 },
        to: AccountId(9),
        sender_device: DeviceId(3),
        client_id: "c-1".into(),
        sent_at_ms: 1_700_000_000_000,
        payload: vec![0, 1, 2, 255].into(),
        meta: skylark_core::message::Meta { edits: Some(2), deletes: None, expires_at_ms: Some(9), purged: false },
    };
    let group = Arc::new(GroupEvent {
        group: AccountId::group(1),
        seq: 4,
        by: AccountId(7),
        at_ms: 5,
        body: GroupBody::Created {
            subject: "trip".into(),
            members: vec![(AccountId(7), Role::Admin), (AccountId(9), Role::Member)],
        },
    });
    let entries = [
        LogEntry::Message(std::sync::Arc::new(message.clone())),
        LogEntry::Receipt { peer: AccountId(3), kind: ReceiptKind::Read, up_to: 12, at_ms: 5 },
        LogEntry::ReadSync { peer: AccountId(4), up_to: 1, at_ms: 6 },
        LogEntry::Devices { change: DeviceChange::Linked { device: DeviceId(5), name: "laptop".into() }, at_ms: 7 },
        LogEntry::Group(group.clone()),
    ];
    let outbox = [
        OutboxItem { to: AccountId(2), forward: Forward::Message(std::sync::Arc::new(message)) },
        OutboxItem { to: AccountId(2), forward: Forward::Receipt { kind: ReceiptKind::Delivered, up_to: 3, at_ms: 4 } },
        OutboxItem { to: AccountId(2), forward: Forward::Group(group) },
    ];
    entries.iter().map(encode_entry).chain(outbox.iter().map(encode_outbox)).collect()
}

#[test]
fn fuzz_store_records() {
    // With SKYLARK_WRITE_CORPUS set: the cargo-fuzz target's starting corpus.
    if std::env::var_os("SKYLARK_WRITE_CORPUS").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/store_records");
        std::fs::create_dir_all(&dir).unwrap();
        for (i, seed) in seeds().iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:03}")), seed).unwrap();
        }
    }
    skylark_fuzz::run("store-records", &seeds(), |input| {
        let entry = decode_entry(input).ok();
        if let Some(entry) = &entry {
            assert_eq!(&decode_entry(&encode_entry(entry)).unwrap(), entry);
        }
        let item = decode_outbox(input).ok();
        match &item {
            Some(StoredOutbox::Item(item)) => {
                assert_eq!(decode_outbox(&encode_outbox(item)).unwrap(), StoredOutbox::Item(item.clone()));
            }
            Some(StoredOutbox::GroupEvent { to, seq }) => {
                let event =
                    GroupEvent { group: AccountId::group(1), seq: *seq, by: *to, at_ms: 0, body: GroupBody::Left };
                let again = encode_outbox(&OutboxItem { to: *to, forward: Forward::Group(Arc::new(event)) });
                assert_eq!(decode_outbox(&again).unwrap(), StoredOutbox::GroupEvent { to: *to, seq: *seq });
            }
            None => {}
        }
        entry.is_some() || item.is_some()
    });
}
