//! The waypoint accepts no tunnel before its first sync (routes, policies, workloads) and its
//! certificate: a peer that connects early waits in the listener's backlog instead of meeting a
//! waypoint that knows no policy, and is served once the control plane has spoken. Over
//! loopback; no root needed.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use common::hbone::client::Connection;
use common::identity::{Identity, LocalCa};
use mesh_tests::xds_server::{self, XdsStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_accepts_nothing_before_the_first_sync() {
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path").to_string();
    // A port for the control plane, which is not up yet.
    let xds_addr = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
    let url = format!("http://{xds_addr}");
    let args = waypoint::config::Args::try_parse_from([
        "waypoint",
        "--xds-address",
        &url,
        "--local-ca",
        &ca,
        "--name",
        "waypoint",
        "--namespace",
        "demo",
        "--listen-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
    ])
    .expect("flags");
    let config = waypoint::config::Config::from_args(args).expect("config");
    let wp = waypoint::app::App::start(config).await.expect("waypoint starts");
    let addr = wp.listen_addr;

    let local = LocalCa::load_or_create(ca_dir.path(), "cluster.local").expect("ca");
    let me = Identity::new("cluster.local", "demo", "client").expect("id");
    let cert = local.issue(&me, Duration::from_secs(600)).expect("cert");
    let wp_id = Identity::new("cluster.local", "demo", "waypoint").expect("id");
    let tls = Arc::new(common::tls::client_config(&cert, vec![wp_id]).expect("tls"));

    // Early: the TCP handshake completes (backlog), TLS does not.
    let early = tokio::spawn(Connection::connect(addr, tls.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!early.is_finished(), "the waypoint answered before its first sync: {:?}", wp.ready.pending());

    // The control plane comes up: the waiting peer is served.
    let store = XdsStore::new();
    store.load_yaml("workloads: []\n").expect("config");
    let xds = xds_server::start(xds_addr, store).await.expect("xds server");
    tokio::time::timeout(mesh_tests::CONVERGE_TIMEOUT, wp.ready.wait())
        .await
        .unwrap_or_else(|_| panic!("waypoint never ready: {:?}", wp.ready.pending()));
    let conn = tokio::time::timeout(Duration::from_secs(10), early)
        .await
        .expect("served once synced")
        .expect("join")
        .expect("mTLS to the waypoint once synced");
    assert!(conn.is_open());
    xds.stop().await;
}
