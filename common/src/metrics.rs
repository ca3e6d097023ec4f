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

/// A frozen registry shared with the metrics endpoint.
pub type SharedRegistry = Arc<Registry>;
