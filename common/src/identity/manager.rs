//! The certificate manager: one key and certificate per identity, shared by every connection of
//! that identity, fetched once however many callers ask at the same time, rotated at about half
//! its remaining lifetime (with jitter), retried with backoff on failure.
//!
//! Each identity has a worker task that owns fetching and rotation and publishes the current
//! state on a watch channel; callers only read that channel.
//!
//! Fail-closed rules:
//! - A certificate that cannot be presented (already expired, or `notAfter` not after
//!   `notBefore`) is never handed out: the identity stays missing, the CA is asked again with
//!   jittered exponential backoff (1 s, then 1–2 s, doubling to 15–30 s), and
//!   `istio_certificate_unusable_total{source, reason="expired"|"no_lifetime"}` counts it.
//! - A certificate too short-lived to rotate at half life (rotation would come in under
//!   [`MIN_REFRESH`]) is used while it is valid, but the next fetch waits at least
//!   `MIN_REFRESH` and backs off in the same way (`reason="short_lived"`), so a CA issuing
//!   such certificates is not asked in a tight loop.
//! - A held certificate that expires before it is replaced stops being handed out.
//! - Identities no longer wanted ([`CertificateManager::retain`]) are dropped with their worker;
//!   at most [`MAX_HELD`] identities are held at once.

use std::collections::{BTreeSet, HashMap, HashSet};
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
use super::cert::Unusable;
use super::files::CertificateFiles;
use super::local_ca::LocalCa;
use super::{Identity, WorkloadCertificate};
use crate::backoff::Backoff;
use crate::readiness::BlockReady;

/// First retry delay after a failed fetch.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Retry delay cap.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// The shortest wait before asking again once the CA has answered with a certificate: a floor
/// under rotation, so that an expired or very short-lived certificate cannot drive a tight loop.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// First (unjittered) wait after an unusable or short-lived certificate; with the jitter and the
/// floor, waits go 1 s, 1–2 s, 2–4 s, ... up to 15–30 s.
const UNUSABLE_RETRY_INITIAL: Duration = MIN_REFRESH;
/// Rotation happens after this fraction of the remaining lifetime, jittered by ±`ROTATE_JITTER`.
const ROTATE_AT: f64 = 0.5;
const ROTATE_JITTER: f64 = 0.05;
/// How often mounted certificate files are checked for changes.
pub const FILE_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Most identities held at once. A node runs at most a few hundred pods; beyond this, identities
/// no longer wanted are dropped first, then new ones are refused.
pub const MAX_HELD: usize = 4096;
/// Missing identities named in the readiness detail; the rest are counted.
const MISSING_SHOWN: usize = 5;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ManagerError {
    #[error("no certificate for {identity}: {reason}")]
    Fetch { identity: Identity, reason: String },
    #[error("certificate files prove {have}, not {asked}")]
    NotOurs { asked: Identity, have: Identity },
    #[error("no usable certificate for {identity}: {problem}")]
    Unusable { identity: Identity, problem: Unusable },
    #[error("no certificate for {identity}: {limit} identities already held")]
    TooMany { identity: Identity, limit: usize },
    #[error("no certificate for {identity}: not held")]
    Released { identity: Identity },
}

impl ManagerError {
    /// Why, without the identity (which the caller names): for the readiness detail.
    pub fn cause(&self) -> String {
        match self {
            ManagerError::Fetch { reason, .. } => format!("CA error: {reason}"),
            ManagerError::NotOurs { have, .. } => format!("certificate proves {have}"),
            ManagerError::Unusable { problem, .. } => format!("unusable: {problem}"),
            ManagerError::TooMany { limit, .. } => format!("{limit} identities already held"),
            ManagerError::Released { .. } => "not held".into(),
        }
    }
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
    /// A CA scripted by the unit tests.
    #[cfg(test)]
    Test(Arc<tests::TestCa>),
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
            #[cfg(test)]
            CaSource::Test(ca) => ca.fetch(identity).await.map_err(fail)?,
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
            #[cfg(test)]
            CaSource::Test(_) => "test",
        }
    }
}

/// What a worker publishes.
#[derive(Clone, Debug)]
enum State {
    Pending,
    Ready(Arc<WorkloadCertificate>),
    /// No usable certificate and the last attempt failed (the worker keeps retrying).
    Failed(ManagerError),
}

impl State {
    /// The certificate if one may be presented now; else why not (`None`: still pending).
    fn usable(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, Option<ManagerError>> {
        match self {
            State::Ready(cert) => match cert.check_usable(SystemTime::now()) {
                Ok(()) => Ok(cert.clone()),
                Err(problem) => Err(Some(ManagerError::Unusable { identity: identity.clone(), problem })),
            },
            State::Failed(e) => Err(Some(e.clone())),
            State::Pending => Err(None),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    source: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    source: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

/// Certificate metrics (`istio_certificate_*`).
#[derive(Clone, Debug, Default)]
pub struct CertMetrics {
    fetches: Family<OutcomeLabels, Counter>,
    unusable: Family<ReasonLabels, Counter>,
    expiry: Family<IdentityLabels, Gauge>,
}

impl CertMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("certificate");
        r.register(
            "fetches",
            "Certificate fetches from the CA, by source and outcome (success: a usable certificate; \
             error: none, including unusable ones)",
            m.fetches.clone(),
        );
        r.register(
            "unusable",
            "Certificates from the CA with a lifetime problem, by source and reason: expired and \
             no_lifetime are never used, short_lived is used while valid; all delay the next fetch",
            m.unusable.clone(),
        );
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

/// A wanted identity without a usable certificate, and why (`None`: no answer yet).
#[derive(Clone, Debug)]
pub struct Missing {
    pub identity: Identity,
    pub error: Option<ManagerError>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.error {
            Some(e) => write!(f, "{} ({})", self.identity, e.cause()),
            None => write!(f, "{} (waiting for the CA)", self.identity),
        }
    }
}

/// The readiness detail for missing identities: `missing <id> (<why>), ...`, the first few named.
pub fn describe_missing(missing: &[Missing]) -> String {
    let mut out = String::from("missing ");
    let shown: Vec<String> = missing.iter().take(MISSING_SHOWN).map(Missing::to_string).collect();
    out.push_str(&shown.join(", "));
    if missing.len() > MISSING_SHOWN {
        out.push_str(&format!(" and {} more", missing.len() - MISSING_SHOWN));
    }
    out
}

struct Entry {
    state: watch::Receiver<State>,
    worker: AbortHandle,
}

struct Entries {
    entries: HashMap<Identity, Entry>,
    /// What the last [`CertificateManager::retain`] asked for (`None`: never called).
    wanted: Option<HashSet<Identity>>,
}

struct Inner {
    source: CaSource,
    metrics: CertMetrics,
    held: Mutex<Entries>,
    /// Most identities held at once.
    limit: usize,
    /// Bumped whenever a held identity changes state or is dropped.
    changed: Arc<watch::Sender<u64>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(held) = self.held.get_mut() {
            held.entries.values().for_each(|e| e.worker.abort());
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
        Self::with_limit(source, metrics, MAX_HELD)
    }

    fn with_limit(source: CaSource, metrics: CertMetrics, limit: usize) -> Self {
        let held = Entries { entries: HashMap::new(), wanted: None };
        let changed = Arc::new(watch::channel(0).0);
        Self { inner: Arc::new(Inner { source, metrics, held: Mutex::new(held), limit, changed }) }
    }

    /// The current certificate for `identity`, fetching it first if this is the first ask.
    /// Concurrent first asks share one fetch. Fails with the reason if that fetch failed, or if
    /// the certificate held cannot be presented (it expired before it could be replaced).
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, ManagerError> {
        let mut rx = self.subscribe(identity);
        let state = rx
            .wait_for(|s| !matches!(s, State::Pending))
            .await
            .map(|s| s.clone())
            .map_err(|_| ManagerError::Released { identity: identity.clone() })?;
        state.usable(identity).map_err(|e| e.unwrap_or(ManagerError::Released { identity: identity.clone() }))
    }

    /// Starts holding `identity` (fetching in the background) without waiting.
    pub fn prefetch(&self, identity: &Identity) {
        self.subscribe(identity);
    }

    /// Waits until a usable certificate for `identity` is held, however many fetches fail first.
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

    /// Waits until a usable certificate held for `identity` satisfies `pred`.
    async fn wait_until(
        &self,
        identity: &Identity,
        pred: impl Fn(&Arc<WorkloadCertificate>) -> bool,
    ) -> Arc<WorkloadCertificate> {
        let mut rx = self.subscribe(identity);
        loop {
            if let Ok(cert) = rx.borrow_and_update().usable(identity)
                && pred(&cert)
            {
                return cert;
            }
            if rx.changed().await.is_err() {
                // The identity was forgotten: nothing will ever arrive.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The usable certificate held now, without waiting or fetching.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let held = self.inner.held.lock().ok()?;
        held.entries.get(identity)?.state.borrow().usable(identity).ok()
    }

    /// Which of `wanted` have no usable certificate now, and why; sorted by identity.
    pub fn missing<'a>(&self, wanted: impl IntoIterator<Item = &'a Identity>) -> Vec<Missing> {
        let Ok(held) = self.inner.held.lock() else { return Vec::new() };
        let mut out: Vec<Missing> = wanted
            .into_iter()
            .filter_map(|id| {
                let error = match held.entries.get(id) {
                    Some(entry) => entry.state.borrow().usable(id).err()?,
                    None => Some(ManagerError::Released { identity: id.clone() }),
                };
                Some(Missing { identity: id.clone(), error })
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Stops holding `identity` (its last workload left): no more rotation.
    pub fn forget(&self, identity: &Identity) {
        let removed = self.inner.held.lock().ok().and_then(|mut h| h.entries.remove(identity));
        if let Some(entry) = removed {
            self.release(identity, entry);
            self.inner.changed.send_modify(|n| *n += 1);
        }
    }

    /// Holds only the identities in `wanted` (those of the workloads still here): every other
    /// identity is dropped and no longer refreshed. An identity asked for later is held again.
    /// Returns the identities dropped.
    pub fn retain<'a>(&self, wanted: impl IntoIterator<Item = &'a Identity>) -> Vec<Identity> {
        let wanted: HashSet<Identity> = wanted.into_iter().cloned().collect();
        let Ok(mut held) = self.inner.held.lock() else { return Vec::new() };
        let gone: Vec<Identity> = held.entries.keys().filter(|id| !wanted.contains(*id)).cloned().collect();
        for id in &gone {
            if let Some(entry) = held.entries.remove(id) {
                self.release(id, entry);
            }
        }
        held.wanted = Some(wanted);
        drop(held);
        if !gone.is_empty() {
            self.inner.changed.send_modify(|n| *n += 1);
        }
        gone
    }

    /// Keeps the held identities in step with `wanted()`, re-evaluated whenever `changes`
    /// fires (until its sender is gone): unwanted identities are dropped, new ones fetched ahead
    /// of their first connection. Until every wanted identity has had a usable certificate
    /// once, `block` holds readiness and names those still missing.
    pub async fn follow<T>(
        &self,
        mut changes: watch::Receiver<T>,
        wanted: impl Fn() -> BTreeSet<Identity>,
        block: BlockReady,
    ) {
        let mut certs_changed = self.inner.changed.subscribe();
        let mut block = Some(block);
        loop {
            changes.borrow_and_update();
            certs_changed.borrow_and_update();
            let ids = wanted();
            let dropped = self.retain(&ids);
            if !dropped.is_empty() {
                info!(count = dropped.len(), "certificates of departed workloads dropped");
            }
            ids.iter().for_each(|id| self.prefetch(id));
            if let Some(b) = &block {
                let missing = self.missing(&ids);
                if missing.is_empty() {
                    info!(identities = ids.len(), "certificates of this node's workloads are ready");
                    block.take().into_iter().for_each(BlockReady::done);
                } else {
                    b.set_detail(Some(describe_missing(&missing)));
                }
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = certs_changed.changed(), if block.is_some() => {}
            }
        }
    }

    /// Every identity held, for the admin endpoint.
    pub fn summary(&self) -> Vec<CertSummary> {
        let Ok(held) = self.inner.held.lock() else { return Vec::new() };
        let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
        let mut out: Vec<CertSummary> = held
            .entries
            .iter()
            .map(|(id, e)| {
                let base = CertSummary {
                    identity: id.to_string(),
                    state: "pending",
                    not_before: None,
                    not_after: None,
                    error: None,
                };
                let state = e.state.borrow();
                match (state.usable(id), &*state) {
                    (Ok(c), _) => CertSummary {
                        state: "ready",
                        not_before: secs(c.not_before),
                        not_after: secs(c.not_after),
                        ..base
                    },
                    (Err(None), _) => base,
                    (Err(Some(err)), held) => {
                        let (not_before, not_after) = match held {
                            State::Ready(c) => (secs(c.not_before), secs(c.not_after)),
                            _ => (None, None),
                        };
                        CertSummary {
                            state: "failed",
                            not_before,
                            not_after,
                            error: Some(err.to_string()),
                            ..base
                        }
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Stops an entry's worker and its metrics.
    fn release(&self, identity: &Identity, entry: Entry) {
        entry.worker.abort();
        self.inner.metrics.expiry.remove(&IdentityLabels { identity: identity.to_string() });
        info!(%identity, "certificate released");
    }

    fn subscribe(&self, identity: &Identity) -> watch::Receiver<State> {
        let refused = |error: ManagerError| watch::channel(State::Failed(error)).1;
        let Ok(mut held) = self.inner.held.lock() else {
            // A poisoned lock means a panic elsewhere; report it as a failed fetch.
            return refused(ManagerError::Fetch {
                identity: identity.clone(),
                reason: "certificate manager state poisoned".into(),
            });
        };
        if let Some(entry) = held.entries.get(identity) {
            return entry.state.clone();
        }
        if held.entries.len() >= self.inner.limit {
            // Make room by dropping identities no longer wanted (asked for since the last retain).
            let Entries { entries, wanted } = &mut *held;
            if let Some(wanted) = wanted {
                let stale: Vec<Identity> =
                    entries.keys().filter(|id| !wanted.contains(*id)).cloned().collect();
                for id in stale {
                    if let Some(entry) = entries.remove(&id) {
                        self.release(&id, entry);
                    }
                }
            }
            if held.entries.len() >= self.inner.limit {
                warn!(%identity, limit = self.inner.limit, "too many identities held; certificate refused");
                return refused(ManagerError::TooMany {
                    identity: identity.clone(),
                    limit: self.inner.limit,
                });
            }
        }
        let (tx, rx) = watch::channel(State::Pending);
        let worker = Worker {
            identity: identity.clone(),
            source: self.inner.source.clone(),
            metrics: self.inner.metrics.clone(),
            tx,
            changed: self.inner.changed.clone(),
        };
        let handle = tokio::spawn(worker.run()).abort_handle();
        held.entries.insert(identity.clone(), Entry { state: rx.clone(), worker: handle });
        rx
    }
}

/// Fetches and rotates one identity's certificate for as long as it is held.
struct Worker {
    identity: Identity,
    source: CaSource,
    metrics: CertMetrics,
    tx: watch::Sender<State>,
    changed: Arc<watch::Sender<u64>>,
}

/// The certificate a worker has published, and when (on the monotonic clock) it expires.
#[derive(Clone)]
struct Held {
    cert: Arc<WorkloadCertificate>,
    expires: tokio::time::Instant,
}

/// A worker's retry state.
struct Retry {
    /// After the CA (or files) failed to answer with a certificate.
    errors: Backoff,
    /// After a certificate that is unusable or too short-lived; floored at [`MIN_REFRESH`].
    lifetime: Backoff,
}

impl Worker {
    async fn run(self) {
        let mut retry = Retry {
            errors: Backoff::new(RETRY_INITIAL, RETRY_MAX),
            lifetime: Backoff::new(UNUSABLE_RETRY_INITIAL, RETRY_MAX),
        };
        let mut held: Option<Held> = None;
        loop {
            let (delay, issued) = match self.source.fetch(&self.identity).await {
                Ok(cert) => match cert.check_usable(SystemTime::now()) {
                    Ok(()) => (self.accept(cert, &mut held, &mut retry), true),
                    Err(problem) => (self.reject(problem, &held, &mut retry), false),
                },
                Err(e) => {
                    self.count_fetch("error");
                    let delay = retry.errors.next_delay();
                    warn!(identity = %self.identity, source = self.source.name(), error = %e, retry_in = ?delay, "certificate fetch failed");
                    self.fail(e, &held);
                    (delay, false)
                }
            };
            self.wait(delay, issued, &mut held).await;
        }
    }

    /// A usable certificate: publish it; rotate at about half life, or, when that comes too
    /// soon, after the backoff floored at [`MIN_REFRESH`].
    fn accept(&self, cert: WorkloadCertificate, held: &mut Option<Held>, retry: &mut Retry) -> Duration {
        retry.errors.reset();
        self.count_fetch("success");
        let not_after = cert.not_after.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        self.metrics
            .expiry
            .get_or_create(&IdentityLabels { identity: self.identity.to_string() })
            .set(not_after as i64);
        let cert = Arc::new(cert);
        let rotate = rotation_delay(&cert);
        let delay = if rotate >= MIN_REFRESH {
            retry.lifetime.reset();
            info!(identity = %self.identity, source = self.source.name(), not_after, rotate_in = ?rotate, "certificate issued");
            rotate
        } else {
            self.count_unusable("short_lived");
            let delay = retry.lifetime.next_delay().max(MIN_REFRESH);
            warn!(identity = %self.identity, source = self.source.name(), not_after, lifetime = ?cert.lifetime(), refresh_in = ?delay,
                "certificate too short-lived to rotate at half life; used while valid, refreshed with backoff");
            delay
        };
        *held = Some(Held { cert: cert.clone(), expires: tokio::time::Instant::now() + cert.remaining() });
        self.publish(State::Ready(cert));
        delay
    }

    /// A certificate that cannot be presented: count it, keep the identity missing (or on its
    /// still-valid certificate), and ask again after the backoff floored at [`MIN_REFRESH`].
    fn reject(&self, problem: Unusable, held: &Option<Held>, retry: &mut Retry) -> Duration {
        retry.errors.reset();
        self.count_fetch("error");
        self.count_unusable(problem.reason());
        let delay = retry.lifetime.next_delay().max(MIN_REFRESH);
        warn!(identity = %self.identity, source = self.source.name(), %problem, retry_in = ?delay, "unusable certificate from the CA; not used");
        self.fail(ManagerError::Unusable { identity: self.identity.clone(), problem }, held);
        delay
    }

    /// Publishes a failure, unless a certificate is held (it is dropped when it expires): that
    /// one stays in use until it is replaced or expires.
    fn fail(&self, e: ManagerError, held: &Option<Held>) {
        if held.is_none() {
            self.publish(State::Failed(e));
        }
    }

    fn publish(&self, state: State) {
        self.tx.send_replace(state);
        self.changed.send_modify(|n| *n += 1);
    }

    fn count_fetch(&self, outcome: &'static str) {
        self.metrics.fetches.get_or_create(&OutcomeLabels { source: self.source.name(), outcome }).inc();
    }

    fn count_unusable(&self, reason: &'static str) {
        self.metrics.unusable.get_or_create(&ReasonLabels { source: self.source.name(), reason }).inc();
    }

    /// Waits `delay` before the next fetch (for files after a load: until they change), and
    /// stops presenting the held certificate if it expires meanwhile.
    async fn wait(&self, delay: Duration, issued: bool, held: &mut Option<Held>) {
        let refresh = self.wait_before_refresh(delay, issued);
        tokio::pin!(refresh);
        if let Some(Held { cert, expires }) = held.clone() {
            tokio::select! {
                _ = &mut refresh => return,
                _ = tokio::time::sleep_until(expires) => {
                    let problem = Unusable::Expired {
                        not_after: cert.not_after.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs(),
                    };
                    warn!(identity = %self.identity, %problem, "certificate expired before it was replaced; no longer used");
                    *held = None;
                    self.publish(State::Failed(ManagerError::Unusable { identity: self.identity.clone(), problem }));
                }
            }
        }
        refresh.await;
    }

    /// For a CA (or after a failure), sleep `delay`; for files that just loaded, until they change.
    async fn wait_before_refresh(&self, delay: Duration, issued: bool) {
        let (CaSource::Files(files), true) = (&self.source, issued) else {
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
    /// Files placed in this directory by something else (a VM's provisioning): Istio's names,
    /// `cert-chain.pem`, `key.pem` and `root-cert.pem`, reloaded when they change. They prove
    /// one identity.
    Files { dir: std::path::PathBuf },
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
            CaConfig::Files { dir } => CaSource::Files(CertificateFiles::in_dir(dir)),
        })
    }
}

#[cfg(test)]
mod tests;
