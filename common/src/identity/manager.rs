//! The certificate manager: one key and certificate per identity, shared by every connection of
//! that identity, fetched once however many callers ask at the same time, rotated at about half
//! its remaining lifetime (with jitter), retried with backoff on failure.
//!
//! Each identity has a worker task that owns fetching and rotation and publishes the current
//! state on a watch channel; callers only read that channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::ca_client::IstioCaClient;
use super::files::CertificateFiles;
use super::local_ca::LocalCa;
use super::{Identity, WorkloadCertificate};
use crate::backoff::Backoff;

/// First retry delay after a failed fetch.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Retry delay cap.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// Rotation happens after this fraction of the remaining lifetime, jittered by ±`ROTATE_JITTER`.
const ROTATE_AT: f64 = 0.5;
const ROTATE_JITTER: f64 = 0.05;
/// How often mounted certificate files are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManagerError {
    #[error("no certificate for {identity}: {reason}")]
    Fetch { identity: Identity, reason: String },
    #[error("certificate files prove {have}, not {asked}")]
    NotOurs { asked: Identity, have: Identity },
}

/// Where certificates come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// Signed in-process by a local root, valid for the given lifetime.
    Local(Arc<LocalCa>, Duration),
    /// istiod's CA over gRPC.
    Istio(IstioCaClient),
    /// Mounted files, reloaded when they change; they prove one identity only.
    Files(CertificateFiles),
}

impl CaSource {
    async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, ManagerError> {
        let fail = |reason: String| ManagerError::Fetch { identity: identity.clone(), reason };
        let cert = match self {
            CaSource::Local(ca, lifetime) => {
                ca.issue(identity, *lifetime).map_err(|e| fail(e.to_string()))?
            }
            CaSource::Istio(client) => client.fetch(identity).await.map_err(|e| fail(e.to_string()))?,
            CaSource::Files(files) => files.load().map_err(|e| fail(e.to_string()))?,
        };
        if &cert.identity != identity {
            return Err(ManagerError::NotOurs { asked: identity.clone(), have: cert.identity });
        }
        Ok(cert)
    }

    fn name(&self) -> &'static str {
        match self {
            CaSource::Local(..) => "local",
            CaSource::Istio(_) => "istio",
            CaSource::Files(_) => "files",
        }
    }
}

/// What a worker publishes.
#[derive(Clone, Debug)]
enum State {
    Pending,
    Ready(Arc<WorkloadCertificate>),
    /// No certificate yet and the last attempt failed (the worker keeps retrying).
    Failed(ManagerError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// Certificate metrics (`istio_certificate_*`).
#[derive(Clone, Debug, Default)]
pub struct CertMetrics {
    fetches: Family<OutcomeLabels, Counter>,
    expiry: Family<IdentityLabels, Gauge>,
}

impl CertMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("certificate");
        r.register("fetches", "Certificate fetches from the CA, by source and outcome", m.fetches.clone());
        r.register(
            "expiry_timestamp_seconds",
            "When the certificate held for an identity expires (Unix seconds)",
            m.expiry.clone(),
        );
        m
    }
}

/// One held identity, as the admin endpoint shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertSummary {
    pub identity: String,
    pub state: &'static str,
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    pub error: Option<String>,
}

struct Entry {
    state: watch::Receiver<State>,
    worker: AbortHandle,
}

struct Inner {
    source: CaSource,
    metrics: CertMetrics,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(entries) = self.entries.get_mut() {
            entries.values().for_each(|e| e.worker.abort());
        }
    }
}

/// Hands out certificates per identity. Cheap to clone; must be used inside a tokio runtime.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertificateManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateManager")
            .field("source", &self.inner.source.name())
            .finish_non_exhaustive()
    }
}

impl CertificateManager {
    pub fn new(source: CaSource, metrics: CertMetrics) -> Self {
        Self { inner: Arc::new(Inner { source, metrics, entries: Mutex::new(HashMap::new()) }) }
    }

    /// The current certificate for `identity`, fetching it first if this is the first ask.
    /// Concurrent first asks share one fetch. Fails with the reason if that fetch failed.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, ManagerError> {
        let mut rx = self.subscribe(identity);
        let state = rx.wait_for(|s| !matches!(s, State::Pending)).await.map(|s| s.clone()).map_err(|_| {
            ManagerError::Fetch { identity: identity.clone(), reason: "manager stopped".into() }
        })?;
        match state {
            State::Ready(cert) => Ok(cert),
            State::Failed(e) => Err(e),
            State::Pending => unreachable!("waited past Pending"),
        }
    }

    /// Waits until a certificate for `identity` is held, however many fetches fail first.
    pub async fn wait_ready(&self, identity: &Identity) -> Arc<WorkloadCertificate> {
        self.wait_until(identity, |_| true).await
    }

    /// Waits until the certificate for `identity` is replaced by one other than `old`.
    pub async fn rotated(
        &self,
        identity: &Identity,
        old: &Arc<WorkloadCertificate>,
    ) -> Arc<WorkloadCertificate> {
        self.wait_until(identity, |cert| !Arc::ptr_eq(cert, old)).await
    }

    /// Waits until a held certificate for `identity` satisfies `pred`.
    async fn wait_until(
        &self,
        identity: &Identity,
        pred: impl Fn(&Arc<WorkloadCertificate>) -> bool,
    ) -> Arc<WorkloadCertificate> {
        let mut rx = self.subscribe(identity);
        loop {
            if let State::Ready(cert) = &*rx.borrow_and_update()
                && pred(cert)
            {
                return cert.clone();
            }
            if rx.changed().await.is_err() {
                // The identity was forgotten: nothing will ever arrive.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The certificate held now, without waiting or fetching.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.inner.entries.lock().ok()?;
        match &*entries.get(identity)?.state.borrow() {
            State::Ready(cert) => Some(cert.clone()),
            _ => None,
        }
    }

    /// Stops holding `identity` (its last workload left): no more rotation.
    pub fn forget(&self, identity: &Identity) {
        let removed = self.inner.entries.lock().ok().and_then(|mut e| e.remove(identity));
        if let Some(entry) = removed {
            entry.worker.abort();
            self.inner.metrics.expiry.remove(&IdentityLabels { identity: identity.to_string() });
            info!(%identity, "certificate released");
        }
    }

    /// Every identity held, for the admin endpoint.
    pub fn summary(&self) -> Vec<CertSummary> {
        let Ok(entries) = self.inner.entries.lock() else { return Vec::new() };
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
        let mut out: Vec<CertSummary> = entries
            .iter()
            .map(|(id, e)| {
                let base = CertSummary {
                    identity: id.to_string(),
                    state: "pending",
                    not_before: None,
                    not_after: None,
                    error: None,
                };
                match &*e.state.borrow() {
                    State::Pending => base,
                    State::Ready(c) => CertSummary {
                        state: "ready",
                        not_before: secs(c.not_before),
                        not_after: secs(c.not_after),
                        ..base
                    },
                    State::Failed(err) => {
                        CertSummary { state: "failed", error: Some(err.to_string()), ..base }
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    fn subscribe(&self, identity: &Identity) -> watch::Receiver<State> {
        let Ok(mut entries) = self.inner.entries.lock() else {
            // A poisoned lock means a panic elsewhere; report it as a failed fetch.
            let (_, rx) = watch::channel(State::Failed(ManagerError::Fetch {
                identity: identity.clone(),
                reason: "certificate manager state poisoned".into(),
            }));
            return rx;
        };
        if let Some(entry) = entries.get(identity) {
            return entry.state.clone();
        }
        let (tx, rx) = watch::channel(State::Pending);
        let worker = Worker {
            identity: identity.clone(),
            source: self.inner.source.clone(),
            metrics: self.inner.metrics.clone(),
            tx,
        };
        let handle = tokio::spawn(worker.run()).abort_handle();
        entries.insert(identity.clone(), Entry { state: rx.clone(), worker: handle });
        rx
    }
}

/// Fetches and rotates one identity's certificate for as long as it is held.
struct Worker {
    identity: Identity,
    source: CaSource,
    metrics: CertMetrics,
    tx: watch::Sender<State>,
}

impl Worker {
    async fn run(self) {
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        let source = self.source.name();
        loop {
            match self.source.fetch(&self.identity).await {
                Ok(cert) => {
                    backoff.reset();
                    self.count(source, "success");
                    let not_after = cert.not_after.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                    self.metrics
                        .expiry
                        .get_or_create(&IdentityLabels { identity: self.identity.to_string() })
                        .set(not_after as i64);
                    let cert = Arc::new(cert);
                    let delay = rotation_delay(&cert);
                    info!(identity = %self.identity, %source, not_after, rotate_in = ?delay, "certificate issued");
                    self.tx.send_replace(State::Ready(cert));
                    self.wait_before_refresh(delay).await;
                }
                Err(e) => {
                    self.count(source, "error");
                    let delay = backoff.next_delay();
                    warn!(identity = %self.identity, %source, error = %e, retry_in = ?delay, "certificate fetch failed");
                    // A held certificate stays in use until it is replaced.
                    self.tx.send_if_modified(|s| {
                        if matches!(s, State::Ready(_)) {
                            return false;
                        }
                        *s = State::Failed(e);
                        true
                    });
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn count(&self, source: &'static str, outcome: &'static str) {
        self.metrics.fetches.get_or_create(&OutcomeLabels { source, outcome }).inc();
    }

    /// For a CA, sleep until rotation time; for files, until they change.
    async fn wait_before_refresh(&self, delay: Duration) {
        let CaSource::Files(files) = &self.source else {
            tokio::time::sleep(delay).await;
            return;
        };
        let seen = files.fingerprint();
        loop {
            tokio::time::sleep(FILE_POLL_INTERVAL).await;
            if files.fingerprint() != seen {
                info!(identity = %self.identity, chain = %files.chain.display(), "certificate files changed, reloading");
                return;
            }
        }
    }
}

/// About half the remaining lifetime, jittered so that many proxies do not rotate at once.
fn rotation_delay(cert: &WorkloadCertificate) -> Duration {
    let fraction = ROTATE_AT + rand::rng().random_range(-ROTATE_JITTER..=ROTATE_JITTER);
    cert.remaining().mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("identity")
    }

    fn local(lifetime: Duration) -> CertificateManager {
        let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
        CertificateManager::new(CaSource::Local(ca, lifetime), CertMetrics::default())
    }

    #[tokio::test]
    async fn concurrent_asks_share_one_certificate() {
        let m = local(Duration::from_secs(3600));
        let asks = (0..64).map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.fetch(&id("a")).await })
        });
        let mut certs = Vec::new();
        for ask in asks {
            certs.push(ask.await.expect("join").expect("cert"));
        }
        assert!(certs.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])), "one fetch shared by all callers");
        let fetched =
            m.inner.metrics.fetches.get_or_create(&OutcomeLabels { source: "local", outcome: "success" });
        assert_eq!(fetched.get(), 1);
        let other = m.fetch(&id("b")).await.expect("b");
        assert_eq!(other.identity, id("b"));
        assert_eq!(m.summary().len(), 2);
    }

    #[tokio::test]
    async fn rotates_at_about_half_life() {
        let m = local(Duration::from_secs(2));
        let first = m.fetch(&id("a")).await.expect("cert");
        let start = Instant::now();
        let second = tokio::time::timeout(Duration::from_secs(5), m.rotated(&id("a"), &first))
            .await
            .expect("rotation within the lifetime");
        let waited = start.elapsed();
        // X.509 times have whole seconds, so "half of what remains" is between ~0.5 s and 1 s.
        assert!(waited >= Duration::from_millis(400) && waited < Duration::from_millis(1500), "{waited:?}");
        assert_ne!(second.chain[0], first.chain[0], "a new leaf");
    }

    #[tokio::test]
    async fn wrong_trust_domain_fails_and_is_counted() {
        let m = local(Duration::from_secs(60));
        let foreign = Identity::new("elsewhere.td", "ns", "sa").expect("id");
        let err = m.fetch(&foreign).await.expect_err("foreign trust domain");
        assert!(err.to_string().contains("outside trust domain"), "{err}");
        let summary = m.summary();
        assert_eq!(summary[0].state, "failed");
        m.forget(&foreign);
        assert!(m.summary().is_empty());
    }
}

/// Where a proxy's certificates come from, as configured (serializable for config dumps).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CaConfig {
    /// A local root kept in this directory (created on first use); for tests, the local demo
    /// and lone hosts. Every proxy of a mesh must share it.
    Local { dir: std::path::PathBuf },
    /// istiod's CA (the same TLS root and token as xDS).
    Istio {
        address: String,
        #[serde(skip)]
        target: crate::grpc::GrpcTarget,
    },
}

impl CaConfig {
    /// The local root when `local` is given, else istiod's CA at `ca_address`, or at the xDS
    /// address when that is https, or at istiod's default; verified like xDS.
    pub fn from_flags(
        local: Option<&std::path::Path>,
        ca_address: Option<&str>,
        xds_address: Option<&str>,
        default_address: &str,
        root_cert: &std::path::Path,
        token_path: Option<&std::path::Path>,
    ) -> Self {
        if let Some(dir) = local {
            return CaConfig::Local { dir: dir.to_path_buf() };
        }
        let https = |a: &str| a.starts_with("https://");
        let address = ca_address.or(xds_address.filter(|a| https(a))).unwrap_or(default_address).to_string();
        let mut target = crate::grpc::GrpcTarget::new(address.clone());
        target.root_cert = https(&address).then(|| root_cert.to_path_buf());
        target.token_path = token_path.map(std::path::Path::to_path_buf);
        CaConfig::Istio { address, target }
    }

    /// The certificate source: certificates valid for `lifetime`; for istiod's CA, asking on
    /// behalf of workloads when `impersonate` (ztunnel) or as ourselves (waypoint).
    pub fn source(
        &self,
        trust_domain: &str,
        lifetime: Duration,
        impersonate: bool,
    ) -> Result<CaSource, String> {
        Ok(match self {
            CaConfig::Local { dir } => CaSource::Local(
                Arc::new(super::LocalCa::load_or_create(dir, trust_domain).map_err(|e| e.to_string())?),
                lifetime,
            ),
            CaConfig::Istio { target, .. } => CaSource::Istio(
                super::ca_client::IstioCaClient::new(target.clone(), lifetime, impersonate)
                    .map_err(|e| e.to_string())?,
            ),
        })
    }
}
