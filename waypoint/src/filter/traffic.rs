//! DestinationRule-style protection of a backend service: a cap on requests in flight with a
//! bounded wait (overflow answers 503 `UO`), and outlier detection that ejects an endpoint after
//! consecutive errors for a growing ejection time, never more than a share of the endpoints.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::state::Snapshot;
use proto::waypoint as wp;
use tokio::sync::Semaphore;

use crate::convert::duration_from_proto;

const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// The longest an ejection grows to, unless the base ejection time is longer (Envoy's
/// `max_ejection_time` default).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
/// Endpoints whose outlier state is kept at once (every service counted): a backstop for
/// [`Ejections::prune`]. Beyond it, endpoints that are not ejected are forgotten first; an
/// endpoint that still finds no room is not tracked (never ejected).
pub const MAX_OUTLIER_ENTRIES: usize = 65_536;

/// The configuration of a request cap, comparable across config pushes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LimitConfig {
    /// Requests in flight at once.
    pub max_requests: usize,
    /// Requests allowed to wait for a slot.
    pub max_pending: usize,
}

/// A cap on requests in flight. Its slots live as long as the `Limit`: a policy rebuilt with
/// the same [`LimitConfig`] must keep the old `Limit` (see [`TrafficPolicy::update`]) or the
/// requests in flight would no longer count.
#[derive(Debug)]
pub struct Limit {
    config: LimitConfig,
    slots: Arc<Semaphore>,
    pending: AtomicUsize,
}

/// Holds a slot of the service's request cap.
pub struct Slot(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl Limit {
    pub fn new(config: LimitConfig) -> Self {
        let permits = config.max_requests.min(Semaphore::MAX_PERMITS);
        Self { config, slots: Arc::new(Semaphore::new(permits)), pending: AtomicUsize::new(0) }
    }

    pub fn config(&self) -> LimitConfig {
        self.config
    }

    /// A slot, waiting when all are taken and fewer than `max_pending` already wait; `None`
    /// is an overflow.
    pub async fn acquire(&self) -> Option<Slot> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(Slot(p));
        }
        // Counted as waiting until this ends, also when the request is dropped while it waits
        // (a client that goes away must not keep a place in the waiting room).
        let waiting = Waiting::enter(&self.pending);
        if waiting.ahead >= self.config.max_pending {
            return None;
        }
        self.slots.clone().acquire_owned().await.ok().map(Slot)
    }
}

/// A place in a request cap's waiting room, left when dropped.
struct Waiting<'a> {
    pending: &'a AtomicUsize,
    /// How many were waiting before this one.
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn enter(pending: &'a AtomicUsize) -> Self {
        Self { pending, ahead: pending.fetch_add(1, Ordering::AcqRel) }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Outlier {
    /// How long the `ejections`-th ejection lasts: the base time that many times, at most
    /// [`MAX_EJECTION_TIME`] (or the base time if that is longer). Never overflows.
    pub fn ejection_time(&self, ejections: u32) -> Duration {
        self.base_ejection.saturating_mul(ejections.max(1)).min(self.base_ejection.max(MAX_EJECTION_TIME))
    }
}

/// What a [`TrafficPolicy`] is built from, comparable across config pushes: equal configs
/// mean the policy's runtime state (its request-cap slots) can be kept.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct TrafficConfig {
    pub limit: Option<LimitConfig>,
    pub outlier: Option<Outlier>,
    /// Requests per upstream connection before a new one is opened.
    pub max_requests_per_connection: Option<u32>,
    /// How endpoints are picked (`None`: the waypoint's default).
    pub balance: Option<crate::upstream::Balance>,
}

impl TrafficConfig {
    pub fn from_proto(t: &wp::TrafficPolicy) -> Result<Self, String> {
        let limit = t.connection_pool.as_ref().filter(|c| c.max_requests > 0).map(|c| LimitConfig {
            max_requests: c.max_requests as usize,
            max_pending: c.max_pending_requests as usize,
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
                    .map(|d| duration_from_proto(d, "baseEjectionTime"))
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
        use crate::upstream::Balance;
        use wp::traffic_policy::LoadBalancer;
        let balance = match LoadBalancer::try_from(t.load_balancer) {
            Ok(LoadBalancer::Default) => None,
            Ok(LoadBalancer::RoundRobin) => Some(Balance::RoundRobin),
            Ok(LoadBalancer::LeastRequest) => Some(Balance::LeastRequest),
            Ok(LoadBalancer::Random) => Some(Balance::Random),
            Err(_) => return Err(format!("unknown load balancer {}", t.load_balancer)),
        };
        Ok(Self { limit, outlier, max_requests_per_connection, balance })
    }
}

#[derive(Debug, Default)]
pub struct TrafficPolicy {
    /// Shared with the policy this one replaced when their [`LimitConfig`]s are equal.
    pub limit: Option<Arc<Limit>>,
    pub outlier: Option<Outlier>,
    /// Requests per upstream connection before a new one is opened.
    pub max_requests_per_connection: Option<u32>,
    /// How endpoints are picked (`None`: the waypoint's default).
    pub balance: Option<crate::upstream::Balance>,
}

impl TrafficPolicy {
    /// A new policy with fresh state. Prefer [`TrafficPolicy::update`] when a previous version
    /// exists: this one's request cap starts with all its slots free.
    pub fn from_proto(t: &wp::TrafficPolicy) -> Result<Self, String> {
        Ok(Self::from_config(TrafficConfig::from_proto(t)?, None))
    }

    /// A policy for `config`, keeping `previous`'s request cap (its slots in use) when the cap
    /// is configured the same.
    pub fn from_config(config: TrafficConfig, previous: Option<&TrafficPolicy>) -> Self {
        let kept = previous.and_then(|p| p.limit.as_ref()).filter(|l| Some(l.config()) == config.limit);
        let limit = match kept {
            Some(l) => Some(l.clone()),
            None => config.limit.map(|c| Arc::new(Limit::new(c))),
        };
        Self {
            limit,
            outlier: config.outlier,
            max_requests_per_connection: config.max_requests_per_connection,
            balance: config.balance,
        }
    }

    /// What this policy was built from.
    pub fn config(&self) -> TrafficConfig {
        TrafficConfig {
            limit: self.limit.as_ref().map(|l| l.config()),
            outlier: self.outlier.clone(),
            max_requests_per_connection: self.max_requests_per_connection,
            balance: self.balance,
        }
    }

    /// The policy for `t` on a config push: `previous` itself when `t` configures the same
    /// thing, else a new policy that still keeps `previous`'s request cap if that is unchanged.
    pub fn update(previous: Option<&Arc<TrafficPolicy>>, t: &wp::TrafficPolicy) -> Result<Arc<Self>, String> {
        let config = TrafficConfig::from_proto(t)?;
        match previous {
            Some(p) if p.config() == config => Ok(p.clone()),
            _ => Ok(Arc::new(Self::from_config(config, previous.map(|p| &**p)))),
        }
    }
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
}

impl Health {
    fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }

    /// Whether forgetting this entry loses nothing.
    fn is_blank(&self, now: Instant) -> bool {
        self.consecutive_5xx == 0
            && self.consecutive_gateway == 0
            && self.ejections == 0
            && !self.is_ejected(now)
    }
}

/// Outlier state of every endpoint of every service (an endpoint ejected for one service still
/// serves the others), kept across config updates. Bounded by [`MAX_OUTLIER_ENTRIES`]; entries
/// of endpoints that left their service go with [`Ejections::prune`].
#[derive(Debug, Default)]
pub struct Ejections {
    by_endpoint: Mutex<HashMap<(String, SocketAddr), Health>>,
    /// How many records `by_endpoint` holds, readable without the lock: with none (no outlier
    /// has been seen), choosing an endpoint takes no lock per candidate.
    records: AtomicUsize,
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
        if self.records.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let map = self.by_endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(&(service.to_string(), addr)).is_some_and(|h| h.is_ejected(Instant::now()))
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
        Self::report_in(&mut map, service, addr, outcome, cfg, endpoints);
        self.records.store(map.len(), Ordering::Relaxed);
    }

    fn report_in(
        map: &mut HashMap<(String, SocketAddr), Health>,
        service: &str,
        addr: SocketAddr,
        outcome: Outcome,
        cfg: &Outlier,
        endpoints: &[SocketAddr],
    ) {
        let now = Instant::now();
        let (server_error, gateway_error) = match outcome {
            Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
            Outcome::ConnectFailure => (true, true),
        };
        let key = (service.to_string(), addr);
        if !map.contains_key(&key) {
            // A success changes nothing for an endpoint without a record.
            if !server_error || !make_room(map, now) {
                return;
            }
        }
        let ejected_now = endpoints
            .iter()
            .filter(|e| map.get(&(service.to_string(), **e)).is_some_and(|h| h.is_ejected(now)))
            .count();
        let h = map.entry(key).or_default();
        h.consecutive_5xx = if server_error { h.consecutive_5xx.saturating_add(1) } else { 0 };
        h.consecutive_gateway = if gateway_error { h.consecutive_gateway.saturating_add(1) } else { 0 };
        let tripped = (cfg.consecutive_5xx > 0 && h.consecutive_5xx >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && h.consecutive_gateway >= cfg.consecutive_gateway);
        let room = ejected_now.saturating_add(1).saturating_mul(100)
            <= endpoints.len().saturating_mul(cfg.max_ejection_percent as usize);
        if tripped && room && !h.is_ejected(now) {
            let ejections = h.ejections.saturating_add(1);
            let time = cfg.ejection_time(ejections);
            // Only an absurd base ejection time runs past the clock's range: no ejection then.
            let Some(until) = now.checked_add(time) else { return };
            h.ejections = ejections;
            h.ejected_until = Some(until);
            h.consecutive_5xx = 0;
            h.consecutive_gateway = 0;
            tracing::warn!(%service, endpoint = %addr, ejections, ejection = ?time, "outlier detection ejected an endpoint");
        }
    }

    /// Forgets endpoints that are no longer endpoints of their service in `snapshot` (or whose
    /// service is gone), and records that say nothing.
    pub fn prune(&self, snapshot: &Snapshot) {
        let now = Instant::now();
        let mut members: HashMap<String, Option<HashSet<IpAddr>>> = HashMap::new();
        let mut map = self.by_endpoint.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|(service, addr), h| {
            if h.is_blank(now) {
                return false;
            }
            let ips = members.entry(service.clone()).or_insert_with(|| endpoint_ips(snapshot, service));
            ips.as_ref().is_some_and(|ips| ips.contains(&addr.ip()))
        });
        self.records.store(map.len(), Ordering::Relaxed);
    }

    /// Endpoints with a record (for tests and the config dump).
    pub fn len(&self) -> usize {
        self.by_endpoint.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Room for one more record under [`MAX_OUTLIER_ENTRIES`]: forgets blank records first, then
/// those not ejected now. `false` if every record is a live ejection.
fn make_room(map: &mut HashMap<(String, SocketAddr), Health>, now: Instant) -> bool {
    if map.len() < MAX_OUTLIER_ENTRIES {
        return true;
    }
    map.retain(|_, h| !h.is_blank(now));
    if map.len() >= MAX_OUTLIER_ENTRIES {
        map.retain(|_, h| h.is_ejected(now));
    }
    map.len() < MAX_OUTLIER_ENTRIES
}

/// The addresses of the endpoints (healthy or not) of the service `namespace/hostname`, or
/// `None` if there is no such service.
fn endpoint_ips(snapshot: &Snapshot, key: &str) -> Option<HashSet<IpAddr>> {
    let (namespace, hostname) = key.split_once('/')?;
    let service = snapshot.service(namespace, hostname)?;
    Some(snapshot.endpoints(service).iter().filter_map(|e| e.workload.addresses.first().copied()).collect())
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

    #[test]
    fn ejection_time_grows_to_the_max_and_never_overflows() {
        let mut o = cfg(100);
        o.base_ejection = Duration::from_secs(30);
        assert_eq!(o.ejection_time(1), Duration::from_secs(30));
        assert_eq!(o.ejection_time(3), Duration::from_secs(90));
        assert_eq!(o.ejection_time(1000), MAX_EJECTION_TIME, "capped like Envoy's max_ejection_time");
        o.base_ejection = Duration::from_secs(400);
        assert_eq!(o.ejection_time(u32::MAX), Duration::from_secs(400), "a longer base is its own cap");
        o.base_ejection = Duration::MAX;
        assert_eq!(o.ejection_time(u32::MAX), Duration::MAX);

        // An absurd base ejection time on the request path: no panic, whatever the count.
        let e = Ejections::default();
        let a: SocketAddr = "10.0.0.1:80".parse().expect("a");
        o.consecutive_5xx = 1;
        for _ in 0..5 {
            e.report("s", a, Outcome::Status(500), &o, &[a]);
        }
    }

    #[test]
    fn outlier_records_are_bounded_and_live_ejections_survive() {
        let e = Ejections::default();
        let mut o = cfg(100);
        o.consecutive_5xx = 1;
        o.base_ejection = Duration::from_secs(60);
        let ejected: SocketAddr = "10.0.0.1:80".parse().expect("a");
        e.report("s", ejected, Outcome::Status(500), &o, &[ejected]);
        assert!(e.is_ejected("s", ejected));
        o.consecutive_5xx = 5;
        for i in 0..(MAX_OUTLIER_ENTRIES as u32 + 100) {
            let addr = SocketAddr::new(std::net::Ipv4Addr::from(0x0b00_0000u32 + i).into(), 80);
            e.report("flood", addr, Outcome::Status(500), &o, &[addr]);
            // Successes of unknown endpoints leave no record.
            e.report(
                "flood",
                SocketAddr::new(std::net::Ipv4Addr::from(0x0c00_0000u32 + i).into(), 80),
                Outcome::Status(200),
                &o,
                &[],
            );
        }
        assert!(e.len() <= MAX_OUTLIER_ENTRIES, "{} records", e.len());
        assert!(e.is_ejected("s", ejected), "a live ejection is not forgotten under pressure");
    }

    #[test]
    fn a_hostile_base_ejection_time_is_refused_not_a_panic() {
        let policy = |seconds: i64, nanos: i32| wp::TrafficPolicy {
            connection_pool: None,
            outlier_detection: Some(wp::OutlierDetection {
                consecutive_5xx_errors: 1,
                consecutive_gateway_errors: 0,
                base_ejection_time: Some(prost_types::Duration { seconds, nanos }),
                max_ejection_percent: 0,
            }),
            load_balancer: 0,
        };
        assert!(TrafficPolicy::from_proto(&policy(i64::MIN, 0)).is_err());
        assert!(TrafficPolicy::from_proto(&policy(-1, 0)).is_err());
        assert!(TrafficPolicy::from_proto(&policy(i64::MAX, i32::MAX)).is_err());
        assert!(TrafficPolicy::from_proto(&policy(0, i32::MIN)).is_err());
        assert!(TrafficPolicy::from_proto(&policy(30, 0)).is_ok());
    }

    #[tokio::test]
    async fn the_request_cap_overflows_beyond_its_waiting_room() {
        let limit = Limit::new(LimitConfig { max_requests: 1, max_pending: 0 });
        let held = limit.acquire().await.expect("first");
        assert!(limit.acquire().await.is_none(), "no waiting room: overflow");
        drop(held);
        assert!(limit.acquire().await.is_some());
    }

    #[tokio::test]
    async fn a_request_dropped_while_waiting_leaves_the_waiting_room() {
        let limit = Limit::new(LimitConfig { max_requests: 1, max_pending: 1 });
        let _held = limit.acquire().await.expect("first");
        for _ in 0..3 {
            // Waits for the slot, then its client goes away.
            let waited = tokio::time::timeout(std::time::Duration::from_millis(20), limit.acquire()).await;
            assert!(waited.is_err(), "waits while the slot is held");
        }
        assert_eq!(limit.pending.load(Ordering::Acquire), 0, "nobody is left waiting");
    }

    #[tokio::test]
    async fn an_unchanged_request_cap_keeps_its_slots_across_pushes() {
        let proto = |max_requests: u32, consecutive: u32| wp::TrafficPolicy {
            connection_pool: Some(wp::ConnectionPool {
                max_requests,
                max_pending_requests: 0,
                max_requests_per_connection: 0,
            }),
            outlier_detection: (consecutive > 0).then_some(wp::OutlierDetection {
                consecutive_5xx_errors: consecutive,
                consecutive_gateway_errors: 0,
                base_ejection_time: None,
                max_ejection_percent: 0,
            }),
            load_balancer: 0,
        };
        let first = TrafficPolicy::update(None, &proto(1, 0)).expect("policy");
        let held = first.limit.as_ref().expect("limit").acquire().await.expect("slot");

        let same = TrafficPolicy::update(Some(&first), &proto(1, 0)).expect("policy");
        assert!(Arc::ptr_eq(&first, &same), "an unchanged policy is kept whole");
        assert_eq!(same.config(), TrafficConfig::from_proto(&proto(1, 0)).expect("config"));

        let outlier_changed = TrafficPolicy::update(Some(&first), &proto(1, 3)).expect("policy");
        assert!(!Arc::ptr_eq(&first, &outlier_changed));
        assert_eq!(outlier_changed.outlier.as_ref().map(|o| o.consecutive_5xx), Some(3));
        let limit = outlier_changed.limit.as_ref().expect("limit");
        assert!(limit.acquire().await.is_none(), "the slot held under the old policy still counts");

        let rebuilt = TrafficPolicy::from_proto(&proto(1, 0)).expect("policy");
        assert!(
            rebuilt.limit.as_ref().expect("limit").acquire().await.is_some(),
            "a rebuilt policy starts over: why callers keep the old one"
        );
        let resized = TrafficPolicy::update(Some(&first), &proto(2, 0)).expect("policy");
        assert_eq!(resized.limit.as_ref().map(|l| l.config().max_requests), Some(2));
        drop(held);
    }
}
