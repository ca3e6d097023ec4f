//! The route table: routes by the service (or waypoint) they attach to, and the choice of one
//! route for a request with Gateway API precedence: an exact path beats a prefix, a longer
//! prefix beats a shorter one, then a method match, more header matches, more query matches;
//! remaining ties go to the oldest route object, then the first by `namespace/name`, then the
//! first rule (see `Route::order`).
//!
//! Routes attached to the service win over routes attached to the waypoint. A service with
//! routes and no match answers 404; a service with none goes to itself.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};

use common::xds::{Handler, Handlers, Rejection, ResourceStore, XdsUpdate};
use http::{HeaderMap, Method};
use proto::waypoint as wp;
use serde::Serialize;
use tokio::sync::watch;

use super::policies::{CompiledPolicy, PolicyIndex};
use super::{Parent, PathMatch, Route, RouteMatch};
use crate::filter::authz::Target;
use crate::filter::fault::Fault;
use crate::filter::jwt::JwtRule;
use crate::filter::mirror::Mirror;
use crate::filter::ratelimit::TokenBucket;
use crate::filter::retry::RetryPolicy;
use crate::filter::traffic::TrafficPolicy;
use tracing::{debug, warn};

/// What a request is matched on.
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

/// The route chosen for a request and the prefix its path matched (for prefix rewrites).
#[derive(Clone, Debug)]
pub struct Selected {
    pub route: Arc<Route>,
    pub matched_prefix: Option<String>,
}

pub enum Lookup {
    Route(Selected),
    /// Routes exist for the service and none matched: 404.
    NoMatch,
    /// No route at all: send to the service itself.
    Default,
}

#[derive(Debug, Default, Serialize)]
pub struct RouteTable {
    by_service: BTreeMap<String, Vec<Arc<Route>>>,
    by_waypoint: BTreeMap<String, Vec<Arc<Route>>>,
    /// Everything else that attaches to the waypoint, a service or a route.
    #[serde(skip)]
    pub policy: PolicyIndex,
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) => {
            p.is_empty()
                || path == p
                || (path.starts_with(p.as_str()) && path.as_bytes().get(p.len()) == Some(&b'/'))
        }
        PathMatch::Regex(r) => r.is_match(path),
    }
}

fn query_value<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

fn matches(m: &RouteMatch, req: &RequestView<'_>) -> bool {
    if let Some(p) = &m.path
        && !path_matches(p, req.path)
    {
        return false;
    }
    if let Some(method) = &m.method
        && method != req.method.as_str()
    {
        return false;
    }
    if let Some((service, method)) = &m.grpc {
        let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
        let (s, me) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if (!service.is_empty() && service != s) || (!method.is_empty() && method != me) {
            return false;
        }
    }
    let headers_ok = m.headers.iter().all(|(name, v)| {
        req.headers.get_all(name.as_str()).iter().any(|h| h.to_str().is_ok_and(|h| v.matches(h)))
    });
    headers_ok
        && m.query_params.iter().all(|(name, v)| query_value(req.query, name).is_some_and(|q| v.matches(q)))
}

/// How specific a match is: path kind, prefix length, method, header and query counts.
type Precedence = (u8, usize, bool, usize, usize);

/// Higher is more specific. A match without a path is a prefix match on `/` (Gateway API's
/// default), so its header and query matches count against other `/` prefixes.
fn precedence(m: &RouteMatch) -> Precedence {
    let (kind, len) = match &m.path {
        Some(PathMatch::Exact(p)) => (3, p.len()),
        Some(PathMatch::Prefix(p)) => (2, p.len()),
        None => (2, 0),
        Some(PathMatch::Regex(_)) => (1, 0),
    };
    (kind, len, m.method.is_some(), m.headers.len(), m.query_params.len())
}

impl RouteTable {
    #[cfg(test)]
    fn build(routes: impl IntoIterator<Item = Route>) -> Self {
        Self::build_with(routes.into_iter().map(Arc::new), PolicyIndex::default())
    }

    fn build_with(routes: impl IntoIterator<Item = Arc<Route>>, policy: PolicyIndex) -> Self {
        let mut t = Self { policy, ..Self::default() };
        for r in routes {
            match &r.parent {
                Parent::Service(s) => t.by_service.entry(s.key()).or_default().push(r.clone()),
                Parent::Waypoint(w) => t.by_waypoint.entry(w.clone()).or_default().push(r.clone()),
            }
        }
        for v in t.by_service.values_mut().chain(t.by_waypoint.values_mut()) {
            v.sort_by(|a, b| (&a.order, &a.key).cmp(&(&b.order, &b.key)));
        }
        t
    }

    /// Picks the route for a request to `service` (`namespace/hostname`) on `port`, served by
    /// waypoint `waypoint` (`namespace/name`).
    pub fn select(&self, service: &str, port: u16, waypoint: &str, req: &RequestView<'_>) -> Lookup {
        let for_service: Vec<&Arc<Route>> = self
            .by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter(|r| matches!(&r.parent, Parent::Service(s) if s.port == 0 || s.port == port))
            .collect();
        let candidates: Vec<&Arc<Route>> = if for_service.is_empty() {
            self.by_waypoint.get(waypoint).into_iter().flatten().collect()
        } else {
            for_service
        };
        if candidates.is_empty() {
            return Lookup::Default;
        }
        if candidates.iter().all(|r| r.first_match) {
            return first_match(&candidates, req);
        }
        let mut best: Option<(Precedence, Selected)> = None;
        // Candidates are in Gateway API order, so on equal precedence the first one stays.
        for route in candidates {
            let all = RouteMatch::default();
            let ms: Vec<&RouteMatch> =
                if route.matches.is_empty() { vec![&all] } else { route.matches.iter().collect() };
            for m in ms {
                if !matches(m, req) {
                    continue;
                }
                let p = precedence(m);
                if best.as_ref().is_none_or(|(b, _)| p > *b) {
                    let matched_prefix = match &m.path {
                        Some(PathMatch::Prefix(pre)) => Some(pre.clone()),
                        _ => None,
                    };
                    best = Some((p, Selected { route: route.clone(), matched_prefix }));
                }
            }
        }
        match best {
            Some((_, s)) => Lookup::Route(s),
            None => Lookup::NoMatch,
        }
    }
}

/// Istio's VirtualService order: the first route (in order) with a matching match wins.
fn first_match(candidates: &[&Arc<Route>], req: &RequestView<'_>) -> Lookup {
    let all = RouteMatch::default();
    for route in candidates {
        let ms: Vec<&RouteMatch> =
            if route.matches.is_empty() { vec![&all] } else { route.matches.iter().collect() };
        if let Some(m) = ms.into_iter().find(|m| matches(m, req)) {
            let matched_prefix = match &m.path {
                Some(PathMatch::Prefix(pre)) => Some(pre.clone()),
                _ => None,
            };
            return Lookup::Route(Selected { route: (*route).clone(), matched_prefix });
        }
    }
    Lookup::NoMatch
}

/// Checks a waypoint resource on receipt: the name, and that a route compiles.
fn check(name: &str, r: &wp::Resource) -> Result<(), String> {
    let (ns, n) = match &r.kind {
        Some(wp::resource::Kind::Route(route)) => {
            Route::from_proto(route)?;
            (&route.namespace, &route.name)
        }
        Some(wp::resource::Kind::Policy(p)) => {
            crate::filter::authz::convert(p)?;
            if let Some(r) = &p.rate_limit {
                TokenBucket::from_proto(r)?;
            }
            if let Some(f) = &p.fault {
                Fault::from_proto(f)?;
            }
            if let Some(r) = &p.retry {
                RetryPolicy::from_proto(r)?;
            }
            if let Some(m) = &p.mirror {
                Mirror::from_proto(m)?;
            }
            for r in p.request_authentication.iter().flat_map(|a| &a.rules) {
                JwtRule::from_proto(r)?;
            }
            if let Some(t) = &p.traffic {
                TrafficPolicy::from_proto(t)?;
                if !matches!(crate::filter::authz::target_of(p)?, Target::Service(_)) {
                    return Err("a traffic policy must target a service".into());
                }
            }
            (&p.namespace, &p.name)
        }
        None => return Err("resource has neither route nor policy".into()),
    };
    if n.is_empty() || name != format!("{ns}/{n}") {
        return Err(format!("resource name should be {ns}/{n}"));
    }
    Ok(())
}

/// A resource as last compiled, with its source (reused while the source is unchanged).
enum Compiled {
    Route(Box<wp::Route>, Arc<Route>),
    Policy(Arc<CompiledPolicy>),
}

struct Inner {
    resources: Arc<ResourceStore<wp::Resource>>,
    /// Compiled resources by name, kept across pushes.
    compiled: std::sync::Mutex<HashMap<String, Compiled>>,
    current: RwLock<Arc<RouteTable>>,
    changed: watch::Sender<u64>,
}

/// The route table handle; the xDS handler is its only writer.
#[derive(Clone)]
pub struct Routes {
    inner: Arc<Inner>,
}

impl Routes {
    /// An empty table, registered in `handlers` for the waypoint resource type.
    pub fn new(handlers: &mut Handlers) -> Self {
        let routes = Self {
            inner: Arc::new(Inner {
                resources: ResourceStore::new(check),
                compiled: Default::default(),
                current: RwLock::default(),
                changed: watch::channel(0).0,
            }),
        };
        handlers.add::<wp::Resource, _>(proto::WAYPOINT_RESOURCE_TYPE_URL, Feed(routes.clone()));
        routes
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.inner.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn versions(&self) -> BTreeMap<String, String> {
        self.inner.resources.versions()
    }

    /// Waits until `pred` holds for the current table.
    pub async fn wait_for(&self, pred: impl Fn(&RouteTable) -> bool) {
        let mut rx = self.inner.changed.subscribe();
        while !pred(&self.table()) {
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.inner.resources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Feed(Routes);

impl Handler<wp::Resource> for Feed {
    fn handle(&self, updates: Vec<XdsUpdate<wp::Resource>>) -> Vec<Rejection> {
        let inner = &self.0.inner;
        let rejected = inner.resources.handle(updates);
        let mut cache = inner.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        let fetched: HashMap<String, Arc<JwtRule>> = cache
            .values()
            .filter_map(|c| match c {
                Compiled::Policy(p) => Some(p.fetched_rules()),
                Compiled::Route(..) => None,
            })
            .flatten()
            .collect();
        let mut next = HashMap::new();
        let (mut reused, mut compiled) = (0usize, 0usize);
        for (name, r) in inner.resources.entries() {
            let old = cache.remove(&name);
            let entry = match (r.kind, old) {
                (Some(wp::resource::Kind::Route(src)), Some(Compiled::Route(old_src, route)))
                    if *old_src == src =>
                {
                    reused += 1;
                    Compiled::Route(old_src, route)
                }
                (Some(wp::resource::Kind::Route(src)), _) => match Route::from_proto(&src) {
                    Ok(route) => {
                        compiled += 1;
                        Compiled::Route(Box::new(src), Arc::new(route))
                    }
                    Err(e) => {
                        warn!(resource = %name, error = %e, "route held by the store does not compile; skipped");
                        continue;
                    }
                },
                (Some(wp::resource::Kind::Policy(src)), Some(Compiled::Policy(old))) if old.source == src => {
                    reused += 1;
                    Compiled::Policy(old)
                }
                (Some(wp::resource::Kind::Policy(src)), old) => {
                    let old = match &old {
                        Some(Compiled::Policy(p)) => Some(&**p),
                        _ => None,
                    };
                    match CompiledPolicy::compile(src, old, &fetched) {
                        Ok(p) => {
                            compiled += 1;
                            Compiled::Policy(Arc::new(p))
                        }
                        Err(e) => {
                            warn!(resource = %name, error = %e, "policy held by the store does not compile; skipped");
                            continue;
                        }
                    }
                }
                (None, _) => continue,
            };
            next.insert(name, entry);
        }
        debug!(reused, compiled, "waypoint resources compiled");
        *cache = next;
        let routes: Vec<Arc<Route>> = cache
            .values()
            .filter_map(|c| match c {
                Compiled::Route(_, r) => Some(r.clone()),
                Compiled::Policy(_) => None,
            })
            .collect();
        let policy = PolicyIndex::build(cache.values().filter_map(|c| match c {
            Compiled::Policy(p) => Some(&**p),
            Compiled::Route(..) => None,
        }));
        drop(cache);
        let table = Arc::new(RouteTable::build_with(routes, policy));
        *inner.current.write().unwrap_or_else(PoisonError::into_inner) = table;
        inner.changed.send_modify(|n| *n += 1);
        rejected
    }
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes").field("resources", &self.len()).finish()
    }
}

/// Routes per service, for the config dump.
pub fn summary(table: &RouteTable) -> HashMap<String, Vec<String>> {
    table
        .by_service
        .iter()
        .chain(table.by_waypoint.iter())
        .map(|(k, v)| (k.clone(), v.iter().map(|r| r.key.clone()).collect()))
        .collect()
}

#[cfg(test)]
mod tests;
