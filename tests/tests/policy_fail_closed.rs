//! Policy fails closed, end to end (root; CI runs as root, elsewhere this fails saying why).
//!
//! One node namespace with its ztunnel (in-process, eBPF capture, local CA) fed by the in-repo
//! xDS server on the node's loopback, and pods wired to it running a line echo server that
//! answers `<pod> <peer ip> <line>`:
//!
//! ```text
//!   node (ztunnel, xDS server on 127.0.0.1:15010)
//!   client  10.1.1.2   demo/sa/client
//!   echo-1  10.1.2.2   names demo/only-client
//!   echo-2  10.1.3.2   names demo/later
//! ```
//!
//! - An ALLOW that fails validation is NACKed and held as matching nothing: its workload is
//!   closed, not open.
//! - A workload naming a policy that does not exist is refused until the policy arrives.
//! - Nothing is accepted before the first sync: a connection made then waits and is served
//!   with the synced policy.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use mesh_tests::echo::{exchange, expect_refused};
use mesh_tests::netns::{Netns, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::{XdsServerHandle, XdsStore};
use proto::AUTHORIZATION_TYPE_URL;
use proto::security as sec;

const CLIENT: &str = "10.1.1.2";
const ECHO_1: &str = "10.1.2.2";
const ECHO_2: &str = "10.1.3.2";
const XDS_ADDR: &str = "127.0.0.1:15010";

const MESH: &str = r#"
workloads:
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.1.1.2], node: node-a}
  - {name: echo-1, namespace: demo, serviceAccount: echo, addresses: [10.1.2.2], node: node-a,
     authorizationPolicies: [demo/only-client]}
  - {name: echo-2, namespace: demo, serviceAccount: echo, addresses: [10.1.3.2], node: node-a,
     authorizationPolicies: [demo/later]}
"#;

/// The root tests share the host's bpffs and CPU: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// What the access log (`target: "access"`) said, one line of `field=value` per record.
#[derive(Default)]
struct AccessLog {
    lines: Mutex<Vec<String>>,
    spans: AtomicU64,
}

impl AccessLog {
    /// The process-wide capture, installed on first use.
    fn get() -> &'static AccessLog {
        static LOG: OnceLock<&'static AccessLog> = OnceLock::new();
        LOG.get_or_init(|| {
            let log: &'static AccessLog = Box::leak(Box::default());
            tracing::subscriber::set_global_default(Capture(log))
                .expect("no other subscriber in this test binary");
            log
        })
    }

    /// Records about the connection refused to `workload`.
    fn refusals_to(&self, workload: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines
            .iter()
            .filter(|l| l.contains("connection refused") && l.contains(&format!("dst.workload={workload} ")))
            .cloned()
            .collect()
    }
}

/// A minimal subscriber keeping the access records (the test crate has no tracing-subscriber).
struct Capture(&'static AccessLog);

struct Fields(String);

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={value:?} ", field.name());
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.target() == "access"
    }

    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(self.0.spans.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(String::new());
        event.record(&mut fields);
        self.0.lines.lock().unwrap_or_else(PoisonError::into_inner).push(fields.0);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

struct Pods {
    node: Netns,
    client: Netns,
    echo_1: Netns,
    echo_2: Netns,
}

fn pods(tag: &str) -> Pods {
    require_root("policy fail-closed tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("pf{pid}{tag}-{role}"));
    let p = Pods { node: ns("node"), client: ns("client"), echo_1: ns("echo1"), echo_2: ns("echo2") };
    wire(&p.node, &p.client, "v-client", "10.1.1");
    wire(&p.node, &p.echo_1, "v-echo1", "10.1.2");
    wire(&p.node, &p.echo_2, "v-echo2", "10.1.3");
    for (ns, name) in [(&p.echo_1, "echo-1"), (&p.echo_2, "echo-2")] {
        mesh_tests::echo::serve_pod(ns, "0.0.0.0", name);
    }
    p
}

/// The sum of the samples of `metric` carrying every one of `labels` (0 when there are none).
fn sample_sum(metrics: &str, metric: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An ALLOW of scope WORKLOAD_SELECTOR for principal `demo/sa/<sa>`.
fn allow_only(name: &str, sa: &str) -> sec::Authorization {
    let principal = sec::StringMatch {
        match_type: Some(sec::string_match::MatchType::Exact(format!("cluster.local/ns/demo/sa/{sa}"))),
    };
    sec::Authorization {
        name: name.into(),
        namespace: "demo".into(),
        scope: sec::Scope::WorkloadSelector as i32,
        action: sec::Action::Allow as i32,
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match { principals: vec![principal], ..Default::default() }],
            }],
        }],
        ..Default::default()
    }
}

/// The same policy with a rule that fails validation (a /40 prefix on an IPv4 address), its
/// name, namespace, scope and action readable.
fn invalid(mut a: sec::Authorization) -> sec::Authorization {
    let bad = sec::Address { address: vec![10, 0, 0, 0], length: 40 };
    a.rules[0].clauses[0].matches[0].source_ips.push(bad);
    a
}

fn put_policy(store: &XdsStore, a: &sec::Authorization) {
    store.insert(AUTHORIZATION_TYPE_URL, &format!("{}/{}", a.namespace, a.name), a);
}

/// The xDS server serving `store` in `node`, on its loopback.
fn control_plane(node: &Netns, store: Arc<XdsStore>) -> (tokio::runtime::Runtime, XdsServerHandle) {
    mesh_tests::node::control_plane(node, XDS_ADDR, store)
}

fn start_ztunnel(node: &Netns, ca_dir: &std::path::Path, extra: &[&str]) -> NodeZtunnel {
    let ca = ca_dir.to_str().expect("path");
    let xds_url = format!("http://{XDS_ADDR}");
    let mut flags = vec!["--xds-address", &xds_url, "--local-ca", ca, "--redirect", "--uplink", "*"];
    flags.extend(["--node-name", "node-a"]);
    flags.extend_from_slice(extra);
    NodeZtunnel::start(node, &flags)
}

/// Waits until `zt`'s state satisfies `pred`.
fn converge(zt: &NodeZtunnel, what: &str, pred: impl Fn(&ztunnel::state::Snapshot) -> bool + Send + 'static) {
    let state = zt.app.state.clone();
    let done = zt
        .block(async move { tokio::time::timeout(mesh_tests::CONVERGE_TIMEOUT, state.wait_for(pred)).await });
    assert!(done.is_ok(), "timed out waiting for {what}");
}

fn echo_1_has(policy_rules: usize) -> impl Fn(&ztunnel::state::Snapshot) -> bool + Send + 'static {
    move |s| {
        s.workload_by_uid("Kubernetes//Pod/demo/echo-1").is_some_and(|w| {
            s.policies_for(w).iter().any(|p| p.name == "only-client" && p.rules.len() == policy_rules)
        })
    }
}

#[test]
fn an_allow_that_fails_validation_closes_its_workload_instead_of_opening_it() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let log = AccessLog::get();
    let p = pods("a");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let store = XdsStore::new();
    store.load_yaml(MESH).expect("mesh");
    // echo-1's only ALLOW arrives in a form that fails validation.
    put_policy(&store, &invalid(allow_only("only-client", "client")));
    let (cp_rt, xds) = control_plane(&p.node, store.clone());
    let zt = start_ztunnel(&p.node, ca_dir.path(), &[]);
    zt.wait_ready("ztunnel");
    zt.converge("pods enrolled", &|s| s.pods.len() == 3);

    // The NACK went out, naming the policy, and is counted.
    let nack = cp_rt.block_on(store.wait_reply(Duration::from_secs(10), |r| {
        r.type_url == AUTHORIZATION_TYPE_URL
            && r.error.as_ref().is_some_and(|e| e.contains("demo/only-client"))
    }));
    assert!(nack.is_some(), "no NACK for demo/only-client: {:?}", store.replies());
    let metrics = zt.metrics();
    let url = format!("url=\"{AUTHORIZATION_TYPE_URL}\"");
    assert!(sample_sum(&metrics, "istio_xds_nack_total", &[&url]) >= 1.0, "{metrics}");

    // Closed, not open: the rejected ALLOW is held as one that matches nothing.
    expect_refused(exchange(&p.client, &format!("{ECHO_1}:8080"), "let me in"), "client -> echo-1");
    let metrics = zt.metrics();
    let held = sample_sum(&metrics, "istio_authorization_policy_failsafe_total", &["action=\"ALLOW\""]);
    assert_eq!(held, 1.0, "{metrics}");
    assert_eq!(sample_sum(&metrics, "istio_authorization_policies_failsafe", &[]), 1.0, "{metrics}");
    let denied = sample_sum(
        &metrics,
        "istio_authorization_decisions_total",
        &["decision=\"deny\"", "reason=\"no_allow_match\""],
    );
    assert_eq!(denied, 1.0, "{metrics}");
    let refusals = log.refusals_to("echo-1");
    assert!(
        refusals.iter().any(|l| l.contains("held fail-safe") && l.contains("demo/only-client")),
        "the access record says why: {refusals:?}"
    );

    // A good version takes over and lets the client in.
    put_policy(&store, &allow_only("only-client", "client"));
    converge(&zt, "the good only-client", echo_1_has(1));
    assert_eq!(exchange(&p.client, &format!("{ECHO_1}:8080"), "hi"), Ok(format!("echo-1 {CLIENT} hi")));
    assert_eq!(sample_sum(&zt.metrics(), "istio_authorization_policies_failsafe", &[]), 0.0);

    zt.stop(&p.node);
    cp_rt.block_on(xds.stop());
}

#[test]
fn a_workload_naming_a_missing_policy_is_refused_until_it_arrives() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let log = AccessLog::get();
    let p = pods("b");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    let store = XdsStore::new();
    store.load_yaml(MESH).expect("mesh");
    put_policy(&store, &allow_only("only-client", "client"));
    let (cp_rt, xds) = control_plane(&p.node, store.clone());
    let zt = start_ztunnel(&p.node, ca_dir.path(), &[]);
    zt.wait_ready("ztunnel");
    zt.converge("pods enrolled", &|s| s.pods.len() == 3);

    // echo-2 names demo/later, which does not exist: refused, and said so.
    expect_refused(exchange(&p.client, &format!("{ECHO_2}:8080"), "anyone home?"), "client -> echo-2");
    let metrics = zt.metrics();
    let missing = sample_sum(
        &metrics,
        "istio_authorization_decisions_total",
        &["decision=\"deny\"", "reason=\"policy_missing\"", "policy=\"demo/later\""],
    );
    assert_eq!(missing, 1.0, "{metrics}");
    let refusals = log.refusals_to("echo-2");
    assert!(
        refusals.iter().any(|l| l.contains("policy demo/later named by the destination is missing")),
        "the access record says why: {refusals:?}"
    );
    // echo-1, whose policy is there, is decided by it.
    assert_eq!(exchange(&p.client, &format!("{ECHO_1}:8080"), "hi"), Ok(format!("echo-1 {CLIENT} hi")));

    // The policy arrives and allows the client.
    put_policy(&store, &allow_only("later", "client"));
    converge(&zt, "demo/later", |s| {
        s.workload_by_uid("Kubernetes//Pod/demo/echo-2")
            .is_some_and(|w| s.policies_for(w).iter().any(|p| p.name == "later"))
    });
    assert_eq!(exchange(&p.client, &format!("{ECHO_2}:8080"), "now?"), Ok(format!("echo-2 {CLIENT} now?")));

    zt.stop(&p.node);
    cp_rt.block_on(xds.stop());
}

#[test]
fn nothing_is_accepted_before_the_first_sync() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let p = pods("c");
    let ca_dir = tempfile::tempdir().expect("tempdir");
    // No control plane yet. The client is enrolled explicitly, so its traffic is captured.
    let zt = start_ztunnel(&p.node, ca_dir.path(), &["--enroll", CLIENT]);
    zt.converge("client enrolled", &|s| s.pods.len() == 1);
    assert!(!zt.app.ready.is_ready(), "ready before any sync: {:?}", zt.app.ready.pending());
    let metrics = zt.metrics();
    assert_eq!(sample_sum(&metrics, "istio_proxy_listeners_accepting", &[]), 0.0, "{metrics}");

    // A connection made now is neither served nor refused: it waits in the listener's backlog.
    let dst: SocketAddr = format!("{ECHO_1}:8080").parse().expect("addr");
    let mut early = p
        .client
        .enter(|| TcpStream::connect_timeout(&dst, Duration::from_secs(3)))
        .expect("the kernel completes the handshake");
    let mut buf = [0u8; 64];
    let outcome = writeln!(early, "early")
        .and_then(|()| early.shutdown(std::net::Shutdown::Write))
        .and_then(|()| early.set_read_timeout(Some(Duration::from_secs(2))))
        .and_then(|()| early.read(&mut buf));
    match outcome {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("a connection before the first sync was handled (served or refused): {other:?}"),
    }

    // The control plane comes up: after the first sync the waiting connection is served, under
    // the policy now known (echo-1's demo/only-client allows the client).
    let store = XdsStore::new();
    store.load_yaml(MESH).expect("mesh");
    put_policy(&store, &allow_only("only-client", "client"));
    put_policy(&store, &allow_only("later", "client"));
    let (cp_rt, xds) = control_plane(&p.node, store);
    zt.wait_ready("ztunnel after the control plane came up");
    early.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let mut reply = String::new();
    BufReader::new(&early).read_line(&mut reply).expect("reply once synced");
    assert_eq!(reply.trim_end(), format!("echo-1 {CLIENT} early"));
    let metrics = zt.metrics();
    for listener in ["outbound", "inbound", "inbound_plaintext"] {
        let label = format!("listener=\"{listener}\"");
        assert_eq!(sample_sum(&metrics, "istio_proxy_listeners_accepting", &[&label]), 1.0, "{metrics}");
    }

    zt.stop(&p.node);
    cp_rt.block_on(xds.stop());
}
