//! Generated wire types. Nothing hand-written here beyond module wiring and type-URL constants.
#![allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]

pub mod envoy {
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod ambient {
    /// Test-only service used by the integration tests.
    pub mod testing {
        pub mod v1 {
            tonic::include_proto!("ambient.testing.v1");
        }
    }
    pub mod waypoint {
        pub mod v1alpha1 {
            tonic::include_proto!("ambient.waypoint.v1alpha1");
        }
    }
}

/// OTLP (the subset the waypoint exports).
pub mod opentelemetry {
    pub mod proto {
        pub mod common {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.common.v1");
            }
        }
        pub mod resource {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.resource.v1");
            }
        }
        pub mod trace {
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.trace.v1");
            }
        }
        pub mod collector {
            pub mod trace {
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
                }
            }
        }
    }
}

pub use ambient::waypoint::v1alpha1 as waypoint;
pub use envoy::service::discovery::v3 as discovery;
pub use istio::security;
pub use istio::workload;

/// Type URL of `istio.workload.Address` resources (workloads and services).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of `istio.security.Authorization` resources (L4 authorization policies).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
/// Type URL of the waypoint's L7 resources (routes and policies).
pub const WAYPOINT_RESOURCE_TYPE_URL: &str = "type.googleapis.com/ambient.waypoint.v1alpha1.Resource";
