//! Admission: what may refuse a request before it is routed anywhere. Request authentication
//! (a present token must verify), authorization (the waypoint's, the service's and the route's
//! policies, on the normalized path and host), local rate limits, then injected faults.

use std::sync::Arc;

use common::rbac::{self, Verdict};
use tracing::warn;

use super::request::{Exchange, RequestCtx};
use super::{Downstream, ProxyError};
use crate::filter::authz::{self, Target};
use crate::filter::jwt::Verified;
use crate::route::table::RouteTable;

/// Verifies the request's token (if any) and authorizes the request. Returns the verified
/// token, for headers and the record.
pub fn authorize(
    down: &Downstream,
    table: &RouteTable,
    targets: &[Target],
    req: &mut RequestCtx,
) -> Result<Option<Verified>, ProxyError> {
    let jwt_rules: Vec<_> =
        targets.iter().filter_map(|t| table.policy.jwt.get(t)).flatten().cloned().collect();
    let verified = if jwt_rules.is_empty() {
        None
    } else {
        crate::filter::jwt::authenticate(&jwt_rules, &mut req.parts.headers, req.query.as_deref()).map_err(
            |e| {
                warn!(source = %down.source_identity, error = %e, "request refused: invalid JWT");
                ProxyError::Jwt(e)
            },
        )?
    };
    let policies = authz::applicable(&table.policy.authz, targets);
    if policies.is_empty() {
        return Ok(verified);
    }
    let request = rbac::Request {
        host: &req.host,
        port: req.authority_port,
        method: req.parts.method.as_str(),
        path: &req.path,
        headers: &req.parts.headers,
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
    if verdict.is_allow() {
        return Ok(verified);
    }
    let policy = match &verdict {
        Verdict::DeniedBy(p) => p.clone(),
        _ => "none".into(),
    };
    warn!(source = %down.source_identity, path = %req.path, host = %req.host, reason = %verdict.reason(), "request denied by policy");
    Err(ProxyError::Denied { policy, reason: verdict.reason() })
}

/// Takes a token from every local rate limit of `targets`, or from none.
pub fn rate_limit(table: &RouteTable, targets: &[Target]) -> Result<(), ProxyError> {
    let buckets = targets.iter().filter_map(|t| table.policy.limits.get(t)).flatten();
    if crate::filter::ratelimit::acquire_all(buckets) { Ok(()) } else { Err(ProxyError::RateLimited) }
}

/// Injected faults of `targets`: delays first (recorded as `DI`), then aborts.
pub async fn faults(table: &RouteTable, targets: &[Target], ex: &mut Exchange) -> Result<(), ProxyError> {
    let faults: Vec<Arc<crate::filter::fault::Fault>> =
        targets.iter().filter_map(|t| table.policy.faults.get(t)).flatten().cloned().collect();
    for fault in faults {
        if let Some(d) = fault.delay() {
            tokio::time::sleep(d).await;
            ex.delayed = true;
        }
        if let Some(status) = fault.abort() {
            let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
            return Err(ProxyError::FaultAbort(status));
        }
    }
    Ok(())
}
