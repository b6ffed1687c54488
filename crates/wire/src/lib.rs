//! The wire contract between the controller and the sidecars, generated from
//! `proto/chaperone/snapshot/v1/snapshot.proto`. Only generated types live here;
//! each side converts them into its own types.

#![forbid(unsafe_code)]

/// `chaperone.snapshot.v1`: the snapshot stream.
pub mod v1 {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("chaperone.snapshot.v1");
}

/// The format name of snapshot payloads this contract carries.
pub const SNAPSHOT_FORMAT_JSON: &str = "chaperone.snapshot.v1+json";
