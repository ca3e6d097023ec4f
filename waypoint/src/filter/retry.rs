//! Retries with Istio semantics: which failures are retried (`retry_on`), how many times, a
//! per-try timeout, exponential backoff with jitter between tries, and a retry budget (at most
//! 20% of the requests in flight, and at least 3, may be retries at once). Counted like Envoy's
//! `upstream_rq_retry`, `_retry_success` and `_retry_overflow`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proto::waypoint as wp;
use rand::Rng;

/// Bodies up to this size are buffered so that a request can be tried again.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Retries allowed at once: this share of the requests in flight...
const BUDGET_PERCENT: usize = 20;
/// ...but never fewer than this.
const BUDGET_MIN: usize = 3;

/// What is retried.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RetryOn {
    pub server_errors: bool,
    pub gateway_errors: bool,
    pub connect_failure: bool,
    pub reset: bool,
    pub retriable_4xx: bool,
    pub codes: Vec<u16>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub backoff: Duration,
}

impl RetryPolicy {
    pub fn from_proto(r: &wp::Retry) -> Result<Self, String> {
        let mut on = RetryOn::default();
        for c in &r.retry_on {
            match c.as_str() {
                "5xx" => on.server_errors = true,
                "gateway-error" => on.gateway_errors = true,
                "connect-failure" => on.connect_failure = true,
                "refused-stream" | "reset" => on.reset = true,
                "retriable-4xx" => on.retriable_4xx = true,
                code => on.codes.push(code.parse().map_err(|_| format!("unknown retryOn {code:?}"))?),
            }
        }
        if r.retry_on.is_empty() {
            // Istio's default.
            on = RetryOn { gateway_errors: true, connect_failure: true, reset: true, ..Default::default() };
        }
        let duration = |d: Option<prost_types::Duration>| {
            d.map(|d| Duration::try_from(d).map_err(|_| "negative duration".to_string())).transpose()
        };
        Ok(Self {
            attempts: r.attempts,
            per_try_timeout: duration(r.per_try_timeout)?,
            on,
            backoff: duration(r.backoff)?.unwrap_or(DEFAULT_BACKOFF),
        })
    }

    /// A single try, nothing retried (for requests buffered for another reason).
    pub fn once() -> Self {
        Self { attempts: 0, per_try_timeout: None, on: RetryOn::default(), backoff: Duration::ZERO }
    }

    /// Whether a response with `status` is tried again.
    pub fn retries_status(&self, status: StatusCode) -> bool {
        let s = status.as_u16();
        (self.on.server_errors && status.is_server_error())
            || (self.on.gateway_errors && matches!(s, 502..=504))
            || (self.on.retriable_4xx && s == 409)
            || self.on.codes.contains(&s)
    }

    /// Whether a transport failure is tried again.
    pub fn retries_failure(&self) -> bool {
        self.on.connect_failure || self.on.reset || self.on.server_errors
    }

    /// The wait before try `n` (1-based retry number): exponential, jittered, capped at 10x.
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self.backoff.saturating_mul(1 << n.min(8)).min(self.backoff * 10);
        exp.mul_f64(rand::rng().random_range(0.5..1.0))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster_name: String,
}

/// Retry counters and the budget.
#[derive(Clone, Debug, Default)]
pub struct Retries {
    retry: Family<ClusterLabels, Counter>,
    success: Family<ClusterLabels, Counter>,
    overflow: Family<ClusterLabels, Counter>,
    in_flight: Arc<AtomicUsize>,
    retrying: Arc<AtomicUsize>,
}

/// Counts a request in flight for the budget while alive.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Retries {
    pub fn new(registry: &mut Registry) -> Self {
        let r = Self::default();
        registry.register("upstream_rq_retry", "Requests tried again", r.retry.clone());
        registry.register(
            "upstream_rq_retry_success",
            "Retried requests that then succeeded",
            r.success.clone(),
        );
        registry.register(
            "upstream_rq_retry_overflow",
            "Retries refused by the retry budget",
            r.overflow.clone(),
        );
        r
    }

    pub fn request(&self) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.in_flight.clone())
    }

    /// Takes a slot of the budget for one retry, or counts an overflow.
    pub fn begin(&self, cluster: &str) -> Option<InFlight> {
        let budget = (self.in_flight.load(Ordering::Relaxed) * BUDGET_PERCENT / 100).max(BUDGET_MIN);
        let taken = self
            .retrying
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < budget).then_some(n + 1));
        let labels = ClusterLabels { cluster_name: cluster.to_string() };
        if taken.is_err() {
            self.overflow.get_or_create(&labels).inc();
            return None;
        }
        self.retry.get_or_create(&labels).inc();
        Some(InFlight(self.retrying.clone()))
    }

    pub fn succeeded(&self, cluster: &str) {
        self.success.get_or_create(&ClusterLabels { cluster_name: cluster.to_string() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_on_and_backoff() {
        let r = |on: &[&str]| {
            RetryPolicy::from_proto(&wp::Retry {
                attempts: 2,
                per_try_timeout: None,
                retry_on: on.iter().map(|s| s.to_string()).collect(),
                backoff: None,
            })
        };
        let p = r(&["5xx"]).expect("policy");
        assert!(p.retries_status(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(!p.retries_status(StatusCode::NOT_FOUND));
        let gw = r(&["gateway-error", "429"]).expect("policy");
        assert!(
            gw.retries_status(StatusCode::BAD_GATEWAY)
                && !gw.retries_status(StatusCode::INTERNAL_SERVER_ERROR)
        );
        assert!(gw.retries_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(r(&["sometimes"]).is_err());
        for n in 1..6 {
            assert!(p.backoff(n) <= DEFAULT_BACKOFF * 10);
        }
    }

    #[test]
    fn the_budget_caps_concurrent_retries() {
        let retries = Retries::default();
        let _requests: Vec<InFlight> = (0..10).map(|_| retries.request()).collect();
        let held: Vec<_> = (0..5).filter_map(|_| retries.begin("c")).collect();
        assert_eq!(held.len(), 3, "20% of 10 is 2, but at least 3");
        drop(held);
        assert!(retries.begin("c").is_some(), "slots come back");
    }
}
