//! Enrollment at pod creation through the chained CNI plugin, end to end (root; CI runs as root,
//! elsewhere these fail saying why).
//!
//! The test is the container runtime: it runs the node's CNI chain per the CNI spec (Debian's
//! `ptp` with `host-local`, then `ambient-cni`, which `ambient-cni install` appended to the
//! conflist) to give pods their network namespaces. ztunnel runs in-process in the node namespace
//! with eBPF capture, the enrollment socket, and a watch of the fake Kubernetes API server
//! (`mesh_tests::kube_api`, on the node's loopback); its xDS source is a local config file that
//! at first knows no pod, so every pod is enrolled before xDS could have said a word about it.
//!
//! ```text
//!   pods (10.1.0.0/16, ptp veths)  <->  node: ztunnel, fake API  <- uplink ->  outside 10.9.0.2:8080
//! ```
//!
//! The plugin binary is the one `cargo build -p ambient-cni` left next to this test's profile
//! directory (tests/run.sh builds it first).
//!
//! The restart tests read the kernel's capture itself (the pinned `enrolled` map, with
//! `bpftool`, which deploy/setup.sh installs) every few ms while one ztunnel stops and the next
//! starts, so that a pod uncaptured for a moment does not go unseen.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_tests::kube_api::{KubeApi, KubeApiServer, ResourceType};
use mesh_tests::netns::{Netns, enable_forwarding, require_root, wire};
use mesh_tests::node::NodeZtunnel;
use serde_json::{Value, json};

/// The root tests share the kernel's programs and the host's bpffs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const OUTSIDE: &str = "10.9.0.2";
const SERVER_PORT: u16 = 8080;
/// Debian's reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const NODE_NAME: &str = "node-a";

/// The plugin binary built next to this test (`target/<profile>/ambient-cni`).
fn plugin_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/cni-<hash> -> target/<profile>/ambient-cni
    let profile = exe.parent().and_then(Path::parent).expect("profile directory");
    let bin = profile.join("ambient-cni");
    assert!(
        bin.is_file(),
        "{} is missing: build the plugin first with `cargo build -p ambient-cni` (tests/run.sh does)",
        bin.display()
    );
    bin
}

fn require_reference_plugins() {
    for plugin in ["ptp", "host-local"] {
        let path = Path::new(REFERENCE_PLUGINS).join(plugin);
        assert!(
            path.is_file(),
            "{} is missing: install Debian's containernetworking-plugins (deploy/setup.sh does)",
            path.display()
        );
    }
}

/// A server in `ns` on `port` answering `outside <peer ip>`, counting the connections it sees.
fn serve(ns: &Netns, port: u16) -> Arc<AtomicUsize> {
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    ns.enter(|| {
        let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind server");
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                counter.fetch_add(1, Ordering::SeqCst);
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let _ = s.write_all(format!("outside {peer}").as_bytes());
            }
        });
    });
    seen
}

/// Connects from `ns` to `dst` and returns what the other end wrote, or the error.
fn talk(ns: &Netns, dst: &str) -> Result<String, String> {
    ns.enter(|| {
        let addr: SocketAddr = dst.parse().map_err(|e| format!("{dst}: {e}"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        Ok(reply)
    })
}

/// One pod sandbox: its network namespace and what the runtime passes about it.
struct Sandbox {
    netns: Netns,
    container_id: String,
    namespace: String,
    name: String,
    uid: String,
}

impl Sandbox {
    fn new(tag: &str, namespace: &str, name: &str, uid: &str) -> Self {
        let pid = std::process::id();
        Self {
            netns: Netns::create(&format!("cni{pid}-{tag}-{name}")),
            container_id: format!("sandbox-{name}-{pid}"),
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
        }
    }

    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

/// A plugin of the chain that failed.
#[derive(Debug)]
struct PluginFailure {
    plugin: String,
    exit: Option<i32>,
    stdout: String,
    stderr: String,
}

impl PluginFailure {
    /// The CNI error result it printed.
    fn error(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{self:?} printed no CNI error ({e})"))
    }
}

/// The runtime's side of CNI: a conflist executed plugin by plugin inside the node.
struct Chain {
    node: String,
    conflist: Value,
    /// `CNI_PATH`: where plugin binaries are looked up, in order.
    path: Vec<PathBuf>,
}

impl Chain {
    /// The first conflist of `conf_dir`, as a runtime picks it.
    fn load(node: &Netns, conf_dir: &Path, path: Vec<PathBuf>) -> Self {
        let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
            .expect("conf dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        files.sort();
        let first = files.first().unwrap_or_else(|| panic!("no conflist in {}", conf_dir.display()));
        let conflist =
            serde_json::from_slice(&std::fs::read(first).expect("read conflist")).expect("conflist json");
        Self { node: node.name.clone(), conflist, path }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().expect("plugins").clone()
    }

    fn types(&self) -> Vec<String> {
        self.plugins().iter().map(|p| p["type"].as_str().unwrap_or_default().to_string()).collect()
    }

    /// Runs one plugin with `command`, its configuration completed as the spec says (the
    /// list's `cniVersion` and `name`, and `prevResult`).
    fn exec(
        &self,
        plugin: &Value,
        command: &str,
        sb: &Sandbox,
        prev: Option<&Value>,
    ) -> Result<String, PluginFailure> {
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let ty = plugin["type"].as_str().expect("plugin type").to_string();
        let binary = self
            .path
            .iter()
            .map(|dir| dir.join(&ty))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {ty} not found in {:?}", self.path));
        let cni_path = self.path.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(":");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sb.container_id)
            .env("CNI_NETNS", format!("/run/netns/{}", sb.netns.name))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", sb.cni_args())
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(conf.to_string().as_bytes()).expect("write the configuration");
        drop(stdin);
        let out = child.wait_with_output().expect("plugin output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(PluginFailure {
                plugin: ty,
                exit: out.status.code(),
                stdout,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// ADD through the whole list, each plugin given the previous one's result; the final
    /// result.
    fn add(&self, sb: &Sandbox) -> Result<Value, PluginFailure> {
        self.add_with(sb, &|_| {})
    }

    /// [`Self::add`] with `edit` applied to each plugin's result before the next one gets it.
    fn add_with(&self, sb: &Sandbox, edit: &dyn Fn(&mut Value)) -> Result<Value, PluginFailure> {
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let out = self.exec(&plugin, "ADD", sb, prev.as_ref())?;
            let mut result: Value = serde_json::from_str(&out)
                .unwrap_or_else(|e| panic!("{} printed no result ({e}): {out:?}", plugin["type"]));
            edit(&mut result);
            prev = Some(result);
        }
        Ok(prev.expect("a non-empty list"))
    }

    /// CHECK through the list with the cached result as `prevResult`.
    fn check(&self, sb: &Sandbox, result: &Value) -> Result<(), PluginFailure> {
        for plugin in self.plugins() {
            self.exec(&plugin, "CHECK", sb, Some(result))?;
        }
        Ok(())
    }

    /// DEL through the list in reverse, each plugin given the cached result (when the ADD got
    /// that far); every failure.
    fn del(&self, sb: &Sandbox, result: Option<&Value>) -> Vec<PluginFailure> {
        self.plugins().iter().rev().filter_map(|p| self.exec(p, "DEL", sb, result).err()).collect()
    }
}

/// The pod's first address and host interface in a result of the chain.
fn pod_of(result: &Value) -> (IpAddr, String) {
    let host = result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i.get("sandbox").is_none())
        .and_then(|i| i["name"].as_str())
        .expect("host interface")
        .to_string();
    (address_of(result), host)
}

/// The pod's first address in a result of the chain.
fn address_of(result: &Value) -> IpAddr {
    let address = result["ips"][0]["address"].as_str().expect("address");
    address.split('/').next().and_then(|a| a.parse().ok()).expect("ip")
}

/// Keeps only the interfaces inside the sandbox (re-pointing the addresses at them), as a
/// primary CNI that does not report the host side of the pod's veth would.
fn hide_host_side(result: &mut Value) {
    let interfaces = result["interfaces"].as_array().cloned().unwrap_or_default();
    let kept: Vec<usize> =
        (0..interfaces.len()).filter(|i| interfaces[*i].get("sandbox").is_some()).collect();
    if let Some(ips) = result["ips"].as_array_mut() {
        for ip in ips {
            let old = ip["interface"].as_u64().and_then(|i| usize::try_from(i).ok());
            if let Some(new) = old.and_then(|old| kept.iter().position(|k| *k == old)) {
                ip["interface"] = json!(new);
            }
        }
    }
    result["interfaces"] = Value::Array(kept.iter().map(|i| interfaces[*i].clone()).collect());
}

/// `ip -j link show dev <dev>` in `ns`.
fn link(ns: &Netns, dev: &str) -> Value {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]);
    let links: Vec<Value> = serde_json::from_str(&out).expect("ip -j link");
    links.into_iter().next().unwrap_or_else(|| panic!("no {dev} in {}", ns.name))
}

/// A node: its namespace, the outside server on its uplink, a conf dir with the primary CNI's
/// conflist, and the plugin installed into it.
struct Node {
    node: Netns,
    /// Holds the server; deleted with the node.
    _outside: Netns,
    seen: Arc<AtomicUsize>,
    dir: tempfile::TempDir,
    chain: Chain,
    socket: PathBuf,
}

impl Node {
    fn new(tag: &str) -> Self {
        require_root("the CNI plugin test");
        require_reference_plugins();
        let plugin = plugin_binary();
        let pid = std::process::id();
        let node = Netns::create(&format!("cni{pid}-{tag}-node"));
        let outside = Netns::create(&format!("cni{pid}-{tag}-out"));
        wire(&node, &outside, "uplink", "10.9.0");
        enable_forwarding(&node);
        let seen = serve(&outside, SERVER_PORT);

        let dir = tempfile::tempdir().expect("tempdir");
        let (bin_dir, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
        std::fs::create_dir_all(&conf_dir).expect("conf dir");
        let primary = json!({
            "cniVersion": "1.0.0",
            "name": "pods",
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.1.0.0/16"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": dir.path().join("ipam"),
                },
            }],
        });
        std::fs::write(conf_dir.join("10-pods.conflist"), primary.to_string()).expect("conflist");
        let socket = dir.path().join("run").join("ztunnel-cni.sock");
        // What the plugin's DaemonSet does on the node.
        let install = Command::new(&plugin)
            .arg("install")
            .arg("--bin-dir")
            .arg(&bin_dir)
            .arg("--conf-dir")
            .arg(&conf_dir)
            .arg("--socket")
            .arg(&socket)
            .output()
            .expect("run ambient-cni install");
        assert!(install.status.success(), "install failed: {}", String::from_utf8_lossy(&install.stderr));
        let chain = Chain::load(&node, &conf_dir, vec![bin_dir, PathBuf::from(REFERENCE_PLUGINS)]);
        assert_eq!(chain.types(), ["ptp", "ambient-cni"], "the plugin goes last");
        Self { node, _outside: outside, seen, dir, chain, socket }
    }

    fn sandbox(&self, tag: &str, namespace: &str, name: &str, uid: &str) -> Sandbox {
        Sandbox::new(tag, namespace, name, uid)
    }

    /// ADD that must succeed.
    fn add(&self, sb: &Sandbox) -> Value {
        self.chain.add(sb).unwrap_or_else(|f| panic!("ADD of {} failed: {f:?}", sb.name))
    }

    /// DEL that must succeed in every plugin.
    fn del(&self, sb: &Sandbox, result: Option<&Value>) {
        let failures = self.chain.del(sb, result);
        assert!(failures.is_empty(), "DEL of {} failed: {failures:?}", sb.name);
    }

    fn outside_connections(&self) -> usize {
        self.seen.load(Ordering::SeqCst)
    }
}

/// The fake Kubernetes API on a runtime whose threads live in `node` (ztunnel reaches it on the
/// node's loopback); keep the runtime as long as the server runs.
fn kube_api(node: &Netns) -> (tokio::runtime::Runtime, KubeApi) {
    let rt = node.runtime();
    let api = rt.block_on(rt.spawn(KubeApiServer::start())).expect("join").expect("fake API server");
    (rt, api)
}

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let labels = mode.map_or_else(|| json!({}), |m| json!({"istio.io/dataplane-mode": m}));
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A pod scheduled on this node; returns its uid.
fn create_pod(api: &KubeApi, namespace: &str, name: &str, labels: Value) -> String {
    create_annotated_pod(api, namespace, name, labels, json!({}))
}

/// A pod scheduled on this node with `annotations`; returns its uid.
fn create_annotated_pod(
    api: &KubeApi,
    namespace: &str,
    name: &str,
    labels: Value,
    annotations: Value,
) -> String {
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"nodeName": NODE_NAME, "serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]},
    });
    let created = api.apply(pod).unwrap_or_else(|e| panic!("create pod {namespace}/{name}: {e:?}"));
    created["metadata"]["uid"].as_str().expect("uid").to_string()
}

/// The sum of the samples of `name` whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Waits up to 15 s for `pred` over ztunnel's metrics text.
fn wait_metrics(zt: &NodeZtunnel, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = zt.metrics();
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn config_dump(zt: &NodeZtunnel) -> Value {
    let (status, body) =
        zt.block(mesh_tests::http::get(zt.app.admin_addr, "/config_dump")).expect("admin endpoint");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("config dump json")
}

fn captured(zt: &NodeZtunnel, ip: IpAddr) -> Option<String> {
    zt.app.enrollment.as_ref().expect("redirection on").status().pods.get(&ip).cloned()
}

/// The local config (ztunnel's xDS source) once it knows pod `name` at `ip`.
fn mesh_with_pod(name: &str, ip: IpAddr) -> String {
    mesh_with_pods(&[(name, ip)])
}

/// The local config once it knows these pods (name, address) of namespace `demo`.
fn mesh_with_pods(pods: &[(&str, IpAddr)]) -> String {
    let mut yaml =
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
            .to_string();
    for (name, ip) in pods {
        yaml += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{serviceAccountName: {name}, nodeName: {NODE_NAME}}}\nstatus: {{podIPs: [{{ip: \"{ip}\"}}]}}\n"
        );
    }
    yaml
}

/// Removes the node's pinned capture if the test fails before `NodeZtunnel::stop` did (its
/// network namespace, and so the attachments, go with the node).
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn pods_are_captured_from_their_creation() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("e2e");
    let (_api_rt, api) = kube_api(&n.node);
    api.apply(namespace("demo", Some("ambient"))).expect("namespace");
    api.apply(namespace("plain", None)).expect("namespace");
    let uid_a = create_pod(&api, "demo", "a", json!({}));
    let uid_out = create_pod(&api, "demo", "opted-out", json!({"istio.io/dataplane-mode": "none"}));
    let uid_b = create_pod(&api, "demo", "b", json!({}));
    let uid_c = create_pod(&api, "demo", "c", json!({}));
    let uid_plain = create_pod(&api, "plain", "p", json!({}));

    let kubeconfig = api.write_kubeconfig(n.dir.path()).expect("kubeconfig");
    let mesh = n.dir.path().join("mesh.yaml");
    // xDS knows no pod at all.
    std::fs::write(&mesh, "").expect("local config");
    let flags = enrollment_flags(&n, &mesh, &kubeconfig);
    let _pins = PinGuard(mesh_tests::node::bpf_pin_dir(&n.node));
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("ztunnel with the Kubernetes watch");

    // A pod of the ambient namespace: enrolled before ADD returns, though xDS has never heard of
    // it. Its very first connection is captured and refused by ztunnel (an unknown source),
    // never passed in plaintext: the server sees nothing.
    let a = n.sandbox("e2e", "demo", "a", &uid_a);
    let result_a = n.add(&a);
    let (ip_a, veth_a) = pod_of(&result_a);
    assert_eq!(captured(&zt, ip_a).as_deref(), Some(veth_a.as_str()), "enrolled on its veth by the ADD");
    let before = zt.app.enrollment.as_ref().expect("redirection").status().stats["captured_outbound"];
    let first = talk(&a.netns, &format!("{OUTSIDE}:{SERVER_PORT}"));
    assert!(!first.as_ref().is_ok_and(|r| r.starts_with("outside")), "pod a got out in plaintext: {first:?}");
    assert_eq!(n.outside_connections(), 0, "the server saw pod a's connection");
    // The program's counters are published with the enrollment status (every few seconds).
    zt.converge("the first SYN counted as captured", &|s| s.stats["captured_outbound"] > before);
    // The program's counters are metrics too.
    wait_metrics(&zt, "the capture counters exported", |t| {
        metric(t, "istio_redirect_packets_total", &["outcome=\"captured_outbound\""]) >= 1.0
    });
    let text = wait_metrics(&zt, "the refusal counted", |t| {
        metric(t, "istio_tcp_connections_failed_total", &["reporter=\"source\"", "response_flags=\"NR\""])
            >= 1.0
    });
    assert_eq!(
        metric(&text, "istio_cni_enrollments_total", &["command=\"add\"", "result=\"enrolled\""]),
        1.0
    );
    assert_eq!(metric(&text, "istio_cni_announced_pods", &[]), 1.0);
    let dump = config_dump(&zt);
    let announced = dump["cni"]["announced"].as_array().expect("announced pods in the dump");
    assert_eq!(announced.len(), 1, "{dump}");
    assert_eq!(announced[0]["pod"], json!({"namespace": "demo", "name": "a"}));
    assert_eq!(announced[0]["interface"], veth_a.as_str());
    assert_eq!(announced[0]["ips"], json!([ip_a.to_string()]));
    // The runtime's CHECK agrees.
    n.chain.check(&a, &result_a).unwrap_or_else(|f| panic!("CHECK of a failed: {f:?}"));

    // A pod of the same namespace that opts out is not captured: it reaches the server itself.
    let out = n.sandbox("e2e", "demo", "opted-out", &uid_out);
    let result_out = n.add(&out);
    let ip_out = address_of(&result_out);
    assert_eq!(captured(&zt, ip_out), None);
    assert_eq!(talk(&out.netns, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {ip_out}")));
    assert_eq!(n.outside_connections(), 1);
    n.chain.check(&out, &result_out).unwrap_or_else(|f| panic!("CHECK of opted-out failed: {f:?}"));
    // So is a pod of a namespace outside the mesh.
    let plain = n.sandbox("e2e", "plain", "p", &uid_plain);
    let result_plain = n.add(&plain);
    assert_eq!(captured(&zt, address_of(&result_plain)), None);

    // A pod ztunnel cannot find (not on this node in the API): ADD fails with a CNI error after
    // ztunnel's bounded wait, so the pod never starts uncaptured; the runtime's DEL cleans up.
    let ghost = n.sandbox("e2e", "demo", "ghost", "no-such-uid");
    let failure = n.chain.add(&ghost).expect_err("ADD of an unknown pod must fail");
    assert_eq!(failure.plugin, "ambient-cni");
    assert_ne!(failure.exit, Some(0));
    let error = failure.error();
    assert_eq!(error["code"], 100, "{error}");
    assert_eq!(error["msg"], "ztunnel refused the pod");
    assert!(error["details"].as_str().is_some_and(|d| d.contains("demo/ghost is not known")), "{error}");
    assert!(failure.stderr.contains("ztunnel refused the pod"), "{}", failure.stderr);
    n.del(&ghost, None);
    let text = zt.metrics();
    assert_eq!(
        metric(&text, "istio_cni_refusals_total", &["command=\"add\"", "reason=\"pod_unknown\""]),
        1.0
    );

    let b = n.sandbox("e2e", "demo", "b", &uid_b);
    let result_b = n.add(&b);
    let (ip_b, veth_b) = pod_of(&result_b);
    assert_eq!(captured(&zt, ip_b).as_deref(), Some(veth_b.as_str()));

    // DEL unenrolls: the pod's address leaves the enrolled set (its veth goes with ptp's DEL).
    n.del(&b, Some(&result_b));
    assert_eq!(captured(&zt, ip_b), None, "DEL unenrolled pod b");
    assert!(!zt.app.enrollment.as_ref().expect("redirection").status().interfaces.contains_key(&veth_b));
    let text = zt.metrics();
    assert_eq!(
        metric(&text, "istio_cni_enrollments_total", &["command=\"del\"", "result=\"unenrolled\""]),
        2.0
    );

    // The pod's deletion seen in the watch unenrolls it too, even before its DEL.
    let c = n.sandbox("e2e", "demo", "c", &uid_c);
    let result_c = n.add(&c);
    let ip_c = address_of(&result_c);
    assert!(captured(&zt, ip_c).is_some());
    api.delete("v1", "Pod", Some("demo"), "c").expect("pod c deleted");
    zt.converge("pod c unenrolled after its deletion", &|s| !s.pods.contains_key(&ip_c));
    n.del(&c, Some(&result_c));

    // xDS catches up with pod a: its connections are then proxied (passthrough to a
    // destination outside the mesh) from its own address.
    std::fs::write(&mesh, mesh_with_pod("a", ip_a)).expect("local config");
    let state = zt.app.state.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    while state.snapshot().workload_by_ip(ip_a).is_none() {
        assert!(Instant::now() < deadline, "the local config never delivered pod a");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(talk(&a.netns, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {ip_a}")));
    assert_eq!(n.outside_connections(), 2);
    assert!(captured(&zt, ip_a).is_some(), "still captured: now through ztunnel's proxy");

    for (sb, result) in [(&a, &result_a), (&out, &result_out), (&plain, &result_plain)] {
        n.del(sb, Some(result));
    }
    let dump = config_dump(&zt);
    assert_eq!(dump["cni"]["announced"], json!([]), "{dump}");
    zt.stop(&n.node);
}

#[test]
fn without_ztunnel_add_fails_and_del_passes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("down");
    assert!(!n.socket.exists());

    // Nothing listens on the socket: ADD fails closed (retryable), DEL still succeeds.
    let pod = n.sandbox("down", "demo", "a", "uid-a");
    let failure = n.chain.add(&pod).expect_err("ADD without ztunnel must fail");
    assert_eq!(failure.plugin, "ambient-cni");
    let error = failure.error();
    assert_eq!(error["code"], 11, "try again later: {error}");
    assert_eq!(error["msg"], "ztunnel is unreachable");
    assert_eq!(error["cniVersion"], "1.0.0");
    n.del(&pod, None);
    let veths = n.node.ip(&["-j", "link", "show", "type", "veth"]);
    let veths: Vec<Value> =
        serde_json::from_str(if veths.trim().is_empty() { "[]" } else { &veths }).expect("links");
    assert_eq!(veths.len(), 1, "only the uplink is left: {veths:?}");

    // Pods of excluded namespaces are passed through without asking.
    let system = n.sandbox("down", "kube-system", "dns", "uid-dns");
    let result = n.add(&system);
    let ip = address_of(&result);
    assert_eq!(talk(&system.netns, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {ip}")));
    n.del(&system, Some(&result));
}

#[test]
fn the_plugin_finds_the_host_side_by_the_peer_index() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("peer");
    // A stand-in for ztunnel on the socket: records each request (one JSON line) and answers
    // `enrolled`.
    std::fs::create_dir_all(n.socket.parent().expect("socket dir")).expect("socket dir");
    let listener = std::os::unix::net::UnixListener::bind(&n.socket).expect("bind the socket");
    let server = std::thread::spawn(move || {
        let mut requests = Vec::new();
        for _ in 0..2 {
            let (stream, _) = listener.accept().expect("accept");
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line).expect("request");
            (&stream).write_all(b"{\"result\":\"enrolled\"}\n").expect("reply");
            requests.push(serde_json::from_str::<Value>(&line).expect("request json"));
        }
        requests
    });

    // The primary CNI's result names no host-side interface: the plugin asks the kernel for
    // the peer of the pod's eth0.
    let pod = n.sandbox("peer", "demo", "a", "uid-a");
    let result = n.chain.add_with(&pod, &hide_host_side).unwrap_or_else(|f| panic!("ADD failed: {f:?}"));
    let veth = n.node.ip(&["-j", "link", "show", "type", "veth"]);
    let veths: Vec<Value> = serde_json::from_str(&veth).expect("links");
    let eth0 = link(&pod.netns, "eth0");
    let peer = veths
        .iter()
        .find(|l| l["link_index"] == eth0["ifindex"] && l["ifname"] != "uplink")
        .and_then(|l| l["ifname"].as_str())
        .expect("the pod's veth in the node")
        .to_string();
    n.del(&pod, Some(&result));
    let requests = server.join().expect("stand-in ztunnel");
    assert_eq!(requests[0]["command"], "add");
    assert_eq!(requests[0]["namespace"], "demo");
    assert_eq!(requests[0]["name"], "a");
    assert_eq!(requests[0]["uid"], "uid-a");
    assert_eq!(requests[0]["netns"], format!("/run/netns/{}", pod.netns.name));
    assert_eq!(requests[0]["ips"], json!([address_of(&result).to_string()]));
    assert_eq!(requests[0]["host_interface"], peer.as_str(), "{requests:?}");
    assert_eq!(requests[1]["command"], "del");
    assert_eq!(requests[1]["container_id"], pod.container_id.as_str());
}

#[test]
fn a_restarted_ztunnel_keeps_a_pod_enrolled_at_creation_captured() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("restart");
    let (_api_rt, api) = kube_api(&n.node);
    api.apply(namespace("demo", Some("ambient"))).expect("namespace");
    let uid = create_pod(&api, "demo", "a", json!({}));
    let kubeconfig = api.write_kubeconfig(n.dir.path()).expect("kubeconfig");
    let mesh = n.dir.path().join("mesh.yaml");
    // xDS knows no pod, before and after the restart.
    std::fs::write(&mesh, "").expect("local config");
    let flags = enrollment_flags(&n, &mesh, &kubeconfig);
    let _pins = PinGuard(mesh_tests::node::bpf_pin_dir(&n.node));
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("ztunnel with the Kubernetes watch");
    let a = n.sandbox("restart", "demo", "a", &uid);
    let result = n.add(&a);
    let (ip, veth) = pod_of(&result);
    assert_eq!(captured(&zt, ip).as_deref(), Some(veth.as_str()));
    // The kubelet reports the pod's address.
    let status = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
    api.set_status("v1", "Pod", Some("demo"), "a", status).expect("pod status");

    // ztunnel restarts; the capture stays pinned meanwhile. The new one's first sync (which
    // still knows nothing of the pod) must not unenroll it: it holds the pod again from the
    // watch first. (Without the announced pods' file, as after an upgrade from a ztunnel that
    // wrote none: the watch alone recovers.)
    drop(zt);
    match std::fs::remove_file(announced_file(&n)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("remove the announced pods' file: {e}"),
        _ => {}
    }
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("the restarted ztunnel");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(captured(&zt, ip).as_deref(), Some(veth.as_str()), "the restart let the pod go uncaptured");
    let reply = talk(&a.netns, &format!("{OUTSIDE}:{SERVER_PORT}"));
    assert!(!reply.as_ref().is_ok_and(|r| r.starts_with("outside")), "pod a got out in plaintext: {reply:?}");
    assert_eq!(n.outside_connections(), 0, "the server saw pod a's connection");
    let dump = config_dump(&zt);
    let announced = dump["cni"]["announced"].as_array().expect("announced pods in the dump");
    assert!(
        announced.iter().any(|p| p["pod"]["name"] == "a" && p["container_id"] == "(from the watch)"),
        "{dump}"
    );

    // Its DEL lets it go, though the watch could not tell the sandbox: the pod's uid and
    // address name it.
    n.del(&a, Some(&result));
    assert_eq!(captured(&zt, ip), None, "DEL after the restart unenrolled the pod");
    assert_eq!(config_dump(&zt)["cni"]["announced"], json!([]));
    zt.stop(&n.node);
}

/// Where ztunnel keeps the announced pods across restarts: next to the enrollment socket.
fn announced_file(n: &Node) -> PathBuf {
    n.socket.parent().expect("socket dir").join("announced.json")
}

/// ztunnel's flags for a node with the enrollment socket and the watch, xDS from `mesh`.
fn enrollment_flags(n: &Node, mesh: &Path, kubeconfig: &Path) -> Vec<String> {
    let ca = n.dir.path().join("ca");
    let path = |p: &Path| p.to_str().expect("path").to_string();
    [
        "--local-config",
        &path(mesh),
        "--local-ca",
        &path(&ca),
        "--node-name",
        NODE_NAME,
        "--redirect",
        "--uplink",
        "uplink",
        "--enrollment-socket",
        &path(&n.socket),
        "--kube-watch",
        "--kubeconfig",
        &path(kubeconfig),
    ]
    .map(String::from)
    .to_vec()
}

fn start_ztunnel(n: &Node, flags: &[String]) -> NodeZtunnel {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    NodeZtunnel::start(&n.node, &flags)
}

/// The addresses captured in the kernel now: the keys of the pinned `enrolled` map, whichever
/// ztunnel runs (or none).
fn pinned_enrolled(pin_dir: &Path) -> Result<Vec<IpAddr>, String> {
    let map = pin_dir.join("enrolled");
    let out = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()
        .map_err(|e| format!("bpftool: {e}"))?;
    if !out.status.success() {
        return Err(format!("bpftool map dump {}: {}", map.display(), String::from_utf8_lossy(&out.stderr)));
    }
    let entries: Vec<Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("bpftool output: {e}"))?;
    entries
        .iter()
        .map(|e| {
            // Raw bytes ("0x0a", ...), or with BTF the struct's four host-order words.
            let bytes: Vec<u8> = match &e["key"] {
                Value::Array(hex) => hex
                    .iter()
                    .filter_map(|b| {
                        b.as_str().and_then(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).ok())
                    })
                    .collect(),
                key => key["w"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_u64)
                    .flat_map(|w| u32::try_from(w).unwrap_or_default().to_ne_bytes())
                    .collect(),
            };
            let octets: [u8; 16] =
                bytes.try_into().map_err(|b| format!("a key of {} bytes: {e}", Vec::len(&b)))?;
            Ok(std::net::Ipv6Addr::from(octets).to_canonical())
        })
        .collect()
}

/// What a [`CaptureWatch`] saw.
#[derive(Debug, Default)]
struct Sampled {
    /// Samples of the kernel's capture taken.
    samples: usize,
    /// Each address seen uncaptured, with when (since the watch started).
    uncaptured: Vec<(IpAddr, Duration)>,
    /// Connections the pods attempted to the outside server.
    attempts: usize,
}

/// Samples, every few ms on threads of their own, the kernel's capture of `pods`' addresses
/// (from the pinned map) and has each pod try to reach the outside server, until `stop`: for a
/// restart that must not leave a pod uncaptured for a moment (the server's count then says
/// whether a connection got out).
fn watch_capture<R>(pin_dir: &Path, pods: &[(&Sandbox, IpAddr)], during: impl FnOnce() -> R) -> (R, Sampled) {
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut seen = Sampled::default();
            while !stop.load(Ordering::SeqCst) {
                let enrolled =
                    pinned_enrolled(pin_dir).unwrap_or_else(|e| panic!("reading the capture: {e}"));
                seen.samples += 1;
                for (_, ip) in pods {
                    if !enrolled.contains(ip) {
                        seen.uncaptured.push((*ip, started.elapsed()));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        let talkers: Vec<_> = pods
            .iter()
            .map(|(sb, _)| {
                let stop = &stop;
                scope.spawn(move || {
                    sb.netns.enter(|| {
                        let addr: SocketAddr = format!("{OUTSIDE}:{SERVER_PORT}").parse().expect("addr");
                        let mut attempts = 0;
                        while !stop.load(Ordering::SeqCst) {
                            attempts += 1;
                            let _ = TcpStream::connect_timeout(&addr, Duration::from_millis(20));
                            std::thread::sleep(Duration::from_millis(3));
                        }
                        attempts
                    })
                })
            })
            .collect();
        // Stops the threads however `during` ends (a failed assertion too), so the scope ends.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let stopping = Stop(&stop);
        let result = during();
        drop(stopping);
        let mut sampled = sampler.join().expect("sampler");
        sampled.attempts = talkers.into_iter().map(|t| t.join().expect("talker")).sum();
        (result, sampled)
    })
}

#[test]
fn a_restart_keeps_every_announced_pod_captured_throughout() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("keep");
    let (_api_rt, api) = kube_api(&n.node);
    api.apply(namespace("demo", Some("ambient"))).expect("namespace");
    let uid_a = create_pod(&api, "demo", "a", json!({}));
    let uid_b = create_pod(&api, "demo", "b", json!({}));
    let kubeconfig = api.write_kubeconfig(n.dir.path()).expect("kubeconfig");
    let mesh = n.dir.path().join("mesh.yaml");
    // xDS knows no pod, before and after the restart.
    std::fs::write(&mesh, "").expect("local config");
    let flags = enrollment_flags(&n, &mesh, &kubeconfig);
    let pin_dir = mesh_tests::node::bpf_pin_dir(&n.node);
    let _pins = PinGuard(pin_dir.clone());
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("ztunnel with the Kubernetes watch");

    // Pod a's address reaches the API; pod b was announced moments before the restart: the
    // kubelet has not reported its address yet, so only what ztunnel kept can save it.
    let a = n.sandbox("keep", "demo", "a", &uid_a);
    let result_a = n.add(&a);
    let (ip_a, veth_a) = pod_of(&result_a);
    let status = json!({"phase": "Running", "podIP": ip_a.to_string(), "podIPs": [{"ip": ip_a.to_string()}]});
    api.set_status("v1", "Pod", Some("demo"), "a", status).expect("pod status");
    let b = n.sandbox("keep", "demo", "b", &uid_b);
    let result_b = n.add(&b);
    let (ip_b, veth_b) = pod_of(&result_b);
    assert_eq!(captured(&zt, ip_b).as_deref(), Some(veth_b.as_str()));

    // From before the old ztunnel stops until well after the new one is ready (and has narrowed
    // the capture it adopted), neither pod is uncaptured for a moment, nor gets out.
    let (zt, sampled) = watch_capture(&pin_dir, &[(&a, ip_a), (&b, ip_b)], || {
        std::thread::sleep(Duration::from_millis(200));
        drop(zt);
        std::thread::sleep(Duration::from_millis(200));
        let zt = start_ztunnel(&n, &flags);
        zt.wait_ready("the restarted ztunnel");
        std::thread::sleep(Duration::from_secs(2));
        zt
    });
    assert!(sampled.samples > 50 && sampled.attempts > 50, "too few samples: {sampled:?}");
    assert!(sampled.uncaptured.is_empty(), "the restart left pods uncaptured: {:?}", sampled.uncaptured);
    assert_eq!(n.outside_connections(), 0, "a pod got out in plaintext during the restart");
    assert_eq!(captured(&zt, ip_a).as_deref(), Some(veth_a.as_str()));
    assert_eq!(captured(&zt, ip_b).as_deref(), Some(veth_b.as_str()));

    // Both were held again from the file, with their sandboxes; narrowing ran (nothing pending).
    let dump = config_dump(&zt);
    assert_eq!(dump["narrowing_pending"], json!([]), "{dump}");
    let announced = dump["cni"]["announced"].as_array().expect("announced pods in the dump");
    let sandbox_of =
        |name: &str| announced.iter().find(|p| p["pod"]["name"] == name).map(|p| p["container_id"].clone());
    assert_eq!(sandbox_of("a"), Some(json!(a.container_id)), "{dump}");
    assert_eq!(sandbox_of("b"), Some(json!(b.container_id)), "{dump}");
    let text = zt.metrics();
    assert_eq!(
        metric(&text, "istio_cni_recovered_pods_total", &["source=\"file\"", "result=\"announced\""]),
        2.0
    );
    assert_eq!(metric(&text, "istio_cni_announced_file_rejected_total", &[]), 0.0);
    let file = announced_file(&n);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).expect("file").permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Their DELs let them go (and the file follows).
    n.del(&b, Some(&result_b));
    assert_eq!(captured(&zt, ip_b), None, "DEL of b after the restart");
    n.del(&a, Some(&result_a));
    assert_eq!(captured(&zt, ip_a), None, "DEL of a after the restart");
    let kept: Value = serde_json::from_slice(&std::fs::read(&file).expect("file")).expect("json");
    assert_eq!(kept["pods"], json!([]), "{kept}");
    zt.stop(&n.node);
}

#[test]
fn an_unreachable_api_server_postpones_narrowing_not_serving() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("wait");
    let (_api_rt, api) = kube_api(&n.node);
    api.apply(namespace("demo", Some("ambient"))).expect("namespace");
    let uids: Vec<String> = ["a", "b", "c"].iter().map(|p| create_pod(&api, "demo", p, json!({}))).collect();
    let kubeconfig = api.write_kubeconfig(n.dir.path()).expect("kubeconfig");
    let mesh = n.dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "").expect("local config");
    let flags = enrollment_flags(&n, &mesh, &kubeconfig);
    let pin_dir = mesh_tests::node::bpf_pin_dir(&n.node);
    let _pins = PinGuard(pin_dir.clone());
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("ztunnel with the Kubernetes watch");
    let pods: Vec<Sandbox> =
        ["a", "b", "c"].iter().zip(&uids).map(|(p, uid)| n.sandbox("wait", "demo", p, uid)).collect();
    let results: Vec<Value> = pods.iter().map(|sb| n.add(sb)).collect();
    let ips: Vec<IpAddr> = results.iter().map(address_of).collect();
    let (ip_a, ip_b, ip_c) = (ips[0], ips[1], ips[2]);
    for (name, ip) in [("a", ip_a), ("c", ip_c)] {
        let status = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
        api.set_status("v1", "Pod", Some("demo"), name, status).expect("pod status");
    }
    // xDS learns pod b: its connections are proxied (passed through to the outside server).
    std::fs::write(&mesh, mesh_with_pod("b", ip_b)).expect("local config");
    let knows_b = |zt: &NodeZtunnel| {
        let deadline = Instant::now() + Duration::from_secs(15);
        while zt.app.state.snapshot().workload_by_ip(ip_b).is_none() {
            assert!(Instant::now() < deadline, "the local config never delivered pod b");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    knows_b(&zt);
    assert_eq!(talk(&pods[1].netns, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {ip_b}")));

    // While ztunnel is down: pod c is deleted (its capture stays adopted, nobody wants it any
    // more), the announced pods' file is damaged, and the API server stops serving pods.
    let (zt, sampled) = watch_capture(&pin_dir, &[(&pods[0], ip_a)], || {
        drop(zt);
        api.delete("v1", "Pod", Some("demo"), "c").expect("pod c deleted");
        let file = announced_file(&n);
        std::fs::write(&file, "{\"version\": 1, \"pods\": [").expect("damage the file");
        assert!(api.unregister("v1", "Pod"), "pods served");
        let zt = start_ztunnel(&n, &flags);

        // The first sync is in: the proxies serve (pod b gets out, proxied) though the watch
        // cannot list, and nothing adopted is narrowed meanwhile.
        knows_b(&zt);
        assert_eq!(talk(&pods[1].netns, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {ip_b}")));
        std::thread::sleep(Duration::from_secs(1));
        assert!(captured(&zt, ip_c).is_some(), "narrowed before the pods were recovered");
        let dump = config_dump(&zt);
        let pending = dump["narrowing_pending"].as_array().cloned().unwrap_or_default();
        assert!(
            pending.len() == 1
                && pending[0].as_str().is_some_and(|p| p.contains("waiting for the Kubernetes watch")),
            "{dump}"
        );
        let text = zt.metrics();
        assert_eq!(metric(&text, "istio_cni_announced_file_rejected_total", &[]), 1.0, "the damaged file");

        // The API server is back: the watch lists, pod a is held again from it, and only then
        // is the adopted capture narrowed (pod c goes).
        api.register(ResourceType::namespaced("v1", "Pod", "pods"));
        zt.wait_ready("the restarted ztunnel");
        zt.converge("pod c unenrolled once narrowing was allowed", &|s| !s.pods.contains_key(&ip_c));
        zt
    });
    assert!(sampled.samples > 50 && sampled.attempts > 50, "too few samples: {sampled:?}");
    assert!(sampled.uncaptured.is_empty(), "pod a went uncaptured: {:?}", sampled.uncaptured);
    assert_eq!(n.outside_connections(), 2, "only pod b's two connections got out");
    assert!(captured(&zt, ip_a).is_some());
    assert!(captured(&zt, ip_b).is_some(), "xDS wants pod b");
    let dump = config_dump(&zt);
    assert_eq!(dump["narrowing_pending"], json!([]), "{dump}");
    let announced = dump["cni"]["announced"].as_array().expect("announced pods in the dump");
    assert!(
        announced.iter().any(|p| p["pod"]["name"] == "a" && p["container_id"] == "(from the watch)"),
        "{dump}"
    );

    for (sb, result) in pods.iter().zip(&results) {
        n.del(sb, Some(result));
    }
    assert_eq!(captured(&zt, ip_a), None, "DEL of pod a");
    zt.stop(&n.node);
}

#[test]
fn a_completed_pod_is_withdrawn() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("done");
    let (_api_rt, api) = kube_api(&n.node);
    api.apply(namespace("demo", Some("ambient"))).expect("namespace");
    let uid = create_pod(&api, "demo", "job", json!({}));
    let kubeconfig = api.write_kubeconfig(n.dir.path()).expect("kubeconfig");
    let mesh = n.dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "").expect("local config");
    let flags = enrollment_flags(&n, &mesh, &kubeconfig);
    let _pins = PinGuard(mesh_tests::node::bpf_pin_dir(&n.node));
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("ztunnel with the Kubernetes watch");
    let job = n.sandbox("done", "demo", "job", &uid);
    let result = n.add(&job);
    let ip = address_of(&result);
    let running = json!({"phase": "Running", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
    api.set_status("v1", "Pod", Some("demo"), "job", running).expect("pod status");
    std::thread::sleep(Duration::from_millis(500));
    assert!(captured(&zt, ip).is_some(), "a running pod stays");

    // The job's containers are done: the pod is withdrawn (its address is free for another pod).
    let done = json!({"phase": "Succeeded", "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
    api.set_status("v1", "Pod", Some("demo"), "job", done).expect("pod status");
    zt.converge("the completed pod unenrolled", &|s| !s.pods.contains_key(&ip));
    assert_eq!(config_dump(&zt)["cni"]["announced"], json!([]));
    n.del(&job, Some(&result));
    zt.stop(&n.node);
}

/// dnsmasq on the outside host's port 53: `probe.test` is 192.0.2.44.
struct Dnsmasq(std::process::Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dig` in `pod` asking `server` (UDP, or TCP with `+tcp` in `extra`) for `name`: its status
/// and answers.
fn dig(pod: &Netns, server: &str, extra: &[&str], name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &pod.name, "dig", &format!("@{server}")])
        .args(extra)
        .args(["+tries=1", "+time=3", "+noall", "+comments", "+answer", name, "A"])
        .output()
        .unwrap_or_else(|e| panic!("dig (deploy/setup.sh installs bind9-dnsutils): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    let status = text.lines().find_map(|l| l.split("status: ").nth(1)).and_then(|s| s.split(',').next());
    let answers: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    format!("{} {}", status.unwrap_or("no-answer"), answers.join(","))
}

#[test]
fn a_pod_annotated_to_bypass_dns_capture_asks_its_own_server() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let n = Node::new("dnsb");
    let (_api_rt, api) = kube_api(&n.node);
    api.apply(namespace("demo", Some("ambient"))).expect("namespace");
    let uid_a = create_pod(&api, "demo", "a", json!({}));
    let uid_q = create_annotated_pod(
        &api,
        "demo",
        "quiet",
        json!({}),
        json!({"ambient.istio.io/bypass-dns-capture": "true"}),
    );
    // The outside host runs a DNS server; ztunnel's DNS proxy forwards to an address nobody
    // serves, so an answer from the proxy is a SERVFAIL and one from dnsmasq is an address.
    let child = Command::new("ip")
        .args(["netns", "exec", &n._outside.name, "dnsmasq", "--keep-in-foreground", "--no-resolv"])
        .args(["--no-hosts", "--listen-address", OUTSIDE, "--bind-interfaces", "--port", "53"])
        .args(["--user=root", "--address=/probe.test/192.0.2.44", "--pid-file=", "--log-facility=-"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("dnsmasq (deploy/setup.sh installs dnsmasq-base): {e}"));
    let _dnsmasq = Dnsmasq(child);

    let kubeconfig = api.write_kubeconfig(n.dir.path()).expect("kubeconfig");
    let mesh = n.dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "").expect("local config");
    let mut flags = enrollment_flags(&n, &mesh, &kubeconfig);
    flags.extend(["--dns-upstream", "10.9.0.99", "--dns-upstream-timeout-ms", "500"].map(String::from));
    let _pins = PinGuard(mesh_tests::node::bpf_pin_dir(&n.node));
    let zt = start_ztunnel(&n, &flags);
    zt.wait_ready("ztunnel with the Kubernetes watch");

    let a = n.sandbox("dnsb", "demo", "a", &uid_a);
    let result_a = n.add(&a);
    let ip_a = address_of(&result_a);
    let q = n.sandbox("dnsb", "demo", "quiet", &uid_q);
    let result_q = n.add(&q);
    let ip_q = address_of(&result_q);
    // Both are in the mesh; only the annotated one bypasses DNS capture.
    assert!(captured(&zt, ip_a).is_some() && captured(&zt, ip_q).is_some(), "both enrolled");
    let status = zt.app.enrollment.as_ref().expect("redirection").status();
    assert_eq!(status.dns_bypass.iter().copied().collect::<Vec<_>>(), vec![ip_q], "{status:?}");
    let dump = config_dump(&zt);
    let announced = dump["cni"]["announced"].as_array().expect("announced pods");
    let flag =
        |name: &str| announced.iter().find(|p| p["pod"]["name"] == name).map(|p| p["bypass_dns"].clone());
    assert_eq!(flag("quiet"), Some(json!(true)), "{dump}");
    assert_eq!(flag("a"), Some(Value::Null), "{dump}");
    std::fs::write(&mesh, mesh_with_pods(&[("a", ip_a), ("quiet", ip_q)])).expect("local config");
    let state = zt.app.state.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    while state.snapshot().workload_by_ip(ip_q).is_none() {
        assert!(Instant::now() < deadline, "the local config never delivered the pods");
        std::thread::sleep(Duration::from_millis(100));
    }

    let requests = |zt: &NodeZtunnel| metric(&zt.metrics(), "istio_dns_requests_total", &[]);
    // The pod in the mesh asks the outside server and gets ztunnel's answer, over UDP and TCP.
    let before = requests(&zt);
    assert_eq!(dig(&a.netns, OUTSIDE, &[], "probe.test"), "SERVFAIL ", "captured: answered by the proxy");
    assert_eq!(dig(&a.netns, OUTSIDE, &["+tcp"], "probe.test"), "SERVFAIL ", "captured over TCP");
    assert_eq!(requests(&zt), before + 2.0);
    // The annotated pod reaches the server it asked: over UDP untouched, over TCP through the
    // outbound proxy like any TCP (it is still in the mesh), never through the DNS proxy.
    assert_eq!(dig(&q.netns, OUTSIDE, &[], "probe.test"), "NOERROR 192.0.2.44", "UDP not captured");
    assert_eq!(dig(&q.netns, OUTSIDE, &["+tcp"], "probe.test"), "NOERROR 192.0.2.44", "TCP proxied");
    assert_eq!(requests(&zt), before + 2.0, "the DNS proxy saw nothing of the annotated pod");
    let text = zt.metrics();
    let proxied = ["reporter=\"source\"", "source_workload=\"quiet\""];
    assert_eq!(
        metric(&text, "istio_tcp_connections_opened_total", &proxied),
        1.0,
        "the annotated pod's TCP DNS went through the outbound proxy:\n{text}"
    );

    // Its DEL takes the bypass away with the enrollment.
    n.del(&q, Some(&result_q));
    let status = zt.app.enrollment.as_ref().expect("redirection").status();
    assert!(status.dns_bypass.is_empty(), "{status:?}");
    n.del(&a, Some(&result_a));
    zt.stop(&n.node);
}
