//! Fuzz targets for everything that parses bytes from the network: the TCP
//! frame decoder, protobuf frames and the JSON mapping (see skylark-fuzz for
//! the engine and its settings). Each also checks that what decodes
//! re-encodes to the same message.

#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use prost::Message;
use skylark_protocol::codec::{FrameCodec, FrameError, LENGTH_PREFIX};
use skylark_protocol::{ClientFrame, ServerFrame, json, samples};
use tokio_util::codec::Decoder;

/// With `SKYLARK_WRITE_CORPUS` set, writes `seeds` as the starting corpus
/// of the cargo-fuzz target `target` (fuzz/corpus/, kept in the repo).
fn write_corpus(target: &str, seeds: &[Vec<u8>]) {
    if std::env::var_os("SKYLARK_WRITE_CORPUS").is_none() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in seeds.iter().enumerate() {
        std::fs::write(dir.join(format!("seed-{i:03}")), seed).unwrap();
    }
}

fn protobuf_seeds() -> Vec<Vec<u8>> {
    samples::client_frames().iter().map(|f| f.encode_to_vec()).collect()
}

#[test]
fn fuzz_tcp_frame_decoder() {
    const MAX: usize = 1024;
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for frame in samples::client_frames() {
        let body = frame.encode_to_vec();
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        seeds.push(framed);
    }
    seeds.push(seeds.concat());
    write_corpus("tcp_frames", &seeds);
    skylark_fuzz::run("tcp-frame-decoder", &seeds, |input| {
        let mut codec: FrameCodec<ClientFrame, ServerFrame> = FrameCodec::new(MAX);
        let mut buf = BytesMut::new();
        let mut decoded = false;
        // Fed in uneven pieces, as a socket would.
        for chunk in input.chunks(7) {
            buf.extend_from_slice(chunk);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        decoded = true;
                        assert_eq!(ClientFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
                    }
                    Ok(None) => break,
                    Err(FrameError::TooLarge { len, max }) => {
                        assert!(len > max);
                        return decoded;
                    }
                    Err(_) => return decoded,
                }
                // Never more room than one frame within the limit needs.
                assert!(buf.capacity() <= input.len().max(64) + LENGTH_PREFIX + MAX, "capacity {}", buf.capacity());
            }
        }
        decoded
    });
}

#[test]
fn fuzz_protobuf_frames() {
    write_corpus("protobuf_frames", &protobuf_seeds());
    skylark_fuzz::run("protobuf-frames", &protobuf_seeds(), |input| {
        let client = ClientFrame::decode(input).ok();
        if let Some(frame) = &client {
            assert_eq!(&ClientFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
        }
        if let Ok(frame) = ServerFrame::decode(input) {
            assert_eq!(ServerFrame::decode(frame.encode_to_vec().as_slice()).unwrap(), frame);
        }
        client.is_some()
    });
}

#[test]
fn fuzz_json_mapping() {
    let seeds: Vec<Vec<u8>> = samples::client_frames().iter().map(|f| json::encode_client(f).into_bytes()).collect();
    write_corpus("json_frames", &seeds);
    skylark_fuzz::run("json-mapping", &seeds, |input| {
        let text = String::from_utf8_lossy(input);
        let client = json::decode_client(&text).ok();
        if let Some(frame) = &client {
            assert_eq!(&json::decode_client(&json::encode_client(frame)).unwrap(), frame);
        }
        if let Ok(frame) = json::decode_server(&text) {
            assert_eq!(json::decode_server(&json::encode_server(&frame)).unwrap(), frame);
        }
        client.is_some()
    });
}
