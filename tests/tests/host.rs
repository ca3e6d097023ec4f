//! Host mode end to end (root; CI runs as root, elsewhere this fails saying why): ztunnel as the
//! mesh proxy of a VM. A network namespace plays the VM, with a cgroup for its processes; its
//! ztunnel is a real process (`ztunnel-proc`) inside that cgroup too, so that leaving its own
//! connections alone is really tested, and so that it can be killed. A node beside it runs
//! our ztunnel (in-process) with a pod in the mesh.
//!
//! ```text
//!   vm (10.0.0.1, fd00:0:0:1::1) ---- link ---- node-b (10.0.0.2, fd00:0:0:1::2)
//!     cgroup T/ztunnel: ztunnel --host-address ...      xDS server, ztunnel
//!     cgroup T/app:     clients                          echo    10.2.1.2, fd00:b:1::2
//!     vm-app :8080, ssh-like :22                         client  10.2.2.2
//!                                                        plain server on the node :9000
//! ```
//!
//! The echo pod admits only the VM's identity and the client's: a connection reaching it
//! without the VM's certificate (uncaptured, in plaintext) is refused, so every answer the VM
//! gets proves its connection went through its ztunnel over HBONE.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::echo::{exchange, expect_refused, serve_lines, serve_pod};
use mesh_tests::netns::{Netns, link_nodes, link_nodes6, require_root, wire, wire6};
use mesh_tests::node::{NodeZtunnel, bpf_pin_dir, control_plane};
use mesh_tests::xds_server::XdsStore;

const VM: &str = "10.0.0.1";
const VM6: &str = "fd00:0:0:1::1";
const NODE_B: &str = "10.0.0.2";
const ECHO: &str = "10.2.1.2";
const ECHO6: &str = "fd00:b:1::2";
const CLIENT: &str = "10.2.2.2";
const XDS: &str = "10.0.0.2:15010";

const MESH: &str = r#"
workloads:
  # As a WorkloadEntry arrives from istiod: no node; the VM's ztunnel knows its own addresses.
  - {name: vm-1, namespace: vms, serviceAccount: vm-app, addresses: [10.0.0.1, "fd00:0:0:1::1"],
     workloadName: vm-app}
  - {name: echo, namespace: demo, serviceAccount: echo, addresses: [10.2.1.2, "fd00:b:1::2"],
     node: node-b, workloadName: echo, authorizationPolicies: [demo/vm-and-client],
     services: {demo/echo.demo.svc.cluster.local: [{servicePort: 80, targetPort: 8080}]}}
  - {name: client, namespace: demo, serviceAccount: client, addresses: [10.2.2.2], node: node-b,
     workloadName: client}
services:
  - {name: echo, namespace: demo, hostname: echo.demo.svc.cluster.local, addresses: [10.96.0.80],
     ports: [{servicePort: 80, targetPort: 8080}]}
  # A name only the VM's namespace resolves by its short form.
  - {name: inventory, namespace: vms, hostname: inventory.vms.svc.cluster.local, addresses: [10.96.0.90]}
policies:
  - name: vm-and-client
    namespace: demo
    scope: WORKLOAD_SELECTOR
    action: ALLOW
    rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/vms/sa/vm-app},
                                                {exact: cluster.local/ns/demo/sa/client}]}]}]}]
"#;

const DENY_VM: &str = r#"
  - name: deny-vm
    namespace: demo
    scope: NAMESPACE
    action: DENY
    rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/vms/sa/vm-app}]}]}]}]
"#;

/// Writes the VM's certificate files (Istio's names) in `dir`: a leaf for the VM's identity
/// valid for `lifetime`, signed by the mesh's CA in `ca_dir`, as a VM's provisioning would.
fn write_vm_certificates(ca_dir: &Path, dir: &Path, lifetime: Duration) {
    use common::identity::local_ca::{LocalCa, new_csr};
    let ca = LocalCa::load_or_create(ca_dir, "cluster.local").expect("the mesh's CA");
    let id = common::identity::Identity::new("cluster.local", "vms", "vm-app").expect("identity");
    let (csr, key) = new_csr(&id).expect("csr");
    let chain = ca.sign_csr(&csr, &id, lifetime).expect("sign");
    // Written aside and renamed in, as a provisioning agent replaces files.
    for (name, body) in [("cert-chain.pem", &chain[0]), ("key.pem", &key), ("root-cert.pem", &chain[1])] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).expect("write");
        std::fs::rename(&tmp, dir.join(name)).expect("rename");
    }
}

/// The VM's certificate's expiry and the failed loads of its files, from its metrics.
fn vm_certificate(vm: &Netns) -> (f64, f64) {
    let text = vm_metrics(vm);
    let expiry = metric(
        &text,
        "istio_certificate_expiry_timestamp_seconds",
        &["identity=\"spiffe://cluster.local/ns/vms/sa/vm-app\""],
    );
    let failed = metric(&text, "istio_certificate_fetches_total", &["source=\"files\"", "outcome=\"error\""]);
    (expiry, failed)
}

/// Waits up to 15 s for `pred` over the VM's certificate figures.
fn wait_certificate(vm: &Netns, what: &str, pred: impl Fn((f64, f64)) -> bool) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = vm_certificate(vm);
        if pred(now) {
            return now;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cgroup (v2) of the test's own, removed with its children (after its processes are gone).
struct Cgroup(PathBuf);

impl Cgroup {
    fn create(name: &str) -> Self {
        let root = ebpf::host::cgroup2_mount().unwrap_or_else(|e| panic!("cgroup v2 is needed: {e}"));
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("ztunnel")).expect("create the test cgroup");
        std::fs::create_dir_all(dir.join("app")).expect("create the app cgroup");
        std::fs::create_dir_all(dir.join("ztunnel-2")).expect("create the next ztunnel's cgroup");
        Self(dir)
    }

    fn child(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for child in ["ztunnel", "app", "ztunnel-2"] {
            let _ = std::fs::remove_dir(self.0.join(child));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// `cmd` run in `ns`'s network namespace (not `ip netns exec`, which remounts /sys and hides
/// the cgroup2 mount) as a process of `cgroup`, from its first instruction.
fn in_cgroup(ns: &Netns, cgroup: &Path, cmd: &[&str]) -> Command {
    let procs = cgroup.join("cgroup.procs");
    let script = format!("echo $$ > '{}' && exec \"$@\"", procs.display());
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", ns.name)).args(["--", "sh", "-c", &script, "sh"]).args(cmd);
    c
}

/// A client on the VM (a process of the app cgroup): connects to `dst` (`ip:port` or
/// `[ip6]:port`), sends `line`, half-closes, prints the peer address its socket reports, then
/// what came back. With `fastopen`, the data goes with the SYN (`MSG_FASTOPEN`, no connect()).
fn vm_client(
    vm: &Netns,
    app: &Path,
    dst: &str,
    line: &str,
    fastopen: bool,
) -> Result<(String, String), String> {
    let script = r#"
import socket, sys
host, port, line, tfo = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
try:
    if tfo:
        # Blocking, so that the SYN (with the data) goes and the handshake completes here.
        s.sendto((line + "\n").encode(), socket.MSG_FASTOPEN, (host, port))
        s.settimeout(10)
        # Asked while connected: once both sides have closed, there is no peer to report.
        peer = s.getpeername()
    else:
        s.settimeout(10)
        s.connect((host, port))
        peer = s.getpeername()
        s.sendall((line + "\n").encode())
    s.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
except OSError as e:
    print("error", e.errno, e)
    sys.exit(3)
print("%s:%d" % (peer[0], peer[1]))
print(data.decode().strip())
"#;
    let (host, port) = dst.rsplit_once(':').expect("ip:port");
    let host = host.trim_matches(['[', ']']);
    let tfo = if fastopen { "1" } else { "0" };
    let out = in_cgroup(vm, app, &["python3", "-c", script, host, port, line, tfo])
        .output()
        .unwrap_or_else(|e| panic!("run the VM's client (nsenter, python3): {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let mut lines = text.lines();
    let peer = lines.next().unwrap_or_default().to_string();
    // Servers bound to `::` see IPv4 clients as IPv4-mapped addresses.
    let reply = lines.next().unwrap_or_default().replace("::ffff:", "");
    Ok((peer, reply))
}

/// The capabilities the shipped systemd unit bounds ztunnel to (deploy/vm/ztunnel.service), as
/// `setpriv --bounding-set` takes them: `-all,+bpf,+net_admin,...`.
fn unit_capabilities() -> String {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vm/ztunnel.service");
    let unit = std::fs::read_to_string(&unit).expect("the systemd unit");
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds its capabilities");
    let mut set = "-all".to_string();
    for cap in caps.split_whitespace() {
        set += &format!(",+{}", cap.trim_start_matches("CAP_").to_ascii_lowercase());
    }
    set
}

/// `dig +short` run by a process of the VM's app cgroup, asking `server` (extra flags in `opts`,
/// e.g. `+tcp`): the answers, one per line (none for an error or no answer). dig itself refuses
/// an answer from another address than the one it asked.
fn vm_dig(vm: &Netns, app: &Path, server: &str, opts: &[&str], name: &str) -> String {
    let server = format!("@{server}");
    let mut cmd = vec!["dig", server.as_str(), "+tries=1", "+time=2", "+short"];
    cmd.extend_from_slice(opts);
    cmd.push(name);
    let out = in_cgroup(vm, app, &cmd).output().unwrap_or_else(|e| panic!("dig (bind9-dnsutils): {e}"));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The VM's ztunnel, a real process in `cgroup` holding only the capabilities of the shipped
/// systemd unit, its output in `log`.
fn vm_ztunnel(vm: &Netns, cgroup: &Path, flags: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).expect("log file");
    let caps = unit_capabilities();
    let prefix = ["setpriv", "--bounding-set", caps.as_str(), "--", env!("CARGO_BIN_EXE_ztunnel-proc")];
    in_cgroup(vm, cgroup, &[&prefix[..], flags].concat())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the VM's ztunnel")
}

/// GET `path` on `addr` inside `ns`: (status, body), or None when nothing answers.
fn get(ns: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: std::net::SocketAddr = addr.parse().expect("addr");
    let path = path.to_string();
    ns.enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), mesh_tests::http::get(addr, &path)).await
        })
        .ok()
        .and_then(Result::ok)
    })
}

fn wait_ready(vm: &Netns, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if get(vm, "127.0.0.1:15021", "/healthz/ready").is_some_and(|(s, _)| s == 200) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the VM's ztunnel exited ({status}):\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the VM's ztunnel never became ready:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vm_metrics(vm: &Netns) -> String {
    get(vm, "127.0.0.1:15020", "/metrics").map(|(_, body)| body).unwrap_or_default()
}

/// The sum of the samples of `name` carrying every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Kills the VM's ztunnel (if still running) and removes its capture when the test ends, pass
/// or fail.
struct VmGuard {
    child: Option<Child>,
    vm_name: String,
    pin_dir: PathBuf,
}

impl Drop for VmGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.vm_name, env!("CARGO_BIN_EXE_ztunnel-proc"), "uninstall"])
            .arg("--bpf-pin-dir")
            .arg(&self.pin_dir)
            .output();
    }
}

#[test]
fn a_vms_own_processes_are_in_the_mesh_through_its_ztunnel() {
    require_root("the host mode test");
    let pid = std::process::id();
    let vm = Netns::create(&format!("host{pid}-vm"));
    let node_b = Netns::create(&format!("host{pid}-nb"));
    let echo = Netns::create(&format!("host{pid}-echo"));
    let client = Netns::create(&format!("host{pid}-client"));
    link_nodes(&vm, &node_b);
    link_nodes6(&vm, &node_b);
    wire(&node_b, &echo, "v-echo", "10.2.1");
    wire6(&node_b, &echo, "v-echo", "fd00:b:1");
    wire(&node_b, &client, "v-client", "10.2.2");
    serve_pod(&echo, "::", "echo");
    // The VM's own application, its SSH stand-in, and a plain server on node B (not the mesh).
    serve_pod(&vm, "::", "vm-app");
    let ssh = vm.enter(|| std::net::TcpListener::bind(("0.0.0.0", 22))).expect("bind :22 on the VM");
    serve_lines(ssh, |name, peer, line| format!("{name} {peer} {line}"), "ssh".into());
    let plain = node_b.enter(|| std::net::TcpListener::bind(("0.0.0.0", 9000))).expect("bind :9000");
    serve_lines(plain, |name, peer, line| format!("{name} {peer} {line}"), "plain".into());

    let store = XdsStore::new();
    store.load_yaml(MESH).expect("mesh config");
    let _cp = control_plane(&node_b, XDS, store.clone());
    let ca_dir = tempfile::tempdir().expect("ca dir");
    let ca = ca_dir.path().to_str().expect("path").to_string();
    let zt_b = NodeZtunnel::start_node(&node_b, &format!("http://{XDS}"), &ca, "node-b", &[]);
    zt_b.converge("node B's pods enrolled", &|s| s.pods.len() >= 3);

    let cgroup = Cgroup::create(&format!("ambient-host-test-{pid}"));
    let (zt_group, app) = (cgroup.child("ztunnel"), cgroup.child("app"));
    let pin_dir = bpf_pin_dir(&vm);
    let pins = pin_dir.to_str().expect("path").to_string();
    let captured = cgroup.0.to_str().expect("path").to_string();
    // One interface named, one found by ztunnel (the interface carrying the address).
    let host_addresses = format!("{VM}@link-a,{VM6}");
    // The VM's certificate comes from files its provisioning placed, not from a CA.
    let cert_dir = tempfile::tempdir().expect("cert dir");
    write_vm_certificates(ca_dir.path(), cert_dir.path(), Duration::from_secs(3600));
    let certs = cert_dir.path().to_str().expect("path").to_string();
    let xds = format!("http://{XDS}");
    let flags = [
        "--xds-address",
        &xds,
        "--cert-dir",
        &certs,
        "--node-name",
        "vm-1",
        "--host-address",
        &host_addresses,
        // The whole test cgroup, ztunnel's own child included: it must leave itself alone.
        "--host-cgroup",
        &captured,
        "--inbound-bypass-port",
        "22",
        "--bpf-pin-dir",
        &pins,
        // The host's DNS goes to the DNS proxy; other names to a resolver nobody runs.
        "--dns-upstream",
        "10.0.0.9",
        "--dns-upstream-timeout-ms",
        "300",
    ];
    let log_dir = tempfile::tempdir().expect("log dir");
    let log = log_dir.path().join("vm-ztunnel.log");
    let mut guard = VmGuard { child: None, vm_name: vm.name.clone(), pin_dir: pin_dir.clone() };
    let mut child = vm_ztunnel(&vm, &zt_group, &flags, &log);
    wait_ready(&vm, &mut child, &log);
    guard.child = Some(child);
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();

    // A process on the VM reaches the pod over HBONE with the VM's identity (the pod admits no
    // plaintext), over IPv4 and IPv6; its socket reports the address it dialled as its peer.
    for dst in [format!("{ECHO}:8080"), format!("[{ECHO6}]:8080")] {
        let (peer, reply) = vm_client(&vm, &app, &dst, "hello", false)
            .unwrap_or_else(|e| panic!("the VM's client to {dst}: {e}\n{}", logs()));
        let source = if dst.starts_with('[') { VM6 } else { VM };
        assert_eq!(reply, format!("echo {source} hello"), "to {dst}\n{}", logs());
        let expected_peer = dst.replace(['[', ']'], "");
        assert_eq!(peer, expected_peer, "getpeername shows the original destination");
    }
    let text = zt_b.metrics();
    let from_vm =
        ["reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/vms/sa/vm-app\""];
    assert!(metric(&text, "istio_tcp_connections_opened_total", &from_vm) >= 2.0, "{text}");
    // Data sent with the SYN (TCP Fast Open, no connect()) is captured all the same.
    let (_, reply) = vm_client(&vm, &app, &format!("{ECHO}:8080"), "fast", true)
        .unwrap_or_else(|e| panic!("TFO client: {e}\n{}", logs()));
    assert_eq!(reply, format!("echo {VM} fast"));
    // A destination outside the mesh is passed through from the VM's address.
    let (_, reply) = vm_client(&vm, &app, &format!("{NODE_B}:9000"), "out", false).expect("passthrough");
    assert_eq!(reply, format!("plain {VM} out"));
    // Dialling ztunnel's outbound port directly (loopback is not captured) gets nothing: no
    // original destination was recorded for it.
    let direct = vm_client(&vm, &app, "127.0.0.1:15001", "sneak", false);
    assert!(direct.as_ref().map_or(true, |(_, r)| r.is_empty()), "{direct:?}");
    let text = vm_metrics(&vm);
    assert!(
        metric(
            &text,
            "istio_tcp_connections_failed_total",
            &["reporter=\"source\"", "response_flags=\"NR\""]
        ) >= 1.0,
        "{text}"
    );

    // The VM's DNS, whatever server it asks, over UDP, TCP and IPv6, is answered by its
    // ztunnel from the server's address: the mesh's names, the short form of its own
    // namespace's service, and a VIP that then carries traffic through the mesh.
    let before = metric(&vm_metrics(&vm), "istio_dns_requests_total", &[]);
    assert_eq!(vm_dig(&vm, &app, NODE_B, &[], "echo.demo.svc.cluster.local"), "10.96.0.80", "{}", logs());
    assert_eq!(vm_dig(&vm, &app, NODE_B, &["+tcp"], "echo.demo"), "10.96.0.80", "over TCP");
    assert_eq!(vm_dig(&vm, &app, "fd00:0:0:1::2", &[], "inventory"), "10.96.0.90", "the VM's namespace");
    assert_eq!(metric(&vm_metrics(&vm), "istio_dns_requests_total", &[]), before + 3.0);
    let (_, reply) = vm_client(&vm, &app, "10.96.0.80:80", "by name", false)
        .unwrap_or_else(|e| panic!("to the VIP: {e}\n{}", logs()));
    assert_eq!(reply, format!("echo {VM} by name"));

    // Certificates from files: replaced files are picked up without a restart; a broken file
    // keeps the last good certificate in force (a warning and a failed fetch counted).
    let (first, _) = wait_certificate(&vm, "the file certificate loaded", |(expiry, _)| expiry > 0.0);
    write_vm_certificates(ca_dir.path(), cert_dir.path(), Duration::from_secs(3 * 3600));
    let (second, _) = wait_certificate(&vm, "the replaced files loaded", |(expiry, _)| expiry > first);
    std::fs::write(cert_dir.path().join("key.pem"), "not a key").expect("break the key");
    let (held, _) = wait_certificate(&vm, "the broken file refused", |(_, failed)| failed >= 1.0);
    assert_eq!(held, second, "the last good certificate stays in force");
    // Log lines reach the file from ztunnel's log writer within 50 ms, not as they are logged.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs().contains("certificate fetch failed") {
        assert!(Instant::now() < deadline, "no warning of the failed fetch:\n{}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, reply) = vm_client(&vm, &app, &format!("[{ECHO6}]:8080"), "still", false).expect("still served");
    assert_eq!(reply, format!("echo {VM6} still"));
    write_vm_certificates(ca_dir.path(), cert_dir.path(), Duration::from_secs(3600));

    // A pod reaches the VM's application through the VM's ztunnel (HBONE to 15008 there).
    let reply = exchange(&client, &format!("{VM}:8080"), "hi vm")
        .unwrap_or_else(|e| panic!("client to the VM: {e}\n{}", logs()));
    // The application sees its own host's address (a local delivery cannot keep the client's);
    // the VM's ztunnel records the client it proved.
    assert_eq!(reply.replace("::ffff:", ""), format!("vm-app {VM} hi vm"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !logs().contains(&format!("src.addr={CLIENT}:")) {
        assert!(Instant::now() < deadline, "no access record of the client:\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = vm_metrics(&vm);
    let from_client =
        ["reporter=\"destination\"", "source_principal=\"spiffe://cluster.local/ns/demo/sa/client\""];
    assert!(metric(&text, "istio_tcp_connections_opened_total", &from_client) >= 1.0, "{text}");
    // The bypassed port is reached directly (the server sees node B itself), not through ztunnel.
    assert_eq!(exchange(&node_b, &format!("{VM}:22"), "ssh").expect("ssh"), format!("ssh {NODE_B} ssh"));

    // A DENY policy for the VM's identity is enforced at the pod's ztunnel.
    store.load_yaml(&format!("{MESH}{DENY_VM}")).expect("deny");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match vm_client(&vm, &app, &format!("{ECHO}:8080"), "denied?", false) {
            Ok((_, r)) if !r.is_empty() => {
                assert!(Instant::now() < deadline, "the DENY policy was never enforced: {r}");
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => break,
        }
    }
    store.load_yaml(MESH).expect("allow again");

    // ztunnel killed: the VM's processes cannot reach the mesh, or anything, in plaintext, and
    // nothing reaches the VM's application; the bypassed port still answers.
    let mut child = guard.child.take().expect("running");
    child.kill().expect("kill -9 the VM's ztunnel");
    child.wait().expect("reaped");
    for dst in [format!("{ECHO}:8080"), format!("[{ECHO6}]:8080"), format!("{NODE_B}:9000")] {
        let outcome = vm_client(&vm, &app, &dst, "after kill", false);
        assert!(outcome.is_err(), "the VM reached {dst} without its ztunnel: {outcome:?}");
    }
    let outcome = vm_client(&vm, &app, &format!("{ECHO}:8080"), "tfo after kill", true);
    assert!(outcome.is_err(), "TFO reached the pod without the VM's ztunnel: {outcome:?}");
    expect_refused(exchange(&node_b, &format!("{VM}:8080"), "in"), "plaintext to the VM without its ztunnel");
    // DNS goes where it was sent (nobody answers there): never to a proxy that is gone.
    let after = vm_dig(&vm, &app, NODE_B, &[], "echo.demo.svc.cluster.local");
    assert!(!after.contains("10.96.0.80") && after.contains("connection refused"), "{after}");
    assert_eq!(exchange(&node_b, &format!("{VM}:22"), "ssh").expect("ssh"), format!("ssh {NODE_B} ssh"));

    // A process squatting ztunnel's ports meanwhile (without ztunnel's mark, which takes
    // CAP_NET_ADMIN) is handed nothing: connects are refused, DNS goes where it was sent.
    let squat = vm.enter(|| std::net::TcpListener::bind("127.0.0.1:15001")).expect("squat 15001");
    squat.set_nonblocking(true).expect("nonblocking");
    let squat_dns = vm.enter(|| std::net::UdpSocket::bind("127.0.0.1:15053")).expect("squat 15053");
    squat_dns.set_nonblocking(true).expect("nonblocking");
    let outcome = vm_client(&vm, &app, &format!("{ECHO}:8080"), "to the squatter?", false);
    assert!(outcome.as_ref().is_err_and(|e| e.contains("Operation not permitted")), "{outcome:?}");
    assert!(squat.accept().is_err(), "the squatter was handed a connection");
    let asked = vm_dig(&vm, &app, NODE_B, &[], "echo.demo.svc.cluster.local");
    assert!(asked.contains("connection refused"), "{asked}");
    assert!(squat_dns.recv_from(&mut [0; 512]).is_err(), "the squatter was handed a query");
    drop((squat, squat_dns));

    // A new ztunnel, in a new cgroup as after a systemd restart, takes over the pinned capture
    // (leaving its own connections out of it before it makes any) and serves again.
    let mut child = vm_ztunnel(&vm, &cgroup.child("ztunnel-2"), &flags, &log);
    wait_ready(&vm, &mut child, &log);
    guard.child = Some(child);
    let (_, reply) = vm_client(&vm, &app, &format!("{ECHO}:8080"), "again", false)
        .unwrap_or_else(|e| panic!("after the restart: {e}\n{}", logs()));
    assert_eq!(reply, format!("echo {VM} again"));
    // What the programs counted, the squatter's refused connect included, is in the metrics
    // (kept in the kernel while no ztunnel ran).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = vm_metrics(&vm);
        let count =
            |o: &str| metric(&text, "istio_redirect_host_connects_total", &[&format!("outcome=\"{o}\"")]);
        if count("host_refused") >= 1.0 && count("host_captured") >= 5.0 && count("host_dns") >= 3.0 {
            break;
        }
        assert!(Instant::now() < deadline, "host capture counters not exported:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // `ztunnel uninstall` takes host capture away with the rest.
    let mut child = guard.child.take().expect("running");
    child.kill().expect("kill");
    child.wait().expect("reaped");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &vm.name,
            env!("CARGO_BIN_EXE_ztunnel-proc"),
            "uninstall",
            "--bpf-pin-dir",
            &pins,
        ])
        .output()
        .expect("uninstall");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("11 link(s)"), "{said}");
    assert!(!pin_dir.exists(), "pins left behind");
    let (_, reply) =
        vm_client(&vm, &app, &format!("{NODE_B}:9000"), "plain again", false).expect("uncaptured");
    assert_eq!(reply, format!("plain {VM} plain again"), "no capture left after uninstall");
    drop(guard);
    zt_b.stop(&node_b);
}
