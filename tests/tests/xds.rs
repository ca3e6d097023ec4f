//! The shared delta-ADS client against the in-repo server over real gRPC on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::readiness::Ready;
use common::xds::local::EncodedResource;
use common::xds::{NodeInfo, ResourceStore, XdsClient, XdsConfig, XdsMetrics};
use mesh_tests::until;
use mesh_tests::xds_server::{self, XdsStore};
use proto::security::Authorization;
use proto::workload::{Address, Workload, address};
use proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

const WAIT: Duration = Duration::from_secs(20);

fn workload(name: &str, ip: [u8; 4]) -> (String, Address) {
    let uid = format!("Kubernetes//Pod/default/{name}");
    let w = Workload {
        uid: uid.clone(),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        service_account: name.into(),
        node: "node-a".into(),
        ..Default::default()
    };
    (uid, Address { r#type: Some(address::Type::Workload(w)) })
}

fn policy(name: &str, action: i32) -> (String, Authorization) {
    let p = Authorization { name: name.into(), namespace: "default".into(), action, ..Default::default() };
    (format!("default/{name}"), p)
}

fn workload_ips(store: &ResourceStore<Address>, name: &str) -> Option<Vec<Vec<u8>>> {
    match store.get(name)?.r#type? {
        address::Type::Workload(w) => Some(w.addresses),
        address::Type::Service(_) => None,
    }
}

struct Client {
    addresses: Arc<ResourceStore<Address>>,
    policies: Arc<ResourceStore<Authorization>>,
    ready: Ready,
    registry: prometheus_client::registry::Registry,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    fn metrics(&self) -> String {
        common::metrics::render(&self.registry)
    }

    async fn wait_ready(&self) {
        tokio::time::timeout(WAIT, self.ready.wait()).await.expect("client never became ready");
    }
}

fn start_client(url: String) -> Client {
    let mesh_tests::Stores { addresses, policies, handlers } = mesh_tests::Stores::new();
    let ready = Ready::new();
    let mut registry = common::metrics::new_registry();
    let metrics = XdsMetrics::new(&mut registry);
    let node = NodeInfo {
        proxy_type: "ztunnel".into(),
        ip: "10.0.0.5".into(),
        pod_name: "ztunnel-test".into(),
        namespace: "istio-system".into(),
        node_name: "node-a".into(),
        ..Default::default()
    };
    let mut config = XdsConfig::new(url, node);
    config.backoff_max = Duration::from_millis(500);
    let client = XdsClient::new(config, handlers, &ready, metrics);
    let task = tokio::spawn(client.run());
    Client { addresses, policies, ready, registry, task }
}

async fn server() -> xds_server::XdsServerHandle {
    xds_server::start("127.0.0.1:0".parse().expect("addr"), XdsStore::new()).await.expect("start server")
}

#[tokio::test]
async fn initial_sync_update_and_removal() {
    let server = server().await;
    let (a, wa) = workload("a", [10, 0, 0, 1]);
    let (b, wb) = workload("b", [10, 0, 0, 2]);
    let (p, pol) = policy("deny-all", proto::security::Action::Deny as i32);
    server.store.insert(ADDRESS_TYPE_URL, &a, &wa);
    server.store.insert(ADDRESS_TYPE_URL, &b, &wb);
    server.store.insert(AUTHORIZATION_TYPE_URL, &p, &pol);

    let client = start_client(server.url());
    client.wait_ready().await;
    assert_eq!(client.addresses.names(), vec![a.clone(), b.clone()]);
    assert_eq!(client.policies.get(&p), Some(pol));
    // The node identified itself the way istiod parses it.
    let nodes = server.store.nodes();
    assert_eq!(nodes.len(), 1, "node is sent once per stream");
    assert_eq!(nodes[0].id, "ztunnel~10.0.0.5~ztunnel-test.istio-system~istio-system.svc.cluster.local");

    // Update: a's address changes.
    let (_, wa2) = workload("a", [10, 0, 0, 99]);
    server.store.insert(ADDRESS_TYPE_URL, &a, &wa2);
    until(&*client.addresses, "update of a", |s| workload_ips(s, &a) == Some(vec![vec![10, 0, 0, 99]])).await;

    // Removal of b and of the policy.
    server.store.remove(ADDRESS_TYPE_URL, &b);
    server.store.remove(AUTHORIZATION_TYPE_URL, &p);
    until(&*client.addresses, "removal of b", |s| s.get(&b).is_none()).await;
    until(&*client.policies, "removal of policy", |s| s.is_empty()).await;
    assert!(client.addresses.get(&a).is_some());

    // Every push so far was ACKed (ACKs follow the apply, so wait for them to arrive).
    let replies =
        server.store.wait_replies(WAIT, |r| r.len() >= 4).await.unwrap_or_else(|| server.store.replies());
    assert!(replies.len() >= 4, "{replies:?}");
    assert!(replies.iter().all(|r| r.error.is_none()), "unexpected NACK: {replies:?}");
    let metrics = client.metrics();
    assert!(metrics.contains("istio_xds_connection_state 1"), "{metrics}");
    assert!(metrics.contains(&format!("istio_xds_message_total{{url=\"{ADDRESS_TYPE_URL}\"}}")), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn bad_resources_are_nacked_and_old_state_kept() {
    let server = server().await;
    let (a, wa) = workload("a", [10, 0, 0, 1]);
    server.store.insert(ADDRESS_TYPE_URL, &a, &wa);
    let client = start_client(server.url());
    client.wait_ready().await;
    let version_before = client.addresses.version(&a).expect("a held");

    // 1. Undecodable bytes replace a good resource: NACKed, old a stays, naming a.
    let garbage =
        prost_types::Any { type_url: ADDRESS_TYPE_URL.into(), value: vec![0x0a, 0xff, 0xff, 0xff, 0x0f] };
    server.store.insert_raw(ADDRESS_TYPE_URL, &a, garbage);
    let nack = server.store.wait_reply(WAIT, |r| r.error.is_some()).await.expect("garbage must be NACKed");
    let detail = nack.error.expect("error detail");
    assert!(detail.contains(&a) && detail.contains("cannot decode"), "{detail}");
    assert_eq!(client.addresses.version(&a), Some(version_before.clone()), "old a must stay in force");

    // 2. A decodable but invalid resource (6-byte address) next to a valid one in the same
    // push: the valid one applies, the invalid one is rejected by the handler.
    let (c, mut wc) = workload("c", [10, 0, 0, 3]);
    if let Some(address::Type::Workload(w)) = &mut wc.r#type {
        w.addresses = vec![vec![1, 2, 3, 4, 5, 6]];
    }
    let (d, wd) = workload("d", [10, 0, 0, 4]);
    server.store.insert_many([
        EncodedResource::new(ADDRESS_TYPE_URL, c.clone(), &wc),
        EncodedResource::new(ADDRESS_TYPE_URL, d.clone(), &wd),
    ]);
    let nack = server
        .store
        .wait_reply(WAIT, |r| r.error.as_deref().is_some_and(|e| e.contains(&c)))
        .await
        .expect("invalid c must be NACKed");
    assert!(nack.error.as_deref().is_some_and(|e| e.contains("6 bytes")), "{nack:?}");
    until(&*client.addresses, "valid d applied", |s| s.get(&d).is_some()).await;
    assert!(client.addresses.get(&c).is_none(), "invalid c must not be applied");
    assert_eq!(client.addresses.version(&a), Some(version_before));

    // 3. Fixing the resource is ACKed and applied.
    let (_, wa2) = workload("a", [10, 0, 0, 42]);
    server.store.insert(ADDRESS_TYPE_URL, &a, &wa2);
    until(&*client.addresses, "fixed a", |s| workload_ips(s, &a) == Some(vec![vec![10, 0, 0, 42]])).await;

    let metrics = client.metrics();
    assert!(metrics.contains(&format!("istio_xds_nack_total{{url=\"{ADDRESS_TYPE_URL}\"}} 2")), "{metrics}");
    assert!(
        metrics.contains(&format!("istio_xds_rejected_resources_total{{url=\"{ADDRESS_TYPE_URL}\"}} 2")),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn dropped_stream_reconnects_with_initial_versions() {
    let server = server().await;
    let (a, wa) = workload("a", [10, 0, 0, 1]);
    server.store.insert(ADDRESS_TYPE_URL, &a, &wa);
    let client = start_client(server.url());
    client.wait_ready().await;
    let acks_before = server.store.replies().len();

    server.store.drop_streams();
    // The client reconnects; it already holds a at the current version, so the server sends
    // nothing new for it, but changes made afterwards still arrive.
    let start = Instant::now();
    while server.store.nodes().len() < 2 {
        assert!(start.elapsed() < WAIT, "client did not reconnect");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (b, wb) = workload("b", [10, 0, 0, 2]);
    server.store.insert(ADDRESS_TYPE_URL, &b, &wb);
    until(&*client.addresses, "b after reconnect", |s| s.get(&b).is_some()).await;
    // The resubscription carried a's version, so a was not resent: the client received
    // exactly two Address resources in total (a once, b once).
    let replies = server
        .store
        .wait_replies(WAIT, |r| r.len() > acks_before)
        .await
        .unwrap_or_else(|| server.store.replies());
    assert!(replies.len() > acks_before);
    let metrics = client.metrics();
    assert!(
        metrics.contains(&format!("istio_xds_resources_total{{url=\"{ADDRESS_TYPE_URL}\"}} 2")),
        "{metrics}"
    );
    assert!(
        metrics.contains("istio_xds_connection_terminations_total{reason=\"stream_error\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn server_restart_converges() {
    let first = server().await;
    let addr: SocketAddr = first.addr;
    let (a, wa) = workload("a", [10, 0, 0, 1]);
    let (b, wb) = workload("b", [10, 0, 0, 2]);
    let (p, pol) = policy("allow", proto::security::Action::Allow as i32);
    first.store.insert(ADDRESS_TYPE_URL, &a, &wa);
    first.store.insert(ADDRESS_TYPE_URL, &b, &wb);
    first.store.insert(AUTHORIZATION_TYPE_URL, &p, &pol);
    let client = start_client(first.url());
    client.wait_ready().await;
    first.stop().await;

    // The restarted control plane no longer has b nor the policy, has a changed, and has c.
    let store = XdsStore::new();
    let (_, wa2) = workload("a", [10, 0, 0, 11]);
    let (c, wc) = workload("c", [10, 0, 0, 3]);
    store.insert(ADDRESS_TYPE_URL, &a, &wa2);
    store.insert(ADDRESS_TYPE_URL, &c, &wc);
    let second = xds_server::start(addr, store).await.expect("restart on the same port");

    until(&*client.addresses, "convergence after restart", |s| {
        s.names() == vec![a.clone(), c.clone()] && workload_ips(s, &a) == Some(vec![vec![10, 0, 0, 11]])
    })
    .await;
    until(&*client.policies, "policy removed after restart", |s| s.is_empty()).await;
    second.stop().await;
}

fn many_workloads(n: usize) -> Vec<EncodedResource> {
    (0..n)
        .map(|i| {
            let ip = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
            let (name, w) = workload(&format!("w{i}"), ip);
            EncodedResource::new(ADDRESS_TYPE_URL, name, &w)
        })
        .collect()
}

async fn sync_time(n: usize) -> Duration {
    let server = server().await;
    server.store.insert_many(many_workloads(n));
    let start = Instant::now();
    let client = start_client(server.url());
    client.wait_ready().await;
    assert_eq!(client.addresses.len(), n);
    let elapsed = start.elapsed();
    // A second, incremental change on top of n resources is applied too.
    server.store.remove(ADDRESS_TYPE_URL, "Kubernetes//Pod/default/w0");
    until(&*client.addresses, "removal among many", |s| s.len() == n - 1).await;
    server.stop().await;
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_workloads_sync_without_quadratic_slowdown() {
    // Warm up allocators and the runtime, then compare 2k with 20k: linear work gives ~10x,
    // quadratic ~100x. The bound leaves room for a noisy 2-core machine.
    sync_time(500).await;
    let small = sync_time(2_000).await;
    let large = sync_time(20_000).await;
    let ratio = large.as_secs_f64() / small.as_secs_f64().max(0.001);
    println!("sync 2k: {small:?}, 20k: {large:?}, ratio {ratio:.1}");
    assert!(ratio < 40.0, "20k workloads took {ratio:.1}x as long as 2k ({small:?} vs {large:?})");
    assert!(large < Duration::from_secs(60), "20k workloads took {large:?}");
}
