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

use crate::convert::duration_from_proto;
use rand::Rng;

/// Bodies up to this size are buffered so that a request can be tried again.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// Retries allowed at once: this share of the requests in flight...
const BUDGET_PERCENT: usize = 20;
/// ...but never fewer than this.
const BUDGET_MIN: usize = 3;
/// The longest wait between tries, as a multiple of the base backoff (Envoy's `max_interval`
/// default).
const MAX_BACKOFF_FACTOR: u32 = 10;
/// Doublings of the backoff before the cap applies anyway (keeps the shift in range).
const MAX_BACKOFF_DOUBLINGS: u32 = 8;

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
        Ok(Self {
            attempts: r.attempts,
            per_try_timeout: r
                .per_try_timeout
                .map(|d| duration_from_proto(d, "perTryTimeout"))
                .transpose()?,
            on,
            backoff: r
                .backoff
                .map(|d| duration_from_proto(d, "backoff"))
                .transpose()?
                .unwrap_or(DEFAULT_BACKOFF),
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

    /// The wait before try `n` (1-based retry number): exponential, jittered (half to all of
    /// it), capped at 10x the base. Saturates instead of overflowing for any `n` and base.
    pub fn backoff(&self, n: u32) -> Duration {
        let cap = self.backoff.saturating_mul(MAX_BACKOFF_FACTOR);
        let exp = self.backoff.saturating_mul(1 << n.min(MAX_BACKOFF_DOUBLINGS)).min(cap);
        // Integer nanoseconds: float scaling of a huge duration can round past `Duration::MAX`.
        let nanos = exp.as_nanos();
        let jittered = rand::rng().random_range(nanos / 2..=nanos);
        // At most `exp`, so the seconds fit.
        Duration::new((jittered / 1_000_000_000) as u64, (jittered % 1_000_000_000) as u32)
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
    use crate::convert::MAX_PROTO_DURATION_SECONDS;

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
    fn backoff_saturates_for_any_base_and_try() {
        let with = |backoff| RetryPolicy { backoff, ..RetryPolicy::once() };
        for base in
            [Duration::MAX, Duration::from_secs(u64::MAX / 3), Duration::from_nanos(1), Duration::ZERO]
        {
            for n in [0, 1, 8, 9, 31, 32, 64, u32::MAX] {
                let b = with(base).backoff(n);
                assert!(
                    b <= base.saturating_mul(10)
                        && b >= base.saturating_mul(1 << n.min(8)).min(base.saturating_mul(10)) / 2,
                    "{base:?} {n}: {b:?}"
                );
            }
        }
        let p = with(Duration::from_millis(100));
        assert!(p.backoff(u32::MAX) <= Duration::from_secs(1), "capped at 10x");
        assert!(p.backoff(u32::MAX) >= Duration::from_millis(500));
    }

    #[test]
    fn hostile_proto_durations_are_refused_not_a_panic() {
        let retry = |seconds: i64, nanos: i32| wp::Retry {
            attempts: 1,
            per_try_timeout: Some(prost_types::Duration { seconds, nanos }),
            retry_on: vec![],
            backoff: Some(prost_types::Duration { seconds, nanos }),
        };
        for (s, n) in
            [(i64::MIN, 0), (i64::MIN, -999_999_999), (-1, 0), (0, -1), (i64::MAX, 0), (i64::MAX, i32::MAX)]
        {
            assert!(RetryPolicy::from_proto(&retry(s, n)).is_err(), "{s}s {n}ns");
        }
        let p = RetryPolicy::from_proto(&retry(1, 1_500_000_000)).expect("normalized");
        assert_eq!(p.backoff, Duration::from_millis(2500));
        assert_eq!(
            duration_from_proto(prost_types::Duration { seconds: MAX_PROTO_DURATION_SECONDS, nanos: 0 }, "x"),
            Ok(Duration::from_secs(MAX_PROTO_DURATION_SECONDS as u64))
        );
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
