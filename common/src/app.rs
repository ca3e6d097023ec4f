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

/// Background tasks that live as long as their app: aborted when dropped. A task pushed as
/// critical is one the app cannot do without: when it ends (or panics), [`Tasks::failed`]
/// says which, so that the process can stop (and be restarted) instead of staying ready on
/// stale state.
#[derive(Debug)]
pub struct Tasks {
    handles: Vec<tokio::task::AbortHandle>,
    failed: tokio::sync::watch::Sender<Option<String>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Self { handles: Vec::new(), failed: tokio::sync::watch::channel(None).0 }
    }
}

impl Tasks {
    pub fn push(&mut self, task: JoinHandle<()>) {
        self.handles.push(task.abort_handle());
    }

    /// A task whose end is a failure of the app (see [`Tasks::failed`]).
    pub fn push_critical(&mut self, name: &'static str, task: JoinHandle<()>) {
        self.handles.push(task.abort_handle());
        let failed = self.failed.clone();
        let watcher = tokio::spawn(async move {
            let why = match task.await {
                Ok(()) => "ended".to_string(),
                Err(e) if e.is_panic() => "panicked".to_string(),
                Err(_) => return, // aborted: the app is stopping
            };
            tracing::error!(task = name, %why, "a critical task stopped");
            failed.send_replace(Some(format!("{name} {why}")));
        });
        self.handles.push(watcher.abort_handle());
    }

    /// Resolves when a critical task has ended or panicked, with which and how.
    pub fn failed(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.failed.subscribe();
        async move {
            loop {
                if let Some(why) = rx.borrow_and_update().clone() {
                    return why;
                }
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Moves `other`'s tasks into these (its critical tasks report here from now on).
    pub fn append(&mut self, other: &mut Tasks) {
        self.handles.append(&mut other.handles);
        let (mut from, to) = (other.failed.subscribe(), self.failed.clone());
        let relay = tokio::spawn(async move {
            while from.changed().await.is_ok() {
                if let Some(why) = from.borrow_and_update().clone() {
                    to.send_replace(Some(why));
                }
            }
        });
        self.handles.push(relay.abort_handle());
    }

    /// Aborts every task now (also done when dropped).
    pub fn abort(&self) {
        for t in &self.handles {
            t.abort();
        }
    }
}

impl Extend<JoinHandle<()>> for Tasks {
    fn extend<I: IntoIterator<Item = JoinHandle<()>>>(&mut self, iter: I) {
        for t in iter {
            self.push(t);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_critical_task_that_panics_or_ends_is_reported_and_dropping_aborts_the_rest() {
        let mut tasks = Tasks::default();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        tasks.push(tokio::spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        }));
        tasks.push_critical("reconcile", tokio::spawn(async { panic!("boom") }));
        let why =
            tokio::time::timeout(std::time::Duration::from_secs(5), tasks.failed()).await.expect("reported");
        assert_eq!(why, "reconcile panicked");
        drop(tasks);
        // The plain task was aborted: its sender is gone.
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), &mut rx).await.expect("aborted");
        assert!(closed.is_err());
    }
}
