//! Compiles the `.proto` files with protox (pure Rust, no system `protoc`) and generates prost
//! messages and tonic client/server stubs from the resulting descriptor set.

fn main() -> anyhow::Result<()> {
    let files = [
        "proto/envoy/service/discovery/v3/discovery.proto",
        "proto/istio/workload/workload.proto",
        "proto/istio/security/authorization.proto",
        "proto/istio/v1/auth/ca.proto",
        "proto/ambient/waypoint/v1alpha1/resource.proto",
        "proto/ambient/testing/v1/echo.proto",
        "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Deterministic map order: stable encodings, versions and byte-for-byte round trips.
        .btree_map(".")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
