//! A ztunnel app running in-process inside a node's network namespace (root-only tests).

use std::future::Future;
use std::time::Duration;

use clap::Parser;

use crate::netns::Netns;

/// The bpffs the tests pin capture under (mounted once in the host's mount namespace, so the
/// processes `ip netns exec` starts see it too; `/sys/fs/bpf` is hidden from them).
pub const TEST_BPFFS: &str = "/run/ambient-mesh-test/bpf";

/// A pin directory of its own for `node`'s redirector, on the tests' bpffs (mounted here).
pub fn bpf_pin_dir(node: &Netns) -> std::path::PathBuf {
    let root = std::path::Path::new(TEST_BPFFS);
    ebpf::pin::mount_bpffs(root).unwrap_or_else(|e| panic!("cannot mount the tests' bpffs: {e}"));
    root.join(&node.name)
}

/// Redirection settings for `node`: the defaults with the node's own pin directory.
pub fn redirect_settings(node: &Netns) -> ebpf::Settings {
    ebpf::Settings { pin_dir: bpf_pin_dir(node), ..Default::default() }
}

/// Removes the capture pinned for `node` (as `ztunnel uninstall` does) and checks that nothing
/// is left: no pins, no rules, no routes.
pub fn uninstall(node: &Netns, settings: &ebpf::Settings) -> ebpf::Removed {
    let removed = node.enter(|| ebpf::uninstall(settings)).unwrap_or_else(|e| panic!("uninstall: {e}"));
    assert!(!settings.pin_dir.exists(), "pin directory {} left behind", settings.pin_dir.display());
    assert_eq!(routing_state(node), (0, 0), "redirection left behind in {}", node.name);
    removed
}

/// Routing rules and routes of the redirection in `node`: (rules, routes).
pub fn routing_state(node: &Netns) -> (usize, usize) {
    let s = ebpf::Settings::default();
    node.enter(|| {
        (
            ebpf::routing::count_rules(s.redirect_mark, s.route_table).expect("rules"),
            ebpf::routing::count_routes(s.route_table).expect("routes"),
        )
    })
}

/// The in-repo control plane serving `store` on `addr`, on a runtime whose threads live in
/// `node`; keep the runtime as long as the server runs.
pub fn control_plane(
    node: &Netns,
    addr: &str,
    store: std::sync::Arc<crate::xds_server::XdsStore>,
) -> (tokio::runtime::Runtime, crate::xds_server::XdsServerHandle) {
    let rt = node.runtime();
    let addr: std::net::SocketAddr = addr.parse().unwrap_or_else(|e| panic!("{addr}: {e}"));
    let server = rt
        .block_on(rt.spawn(crate::xds_server::start(addr, store)))
        .expect("join")
        .unwrap_or_else(|e| panic!("xds server on {addr} in {}: {e}", node.name));
    (rt, server)
}

/// ztunnel started from command-line flags on a runtime whose threads live in the node.
pub struct NodeZtunnel {
    pub rt: tokio::runtime::Runtime,
    pub app: ztunnel::app::App,
}

impl NodeZtunnel {
    /// Starts ztunnel in `node` with `flags` (after the program name); admin, metrics and
    /// readiness bind to ephemeral loopback ports.
    pub fn start(node: &Netns, flags: &[&str]) -> Self {
        let mut all = vec!["ztunnel", "--admin-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"];
        all.extend(["--readiness-addr", "127.0.0.1:0"]);
        all.extend_from_slice(flags);
        // Each node pins its capture in a directory of its own.
        let pin_dir = bpf_pin_dir(node);
        let pin_dir = pin_dir.to_str().expect("utf-8 path").to_string();
        if flags.contains(&"--redirect") && !flags.contains(&"--bpf-pin-dir") {
            all.extend(["--bpf-pin-dir", pin_dir.as_str()]);
        }
        let args = ztunnel::config::Args::try_parse_from(all).expect("flags");
        let config = ztunnel::config::Config::from_args(args).expect("config");
        let rt = node.runtime();
        let app = rt
            .block_on(rt.spawn(ztunnel::app::App::start(config)))
            .expect("join")
            .unwrap_or_else(|e| panic!("ztunnel does not start in {}: {e:#}", node.name));
        Self { rt, app }
    }

    /// Starts the ztunnel of node `node_name` as the mesh tests run it (capture on, every uplink,
    /// the control plane at `xds_url`, the local CA in `ca`, then `extra`) and waits until it is
    /// ready.
    pub fn start_node(node: &Netns, xds_url: &str, ca: &str, node_name: &str, extra: &[&str]) -> Self {
        let base = [
            "--xds-address",
            xds_url,
            "--local-ca",
            ca,
            "--redirect",
            "--uplink",
            "*",
            "--node-name",
            node_name,
        ];
        let zt = Self::start(node, &[&base[..], extra].concat());
        zt.wait_ready(&format!("ztunnel on {node_name}"));
        zt
    }

    /// Runs `fut` on the node's runtime (inside the namespace) and waits for it.
    pub fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        self.rt.block_on(self.rt.spawn(fut)).expect("task")
    }

    /// Waits for the enrollment status to satisfy `pred`.
    pub fn converge(&self, what: &str, pred: &dyn Fn(&ebpf::Status) -> bool) {
        let enrollment = self.app.enrollment.clone().expect("redirection on");
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(15), enrollment.wait_for(pred)).await
            })
            .unwrap_or_else(|_| panic!("timed out waiting for {what}: {:?}", enrollment.status()));
    }

    /// Waits until ztunnel reports ready (first xDS sync and certificates in).
    pub fn wait_ready(&self, what: &str) {
        let ready = self.app.ready.clone();
        self.rt
            .block_on(async { tokio::time::timeout(crate::CONVERGE_TIMEOUT, ready.wait()).await })
            .unwrap_or_else(|_| panic!("{what} never became ready: pending {:?}", self.app.ready.pending()));
    }

    /// The Prometheus text on the metrics endpoint.
    pub fn metrics(&self) -> String {
        let addr = self.app.metrics_addr;
        let (status, body) = self.block(crate::http::get(addr, "/metrics")).expect("metrics endpoint");
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Shuts down inside the node; capture stays pinned (fail closed), so it is then
    /// uninstalled, and nothing may be left behind.
    pub fn stop(self, node: &Netns) {
        let Self { rt, app } = self;
        let settings = app.enrollment.as_ref().and_then(|e| e.status().settings);
        node.enter(|| drop(app));
        drop(rt);
        if let Some(settings) = settings {
            uninstall(node, &settings);
        }
    }
}
