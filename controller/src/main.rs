//! ambient-controller binary: parse config, connect to the API server (in-cluster or
//! `KUBECONFIG`), start the controller, run until SIGTERM or Ctrl-C.

use clap::Parser;
use common::app::Shutdown;
use controller::app::App;
use controller::config::{Args, Config};
use tracing::info;

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
    let mut stop = Shutdown::watch();
    info!(config = %serde_json::to_string(&config)?, "starting ambient-controller");
    let client = kube::Client::try_default().await?;
    let app = App::start(config, client).await?;
    info!(xds = %app.xds_addr, "ambient-controller started");
    tokio::select! {
        _ = stop.wait() => info!("shutting down"),
        why = app.failed() => {
            drop(app);
            anyhow::bail!("stopping: {why}");
        }
    }
    drop(app);
    Ok(())
}
