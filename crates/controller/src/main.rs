//! `chaperone-controller`: see the crate docs of `chaperone_controller`.

#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = chaperone_controller::Args::parse();
    let telemetry = chaperone_controller::init_telemetry(args.log_format)?;
    let result = chaperone_controller::run(args).await;
    // Flushes the spans still buffered before the process ends.
    drop(telemetry);
    result
}
