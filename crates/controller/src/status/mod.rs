//! Status of every Chaperone object, computed from the index and the connected
//! sidecars by a pure function ([`desired_statuses`]), and written by
//! server-side apply (field manager [`FIELD_MANAGER`]) by the leader only
//! ([`run_writer`]).
//!
//! The parts: `desired` (what each status should be, pure), `writer` (the
//! leader's writer and the grant-expiry ticker, the I/O around it) and
//! `definitions` (the writer's reads and writes of tool definitions: the
//! statuses read back by a new leader, the `<agent>-tool-definitions`
//! ConfigMaps).

mod definitions;
mod desired;
mod writer;

pub use desired::{
    ConditionSpec, DesiredStatus, OUT_OF_SYNC_PODS_LISTED, all_objects, desired_statuses,
    next_expiry, objects_to_check,
};
pub use writer::{run_expiry_ticker, run_writer};

/// The field manager of every status the controller writes.
pub const FIELD_MANAGER: &str = "chaperone-controller";

#[cfg(test)]
mod tests;
