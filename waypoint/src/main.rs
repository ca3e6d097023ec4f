//! waypoint binary: parse config, start the app, run until SIGTERM or Ctrl-C.

use clap::Parser;
use tracing::info;
use waypoint::app::App;
use waypoint::config::{Args, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    common::telemetry::init(args.log_format);
    let config = Config::from_args(args)?;
    info!(config = %serde_json::to_string(&config)?, "starting waypoint");
    let drain_period = config.drain_period;
    let mut app = App::start(config).await?;
    info!(addr = %app.listen_addr, identity = %app.identity, "waypoint listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!(period_s = drain_period.as_secs(), "shutting down: draining");
    let cut = app.drain(drain_period).await;
    info!(cut, "shutting down");
    drop(app);
    Ok(())
}
