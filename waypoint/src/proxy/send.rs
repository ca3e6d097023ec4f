//! Sending: the endpoint (the addressed pod, or one of the backend's chosen by the balancer past
//! outlier ejections and the request cap), then the request with its timeouts, retries and
//! mirrors, and, for an HTTP/1.1 upgrade, the joining of the two upgraded connections (closed
//! when the drain ends).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::flags::ResponseFlag;
use common::state::Service;
use http::{Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::request::{Exchange, RequestCtx};
use super::route::Backend;
use super::{Context, Downstream, ProxyError};
use crate::body::{Counted, ProxyBody};
use crate::filter::authz::Target as PolicyTarget;
use crate::filter::mirror::Mirror;
use crate::filter::retry::{MAX_REPLAY_BODY, RetryPolicy};
use crate::filter::traffic::{Outcome, TrafficPolicy};
use crate::route::table::RouteTable;
use crate::upstream::{Target, UpstreamError};

/// The endpoint a request goes to, and what applies to its service.
pub struct Endpoint {
    pub target: Target,
    pub service: Arc<Service>,
    pub port: u16,
    pub traffic: Option<Arc<TrafficPolicy>>,
}

/// Envoy's name for the cluster of a service port, `outbound|<port>||<hostname>` (pushed rather
/// than `format!`ed: this runs for every request).
fn upstream_cluster(port: u16, hostname: &str) -> String {
    let mut n = itoa::Buffer::new();
    let port = n.format(port);
    let mut s = String::with_capacity(11 + port.len() + hostname.len());
    for piece in ["outbound|", port, "||", hostname] {
        s.push_str(piece);
    }
    s
}

/// Chooses the endpoint: the pod a request was addressed to, else one of `backend`'s.
pub async fn endpoint(
    ctx: &Context,
    down: &Downstream,
    table: &RouteTable,
    backend: &Backend<'_>,
    ex: &mut Exchange,
) -> Result<Endpoint, ProxyError> {
    let snapshot = ctx.state.snapshot();
    let service = snapshot
        .service(backend.namespace, backend.hostname)
        .cloned()
        .ok_or_else(|| ProxyError::UnknownBackend(backend.key()))?;
    ex.backend_service = Some(service.clone());
    ex.log.upstream_cluster = Some(upstream_cluster(backend.port, &service.hostname));
    if let Some(target) = down.pod_target() {
        // Addressed to the pod itself: that pod, on the port asked for.
        ex.log.upstream_host = Some(target.addr_text.clone());
        target.outstanding.fetch_add(1, Ordering::Relaxed);
        ex.target = Some(target.clone());
        return Ok(Endpoint { target, service, port: down.target_addr.port(), traffic: None });
    }
    let traffic = table.policy.traffic_for(service.key(), u32::from(backend.port));
    if let Some(limit) = traffic.as_ref().and_then(|t| t.limit.as_ref()) {
        ex.slot = Some(limit.acquire().await.ok_or_else(|| ProxyError::Overflow(service.key().to_string()))?);
    }
    let target = ctx
        .upstream
        .choose_with(&snapshot, &service, backend.port, traffic.as_ref().and_then(|t| t.balance))
        .ok_or_else(|| ProxyError::NoHealthyUpstream(service.key().to_string()))?;
    ex.log.upstream_host = Some(target.addr_text.clone());
    target.outstanding.fetch_add(1, Ordering::Relaxed);
    ex.target = Some(target.clone());
    Ok(Endpoint { target, service, port: backend.port, traffic })
}

/// The request timeout of the route (the shorter of its request and backend timeouts).
fn route_timeout(ex: &Exchange) -> Option<Duration> {
    let route = ex.route.as_ref()?;
    match (route.request_timeout, route.backend_timeout) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sends `req` to `ep`: with the route's timeout, retried per the most specific retry policy
/// (when its body is small enough to replay), mirrored where asked; reports the outcome to
/// outlier detection.
pub async fn send(
    ctx: &Arc<Context>,
    table: &RouteTable,
    targets: &[PolicyTarget],
    req: RequestCtx,
    ep: &Endpoint,
    h2: bool,
    ex: &mut Exchange,
) -> Result<Response<Incoming>, ProxyError> {
    let RequestCtx { parts, body, upgrade, .. } = req;
    let timeout = route_timeout(ex);
    let replayable =
        body.is_end_stream() || body.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY_BODY as u64);
    let plain = upgrade.is_none() && replayable;
    let retry = targets
        .iter()
        .rev()
        .find_map(|t| table.policy.retries.get(t))
        .filter(|r| r.attempts > 0 && plain)
        .cloned();
    let mirrors: Vec<Mirror> = if plain {
        targets
            .iter()
            .filter_map(|t| table.policy.mirrors.get(t))
            .flatten()
            .filter(|m| m.hit())
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let per_conn = ep.traffic.as_ref().and_then(|t| t.max_requests_per_connection);
    let sent = Instant::now();
    let exchange = async {
        if retry.is_none() && mirrors.is_empty() {
            let counted = Counted::new(body, ex.request_bytes.clone()).boxed();
            let req = Request::from_parts(parts, counted);
            return ctx.upstream.send_limited(&ep.target, h2, req, per_conn).await.map_err(ProxyError::from);
        }
        let limit = ctx.limits.request_body_timeout;
        let body = tokio::time::timeout(limit, body.collect())
            .await
            .map_err(|_| ProxyError::RequestBodyTimeout(limit))?
            .map_err(ProxyError::RequestBody)?
            .to_bytes();
        ex.request_bytes.store(body.len() as u64, Ordering::Relaxed);
        for m in mirrors {
            mirror(ctx.clone(), m, &parts, body.clone(), h2);
        }
        let attempt = Attempt { ctx, target: &ep.target, h2, parts: &parts, body, per_conn };
        let cluster = ex.log.upstream_cluster.clone().unwrap_or_default();
        with_retries(attempt, &retry.unwrap_or_else(RetryPolicy::once), &cluster, &mut ex.upstream_flag).await
    };
    let result = match timeout {
        Some(t) => tokio::time::timeout(t, exchange).await.unwrap_or(Err(ProxyError::UpstreamTimeout(t))),
        None => exchange.await,
    };
    ex.log.upstream_service_time = Some(sent.elapsed().as_millis() as u64);
    report_outcome(ctx, ep, &result);
    let mut response = result.inspect_err(|e| {
        if let ProxyError::Upstream(u) = e {
            debug!(error = %u, "upstream request failed");
            ex.log.upstream_transport_failure_reason = Some(u.to_string());
        }
    })?;
    if let Some((protocol, downstream)) = upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        join_upgrade(ctx, downstream, hyper::upgrade::on(&mut response));
        // Hop-by-hop stripping on the way back must keep what makes this a 101.
        response.extensions_mut().insert(super::respond::Upgraded(protocol));
    }
    Ok(response)
}

/// Outlier detection sees every outcome of a service's endpoint, timeouts (504) included.
fn report_outcome(ctx: &Context, ep: &Endpoint, result: &Result<Response<Incoming>, ProxyError>) {
    let Some(outlier) = ep.traffic.as_ref().and_then(|t| t.outlier.as_ref()) else { return };
    let outcome = match result {
        Ok(r) => Outcome::Status(r.status().as_u16()),
        Err(ProxyError::Upstream(_)) => Outcome::ConnectFailure,
        Err(e) => Outcome::Status(e.status().as_u16()),
    };
    let snapshot = ctx.state.snapshot();
    let all = crate::upstream::Upstream::endpoint_addrs(&snapshot, &ep.service, ep.port);
    ctx.upstream.ejections.report(ep.service.key(), ep.target.addr, outcome, outlier, &all);
}

/// Joins the client's and the upstream's upgraded connections in the background, until either
/// side closes or the drain ends.
fn join_upgrade(ctx: &Context, downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let drain = ctx.drain.clone();
    let Some(guard) = drain.guard() else { return };
    tokio::spawn(async move {
        let join = async {
            match tokio::try_join!(downstream, upstream) {
                Ok((d, u)) => {
                    let counters = common::copy::ByteCounters::default();
                    let _ =
                        common::copy::copy_bidirectional(TokioIo::new(d), TokioIo::new(u), &counters).await;
                }
                Err(e) => debug!(error = %e, "upgrade did not complete"),
            }
        };
        tokio::select! {
            _ = join => {}
            _ = drain.closing() => debug!("drain ended: upgraded connection closed"),
        }
        drop(guard);
    });
}

/// Sends a copy of the request to `m`'s service in the background; its answer is dropped.
fn mirror(ctx: Arc<Context>, m: Mirror, parts: &http::request::Parts, body: bytes::Bytes, h2: bool) {
    let snapshot = ctx.state.snapshot();
    let Some(service) = snapshot.service(&m.service.namespace, &m.service.hostname) else {
        debug!(service = %m.service.key(), "mirror service unknown; not mirrored");
        return;
    };
    let port = if m.service.port == 0 { parts.uri.port_u16().unwrap_or(80) } else { m.service.port };
    let Some(target) = ctx.upstream.choose(&snapshot, service, port) else {
        debug!(service = %m.service.key(), "mirror has no endpoint; not mirrored");
        return;
    };
    let mut req = Request::new(replay(&body));
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
        if let Ok(v) = http::HeaderValue::from_str(&shadow) {
            req.headers_mut().insert(header::HOST, v);
        }
        Uri::builder().path_and_query(path.as_str()).build()
    };
    let Ok(uri) = uri else { return };
    *req.uri_mut() = uri;
    let limit = ctx.limits.request_body_timeout;
    tokio::spawn(async move {
        let exchange = async {
            let r = ctx.upstream.send(&target, h2, req).await?;
            let _ = r.into_body().collect().await;
            Ok::<_, UpstreamError>(())
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(error = %e, "mirrored request failed"),
            Err(_) => debug!("mirrored request timed out"),
        }
    });
}

fn replay(body: &bytes::Bytes) -> ProxyBody {
    http_body_util::Full::new(body.clone()).map_err(|never| match never {}).boxed()
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
    async fn send(&self, per_try: Option<Duration>) -> Result<Response<Incoming>, ProxyError> {
        let mut req = Request::new(replay(&self.body));
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = self.parts.headers.clone();
        let send = self.ctx.upstream.send_limited(self.target, self.h2, req, self.per_conn);
        match per_try {
            Some(t) => tokio::time::timeout(t, send).await.map_err(|_| ProxyError::PerTryTimeout(t))?,
            None => send.await,
        }
        .map_err(ProxyError::from)
    }
}

/// Tries, and tries again per `policy` while the budget allows. Returns the last answer (a
/// retriable status when tries ran out, flagged `URX`) or the last failure.
async fn with_retries(
    attempt: Attempt<'_>,
    policy: &RetryPolicy,
    cluster: &str,
    flag: &mut ResponseFlag,
) -> Result<Response<Incoming>, ProxyError> {
    let retries = &attempt.ctx.retries;
    let _in_flight = retries.request();
    let mut n = 0;
    loop {
        let result = attempt.send(policy.per_try_timeout).await;
        let retriable = match &result {
            Ok(r) => policy.retries_status(r.status()),
            Err(e) => e.retriable() && policy.retries_failure(),
        };
        let Some(slot) = (retriable && n < policy.attempts).then(|| retries.begin(cluster)).flatten() else {
            if n > 0 {
                match &result {
                    Ok(_) if !retriable => retries.succeeded(cluster),
                    _ => *flag = ResponseFlag::UpstreamRetryLimitExceeded,
                }
            }
            return result;
        };
        n += 1;
        tokio::time::sleep(policy.backoff(n)).await;
        drop(slot);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upstream_clusters_are_named_as_envoy_names_them() {
        assert_eq!(
            super::upstream_cluster(8080, "web.ns.svc.cluster.local"),
            "outbound|8080||web.ns.svc.cluster.local"
        );
        assert_eq!(super::upstream_cluster(0, "h"), "outbound|0||h");
    }
}
