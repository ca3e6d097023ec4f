//! ztunnel: the L4 node proxy of the ambient mesh.
//!
//! What exists so far: configuration, the control-plane feed (delta ADS or a local file) into
//! the workload and policy stores, and the metrics, readiness and admin endpoints. The
//! proxies (15001/15006/15008) arrive with the L4 data-plane work.

pub mod app;
pub mod config;
pub mod redirect;
pub mod socket;
