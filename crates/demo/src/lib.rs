//! The pieces of `make demo` that are not Chaperone itself: small MCP tool
//! servers (`orders`, `mail`, `billing`) speaking streamable HTTP, which the
//! demo's agent reaches through the sidecar, and a worker agent app
//! ([`WorkerApp`]) whose tools call tool servers through its own sidecar inside
//! the session it was handed (delegation). Each tool answers with plausible JSON and logs
//! whether the call carried a `Chaperone-Assertion` (and what it asserted), so
//! the demo can show what a governed tool server sees.

#![forbid(unsafe_code)]

pub mod assertion;
pub mod catalog;
pub mod server;
pub mod worker;

pub use catalog::{DemoTool, ToolSet};
pub use server::{
    SeenAssertions, ToolEdit, ToolEdits, ToolServer, follow_edits_file, serve, serve_handler,
};
pub use worker::WorkerApp;
