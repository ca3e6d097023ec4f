//! ztunnel's DNS proxy in network namespaces, asked by `dig` and the C library's resolver
//! (`getent hosts`) from pods: the mesh's names by short name, FQDN, ServiceEntry host and
//! headless service; other names answered by a real resolver (dnsmasq) in a namespace of its
//! own, SERVFAIL within the timeout once it is gone; garbage dropped and counted. An enrolled
//! pod's DNS is captured (UDP and TCP, IPv4 and IPv6, whatever server it asks) and answered from
//! the address it asked; a pod that is not enrolled reaches its server untouched. (Root.)

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use mesh_tests::netns::{Netns, enable_forwarding, require_root, wire, wire6};
use mesh_tests::node::{NodeZtunnel, control_plane};
use mesh_tests::xds_server::XdsStore;

const MESH: &str = r#"
workloads:
  - name: client
    namespace: demo
    addresses: [10.77.1.2, "fd00:77:1::2"]
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
/// A cluster DNS address nobody serves: only a captured query gets an answer from it.
const CLUSTER_DNS: &str = "10.96.0.10";
const CLUSTER_DNS6: &str = "fd00:96::10";
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
    dig_at(pod, &[&format!("@{NODE_IP}"), "-p", "15053"], name, qtype)
}

/// `dig` in `pod` with `server` flags (`@addr`, `-p`, `+tcp`, ...): (status, answers). dig
/// itself refuses an answer from another address than the one it asked.
fn dig_at(pod: &Netns, server: &[&str], name: &str, qtype: &str) -> (String, Vec<String>) {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.name, "dig"])
        .args(server)
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
    let t = Topology::new("dnsd", &[]);
    let (pod, zt) = (&t.pod, t.zt());
    let dnsmasq = resolver(&t.upstream);
    std::thread::sleep(Duration::from_millis(300));

    let ok = |ips: &[&str]| ("NOERROR".to_string(), ips.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    // The mesh's names, answered by ztunnel itself.
    assert_eq!(dig(pod, "web", "A"), ok(&["10.96.0.80"]), "short name in the client's namespace");
    assert_eq!(dig(pod, "web.demo.svc.cluster.local", "A"), ok(&["10.96.0.80"]));
    assert_eq!(dig(pod, "web", "AAAA"), ok(&[]), "a name of the mesh without IPv6: NODATA");
    assert_eq!(dig(pod, "api.example.com", "A"), ok(&["240.240.0.1"]), "ServiceEntry host");
    assert_eq!(dig(pod, "db.shop", "A"), ok(&["10.77.3.7", "10.77.3.8"]), "headless: its pods");
    // Anything else, by the upstream resolver.
    assert_eq!(dig(pod, "external.test", "A"), ok(&["192.0.2.44"]));
    assert_eq!(dig(pod, "missing.test", "A").0, "NXDOMAIN", "the upstream's NXDOMAIN passed through");

    // Garbage is dropped unanswered and counted.
    let before = dropped_malformed(zt);
    pod.enter(|| {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.send_to(b"\xff\xff not dns at all", (NODE_IP, 15053)).expect("send");
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while dropped_malformed(zt) <= before {
        assert!(Instant::now() < deadline, "the garbage packet was not counted");
        std::thread::sleep(Duration::from_millis(50));
    }

    // The upstream gone: SERVFAIL, within the timeout.
    drop(dnsmasq);
    let started = Instant::now();
    assert_eq!(dig(pod, "external.test", "A").0, "SERVFAIL");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "SERVFAIL took {took:?}");
    // ...while the mesh's names are still answered.
    assert_eq!(dig(pod, "web", "A"), ok(&["10.96.0.80"]));
}

/// A node running ztunnel (its control plane beside it), an enrolled pod `pod` (10.77.1.2 and
/// fd00:77:1::2), a pod `other` outside the mesh (10.77.2.2) and the upstream resolver's
/// namespace (10.77.9.2).
struct Topology {
    zt: Option<NodeZtunnel>,
    _cp: (tokio::runtime::Runtime, mesh_tests::xds_server::XdsServerHandle),
    _ca: tempfile::TempDir,
    pod: Netns,
    other: Netns,
    upstream: Netns,
    node: Netns,
}

impl Topology {
    fn new(prefix: &str, extra: &[&str]) -> Self {
        require_root("the DNS proxy test");
        let node = Netns::create(&format!("{prefix}-node"));
        let pod = Netns::create(&format!("{prefix}-pod"));
        let other = Netns::create(&format!("{prefix}-other"));
        let upstream = Netns::create(&format!("{prefix}-up"));
        wire(&node, &pod, &format!("v{prefix}-pod"), "10.77.1");
        wire6(&node, &pod, &format!("v{prefix}-pod"), "fd00:77:1");
        wire(&node, &other, &format!("v{prefix}-oth"), "10.77.2");
        wire(&node, &upstream, &format!("v{prefix}-up"), "10.77.9");
        enable_forwarding(&node);
        let store = XdsStore::new();
        store.load_yaml(MESH).expect("mesh config");
        let cp = control_plane(&node, "127.0.0.1:15710", store);
        let ca = tempfile::tempdir().expect("ca dir");
        let mut flags = vec![
            "--xds-address",
            "http://127.0.0.1:15710",
            "--local-ca",
            ca.path().to_str().expect("path"),
            "--node-name",
            "node-a",
            "--dns-upstream",
            RESOLVER_IP,
            "--dns-upstream-timeout-ms",
            "700",
        ];
        flags.extend_from_slice(extra);
        let zt = NodeZtunnel::start(&node, &flags);
        zt.wait_ready("ztunnel with the DNS proxy");
        Self { zt: Some(zt), _cp: cp, _ca: ca, pod, other, upstream, node }
    }

    fn zt(&self) -> &NodeZtunnel {
        self.zt.as_ref().expect("running")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // ztunnel first, then the capture it pinned (as `ztunnel uninstall` does).
        let captured = self.zt.take().is_some_and(|zt| zt.app.enrollment.is_some());
        if captured {
            let settings = mesh_tests::node::redirect_settings(&self.node);
            let _ = self.node.enter(|| ebpf::uninstall(&settings));
        }
    }
}

#[test]
fn an_enrolled_pods_dns_is_captured_and_answered_from_the_address_it_asked() {
    let t = Topology::new("dnsc", &["--redirect", "--uplink", "*"]);
    t.zt().converge("the client pod enrolled", &|s| s.pods.len() == 2);
    let _dnsmasq = resolver(&t.upstream);
    std::thread::sleep(Duration::from_millis(300));
    let ok = |ips: &[&str]| ("NOERROR".to_string(), ips.iter().map(|s| s.to_string()).collect::<Vec<_>>());

    // A server nobody runs answers, from its own address (dig checks), over UDP and TCP.
    let cluster_dns = format!("@{CLUSTER_DNS}");
    assert_eq!(dig_at(&t.pod, &[&cluster_dns], "web", "A"), ok(&["10.96.0.80"]));
    assert_eq!(dig_at(&t.pod, &[&cluster_dns, "+tcp"], "web", "A"), ok(&["10.96.0.80"]), "over TCP");
    assert_eq!(dig_at(&t.pod, &[&cluster_dns], "external.test", "A"), ok(&["192.0.2.44"]), "forwarded");
    let cluster_dns6 = format!("@{CLUSTER_DNS6}");
    assert_eq!(dig_at(&t.pod, &[&cluster_dns6], "api.example.com", "A"), ok(&["240.240.0.1"]), "over IPv6");
    // Whatever server the pod asks, even a real one, the mesh's names are ztunnel's answer.
    let resolver_at = format!("@{RESOLVER_IP}");
    assert_eq!(dig_at(&t.pod, &[&resolver_at], "web", "A"), ok(&["10.96.0.80"]));

    // The C library's resolver, with the pod's resolv.conf naming the cluster DNS.
    let etc = std::path::PathBuf::from("/etc/netns").join(&t.pod.name);
    std::fs::create_dir_all(&etc).expect("/etc/netns");
    std::fs::write(
        etc.join("resolv.conf"),
        format!("search demo.svc.cluster.local svc.cluster.local cluster.local\nnameserver {CLUSTER_DNS}\noptions ndots:5 timeout:2 attempts:1\n"),
    )
    .expect("resolv.conf");
    let getent = |name: &str| {
        let out =
            Command::new("ip").args(["netns", "exec", &t.pod.name, "getent", "ahostsv4", name]).output();
        let out = out.expect("getent");
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    let (web, db) = (getent("web"), getent("db.shop"));
    let _ = std::fs::remove_dir_all(&etc);
    assert_eq!(web, "10.96.0.80", "getent resolves a service's short name to its VIP");
    assert!(["10.77.3.7", "10.77.3.8"].contains(&db.as_str()), "a headless service's pod: {db:?}");

    // A pod outside the mesh is not captured: the real resolver answers it (and refuses a name
    // it does not serve), and the address nobody serves stays silent.
    assert_eq!(dig_at(&t.other, &[&resolver_at], "external.test", "A"), ok(&["192.0.2.44"]));
    assert_eq!(dig_at(&t.other, &[&resolver_at], "web", "A").0, "REFUSED", "dnsmasq's own answer");
    assert!(dig_at(&t.other, &[&cluster_dns], "web", "A").0.starts_with("no answer"), "not captured");
}
