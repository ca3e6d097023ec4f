//! ztunnel's L4 data plane end to end (root; CI runs as root, elsewhere this fails saying why).
//!
//! Two node namespaces joined by a link, pods wired to them by veth pairs, one ztunnel per node
//! (in-process, inside its node) with eBPF capture, both fed by the in-repo xDS server and
//! sharing a local CA. Pods run a line echo server answering `<pod> <peer ip> <line>`, so every
//! reply says who served it and which source address the server saw.
//!
//! ```text
//!   node-a (10.0.0.1) ---- link ---- node-b (10.0.0.2)
//!   client   10.1.1.2               echo-2    10.2.1.2
//!   echo-1   10.1.2.2               intruder  10.2.2.2 (namespace other)
//!   outside  10.9.0.2 (no mesh)     rogue     10.2.3.2 (not enrolled; proves the wrong identity)
//!                                   echo-3    10.2.4.2 (joins the service later)
//!                                   waypoint  10.2.5.2 (an HBONE server standing in for one)
//! ```

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::hbone::server::{self, BoxFuture, ConnectRequest, Decision, FixedTls};
use common::identity::Identity;
use common::identity::local_ca::LocalCa;
use mesh_tests::echo::{exchange, expect_refused};
use mesh_tests::netns::{Netns, link_nodes, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;

const CLIENT: &str = "10.1.1.2";
const ECHO_1: &str = "10.1.2.2";
const ECHO_2: &str = "10.2.1.2";
const INTRUDER: &str = "10.2.2.2";
const ROGUE: &str = "10.2.3.2";
const ECHO_3: &str = "10.2.4.2";
const WAYPOINT: &str = "10.2.5.2";
const WAYPOINT_VIP: &str = "10.96.0.81:80";
const OUTSIDE: &str = "10.9.0.2";
const VIP: &str = "10.96.0.80:80";
const XDS_ADDR: &str = "10.0.0.1:15010";

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2], node: node-a,
     workloadName: client, canonicalName: client, canonicalRevision: v1}
  - {name: echo-1, namespace: demo, serviceAccount: echo, addresses: [10.1.2.2], node: node-a,
     workloadName: echo, canonicalName: echo, canonicalRevision: v1,
     authorizationPolicies: [demo/allow-intruder],
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}}
  - {name: echo-2, namespace: demo, serviceAccount: echo, addresses: [10.2.1.2], node: node-b,
     workloadName: echo, canonicalName: echo, canonicalRevision: v1,
     authorizationPolicies: [demo/allow-intruder],
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}}
  - {name: intruder, namespace: other, serviceAccount: intruder, addresses: [10.2.2.2], node: node-b,
     workloadName: intruder}
  # Claims to be demo/echo, but what answers at its address proves demo/rogue.
  - {name: rogue, namespace: demo, serviceAccount: echo, addresses: [10.2.3.2], node: node-c,
     workloadName: rogue}
  - {name: waypoint, namespace: demo, serviceAccount: waypoint, addresses: [10.2.5.2], node: node-b,
     nativeTunnel: true}
services:
  - {name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, addresses: [10.96.0.80],
     ports: [{servicePort: 80, targetPort: 8080}]}
  - {name: behind, namespace: demo, hostname: behind.demo.svc.cluster.local, addresses: [10.96.0.81],
     ports: [{servicePort: 80, targetPort: 8080}], waypoint: {address: 10.2.5.2}}
policies:
  - name: demo-only
    namespace: demo
    scope: NAMESPACE
    action: ALLOW
    rules: [{clauses: [{matches: [{namespaces: [{exact: demo}]}]}]}]
"#;

const ALLOW_INTRUDER: &str = r#"
  - name: allow-intruder
    namespace: demo
    scope: WORKLOAD_SELECTOR
    action: ALLOW
    rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/other/sa/intruder}]}]}]}]
"#;

const DENY_CLIENT: &str = r#"
  - name: deny-client
    namespace: demo
    scope: NAMESPACE
    action: DENY
    rules: [{clauses: [{matches: [{principals: [{suffix: /sa/client}]}]}]}]
"#;

const ECHO_3_WORKLOAD: &str = r#"
  - {name: echo-3, namespace: demo, serviceAccount: echo, addresses: [10.2.4.2], node: node-b,
     workloadName: echo, canonicalName: echo, canonicalRevision: v1,
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}}
"#;

/// Who served each of `n` connections from `ns` to `dst` (the first word of each reply);
/// every reply must show the source address `src`.
fn servers(ns: &Netns, dst: &str, n: usize, src: &str) -> BTreeSet<String> {
    (0..n)
        .map(|i| {
            let reply = exchange(ns, dst, &format!("req-{i}")).unwrap_or_else(|e| panic!("{dst}: {e}"));
            let parts: Vec<&str> = reply.split(' ').collect();
            assert_eq!(parts.len(), 3, "unexpected reply {reply:?}");
            assert_eq!(parts[1], src, "the server saw the client's own address: {reply:?}");
            parts[0].to_string()
        })
        .collect()
}

/// Lines of Prometheus text for `metric` carrying every one of `labels`.
fn samples(metrics: &str, metric: &str, labels: &[&str]) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(str::to_string)
        .collect()
}

fn sample_sum(lines: &[String]) -> f64 {
    lines.iter().filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

struct Cluster {
    node_a: Netns,
    node_b: Netns,
    client: Netns,
    echo_1: Netns,
    echo_2: Netns,
    intruder: Netns,
    rogue: Netns,
    echo_3: Netns,
    waypoint: Netns,
    outside: Netns,
}

fn cluster() -> Cluster {
    require_root("ztunnel L4 tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("l4{pid}-{role}"));
    let c = Cluster {
        node_a: ns("na"),
        node_b: ns("nb"),
        client: ns("client"),
        echo_1: ns("echo1"),
        echo_2: ns("echo2"),
        intruder: ns("intr"),
        rogue: ns("rogue"),
        echo_3: ns("echo3"),
        waypoint: ns("wp"),
        outside: ns("out"),
    };
    link_nodes(&c.node_a, &c.node_b);
    wire(&c.node_a, &c.client, "v-client", "10.1.1");
    wire(&c.node_a, &c.echo_1, "v-echo1", "10.1.2");
    wire(&c.node_a, &c.outside, "v-out", "10.9.0");
    wire(&c.node_b, &c.echo_2, "v-echo2", "10.2.1");
    wire(&c.node_b, &c.intruder, "v-intr", "10.2.2");
    wire(&c.node_b, &c.rogue, "v-rogue", "10.2.3");
    wire(&c.node_b, &c.echo_3, "v-echo3", "10.2.4");
    wire(&c.node_b, &c.waypoint, "v-wp", "10.2.5");
    c.node_b.ip(&["route", "add", "10.9.0.0/24", "via", "10.0.0.1"]);
    for (ns, name) in [
        (&c.echo_1, "echo-1"),
        (&c.echo_2, "echo-2"),
        (&c.echo_3, "echo-3"),
        (&c.intruder, "intruder"),
        (&c.outside, "outside"),
    ] {
        mesh_tests::echo::serve_pod(ns, "0.0.0.0", name);
    }
    c
}

/// An HBONE server on `ns`:15008 proving `demo/<sa>` with the shared CA. It accepts every
/// CONNECT, reads the stream to its end and answers `<sa> <authority> <peer identity>`.
fn hbone_server(ns: &Netns, ca_dir: &std::path::Path, sa: &'static str) -> tokio::runtime::Runtime {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = LocalCa::load_or_create(ca_dir, "cluster.local").expect("shared CA");
    let id = Identity::new("cluster.local", "demo", sa).expect("identity");
    let cert = ca.issue(&id, Duration::from_secs(3600)).expect("certificate");
    let config = Arc::new(common::tls::server_config(&cert).expect("server config"));
    let rt = ns.runtime();
    let listener = rt
        .block_on(rt.spawn(async { tokio::net::TcpListener::bind("0.0.0.0:15008").await }))
        .expect("join")
        .unwrap_or_else(|e| panic!("bind 15008 in {}: {e}", ns.name));
    let handler = move |req: ConnectRequest| -> BoxFuture<Decision> {
        let line = format!("{sa} {} {}\n", req.authority, req.peer);
        Box::pin(async move {
            Decision::Accept(Box::new(move |mut stream| {
                Box::pin(async move {
                    let mut request = Vec::new();
                    let _ = stream.read_to_end(&mut request).await;
                    let _ = stream.write_all(line.as_bytes()).await;
                    let _ = stream.shutdown().await;
                })
            }))
        })
    };
    let failures = server::InboundFailures::default();
    rt.spawn(server::serve(
        listener,
        Arc::new(FixedTls(config)),
        "cluster.local".into(),
        Arc::new(handler),
        failures,
    ));
    rt
}

/// CONNECTs to the ztunnel that captures `pod`:15008, over one mTLS connection as
/// `<ns>/<sa>`, one per authority; returns each answer's status (200 when accepted).
fn connect_statuses(
    rt: &tokio::runtime::Runtime,
    ca_dir: &std::path::Path,
    (ns, sa): (&str, &str),
    pod: &str,
    authorities: &[&str],
) -> Vec<u16> {
    use common::hbone::client::{ClientError, Connection};
    let ca = LocalCa::load_or_create(ca_dir, "cluster.local").expect("shared CA");
    let cert = ca
        .issue(&Identity::new("cluster.local", ns, sa).expect("id"), Duration::from_secs(3600))
        .expect("cert");
    let server = Identity::new("cluster.local", "demo", "echo").expect("id");
    let config = Arc::new(common::tls::client_config(&cert, vec![server]).expect("client config"));
    let addr: SocketAddr = format!("{pod}:15008").parse().expect("addr");
    let authorities: Vec<_> =
        authorities.iter().map(|a| common::hbone::connect::parse_authority(a).expect("authority")).collect();
    rt.block_on(rt.spawn(async move {
        let conn = Connection::connect(addr, config).await.expect("mTLS to the pod's ztunnel");
        let mut statuses = Vec::new();
        for a in &authorities {
            match conn.open(a, http::HeaderMap::new()).await {
                Ok(_) => statuses.push(200),
                Err(ClientError::Status { status, .. }) => statuses.push(status.as_u16()),
                Err(e) => panic!("CONNECT {a}: {e}"),
            }
        }
        statuses
    }))
    .expect("join")
}

fn push(store: &XdsStore, yaml: &str) {
    store.load_yaml(yaml).unwrap_or_else(|e| panic!("config does not load: {e:#}"));
}

/// Waits until `zt`'s state satisfies `pred`.
fn converge(zt: &NodeZtunnel, what: &str, pred: impl Fn(&ztunnel::state::Snapshot) -> bool + Send + 'static) {
    let state = zt.app.state.clone();
    let done = zt
        .block(async move { tokio::time::timeout(mesh_tests::CONVERGE_TIMEOUT, state.wait_for(pred)).await });
    assert!(done.is_ok(), "timed out waiting for {what}");
}

#[test]
fn l4_mesh_end_to_end() {
    let c = cluster();
    if std::env::var_os("RUST_LOG").is_some() {
        common::telemetry::init(common::telemetry::LogFormat::Text);
    }
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let ca = ca_dir.path().to_str().expect("path").to_string();

    // The control plane, in node-a, reached by both ztunnels over the link.
    let store = XdsStore::new();
    // The echo pods name allow-intruder only once it exists: a workload naming a missing policy
    // is refused (fail closed).
    push(&store, &MESH.replace("authorizationPolicies: [demo/allow-intruder],", ""));
    let (cp_rt, xds) = mesh_tests::node::control_plane(&c.node_a, XDS_ADDR, store.clone());
    let xds_url = format!("http://{XDS_ADDR}");
    let zt_a = NodeZtunnel::start_node(&c.node_a, &xds_url, &ca, "node-a", &[]);
    let zt_b =
        NodeZtunnel::start_node(&c.node_b, &xds_url, &ca, "node-b", &["--outbound-policy", "registry-only"]);
    zt_a.converge("node-a pods enrolled", &|s| s.pods.len() == 2);
    zt_b.converge("node-b pods enrolled", &|s| s.pods.len() == 2);
    let enrolled_b = zt_b.app.enrollment.as_ref().expect("redirection on").status();
    let waypoint_ip = WAYPOINT.parse().expect("ip");
    assert!(!enrolled_b.pods.contains_key(&waypoint_ip), "a native-tunnel waypoint is not captured");
    let rogue_rt = hbone_server(&c.rogue, ca_dir.path(), "rogue");
    let _waypoint = hbone_server(&c.waypoint, ca_dir.path(), "waypoint");

    // Pod to pod across nodes, through both ztunnels over HBONE; the server sees the client's
    // own address.
    let dst = format!("{ECHO_2}:8080");
    assert_eq!(exchange(&c.client, &dst, "hello"), Ok(format!("echo-2 {CLIENT} hello")));

    // The service VIP is balanced over the endpoints on both nodes (echo-1 is on the client's
    // node and served in-process, echo-2 across the link).
    let served = servers(&c.client, VIP, 30, CLIENT);
    assert_eq!(served, BTreeSet::from(["echo-1".to_string(), "echo-2".to_string()]));

    // Policy: only namespace demo may reach demo's pods, so the intruder is refused...
    expect_refused(exchange(&c.intruder, &format!("{ECHO_1}:8080"), "let me in"), "intruder -> echo-1");
    // ...until an ALLOW by its principal arrives over xDS.
    let with_allow = format!("{MESH}{ALLOW_INTRUDER}");
    push(&store, &with_allow);
    for zt in [&zt_a, &zt_b] {
        converge(zt, "allow-intruder", |s| {
            s.workload_by_uid("Kubernetes//Pod/demo/echo-1").is_some_and(|w| s.policies_for(w).len() == 2)
        });
    }
    assert_eq!(exchange(&c.intruder, &format!("{ECHO_1}:8080"), "hi"), Ok(format!("echo-1 {INTRUDER} hi")));
    // A DENY beats every ALLOW.
    push(&store, &format!("{with_allow}{DENY_CLIENT}"));
    converge(&zt_b, "deny-client", |s| {
        s.workload_by_uid("Kubernetes//Pod/demo/echo-2").is_some_and(|w| s.policies_for(w).len() == 3)
    });
    expect_refused(exchange(&c.client, &dst, "denied?"), "client -> echo-2 under deny-client");
    // What the client wrote before the refusal travelled with the CONNECT (early data); it
    // reaches nothing: the destination never even sees a connection.
    let sink_addr: SocketAddr = format!("{ECHO_2}:8081").parse().expect("addr");
    let sink = mesh_tests::echo::sink(&c.echo_2, sink_addr);
    expect_refused(exchange(&c.client, &sink_addr.to_string(), "secret"), "client -> echo-2:8081 denied");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(sink.connections.load(SeqCst), 0, "a denied connection reached the destination");
    assert_eq!(sink.bytes.load(SeqCst), 0, "a denied connection's bytes reached the destination");
    push(&store, &with_allow);
    converge(&zt_b, "deny-client removed", |s| {
        s.workload_by_uid("Kubernetes//Pod/demo/echo-2").is_some_and(|w| s.policies_for(w).len() == 2)
    });
    assert_eq!(exchange(&c.client, &dst, "again"), Ok(format!("echo-2 {CLIENT} again")));
    // Allowed, the same connection arrives, its bytes once: the sink does count.
    assert_eq!(exchange(&c.client, &sink_addr.to_string(), "secret"), Ok(String::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.bytes.load(SeqCst) < 7 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        (sink.connections.load(SeqCst), sink.bytes.load(SeqCst)),
        (1, 7),
        "allowed: one connection, 7 bytes"
    );

    // A service with a waypoint: the connection goes to the waypoint over HBONE as the client,
    // asking for the service address the client dialled.
    assert_eq!(
        exchange(&c.client, WAYPOINT_VIP, "via waypoint"),
        Ok(format!("waypoint {WAYPOINT_VIP} spiffe://cluster.local/ns/demo/sa/client"))
    );

    // Plaintext from outside the mesh (inbound 15006): refused where policy needs an identity
    // (demo-only), delivered where no policy applies, with the caller's address kept.
    expect_refused(exchange(&c.outside, &format!("{ECHO_1}:8080"), "plain"), "plaintext -> echo-1");
    assert_eq!(
        exchange(&c.outside, &format!("{INTRUDER}:8080"), "plain"),
        Ok(format!("intruder {OUTSIDE} plain"))
    );

    // Unknown destinations: passed through from node-a, refused by node-b (registry-only).
    let outside = format!("{OUTSIDE}:8080");
    assert_eq!(exchange(&c.client, &outside, "out"), Ok(format!("outside {CLIENT} out")));
    expect_refused(exchange(&c.intruder, &outside, "out"), "registry-only node-b -> outside");

    // A destination that cannot prove the identity the registry gives it is refused.
    expect_refused(exchange(&c.client, &format!("{ROGUE}:8080"), "trust me"), "rogue destination");

    // node-a's inbound HBONE answers a CONNECT per its checks: 200 for its workload, 400 for an
    // authority other than the address the connection came to, 503 for ztunnel's own ports,
    // 401 when policy refuses the caller.
    let echo_1 = format!("{ECHO_1}:8080");
    let elsewhere = format!("{CLIENT}:8080");
    let own_port = format!("{ECHO_1}:15006");
    let checks = [echo_1.as_str(), elsewhere.as_str(), own_port.as_str()];
    assert_eq!(
        connect_statuses(&rogue_rt, ca_dir.path(), ("demo", "client"), ECHO_1, &checks),
        [200, 400, 503]
    );
    let stranger = connect_statuses(&rogue_rt, ca_dir.path(), ("other", "stranger"), ECHO_1, &[&echo_1]);
    assert_eq!(stranger, [401]);
    // Plaintext where node-a's inbound HBONE expects TLS: refused, logged and counted by reason.
    let tls_failures = |zt: &NodeZtunnel| {
        sample_sum(&samples(
            &zt.metrics(),
            "istio_hbone_inbound_failures_total",
            &["reason=\"tls_handshake\""],
        ))
    };
    let before = tls_failures(&zt_a);
    let hbone_1: SocketAddr = format!("{ECHO_1}:15008").parse().expect("addr");
    rogue_rt.block_on(rogue_rt.spawn(mesh_tests::echo::plaintext_until_closed(hbone_1))).expect("join");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_failures(&zt_a) < before + 1.0 {
        assert!(Instant::now() < deadline, "plaintext to 15008 not counted");
        std::thread::sleep(Duration::from_millis(20));
    }

    // xDS changes the service's endpoints: echo-3 joins, echo-2 leaves.
    let echo_2_start = with_allow.find("  - {name: echo-2").expect("echo-2 entry");
    let echo_2_end =
        with_allow[echo_2_start..].find("  - {name: intruder").expect("next entry") + echo_2_start;
    let mut reshaped = with_allow.clone();
    reshaped.replace_range(echo_2_start..echo_2_end, ECHO_3_WORKLOAD.trim_start_matches('\n'));
    push(&store, &reshaped);
    zt_b.converge("echo-3 enrolled, echo-2 gone", &|s| {
        s.pods.contains_key(&ECHO_3.parse().expect("ip"))
            && !s.pods.contains_key(&ECHO_2.parse().expect("ip"))
    });
    converge(&zt_a, "echo-3 endpoint", |s| {
        s.service("demo", "echo.demo.svc.cluster.local").is_some_and(|svc| {
            let names: BTreeSet<&str> = s.endpoints(svc).iter().map(|e| e.workload.name.as_str()).collect();
            names == BTreeSet::from(["echo-1", "echo-3"])
        })
    });
    let served = servers(&c.client, VIP, 30, CLIENT);
    assert_eq!(served, BTreeSet::from(["echo-1".to_string(), "echo-3".to_string()]));

    // Metrics with Istio's labels: the client's node reports as source, the server's as
    // destination and knows the client's identity.
    let client_principal = "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"";
    let a = zt_a.metrics();
    let opened = samples(
        &a,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"source\"",
            "source_workload=\"client\"",
            "destination_workload=\"echo\"",
            client_principal,
        ],
    );
    assert!(sample_sum(&opened) >= 30.0, "{opened:?}\n{a}");
    assert!(opened.iter().any(|l| l.contains("connection_security_policy=\"mutual_tls\"")), "{opened:?}");
    assert!(
        opened.iter().any(|l| l.contains("destination_service=\"echo.demo.svc.cluster.local\"")),
        "{opened:?}"
    );
    let failed = samples(
        &a,
        "istio_tcp_connections_failed_total",
        &["destination_workload=\"rogue\"", "response_flags=\"UF\""],
    );
    assert_eq!(sample_sum(&failed), 1.0, "the rogue destination: {failed:?}");
    let denied = samples(&a, "istio_authorization_decisions_total", &["decision=\"deny\"", "policy=\"-\""]);
    assert_eq!(sample_sum(&denied), 3.0, "intruder, stranger and plaintext refused at node-a: {denied:?}");
    assert!(
        sample_sum(&samples(
            &a,
            "istio_outbound_passthrough_connections_total",
            &["outcome=\"passthrough\""]
        )) >= 1.0
    );
    let sent =
        samples(&a, "istio_tcp_sent_bytes_total", &["reporter=\"source\"", "source_workload=\"client\""]);
    assert!(sample_sum(&sent) > 0.0, "{sent:?}");

    let b = zt_b.metrics();
    let inbound = samples(
        &b,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "source_workload=\"client\"",
            client_principal,
            "connection_security_policy=\"mutual_tls\"",
        ],
    );
    assert!(sample_sum(&inbound) >= 1.0, "{inbound:?}\n{b}");
    let received =
        samples(&b, "istio_tcp_received_bytes_total", &["reporter=\"destination\"", client_principal]);
    assert!(sample_sum(&received) > 0.0, "{received:?}");
    let plaintext = samples(
        &b,
        "istio_tcp_connections_opened_total",
        &[
            "reporter=\"destination\"",
            "destination_workload=\"intruder\"",
            "connection_security_policy=\"unknown\"",
        ],
    );
    assert_eq!(sample_sum(&plaintext), 1.0, "{plaintext:?}");
    let deny = samples(&b, "istio_authorization_decisions_total", &["policy=\"demo/deny-client\""]);
    assert_eq!(sample_sum(&deny), 2.0, "{deny:?}");
    let refused = samples(&b, "istio_outbound_passthrough_connections_total", &["outcome=\"refused\""]);
    assert_eq!(sample_sum(&refused), 1.0, "{refused:?}");

    // Drain: an open connection finishes while new ones are refused.
    let dst = format!("{ECHO_3}:8080");
    let mut held = c
        .client
        .enter(|| TcpStream::connect_timeout(&dst.parse().expect("addr"), Duration::from_secs(3)))
        .expect("held connection");
    held.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let mut lines = BufReader::new(held.try_clone().expect("clone"));
    writeln!(held, "one").expect("write");
    let mut first = String::new();
    lines.read_line(&mut first).expect("first reply");
    assert_eq!(first.trim_end(), format!("echo-3 {CLIENT} one"));

    let NodeZtunnel { rt: rt_a, mut app } = zt_a;
    let started = Instant::now();
    let draining = rt_a.spawn(async move {
        let cut = app.drain(Duration::from_secs(20)).await;
        (app, cut)
    });
    let refused_new = (0..20).any(|_| {
        let outcome = exchange(&c.client, &format!("{ECHO_1}:8080"), "new");
        outcome.is_err() || outcome.as_deref() == Ok("")
    });
    assert!(refused_new, "new connections must be refused while draining");
    writeln!(held, "two").expect("write during drain");
    let mut second = String::new();
    lines.read_line(&mut second).expect("reply during drain");
    assert_eq!(second.trim_end(), format!("echo-3 {CLIENT} two"));
    held.shutdown(std::net::Shutdown::Write).expect("half-close");
    let mut rest = String::new();
    lines.read_to_string(&mut rest).expect("close");
    let (app, cut) = rt_a.block_on(draining).expect("drain task");
    assert_eq!(cut, 0, "the open connection finished on its own");
    assert!(started.elapsed() < Duration::from_secs(20), "drain ended when the last connection did");

    NodeZtunnel { rt: rt_a, app }.stop(&c.node_a);
    zt_b.stop(&c.node_b);
    cp_rt.block_on(xds.stop());
}
