//! Chaperone's policy core: the model users write, compiled into per-agent
//! snapshots and evaluated per tool call. No kube, no I/O, no async: the
//! controller, the sidecar and the CLI all call into this crate.

#![forbid(unsafe_code)]

pub mod model;
