//! The HTTP request path, in stages: route -> filters (redirect, header modifiers, rewrite) ->
//! backend (weighted) -> endpoint -> upstream (with timeouts) -> response filters -> record.
//! Every local answer (404 no route, 503 no endpoint or connect failure, 504 timeout, 3xx
//! redirect) carries a response flag in the metrics and the access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use common::identity::Identity;
use common::metrics::{Parties, TrafficLabels};
use common::state::{Service, State, Workload};
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::Rng;
use tracing::debug;

use common::rbac::{self, Verdict};

use crate::body::{self, Counted, Observed, ProxyBody};
use crate::filter::authz::{self, Target as PolicyTarget};
use crate::filter::mirror::Mirror;
use crate::filter::retry::RetryPolicy;
use crate::metrics::{AccessLog, Metrics, RequestLabels, rfc3339};
use crate::route::table::{Lookup, RequestView, Routes, Selected};
use crate::route::{Filter, HeaderModifier, PathModifier, ServiceRef};
use crate::upstream::{Target, Upstream};

/// What every request shares.
pub struct Context {
    pub tracer: crate::filter::trace::Tracer,
    pub retries: crate::filter::retry::Retries,
    pub state: State,
    pub routes: Routes,
    pub upstream: Upstream,
    pub metrics: Metrics,
    /// `namespace/name` of this waypoint (routes may attach to it).
    pub waypoint: String,
}

/// The tunnel a request arrived in.
#[derive(Clone, Debug)]
pub struct Downstream {
    pub service: Arc<Service>,
    pub port: u16,
    /// What the service port declares: `Some(true)` HTTP/2 (`HTTP2`, `GRPC`), `Some(false)`
    /// HTTP/1.1 (`HTTP11`), `None` to follow the client (gRPC always goes over HTTP/2).
    pub upstream_h2: Option<bool>,
    pub source_identity: Identity,
    pub source_workload: Option<Arc<Workload>>,
    /// The original client (from the CONNECT's `forwarded`), else the peer proxy.
    pub client_addr: SocketAddr,
    pub local_addr: SocketAddr,
}

/// Hop-by-hop headers a proxy must not forward (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let keeps_trailers =
        headers.get(header::TE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("trailers"));
    for n in named {
        headers.remove(n);
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if keeps_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

fn apply_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (n, v) in &m.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
            headers.insert(n, v);
        }
    }
    for (n, v) in &m.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n.as_bytes()), HeaderValue::from_str(v)) {
            headers.append(n, v);
        }
    }
    for n in &m.remove {
        headers.remove(n.as_str());
    }
}

/// The new path for `path` under a path modifier, given the prefix the route matched.
fn modify_path(path: &str, m: &PathModifier, matched_prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(p) => {
            let rest = matched_prefix.and_then(|pre| path.strip_prefix(pre)).unwrap_or(path);
            let joined = format!("{}/{}", p.trim_end_matches('/'), rest.trim_start_matches('/'));
            if rest.is_empty() && p != "/" { p.clone() } else { joined }
        }
    }
}

fn request_id() -> String {
    let n: u128 = rand::rng().random();
    let h = format!("{n:032x}");
    format!("{}-{}-4{}-a{}-{}", &h[0..8], &h[8..12], &h[13..16], &h[17..20], &h[20..32])
}

/// What the access log and metrics need about one request, filled in as it goes.
struct Exchange {
    start: Instant,
    start_time: SystemTime,
    log: AccessLog,
    grpc: bool,
    route: Option<Arc<crate::route::Route>>,
    target: Option<Target>,
    backend_service: Option<Arc<Service>>,
    request_bytes: Arc<AtomicU64>,
    /// A fault delay was injected (flag `DI`).
    delayed: bool,
    /// A flag for an answer that came from upstream (`URX` when retries ran out).
    flags: Option<&'static str>,
    /// A slot of the backend's request cap, released when the exchange ends.
    slot: Option<crate::filter::traffic::Slot>,
    /// This request's span.
    span: Option<crate::filter::trace::ServerSpan>,
}

fn local_reply(status: StatusCode, details: &str) -> Response<ProxyBody> {
    let mut r = Response::new(body::text(format!("{details}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

/// Handles one request from the tunnel `down`.
pub async fn handle(ctx: Arc<Context>, down: Arc<Downstream>, req: Request<Incoming>) -> Response<ProxyBody> {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(request_id, str::to_string);
    let header = |n: HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
    let authority = req.uri().authority().map(|a| a.to_string()).or_else(|| header(header::HOST));
    let mut ex = Exchange {
        start: Instant::now(),
        start_time: SystemTime::now(),
        log: AccessLog {
            authority,
            method: Some(req.method().to_string()),
            path: req.uri().path_and_query().map(|p| p.to_string()),
            protocol: Some(format!("{:?}", req.version())),
            request_id: Some(request_id.clone()),
            user_agent: header(header::USER_AGENT),
            x_forwarded_for: header(HeaderName::from_static("x-forwarded-for")),
            downstream_remote_address: Some(down.client_addr.to_string()),
            downstream_local_address: Some(down.local_addr.to_string()),
            source_principal: Some(down.source_identity.to_string()),
            response_flags: "-".into(),
            ..Default::default()
        },
        grpc,
        route: None,
        target: None,
        backend_service: None,
        request_bytes: Arc::new(AtomicU64::new(0)),
        delayed: false,
        flags: None,
        slot: None,
        span: Some(crate::filter::trace::ServerSpan::start(req.headers(), ctx.tracer.sampling_percent)),
    };
    let (response, flags) = match route_and_send(&ctx, &down, req, &mut ex, &request_id).await {
        Ok(r) => (r.map(BodyExt::boxed), ex.flags.unwrap_or(if ex.delayed { "DI" } else { "-" })),
        Err((status, flags, details)) => {
            if ex.log.response_code_details.is_none() {
                ex.log.response_code_details = Some(details.clone());
            }
            let mut r = local_reply(status, &details);
            if status.is_redirection() {
                // A redirect is an answer, not a failure: details carry the Location.
                if let Ok(v) = HeaderValue::from_str(&details) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
            }
            (r, flags)
        }
    };
    finish(ctx, down, ex, response, flags)
}

type Refusal = (StatusCode, &'static str, String);

async fn route_and_send(
    ctx: &Arc<Context>,
    down: &Downstream,
    mut req: Request<Incoming>,
    ex: &mut Exchange,
    request_id: &str,
) -> Result<Response<Incoming>, Refusal> {
    // An HTTP/1.1 upgrade (WebSocket and the like) passes through: the headers go upstream and,
    // on 101, the two upgraded connections are joined.
    let upgrade = (req.version() == Version::HTTP_11)
        .then(|| req.headers().get(header::UPGRADE).cloned())
        .flatten()
        .map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let (mut parts, incoming) = req.into_parts();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().map(str::to_string);
    let table = ctx.routes.table();
    let view =
        RequestView { method: &parts.method, path: &path, query: query.as_deref(), headers: &parts.headers };
    let lookup = table.select(&down.service.key(), down.port, &ctx.waypoint, &view);
    // Authorization: policies on the waypoint, the service and the chosen route.
    let mut targets =
        vec![PolicyTarget::Waypoint(ctx.waypoint.clone()), PolicyTarget::Service(down.service.key())];
    if let Lookup::Route(s) = &lookup {
        targets.push(PolicyTarget::Route(s.route.key.clone()));
    }
    // Request authentication: a present token must verify.
    let jwt_rules: Vec<_> = targets.iter().filter_map(|t| table.jwt.get(t)).flatten().cloned().collect();
    let verified = if jwt_rules.is_empty() {
        None
    } else {
        match crate::filter::jwt::authenticate(&jwt_rules, &mut parts.headers) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(source = %down.source_identity, error = %e, "request refused: invalid JWT");
                ex.log.response_code_details = Some("jwt_authn_access_denied".into());
                return Err((StatusCode::UNAUTHORIZED, "-", e.to_string()));
            }
        }
    };
    let policies = authz::applicable(&table.policies, &targets);
    if !policies.is_empty() {
        let host = parts
            .uri
            .host()
            .map(str::to_string)
            .or_else(|| {
                parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(|h| h.split(':').next().unwrap_or(h).to_string())
            })
            .unwrap_or_default();
        let request = rbac::Request {
            host: &host,
            method: parts.method.as_str(),
            path: &path,
            headers: &parts.headers,
            request_principal: verified.as_ref().map(|v| v.principal.as_str()),
            claims: verified.as_ref().map(|v| &v.claims),
        };
        let conn = rbac::Connection {
            source: Some(&down.source_identity),
            source_ip: down.client_addr.ip(),
            destination_ip: down.local_addr.ip(),
            destination_port: down.port,
            http: Some(&request),
        };
        let verdict = rbac::evaluate(&policies, &conn);
        if !verdict.is_allow() {
            let matched = match &verdict {
                Verdict::DeniedBy(p) => p.clone(),
                _ => "none".into(),
            };
            tracing::warn!(source = %down.source_identity, path = %path, reason = %verdict.reason(), "request denied by policy");
            ex.log.response_code_details = Some(format!("rbac_access_denied_matched_policy[{matched}]"));
            return Err((StatusCode::FORBIDDEN, "-", "RBAC: access denied".into()));
        }
    }
    // Local rate limits of the waypoint, service and route.
    let limited = targets.iter().filter_map(|t| table.limits.get(t)).flatten().any(|b| !b.try_acquire());
    if limited {
        return Err((StatusCode::TOO_MANY_REQUESTS, "RL", "local_rate_limited".into()));
    }
    let selected = match lookup {
        Lookup::NoMatch => return Err((StatusCode::NOT_FOUND, "NR", "route_not_found".into())),
        Lookup::Default => None,
        Lookup::Route(s) => Some(s),
    };
    // Injected faults: delays first, then aborts.
    let faults: Vec<crate::filter::fault::Fault> =
        targets.iter().filter_map(|t| table.faults.get(t)).flatten().cloned().collect();
    for fault in faults {
        if let Some(d) = fault.delay() {
            tokio::time::sleep(d).await;
            ex.delayed = true;
        }
        if let Some(status) = fault.abort() {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return Err((status, "FI", "fault_filter_abort".into()));
        }
    }
    ex.route = selected.as_ref().map(|s| s.route.clone());
    ex.log.route_name = ex.route.as_ref().map(|r| r.key.clone());

    // The backend: weighted among the route's, or the service itself.
    let (backend, backend_filters) = match &selected {
        None => (
            ServiceRef {
                namespace: down.service.namespace.clone(),
                hostname: down.service.hostname.clone(),
                port: down.port,
            },
            Vec::new(),
        ),
        Some(Selected { route, .. }) => {
            if let Some(redirect) = route.filters.iter().find_map(|f| match f {
                Filter::Redirect(r) => Some(r),
                _ => None,
            }) {
                let host = parts
                    .uri
                    .host()
                    .map(str::to_string)
                    .or_else(|| {
                        parts
                            .headers
                            .get(header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .map(|h| h.split(':').next().unwrap_or(h).to_string())
                    })
                    .unwrap_or_default();
                let scheme = redirect.scheme.clone().unwrap_or_else(|| "http".into());
                let host = redirect.hostname.clone().unwrap_or(host);
                let port = redirect.port.map(|p| format!(":{p}")).unwrap_or_default();
                let prefix = selected.as_ref().and_then(|s| s.matched_prefix.as_deref());
                let new_path = redirect.path.as_ref().map_or(path.clone(), |m| modify_path(&path, m, prefix));
                let query = query.as_ref().map(|q| format!("?{q}")).unwrap_or_default();
                let status = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND);
                return Err((status, "-", format!("{scheme}://{host}{port}{new_path}{query}")));
            }
            let total: u64 = route.backends.iter().map(|b| u64::from(b.weight)).sum();
            if total == 0 {
                return Err((StatusCode::INTERNAL_SERVER_ERROR, "NR", "all backend weights are zero".into()));
            }
            let mut pick = rand::rng().random_range(0..total);
            let chosen = route
                .backends
                .iter()
                .find(|b| {
                    let w = u64::from(b.weight);
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(&route.backends[0]);
            let mut backend = chosen.service.clone();
            if backend.port == 0 {
                backend.port = down.port;
            }
            (backend, chosen.filters.clone())
        }
    };

    // Request filters: the route's, then the backend's.
    let route_filters = selected.as_ref().map(|s| s.route.filters.clone()).unwrap_or_default();
    let prefix = selected.as_ref().and_then(|s| s.matched_prefix.clone());
    let mut new_path = path.clone();
    let mut new_host: Option<String> = None;
    for f in route_filters.iter().chain(backend_filters.iter()) {
        match f {
            Filter::RequestHeaders(m) => apply_headers(&mut parts.headers, m),
            Filter::Rewrite(r) => {
                if let Some(m) = &r.path {
                    new_path = modify_path(&path, m, prefix.as_deref());
                }
                if let Some(h) = &r.hostname {
                    new_host = Some(h.clone());
                }
            }
            Filter::ResponseHeaders(_) | Filter::Redirect(_) => {}
        }
    }

    // The endpoint.
    let snapshot = ctx.state.snapshot();
    let service = snapshot.service(&backend.namespace, &backend.hostname).cloned().ok_or_else(|| {
        (StatusCode::INTERNAL_SERVER_ERROR, "NR", format!("backend {} not found", backend.key()))
    })?;
    ex.backend_service = Some(service.clone());
    ex.log.upstream_cluster = Some(format!("outbound|{}||{}", backend.port, service.hostname));
    let traffic = table.traffic.get(&service.key()).cloned();
    let per_conn = traffic.as_ref().and_then(|t| t.max_requests_per_connection);
    if let Some(limit) = traffic.as_ref().and_then(|t| t.limit.as_ref()) {
        ex.slot = Some(
            limit
                .acquire()
                .await
                .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "UO", "upstream_overflow".to_string()))?,
        );
    }
    let target = ctx
        .upstream
        .choose(&snapshot, &service, backend.port)
        .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "UH", "no_healthy_upstream".into()))?;
    ex.log.upstream_host = Some(target.addr.to_string());
    target.outstanding.fetch_add(1, Ordering::Relaxed);
    ex.target = Some(target.clone());

    // The upstream request.
    let authority = new_host.clone().unwrap_or_else(|| {
        ex.log.authority.clone().unwrap_or_else(|| format!("{}:{}", service.hostname, backend.port))
    });
    let path_and_query = match &query {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    let h2 = upgrade.is_none() && down.upstream_h2.unwrap_or(ex.grpc || parts.version == Version::HTTP_2);
    parts.uri = if h2 {
        Uri::builder()
            .scheme("http")
            .authority(authority.as_str())
            .path_and_query(path_and_query.as_str())
            .build()
    } else {
        Uri::builder().path_and_query(path_and_query.as_str()).build()
    }
    .map_err(|e| (StatusCode::BAD_REQUEST, "-", format!("cannot build upstream URI: {e}")))?;
    parts.version = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    strip_hop_by_hop(&mut parts.headers);
    if h2 {
        parts.headers.remove(header::HOST);
    } else if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    let xff = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", down.client_addr.ip()),
        None => down.client_addr.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        parts.headers.insert("x-forwarded-for", v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        parts.headers.insert("x-request-id", v);
    }
    parts.headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(span) = &ex.span {
        span.inject(&mut parts.headers);
    }
    if let Some((protocol, _)) = &upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    let timeout = match (
        ex.route.as_ref().and_then(|r| r.request_timeout),
        ex.route.as_ref().and_then(|r| r.backend_timeout),
    ) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    // The most specific retry policy (route, then service, then waypoint), for requests whose
    // body is known to be small enough to replay.
    let retry = targets.iter().rev().find_map(|t| table.retries.get(t)).cloned();
    use hyper::body::Body as _;
    let replayable = incoming.is_end_stream()
        || incoming.size_hint().upper().is_some_and(|n| n <= crate::filter::retry::MAX_REPLAY_BODY as u64);
    let sent = Instant::now();
    let retry = retry.filter(|r| r.attempts > 0 && upgrade.is_none() && replayable);
    let mirrors: Vec<Mirror> = if upgrade.is_none() && replayable {
        targets.iter().filter_map(|t| table.mirrors.get(t)).flatten().filter(|m| m.hit()).cloned().collect()
    } else {
        Vec::new()
    };
    let buffered = (retry.is_some() || !mirrors.is_empty()).then(|| retry.unwrap_or_else(RetryPolicy::once));
    let attempted: Result<_, Refusal> = async {
        Ok(match buffered {
            None => {
                let counted = Counted::new(incoming, ex.request_bytes.clone()).boxed();
                let send =
                    ctx.upstream.send_limited(&target, h2, Request::from_parts(parts, counted), per_conn);
                match timeout {
                    Some(t) => tokio::time::timeout(t, send).await.map_err(|_| {
                        (StatusCode::GATEWAY_TIMEOUT, "UT", "upstream_response_timeout".to_string())
                    })?,
                    None => send.await,
                }
            }
            Some(policy) => {
                let body = incoming
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .map_err(|e| (StatusCode::BAD_REQUEST, "DC", format!("request body: {e}")))?;
                ex.request_bytes.store(body.len() as u64, Ordering::Relaxed);
                for m in mirrors {
                    mirror(ctx.clone(), &snapshot, m, &parts, body.clone(), h2);
                }
                let attempt = Attempt { ctx, target: &target, h2, parts: &parts, body, per_conn };
                let cluster = ex.log.upstream_cluster.clone().unwrap_or_default();
                match timeout {
                    Some(t) => {
                        tokio::time::timeout(t, with_retries(attempt, &policy, &cluster, ex)).await.map_err(
                            |_| (StatusCode::GATEWAY_TIMEOUT, "UT", "upstream_response_timeout".to_string()),
                        )??
                    }
                    None => with_retries(attempt, &policy, &cluster, ex).await?,
                }
            }
        })
    }
    .await;
    ex.log.upstream_service_time = Some(sent.elapsed().as_millis() as u64);
    // Outlier detection sees every outcome, timeouts (504) included.
    if let Some(outlier) = traffic.as_ref().and_then(|t| t.outlier.as_ref()) {
        let outcome = match &attempted {
            Ok(Ok(r)) => crate::filter::traffic::Outcome::Status(r.status().as_u16()),
            Ok(Err(_)) => crate::filter::traffic::Outcome::ConnectFailure,
            Err((status, ..)) => crate::filter::traffic::Outcome::Status(status.as_u16()),
        };
        let all = crate::upstream::Upstream::endpoint_addrs(&snapshot, &service, backend.port);
        ctx.upstream.ejections.report(&service.key(), target.addr, outcome, outlier, &all);
    }
    let result = attempted?;
    let mut response = result.map_err(|e| {
        debug!(error = %e, "upstream request failed");
        ex.log.upstream_transport_failure_reason = Some(e.to_string());
        (StatusCode::SERVICE_UNAVAILABLE, "UF", "upstream_connect_failure".to_string())
    })?;
    if let Some((protocol, downstream)) = upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        let upstream = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((d, u)) => {
                    let counters = common::copy::ByteCounters::default();
                    let _ =
                        common::copy::copy_bidirectional(TokioIo::new(d), TokioIo::new(u), &counters).await;
                }
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            }
        });
        // Hop-by-hop stripping on the way back must keep what makes this a 101.
        response.extensions_mut().insert(Upgraded(protocol));
    }
    Ok(response)
}

/// Sends a copy of the request to `m`'s service in the background; its answer is dropped.
fn mirror(
    ctx: Arc<Context>,
    snapshot: &common::state::Snapshot,
    m: Mirror,
    parts: &http::request::Parts,
    body: bytes::Bytes,
    h2: bool,
) {
    let Some(service) = snapshot.service(&m.service.namespace, &m.service.hostname) else {
        debug!(service = %m.service.key(), "mirror service unknown; not mirrored");
        return;
    };
    let port = if m.service.port == 0 { parts.uri.port_u16().unwrap_or(80) } else { m.service.port };
    let Some(target) = ctx.upstream.choose(snapshot, service, port) else {
        debug!(service = %m.service.key(), "mirror has no endpoint; not mirrored");
        return;
    };
    let mut req = Request::new(http_body_util::Full::new(body).map_err(|never| match never {}).boxed());
    *req.method_mut() = parts.method.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default();
    let shadow = crate::filter::mirror::shadow_authority(&authority);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let uri = if h2 {
        Uri::builder().scheme("http").authority(shadow.as_str()).path_and_query(path.as_str()).build()
    } else {
        if let Ok(v) = HeaderValue::from_str(&shadow) {
            req.headers_mut().insert(header::HOST, v);
        }
        Uri::builder().path_and_query(path.as_str()).build()
    };
    let Ok(uri) = uri else { return };
    *req.uri_mut() = uri;
    tokio::spawn(async move {
        match ctx.upstream.send(&target, h2, req).await {
            Ok(r) => {
                let _ = r.into_body().collect().await;
            }
            Err(e) => debug!(error = %e, "mirrored request failed"),
        }
    });
}

/// One replayable try: the request's head and its buffered body.
struct Attempt<'a> {
    ctx: &'a Context,
    target: &'a Target,
    h2: bool,
    parts: &'a http::request::Parts,
    body: bytes::Bytes,
    per_conn: Option<u32>,
}

impl Attempt<'_> {
    async fn send(&self) -> Result<Response<Incoming>, crate::upstream::UpstreamError> {
        let mut req = Request::new(
            http_body_util::Full::new(self.body.clone()).map_err(|never| match never {}).boxed(),
        );
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = self.parts.headers.clone();
        self.ctx.upstream.send_limited(self.target, self.h2, req, self.per_conn).await
    }
}

/// Tries, and tries again per `policy` while the budget allows. Returns the last answer (a
/// retriable status when tries ran out, flagged `URX`) or the last transport failure.
async fn with_retries(
    attempt: Attempt<'_>,
    policy: &crate::filter::retry::RetryPolicy,
    cluster: &str,
    ex: &mut Exchange,
) -> Result<Result<Response<Incoming>, crate::upstream::UpstreamError>, Refusal> {
    let retries = &attempt.ctx.retries;
    let _in_flight = retries.request();
    let mut retried = false;
    let mut n = 0;
    loop {
        let result = match policy.per_try_timeout {
            Some(t) => tokio::time::timeout(t, attempt.send()).await.ok(),
            None => Some(attempt.send().await),
        };
        let retriable = match &result {
            Some(Ok(r)) => policy.retries_status(r.status()),
            Some(Err(_)) | None => policy.retries_failure(),
        };
        let slot = (retriable && n < policy.attempts).then(|| retries.begin(cluster)).flatten();
        match (result, slot) {
            (Some(Ok(r)), None) => {
                if retriable && retried {
                    ex.flags = Some("URX");
                } else if retried {
                    retries.succeeded(cluster);
                }
                return Ok(Ok(r));
            }
            (Some(Err(e)), None) => {
                if retried {
                    ex.flags = Some("URX");
                }
                return Ok(Err(e));
            }
            (None, None) => {
                return Err((StatusCode::GATEWAY_TIMEOUT, "UT", "upstream_per_try_timeout".into()));
            }
            (_, Some(slot)) => {
                n += 1;
                retried = true;
                tokio::time::sleep(policy.backoff(n)).await;
                drop(slot);
            }
        }
    }
}

/// Marks a 101 response whose `connection`/`upgrade` headers must reach the client.
#[derive(Clone)]
struct Upgraded(HeaderValue);

/// Applies response filters, wraps the body so the request is recorded when it ends.
fn finish(
    ctx: Arc<Context>,
    down: Arc<Downstream>,
    mut ex: Exchange,
    response: Response<ProxyBody>,
    flags: &'static str,
) -> Response<ProxyBody> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(Upgraded(protocol)) = parts.extensions.get::<Upgraded>() {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    if let Some(route) = &ex.route {
        for f in &route.filters {
            if let Filter::ResponseHeaders(m) = f {
                apply_headers(&mut parts.headers, m);
            }
        }
    }
    let status = parts.status;
    let header_grpc_status =
        parts.headers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
    ex.log.response_code = status.as_u16();
    ex.log.response_flags = flags.to_string();
    let observed = Observed::new(body, move |done| {
        if let Some(t) = &ex.target {
            t.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        let service = ex.backend_service.clone().or_else(|| Some(down.service.clone()));
        let target_workload = ex.target.as_ref().map(|t| t.workload.clone());
        let parties = Parties {
            source: down.source_workload.as_deref(),
            source_identity: Some(&down.source_identity),
            destination: target_workload.as_deref(),
            destination_identity: ex.target.as_ref().map(|t| &t.identity),
            service: service.as_deref(),
        };
        let protocol = if ex.grpc { "grpc" } else { "http" };
        let flags = if done.aborted && flags == "-" { "DC" } else { flags };
        let grpc_status = done.grpc_status.or(header_grpc_status);
        let labels = RequestLabels {
            traffic: TrafficLabels::new("waypoint", parties, protocol, flags, true),
            response_code: status.as_u16().to_string(),
            grpc_response_status: grpc_status.unwrap_or_default(),
        };
        let duration = ex.start.elapsed();
        ex.log.duration = duration.as_millis() as u64;
        ex.log.bytes_received = ex.request_bytes.load(Ordering::Relaxed);
        ex.log.bytes_sent = done.bytes;
        ex.log.response_flags = flags.to_string();
        ex.log.start_time = rfc3339(ex.start_time);
        ctx.metrics.request(labels, duration, ex.log.bytes_received, done.bytes, &ex.log);
        if let Some(span) = ex.span.take().filter(|s| s.ctx.sampled && ctx.tracer.enabled()) {
            let name = ex.route.as_ref().map_or_else(|| down.service.hostname.clone(), |r| r.key.clone());
            let attributes = vec![
                ("http.method", ex.log.method.clone().unwrap_or_default()),
                ("http.url", ex.log.path.clone().unwrap_or_default()),
                ("http.status_code", status.as_u16().to_string()),
                ("upstream_cluster", ex.log.upstream_cluster.clone().unwrap_or_default()),
                ("upstream_host", ex.log.upstream_host.clone().unwrap_or_default()),
                ("response_flags", flags.to_string()),
                ("request_id", ex.log.request_id.clone().unwrap_or_default()),
                ("peer.principal", down.source_identity.to_string()),
            ];
            ctx.tracer.record(span.finish(name, attributes, status.as_u16()));
        }
    });
    Response::from_parts(parts, observed.boxed())
}

/// How long the waypoint waits for a client's request line before closing (slowloris guard).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rewrites_follow_gateway_api() {
        let m = PathModifier::ReplacePrefixMatch("/v2".into());
        assert_eq!(modify_path("/api/users", &m, Some("/api")), "/v2/users");
        assert_eq!(modify_path("/api", &m, Some("/api")), "/v2");
        let root = PathModifier::ReplacePrefixMatch("/".into());
        assert_eq!(modify_path("/api/users", &root, Some("/api")), "/users");
        let full = PathModifier::ReplaceFullPath("/fixed".into());
        assert_eq!(modify_path("/anything", &full, None), "/fixed");
    }

    #[test]
    fn hop_by_hop_headers_are_dropped_and_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("x-secret").is_none() && h.get("connection").is_none() && h.get("keep-alive").is_none()
        );
        assert_eq!(h.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-kept").is_some());
    }
}
