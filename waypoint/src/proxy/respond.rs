//! Responding: response filters on the way back, then the record (metrics, access log, trace
//! span) written once the response body has ended.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use common::flags::ResponseFlag;
use http::Response;
use http::header::{self, HeaderValue};
use http_body_util::BodyExt;

use super::request::{Exchange, strip_hop_by_hop};
use super::rewrite::apply_headers;
use super::{Context, Downstream};
use crate::body::{Observed, ProxyBody};
use crate::metrics::{RequestKey, rfc3339};
use crate::route::Filter;
use common::metrics::PartiesKey;

/// Marks a 101 response whose `connection`/`upgrade` headers must reach the client.
#[derive(Clone)]
pub struct Upgraded(pub HeaderValue);

/// Applies response filters and wraps the body so the request is recorded when it ends.
pub fn finish(
    ctx: Arc<Context>,
    down: Arc<Downstream>,
    mut ex: Exchange,
    response: Response<ProxyBody>,
    flag: ResponseFlag,
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
    ex.log.response_flags = flag.as_str();
    let observed = Observed::new(body, move |done| {
        if let Some(t) = &ex.target {
            t.outstanding.fetch_sub(1, Ordering::Relaxed);
        }
        let flag = if done.aborted && flag == ResponseFlag::None {
            ResponseFlag::DownstreamConnectionTermination
        } else {
            flag
        };
        record(&ctx, &down, &mut ex, status, flag, done.bytes, done.grpc_status.or(header_grpc_status));
    });
    Response::from_parts(parts, observed.boxed())
}

/// Metrics, the access log line and the trace span of a finished exchange.
fn record(
    ctx: &Context,
    down: &Downstream,
    ex: &mut Exchange,
    status: http::StatusCode,
    flag: ResponseFlag,
    bytes_sent: u64,
    grpc_status: Option<String>,
) {
    let parties = PartiesKey {
        source: down.source_workload.clone(),
        source_identity: Some(down.source_identity.clone()),
        destination: ex.target.as_ref().map(|t| t.workload.clone()),
        destination_identity: ex.target.as_ref().map(|t| t.identity.clone()),
        service: Some(ex.backend_service.clone().unwrap_or_else(|| down.service.clone())),
    };
    let key = RequestKey { parties, grpc: ex.grpc, flag: flag.as_str(), code: status.as_u16(), grpc_status };
    let duration = ex.start.elapsed();
    ex.log.duration = duration.as_millis() as u64;
    ex.log.bytes_received = ex.request_bytes.load(Ordering::Relaxed);
    ex.log.bytes_sent = bytes_sent;
    ex.log.response_flags = flag.as_str();
    ex.log.start_time = rfc3339(ex.start_time);
    ctx.metrics.request(key, duration, ex.log.bytes_received, bytes_sent, &ex.log);
    if let Some(span) = ex.span.take().filter(|s| s.ctx.sampled && ctx.tracer.enabled()) {
        let name = ex.route.as_ref().map_or_else(|| down.service.hostname.clone(), |r| r.key.clone());
        let attributes = vec![
            ("http.method", ex.log.method.clone().unwrap_or_default()),
            ("http.url", ex.log.path.clone().unwrap_or_default()),
            ("http.status_code", status.as_u16().to_string()),
            ("upstream_cluster", ex.log.upstream_cluster.clone().unwrap_or_default()),
            ("upstream_host", ex.log.upstream_host.as_deref().unwrap_or_default().to_string()),
            ("response_flags", flag.as_str().to_string()),
            ("request_id", ex.log.request_id.clone().unwrap_or_default()),
            ("peer.principal", down.source_identity.to_string()),
        ];
        ctx.tracer.record(span.finish(name, attributes, status.as_u16()));
    }
}
