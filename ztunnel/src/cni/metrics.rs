//! The enrollment server's metrics (`istio_cni_*`): every answer by command and result, every
//! refusal by reason, the pods announced now, and the watch's errors and dropped objects.
//! Labels are small fixed sets (no pod names or addresses).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    /// `add`, `del` or `check`.
    command: &'static str,
    /// `enrolled`, `not_enrolled`, `unenrolled` or `refused`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    command: &'static str,
    /// `pod_unknown`, `namespace_unknown`, `bad_request`, `no_interface`, `enroll_failed`,
    /// `full`, `shutting_down`, `check_mismatch`, `busy`.
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    /// `pods` or `namespaces`.
    kind: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct CniMetrics {
    results: Family<ResultLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    announced: Gauge,
    watch_errors: Family<KindLabels, Counter>,
    dropped: Family<KindLabels, Counter>,
}

impl CniMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("cni");
        r.register(
            "enrollments",
            "Requests of the CNI plugin answered, by command and result",
            m.results.clone(),
        );
        r.register(
            "refusals",
            "CNI requests refused (the pod does not start until the runtime retries), by command and reason",
            m.refusals.clone(),
        );
        r.register(
            "announced_pods",
            "Pods enrolled at creation through the CNI plugin and not yet withdrawn",
            m.announced.clone(),
        );
        r.register(
            "watch_errors",
            "Errors of the Kubernetes watch (retried), by kind",
            m.watch_errors.clone(),
        );
        r.register(
            "watch_dropped",
            "Watched objects not kept because the cache was at its bound, by kind",
            m.dropped.clone(),
        );
        m
    }

    pub fn result(&self, command: &'static str, result: &'static str) {
        self.results.get_or_create(&ResultLabels { command, result }).inc();
    }

    pub fn refused(&self, command: &'static str, reason: &'static str) {
        self.result(command, "refused");
        self.refusals.get_or_create(&RefusalLabels { command, reason }).inc();
    }

    pub fn announced(&self, n: usize) {
        self.announced.set(n as i64);
    }

    pub fn watch_error(&self, kind: &'static str) {
        self.watch_errors.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn dropped(&self, kind: &'static str) {
        self.dropped.get_or_create(&KindLabels { kind }).inc();
    }
}
