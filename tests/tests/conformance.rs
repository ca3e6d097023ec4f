//! The Gateway API mesh (GAMMA) conformance suite, run through the real mesh (root; CI runs as
//! root, elsewhere this fails saying why): every case of `tests/conformance/cases.yaml` is
//! loaded, as standard YAML, into the in-repo control plane with the cluster of
//! `tests/conformance/base.yaml`, and its requests go client -> ztunnel -> HBONE -> waypoint ->
//! HBONE -> ztunnel -> echo backend, in network namespaces with eBPF capture and mTLS.
//!
//! ```text
//!   node-a (10.0.0.1) ---- link ---- node-b (10.0.0.2)
//!   client           10.1.1.2        echo-v1   10.2.1.2  (HTTP 8080, gRPC 7070)
//!   echo-v2          10.1.2.2        waypoint  10.2.5.2  (gateway-conformance-mesh/waypoint)
//!   consumer echo-v1 10.1.3.2
//! ```
//! The backends answer like the suite's echo-advanced: which pod answered and the request it
//! got. Each case reports passed, failed (with its first mismatch) or unsupported (with why); the
//! test fails if a case not marked unsupported fails.

#[path = "conformance/cases.rs"]
mod cases;
#[path = "conformance/client.rs"]
mod client;
#[path = "conformance/echo.rs"]
mod echo;
#[path = "support/l7.rs"]
mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cases::{Case, Expect, Protocol, Reply, Request, Source};
use common::translate::Translator;
use mesh_tests::netns::{Netns, link_nodes, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use mesh_tests::xds_server::XdsStore;
use serde::Deserialize;

const BASE: &str = include_str!("../conformance/base.yaml");
const CASES: &str = include_str!("../conformance/cases.yaml");
/// The suite's namespace: services named without a namespace are there.
const MESH_NS: &str = "gateway-conformance-mesh";
const XDS_ADDR: &str = "10.0.0.1:15010";
const WAYPOINT_IP: &str = "10.2.5.2";
/// How long the waypoint may take to hold a case's routes.
const ROUTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Tries of a weighted distribution before it counts as failed (the suite allows 10).
const WEIGHT_TRIES: usize = 3;

/// The addresses the base gives: Services' cluster IPs and pods' IPs.
struct Directory {
    services: BTreeMap<(String, String), IpAddr>,
    /// (name, namespace, address).
    pods: Vec<(String, String, IpAddr)>,
}

impl Directory {
    fn read(base: &str) -> Self {
        #[derive(Deserialize)]
        struct Meta {
            name: String,
            #[serde(default)]
            namespace: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Doc {
            kind: String,
            metadata: Meta,
            #[serde(default)]
            spec: serde_json::Value,
            #[serde(default)]
            status: serde_json::Value,
        }
        let mut dir = Directory { services: BTreeMap::new(), pods: Vec::new() };
        for doc in serde_yaml_ng::Deserializer::from_str(base) {
            let d = Doc::deserialize(doc).expect("base.yaml object");
            let ip = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<IpAddr>().ok());
            match d.kind.as_str() {
                "Service" => {
                    let vip = ip(&d.spec["clusterIP"]).expect("every Service of the base has a clusterIP");
                    dir.services.insert((d.metadata.namespace, d.metadata.name), vip);
                }
                "Pod" => {
                    let addr = ip(&d.status["podIP"]).expect("every Pod of the base has a podIP");
                    dir.pods.push((d.metadata.name, d.metadata.namespace, addr));
                }
                _ => {}
            }
        }
        dir
    }

    /// The pod of `namespace` whose name starts with `prefix` (pod names end in generated parts).
    fn pod(&self, namespace: &str, prefix: &str) -> (String, IpAddr) {
        self.pods
            .iter()
            .find(|(name, ns, _)| ns == namespace && name.starts_with(prefix))
            .map(|(name, _, ip)| (name.clone(), *ip))
            .unwrap_or_else(|| panic!("no pod {prefix}* in {namespace} in base.yaml"))
    }

    /// Where a request's `host` goes: the address to connect to and the authority to send.
    fn resolve(&self, host: &str) -> Result<(SocketAddr, String), String> {
        if let Some(rest) = host.strip_prefix("pod/") {
            let (prefix, port) =
                rest.rsplit_once(':').ok_or_else(|| format!("{host}: a pod needs a port"))?;
            let port: u16 = port.parse().map_err(|_| format!("{host}: bad port"))?;
            let (_, ip) = self.pod(MESH_NS, prefix);
            return Ok((SocketAddr::new(ip, port), format!("{ip}:{port}")));
        }
        let (name, port) = match host.rsplit_once(':') {
            Some((n, p)) => (n, p.parse::<u16>().map_err(|_| format!("{host}: bad port"))?),
            None => (host, 80),
        };
        let (service, ns) = name.split_once('.').unwrap_or((name, MESH_NS));
        let vip = self
            .services
            .get(&(ns.to_string(), service.to_string()))
            .ok_or_else(|| format!("{host}: no Service {ns}/{service} in base.yaml"))?;
        Ok((SocketAddr::new(*vip, port), host.to_string()))
    }
}

struct Pods {
    node_a: Netns,
    node_b: Netns,
    client: Netns,
    consumer: Netns,
    v1: Netns,
    v2: Netns,
    waypoint: Netns,
}

fn pods() -> Pods {
    require_root("the Gateway API mesh conformance run");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("gc{pid}-{role}"));
    let p = Pods {
        node_a: ns("na"),
        node_b: ns("nb"),
        client: ns("client"),
        consumer: ns("consumer"),
        v1: ns("v1"),
        v2: ns("v2"),
        waypoint: ns("wp"),
    };
    link_nodes(&p.node_a, &p.node_b);
    wire(&p.node_a, &p.client, "v-client", "10.1.1");
    wire(&p.node_a, &p.v2, "v-v2", "10.1.2");
    wire(&p.node_a, &p.consumer, "v-consumer", "10.1.3");
    wire(&p.node_b, &p.v1, "v-v1", "10.2.1");
    wire(&p.node_b, &p.waypoint, "v-wp", "10.2.5");
    p
}

/// How one case went.
enum Outcome {
    Passed(String),
    Failed(String),
    Unsupported(String),
}

/// What the cases run against.
struct Mesh {
    store: Arc<XdsStore>,
    waypoint: waypoint::app::App,
    wp_rt: tokio::runtime::Runtime,
    senders: BTreeMap<Source, tokio::runtime::Runtime>,
    dir: Directory,
    /// Requests sent so far.
    sent: AtomicUsize,
}

impl Mesh {
    /// Loads the base and `case`'s routes and waits until the waypoint holds exactly them;
    /// returns what went wrong (a refused object, a NACK).
    fn load(&self, case: &Case) -> Vec<String> {
        let text = match &case.routes {
            Some(routes) => format!("{BASE}\n---\n{routes}"),
            None => BASE.to_string(),
        };
        let mut problems = Vec::new();
        // A fresh translator: no object of an earlier case stays in force.
        match self.store.load_yaml_with(&mut Translator::default(), &text, &case.name) {
            Ok((_, refusals)) => problems.extend(refusals.into_iter().map(|r| format!("refused: {r}"))),
            Err(e) => problems.push(format!("not loaded: {e:#}")),
        }
        let want = self.store.versions(proto::WAYPOINT_RESOURCE_TYPE_URL);
        let routes = self.waypoint.routes.clone();
        let held = self.wp_rt.block_on(async {
            tokio::time::timeout(ROUTES_TIMEOUT, routes.wait_for(|_| routes.versions() == want)).await
        });
        if held.is_err() {
            let nacks: Vec<String> = self.store.replies().into_iter().filter_map(|r| r.error).collect();
            problems.push(format!(
                "the waypoint never held the case's routes (holds {:?}; NACKs: {nacks:?})",
                self.waypoint.routes.versions().keys()
            ));
        }
        // The table is rebuilt right after the resources are stored.
        std::thread::sleep(Duration::from_millis(50));
        problems
    }

    /// Sends `req` `count` times from its pod.
    fn send(&self, req: &Arc<Request>, count: usize) -> Result<Vec<Reply>, String> {
        let (addr, authority) = self.dir.resolve(&req.host)?;
        let rt = &self.senders[&req.from];
        let req = req.clone();
        let task = match req.protocol {
            Protocol::Http => rt.spawn(client::send_http(addr, authority, req, count)),
            Protocol::Grpc => rt.spawn(client::send_grpc(addr, authority, req, count)),
        };
        let replies = rt.block_on(task).map_err(|e| format!("sender: {e}"))?;
        self.sent.fetch_add(replies.len(), Ordering::Relaxed);
        Ok(replies)
    }

    /// Runs one request of a case: the first mismatch, or a note on what was seen.
    fn request(&self, req: &Arc<Request>) -> Result<Option<String>, String> {
        let expect: &Expect = &req.expect;
        let count = req.count.unwrap_or(1).max(1);
        let tries = if expect.weights.is_empty() { 1 } else { WEIGHT_TRIES };
        let mut last = Err(String::new());
        for _ in 0..tries {
            let replies = self.send(req, count)?;
            for (i, reply) in replies.iter().enumerate() {
                cases::check(expect, reply).map_err(|e| match count {
                    1 => e,
                    _ => format!("answer {} of {count}: {e}", i + 1),
                })?;
            }
            if expect.weights.is_empty() {
                return Ok(None);
            }
            let pods: Vec<String> =
                replies.iter().filter_map(|r| r.echo.as_ref()).map(|e| e.pod.clone()).collect();
            last = cases::check_weights(expect, &pods).map(Some);
            if last.is_ok() {
                break;
            }
        }
        last
    }

    fn run(&self, case: Case) -> Run {
        let started = std::time::Instant::now();
        let sent_before = self.sent.load(Ordering::Relaxed);
        let mut problems = self.load(&case);
        let mut notes = Vec::new();
        let total = case.requests.len();
        let mut failed = 0;
        for (i, req) in case.requests.into_iter().enumerate() {
            let req = Arc::new(req);
            match self.request(&req) {
                Ok(note) => notes.extend(note),
                Err(e) => {
                    failed += 1;
                    problems.push(format!("request {} ({}): {e}", i + 1, req.describe()));
                }
            }
        }
        let sent = self.sent.load(Ordering::Relaxed) - sent_before;
        let tally = format!("{} of {total} requests as expected", total - failed);
        let outcome = match (&case.unsupported, problems.first()) {
            (Some(why), Some(first)) => Outcome::Unsupported(format!("{why} [{tally}; {first}]")),
            (Some(why), None) => {
                Outcome::Unsupported(format!("{why} [{tally}: passes anyway, drop the mark]"))
            }
            _ if sent == 0 => Outcome::Failed("no request sent: a case must send traffic".into()),
            (None, Some(first)) => Outcome::Failed(format!("{first} [{tally}]")),
            (None, None) => {
                Outcome::Passed(std::iter::once(tally).chain(notes).collect::<Vec<_>>().join("; "))
            }
        };
        Run { name: case.name, about: case.about, outcome, sent, took: started.elapsed() }
    }
}

/// One case, run.
struct Run {
    name: String,
    about: String,
    outcome: Outcome,
    /// Requests that went out (a repeated one counts each time).
    sent: usize,
    took: Duration,
}

fn report(runs: &[Run]) -> String {
    let width = runs.iter().map(|r| r.name.len()).max().unwrap_or(4);
    let mut out = format!("\n{:width$}  {:11}  {:>7}  note\n", "case", "result", "time");
    for r in runs {
        let (result, note) = match &r.outcome {
            Outcome::Passed(n) => ("passed", n),
            Outcome::Failed(n) => ("FAILED", n),
            Outcome::Unsupported(n) => ("unsupported", n),
        };
        let took = format!("{:.2}s", r.took.as_secs_f64());
        out.push_str(&format!("{:width$}  {result:11}  {took:>7}  {note}\n", r.name));
    }
    out
}

#[test]
fn gateway_api_mesh_conformance() {
    let file: cases::CaseFile = serde_yaml_ng::from_str(CASES).unwrap_or_else(|e| panic!("cases.yaml: {e}"));
    let mut names: Vec<&str> = file.cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), file.cases.len(), "case names are unique");
    assert!(file.cases.iter().all(|c| !c.requests.is_empty()), "every case sends requests");

    let p = pods();
    if std::env::var_os("RUST_LOG").is_some() {
        common::telemetry::init(common::telemetry::LogFormat::Text);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca").to_str().expect("path").to_string();
    let access_log = dir.path().join("access.log");

    let store = XdsStore::new();
    store.load_yaml(BASE).unwrap_or_else(|e| panic!("base.yaml: {e:#}"));
    let (cp_rt, xds) = mesh_tests::node::control_plane(&p.node_a, XDS_ADDR, store.clone());
    let url = format!("http://{XDS_ADDR}");
    let zt_a = NodeZtunnel::start_node(&p.node_a, &url, &ca, "node-a", &[]);
    let zt_b = NodeZtunnel::start_node(&p.node_b, &url, &ca, "node-b", &[]);
    zt_a.converge("node-a pods enrolled", &|s| s.pods.len() == 3);
    zt_b.converge("node-b pod enrolled", &|s| s.pods.len() == 1);
    let wp_rt = p.waypoint.runtime();
    let waypoint = support::start_waypoint_in(
        &wp_rt,
        &url,
        &ca,
        MESH_NS,
        WAYPOINT_IP,
        &["--access-log", access_log.to_str().expect("path")],
    );

    let directory = Directory::read(BASE);
    let (v1_rt, v2_rt) = (p.v1.runtime(), p.v2.runtime());
    for (rt, prefix) in [(&v1_rt, "echo-v1"), (&v2_rt, "echo-v2")] {
        let (pod, _) = directory.pod(MESH_NS, prefix);
        echo::http_echo(rt, &pod, MESH_NS);
        echo::grpc_echo(rt, &pod, MESH_NS);
    }
    let senders =
        BTreeMap::from([(Source::Client, p.client.runtime()), (Source::Consumer, p.consumer.runtime())]);
    let mesh = Mesh { store, waypoint, wp_rt, senders, dir: directory, sent: AtomicUsize::new(0) };

    let started = std::time::Instant::now();
    let runs: Vec<Run> = file.cases.into_iter().map(|case| mesh.run(case)).collect();
    let table = report(&runs);
    let sent: usize = runs.iter().map(|r| r.sent).sum();
    println!("{table}\n{} cases, {sent} requests sent, in {:.1?}", runs.len(), started.elapsed());
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .map(|r| format!("{} ({})", r.name, r.about))
        .collect();
    let Mesh { waypoint, wp_rt, .. } = mesh;
    drop(waypoint);
    drop(wp_rt);
    zt_a.stop(&p.node_a);
    zt_b.stop(&p.node_b);
    cp_rt.block_on(xds.stop());
    assert!(failed.is_empty(), "conformance cases failed: {failed:#?}{table}");
}
