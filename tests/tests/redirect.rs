//! eBPF redirection in network namespaces (root; CI runs as root, elsewhere these fail saying
//! why). A node namespace routes between pod namespaces (veth pairs) and an "outside" namespace
//! on its uplink. The node runs the capture program and three transparent listeners that answer
//! with the port they were reached on and the original destination they recovered.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use ebpf::{Redirector, Settings};
use mesh_tests::netns::{Netns, enable_forwarding, require_root, wire};
use mesh_tests::node::{NodeZtunnel, routing_state};

/// The tests share the kernel's program list and run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const POD_A: &str = "10.1.1.2";
const POD_B: &str = "10.1.2.2";
const OUTSIDE: &str = "10.9.0.2";
const SERVER_PORT: u16 = 8080;

struct Mesh {
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
    outside: Netns,
}

/// node <- veth-a -> pod A (10.1.1.2), node <- veth-b -> pod B (10.1.2.2),
/// node <- uplink -> outside (10.9.0.2), which serves on 8080.
fn mesh(tag: &str) -> Mesh {
    require_root("eBPF redirection tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("rd{pid}-{tag}-{role}"));
    let m = Mesh { node: ns("node"), pod_a: ns("a"), pod_b: ns("b"), outside: ns("out") };
    wire(&m.node, &m.pod_a, "veth-a", "10.1.1");
    wire(&m.node, &m.pod_b, "veth-b", "10.1.2");
    wire(&m.node, &m.outside, "uplink", "10.9.0");
    enable_forwarding(&m.node);
    serve(&m.outside, SERVER_PORT, "outside");
    m
}

/// A server in `ns` on 0.0.0.0:`port` answering `<tag> <peer ip>`.
fn serve(ns: &Netns, port: u16, tag: &'static str) {
    ns.enter(|| {
        let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind server");
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let _ = s.write_all(format!("{tag} {peer}").as_bytes());
            }
        });
    });
}

/// Transparent listeners on 15001/15006/15008 in the node, answering
/// `<port> <original destination> <peer>`. Runs until the runtime is dropped.
fn node_listeners(node: &Netns) -> tokio::runtime::Runtime {
    let rt = node.runtime();
    let ready = rt.spawn(async {
        for port in [15001u16, 15006, 15008] {
            let addr = SocketAddr::from(([0, 0, 0, 0], port));
            let listener =
                ztunnel::socket::transparent_listener(addr, Some(ebpf::redirector::DEFAULT_ZTUNNEL_MARK))
                    .expect("transparent listener");
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while let Ok((mut s, peer)) = listener.accept().await {
                    let orig = ztunnel::socket::original_dst(&s).expect("original destination");
                    let _ = s.write_all(format!("{port} {orig} {peer}").as_bytes()).await;
                }
            });
        }
    });
    rt.block_on(ready).expect("listeners up");
    rt
}

/// Connects from `ns` to `dst` and returns what the other end wrote, or the error.
fn talk(ns: &Netns, dst: &str) -> Result<String, String> {
    ns.enter(|| {
        let addr: SocketAddr = dst.parse().map_err(|e| format!("{dst}: {e}"))?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        Ok(reply)
    })
}

fn expect_landing(reply: Result<String, String>, port: u16, orig: &str, peer_ip: &str) {
    let reply = reply.unwrap_or_else(|e| panic!("expected to land on {port} for {orig}: {e}"));
    let parts: Vec<&str> = reply.split(' ').collect();
    assert_eq!(parts.len(), 3, "unexpected reply {reply:?}");
    assert_eq!(parts[0], port.to_string(), "listener reached: {reply:?}");
    assert_eq!(parts[1], orig, "original destination: {reply:?}");
    assert!(parts[2].starts_with(&format!("{peer_ip}:")), "peer: {reply:?}");
}

fn load(node: &Netns) -> Redirector {
    node.enter(|| Redirector::load(Settings::default()))
        .unwrap_or_else(|e| panic!("cannot load the eBPF program (kernel or privileges missing?): {e}"))
}

#[test]
fn enrolled_pod_traffic_lands_on_ztunnel_listeners() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("land");
    let _listeners = node_listeners(&m.node);
    let mut redirector = load(&m.node);
    m.node
        .enter(|| {
            redirector.enroll(POD_A.parse().expect("ip"), "veth-a")?;
            // Enrolling twice is a no-op.
            redirector.enroll(POD_A.parse().expect("ip"), "veth-a")?;
            redirector.attach_uplink("uplink")
        })
        .expect("enroll");
    assert_eq!(m.node.enter(|| ebpf::interface_for(POD_A.parse().expect("ip"))).expect("iface"), "veth-a");

    // Outbound from the enrolled pod, to anywhere: 15001 with the original destination.
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);
    expect_landing(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), 15001, "10.9.0.2:8080", POD_A);
    // Inbound to the enrolled pod from outside: 15006, or 15008 for port 15008.
    expect_landing(talk(&m.outside, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", OUTSIDE);
    expect_landing(talk(&m.outside, &format!("{POD_A}:15008")), 15008, "10.1.1.2:15008", OUTSIDE);
    // An unenrolled pod is not captured.
    assert_eq!(talk(&m.pod_b, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_B}")));

    let status = redirector.status();
    assert_eq!(status.pods.len(), 1);
    assert_eq!(status.interfaces["veth-a"].mode, "tcx", "kernel >= 6.6 attaches with TCX");
    assert!(status.interfaces["uplink"].uplink);
    assert!(status.stats["captured_outbound"] >= 2, "{:?}", status.stats);
    assert!(status.stats["captured_inbound"] >= 1, "{:?}", status.stats);
    assert!(status.stats["captured_hbone"] >= 1, "{:?}", status.stats);

    // Unenrolling restores direct connectivity.
    assert!(m.node.enter(|| redirector.unenroll(POD_A.parse().expect("ip"))).expect("unenroll"));
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
    assert!(!redirector.status().interfaces.contains_key("veth-a"), "detached once no pod is left");

    assert_eq!(routing_state(&m.node), (1, 1));
    m.node.enter(|| redirector.shutdown()).expect("shutdown");
    assert_eq!(routing_state(&m.node), (0, 0), "rule and route removed on shutdown");
}

#[test]
fn without_a_listener_an_enrolled_pod_fails_closed() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("closed");
    let mut redirector = load(&m.node);
    m.node.enter(|| redirector.enroll(POD_A.parse().expect("ip"), "veth-a")).expect("enroll");
    // No ztunnel listening: the SYN is dropped rather than let through in plaintext.
    let outcome = talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}"));
    assert!(outcome.is_err(), "an enrolled pod must not bypass ztunnel: {outcome:?}");
    assert!(redirector.status().stats["dropped_no_listener"] >= 1);
    // The unenrolled pod still reaches the server.
    assert_eq!(talk(&m.pod_b, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_B}")));
    m.node.enter(|| redirector.shutdown()).expect("shutdown");
}

#[test]
fn ztunnel_connections_keep_the_client_source_and_are_not_recaptured() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("src");
    let _listeners = node_listeners(&m.node);
    serve(&m.pod_a, 9090, "pod-a");
    let mut redirector = load(&m.node);
    m.node.enter(|| redirector.enroll(POD_A.parse().expect("ip"), "veth-a")).expect("enroll");

    // ztunnel delivers to the enrolled pod as the original client (a non-local address) with
    // its own mark: the pod sees the client's address, and the pod's replies, addressed to that
    // client, follow ztunnel's socket instead of being routed away or captured as new flows.
    let rt = m.node.runtime();
    let reply = rt
        .block_on(rt.spawn(async {
            use tokio::io::AsyncReadExt;
            let dst: SocketAddr = format!("{POD_A}:9090").parse().expect("addr");
            let client: SocketAddr = format!("{OUTSIDE}:0").parse().expect("addr");
            let socket =
                ztunnel::socket::outbound_socket(dst, ebpf::redirector::DEFAULT_ZTUNNEL_MARK, Some(client))
                    .expect("marked transparent socket");
            let mut stream = tokio::time::timeout(Duration::from_secs(5), socket.connect(dst))
                .await
                .map_err(|_| "connect timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let mut reply = String::new();
            stream.read_to_string(&mut reply).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(reply)
        }))
        .expect("join");
    assert_eq!(reply, Ok(format!("pod-a {OUTSIDE}")));
    let stats = redirector.status().stats;
    assert_eq!(stats["captured_outbound"], 0, "the pod's replies are not new flows: {stats:?}");
    assert!(stats["followed_socket"] >= 1, "{stats:?}");
    m.node.enter(|| redirector.shutdown()).expect("shutdown");
    drop(rt);
}

/// Programs named like ours that the kernel holds.
fn loaded_capture_programs() -> usize {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| p.name_as_str() == Some(ebpf::redirector::PROGRAM_NAME))
        .count()
}

fn wait_for_programs(n: usize) {
    for _ in 0..50 {
        if loaded_capture_programs() == n {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("expected {n} loaded capture program(s), kernel holds {}", loaded_capture_programs());
}

/// Child mode of `restart_after_a_crash_leaves_nothing_stale`: load, enroll, report, wait to
/// be killed.
#[test]
#[ignore = "helper run by restart_after_a_crash_leaves_nothing_stale in a child process"]
fn crash_child() {
    let Ok(iface) = std::env::var("REDIRECT_CHILD_IFACE") else { return };
    let mut redirector = Redirector::load(Settings::default()).expect("child load");
    redirector.enroll(POD_A.parse().expect("ip"), &iface).expect("child enroll");
    println!("READY");
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn restart_after_a_crash_leaves_nothing_stale() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("crash");
    let _listeners = node_listeners(&m.node);
    wait_for_programs(0);

    // A loader that dies without cleaning up.
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &m.node.name])
        .arg(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("REDIRECT_CHILD_IFACE", "veth-a")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child loader");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("READY") {
        let n = out.read(&mut buf).expect("child output");
        assert!(n > 0, "child loader exited before it was ready: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9");
    child.wait().expect("reap");

    // TCX links die with the process; the routing rule is what a crash leaves behind.
    wait_for_programs(0);
    assert_eq!(routing_state(&m.node).0, 1, "the crashed loader's rule is still there");

    // A new loader replaces it instead of adding a second one, and works.
    let mut redirector = load(&m.node);
    assert_eq!(routing_state(&m.node), (1, 1));
    wait_for_programs(1);
    m.node.enter(|| redirector.enroll(POD_A.parse().expect("ip"), "veth-a")).expect("enroll");
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);

    m.node.enter(|| redirector.shutdown()).expect("shutdown");
    assert_eq!(routing_state(&m.node), (0, 0));
    wait_for_programs(0);
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
}

const ZTUNNEL_MESH: &str = r#"
workloads:
  - name: a
    namespace: demo
    serviceAccount: a
    addresses: [10.1.1.2]
    node: node-a
  - name: b
    namespace: demo
    serviceAccount: b
    addresses: [10.1.2.2]
    node: node-b
"#;

/// ztunnel in `node` with `--redirect`, the config in `path` and `extra` flags.
fn start_ztunnel(node: &Netns, path: &std::path::Path, node_name: &str, extra: &[&str]) -> NodeZtunnel {
    let mut flags = vec!["--local-config", path.to_str().expect("path"), "--node-name", node_name];
    flags.extend(["--redirect", "--no-proxy"]);
    flags.extend_from_slice(extra);
    NodeZtunnel::start(node, &flags)
}

#[test]
fn ztunnel_enrolls_the_workloads_scheduled_on_its_node() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("zt");
    let _listeners = node_listeners(&m.node);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, ZTUNNEL_MESH).expect("config");
    let zt = start_ztunnel(&m.node, &path, "node-a", &["--uplink", "*"]);

    // Only the workload scheduled on node-a is enrolled, on the interface the node routes it by.
    zt.converge("pod A enrolled", &|s| s.pods.len() == 1);
    let status = zt.app.enrollment.as_ref().expect("redirection on").status();
    assert_eq!(status.pods.get(&POD_A.parse().expect("ip")).map(String::as_str), Some("veth-a"));
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);
    expect_landing(talk(&m.outside, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", OUTSIDE);
    assert_eq!(talk(&m.pod_b, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_B}")));
    // With every interface watched, plaintext from an unenrolled pod on the same node to the
    // enrolled pod is captured for inbound policy too.
    expect_landing(talk(&m.pod_b, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", POD_B);
    assert!(status.interfaces["veth-b"].uplink, "{status:?}");

    // The workload leaves: it is unenrolled and talks directly again.
    std::fs::write(&path, ZTUNNEL_MESH.replace("node: node-a", "node: node-c")).expect("rewrite");
    zt.converge("pod A unenrolled", &|s| s.pods.is_empty());
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
    zt.stop(&m.node);
}

#[test]
fn explicit_enrollment_serves_hosts_without_kubernetes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("vm");
    let _listeners = node_listeners(&m.node);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, "workloads: []\n").expect("config");
    let zt = start_ztunnel(&m.node, &path, "vm-host", &["--enroll", "10.1.2.2@veth-b"]);
    zt.converge("explicit pod enrolled", &|s| s.pods.len() == 1);
    expect_landing(talk(&m.pod_b, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_B);
    // Pod A is not listed and not captured.
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
    zt.stop(&m.node);
}
