//! xDS client metrics: connection state, pushes received, NACKs sent, per type URL.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    pub url: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Metrics of one xDS source (the ADS client or the local file).
#[derive(Clone, Debug, Default)]
pub struct XdsMetrics {
    /// 1 while a stream to the control plane is up.
    pub connection_state: Gauge,
    /// Stream attempts, by outcome.
    pub connection_terminations: Family<ReasonLabels, Counter>,
    /// Responses (pushes) received per type URL.
    pub messages: Family<TypeLabels, Counter>,
    /// Resources received per type URL (updates and removals).
    pub resources: Family<TypeLabels, Counter>,
    /// NACKs sent per type URL (for the file source: rejected reloads).
    pub nacks: Family<TypeLabels, Counter>,
    /// Individual resources rejected per type URL.
    pub rejected_resources: Family<TypeLabels, Counter>,
    /// Config objects (local files) refused, by kind (empty: a document with no kind).
    pub rejected_objects: Family<KindLabels, Counter>,
}

impl XdsMetrics {
    /// Registers under `istio_xds_*` (the registry carries the `istio` prefix).
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("xds");
        r.register("connection_state", "1 while connected to the xDS server", m.connection_state.clone());
        r.register(
            "connection_terminations",
            "xDS streams that ended, by reason",
            m.connection_terminations.clone(),
        );
        r.register("message", "xDS responses received, by type URL", m.messages.clone());
        r.register(
            "resources",
            "xDS resources received (updates and removals), by type URL",
            m.resources.clone(),
        );
        r.register("nack", "xDS NACKs sent, by type URL", m.nacks.clone());
        r.register(
            "rejected_resources",
            "xDS resources rejected (not applied), by type URL",
            m.rejected_resources.clone(),
        );
        r.register(
            "rejected_config_objects",
            "config objects refused (the last accepted version stays in force), by kind",
            m.rejected_objects.clone(),
        );
        m
    }

    pub(crate) fn type_label(url: &str) -> TypeLabels {
        TypeLabels { url: url.to_string() }
    }

    pub(crate) fn kind_label(kind: &str) -> KindLabels {
        KindLabels { kind: kind.to_string() }
    }
}
