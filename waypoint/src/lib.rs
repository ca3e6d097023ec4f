//! waypoint: the per-namespace L7 proxy of the ambient mesh. HBONE in on the `mesh` listener
//! (`listener`), HTTPRoute/GRPCRoute routing (`route`), the request path (`proxy`), HBONE out to
//! endpoints (`upstream`), request metrics and access log (`metrics`), wired in `app`.

pub mod app;
pub mod body;
pub mod config;
pub mod convert;
pub mod filter {
    //! Request stages that may refuse a request.
    pub mod authz;
    pub mod fault;
    pub mod jwt;
    pub mod mirror;
    pub mod ratelimit;
    pub mod retry;
    pub mod trace;
    pub mod traffic;
}
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod upstream;
