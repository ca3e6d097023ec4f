//! DestinationRule-style protection of a backend service: a cap on requests in flight with a
//! bounded wait (overflow answers 503 `UO`), and outlier detection that ejects an endpoint after
//! consecutive errors for a growing ejection time, never more than a share of the endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::waypoint as wp;
use tokio::sync::Semaphore;

const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

#[derive(Debug)]
pub struct Limit {
    slots: Arc<Semaphore>,
    max_pending: usize,
    pending: AtomicUsize,
}

/// Holds a slot of the service's request cap.
pub struct Slot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Limit {
    /// A slot, waiting when all are taken and fewer than `max_pending` already wait; `None`
    /// is an overflow.
    pub async fn acquire(&self) -> Option<Slot> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(Slot(p));
        }
        let waiting = self.pending.fetch_add(1, Ordering::AcqRel);
        let slot = if waiting < self.max_pending {
            self.slots.clone().acquire_owned().await.ok().map(Slot)
        } else {
            None
        };
        self.pending.fetch_sub(1, Ordering::AcqRel);
        slot
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Debug, Default)]
pub struct TrafficPolicy {
    pub limit: Option<Limit>,
    pub outlier: Option<Outlier>,
    /// Requests per upstream connection before a new one is opened.
    pub max_requests_per_connection: Option<u32>,
}

impl TrafficPolicy {
    pub fn from_proto(t: &wp::TrafficPolicy) -> Result<Self, String> {
        let limit = t.connection_pool.as_ref().filter(|c| c.max_requests > 0).map(|c| Limit {
            slots: Arc::new(Semaphore::new(c.max_requests as usize)),
            max_pending: c.max_pending_requests as usize,
            pending: AtomicUsize::new(0),
        });
        let outlier = match &t.outlier_detection {
            None => None,
            Some(o) => {
                if o.consecutive_5xx_errors == 0 && o.consecutive_gateway_errors == 0 {
                    return Err(
                        "outlier detection needs consecutive5xxErrors or consecutiveGatewayErrors".into()
                    );
                }
                if o.max_ejection_percent > 100 {
                    return Err(format!("maxEjectionPercent {} is above 100", o.max_ejection_percent));
                }
                let base = o
                    .base_ejection_time
                    .map(|d| Duration::try_from(d).map_err(|_| "negative ejection time".to_string()))
                    .transpose()?
                    .unwrap_or(DEFAULT_BASE_EJECTION);
                Some(Outlier {
                    consecutive_5xx: o.consecutive_5xx_errors,
                    consecutive_gateway: o.consecutive_gateway_errors,
                    base_ejection: base,
                    max_ejection_percent: if o.max_ejection_percent == 0 {
                        DEFAULT_MAX_EJECTION_PERCENT
                    } else {
                        o.max_ejection_percent
                    },
                })
            }
        };
        let max_requests_per_connection =
            t.connection_pool.as_ref().map(|c| c.max_requests_per_connection).filter(|n| *n > 0);
        Ok(Self { limit, outlier, max_requests_per_connection })
    }
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

/// Outlier state of every endpoint of every service (an endpoint ejected for one service still
/// serves the others), kept across config updates.
#[derive(Debug, Default)]
pub struct Ejections {
    by_endpoint: Mutex<HashMap<(String, SocketAddr), Health>>,
}

/// How a try ended, for outlier detection.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    Status(u16),
    ConnectFailure,
}

impl Ejections {
    /// Whether `addr` is ejected from `service` now.
    pub fn is_ejected(&self, service: &str, addr: SocketAddr) -> bool {
        let map = self.by_endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(service.to_string(), addr))
            .and_then(|h| h.ejected_until)
            .is_some_and(|t| t > Instant::now())
    }

    /// Records how a request to `addr` ended; ejects it when it reaches a threshold and fewer
    /// than `max_ejection_percent` of `endpoints` are ejected already.
    pub fn report(
        &self,
        service: &str,
        addr: SocketAddr,
        outcome: Outcome,
        cfg: &Outlier,
        endpoints: &[SocketAddr],
    ) {
        let mut map = self.by_endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let ejected_now = endpoints
            .iter()
            .filter(|e| {
                map.get(&(service.to_string(), **e)).and_then(|h| h.ejected_until).is_some_and(|t| t > now)
            })
            .count();
        let h = map.entry((service.to_string(), addr)).or_default();
        let (server_error, gateway_error) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::ConnectFailure => (true, true),
        };
        h.consecutive_5xx = if server_error { h.consecutive_5xx + 1 } else { 0 };
        h.consecutive_gateway = if gateway_error { h.consecutive_gateway + 1 } else { 0 };
        let tripped = (cfg.consecutive_5xx > 0 && h.consecutive_5xx >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && h.consecutive_gateway >= cfg.consecutive_gateway);
        let room = ((ejected_now + 1) * 100) <= endpoints.len() * cfg.max_ejection_percent as usize;
        if tripped && room && h.ejected_until.is_none_or(|t| t <= now) {
            h.ejections += 1;
            h.ejected_until = Some(now + cfg.base_ejection * h.ejections);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            tracing::warn!(%service, endpoint = %addr, ejections = h.ejections, "outlier detection ejected an endpoint");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max_percent: u32) -> Outlier {
        Outlier {
            consecutive_5xx: 2,
            consecutive_gateway: 0,
            base_ejection: Duration::from_millis(100),
            max_ejection_percent: max_percent,
        }
    }

    #[test]
    fn consecutive_errors_eject_for_a_while_within_the_cap() {
        let e = Ejections::default();
        let (a, b): (SocketAddr, SocketAddr) =
            ("10.0.0.1:80".parse().expect("a"), "10.0.0.2:80".parse().expect("b"));
        let all = [a, b];
        e.report("s", a, Outcome::Status(500), &cfg(50), &all);
        e.report("s", a, Outcome::Status(200), &cfg(50), &all);
        e.report("s", a, Outcome::Status(500), &cfg(50), &all);
        assert!(!e.is_ejected("s", a), "a success resets the count");
        e.report("s", a, Outcome::Status(503), &cfg(50), &all);
        assert!(e.is_ejected("s", a));
        // The cap: with half already out, b stays in.
        e.report("s", b, Outcome::ConnectFailure, &cfg(50), &all);
        e.report("s", b, Outcome::ConnectFailure, &cfg(50), &all);
        assert!(!e.is_ejected("s", b), "max ejection percent");
        std::thread::sleep(Duration::from_millis(150));
        assert!(!e.is_ejected("s", a), "back after the ejection time");
    }

    #[tokio::test]
    async fn the_request_cap_overflows_beyond_its_waiting_room() {
        let limit =
            Limit { slots: Arc::new(Semaphore::new(1)), max_pending: 0, pending: AtomicUsize::new(0) };
        let held = limit.acquire().await.expect("first");
        assert!(limit.acquire().await.is_none(), "no waiting room: overflow");
        drop(held);
        assert!(limit.acquire().await.is_some());
    }
}
