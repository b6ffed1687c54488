//! The wire contract between the controller and the sidecars, generated from
//! `proto/chaperone/snapshot/v1/snapshot.proto`. Only generated types (and the
//! codec they are sent with) live here; each side converts them into its own
//! types.

#![forbid(unsafe_code)]

/// `chaperone.snapshot.v1`: the snapshot stream.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("chaperone.snapshot.v1");
}

/// The format name of snapshot payloads this contract carries.
pub const SNAPSHOT_FORMAT_JSON: &str = "chaperone.snapshot.v1+json";

/// The codec of the snapshot stream: protobuf (prost) with 1 KiB initial
/// buffers instead of tonic's 8 KiB. A controller keeps one encode and one
/// decode buffer per sidecar stream for the stream's lifetime, and most
/// messages (ACKs, keys, inventories, small snapshots) are far smaller; a larger
/// message grows its buffer as needed.
#[derive(Debug, Clone)]
pub struct SnapshotCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SnapshotCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// [`SnapshotCodec`]'s buffers: 1 KiB to start with; encoded messages are
/// handed to HTTP/2 once 32 KiB are pending (tonic's default).
fn buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> tonic::codec::Codec for SnapshotCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(buffers())
    }
}
