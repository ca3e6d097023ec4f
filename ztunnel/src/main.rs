//! ztunnel binary: parse flags, set up telemetry, run (see `ztunnel::cli`).

use clap::Parser;
use ztunnel::config::Args;

/// jemalloc, tuned at build time (see .cargo/config.toml) to hand freed memory back to the
/// kernel within about a second, so RSS falls back after a burst of connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    without_thread_cache();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(without_thread_cache)
        .build()?
        .block_on(ztunnel::cli::run(args))
}

/// Turns off jemalloc's cache of freed objects for the calling thread. A thread's cache holds
/// up to 20-32 objects of every size class it used, at most ~1 MiB per thread, out of reach of
/// the decay that returns freed memory to the kernel until that thread allocates again, which
/// an idle ztunnel's threads do not: after 10k connections closed, the caches held 1.4 MiB of
/// a client-side ztunnel's 4.5 MiB of anonymous RSS. ztunnel allocates a few dozen objects per
/// connection, so taking them from the arena costs little; the waypoint, which allocates per
/// request, keeps its caches.
fn without_thread_cache() {
    use tikv_jemalloc_ctl::{Access, AsName};
    if let Err(e) = b"thread.tcache.enabled\0".name().write(false) {
        tracing::warn!(error = %e, "could not turn off the allocator's thread cache");
    }
}
