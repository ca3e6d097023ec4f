//! The enrollment server's metrics (`istio_cni_*`): every answer by command and result, every
//! refusal by reason, the pods announced now, the watch's errors and dropped objects, and what
//! a restart held again (and an announced pods' file it did not trust).
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecoveryLabels {
    /// `file` (the announced pods' file) or `watch` (captured pods the watch shows in the mesh).
    source: &'static str,
    /// `announced`, `already_held`, `interface_gone` or `failed`.
    result: &'static str,
}

#[derive(Clone, Debug, Default)]
pub struct CniMetrics {
    results: Family<ResultLabels, Counter>,
    refusals: Family<RefusalLabels, Counter>,
    announced: Gauge,
    watch_errors: Family<KindLabels, Counter>,
    dropped: Family<KindLabels, Counter>,
    recovered: Family<RecoveryLabels, Counter>,
    file_rejected: Counter,
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
        r.register(
            "recovered_pods",
            "Pods considered for holding again after a restart, by source and result",
            m.recovered.clone(),
        );
        r.register(
            "announced_file_rejected",
            "Announced pods' files of a previous ztunnel not trusted (malformed, too large, writable by \
             others) and ignored",
            m.file_rejected.clone(),
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

    pub fn recovered(&self, source: &'static str, result: &'static str) {
        self.recovered.get_or_create(&RecoveryLabels { source, result }).inc();
    }

    pub fn file_rejected(&self) {
        self.file_rejected.inc();
    }
}
