//! A local control plane: serves delta ADS from a YAML file of Kubernetes, Gateway API and Istio
//! objects (re-read when it changes), or from the embedded demo config when no file is given.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_tests::xds_server;

/// The config served when no file is given: the local demo's mesh.
const DEMO_CONFIG: &str = include_str!("../../../deploy/local-mesh.yaml");

#[derive(Debug, Parser)]
#[command(about = "In-repo delta-ADS xDS server for tests and the local demo")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:15010")]
    listen: SocketAddr,
    /// Local-config YAML to serve (re-read when it changes); the embedded demo config if absent.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::telemetry::init(common::telemetry::LogFormat::Text);
    let result = serve(Args::parse()).await;
    common::telemetry::flush();
    result
}

/// Everything after the logging set-up.
async fn serve(args: Args) -> anyhow::Result<()> {
    let store = xds_server::XdsStore::new();
    let read = |path: &Option<PathBuf>| -> anyhow::Result<String> {
        match path {
            Some(p) => Ok(std::fs::read_to_string(p)?),
            None => Ok(DEMO_CONFIG.to_string()),
        }
    };
    let mut translator = common::translate::Translator::default();
    let source = args.config.as_ref().map_or("embedded demo config".to_string(), |p| p.display().to_string());
    let mut load = |text: &str| -> anyhow::Result<usize> {
        if !common::xds::local::is_objects(&[(source.clone(), text.to_string())]) {
            anyhow::bail!(
                "{source} is in our internal wire schema, not a config format: write Kubernetes, Gateway API and Istio objects (see deploy/local-mesh.yaml)"
            );
        }
        let (n, refusals) = store.load_yaml_with(&mut translator, text, &source)?;
        for r in refusals {
            tracing::warn!(refused = %r, "config object refused (its last accepted version stays in force)");
        }
        Ok(n)
    };
    let text = read(&args.config)?;
    let n = load(&text)?;
    tracing::info!(resources = n, source = ?args.config, "loaded config");
    let mut last = text;
    let server = xds_server::start(args.listen, store.clone()).await?;
    tracing::info!(url = %server.url(), "serving");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if args.config.is_none() {
            continue;
        }
        match read(&args.config) {
            Ok(text) if text != last => {
                match load(&text) {
                    Ok(n) => tracing::info!(resources = n, "reloaded config"),
                    Err(e) => tracing::warn!(error = %e, "config not reloaded, serving the previous one"),
                }
                last = text;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read config, serving the previous one"),
        }
    }
    server.stop().await;
    Ok(())
}
