//! The pieces of `make demo` that are not Chaperone itself: two small MCP tool
//! servers (`orders` and `mail`) speaking streamable HTTP, which the demo's agent
//! reaches through the sidecar. Each tool answers with plausible JSON and logs
//! whether the call carried a `Chaperone-Assertion` (and what it asserted), so
//! the demo can show what a governed tool server sees.

#![forbid(unsafe_code)]

pub mod assertion;
pub mod catalog;
pub mod server;

pub use catalog::{DemoTool, ToolSet};
pub use server::{ToolServer, serve};
