//! ztunnel: the L4 node proxy of the ambient mesh.
//!
//! Configuration (`config`), the indexed mesh state fed by xDS or a local file (`state`), L4
//! authorization (`rbac`), the proxies on 15001/15006/15008 (`proxy`), eBPF pod enrollment
//! (`redirect`) and the sockets redirected traffic needs (`socket`), wired together in `app`; `cli` is the process around it.
//! `cni` enrolls pods at creation, as the CNI plugin hands them over.

pub mod app;
pub mod cli;
pub mod cni;
pub mod config;
pub mod dns;
pub mod ecs;
pub mod proxy;
pub mod redirect;
pub mod socket;
/// The mesh state and L4 authorization live in `common` (the waypoint shares them).
pub use common::{rbac, state};
