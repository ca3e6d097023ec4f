//! The ztunnel app in-process against the in-repo xDS server: not ready until the first sync,
//! then ready, with the synced resources in the config dump and xDS metrics exposed.

use std::time::{Duration, Instant};

use common::xds::{NodeInfo, Source, XdsConfig};
use mesh_tests::http::get;
use mesh_tests::xds_server::{self, XdsStore};
use ztunnel::app::App;
use ztunnel::config::Config;

fn config(source: Source) -> Config {
    let any = "127.0.0.1:0".parse().expect("addr");
    Config {
        source,
        source_description: "test".into(),
        node_name: "node-a".into(),
        node: NodeInfo { proxy_type: "ztunnel".into(), ..Default::default() },
        admin_addr: any,
        metrics_addr: any,
        readiness_addr: any,
        log_format: common::telemetry::LogFormat::Text,
        redirect: false,
        uplinks: vec![],
        static_pods: vec![],
        redirect_settings: ebpf::Settings::default(),
        network: String::new(),
        ca: ztunnel::config::CaConfig::Local { dir: std::env::temp_dir().join("ztunnel-app-test-ca") },
        cert_lifetime: ztunnel::config::DEFAULT_CERT_LIFETIME,
        proxy: None,
        drain_period: ztunnel::config::DEFAULT_DRAIN_PERIOD,
        enrollment: None,
        dns: None,
        host: None,
        inbound_bypass_ports: Vec::new(),
    }
}

#[tokio::test]
async fn ready_after_first_sync_with_dump_and_metrics() {
    // No control plane yet: the app starts but is not ready.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("reserve port");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let node = NodeInfo { proxy_type: "ztunnel".into(), ..Default::default() };
    let mut xds = XdsConfig::new(format!("http://{addr}"), node);
    xds.backoff_max = Duration::from_millis(100);
    let app = App::start(config(Source::Xds(Box::new(xds)))).await.expect("app starts");
    let (status, body) = get(app.readiness_addr, "/healthz/ready").await.expect("readiness");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("xds initial sync"), "{body}");

    // The control plane comes up with the demo mesh: the app syncs and turns ready.
    let store = XdsStore::new();
    let demo = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local-mesh.yaml"))
        .expect("demo config");
    let n = store.load_yaml(&demo).expect("demo config loads");
    let server = xds_server::start(addr, store).await.expect("server");
    let start = Instant::now();
    loop {
        let (status, _) = get(app.readiness_addr, "/healthz/ready").await.expect("readiness");
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ztunnel does not subscribe to the waypoint's routes.
    let routes = common::translate::Translator::default()
        .translate_yaml([("demo", demo.as_str())])
        .resources
        .iter()
        .filter(|r| r.type_url == proto::WAYPOINT_RESOURCE_TYPE_URL)
        .count();
    assert_eq!(app.addresses.len() + app.policies.len(), n - routes);

    // The heap as jemalloc sees it (the binaries' allocator; this test's is the system one, so
    // only its shape is checked). The resident figures are this process's: they must agree
    // with what it reads itself just before and after, and their parts add up.
    let own_rss = || {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        common::admin::status_kib(&status, "VmRSS:").expect("VmRSS in kB") * 1024
    };
    let before = own_rss();
    let (status, memory) = get(app.admin_addr, "/memory").await.expect("memory");
    let after = own_rss();
    assert_eq!(status, 200, "{memory}");
    let memory: serde_json::Value = serde_json::from_str(&memory).expect("memory is JSON");
    for field in ["allocated", "active", "metadata", "resident", "mapped", "retained", "thread_caches"] {
        assert!(memory[field].is_u64(), "{field} in {memory}");
    }
    let figure = |f: &str| memory[f].as_u64().unwrap_or_else(|| panic!("{f} in {memory}"));
    let rss = figure("process_resident");
    let (low, high) = (before.min(after), before.max(after));
    assert!(rss >= low - low / 5 && rss <= high + high / 5, "{rss} against {before}..{after}: {memory}");
    let parts =
        figure("process_resident_anon") + figure("process_resident_file") + figure("process_resident_shmem");
    assert_eq!(parts, rss, "{memory}");
    assert!(
        figure("process_resident_anon") > 1 << 20 && figure("process_resident_file") > 1 << 20,
        "{memory}"
    );

    let (status, dump) = get(app.admin_addr, "/config_dump").await.expect("config dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("dump is JSON");
    assert_eq!(dump["ready"], true);
    let held = &dump["resources"][proto::ADDRESS_TYPE_URL];
    assert!(held.get("Kubernetes//Pod/demo/client").is_some(), "{dump}");
    assert!(held.get("demo/echo.demo.svc.cluster.local").is_some(), "{dump}");
    // The indexed state the proxies route on: services with their endpoints, policies.
    let state = &dump["state"];
    assert_eq!(state["services"]["demo/echo.demo.svc.cluster.local"]["vips"][0][1], "10.96.0.80", "{dump}");
    let endpoints = state["endpoints"]["demo/echo.demo.svc.cluster.local"].as_array().expect("endpoints");
    assert_eq!(endpoints.len(), 2, "{dump}");
    assert_eq!(state["policies"]["demo/demo-only"]["action"], "ALLOW", "{dump}");
    assert_eq!(
        state["workloads"]["Kubernetes//Pod/demo/client"]["identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );

    let (status, metrics) = get(app.metrics_addr, "/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("istio_build{component=\"ztunnel\""), "{metrics}");
    assert!(metrics.contains("istio_xds_connection_state 1"), "{metrics}");
    let (_, alias) = get(app.metrics_addr, "/stats/prometheus").await.expect("alias");
    assert!(alias.contains("istio_xds_message_total"));
    let (status, _) = get(app.admin_addr, "/nope").await.expect("404");
    assert_eq!(status, 404);
    server.stop().await;
}
