//! ztunnel binary: parse flags, set up telemetry, run (see `ztunnel::cli`).

use clap::Parser;
use ztunnel::config::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    ztunnel::cli::run(args).await
}
