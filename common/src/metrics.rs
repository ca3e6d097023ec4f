//! The Prometheus registry both binaries expose, with Istio's `istio_` prefix.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Prefix of every metric we export (Istio's, so existing dashboards keep working).
pub const PREFIX: &str = "istio";

/// Creates the process registry; components register in `sub_registry()`.
pub fn new_registry() -> Registry {
    Registry::with_prefix(PREFIX)
}

/// Renders a registry in Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = encode(&mut out, registry) {
        tracing::error!(error = %e, "failed to encode metrics");
    }
    out
}

/// Registers `istio_build{component, tag} 1`, and `istio_log_lines_dropped_total` (every
/// binary logs through `telemetry`).
pub fn register_build_info(registry: &mut Registry, component: &str) {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    let build: Family<Vec<(String, String)>, Gauge> = Family::default();
    build
        .get_or_create(&vec![
            ("component".to_string(), component.to_string()),
            ("tag".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ])
        .set(1);
    registry.register("build", "Build information", build);
    registry.register(
        "log_lines_dropped",
        "Log lines dropped because the log output fell behind (the proxy never waits on it)",
        crate::telemetry::dropped_lines(),
    );
}

/// The metric handles of label sets, found with one hash of the labels instead of one lookup
/// per metric family (label sets of 20-odd strings are dear to hash). Bounded: past `capacity`
/// label sets it starts afresh; the metrics themselves stay in their families. Clones share it.
#[derive(Debug)]
pub struct HandleCache<L, H> {
    map: Arc<std::sync::RwLock<std::collections::HashMap<L, H, foldhash::fast::RandomState>>>,
    capacity: usize,
}

impl<L, H> Clone for HandleCache<L, H> {
    fn clone(&self) -> Self {
        Self { map: self.map.clone(), capacity: self.capacity }
    }
}

impl<L, H> Default for HandleCache<L, H> {
    fn default() -> Self {
        Self { map: Arc::default(), capacity: HANDLE_CACHE }
    }
}

impl<L: std::hash::Hash + Eq, H: Clone> HandleCache<L, H> {
    pub fn new(capacity: usize) -> Self {
        Self { map: Arc::default(), capacity }
    }

    /// The handles of `labels`, made by `make` (from the families) the first time.
    pub fn get(&self, labels: L, make: impl FnOnce(&L) -> H) -> H {
        if let Ok(map) = self.map.read()
            && let Some(h) = map.get(&labels)
        {
            return h.clone();
        }
        let h = make(&labels);
        if let Ok(mut map) = self.map.write() {
            if map.len() >= self.capacity {
                map.clear();
            }
            map.insert(labels, h.clone());
        }
        h
    }
}

/// Label sets a [`HandleCache`] of the proxies keeps.
pub const HANDLE_CACHE: usize = 4096;

/// A frozen registry shared with the metrics endpoint.
pub type SharedRegistry = Arc<Registry>;

/// Istio's standard traffic labels (shared/spec/telemetry.md), shared by ztunnel's TCP metrics
/// and the waypoint's request metrics (which add their own on top with `flatten`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// Istio's word for a label value nobody knows.
pub const UNKNOWN: &str = "unknown";

fn or_unknown(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty()).unwrap_or(UNKNOWN).to_string()
}

/// Who is talking to whom, held: the key a [`HandleCache`] finds a connection's or request's
/// metrics by. Workloads and services compare by identity (the same `Arc`, which the key holds
/// so that no other value can take its address while the key lives), so a lookup hashes a few
/// pointers instead of the 20-odd label strings, which are built only the first time a key is
/// seen. A workload changed by a push is a new `Arc`, hence a new key with fresh labels.
#[derive(Clone, Debug, Default)]
pub struct PartiesKey {
    pub source: Option<Arc<crate::state::Workload>>,
    pub source_identity: Option<crate::identity::Identity>,
    pub destination: Option<Arc<crate::state::Workload>>,
    pub destination_identity: Option<crate::identity::Identity>,
    pub service: Option<Arc<crate::state::Service>>,
}

fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fn address<T>(a: &Option<Arc<T>>) -> usize {
    a.as_ref().map_or(0, |a| Arc::as_ptr(a) as *const () as usize)
}

impl PartialEq for PartiesKey {
    fn eq(&self, o: &Self) -> bool {
        same(&self.source, &o.source)
            && same(&self.destination, &o.destination)
            && same(&self.service, &o.service)
            && self.source_identity == o.source_identity
            && self.destination_identity == o.destination_identity
    }
}

impl Eq for PartiesKey {}

impl std::hash::Hash for PartiesKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (address(&self.source), address(&self.destination), address(&self.service)).hash(h);
        self.source_identity.hash(h);
        self.destination_identity.hash(h);
    }
}

impl PartiesKey {
    /// The parties, borrowed, for [`TrafficLabels::new`].
    pub fn parties(&self) -> Parties<'_> {
        Parties {
            source: self.source.as_deref(),
            source_identity: self.source_identity.as_ref(),
            destination: self.destination.as_deref(),
            destination_identity: self.destination_identity.as_ref(),
            service: self.service.as_deref(),
        }
    }
}

/// Who is talking to whom, as the labels need it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Parties<'a> {
    pub source: Option<&'a crate::state::Workload>,
    pub source_identity: Option<&'a crate::identity::Identity>,
    pub destination: Option<&'a crate::state::Workload>,
    pub destination_identity: Option<&'a crate::identity::Identity>,
    pub service: Option<&'a crate::state::Service>,
}

impl TrafficLabels {
    pub fn new(
        reporter: &'static str,
        p: Parties<'_>,
        request_protocol: &'static str,
        response_flags: &'static str,
        mtls: bool,
    ) -> Self {
        let (s, d, svc) = (p.source, p.destination, p.service);
        let principal =
            |id: Option<&crate::identity::Identity>| or_unknown(id.map(ToString::to_string).as_deref());
        Self {
            reporter,
            source_workload: or_unknown(s.map(|w| w.workload_name.as_str())),
            source_canonical_service: or_unknown(s.map(|w| w.canonical_name.as_str())),
            source_canonical_revision: or_unknown(s.map(|w| w.canonical_revision.as_str())),
            source_workload_namespace: or_unknown(
                s.map(|w| w.namespace.as_str())
                    .or(p.source_identity.map(crate::identity::Identity::namespace)),
            ),
            source_principal: principal(p.source_identity),
            source_app: or_unknown(s.map(|w| w.canonical_name.as_str())),
            source_version: or_unknown(s.map(|w| w.canonical_revision.as_str())),
            source_cluster: or_unknown(s.map(|w| w.cluster_id.as_str())),
            destination_service: or_unknown(svc.map(|s| s.hostname.as_str())),
            destination_service_namespace: or_unknown(svc.map(|s| s.namespace.as_str())),
            destination_service_name: or_unknown(svc.map(|s| s.name.as_str())),
            destination_workload: or_unknown(d.map(|w| w.workload_name.as_str())),
            destination_canonical_service: or_unknown(d.map(|w| w.canonical_name.as_str())),
            destination_canonical_revision: or_unknown(d.map(|w| w.canonical_revision.as_str())),
            destination_workload_namespace: or_unknown(d.map(|w| w.namespace.as_str())),
            destination_principal: principal(p.destination_identity),
            destination_app: or_unknown(d.map(|w| w.canonical_name.as_str())),
            destination_version: or_unknown(d.map(|w| w.canonical_revision.as_str())),
            destination_cluster: or_unknown(d.map(|w| w.cluster_id.as_str())),
            request_protocol,
            response_flags,
            connection_security_policy: if mtls { "mutual_tls" } else { UNKNOWN },
        }
    }
}
