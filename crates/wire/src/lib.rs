//! The wire contract between the controller and the sidecars, generated from
//! `proto/chaperone/snapshot/v1/snapshot.proto`. Only generated types (and the
//! codec they are sent with) live here; each side converts them into its own
//! types. [`build_info`] is the one metric both sides export alike;
//! [`key_registration`] the statement a sidecar signs to prove it holds the
//! key it registers.
//!
//! A `SnapshotUpdate`'s payload is a `chaperone_policy::Snapshot` as JSON: its
//! format version and the label in `SnapshotUpdate.format` are defined once,
//! as `chaperone_policy::SNAPSHOT_FORMAT` and `SNAPSHOT_FORMAT_JSON` (this
//! crate knows no policy type, and the policy core must not depend on gRPC).
//! `tests/fixtures/snapshot-v1.json` is the golden update that the controller's
//! encoder and the sidecar's decoder are both tested against.

#![forbid(unsafe_code)]

pub mod build_info;
pub mod key_registration;
pub mod sidecar_env;

/// `chaperone.snapshot.v1`: the snapshot stream.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("chaperone.snapshot.v1");
}

/// The codec of the snapshot stream: protobuf (prost) with a 1 KiB initial
/// decode buffer instead of tonic's 8 KiB. A controller keeps one per sidecar
/// stream for the stream's lifetime, and what sidecars send (ACKs, keys,
/// inventories, audit batches) is mostly far smaller; a larger message grows it
/// as needed. Encoding keeps tonic's settings: its buffer grows to the largest
/// message sent either way.
#[derive(Debug, Clone)]
pub struct SnapshotCodec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for SnapshotCodec<T, U> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// [`SnapshotCodec`]'s initial decode buffer.
const DECODE_BUFFER_BYTES: usize = 1024;
/// Encoded bytes pending before they are handed to HTTP/2 (tonic's default).
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

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
        tonic_prost::ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(tonic::codec::BufferSettings::new(
            DECODE_BUFFER_BYTES,
            YIELD_THRESHOLD_BYTES,
        ))
    }
}
