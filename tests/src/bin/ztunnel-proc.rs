//! The ztunnel process for tests that need a real one to stop or kill (the `ztunnel` binary's
//! own entry, built in this package so that its tests can find it).

use clap::Parser;
use ztunnel::config::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    let result = ztunnel::cli::run(args).await;
    common::telemetry::flush();
    result
}
