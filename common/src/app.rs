//! The skeleton every binary (ztunnel, waypoint, controller) shares: the metrics registry with
//! build info, the admin (loopback only), metrics and readiness servers bound before anything
//! else starts, the background tasks that end with the app, and the stop signal.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{self, NotLoopback, Router};
use crate::readiness::Ready;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    AdminNotLoopback(#[from] NotLoopback),
    #[error("cannot bind the {server} server on {addr}: {source}")]
    Bind { server: &'static str, addr: SocketAddr, source: std::io::Error },
}

/// Where the three servers listen.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct ServerAddrs {
    /// Admin (config dump, certificates): must be a loopback address.
    pub admin: SocketAddr,
    /// Prometheus metrics (`/metrics`, `/stats/prometheus`).
    pub metrics: SocketAddr,
    /// `/healthz/ready`.
    pub readiness: SocketAddr,
}

/// The common parts of a starting app: readiness, the registry, the bound servers and tasks.
pub struct Skeleton {
    pub ready: Ready,
    pub registry: Registry,
    /// The bound addresses (useful when configured with port 0).
    pub addrs: ServerAddrs,
    listeners: Option<[TcpListener; 3]>,
    pub tasks: Tasks,
}

impl Skeleton {
    /// Binds the admin, metrics and readiness ports (admin on loopback only) and starts a
    /// registry with `component`'s build info. Nothing is served until [`Skeleton::serve`].
    pub async fn bind(component: &str, addrs: ServerAddrs) -> Result<Self, AppError> {
        admin::require_loopback(addrs.admin)?;
        let bind = |server: &'static str, addr: SocketAddr| async move {
            admin::bind(addr).await.map_err(|source| AppError::Bind { server, addr, source })
        };
        let admin = bind("admin", addrs.admin).await?;
        let metrics = bind("metrics", addrs.metrics).await?;
        let readiness = bind("readiness", addrs.readiness).await?;
        let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
        let bound = ServerAddrs {
            admin: local(&admin, addrs.admin),
            metrics: local(&metrics, addrs.metrics),
            readiness: local(&readiness, addrs.readiness),
        };
        let mut registry = crate::metrics::new_registry();
        crate::metrics::register_build_info(&mut registry, component);
        Ok(Self {
            ready: Ready::new(),
            registry,
            addrs: bound,
            listeners: Some([admin, metrics, readiness]),
            tasks: Tasks::default(),
        })
    }

    /// Serves metrics from the registry (no metric can be registered after this), readiness,
    /// and `admin` (plus `/healthz/ready`) on the bound ports. Returns the registry, shared.
    pub fn serve(&mut self, admin: Router) -> Arc<Registry> {
        let registry = Arc::new(std::mem::take(&mut self.registry));
        if let Some([admin_listener, metrics, readiness]) = self.listeners.take() {
            let metrics_router = admin::metrics_routes(Router::new(), registry.clone());
            let readiness_router = admin::readiness_routes(Router::new(), self.ready.clone());
            let admin_router = admin::readiness_routes(admin, self.ready.clone());
            self.tasks.push(tokio::spawn(admin::serve(metrics, metrics_router, "metrics")));
            self.tasks.push(tokio::spawn(admin::serve(readiness, readiness_router, "readiness")));
            self.tasks.push(tokio::spawn(admin::serve(admin_listener, admin_router, "admin")));
        }
        registry
    }
}

/// Background tasks that live as long as their app: aborted when dropped.
#[derive(Debug, Default)]
pub struct Tasks(Vec<JoinHandle<()>>);

impl Tasks {
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }

    /// Moves `other`'s tasks into these.
    pub fn append(&mut self, other: &mut Tasks) {
        self.0.append(&mut other.0);
    }
}

impl Extend<JoinHandle<()>> for Tasks {
    fn extend<I: IntoIterator<Item = JoinHandle<()>>>(&mut self, iter: I) {
        self.0.extend(iter);
    }
}

impl Tasks {
    /// Aborts every task now (also done when dropped).
    pub fn abort(&self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.abort();
    }
}

/// SIGTERM or Ctrl-C, watched from creation (a stop during start-up is not lost).
pub struct Shutdown {
    term: Option<tokio::signal::unix::Signal>,
}

impl Shutdown {
    pub fn watch() -> Self {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => Self { term: Some(term) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the process");
                Self { term: None }
            }
        }
    }

    /// Returns at the next SIGTERM or Ctrl-C.
    pub async fn wait(&mut self) {
        match &mut self.term {
            Some(term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
