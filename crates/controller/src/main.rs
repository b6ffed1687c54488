//! `chaperone-controller`: see the crate docs of `chaperone_controller`.

#![forbid(unsafe_code)]

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = chaperone_controller::Args::parse();
    chaperone_controller::init_logging(args.log_format);
    chaperone_controller::run(args).await
}
