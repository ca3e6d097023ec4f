//! The process around the app: runs the `uninstall` command, or starts the app and serves
//! until SIGTERM or Ctrl-C, then drains. The `ztunnel` binary is this plus argument parsing;
//! tests run it as a real process too.

use common::app::Shutdown;
use tracing::info;

use crate::app::App;
use crate::config::{Args, Command, Config};

/// Runs ztunnel as its binary does: the `uninstall` command, or the app until SIGTERM or
/// Ctrl-C, then its drain. Telemetry must be initialised by the caller.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::Uninstall) = args.command {
        let settings = ebpf::Settings { pin_dir: args.bpf_pin_dir, ..Default::default() };
        let removed = ebpf::uninstall(&settings)?;
        info!(pin_dir = %settings.pin_dir.display(), %removed, "capture uninstalled");
        return Ok(());
    }
    let mut args = args;
    if args.host_from_ecs_metadata {
        let base = std::env::var(crate::ecs::METADATA_ENV).map_err(|_| {
            anyhow::anyhow!(
                "--host-from-ecs-metadata: {} is not set (not in an ECS task?)",
                crate::ecs::METADATA_ENV
            )
        })?;
        // Link-local (the metadata endpoint) is never captured: this works under a pinned capture.
        let (task, addresses) = crate::ecs::fetch_task_addresses(&base).await.map_err(anyhow::Error::msg)?;
        info!(task, ?addresses, "host addresses from the ECS task metadata");
        // Tasks on one instance share its bpffs: each keeps its capture in a directory of its own.
        if args.bpf_pin_dir.as_path() == std::path::Path::new(ebpf::pin::DEFAULT_PIN_DIR)
            && let Some(id) = crate::ecs::task_id(&task)
        {
            args.bpf_pin_dir = std::path::PathBuf::from(format!("{}-{id}", ebpf::pin::DEFAULT_PIN_DIR));
        }
        args.host_addresses
            .extend(addresses.into_iter().map(|ip| crate::redirect::StaticPod { ip, iface: None }));
    }
    let print_only = matches!(args.command, Some(Command::Config));
    if !print_only && !args.host_addresses.is_empty() {
        // Before any connection of ours: a capture left pinned by a ztunnel in another cgroup
        // would otherwise take this one's own connections.
        ebpf::host::exclude_own_cgroup(&args.bpf_pin_dir).map_err(|e| {
            anyhow::anyhow!("host mode: leaving our own cgroup out of the pinned capture: {e}")
        })?;
    }
    let config = Config::from_args(args)?;
    if print_only {
        let text = serde_json::to_string_pretty(&config)?;
        use std::io::Write;
        writeln!(std::io::stdout(), "{text}")?;
        return Ok(());
    }
    // Watch for SIGTERM before starting anything: a stop during start-up still drains.
    let mut stop = Shutdown::watch();
    info!(config = %serde_json::to_string(&config)?, "starting ztunnel");
    let drain_period = config.drain_period;
    let mut app = App::start(config).await?;
    let ready = app.ready.clone();
    let failed = app.failed();
    tokio::pin!(failed);
    tokio::select! {
        _ = ready.wait() => info!("ztunnel ready"),
        _ = stop.wait() => {
            app.drain(drain_period).await;
            return Ok(());
        }
        why = &mut failed => anyhow::bail!("stopping: {why}"),
    }
    tokio::select! {
        _ = stop.wait() => {}
        why = &mut failed => anyhow::bail!("stopping: {why}"),
    }
    info!(period_s = drain_period.as_secs(), "shutting down: draining connections");
    let cut = app.drain(drain_period).await;
    info!(cut, "shutting down");
    drop(app);
    Ok(())
}
