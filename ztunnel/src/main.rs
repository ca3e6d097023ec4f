//! ztunnel binary: parse flags, set up telemetry, run (see `ztunnel::cli`).

use std::cell::Cell;
use std::time::{Duration, Instant};

use clap::Parser;
use ztunnel::config::Args;
// `pow` defined in the executable, so libm.so is not loaded (see the crate).
use nolibm as _;

/// jemalloc, tuned at build time (see .cargo/config.toml) to hand freed memory back to the
/// kernel within about a second, so RSS falls back after a burst of connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    without_thread_cache();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(empty_thread_cache)
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(ztunnel::cli::run(args)));
    // The log lines still in the buffer, before the error (if any) is printed.
    common::telemetry::flush();
    result
}

/// Turns the calling thread's jemalloc cache off, for good. The main thread does the start-up
/// (configuration, the eBPF objects and the kernel's BTF parsed to load them, certificates)
/// and then only waits for a signal: what its cache kept of the start-up's garbage stayed
/// there, allocated as far as the arena knew, for the life of the process (0.4 MiB of an idle
/// ztunnel's 2.7 MiB of anonymous RSS on a fresh mesh: `/memory` showed 0.47-0.57 MiB in
/// thread caches, 0.09-0.13 MiB with this). Without a cache its frees go straight back to the
/// arena, whose decay returns the pages to the kernel. The main thread's remaining allocations
/// take the arena's lock, which no worker contends for: the workers keep their caches.
fn without_thread_cache() {
    use tikv_jemalloc_ctl::{Access, AsName};
    if let Err(e) = b"thread.tcache.enabled\0".name().write(false) {
        // The cost is memory, not correctness: go on.
        tracing::warn!(error = %e, "could not turn the main thread's allocator cache off");
    }
}

/// How often, at most, a runtime thread going idle empties its allocator cache.
const EMPTY_CACHE_EVERY: Duration = Duration::from_millis(100);

thread_local! {
    static CACHE_EMPTIED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Run as a runtime thread goes idle: empties its jemalloc thread cache (freed objects kept
/// for reuse, up to 20-32 of each size class) at most every [`EMPTY_CACHE_EVERY`]. Until a
/// thread allocates again a cache is out of reach of the decay that hands freed memory back to
/// the kernel, and an idle ztunnel's threads do not allocate: jemalloc's statistics (`/memory`)
/// showed the caches holding 1.4 MiB of a client-side ztunnel's 4.5 MiB of anonymous RSS 60 s
/// after 10k connections closed. Turning the caches off instead cost the churn benchmark
/// almost half its rate (every allocation then takes the arena's lock). Under load a thread
/// goes idle thousands of times a second; emptying ten times a second costs nothing measurable.
fn empty_thread_cache() {
    use tikv_jemalloc_ctl::{Access, AsName};
    let now = Instant::now();
    if CACHE_EMPTIED.get().is_some_and(|at| now.duration_since(at) < EMPTY_CACHE_EVERY) {
        return;
    }
    CACHE_EMPTIED.set(Some(now));
    // Turning the cache off hands its objects back to the arena; turning it on starts an
    // empty one. (`thread.tcache.flush` takes no value, which the safe interface cannot pass.)
    let enabled = b"thread.tcache.enabled\0".name();
    if let Err(e) = enabled.write(false).and_then(|()| enabled.write(true)) {
        tracing::debug!(error = %e, "could not empty the allocator's thread cache");
    }
}
