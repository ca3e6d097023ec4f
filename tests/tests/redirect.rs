//! eBPF redirection in network namespaces (root; CI runs as root, elsewhere these fail saying
//! why). A node namespace routes between pod namespaces (veth pairs, IPv4 and IPv6) and an
//! "outside" namespace on its uplink. The node runs the capture program and three transparent
//! listeners (both families) that answer with the port they were reached on and the original
//! destination they recovered.
//!
//! Besides landing on the right listener, these tests try to get around capture: IP options,
//! IPv6 extension headers, fragments, a killed loader, a stopped ztunnel. Each of those reached
//! the server in plaintext before capture was hardened and pinned.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use ebpf::{Redirector, Settings};
use mesh_tests::netns::{Netns, enable_forwarding, require_root, wire, wire6};
use mesh_tests::node::{NodeZtunnel, redirect_settings, routing_state, uninstall};

/// The tests share the kernel's program list and run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const POD_A: &str = "10.1.1.2";
const POD_B: &str = "10.1.2.2";
const OUTSIDE: &str = "10.9.0.2";
const POD_A6: &str = "fd00:1:1::2";
const OUTSIDE6: &str = "fd00:9::2";
const SERVER_PORT: u16 = 8080;
/// The node's address on pod A's link.
const NODE_A_SIDE: &str = "10.1.1.1";

struct Mesh {
    node: Netns,
    pod_a: Netns,
    pod_b: Netns,
    outside: Netns,
}

/// node <- veth-a -> pod A (10.1.1.2, fd00:1:1::2), node <- veth-b -> pod B (10.1.2.2,
/// fd00:1:2::2), node <- uplink -> outside (10.9.0.2, fd00:9::2), which serves on 8080.
fn mesh(tag: &str) -> Mesh {
    require_root("eBPF redirection tests");
    let pid = std::process::id();
    let ns = |role: &str| Netns::create(&format!("rd{pid}-{tag}-{role}"));
    let m = Mesh { node: ns("node"), pod_a: ns("a"), pod_b: ns("b"), outside: ns("out") };
    wire(&m.node, &m.pod_a, "veth-a", "10.1.1");
    wire(&m.node, &m.pod_b, "veth-b", "10.1.2");
    wire(&m.node, &m.outside, "uplink", "10.9.0");
    wire6(&m.node, &m.pod_a, "veth-a", "fd00:1:1");
    wire6(&m.node, &m.pod_b, "veth-b", "fd00:1:2");
    wire6(&m.node, &m.outside, "uplink", "fd00:9");
    enable_forwarding(&m.node);
    serve(&m.outside, SERVER_PORT, "outside");
    m
}

/// A server in `ns` on [::]:`port` (both families) answering `<tag> <peer ip>`.
fn serve(ns: &Netns, port: u16, tag: &'static str) {
    ns.enter(|| {
        let listener = std::net::TcpListener::bind(("::", port)).expect("bind server");
        std::thread::spawn(move || {
            for mut s in listener.incoming().flatten() {
                let peer = s.peer_addr().map(|p| p.ip().to_canonical().to_string()).unwrap_or_default();
                let _ = s.write_all(format!("{tag} {peer}").as_bytes());
            }
        });
    });
}

/// Transparent listeners on 15001/15006/15008 in the node, IPv4 and IPv6, answering
/// `<port> <original destination> <peer>` and closing first. Runs until the runtime is dropped.
fn node_listeners(node: &Netns) -> tokio::runtime::Runtime {
    node_listeners_with_sockets(node).0
}

/// [`node_listeners`], and their sockets by role for [`Redirector::serve_listeners`].
fn node_listeners_with_sockets(node: &Netns) -> (tokio::runtime::Runtime, Vec<ebpf::Listener>) {
    let rt = node.runtime();
    let ready = rt.spawn(async {
        use std::os::fd::AsRawFd;
        let any: [std::net::IpAddr; 2] = [[0u8; 4].into(), [0u16; 8].into()];
        let mut sockets = Vec::new();
        for (port, ip) in [15001u16, 15006, 15008].into_iter().flat_map(|p| any.map(|ip| (p, ip))) {
            let addr = SocketAddr::new(ip, port);
            let listener =
                ztunnel::socket::transparent_listener(addr, Some(ebpf::redirector::DEFAULT_ZTUNNEL_MARK))
                    .expect("transparent listener");
            let role = match port {
                15001 => ebpf::ListenerRole::Outbound,
                15006 => ebpf::ListenerRole::Inbound,
                _ => ebpf::ListenerRole::Hbone,
            };
            sockets.push(ebpf::Listener { role, ipv6: ip.is_ipv6(), fd: listener.as_raw_fd() });
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                while let Ok((mut s, peer)) = listener.accept().await {
                    let orig = ztunnel::socket::original_dst(&s).expect("original destination");
                    let _ = s.write_all(format!("{port} {orig} {peer}").as_bytes()).await;
                }
            });
        }
        sockets
    });
    let sockets = rt.block_on(ready).expect("listeners up");
    (rt, sockets)
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
    let peer: SocketAddr = parts[2].parse().unwrap_or_else(|e| panic!("peer {reply:?}: {e}"));
    assert_eq!(peer.ip().to_string(), peer_ip, "peer: {reply:?}");
}

fn load(node: &Netns) -> Redirector {
    let settings = redirect_settings(node);
    node.enter(|| Redirector::load(settings))
        .unwrap_or_else(|e| panic!("cannot load the eBPF program (kernel or privileges missing?): {e}"))
}

/// Enrolls pod A by both of its addresses and attaches the uplink.
fn enroll_pod_a(m: &Mesh, redirector: &mut Redirector) {
    m.node
        .enter(|| {
            redirector.enroll(POD_A.parse().expect("ip"), "veth-a")?;
            redirector.enroll(POD_A6.parse().expect("ip"), "veth-a")?;
            redirector.attach_uplink("uplink")
        })
        .expect("enroll");
}

/// Removes what `r` pinned and checks nothing is left: no pins, rules, routes, and no program
/// attached to any interface of the node.
fn remove(node: &Netns, r: Redirector) {
    let settings = r.status().settings.expect("settings");
    drop(r);
    let removed = uninstall(node, &settings);
    assert!(removed.programs == 1 && removed.maps == 5, "uninstall removed {removed}");
    assert_eq!(attached(node), Vec::<u32>::new(), "programs still attached after uninstall");
}

/// Program ids attached (TCX ingress) on every interface of `node`, sorted, with repeats.
fn attached(node: &Netns) -> Vec<u32> {
    node.enter(|| {
        let mut ids = Vec::new();
        for iface in ebpf::routing::interfaces().expect("interfaces") {
            ids.extend(ebpf::redirector::attached_programs(&iface).expect("query tcx"));
        }
        ids.sort();
        ids
    })
}

/// A client written in Python (an independent socket implementation), run in `ns`: connects to
/// `host`:`port` after setting the socket option `opt` (`ipopt`: IPv4 options, `dstopt`: an
/// IPv6 destination-options header, `none`), and prints what the server wrote or `ERR <why>`.
fn talk_py(ns: &Netns, host: &str, port: u16, opt: &str) -> Result<String, String> {
    const CLIENT: &str = r#"
import socket, sys
host, port, opt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
if opt == "ipopt":
    # Four bytes of IP options (NOP NOP NOP EOL): the IPv4 header grows to 24 bytes.
    s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, b"\x01\x01\x01\x00")
elif opt == "dstopt":
    # A destination-options extension header with one PadN option.
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_DSTOPTS, bytes([0, 0, 1, 4, 0, 0, 0, 0]))
s.settimeout(3)
try:
    s.connect((host, port))
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    print(data.decode())
except Exception as e:
    print("ERR", e)
"#;
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", CLIENT, host, &port.to_string(), opt])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        panic!("python client failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    match text.strip_prefix("ERR ") {
        Some(e) => Err(e.to_string()),
        None => Ok(text),
    }
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
    // Even to ztunnel's own ports on another host: only ztunnel's marked traffic is exempt.
    for port in [15001, 15006, 15008] {
        expect_landing(
            talk(&m.pod_a, &format!("{OUTSIDE}:{port}")),
            15001,
            &format!("{OUTSIDE}:{port}"),
            POD_A,
        );
    }
    // Inbound to the enrolled pod from outside: 15006, or 15008 for port 15008.
    expect_landing(talk(&m.outside, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", OUTSIDE);
    expect_landing(talk(&m.outside, &format!("{POD_A}:15008")), 15008, "10.1.1.2:15008", OUTSIDE);
    // An unenrolled pod is not captured.
    assert_eq!(talk(&m.pod_b, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_B}")));

    let status = redirector.status();
    assert_eq!(status.pods.len(), 1);
    assert_eq!(status.interfaces["veth-a"].mode, "tcx", "kernel >= 6.6 attaches with TCX");
    assert!(status.interfaces["uplink"].uplink);
    assert!(status.stats["captured_outbound"] >= 5, "{:?}", status.stats);
    assert!(status.stats["captured_inbound"] >= 1, "{:?}", status.stats);
    assert!(status.stats["captured_hbone"] >= 1, "{:?}", status.stats);

    // Unenrolling restores direct connectivity.
    assert!(m.node.enter(|| redirector.unenroll(POD_A.parse().expect("ip"))).expect("unenroll"));
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
    assert!(!redirector.status().interfaces.contains_key("veth-a"), "detached once no pod is left");

    assert_eq!(routing_state(&m.node), (2, 2), "one rule and one route per family");
    remove(&m.node, redirector);
}

/// A Python client in `ns` that connects `count` times from the same source address and port
/// (`src`:47123) to `dst`:`port`, each with `timeout` seconds, and reads each reply to the end
/// (the server closes first, leaving the server side's socket in TIME_WAIT on that 4-tuple).
/// One result per connection: what the server wrote, or why it failed.
fn same_port_connections(
    ns: &Netns,
    src: &str,
    dst: &str,
    port: u16,
    count: usize,
    timeout: u64,
) -> Vec<Result<String, String>> {
    const CLIENT: &str = r#"
import socket, sys, time
src, dst, port, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
for i in range(count):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.settimeout(timeout)
    try:
        s.bind((src, 47123))
        s.connect((dst, port))
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        print(data.decode(), flush=True)
    except Exception as e:
        print("ERR", e, flush=True)
    s.close()
    time.sleep(0.05)
"#;
    let (port, count, timeout) = (port.to_string(), count.to_string(), timeout.to_string());
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", CLIENT, src, dst, &port, &count, &timeout])
        .output()
        .expect("python3");
    assert!(out.status.success(), "same-port client failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| match line.strip_prefix("ERR ") {
            Some(e) => Err(e.to_string()),
            None => Ok(line.to_string()),
        })
        .collect()
}

/// A TCP counter of the kernel in `ns` (`TcpExt` of /proc/net/netstat, or `Tcp` of snmp).
fn tcp_counter(ns: &Netns, group: &str, name: &str) -> u64 {
    let file = if group == "TcpExt" { "/proc/net/netstat" } else { "/proc/net/snmp" };
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "cat", file])
        .output()
        .expect("cat");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(&format!("{group}:"))).collect();
    let (names, values) = (lines[0].split_whitespace(), lines[1].split_whitespace());
    names
        .zip(values)
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no {group} {name} in {file}"))
}

/// Sockets in TIME_WAIT in `ns`.
fn time_wait_sockets(ns: &Netns) -> usize {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-Htan", "state", "time-wait"])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn a_syn_reusing_the_tuple_of_a_time_wait_socket_opens_a_new_connection_at_once() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("tw");
    let (_listeners, sockets) = node_listeners_with_sockets(&m.node);
    let mut redirector = load(&m.node);
    enroll_pod_a(&m, &mut redirector);
    let retries =
        |ns: &Netns| (tcp_counter(ns, "TcpExt", "TCPSynRetrans"), tcp_counter(ns, "Tcp", "OutRsts"));
    let cases = [(POD_A, OUTSIDE, "10.9.0.2:8080"), (POD_A6, OUTSIDE6, "[fd00:9::2]:8080")];

    // Without the listener lookups (the old program): each reuse of the port meets the node's
    // TIME_WAIT socket, which answers the SYN with a bare ACK; the client resets and retries.
    for (src, dst, orig) in cases {
        let before = retries(&m.pod_a);
        let replies = same_port_connections(&m.pod_a, src, dst, SERVER_PORT, 3, 10);
        for r in replies {
            expect_landing(r, 15001, orig, src);
        }
        let after = retries(&m.pod_a);
        assert!(
            after.0 > before.0 && after.1 > before.1,
            "expected the TIME_WAIT stall (SYN retries and resets) without listener lookups, for {src}: {before:?} -> {after:?}"
        );
    }

    // With them: the same reuse opens a new connection on the first SYN.
    m.node.enter(|| redirector.serve_listeners(&sockets)).expect("serve listeners");
    assert_eq!(redirector.status().listeners.len(), 6, "{:?}", redirector.status().listeners);
    for (src, dst, orig) in cases {
        let before = retries(&m.pod_a);
        let replies = same_port_connections(&m.pod_a, src, dst, SERVER_PORT, 5, 10);
        assert_eq!(replies.len(), 5);
        for r in replies {
            expect_landing(r, 15001, orig, src);
        }
        assert!(time_wait_sockets(&m.node) >= 1, "the node's side of the connections should be in TIME_WAIT");
        assert_eq!(
            retries(&m.pod_a),
            before,
            "a SYN meeting a TIME_WAIT socket was not taken as a new connection for {src} (SYN retries, resets)"
        );
    }
    // Inbound: from outside to the enrolled pod, through the inbound listener, the same way.
    let before = retries(&m.outside);
    for r in same_port_connections(&m.outside, OUTSIDE, POD_A, SERVER_PORT, 4, 10) {
        expect_landing(r, 15006, "10.1.1.2:8080", OUTSIDE);
    }
    assert_eq!(retries(&m.outside), before, "inbound reuse of a TIME_WAIT tuple stalled");
    remove(&m.node, redirector);
}

/// One connection from `src`:47123 to `dst`:`port` in `ns` (3 s timeout).
fn same_port_once(ns: &Netns, src: &str, dst: &str, port: u16) -> Result<String, String> {
    same_port_connections(ns, src, dst, port, 1, 3).pop().unwrap_or_else(|| Err("no result".into()))
}

/// With ztunnel gone, a SYN meeting the TIME_WAIT socket its last connection left must not be
/// taken by a host service listening on the original port: the kernel looks a listener up for
/// such a SYN on that port, and before this check the pod reached the host's service in
/// plaintext (the tc program handed the SYN to the TIME_WAIT socket).
#[test]
fn a_syn_meeting_a_time_wait_socket_without_ztunnel_does_not_reach_a_host_service() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("twdown");
    // A service of the node itself (think sshd or kubelet) on every address, on the port the
    // pod connects to.
    serve(&m.node, SERVER_PORT, "host");
    let (listeners, sockets) = node_listeners_with_sockets(&m.node);
    let mut redirector = load(&m.node);
    enroll_pod_a(&m, &mut redirector);
    m.node.enter(|| redirector.serve_listeners(&sockets)).expect("serve listeners");
    // To the node's own address (its side of the pod's link): a host service could answer there.
    expect_landing(same_port_once(&m.pod_a, POD_A, NODE_A_SIDE, SERVER_PORT), 15001, "10.1.1.1:8080", POD_A);
    assert!(time_wait_sockets(&m.node) >= 1, "the node's side should be in TIME_WAIT");
    // ztunnel dies: its listeners and its listener lookups go, the pinned capture stays.
    let settings = redirector.status().settings.expect("settings");
    drop(listeners);
    drop(redirector);
    let reply = same_port_once(&m.pod_a, POD_A, NODE_A_SIDE, SERVER_PORT);
    assert!(reply.is_err(), "with no ztunnel the pod reached {reply:?} in plaintext");
    let adopted = load(&m.node);
    assert!(adopted.status().stats["dropped_no_listener"] >= 1, "{:?}", adopted.status().stats);
    drop(adopted);
    let removed = uninstall(&m.node, &settings);
    assert!(removed.programs == 1 && removed.maps == 5, "uninstall removed {removed}");
}

#[test]
fn ip_options_and_ipv6_extension_headers_do_not_bypass_capture() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("opts");
    let _listeners = node_listeners(&m.node);
    let mut redirector = load(&m.node);
    enroll_pod_a(&m, &mut redirector);

    // A plain client as the baseline, then the same connection with IP options (unprivileged):
    // both land on ztunnel, from the enrolled pod and toward it.
    expect_landing(talk_py(&m.pod_a, OUTSIDE, SERVER_PORT, "none"), 15001, "10.9.0.2:8080", POD_A);
    expect_landing(talk_py(&m.pod_a, OUTSIDE, SERVER_PORT, "ipopt"), 15001, "10.9.0.2:8080", POD_A);
    expect_landing(talk_py(&m.outside, POD_A, SERVER_PORT, "ipopt"), 15006, "10.1.1.2:8080", OUTSIDE);
    // IPv6 with a destination-options extension header, both ways.
    expect_landing(talk_py(&m.pod_a, OUTSIDE6, SERVER_PORT, "dstopt"), 15001, "[fd00:9::2]:8080", POD_A6);
    expect_landing(talk_py(&m.outside, POD_A6, SERVER_PORT, "dstopt"), 15006, "[fd00:1:1::2]:8080", OUTSIDE6);
    // The unenrolled pod still talks directly, options or not.
    assert_eq!(talk_py(&m.pod_b, OUTSIDE, SERVER_PORT, "ipopt"), Ok(format!("outside {POD_B}")));
    remove(&m.node, redirector);
}

#[test]
fn ipv6_and_dual_stack_pods_are_captured_like_ipv4() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("v6");
    let _listeners = node_listeners(&m.node);
    let mut redirector = load(&m.node);
    enroll_pod_a(&m, &mut redirector);
    expect_landing(talk(&m.pod_a, &format!("[{OUTSIDE6}]:{SERVER_PORT}")), 15001, "[fd00:9::2]:8080", POD_A6);
    expect_landing(talk(&m.pod_a, "[2001:db8::10]:80"), 15001, "[2001:db8::10]:80", POD_A6);
    expect_landing(talk(&m.outside, &format!("[{POD_A6}]:8080")), 15006, "[fd00:1:1::2]:8080", OUTSIDE6);
    expect_landing(talk(&m.outside, &format!("[{POD_A6}]:15008")), 15008, "[fd00:1:1::2]:15008", OUTSIDE6);
    // The same pod's IPv4 is captured too.
    expect_landing(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), 15001, "10.9.0.2:8080", POD_A);
    // The unenrolled pod's IPv6 is not.
    assert_eq!(talk(&m.pod_b, &format!("[{OUTSIDE6}]:{SERVER_PORT}")), Ok("outside fd00:1:2::2".to_string()));
    assert_eq!(redirector.status().interfaces["veth-a"].pods.len(), 2);
    remove(&m.node, redirector);
}

#[test]
fn fragments_and_unknown_ipv6_headers_of_enrolled_pods_are_dropped() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("frag");
    let mut redirector = load(&m.node);
    m.node
        .enter(|| {
            redirector.enroll(POD_A.parse().expect("ip"), "veth-a")?;
            redirector.enroll(POD_A6.parse().expect("ip"), "veth-a")
        })
        .expect("enroll");
    // Raw packets from the enrolled pod (root in the pod can craft them): a first IPv4 fragment
    // carrying a TCP SYN, an IPv6 packet with a fragment header, and one whose next header is
    // the mobility header (135), which we do not walk.
    const RAW: &str = r#"
import socket, struct, sys
src4, dst4, src6, dst6 = sys.argv[1:5]
tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 7, 0x2000, 64, 6, 0,
                 socket.inet_aton(src4), socket.inet_aton(dst4))
s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s4.sendto(ip + tcp, (dst4, 0))
s6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 44)
s6.sendto(struct.pack("!BBHI", 6, 0, 1, 9) + tcp, (dst6, 0))
s7 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, 135)
s7.sendto(bytes([6, 0, 0, 0, 0, 0, 0, 0]) + tcp, (dst6, 0))
print("sent")
"#;
    let before = redirector.status().stats;
    m.pod_a.exec(&["python3", "-c", RAW, POD_A, OUTSIDE, POD_A6, OUTSIDE6]);
    let mut after = redirector.status().stats;
    for _ in 0..20 {
        if after["dropped_fragment"] >= before["dropped_fragment"] + 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        after = redirector.status().stats;
    }
    assert!(after["dropped_fragment"] >= before["dropped_fragment"] + 2, "{before:?} -> {after:?}");
    assert!(after["dropped_unparseable"] > before["dropped_unparseable"], "{before:?} -> {after:?}");
    remove(&m.node, redirector);
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
    remove(&m.node, redirector);
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
    remove(&m.node, redirector);
    drop(rt);
}

/// Child mode of `capture_survives_a_killed_loader_and_is_adopted`: load, enroll, report, wait
/// to be killed.
#[test]
#[ignore = "helper run by capture_survives_a_killed_loader_and_is_adopted in a child process"]
fn crash_child() {
    let Ok(pin_dir) = std::env::var("REDIRECT_CHILD_PIN_DIR") else { return };
    let settings = Settings { pin_dir: pin_dir.into(), ..Default::default() };
    let mut redirector = Redirector::load(settings).expect("child load");
    redirector.enroll(POD_A.parse().expect("ip"), "veth-a").expect("child enroll");
    redirector.attach_uplink("uplink").expect("child uplink");
    println!("READY {}", redirector.status().program_id);
    std::io::stdout().flush().expect("flush");
    std::thread::sleep(Duration::from_secs(60));
}

/// True when the kernel still holds a program with this id.
fn program_loaded(id: u32) -> bool {
    aya::programs::loaded_programs().filter_map(Result::ok).any(|p| p.id() == id)
}

#[test]
fn capture_survives_a_killed_loader_and_is_adopted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("crash");
    let settings = redirect_settings(&m.node);

    // A loader that dies without cleaning up, as ztunnel does on kill -9.
    let exe = std::env::current_exe().expect("test binary");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &m.node.name])
        .arg(exe)
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("REDIRECT_CHILD_PIN_DIR", &settings.pin_dir)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn child loader");
    let mut out = child.stdout.take().expect("stdout");
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("READY") || !seen[seen.find("READY").unwrap_or(0)..].contains('\n') {
        let n = out.read(&mut buf).expect("child output");
        assert!(n > 0, "child loader exited before it was ready: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let old_id: u32 = seen
        .split("READY ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("child did not report its program id: {seen}"));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9");
    child.wait().expect("reap");

    // The capture outlived its loader: the program is still attached to both interfaces, and
    // with no listener the enrolled pod reaches nothing, and nothing reaches it.
    assert_eq!(attached(&m.node), vec![old_id, old_id], "pinned links survive the loader");
    assert!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")).is_err(), "pod A got out in plaintext");
    assert!(talk(&m.outside, &format!("{POD_A}:{SERVER_PORT}")).is_err(), "pod A was reached in plaintext");
    assert!(talk(&m.outside, &format!("{POD_A}:15008")).is_err(), "pod A was reached in plaintext");
    assert_eq!(routing_state(&m.node), (2, 2), "the rules stay");

    // A new loader adopts the pinned state: one program on each interface (its own), the old
    // one gone from the kernel, the enrolled pod known, no second rule; traffic works again.
    let _listeners = node_listeners(&m.node);
    let redirector = load(&m.node);
    let status = redirector.status();
    assert_eq!(status.adopted, (2, 1), "{status:?}");
    assert_eq!(status.pods.get(&POD_A.parse().expect("ip")).map(String::as_str), Some("veth-a"));
    assert_eq!(attached(&m.node), vec![status.program_id, status.program_id], "one set, not two");
    assert!(!program_loaded(old_id), "the replaced program is unloaded");
    assert_eq!(routing_state(&m.node), (2, 2));
    assert!(status.stats["dropped_no_listener"] >= 3, "counters live in the pinned map: {:?}", status.stats);
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);
    expect_landing(talk(&m.outside, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", OUTSIDE);

    // Uninstalling leaves nothing, and the pod talks directly again.
    remove(&m.node, redirector);
    assert!(!program_loaded(status.program_id), "program unloaded after uninstall");
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
}

const ZTUNNEL_MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo}
spec: {serviceAccountName: a, nodeName: node-a}
status: {podIPs: [{ip: 10.1.1.2}, {ip: "fd00:1:1::2"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo}
spec: {serviceAccountName: b, nodeName: node-b}
status: {podIP: 10.1.2.2}
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

    // Only the workload scheduled on node-a is enrolled (both its addresses), on the interface
    // the node routes it by.
    zt.converge("pod A enrolled", &|s| s.pods.len() == 2);
    let status = zt.app.enrollment.as_ref().expect("redirection on").status();
    assert_eq!(status.pods.get(&POD_A.parse().expect("ip")).map(String::as_str), Some("veth-a"));
    assert_eq!(status.pods.get(&POD_A6.parse().expect("ip")).map(String::as_str), Some("veth-a"));
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);
    expect_landing(talk(&m.pod_a, &format!("[{OUTSIDE6}]:80")), 15001, "[fd00:9::2]:80", POD_A6);
    expect_landing(talk(&m.outside, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", OUTSIDE);
    assert_eq!(talk(&m.pod_b, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_B}")));
    // With every interface watched, plaintext from an unenrolled pod on the same node to the
    // enrolled pod is captured for inbound policy too.
    expect_landing(talk(&m.pod_b, &format!("{POD_A}:8080")), 15006, "10.1.1.2:8080", POD_B);
    assert!(status.interfaces["veth-b"].uplink, "{status:?}");

    // The workload leaves: it is unenrolled and talks directly again.
    std::fs::write(&path, ZTUNNEL_MESH.replace("nodeName: node-a", "nodeName: node-c")).expect("rewrite");
    zt.converge("pod A unenrolled", &|s| s.pods.is_empty());
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
    zt.stop(&m.node);
}

#[test]
fn a_stopped_ztunnel_leaves_pods_closed_and_a_new_one_adopts_them() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("stop");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, ZTUNNEL_MESH).expect("config");
    let zt = start_ztunnel(&m.node, &path, "node-a", &["--uplink", "uplink"]);
    zt.converge("pod A enrolled", &|s| s.pods.len() == 2);
    let first = zt.app.enrollment.as_ref().expect("redirection on").status();

    // What ztunnel does after SIGTERM and its drain: the app is dropped. Capture stays.
    let NodeZtunnel { rt, app } = zt;
    m.node.enter(|| drop(app));
    drop(rt);
    assert_eq!(attached(&m.node), vec![first.program_id, first.program_id]);
    for (who, dst) in [
        (&m.pod_a, format!("{OUTSIDE}:{SERVER_PORT}")),
        (&m.pod_a, format!("[{OUTSIDE6}]:{SERVER_PORT}")),
        (&m.outside, format!("{POD_A}:{SERVER_PORT}")),
        (&m.outside, format!("[{POD_A6}]:{SERVER_PORT}")),
    ] {
        let outcome = talk(who, &dst);
        assert!(outcome.is_err(), "{dst} reached in plaintext with ztunnel stopped: {outcome:?}");
    }

    // The next ztunnel adopts the capture before it knows any workload, keeps it through its
    // first sync, and serves the pod again.
    let _listeners = node_listeners(&m.node);
    let zt = start_ztunnel(&m.node, &path, "node-a", &["--uplink", "uplink"]);
    let status = zt.app.enrollment.as_ref().expect("redirection on").status();
    assert_eq!(status.adopted, (2, 2), "{status:?}");
    zt.converge("pod A still enrolled", &|s| s.pods.len() == 2);
    assert_eq!(attached(&m.node), vec![status.program_id, status.program_id], "one set, not two");
    assert!(!program_loaded(first.program_id), "the replaced program is unloaded");
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);
    expect_landing(talk(&m.outside, &format!("[{POD_A6}]:8080")), 15006, "[fd00:1:1::2]:8080", OUTSIDE6);
    zt.stop(&m.node);
    assert_eq!(attached(&m.node), Vec::<u32>::new());
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
}

/// A real ztunnel process (this package's `ztunnel-proc`, the `ztunnel` binary's entry) in
/// `node`, its log in `log`.
fn ztunnel_process(node: &Netns, args: &[&str], log: &std::path::Path) -> std::process::Child {
    let log = std::fs::File::create(log).expect("log file");
    std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, env!("CARGO_BIN_EXE_ztunnel-proc")])
        .args(args)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("spawn ztunnel")
}

/// Waits up to 15 s for `pred` over the programs attached in `node`.
fn wait_attached(node: &Netns, what: &str, pred: impl Fn(&[u32]) -> bool) -> Vec<u32> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = attached(node);
        if pred(&now) {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}: attached {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn signal(child: &mut std::process::Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(std::time::Instant::now() < deadline, "ztunnel did not exit after {sig}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_or_terminated_ztunnel_process_leaves_capture_in_place() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("proc");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, ZTUNNEL_MESH).expect("config");
    let pin_dir = redirect_settings(&m.node).pin_dir;
    let args = [
        "--local-config",
        path.to_str().expect("path"),
        "--node-name",
        "node-a",
        "--redirect",
        "--no-proxy",
        "--uplink",
        "uplink",
        "--bpf-pin-dir",
        pin_dir.to_str().expect("path"),
        "--admin-addr",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
        "--readiness-addr",
        "127.0.0.1:0",
    ];
    // The proxies' stand-ins (this test's listeners) show where captured connections land;
    // the ztunnel process only enrolls.
    let listeners = node_listeners(&m.node);
    let log = |n: usize| dir.path().join(format!("ztunnel-{n}.log"));
    let mut first = ztunnel_process(&m.node, &args, &log(1));
    let ids = wait_attached(&m.node, "the first ztunnel's capture", |ids| ids.len() == 2);
    // Both of pod A's addresses enrolled (the process enrolls them one after the other).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let landed = |r: Result<String, String>, port: &str| r.is_ok_and(|r| r.starts_with(port));
    while !landed(talk(&m.outside, &format!("[{POD_A6}]:8080")), "15006 ")
        || !landed(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), "15001 ")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the first ztunnel never enrolled both addresses of pod A"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    expect_landing(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), 15001, "10.9.0.2:8080", POD_A);
    expect_landing(talk(&m.outside, &format!("[{POD_A6}]:8080")), 15006, "[fd00:1:1::2]:8080", OUTSIDE6);

    // kill -9: capture stays; the pod is still captured, never direct.
    signal(&mut first, nix::sys::signal::Signal::SIGKILL);
    assert_eq!(attached(&m.node), ids, "capture outlives a killed ztunnel");
    expect_landing(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), 15001, "10.9.0.2:8080", POD_A);
    expect_landing(talk(&m.outside, &format!("[{POD_A6}]:8080")), 15006, "[fd00:1:1::2]:8080", OUTSIDE6);

    // A new process adopts it (one program per interface, its own; the old one unloaded)...
    let mut second = ztunnel_process(&m.node, &args, &log(2));
    let adopted = wait_attached(&m.node, "adoption", |now| now.len() == 2 && now[0] == now[1] && now != ids);
    assert!(!program_loaded(ids[0]), "the killed ztunnel's program is unloaded once replaced");
    expect_landing(talk(&m.pod_a, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_A);

    // ...and SIGTERM (drain, exit) leaves it in place too.
    signal(&mut second, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(attached(&m.node), adopted, "capture outlives a stopped ztunnel");
    let log2 = std::fs::read_to_string(log(2)).unwrap_or_default();
    assert!(log2.contains("capture stays in place"), "the stop says what it leaves: {log2}");
    // With nothing listening at all, the pod reaches nothing, and nothing reaches it.
    drop(listeners);
    assert!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")).is_err(), "pod A got out in plaintext");
    assert!(talk(&m.outside, &format!("{POD_A}:{SERVER_PORT}")).is_err(), "pod A was reached in plaintext");

    // `ztunnel uninstall` removes everything and says what it removed.
    let uninstall = std::process::Command::new("ip")
        .args(["netns", "exec", &m.node.name, env!("CARGO_BIN_EXE_ztunnel-proc"), "uninstall"])
        .args(["--bpf-pin-dir", pin_dir.to_str().expect("path")])
        .output()
        .expect("run uninstall");
    let said =
        String::from_utf8_lossy(&uninstall.stdout).to_string() + &String::from_utf8_lossy(&uninstall.stderr);
    assert!(uninstall.status.success(), "uninstall failed: {said}");
    assert!(
        said.contains("2 link(s)") && said.contains("1 program(s)") && said.contains("5 map(s)"),
        "{said}"
    );
    assert!(said.contains("2 routing rule(s)") && said.contains("2 route(s)"), "{said}");
    assert_eq!(attached(&m.node), Vec::<u32>::new());
    assert_eq!(routing_state(&m.node), (0, 0));
    assert!(!pin_dir.exists(), "pin directory removed");
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
}

#[test]
fn explicit_enrollment_serves_hosts_without_kubernetes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let m = mesh("vm");
    let _listeners = node_listeners(&m.node);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mesh.yaml");
    // No workloads at all: the host is enrolled explicitly.
    std::fs::write(&path, "").expect("config");
    let zt = start_ztunnel(&m.node, &path, "vm-host", &["--enroll", "10.1.2.2@veth-b"]);
    zt.converge("explicit pod enrolled", &|s| s.pods.len() == 1);
    expect_landing(talk(&m.pod_b, "192.0.2.10:80"), 15001, "192.0.2.10:80", POD_B);
    // Pod A is not listed and not captured.
    assert_eq!(talk(&m.pod_a, &format!("{OUTSIDE}:{SERVER_PORT}")), Ok(format!("outside {POD_A}")));
    zt.stop(&m.node);
}

/// An interface name with a dot (a VLAN's `eth0.100`): bpffs reserves dots in pin names, so the
/// link's pin must be named otherwise, and the next loader must find the interface again.
#[test]
fn a_pod_on_an_interface_with_a_dot_in_its_name_is_captured_and_adopted() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root("eBPF redirection tests");
    let pid = std::process::id();
    let node = Netns::create(&format!("rd{pid}-dot-node"));
    let pod = Netns::create(&format!("rd{pid}-dot-pod"));
    wire(&node, &pod, "v.dot", "10.1.7");
    let mut r = load(&node);
    node.enter(|| r.enroll("10.1.7.2".parse().expect("ip"), "v.dot")).expect("enroll on v.dot");
    assert!(r.status().interfaces.contains_key("v.dot"));
    r.release();
    let r = load(&node);
    let status = r.status();
    assert_eq!(status.adopted, (1, 1), "{status:?}");
    assert!(status.interfaces.contains_key("v.dot"), "{status:?}");
    assert_eq!(attached(&node).len(), 1, "still one program on the interface");
    remove(&node, r);
}

/// `GET path` on 127.0.0.1:`port` inside `ns`: the response, or None when nothing answers.
fn local_get(ns: &Netns, port: u16, path: &str) -> Option<String> {
    ns.enter(|| {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: local\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    })
}

/// A ztunnel whose log output is stuck (its stderr a pipe nobody reads, as a container
/// runtime's log shim that fell behind leaves it) goes on refusing and serving connections: it
/// drops log lines, counts them and says so once the output moves, and never waits on it.
/// Before the log sink, the proxy thread blocked in `write` as soon as the pipe's 64 KiB were
/// full: the 148th refused connection hung, and so did every connection on the node after it.
#[test]
fn a_stuck_log_output_costs_log_lines_not_connections() {
    require_root("a ztunnel process in a network namespace");
    let node = Netns::create(&format!("rd{}-log", std::process::id()));
    node.ip(&["link", "set", "lo", "up"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh.yaml");
    std::fs::write(&config, ZTUNNEL_MESH).expect("config");
    let ca = dir.path().join("ca");
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, env!("CARGO_BIN_EXE_ztunnel-proc")])
        .args(["--local-config", config.to_str().expect("path"), "--node-name", "node-a"])
        .args(["--local-ca", ca.to_str().expect("path"), "--drain-period-seconds", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .spawn()
        .expect("spawn ztunnel");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !local_get(&node, 15021, "/healthz/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(child.try_wait().expect("wait").is_none(), "ztunnel exited");
        assert!(std::time::Instant::now() < deadline, "ztunnel never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Each connection to the outbound listener that capture did not bring is refused with a
    // warning line of over 400 bytes. What the log can hold while nobody reads it: the pipe
    // (64 KiB), the batch the writer is blocked on (at most the buffer, 1 MiB) and the buffer
    // (1 MiB); 8000 lines are over 3 MB, so lines are dropped however the batches fell.
    const CONNECTIONS: usize = 8000;
    node.enter(|| {
        let addr = SocketAddr::from(([127, 0, 0, 1], 15001));
        for i in 0..CONNECTIONS {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
            match s.read(&mut [0u8; 16]) {
                Ok(0) => {}
                Ok(n) => panic!("connection {i}: {n} bytes from a refused connection"),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => panic!("connection {i} was not refused ({e}): ztunnel stopped serving"),
            }
        }
    });
    let metrics = local_get(&node, 15020, "/metrics").expect("metrics");
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("istio_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no istio_log_lines_dropped_total in {metrics}"));
    assert!((1.0..CONNECTIONS as f64).contains(&dropped), "{dropped} lines dropped");

    // The output moves again: what was held comes out, with the count of what was not; the
    // stop flushes the rest.
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        text
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        assert!(std::time::Instant::now() < deadline, "ztunnel did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = drain.join().expect("log reader");
    let refused = log.matches("connection refused").count();
    assert!((100..CONNECTIONS).contains(&refused), "{refused} access lines reached the log");
    assert!(
        log.contains("log lines dropped"),
        "the drop is reported:\n{}",
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(log.contains("ztunnel ready"), "lines before the stall are kept");
}
