//! waypoint binary: parse config, start the app, run until SIGTERM or Ctrl-C.

use clap::Parser;
use common::app::Shutdown;
use tracing::info;
use waypoint::app::App;
use waypoint::config::{Args, Config};
// `pow` defined in the executable, so libm.so is not loaded (see the crate).
use nolibm as _;

/// jemalloc, tuned at build time (see .cargo/config.toml) to hand freed memory back to the
/// kernel within about a second, so RSS falls back after a burst of connections.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    let result = serve(args).await;
    // The log lines still in the buffer, before the error (if any) is printed.
    common::telemetry::flush();
    result
}

/// Everything after the logging set-up.
async fn serve(args: Args) -> anyhow::Result<()> {
    let config = Config::from_args(args)?;
    // Watched before anything starts: a stop during start-up still drains.
    let mut stop = Shutdown::watch();
    info!(config = %serde_json::to_string(&config)?, "starting waypoint");
    let drain_period = config.drain_period;
    let mut app = App::start(config).await?;
    info!(addr = %app.listen_addr, identity = %app.identity, "waypoint listening");
    tokio::select! {
        _ = stop.wait() => {}
        why = app.failed() => {
            drop(app);
            anyhow::bail!("stopping: {why}");
        }
    }
    info!(period_s = drain_period.as_secs(), "shutting down: draining");
    let cut = app.drain(drain_period).await;
    info!(cut, "shutting down");
    drop(app);
    Ok(())
}
