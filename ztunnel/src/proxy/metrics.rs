//! Istio's TCP metrics with Istio's labels, and the per-connection record that feeds them and
//! writes the access log line when the connection ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use common::copy::ByteCounters;
use common::identity::Identity;
use common::metrics::{HandleCache, PartiesKey};
use common::telemetry::LogAddr;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use common::rbac::Verdict;
use common::state::{Service, Workload};

pub use common::metrics::TrafficLabels as TcpLabels;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    direction: &'static str,
    decision: &'static str,
    /// Why: `allowed`, `denied_by_policy`, `no_allow_match` or `policy_missing`.
    reason: &'static str,
    /// The deciding DENY policy or the missing one, or `-`.
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// ztunnel's traffic metrics.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    passthrough: Family<OutcomeLabels, Counter>,
    accepting: Family<ListenerLabels, Gauge>,
    /// Inbound HBONE connections and CONNECTs that failed before a decision.
    pub inbound_failures: common::hbone::server::InboundFailures,
    next_id: Arc<AtomicU64>,
    /// An open connection's counters, found by hashing a few pointers (see [`PartiesKey`]);
    /// its 23 labels are built once per key.
    by_key: HandleCache<TcpKey, Arc<ConnCounters>>,
}

/// What a connection's labels are made from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TcpKey {
    parties: PartiesKey,
    reporter: &'static str,
    flags: &'static str,
    mtls: bool,
}

impl TcpKey {
    fn labels(&self) -> TcpLabels {
        TcpLabels::new(self.reporter, self.parties.parties(), "tcp", self.flags, self.mtls)
    }
}

/// The opened, received, sent and closed counters of one label set (clones of the families'
/// entries).
#[derive(Debug)]
struct ConnCounters {
    opened: Counter,
    received: Counter,
    sent: Counter,
    closed: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            inbound_failures: common::hbone::server::InboundFailures::register(registry),
            ..Self::default()
        };
        registry.register("tcp_connections_opened", "TCP connections opened", m.opened.clone());
        registry.register("tcp_connections_closed", "TCP connections closed", m.closed.clone());
        registry.register(
            "tcp_connections_failed",
            "TCP connections that could not be established or were refused",
            m.failed.clone(),
        );
        registry.register("tcp_received_bytes", "Bytes received from the client", m.received.clone());
        registry.register("tcp_sent_bytes", "Bytes sent to the client", m.sent.clone());
        registry.register(
            "authorization_decisions",
            "L4 authorization decisions, by direction, reason and deciding (DENY or missing) policy",
            m.decisions.clone(),
        );
        registry.register(
            "outbound_passthrough_connections",
            "Outbound connections to destinations outside the registry: passed through or refused",
            m.passthrough.clone(),
        );
        registry.register(
            "proxy_listeners_accepting",
            "1 once a proxy listener accepts connections (after the first sync of Address and Authorization), by listener",
            m.accepting.clone(),
        );
        m
    }

    fn counters(&self, key: TcpKey) -> Arc<ConnCounters> {
        self.by_key.get(key, |key| {
            let labels = key.labels();
            Arc::new(ConnCounters {
                opened: self.opened.get_or_create(&labels).clone(),
                received: self.received.get_or_create(&labels).clone(),
                sent: self.sent.get_or_create(&labels).clone(),
                closed: self.closed.get_or_create(&labels).clone(),
            })
        })
    }

    pub fn decision(&self, direction: &'static str, verdict: &Verdict) {
        let policy = verdict.policy().unwrap_or("-").to_string();
        let labels = DecisionLabels { direction, decision: verdict.label(), reason: verdict.cause(), policy };
        self.decisions.get_or_create(&labels).inc();
    }

    /// `listener` accepts connections from now on.
    pub fn accepting(&self, listener: &'static str) {
        self.accepting.get_or_create(&ListenerLabels { listener }).set(1);
    }

    pub fn passthrough(&self, outcome: &'static str) {
        self.passthrough.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// Who reports: the client's ztunnel or the server's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

/// One side of a connection as telemetry knows it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub workload: Option<Arc<Workload>>,
    pub identity: Option<Identity>,
}

impl Peer {
    pub fn of(w: &Arc<Workload>) -> Self {
        Self { workload: Some(w.clone()), identity: Some(w.identity.clone()) }
    }
}

/// A value, or `-` for none, as the access log shows it (written straight into the line).
struct OrDash<'a, T>(Option<&'a T>);

impl<T: std::fmt::Display> std::fmt::Display for OrDash<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Why a connection failed, and its Envoy-style response flag.
#[derive(Clone, Debug)]
pub struct Failure {
    pub reason: String,
    pub flags: &'static str,
}

/// One proxied connection, from accept to close.
pub struct Record {
    metrics: Metrics,
    id: u64,
    start: Instant,
    reporter: Reporter,
    direction: &'static str,
    pub src_addr: SocketAddr,
    pub dst_addr: SocketAddr,
    pub src: Peer,
    pub dst: Peer,
    pub service: Option<Arc<Service>>,
    /// Where bytes actually went (an HBONE peer, a pod, a passthrough address).
    pub upstream: Option<SocketAddr>,
    pub mtls: bool,
    opened: bool,
    /// The counters of this connection's labels, looked up once when it opened (the labels
    /// are 23 strings: building and hashing them for each counter, twice per connection, was
    /// a tenth of its cost).
    counters: Option<Arc<ConnCounters>>,
}

impl Record {
    pub fn new(
        metrics: &Metrics,
        reporter: Reporter,
        direction: &'static str,
        src_addr: SocketAddr,
        dst_addr: SocketAddr,
    ) -> Self {
        Self {
            id: metrics.next_id.fetch_add(1, Ordering::Relaxed),
            metrics: metrics.clone(),
            start: Instant::now(),
            reporter,
            direction,
            src_addr,
            dst_addr,
            src: Peer::default(),
            dst: Peer::default(),
            service: None,
            upstream: None,
            mtls: false,
            opened: false,
            counters: None,
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn direction(&self) -> &'static str {
        self.direction
    }

    fn key(&self, flags: &'static str) -> TcpKey {
        let reporter = match self.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        };
        let parties = PartiesKey {
            source: self.src.workload.clone(),
            source_identity: self.src.identity.clone(),
            destination: self.dst.workload.clone(),
            destination_identity: self.dst.identity.clone(),
            service: self.service.clone(),
        };
        TcpKey { parties, reporter, flags, mtls: self.mtls }
    }

    /// The connection is established end to end.
    pub fn opened(&mut self) {
        self.opened = true;
        let counters = self.metrics.counters(self.key("-"));
        counters.opened.inc();
        self.counters = Some(counters);
    }

    /// The connection was refused or could not be established: counted and logged.
    pub fn failed(self, failure: Failure) {
        self.metrics.failed.get_or_create(&self.key(failure.flags).labels()).inc();
        self.log(0, 0, Some(&failure));
    }

    /// The connection ended after [`Record::opened`].
    pub fn closed(mut self, bytes: &ByteCounters, error: Option<String>) {
        let c = match self.counters.take() {
            Some(c) => c,
            None => self.metrics.counters(self.key("-")),
        };
        // Istio's view: "received" is what the client sent, "sent" what it got back.
        c.received.inc_by(bytes.sent());
        c.sent.inc_by(bytes.received());
        c.closed.inc();
        let failure = error.map(|reason| Failure { reason, flags: "-" });
        self.log(bytes.sent(), bytes.received(), failure.as_ref());
    }

    fn log(&self, sent: u64, received: u64, failure: Option<&Failure>) {
        let s = self.src.workload.as_deref();
        let d = self.dst.workload.as_deref();
        fn name(w: Option<&Workload>) -> &str {
            w.map_or("-", |w| w.name.as_str())
        }
        fn ns(w: Option<&Workload>) -> &str {
            w.map_or("-", |w| w.namespace.as_str())
        }
        fn id(p: &Peer) -> OrDash<'_, Identity> {
            OrDash(p.identity.as_ref())
        }
        let upstream = self.upstream.as_ref().map(LogAddr);
        let upstream = OrDash(upstream.as_ref());
        let service = self.service.as_ref().map_or("-", |s| s.hostname.as_str());
        let duration_ms = self.start.elapsed().as_millis() as u64;
        macro_rules! record {
            ($level:ident, $msg:literal, $($extra:tt)*) => {
                $level!(
                    target: "access",
                    conn = self.id,
                    direction = self.direction,
                    src.addr = %LogAddr(&self.src_addr),
                    src.workload = %name(s),
                    src.namespace = %ns(s),
                    src.identity = %id(&self.src),
                    dst.addr = %LogAddr(&self.dst_addr),
                    dst.upstream = %upstream,
                    dst.service = %service,
                    dst.workload = %name(d),
                    dst.namespace = %ns(d),
                    dst.identity = %id(&self.dst),
                    bytes_sent = sent,
                    bytes_recv = received,
                    duration_ms,
                    $($extra)*
                    $msg
                )
            };
        }
        match failure {
            None => record!(info, "connection complete",),
            Some(f) if self.opened => record!(info, "connection complete", error = %f.reason,),
            Some(f) => record!(warn, "connection refused", reason = %f.reason, response_flags = f.flags,),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(canonical_name: &str) -> Arc<Workload> {
        let w = proto::workload::Workload {
            uid: "u".into(),
            name: "client".into(),
            namespace: "demo".into(),
            canonical_name: canonical_name.into(),
            ..Default::default()
        };
        Arc::new(Workload::from_proto(&w).expect("converts"))
    }

    fn connection(metrics: &Metrics, source: &Arc<Workload>) {
        let addr: SocketAddr = "10.0.0.1:80".parse().expect("addr");
        let mut r = Record::new(metrics, Reporter::Source, "outbound", addr, addr);
        r.src = Peer::of(source);
        r.mtls = true;
        r.opened();
        r.closed(&ByteCounters::default(), None);
    }

    /// Counters are found by the workload's `Arc`, not its labels: the same workload counts
    /// into one series, and a workload a push replaced (equal name, new labels) into its own.
    #[test]
    fn connections_count_under_the_labels_of_the_workload_they_had() {
        let mut registry = common::metrics::new_registry();
        let metrics = Metrics::new(&mut registry);
        let v1 = workload("app-v1");
        connection(&metrics, &v1);
        connection(&metrics, &v1);
        connection(&metrics, &workload("app-v2"));
        let text = common::metrics::render(&registry);
        let opened = |app: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{")
                        && l.contains(&format!("source_canonical_service=\"{app}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_string())
        };
        assert_eq!(opened("app-v1").as_deref(), Some("2"), "{text}");
        assert_eq!(opened("app-v2").as_deref(), Some("1"), "{text}");
    }
}
