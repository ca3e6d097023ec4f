//! Network namespaces as nodes and pods, for the root-only tests. Each namespace is created with
//! `ip netns add` and deleted on drop; [`Netns::enter`] runs a closure on a thread inside it
//! (threads that closure spawns stay inside too).

use std::process::Command;

/// Fails the test, saying why, unless we are root and `ip netns` works.
pub fn require_root(what: &str) {
    let uid =
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match uid {
        Ok(uid) if uid == "0" => {}
        other => panic!(
            "{what} needs root (network namespaces, eBPF): running as uid {other:?}. CI runs as root; run with sudo."
        ),
    }
    let probe = Command::new("ip").args(["netns", "list"]).output();
    if !probe.as_ref().is_ok_and(|o| o.status.success()) {
        panic!("{what} needs iproute2's `ip netns`: {probe:?}");
    }
}

/// Runs a command, panicking with its stderr if it fails; returns stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program} {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One network namespace.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name` (replacing a leftover of the same name) with loopback up.
    pub fn create(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run("ip", &["netns", "add", name]);
        let ns = Self { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `ip netns exec <ns> <args>`.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A tokio runtime whose worker threads live in this namespace. Spawn work on it (tasks run
    /// inside); `block_on` would run on the caller's thread, outside.
    pub fn runtime(&self) -> tokio::runtime::Runtime {
        self.enter(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
        })
    }
}

impl Drop for Netns {
    /// Deletes the namespace and what a ztunnel pinned for it on the tests' bpffs, whether or
    /// not the test got to uninstall it (a failed test would otherwise leave its programs, maps
    /// and links pinned in the kernel).
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        let pins = std::path::Path::new(crate::node::TEST_BPFFS).join(&self.name);
        if pins.exists() {
            let _ = std::fs::remove_dir_all(&pins);
        }
    }
}

/// Connects `pod` to `node` with a veth pair: `host_if` (address `.1`) in the node and `eth0`
/// (address `.2`, default route via `.1`) in the pod, on the /24 `subnet` (e.g. `10.1.1`).
pub fn wire(node: &Netns, pod: &Netns, host_if: &str, subnet: &str) {
    run(
        "ip",
        &[
            "link", "add", host_if, "netns", &node.name, "type", "veth", "peer", "name", "eth0", "netns",
            &pod.name,
        ],
    );
    node.ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", host_if]);
    node.ip(&["link", "set", host_if, "up"]);
    pod.ip(&["addr", "add", &format!("{subnet}.2/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", &format!("{subnet}.1")]);
}

/// Adds IPv6 to a pair [`wire`] made: `<prefix>::1/64` on `host_if` in the node and
/// `<prefix>::2/64` on the pod's `eth0` (no duplicate address detection, so they are usable at
/// once), with the pod's default IPv6 route via the node.
pub fn wire6(node: &Netns, pod: &Netns, host_if: &str, prefix: &str) {
    node.ip(&["-6", "addr", "add", &format!("{prefix}::1/64"), "dev", host_if, "nodad"]);
    pod.ip(&["-6", "addr", "add", &format!("{prefix}::2/64"), "dev", "eth0", "nodad"]);
    pod.ip(&["-6", "route", "add", "default", "via", &format!("{prefix}::1")]);
}

/// Lets `node` route between its pods (IPv4 and IPv6).
pub fn enable_forwarding(node: &Netns) {
    node.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
    node.exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"]);
}

/// Joins two nodes with a veth link (`link-a` 10.0.0.1 in `a`, `link-b` 10.0.0.2 in `b`), routes
/// node A's pod range 10.1.0.0/16 and node B's 10.2.0.0/16 across it, and lets both forward.
pub fn link_nodes(a: &Netns, b: &Netns) {
    run(
        "ip",
        &[
            "link", "add", "link-a", "netns", &a.name, "type", "veth", "peer", "name", "link-b", "netns",
            &b.name,
        ],
    );
    a.ip(&["addr", "add", "10.0.0.1/24", "dev", "link-a"]);
    a.ip(&["link", "set", "link-a", "up"]);
    b.ip(&["addr", "add", "10.0.0.2/24", "dev", "link-b"]);
    b.ip(&["link", "set", "link-b", "up"]);
    a.ip(&["route", "add", "10.2.0.0/16", "via", "10.0.0.2"]);
    b.ip(&["route", "add", "10.1.0.0/16", "via", "10.0.0.1"]);
    enable_forwarding(a);
    enable_forwarding(b);
}

/// Adds IPv6 to a link [`link_nodes`] made: `fd00:0:0:1::1/64` in `a`, `fd00:0:0:1::2/64` in
/// `b`, node A's pod range `fd00:a::/32` and node B's `fd00:b::/32` routed across it.
pub fn link_nodes6(a: &Netns, b: &Netns) {
    a.ip(&["-6", "addr", "add", "fd00:0:0:1::1/64", "dev", "link-a", "nodad"]);
    b.ip(&["-6", "addr", "add", "fd00:0:0:1::2/64", "dev", "link-b", "nodad"]);
    a.ip(&["-6", "route", "add", "fd00:b::/32", "via", "fd00:0:0:1::2"]);
    b.ip(&["-6", "route", "add", "fd00:a::/32", "via", "fd00:0:0:1::1"]);
}
