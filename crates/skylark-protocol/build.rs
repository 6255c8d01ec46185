//! Compiles `proto/skylark/v1/skylark.proto` with protox (pure Rust, no
//! `protoc` binary needed), then generates prost types and pbjson's proto3
//! JSON mapping for them from the same descriptor set.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/skylark/v1/skylark.proto";
    println!("cargo:rerun-if-changed={proto}");

    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("skylark_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;

    prost_build::Config::new()
        // Message payloads are `bytes::Bytes`: decoded without a copy where
        // the frame allows, and shared, not copied, by every device's event.
        .bytes([
            ".skylark.v1.SendMessage.payload",
            ".skylark.v1.Message.payload",
            ".skylark.v1.GroupMessage.payload",
            // Key packages likewise: stored and handed out as they came.
            ".skylark.v1.UploadKeyPackages",
            ".skylark.v1.DeviceKeyPackage.key_package",
        ])
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .compile_protos(&[proto], &["proto"])?;

    let descriptor_bytes = std::fs::read(&descriptor_path)?;
    // Fields are only ever added to protocol v1, so a reader must skip what
    // it does not know, as binary protobuf does: unknown fields are ignored
    // and an unknown enum name reads as the enum's zero (UNSPECIFIED) value,
    // which every handler treats like an unknown number.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .ignore_unknown_fields()
        .ignore_unknown_enum_variants()
        .build(&[".skylark"])?;
    Ok(())
}
