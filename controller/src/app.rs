//! Wiring: the watches, leader election, the reconcile loop, our certificate, the delta ADS
//! server for waypoints, and the admin (`/debug`, `/certs`), metrics and readiness servers.
//! Returns once everything is bound and spawned.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use common::admin::{Reply, Router};
use common::app::{ServerAddrs, Skeleton, Tasks};
use common::identity::CertificateManager;
use common::identity::manager::CertMetrics;
use common::readiness::Ready;
use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::objects::{Objects, WatchMetrics};
use crate::reconcile::{LastPass, ReconcileMetrics, Reconciler};
use crate::scope::Served;
use crate::serve::{ServeMetrics, ServerTls};
use crate::{kinds, leader, objects, serve};

/// Lifetime of our own serving certificate.
const CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A running controller.
pub struct App {
    pub ready: Ready,
    pub addrs: ServerAddrs,
    /// Where the delta ADS server listens.
    pub xds_addr: SocketAddr,
    /// What is served now.
    pub served: watch::Receiver<Arc<Served>>,
    /// Whether this replica leads.
    pub leader: watch::Receiver<bool>,
    pub objects: Arc<Objects>,
    tasks: Tasks,
}

impl App {
    /// Resolves when a task the controller cannot do without ended or panicked (which one);
    /// the binary then exits, to be restarted, rather than serve stale configuration.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        self.tasks.failed()
    }

    pub async fn start(config: Config, client: kube::Client) -> anyhow::Result<Self> {
        let addrs = ServerAddrs {
            admin: config.admin_addr,
            metrics: config.metrics_addr,
            readiness: config.readiness_addr,
        };
        let mut skeleton = Skeleton::bind("controller", addrs).await?;
        let ready = skeleton.ready.clone();
        let mut tasks = std::mem::take(&mut skeleton.tasks);
        let registry = &mut skeleton.registry;

        let xds_listener = common::admin::bind(config.xds_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot bind the xDS server on {}: {e}", config.xds_addr))?;
        let xds_addr = xds_listener.local_addr()?;

        let source =
            config.ca.source(&config.trust_domain, CERT_LIFETIME, false).map_err(anyhow::Error::msg)?;
        let certs = CertificateManager::new(source, CertMetrics::new(registry));
        certs.prefetch(&config.identity);
        let cert_block = ready.register("controller certificate");
        let (c, id) = (certs.clone(), config.identity.clone());
        tasks.push(tokio::spawn(async move {
            c.wait_ready(&id).await;
            info!(identity = %id, "controller certificate ready");
            cert_block.done();
        }));

        let objects = Objects::new();
        let watch_metrics = WatchMetrics::new(registry);
        for kind in kinds::WATCHED {
            let watch = objects::watch_kind(client.clone(), *kind, objects.clone(), watch_metrics.clone());
            tasks.push_critical("kubernetes watch", tokio::spawn(watch));
        }

        let (leader_tx, leader_rx) = watch::channel(false);
        let election = leader::run(client.clone(), config.clone(), leader_tx);
        tasks.push_critical("leader election", tokio::spawn(election));

        let (served_tx, served_rx) = watch::channel(Arc::new(Served::default()));
        let last = Arc::new(Mutex::new(LastPass::default()));
        let (reconciler, writer) = Reconciler::new(
            config.clone(),
            objects.clone(),
            client,
            served_tx,
            leader_rx.clone(),
            ReconcileMetrics::new(registry),
            last.clone(),
        );
        let first = ready.register("first translation of the cluster's objects");
        tasks.push_critical("reconcile", tokio::spawn(reconciler.run(first)));
        tasks.push_critical("API writer", tokio::spawn(writer.run()));

        // Nothing is served before the first translation and our certificate: until then
        // waypoints wait in the backlog rather than be told they are unknown.
        let tls = ServerTls {
            certs: certs.clone(),
            identity: config.identity.clone(),
            trust_domain: config.trust_domain.clone(),
        };
        let serve_metrics = ServeMetrics::new(registry);
        let (gate, served) = (ready.clone(), served_rx.clone());
        let server = async move {
            gate.wait().await;
            serve::serve(xds_listener, tls, served, serve_metrics).await;
        };
        tasks.push_critical("xDS server", tokio::spawn(server));

        let config_json = serde_json::to_value(&config).unwrap_or_default();
        let (d_ready, d_served, d_leader, d_objects) =
            (ready.clone(), served_rx.clone(), leader_rx.clone(), objects.clone());
        let router = Router::new()
            .route("/debug", move |_| {
                let last = last.lock().unwrap_or_else(PoisonError::into_inner);
                let refused: Vec<_> =
                    last.statuses.iter().filter(|s| !s.accepted || !s.notes.is_empty()).collect();
                Reply::json(&serde_json::json!({
                    "config": config_json,
                    "ready": d_ready.is_ready(),
                    "pending": d_ready.pending(),
                    "leader": *d_leader.borrow(),
                    "objects": d_objects.counts(),
                    "kinds_not_installed": d_objects.absent(),
                    "waypoints": last.waypoints,
                    "served": d_served.borrow().summary(),
                    "objects_refused_or_noted": serde_json::to_value(refused).unwrap_or_default(),
                }))
            })
            .route("/certs", move |_| {
                Reply::json(&serde_json::to_value(certs.summary()).unwrap_or_default())
            });
        skeleton.serve(router);
        tasks.append(&mut skeleton.tasks);
        Ok(Self {
            ready,
            addrs: skeleton.addrs,
            xds_addr,
            served: served_rx,
            leader: leader_rx,
            objects,
            tasks,
        })
    }
}
