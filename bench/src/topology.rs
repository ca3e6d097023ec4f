//! The benchmark's cluster: two nodes joined by a veth link, a client pod on node A and a
//! server pod and a waypoint pod on node B; the mesh (control plane, one ztunnel per node,
//! the waypoint) started and stopped around it; processes pinned to CPUs and measured from
//! /proc.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mesh_tests::netns::{Netns, link_nodes, wire};

pub const CLIENT_IP: &str = "10.1.1.2";
pub const SERVER_IP: &str = "10.2.1.2";
pub const WAYPOINT_IP: &str = "10.2.5.2";
/// L7 through the waypoint: HTTP/1.1 and HTTP/2 services.
pub const WEB_H1_VIP: &str = "10.96.0.60";
pub const WEB_H2_VIP: &str = "10.96.0.61";
const XDS_ADDR: &str = "10.0.0.1:15010";
/// nginx in the server pod: HTTP/1.1 and prior-knowledge h2c.
pub const NGINX_H1_PORT: u16 = 8081;
pub const NGINX_H2_PORT: u16 = 8082;

/// The mesh the control plane serves.
pub const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {serviceAccountName: client, nodeName: node-a}
status: {podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: bench, labels: {app: server}}
spec: {serviceAccountName: server, nodeName: node-b}
status: {podIP: 10.2.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint, namespace: bench, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {serviceAccountName: waypoint, nodeName: node-b}
status: {podIP: 10.2.5.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: server}, clusterIP: 10.96.0.60, ports: [{name: http, port: 80, targetPort: 8081}]}
---
apiVersion: v1
kind: Service
metadata: {name: web2, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec: {selector: {app: server}, clusterIP: 10.96.0.61, ports: [{name: http2, port: 80, targetPort: 8082}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec:
  gatewayClassName: ambient-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 10.96.0.70}]
"#;

/// Which CPU each party runs on (the same in direct and mesh runs).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Placement {
    pub client: usize,
    pub server: usize,
    pub ztunnel_a: usize,
    pub ztunnel_b: usize,
    pub waypoint: usize,
    pub control_plane: usize,
}

impl Placement {
    pub fn for_cpus(n: usize) -> Self {
        // Node A's side on the first CPU, node B's on the last: with two CPUs each node gets one.
        let (a, b) = (0, n.saturating_sub(1));
        Self { client: a, server: b, ztunnel_a: a, ztunnel_b: b, waypoint: b, control_plane: a }
    }
}

/// A long-running process in a namespace, killed on drop.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// CPU seconds used so far (user + system).
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The anonymous part of the resident set (heap, stacks: what the process itself
    /// allocated, as opposed to the pages of its executable and libraries), in KiB.
    pub fn rss_anon_kib(&self) -> u64 {
        self.status_kib("RssAnon:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        common::admin::status_kib(&status, field).unwrap_or(0)
    }

    /// Writes to its stdin (used to tell the holder to let go).
    pub fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        tracing::debug!(process = %self.name, "stopping");
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output();
    out.ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100.0)
}

pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    ticks / clock_ticks()
}

pub struct Cluster {
    pub node_a: Netns,
    pub node_b: Netns,
    pub client: Netns,
    pub server: Netns,
    pub waypoint: Netns,
    pub bin: PathBuf,
    pub placement: Placement,
    pub work: PathBuf,
}

impl Cluster {
    pub fn build(bin: &Path, placement: Placement, work: &Path) -> Self {
        let pid = std::process::id();
        let ns = |role: &str| Netns::create(&format!("bn{pid}-{role}"));
        let c = Self {
            node_a: ns("na"),
            node_b: ns("nb"),
            client: ns("client"),
            server: ns("server"),
            waypoint: ns("wp"),
            bin: bin.to_path_buf(),
            placement,
            work: work.to_path_buf(),
        };
        link_nodes(&c.node_a, &c.node_b);
        wire(&c.node_a, &c.client, "v-client", "10.1.1");
        wire(&c.node_b, &c.server, "v-server", "10.2.1");
        wire(&c.node_b, &c.waypoint, "v-wp", "10.2.5");
        c
    }

    fn command(&self, ns: &Netns, cpu: usize, program: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "taskset", "-c", &cpu.to_string()]).arg(program).args(args);
        cmd
    }

    /// Starts a long-running process; its stderr goes to `<work>/<name>.log`.
    pub fn spawn(&self, name: &str, ns: &Netns, cpu: usize, program: &Path, args: &[&str]) -> Proc {
        let log = std::fs::File::create(self.work.join(format!("{name}.log"))).expect("log file");
        let child = self
            .command(ns, cpu, program, args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc { name: name.to_string(), child }
    }

    /// Runs a worker of ours to completion and parses the JSON it prints.
    pub fn worker<T: serde::de::DeserializeOwned>(&self, ns: &Netns, cpu: usize, args: &[&str]) -> T {
        let out = self
            .command(ns, cpu, &self.bin.join("mesh-bench"), args)
            .output()
            .unwrap_or_else(|e| panic!("worker {args:?}: {e}"));
        assert!(out.status.success(), "worker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("worker {args:?} printed {:?}: {e}", String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs any program in a namespace on a CPU; its stdout, or why it failed.
    pub fn try_exec(&self, ns: &Netns, cpu: usize, program: &str, args: &[&str]) -> Result<String, String> {
        let out = self
            .command(ns, cpu, Path::new(program), args)
            .output()
            .map_err(|e| format!("{program}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "{program} {args:?}: {} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The servers in the server pod: our echo server on 7000, nginx for HTTP (iperf3 runs
    /// per test).
    pub fn servers(&self) -> Vec<Proc> {
        let cpu = self.placement.server;
        let me = self.bin.join("mesh-bench");
        let conf = self.work.join("nginx.conf");
        std::fs::write(&conf, crate::tools::nginx_config(&self.work, NGINX_H1_PORT, NGINX_H2_PORT))
            .expect("nginx config");
        let conf = conf.to_str().expect("path");
        vec![
            self.spawn("echo-server", &self.server, cpu, &me, &["echo-server", "--port", "7000"]),
            self.spawn("nginx", &self.server, cpu, Path::new("nginx"), &["-c", conf, "-e", "stderr"]),
        ]
    }

    /// Holds `count` connections from the client pod to `addr`; returns once they are all open.
    pub fn hold(&self, addr: &str, count: usize) -> (Proc, usize) {
        let me = self.bin.join("mesh-bench");
        let n = count.to_string();
        let mut p = self.spawn(
            "hold",
            &self.client,
            self.placement.client,
            &me,
            &["hold", "--addr", addr, "--count", &n],
        );
        let stdout = p.child.stdout.take().expect("stdout");
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let opened = line.trim().strip_prefix("READY ").and_then(|n| n.parse().ok()).unwrap_or(0);
        (p, opened)
    }
}

/// The running mesh: control plane, ztunnels, waypoint.
pub struct Mesh {
    pub ztunnel_a: Proc,
    pub ztunnel_b: Proc,
    pub waypoint: Proc,
    _control_plane: Proc,
}

fn wait_ready(c: &Cluster, ns: &Netns, what: &str, log: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.name, "curl", "-fsS", "http://127.0.0.1:15021/healthz/ready"])
            .output();
        if out.is_ok_and(|o| o.status.success()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(c.work.join(log)).unwrap_or_default();
    panic!("{what} never became ready; its log:\n{log}");
}

/// Waits until the node's ztunnel reports `ip` enrolled for capture.
fn wait_enrolled(node: &Netns, ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = Command::new("ip")
            .args(["netns", "exec", &node.name, "curl", "-fsS", "http://127.0.0.1:15000/config_dump"])
            .output();
        let dump: Option<serde_json::Value> = out.ok().and_then(|o| serde_json::from_slice(&o.stdout).ok());
        if dump.is_some_and(|d| !d["redirection"]["pods"][ip].is_null()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{ip} was never enrolled in {}", node.name);
}

impl Mesh {
    pub fn start(c: &Cluster) -> Self {
        Self::start_with(c, None)
    }

    /// The mesh with ztunnels and the waypoint run under `valgrind --tool=callgrind`, writing
    /// their counts to `<dir>/<name>.callgrind` (see [`crate::scenarios::instructions`]);
    /// `mangled`: functions named by their symbols (for [`crate::hot_text`]).
    pub fn start_counting(c: &Cluster, dir: &Path, mangled: bool) -> Self {
        Self::start_with(c, Some((dir, mangled)))
    }

    fn start_with(c: &Cluster, callgrind: Option<(&Path, bool)>) -> Self {
        let spawn = |name: &str, ns: &Netns, cpu: usize, bin: &Path, args: &[&str]| -> Proc {
            let Some((dir, mangled)) = callgrind else { return c.spawn(name, ns, cpu, bin, args) };
            let out = format!("--callgrind-out-file={}", dir.join(format!("{name}.callgrind")).display());
            let mut full = vec!["--tool=callgrind", "--dump-instr=no", "--collect-systime=no", out.as_str()];
            if mangled {
                full.push("--demangle=no");
            }
            full.push(bin.to_str().expect("path"));
            full.extend_from_slice(args);
            c.spawn(name, ns, cpu, Path::new("valgrind"), &full)
        };
        let ready_within = Duration::from_secs(if callgrind.is_some() { 300 } else { 60 });
        let config = c.work.join("mesh.yaml");
        std::fs::File::create(&config).and_then(|mut f| f.write_all(MESH.as_bytes())).expect("mesh config");
        let ca = c.work.join("ca");
        if callgrind.is_some_and(|(_, mangled)| mangled) {
            // The hot text lists what a first start runs, making the mesh's CA included.
            let _ = std::fs::remove_dir_all(&ca);
        }
        let (ca, config) = (ca.to_str().expect("path"), config.to_str().expect("path"));
        let p = &c.placement;
        let control_plane = c.spawn(
            "xds-server",
            &c.node_a,
            p.control_plane,
            &c.bin.join("xds-server"),
            &["--listen", XDS_ADDR, "--config", config],
        );
        let url = format!("http://{XDS_ADDR}");
        let pins = [mesh_tests::node::bpf_pin_dir(&c.node_a), mesh_tests::node::bpf_pin_dir(&c.node_b)];
        let pin_a = pins[0].to_str().expect("path").to_string();
        let pin_b = pins[1].to_str().expect("path").to_string();
        let zt = |node: &str| {
            let pin = if node == "node-a" { pin_a.as_str() } else { pin_b.as_str() };
            vec![
                "--xds-address",
                url.as_str(),
                "--node-name",
                node,
                "--local-ca",
                ca,
                "--redirect",
                "--uplink",
                "*",
                "--bpf-pin-dir",
                pin,
            ]
            .into_iter()
            .map(str::to_string)
            .collect::<Vec<_>>()
        };
        let args_a = zt("node-a");
        let args_b = zt("node-b");
        fn refs(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let ztunnel_a = spawn("ztunnel-a", &c.node_a, p.ztunnel_a, &c.bin.join("ztunnel"), &refs(&args_a));
        wait_ready(c, &c.node_a, "ztunnel on node-a", "ztunnel-a.log", ready_within);
        let ztunnel_b = spawn("ztunnel-b", &c.node_b, p.ztunnel_b, &c.bin.join("ztunnel"), &refs(&args_b));
        wait_ready(c, &c.node_b, "ztunnel on node-b", "ztunnel-b.log", ready_within);
        let waypoint = spawn(
            "waypoint",
            &c.waypoint,
            p.waypoint,
            &c.bin.join("waypoint"),
            &[
                "--xds-address",
                &url,
                "--local-ca",
                ca,
                "--name",
                "waypoint",
                "--namespace",
                "bench",
                "--address",
                WAYPOINT_IP,
                "--access-log",
                "/dev/null",
            ],
        );
        wait_ready(c, &c.waypoint, "waypoint", "waypoint.log", ready_within);
        wait_enrolled(&c.node_a, CLIENT_IP);
        wait_enrolled(&c.node_b, SERVER_IP);
        Self { ztunnel_a, ztunnel_b, waypoint, _control_plane: control_plane }
    }

    /// Has callgrind dump each process's counts (when started by [`Mesh::start_counting`]).
    pub fn dump_counts(&self) {
        for p in [&self.ztunnel_a, &self.ztunnel_b, &self.waypoint] {
            crate::scenarios::callgrind_control("-d", p.pid());
        }
    }

    /// Stops the processes, then removes the capture the ztunnels pinned (it outlives them).
    pub fn stop(self, c: &Cluster) {
        drop(self);
        for node in [&c.node_a, &c.node_b] {
            let settings = mesh_tests::node::redirect_settings(node);
            match node.enter(|| ebpf::uninstall(&settings)) {
                Ok(removed) => tracing::info!(node = %node.name, %removed, "capture uninstalled"),
                Err(e) => tracing::warn!(node = %node.name, error = %e, "capture uninstall failed"),
            }
        }
    }
}
