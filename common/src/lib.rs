//! What ztunnel, waypoint and the controller share: the app skeleton, the delta-ADS xDS client
//! and its local-file twin, the indexed mesh state and L4 authorization, the translation of
//! Kubernetes objects, identity, mTLS and HBONE, byte copying, drain, readiness, metrics and
//! admin plumbing, and logging setup.

pub mod admin;
pub mod app;
pub mod backoff;
pub mod copy;
pub mod drain;
pub mod fetch;
pub mod flags;
pub mod grpc;
pub mod hbone;
pub mod hex;
pub mod identity;
pub mod metrics;
pub mod rbac;
pub mod readiness;
pub mod select;
pub mod state;
pub mod telemetry;
pub mod throttle;
pub mod tls;
pub mod translate;
pub mod xds;
