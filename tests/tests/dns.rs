//! ztunnel's DNS proxy in network namespaces, asked by `dig` from a pod: the mesh's names by
//! short name, FQDN, ServiceEntry host and headless service; other names answered by a real
//! resolver (dnsmasq) in a namespace of its own, SERVFAIL within the timeout once it is gone;
//! garbage dropped and counted. (Root: namespaces. Capture of port 53 is not part of this yet:
//! the pod asks ztunnel's 15053 directly.)

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mesh_tests::netns::{Netns, require_root, wire};
use mesh_tests::node::{NodeZtunnel, control_plane};
use mesh_tests::xds_server::XdsStore;

const MESH: &str = r#"
workloads:
  - name: client
    namespace: demo
    addresses: [10.77.1.2]
    node: node-a
  - name: db-0
    namespace: shop
    addresses: [10.77.3.7]
    node: node-a
    services:
      shop/db.shop.svc.cluster.local: [{servicePort: 5432}]
  - name: db-1
    namespace: shop
    addresses: [10.77.3.8]
    node: node-a
    services:
      shop/db.shop.svc.cluster.local: [{servicePort: 5432}]
services:
  - {name: web, namespace: demo, hostname: web.demo.svc.cluster.local, addresses: [10.96.0.80]}
  - {name: db, namespace: shop, hostname: db.shop.svc.cluster.local}
  - {name: ext, namespace: demo, hostname: api.example.com, addresses: [240.240.0.1]}
"#;

/// The node's address on the pod's link, where ztunnel's DNS proxy listens.
const NODE_IP: &str = "10.77.1.1";
const RESOLVER_IP: &str = "10.77.9.2";

struct Resolver(Child);

impl Drop for Resolver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq in `ns` on port 53: `external.test` is 192.0.2.44, any other name under `test`
/// NXDOMAIN.
fn resolver(ns: &Netns) -> Resolver {
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts"])
        .args(["--listen-address", RESOLVER_IP, "--bind-interfaces", "--port", "53", "--user=root"])
        .args(["--address=/external.test/192.0.2.44", "--local=/test/", "--pid-file=", "--log-facility=-"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("dnsmasq (deploy/setup.sh installs dnsmasq-base): {e}"));
    Resolver(child)
}

/// `dig` in `pod` against the DNS proxy: (status, answers).
fn dig(pod: &Netns, name: &str, qtype: &str) -> (String, Vec<String>) {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.name, "dig", &format!("@{NODE_IP}"), "-p", "15053"])
        .args(["+tries=1", "+time=3", "+noall", "+comments", "+answer", name, qtype])
        .output()
        .unwrap_or_else(|e| panic!("dig (deploy/setup.sh installs bind9-dnsutils): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .lines()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|s| s.split(',').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| format!("no answer: {text}"));
    let mut answers: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last().map(str::to_string))
        .collect();
    answers.sort();
    (status, answers)
}

fn dropped_malformed(zt: &NodeZtunnel) -> u64 {
    zt.metrics()
        .lines()
        .find(|l| l.starts_with("istio_dns_dropped_total{reason=\"malformed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_pod_resolves_the_mesh_names_and_other_names_through_its_upstream() {
    require_root("the DNS proxy test");
    let node = Netns::create("dns-node");
    let pod = Netns::create("dns-pod");
    let upstream = Netns::create("dns-upstream");
    wire(&node, &pod, "veth-dns-pod", "10.77.1");
    wire(&node, &upstream, "veth-dns-up", "10.77.9");

    let store = XdsStore::new();
    store.load_yaml(MESH).expect("mesh config");
    let (_cp_rt, _cp) = control_plane(&node, "127.0.0.1:15710", store);
    let ca = tempfile::tempdir().expect("ca dir");
    let timeout_ms = "700";
    let flags = [
        "--xds-address",
        "http://127.0.0.1:15710",
        "--local-ca",
        ca.path().to_str().expect("path"),
        "--node-name",
        "node-a",
        "--dns-upstream",
        RESOLVER_IP,
        "--dns-upstream-timeout-ms",
        timeout_ms,
    ];
    let zt = NodeZtunnel::start(&node, &flags);
    zt.wait_ready("ztunnel with the DNS proxy");
    let dnsmasq = resolver(&upstream);
    std::thread::sleep(Duration::from_millis(300));

    let ok = |ips: &[&str]| ("NOERROR".to_string(), ips.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    // The mesh's names, answered by ztunnel itself.
    assert_eq!(dig(&pod, "web", "A"), ok(&["10.96.0.80"]), "short name in the client's namespace");
    assert_eq!(dig(&pod, "web.demo.svc.cluster.local", "A"), ok(&["10.96.0.80"]));
    assert_eq!(dig(&pod, "web", "AAAA"), ok(&[]), "a name of the mesh without IPv6: NODATA");
    assert_eq!(dig(&pod, "api.example.com", "A"), ok(&["240.240.0.1"]), "ServiceEntry host");
    assert_eq!(dig(&pod, "db.shop", "A"), ok(&["10.77.3.7", "10.77.3.8"]), "headless: its pods");
    // Anything else, by the upstream resolver.
    assert_eq!(dig(&pod, "external.test", "A"), ok(&["192.0.2.44"]));
    assert_eq!(dig(&pod, "missing.test", "A").0, "NXDOMAIN", "the upstream's NXDOMAIN passed through");

    // Garbage is dropped unanswered and counted.
    let before = dropped_malformed(&zt);
    pod.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(b"\xff\xff not dns at all", (NODE_IP, 15053)).expect("send");
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while dropped_malformed(&zt) <= before {
        assert!(Instant::now() < deadline, "the garbage packet was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The upstream gone: SERVFAIL, within the timeout.
    drop(dnsmasq);
    let started = Instant::now();
    assert_eq!(dig(&pod, "external.test", "A").0, "SERVFAIL");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "SERVFAIL took {took:?}");
    // ...while the mesh's names are still answered.
    assert_eq!(dig(&pod, "web", "A"), ok(&["10.96.0.80"]));
}
