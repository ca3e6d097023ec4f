//! Why a request was answered by the waypoint itself: one error type for every stage, which
//! knows its HTTP status, response flag, whom to blame and whether a retry may help, and renders
//! the local reply (a gRPC status for gRPC requests, text otherwise).

use std::time::Duration;

use common::flags::ResponseFlag;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, ProxyBody};
use crate::filter::jwt::JwtError;
use crate::route::normalize::NormalizeError;
use crate::upstream::UpstreamError;

/// Who caused a local reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something we refuse to process.
    Downstream,
    /// A policy (authorization, authentication, rate limit, fault) decided.
    Policy,
    /// The upstream failed or was unreachable.
    Upstream,
    /// Our configuration leaves no way to serve the request.
    Config,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("path {path:?} cannot be normalized: {source}")]
    BadPath { path: String, source: NormalizeError },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("JWT refused: {0}")]
    Jwt(#[from] JwtError),
    #[error("RBAC: access denied ({reason})")]
    Denied { policy: String, reason: String },
    #[error("local rate limit reached")]
    RateLimited,
    #[error("no route matched")]
    NoRoute,
    #[error("fault injected: abort with {0}")]
    FaultAbort(StatusCode),
    #[error("redirect ({status}) to {location}")]
    Redirect { status: StatusCode, location: String },
    #[error("every backend of route {0} has weight 0")]
    ZeroWeights(String),
    #[error("backend {0} is not a known service")]
    UnknownBackend(String),
    #[error("request cap of {0} reached")]
    Overflow(String),
    #[error("no healthy endpoint for {0}")]
    NoHealthyUpstream(String),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("upstream try did not answer within {0:?}")]
    PerTryTimeout(Duration),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("request body: {0}")]
    RequestBody(hyper::Error),
    #[error("request body stalled for {0:?} while buffered for retries")]
    RequestBodyTimeout(Duration),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadPath { .. } | ProxyError::BadRequest(_) | ProxyError::RequestBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::Jwt(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::FaultAbort(s) => *s,
            ProxyError::Redirect { status, .. } => *status,
            ProxyError::ZeroWeights(_) | ProxyError::UnknownBackend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::Overflow(_) | ProxyError::NoHealthyUpstream(_) | ProxyError::Upstream(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamTimeout(_) | ProxyError::PerTryTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::RequestBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn flag(&self) -> ResponseFlag {
        match self {
            ProxyError::BadPath { .. } | ProxyError::BadRequest(_) => ResponseFlag::DownstreamProtocolError,
            ProxyError::RequestBody(_) => ResponseFlag::DownstreamConnectionTermination,
            ProxyError::RequestBodyTimeout(_) => ResponseFlag::StreamIdleTimeout,
            // Envoy has no flag for RBAC and JWT refusals: they say why in the details.
            ProxyError::Jwt(_) | ProxyError::Denied { .. } | ProxyError::Redirect { .. } => {
                ResponseFlag::None
            }
            ProxyError::RateLimited => ResponseFlag::RateLimited,
            ProxyError::NoRoute | ProxyError::ZeroWeights(_) | ProxyError::UnknownBackend(_) => {
                ResponseFlag::NoRoute
            }
            ProxyError::FaultAbort(_) => ResponseFlag::FaultInjected,
            ProxyError::Overflow(_) => ResponseFlag::UpstreamOverflow,
            ProxyError::NoHealthyUpstream(_) => ResponseFlag::NoHealthyUpstream,
            ProxyError::UpstreamTimeout(_) | ProxyError::PerTryTimeout(_) => {
                ResponseFlag::UpstreamRequestTimeout
            }
            ProxyError::Upstream(_) => ResponseFlag::UpstreamConnectionFailure,
        }
    }

    pub fn blame(&self) -> Blame {
        match self {
            ProxyError::BadPath { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::RequestBody(_)
            | ProxyError::RequestBodyTimeout(_) => Blame::Downstream,
            ProxyError::Jwt(_)
            | ProxyError::Denied { .. }
            | ProxyError::RateLimited
            | ProxyError::FaultAbort(_)
            | ProxyError::Redirect { .. } => Blame::Policy,
            ProxyError::NoRoute | ProxyError::ZeroWeights(_) | ProxyError::UnknownBackend(_) => Blame::Config,
            ProxyError::Overflow(_)
            | ProxyError::NoHealthyUpstream(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::PerTryTimeout(_)
            | ProxyError::Upstream(_) => Blame::Upstream,
        }
    }

    /// Whether another try at another (or the same) endpoint may succeed: the request never
    /// reached the application, or that try timed out.
    pub fn retriable(&self) -> bool {
        matches!(self, ProxyError::Upstream(_) | ProxyError::PerTryTimeout(_))
    }

    /// The waypoint bound that fired, for `istio_waypoint_timeouts_total{timeout}`.
    pub fn timeout(&self) -> Option<&'static str> {
        match self {
            ProxyError::RequestBodyTimeout(_) => Some("request_body"),
            ProxyError::Upstream(UpstreamError::ConnectTimeout { .. }) => Some("upstream_connect"),
            _ => None,
        }
    }

    /// Envoy's `response_code_details` for this reply.
    pub fn details(&self) -> String {
        match self {
            ProxyError::BadPath { .. } => "path_normalization_failed".into(),
            ProxyError::BadRequest(_) => "downstream_bad_request".into(),
            ProxyError::Jwt(_) => "jwt_authn_access_denied".into(),
            ProxyError::Denied { policy, .. } => format!("rbac_access_denied_matched_policy[{policy}]"),
            ProxyError::RateLimited => "local_rate_limited".into(),
            ProxyError::NoRoute => "route_not_found".into(),
            ProxyError::FaultAbort(_) => "fault_filter_abort".into(),
            ProxyError::Redirect { .. } => "direct_response".into(),
            ProxyError::ZeroWeights(_) | ProxyError::UnknownBackend(_) => "cluster_not_found".into(),
            ProxyError::Overflow(_) => "upstream_overflow".into(),
            ProxyError::NoHealthyUpstream(_) => "no_healthy_upstream".into(),
            ProxyError::UpstreamTimeout(_) => "upstream_response_timeout".into(),
            ProxyError::PerTryTimeout(_) => "upstream_per_try_timeout".into(),
            ProxyError::Upstream(_) => "upstream_connect_failure".into(),
            ProxyError::RequestBody(_) => "downstream_remote_disconnect".into(),
            ProxyError::RequestBodyTimeout(_) => "request_body_timeout".into(),
        }
    }

    /// The body text of a local reply: short, and nothing the client did not already know.
    fn message(&self) -> String {
        match self {
            ProxyError::Denied { .. } => "RBAC: access denied".into(),
            ProxyError::Jwt(e) => e.to_string(),
            ProxyError::Upstream(_) => "upstream connect error".into(),
            other => other.details(),
        }
    }

    /// The local reply: gRPC requests get a trailers-only gRPC answer (HTTP 200 with
    /// `grpc-status` and `grpc-message`), everything else a text body with the status.
    pub fn reply(&self, grpc: bool) -> Response<ProxyBody> {
        let status = self.status();
        if let ProxyError::Redirect { location, .. } = self {
            let mut r = Response::new(body::empty());
            *r.status_mut() = status;
            if let Ok(v) = HeaderValue::from_str(location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        let message = self.message();
        if grpc {
            let mut r = Response::new(body::empty());
            let h = r.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            h.insert("grpc-status", HeaderValue::from(grpc_status(status)));
            if let Ok(v) = HeaderValue::from_str(&grpc_message(&message)) {
                h.insert("grpc-message", v);
            }
            return r;
        }
        let mut r = Response::new(body::text(format!("{message}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    }
}

/// The gRPC status for an HTTP status (gRPC's "HTTP to gRPC status code mapping", which Envoy
/// applies to its local replies).
pub fn grpc_status(status: StatusCode) -> u16 {
    match status.as_u16() {
        400 => 13,             // INTERNAL
        401 => 16,             // UNAUTHENTICATED
        403 => 7,              // PERMISSION_DENIED
        404 => 12,             // UNIMPLEMENTED
        408 | 504 => 4,        // DEADLINE_EXCEEDED
        429 | 502 | 503 => 14, // UNAVAILABLE
        _ => 2,                // UNKNOWN
    }
}

/// `grpc-message` is percent-encoded: printable ASCII except `%` stays, the rest is escaped.
fn grpc_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_requests_get_a_grpc_status() {
        let e = ProxyError::Denied { policy: "demo/no".into(), reason: "denied".into() };
        let r = e.reply(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-message"], "RBAC: access denied");
        let plain = e.reply(false);
        assert_eq!(plain.status(), StatusCode::FORBIDDEN);
        assert_eq!(ProxyError::RateLimited.reply(true).headers()["grpc-status"], "14");
        assert_eq!(grpc_message("50% done\n"), "50%25 done%0A");
    }

    #[test]
    fn every_error_knows_its_flag_and_blame() {
        let timeout = ProxyError::PerTryTimeout(Duration::from_millis(5));
        assert_eq!(
            (timeout.flag().as_str(), timeout.blame(), timeout.retriable()),
            ("UT", Blame::Upstream, true)
        );
        assert_eq!(ProxyError::NoRoute.flag().as_str(), "NR");
        assert!(!ProxyError::RateLimited.retriable());
        let r = ProxyError::Redirect { status: StatusCode::MOVED_PERMANENTLY, location: "http://x/y".into() }
            .reply(true);
        assert_eq!(
            (r.status(), &r.headers()["location"]),
            (StatusCode::MOVED_PERMANENTLY, &HeaderValue::from_static("http://x/y"))
        );
    }
}
