//! Wiring: the xDS feed into the mesh state and the route table, the waypoint's certificate,
//! the `mesh` listener, and the metrics, readiness and admin servers.

use std::net::SocketAddr;
use std::sync::Arc;

use common::admin::{Reply, Router};
use common::app::{ServerAddrs, Skeleton, Tasks};
use common::drain::Drain;
use common::hbone::pool::{Pool, PoolConfig, PoolMetrics};
use common::hbone::server::{self, ManagedTls};
use common::identity::manager::{CaSource, CertMetrics};
use common::identity::{CertificateManager, Identity};
use common::readiness::Ready;
use common::state::State;
use common::xds::XdsMetrics;
use tracing::info;

use crate::config::Config;
use crate::filter::trace::Tracer;
use crate::listener::{Listener, SelfRef};
use crate::metrics::{AccessSink, Metrics};
use crate::proxy::Context;
use crate::route::table::{Routes, summary};
use crate::upstream::Upstream;

/// The upstream's per-endpoint entries, for the config dump.
fn upstream_entries(upstream: &Upstream) -> serde_json::Value {
    let (outstanding, round_robin, connections, outlier_records) = upstream.tracked();
    serde_json::json!({"outstanding": outstanding, "round_robin": round_robin,
        "connections": connections, "outlier_records": outlier_records})
}

/// How often the upstream's per-endpoint state is pruned of endpoints that are gone (also soon
/// after each workload change).
const UPSTREAM_PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// A running waypoint.
pub struct App {
    pub ready: Ready,
    pub state: State,
    pub routes: Routes,
    pub identity: Identity,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    drain: Option<Drain>,
    /// Ends every background task when the app is dropped.
    tasks: Tasks,
}

impl App {
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let addrs = ServerAddrs {
            admin: config.admin_addr,
            metrics: config.metrics_addr,
            readiness: config.readiness_addr,
        };
        let mut skeleton = Skeleton::bind("waypoint", addrs).await?;
        let ready = skeleton.ready.clone();
        let registry = &mut skeleton.registry;
        let xds_metrics = XdsMetrics::new(registry);
        let identity = Identity::new(&config.trust_domain, &config.namespace, &config.service_account)?;
        let certs = CertificateManager::new(ca_source(&config)?, CertMetrics::new(registry));
        let (state, mut handlers) = State::new(&config.network);
        let routes = Routes::new(&mut handlers);

        let listener = crate::listener::bind(config.listen_addr).await?;
        let listen_addr = listener.local_addr()?;

        let config_objects = common::xds::ConfigObjects::default();
        let source = config.source.clone().with_mesh_tls(certs.clone(), identity.clone());
        let mut tasks = std::mem::take(&mut skeleton.tasks);
        tasks.push_critical(
            "control-plane source",
            source.spawn_reporting(handlers, &ready, xds_metrics, config_objects.clone()),
        );
        let pool_config =
            PoolConfig { connect_timeout: config.limits.upstream_connect_timeout, ..PoolConfig::default() };
        let pool = Pool::new(certs.clone(), pool_config, PoolMetrics::new(registry));
        let tracer = match &config.otlp_endpoint {
            Some(e) => Tracer::otlp(
                e.clone(),
                format!("{}.{}", config.name.replace('/', "."), "waypoint"),
                config.trace_sampling,
            )
            .map_err(anyhow::Error::msg)?,
            None => Tracer::disabled(),
        };
        let drain = Drain::new();
        let ctx = Arc::new(Context {
            tracer,
            retries: crate::filter::retry::Retries::new(registry),
            state: state.clone(),
            routes: routes.clone(),
            upstream: Upstream::new(pool, identity.clone(), config.balance),
            metrics: Metrics::new(registry, config.log_format, AccessSink::open(&config.access_log)?),
            waypoint: config.name.clone(),
            limits: config.limits.clone(),
            drain: drain.watch(),
        });
        tasks.push_critical(
            "upstream pruner",
            ctx.upstream.spawn_pruner(state.clone(), UPSTREAM_PRUNE_INTERVAL),
        );
        let (ns, host) = config.service_hostname.split_once('/').unwrap_or(("", &config.service_hostname));
        let me = SelfRef { service: (ns.to_string(), host.to_string()), addresses: config.addresses.clone() };
        let tls = Arc::new(ManagedTls::new(certs.clone(), identity.clone()));
        let watch = drain.watch();
        let dump_upstream = ctx.upstream.clone();
        let failures = ctx.metrics.inbound_failures.clone();
        let handler = Arc::new(Listener { ctx, me, drain: watch.clone() });
        let serve = server::serve(listener, tls, config.trust_domain.clone(), handler, failures);
        // Nothing is accepted before the first sync of routes, policies and workloads and our
        // own certificate: until then connections wait in the kernel's backlog rather than meet
        // a waypoint that knows no policy.
        let gate = ready.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = async {
                    info!("the mesh listener waits for the first sync and the certificate");
                    gate.wait().await;
                    info!("the mesh listener accepts");
                    serve.await
                } => {}
                _ = watch.draining() => info!("draining: the mesh listener no longer accepts"),
            }
        }));

        // Ready once the first xDS sync and our own certificate are in.
        let block = ready.register("waypoint certificate");
        let (r, c, id) = (ready.clone(), certs.clone(), identity.clone());
        tasks.push(tokio::spawn(async move {
            r.wait_for_others("waypoint certificate").await;
            c.wait_ready(&id).await;
            info!(identity = %id, "waypoint certificate ready");
            block.done();
        }));

        let config_json = serde_json::to_value(&config).unwrap_or_default();
        let (dump_ready, dump_state, dump_routes) = (ready.clone(), state.clone(), routes.clone());
        let admin_router = common::admin::memory_routes(Router::new())
            .route("/config_dump", move |_| {
                Reply::json(&serde_json::json!({
                    "config": config_json,
                    "ready": dump_ready.is_ready(),
                    "pending": dump_ready.pending(),
                    "resources": { proto::WAYPOINT_RESOURCE_TYPE_URL: dump_routes.versions() },
                    "routes": summary(&dump_routes.table()),
                    "upstream_entries": upstream_entries(&dump_upstream),
                    "route_table": serde_json::to_value(&*dump_routes.table()).unwrap_or_default(),
                    "state": serde_json::to_value(&*dump_state.snapshot()).unwrap_or_default(),
                    "config_objects": config_objects.snapshot(),
                }))
            })
            .route("/certs", {
                let certs = certs.clone();
                move |_| Reply::json(&serde_json::to_value(certs.summary()).unwrap_or_default())
            });
        skeleton.serve(admin_router);
        let ServerAddrs { admin: admin_addr, metrics: metrics_addr, readiness: readiness_addr } =
            skeleton.addrs;
        tasks.append(&mut skeleton.tasks);
        Ok(Self {
            ready,
            state,
            routes,
            identity,
            listen_addr,
            admin_addr,
            metrics_addr,
            readiness_addr,
            drain: Some(drain),
            tasks,
        })
    }

    /// Resolves when a task the waypoint cannot do without (its control-plane source, the
    /// upstream pruner) ended or panicked: the binary then exits, to be restarted, rather than
    /// stay ready on configuration that no longer changes.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        self.tasks.failed()
    }

    /// Stops accepting tunnels, lets requests in flight finish for up to `period`, then closes
    /// what is left. Returns how many tunnels were cut.
    pub async fn drain(&mut self, period: std::time::Duration) -> usize {
        match self.drain.take() {
            Some(d) => d.run(period).await,
            None => 0,
        }
    }
}

/// The waypoint asks for its own identity, without impersonation.
fn ca_source(config: &Config) -> anyhow::Result<CaSource> {
    config.ca.source(&config.trust_domain, config.cert_lifetime, false).map_err(anyhow::Error::msg)
}
