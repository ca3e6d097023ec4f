//! Wiring: the control-plane feed into the stores, and the metrics, readiness and admin
//! servers. Returns once everything is bound and spawned.

use std::net::SocketAddr;
use std::sync::Arc;

use common::admin::{self, Reply, Router};
use common::readiness::Ready;
use common::xds::{Handlers, ResourceStore, XdsMetrics, validate};
use proto::security::Authorization;
use proto::workload::Address;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::redirect::Enrollment;
use ebpf::Redirector;

/// A running ztunnel.
pub struct App {
    pub ready: Ready,
    pub addresses: Arc<ResourceStore<Address>>,
    pub policies: Arc<ResourceStore<Authorization>>,
    /// Bound addresses of admin, metrics and readiness (useful when configured with port 0).
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    /// eBPF enrollment, when redirection is on.
    pub enrollment: Option<Enrollment>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for App {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(e) = &self.enrollment {
            e.shutdown();
        }
    }
}

impl App {
    /// Binds the servers and starts the control-plane feed.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let ready = Ready::new();
        let mut registry = common::metrics::new_registry();
        register_build_info(&mut registry);
        let xds_metrics = XdsMetrics::new(&mut registry);

        let addresses = ResourceStore::<Address>::new(validate::address);
        let policies = ResourceStore::<Authorization>::new(validate::authorization);
        let mut handlers = Handlers::new();
        handlers.add::<Address, _>(proto::ADDRESS_TYPE_URL, addresses.clone());
        handlers.add::<Authorization, _>(proto::AUTHORIZATION_TYPE_URL, policies.clone());

        let admin_listener = admin::bind(config.admin_addr).await?;
        let metrics_listener = admin::bind(config.metrics_addr).await?;
        let readiness_listener = admin::bind(config.readiness_addr).await?;
        let admin_addr = admin_listener.local_addr()?;
        let metrics_addr = metrics_listener.local_addr()?;
        let readiness_addr = readiness_listener.local_addr()?;

        let mut tasks = vec![config.source.clone().spawn(handlers, &ready, xds_metrics)];
        let enrollment = if config.redirect {
            let redirector = Redirector::load(ebpf::Settings::default())?;
            let (enrollment, task) = Enrollment::start(
                redirector,
                config.node_name.clone(),
                config.uplinks.clone(),
                config.static_pods.clone(),
                addresses.clone(),
                &mut registry,
            );
            tasks.push(task);
            Some(enrollment)
        } else {
            None
        };
        let registry = Arc::new(registry);
        let metrics_router = admin::metrics_routes(Router::new(), registry);
        let readiness_router = admin::readiness_routes(Router::new(), ready.clone());
        let admin_router = admin_routes(&config, &ready, &addresses, &policies, enrollment.clone());
        tasks.push(tokio::spawn(admin::serve(metrics_listener, metrics_router, "metrics")));
        tasks.push(tokio::spawn(admin::serve(readiness_listener, readiness_router, "readiness")));
        tasks.push(tokio::spawn(admin::serve(admin_listener, admin_router, "admin")));
        Ok(Self { ready, addresses, policies, admin_addr, metrics_addr, readiness_addr, enrollment, tasks })
    }
}

fn register_build_info(registry: &mut prometheus_client::registry::Registry) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let build: Family<Vec<(String, String)>, Gauge> = Family::default();
    build
        .get_or_create(&vec![
            ("component".to_string(), "ztunnel".to_string()),
            ("tag".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ])
        .set(1);
    registry.register("build", "Build information", build);
}

fn admin_routes(
    config: &Config,
    ready: &Ready,
    addresses: &Arc<ResourceStore<Address>>,
    policies: &Arc<ResourceStore<Authorization>>,
    enrollment: Option<Enrollment>,
) -> Router {
    let config_json = serde_json::to_value(config).unwrap_or_default();
    let router = admin::readiness_routes(Router::new(), ready.clone());
    let (ready, addresses, policies) = (ready.clone(), addresses.clone(), policies.clone());
    router.route("/config_dump", move |_| {
        Reply::json(&serde_json::json!({
            "config": config_json,
            "ready": ready.is_ready(),
            "pending": ready.pending(),
            "resources": {
                proto::ADDRESS_TYPE_URL: addresses.versions(),
                proto::AUTHORIZATION_TYPE_URL: policies.versions(),
            },
            "redirection": enrollment.as_ref().map(Enrollment::status),
        }))
    })
}
