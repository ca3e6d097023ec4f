//! The `mesh` listener: HBONE on 15008 with the waypoint's own identity. A CONNECT is accepted
//! when its authority is a service VIP:port (or a workload address) whose waypoint is this one;
//! anything else is refused with 403 (not ours) or 400 (malformed). The peer's identity, the
//! source workload's as its ztunnel proves it, is kept for policy and telemetry.
//!
//! Inside the tunnel the service port's `app_protocol` decides: TCP and TLS are passed through
//! to an endpoint; everything else is served as HTTP/1.1 or HTTP/2 (h2c, gRPC included).
//!
//! A tunnel to a TCP or TLS port is authorized at L4 before it is accepted (source principal,
//! namespace, IP, destination port), with the policies of the waypoint and the service: past
//! the waypoint the destination's ztunnel only sees the waypoint's identity, so this is where
//! source-based policy applies. Rules that need a request (methods, paths, ...) cannot match
//! here: an ALLOW made of them admits nothing, a DENY made of them refuses (fail closed). A
//! refusal answers 401, as ztunnel's inbound does, with a log line and
//! `istio_authorization_decisions_total{direction="waypoint"}`.

pub mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use common::copy::{ByteCounters, copy_bidirectional};
use common::drain::Watch;
use common::hbone::HboneStream;
use common::hbone::connect::Authority;
use common::hbone::server::{BoxFuture, ConnectHandler, ConnectRequest, Decision};
use common::metrics::{Parties, TrafficLabels};
use common::state::{Gateway, GatewayTarget, Service, Snapshot};
use http::StatusCode;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, info, warn};
use tunnel::{Activity, Tracked};

use common::rbac::{self, Verdict};

use crate::filter::authz;
use crate::proxy::{self, Context, Downstream};

/// Who this waypoint is, as services name their waypoint.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SelfRef {
    /// `namespace/hostname` of the waypoint's own service.
    pub service: (String, String),
    /// The waypoint's own addresses (pod IPs).
    pub addresses: Vec<IpAddr>,
}

impl SelfRef {
    /// Whether `gateway` designates this waypoint.
    pub fn is(&self, gateway: &Gateway, snapshot: &Snapshot) -> bool {
        match &gateway.target {
            GatewayTarget::Hostname { namespace, hostname } => {
                (namespace, hostname) == (&self.service.0, &self.service.1)
            }
            GatewayTarget::Address { ip, .. } => {
                self.addresses.contains(ip)
                    || snapshot
                        .service(&self.service.0, &self.service.1)
                        .is_some_and(|s| s.vips.iter().any(|(_, vip)| vip == ip))
            }
        }
    }
}

pub struct Listener {
    pub ctx: Arc<Context>,
    pub me: SelfRef,
    pub drain: Watch,
}

impl ConnectHandler for Listener {
    fn handle(&self, req: ConnectRequest) -> BoxFuture<Decision> {
        let decision = self.decide(req);
        Box::pin(async move { decision })
    }
}

/// What a CONNECT asked for, once accepted.
struct Accepted {
    down: Arc<Downstream>,
    tcp: bool,
}

impl Listener {
    fn decide(&self, req: ConnectRequest) -> Decision {
        let Some(guard) = self.drain.guard() else {
            return Decision::Refuse(StatusCode::SERVICE_UNAVAILABLE, "draining".into());
        };
        let snapshot = self.ctx.state.snapshot();
        let accepted = match self.resolve(&snapshot, &req) {
            Ok(a) => a,
            Err((status, reason)) => {
                warn!(authority = %req.authority, peer = %req.peer, %reason, "CONNECT refused");
                return Decision::Refuse(status, reason);
            }
        };
        if accepted.tcp
            && let Err(reason) = self.authorize_tunnel(&accepted.down)
        {
            warn!(authority = %req.authority, peer = %req.peer, %reason, "tunnel to a TCP port denied by policy");
            return Decision::Refuse(StatusCode::UNAUTHORIZED, reason);
        }
        let (ctx, drain) = (self.ctx.clone(), self.drain.clone());
        Decision::Accept(Box::new(move |stream| {
            Box::pin(async move {
                if accepted.tcp {
                    tokio::select! {
                        _ = passthrough(ctx, accepted.down, stream) => {}
                        _ = drain.closing() => {}
                    }
                } else {
                    serve_http(ctx, accepted.down, stream, drain).await;
                }
                drop(guard);
            })
        }))
    }

    /// L4 authorization of a tunnel to a TCP/TLS port, with the waypoint's and the service's
    /// policies; counted either way.
    fn authorize_tunnel(&self, down: &Downstream) -> Result<(), String> {
        let table = self.ctx.routes.table();
        let policies = authz::applicable(&table.policy.authz, &down.targets);
        if policies.is_empty() {
            self.ctx.metrics.decision("allow", "-");
            return Ok(());
        }
        let conn = rbac::Connection {
            source: Some(&down.source_identity),
            source_ip: down.client_addr.ip(),
            destination_ip: down.local_addr.ip(),
            destination_port: down.port,
            http: None,
        };
        let verdict = rbac::evaluate(&policies, &conn);
        let policy = match &verdict {
            Verdict::DeniedBy(p) => p.as_str(),
            _ => "-",
        };
        self.ctx.metrics.decision(if verdict.is_allow() { "allow" } else { "deny" }, policy);
        if verdict.is_allow() { Ok(()) } else { Err(verdict.reason().to_string()) }
    }

    fn resolve(&self, snapshot: &Snapshot, req: &ConnectRequest) -> Result<Accepted, (StatusCode, String)> {
        let addr = match &req.authority {
            Authority::Addr(a) => *a,
            Authority::Host { .. } => {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!("authority {} is not a service address", req.authority),
                ));
            }
        };
        let not_ours = || (StatusCode::FORBIDDEN, format!("{addr} is not served by this waypoint"));
        let (service, pod): (Arc<Service>, _) = match snapshot.service_by_vip(addr.ip()) {
            Some(svc) if svc.waypoint.as_ref().is_some_and(|g| self.me.is(g, snapshot)) => {
                (svc.clone(), None)
            }
            Some(_) => return Err(not_ours()),
            None => {
                // A pod address: the request goes to that pod, not to its service's endpoints.
                let w = snapshot.workload_by_ip(addr.ip()).ok_or_else(not_ours)?;
                if !w.waypoint.as_ref().is_some_and(|g| self.me.is(g, snapshot)) {
                    return Err(not_ours());
                }
                (snapshot.service_of(w).cloned().ok_or_else(not_ours)?, Some(w.clone()))
            }
        };
        // A pod address names the pod's port; the protocol is the one of the service port that
        // targets it.
        let port = match &pod {
            None => service.port(addr.port()).cloned(),
            Some(w) => w
                .services
                .get(service.key())
                .and_then(|ports| {
                    ports.iter().find(|p| p.target_port == addr.port() || p.service_port == addr.port())
                })
                .and_then(|p| service.port(p.service_port))
                .cloned(),
        };
        if pod.is_none() && !service.ports.is_empty() && port.is_none() {
            return Err((
                StatusCode::FORBIDDEN,
                format!("service {} has no port {}", service.hostname, addr.port()),
            ));
        }
        let protocol = port.as_ref().map_or("UNKNOWN", |p| p.app_protocol);
        // The original client, believed only when the peer proves the identity of the workload
        // at that address (as ztunnel's inbound does); otherwise the peer itself.
        let proven = common::hbone::proven_client(&req.headers, &req.peer, snapshot);
        let client_addr = proven.map_or(req.peer_addr, |(a, _)| a);
        let source_workload = proven.map(|(_, w)| w.clone()).or_else(|| {
            snapshot.workload_by_ip(req.peer_addr.ip()).filter(|w| w.identity == req.peer).cloned()
        });
        let targets = Downstream::policy_targets(&self.ctx.waypoint, &service, pod.as_deref());
        let down = Downstream {
            service,
            port: port.as_ref().map_or(addr.port(), |p| p.service_port),
            target_addr: addr,
            pod,
            upstream_h2: match protocol {
                "HTTP2" | "GRPC" => Some(true),
                "HTTP11" => Some(false),
                _ => None,
            },
            logged: crate::proxy::LoggedParties::new(client_addr, req.local_addr, addr, &req.peer),
            targets,
            source_identity: req.peer.clone(),
            source_workload,
            client_addr,
            local_addr: req.local_addr,
        };
        Ok(Accepted { down: Arc::new(down), tcp: matches!(protocol, "TCP" | "TLS") })
    }
}

/// Serves HTTP in one tunnel: once its protocol is known (within the detection timeout), until
/// it has been idle for the idle timeout. When the drain starts, the connection is shut down
/// gracefully (requests in flight finish, HTTP/2 gets GOAWAY, idle HTTP/1.1 keep-alive closes);
/// when the drain period ends it is dropped.
async fn serve_http(ctx: Arc<Context>, down: Arc<Downstream>, stream: HboneStream, drain: Watch) {
    let limits = ctx.limits.clone();
    let stream = match tunnel::detect(stream, limits.protocol_detection_timeout).await {
        Ok(s) => s,
        Err(e) => {
            if matches!(e, tunnel::DetectError::Timeout(_)) {
                ctx.metrics.timeout("protocol_detection");
            }
            debug!(source = %down.source_identity, error = %e, "tunnel closed before a request");
            return;
        }
    };
    let activity = Activity::new();
    let (svc_ctx, svc_activity) = (ctx.clone(), activity.clone());
    let svc = service_fn(move |req| {
        let (ctx, down, guard) = (svc_ctx.clone(), down.clone(), svc_activity.begin());
        // Boxed: hyper keeps the request's future in its dispatcher, and moving it there inline
        // copied its kilobytes for every request.
        Box::pin(async move {
            let response = proxy::handle(ctx, down, req).await;
            Ok::<_, std::convert::Infallible>(response.map(|b| Tracked::new(b, guard)))
        })
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.draining() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = drain.closing() => Ok(()),
            }
        }
        _ = activity.idle(limits.idle_timeout) => {
            ctx.metrics.timeout("idle");
            debug!(idle = ?limits.idle_timeout, "tunnel idle: closing");
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = tokio::time::sleep(limits.h2_keepalive_timeout) => Ok(()),
                _ = drain.closing() => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP in the tunnel ended");
    }
}

/// TCP (or TLS) ports: bytes go to an endpoint as they are.
async fn passthrough(ctx: Arc<Context>, down: Arc<Downstream>, stream: HboneStream) {
    let snapshot = ctx.state.snapshot();
    let chosen = down.pod_target().or_else(|| ctx.upstream.choose(&snapshot, &down.service, down.port));
    let Some(target) = chosen else {
        warn!(service = %down.service.hostname, "TCP passthrough: no healthy endpoint");
        return;
    };
    let upstream = match ctx.upstream.tunnel(&target, Some(down.client_addr)).await {
        Ok(u) => u,
        Err(e) => {
            if matches!(e, crate::upstream::UpstreamError::ConnectTimeout { .. }) {
                ctx.metrics.timeout("upstream_connect");
            }
            warn!(error = %e, "TCP passthrough: upstream unreachable");
            return;
        }
    };
    let counters = ByteCounters::default();
    if let Err(e) = copy_bidirectional(stream, upstream, &counters).await {
        debug!(error = %e, "TCP passthrough ended with an error");
    }
    let parties = Parties {
        source: down.source_workload.as_deref(),
        source_identity: Some(&down.source_identity),
        destination: Some(&target.workload),
        destination_identity: Some(&target.identity),
        service: Some(&down.service),
    };
    ctx.metrics.tcp(
        &TrafficLabels::new("waypoint", parties, "tcp", "-", true),
        counters.sent(),
        counters.received(),
    );
    info!(target: "access", service = %down.service.hostname, upstream = %target.addr, sent = counters.sent(), received = counters.received(), "TCP connection complete");
}

/// Binds the mesh listener on `addr`.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
