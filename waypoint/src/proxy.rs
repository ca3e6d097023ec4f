//! The HTTP request path, as stages over one request context:
//! read (hop-by-hop headers out, path normalized) -> [`admit`] (JWT, authorization, rate
//! limits, faults) -> [`route`] (route, redirect, weighted backend) -> [`rewrite`] (filters,
//! upstream head) -> [`send`] (endpoint, timeouts, retries, mirrors) -> [`respond`] (response
//! filters, record). Each stage returns `Result<_, ProxyError>`; an error is answered locally
//! with its status and response flag (a gRPC status for gRPC requests), logged and counted.

mod admit;
mod error;
mod request;
mod respond;
mod rewrite;
mod route;
mod send;

use std::net::SocketAddr;
use std::sync::Arc;

use common::drain::Watch;
use common::identity::Identity;
use common::state::{Service, State, Workload};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::{Instrument, debug, debug_span, warn};

pub use error::{Blame, ProxyError};

use crate::body::ProxyBody;
use crate::config::Limits;
use crate::filter::authz::Target as PolicyTarget;
use crate::metrics::Metrics;
use crate::route::table::{Lookup, Routes};
use crate::upstream::Upstream;
use request::{Exchange, RequestCtx};

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
    /// Timeouts and path normalization.
    pub limits: Limits,
    /// Work that outlives a request (upgraded connections) ends when the drain does.
    pub drain: Watch,
}

/// The tunnel a request arrived in.
#[derive(Clone, Debug)]
pub struct Downstream {
    /// The service addressed (for a pod address, the first service the pod backs).
    pub service: Arc<Service>,
    pub port: u16,
    /// What the CONNECT asked for: a service VIP or a pod address, and the port.
    pub target_addr: SocketAddr,
    /// The pod, when the CONNECT was addressed to a pod rather than a service: requests go to
    /// that pod, under the policies of the waypoint and of every service the pod backs.
    pub pod: Option<Arc<Workload>>,
    /// What the service port declares: `Some(true)` HTTP/2 (`HTTP2`, `GRPC`), `Some(false)`
    /// HTTP/1.1 (`HTTP11`), `None` to follow the client (gRPC always goes over HTTP/2).
    pub upstream_h2: Option<bool>,
    pub source_identity: Identity,
    pub source_workload: Option<Arc<Workload>>,
    /// The original client (from the CONNECT's `forwarded`, when the peer proved it is that
    /// client), else the peer proxy.
    pub client_addr: SocketAddr,
    pub local_addr: SocketAddr,
    /// The same three as the access log shows them, formatted once per tunnel.
    pub logged: LoggedParties,
    /// What policies attach to for a request in this tunnel before its route is known
    /// ([`Downstream::policy_targets`], built once per tunnel).
    pub targets: Vec<PolicyTarget>,
}

/// A tunnel's client address, local address and caller identity as access log text.
#[derive(Clone, Debug)]
pub struct LoggedParties {
    pub client_addr: Arc<str>,
    pub local_addr: Arc<str>,
    pub principal: Arc<str>,
    /// The client's IP, as `x-forwarded-for` appends it.
    pub client_ip: http::HeaderValue,
    /// What the CONNECT asked for (a pod's address is logged as the upstream host).
    pub target_addr: Arc<str>,
}

impl LoggedParties {
    pub fn new(
        client_addr: SocketAddr,
        local_addr: SocketAddr,
        target_addr: SocketAddr,
        identity: &Identity,
    ) -> Self {
        Self {
            client_addr: client_addr.to_string().into(),
            local_addr: local_addr.to_string().into(),
            principal: identity.to_string().into(),
            client_ip: http::HeaderValue::try_from(client_addr.ip().to_string())
                .unwrap_or_else(|_| http::HeaderValue::from_static("")),
            target_addr: target_addr.to_string().into(),
        }
    }
}

impl Downstream {
    /// The endpoint when the CONNECT was addressed to a pod: that pod, on the port asked for.
    pub fn pod_target(&self) -> Option<crate::upstream::Target> {
        let pod = self.pod.as_ref()?;
        Some(crate::upstream::Target {
            addr: self.target_addr,
            addr_text: self.logged.target_addr.clone(),
            identity: pod.identity.clone(),
            workload: pod.clone(),
            outstanding: Arc::default(),
        })
    }

    /// What policies attach to for a request to `service`, or to `pod` (under the policies of
    /// every service it backs), at the waypoint `waypoint` (before its route is known).
    pub fn policy_targets(waypoint: &str, service: &Service, pod: Option<&Workload>) -> Vec<PolicyTarget> {
        let mut targets = vec![PolicyTarget::Waypoint(waypoint.into())];
        match pod {
            Some(pod) => {
                targets.extend(pod.services.keys().map(|k| PolicyTarget::Service(k.as_str().into())))
            }
            None => targets.push(PolicyTarget::Service(service.key().into())),
        }
        targets
    }
}

/// Handles one request from the tunnel `down`.
pub async fn handle(ctx: Arc<Context>, down: Arc<Downstream>, req: Request<Incoming>) -> Response<ProxyBody> {
    let mut ex = Exchange::new(&ctx, &down, &req);
    let id = ex.log.request_id.as_deref().unwrap_or_default();
    // Debug level: at the default level the span is not built (formatting its fields for every
    // request cost measurable CPU); refusals log their source and path themselves.
    let span = debug_span!("request", %id, source = %down.source_identity, route = tracing::field::Empty);
    // Boxed: the stages' state is some 10 KB; inline, it made every request's future 22 KB,
    // which hyper moves (copies) several times per request.
    let result = Box::pin(process(&ctx, &down, req, &mut ex)).instrument(span.clone()).await;
    let (response, flag) = match result {
        Ok(r) => (r.map(BodyExt::boxed), ex.success_flag()),
        Err(e) => {
            let _entered = span.enter();
            match e.blame() {
                Blame::Upstream | Blame::Config => {
                    warn!(error = %e, flag = %e.flag(), "request answered locally")
                }
                Blame::Downstream | Blame::Policy => {
                    debug!(error = %e, flag = %e.flag(), "request answered locally")
                }
            }
            if let Some(which) = e.timeout() {
                ctx.metrics.timeout(which);
            }
            ex.log.response_code_details = Some(e.details());
            (e.reply(ex.grpc), e.flag())
        }
    };
    respond::finish(ctx, down, ex, response, flag)
}

/// The stages, in order.
async fn process(
    ctx: &Arc<Context>,
    down: &Downstream,
    req: Request<Incoming>,
    ex: &mut Exchange,
) -> Result<Response<Incoming>, ProxyError> {
    let mut req = RequestCtx::new(ctx, req, ex)?;
    let table = ctx.routes.table();
    let lookup = route::select(ctx, down, &table, &req);
    // The tunnel's targets as they are, unless the request has a route.
    let with_route: Vec<PolicyTarget>;
    let targets: &[PolicyTarget] = match &lookup {
        Lookup::Route(s) => {
            tracing::Span::current().record("route", s.route.key.as_str());
            let route = PolicyTarget::Route(s.route.key.as_str().into());
            with_route = down.targets.iter().cloned().chain([route]).collect();
            &with_route
        }
        _ => &down.targets,
    };
    admit::authorize(down, &table, targets, &mut req)?;
    admit::rate_limit(&table, targets)?;
    let selected = match lookup {
        Lookup::NoMatch => return Err(ProxyError::NoRoute),
        Lookup::Default => None,
        Lookup::Route(s) => Some(s),
    };
    admit::faults(&table, targets, ex).await?;
    ex.route = selected.as_ref().map(|s| s.route.clone());
    ex.log.route_name = ex.route.as_ref().map(|r| r.key.clone());
    let backend = route::backend(down, selected.as_ref(), &req)?;
    let rewritten = rewrite::request_filters(&mut req, selected.as_ref(), &backend);
    let ep = send::endpoint(ctx, down, &table, &backend, ex).await?;
    let h2 =
        req.upgrade.is_none() && down.upstream_h2.unwrap_or(req.grpc || req.parts.version == Version::HTTP_2);
    // The client's authority (`Exchange::log.authority`), else the service's name and port.
    let named;
    let authority = match ex.log.authority.as_deref() {
        Some(a) => a,
        None => {
            named = format!("{}:{}", ep.service.hostname, backend.port);
            &named
        }
    };
    rewrite::upstream_head(&mut req, down, ex, rewritten, authority, h2)?;
    send::send(ctx, &table, targets, req, &ep, h2, ex).await
}
