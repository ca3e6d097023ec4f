//! ztunnel binary: parse flags, set up telemetry, run (see `ztunnel::cli`).

use clap::Parser;
use ztunnel::config::Args;

/// jemalloc, tuned at build time (see .cargo/config.toml) to hand freed memory back to the
/// kernel within about a second, so RSS falls back after a burst of connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    ztunnel::cli::run(args).await
}
