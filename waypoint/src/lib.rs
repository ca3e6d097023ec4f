//! waypoint: the per-namespace L7 proxy of the ambient mesh (HBONE in, HTTPRoute/GRPCRoute
//! routing and L7 policy, HBONE out).
//!
//! Not built yet: this crate is reserved for the waypoint issues. It will take its workload
//! state from the shared `common::xds` client, as ztunnel does.
