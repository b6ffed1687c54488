//! Compiles the .proto with protox (pure Rust): no system `protoc` needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/chaperone/snapshot/v1/snapshot.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        // The controller sends one agent's snapshot bytes to each of its
        // sidecars: shared, not copied per stream.
        .bytes(".chaperone.snapshot.v1.SnapshotUpdate.payload")
        // Smaller per-stream buffers (see `SnapshotCodec`).
        .codec_path("crate::SnapshotCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
