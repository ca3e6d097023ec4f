//! The scenarios, each run the same way directly (no mesh) and through the mesh, repeated, with
//! min/median/max and the mesh/direct ratio of the medians.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::info;

use crate::load::Latency;
use crate::tools::{H2load, Wrk, parse_h2load, parse_wrk};
use crate::topology::{Cluster, Mesh, NGINX_H1_PORT, NGINX_H2_PORT, SERVER_IP, WEB_H1_VIP, WEB_H2_VIP};

/// What start-up allocated and freed is handed back within seconds; idle is read after that
/// (it matters when memory is the first scenario, e.g. `--only memory`).
const IDLE_WAIT: Duration = Duration::from_secs(5);

/// How long and how often.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Settings {
    pub seconds: u64,
    pub repeats: usize,
    /// Idle connections held for the memory figures.
    pub hold_counts: Vec<usize>,
    /// Wait after load before the last memory reading.
    pub settle_seconds: u64,
    pub l7_rate: u64,
    /// `--only`: run just the scenarios whose name contains one of these.
    pub only: Vec<String>,
}

impl Settings {
    pub fn full() -> Self {
        Self {
            seconds: 5,
            repeats: 3,
            hold_counts: vec![1000, 10_000],
            settle_seconds: 60,
            l7_rate: 500,
            only: Vec::new(),
        }
    }

    pub fn smoke() -> Self {
        Self {
            seconds: 1,
            repeats: 1,
            hold_counts: vec![10, 50],
            settle_seconds: 1,
            l7_rate: 100,
            only: Vec::new(),
        }
    }
}

/// Min, median and max of repeated runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Spread {
    pub runs: Vec<f64>,
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(mut runs: Vec<f64>) -> Self {
        let sorted = {
            let mut s = runs.clone();
            s.sort_by(f64::total_cmp);
            s
        };
        let n = sorted.len();
        let median = if n == 0 {
            0.0
        } else if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        runs.shrink_to_fit();
        Self {
            min: sorted.first().copied().unwrap_or(0.0),
            median,
            max: sorted.last().copied().unwrap_or(0.0),
            runs,
        }
    }
}

/// One figure, direct and through the mesh.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Figure {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub direct: Option<Spread>,
    pub mesh: Spread,
    /// mesh median / direct median.
    pub ratio: Option<f64>,
    /// mesh median - direct median (for latencies: the added latency).
    pub added: Option<f64>,
}

/// Raw results of one phase (direct or mesh), keyed by scenario and metric.
#[derive(Default)]
pub struct Phase {
    pub values: Vec<(String, String, String, Vec<f64>)>,
}

impl Phase {
    fn push(&mut self, scenario: &str, metric: &str, unit: &str, v: f64) {
        match self.values.iter_mut().find(|(s, m, _, _)| s == scenario && m == metric) {
            Some((_, _, _, runs)) => runs.push(v),
            None => self.values.push((scenario.into(), metric.into(), unit.into(), vec![v])),
        }
    }
}

/// The processes whose CPU time a scenario charges to the mesh.
pub struct Proxies<'a> {
    pub mesh: Option<&'a Mesh>,
}

impl Proxies<'_> {
    fn ztunnel_cpu(&self) -> f64 {
        self.mesh.map_or(0.0, |m| m.ztunnel_a.cpu_seconds() + m.ztunnel_b.cpu_seconds())
    }

    fn waypoint_cpu(&self) -> f64 {
        self.mesh.map_or(0.0, |m| m.waypoint.cpu_seconds())
    }
}

/// A one-off iperf3 server (`-s -1`) in the server pod on 5201, given time to listen.
fn iperf_server(c: &Cluster) -> crate::topology::Proc {
    let server = c.spawn(
        "iperf3-server",
        &c.server,
        c.placement.server,
        std::path::Path::new("iperf3"),
        &["-s", "-1", "-p", "5201"],
    );
    std::thread::sleep(Duration::from_millis(300));
    server
}

/// One iperf3 test against a fresh one-off server (`-s -1`), so that a test that goes wrong
/// cannot leave the server stuck for the next. Bounded by `timeout`; retried once.
fn iperf(c: &Cluster, streams: usize, reverse: bool, seconds: u64) -> (f64, f64) {
    let (p, t) = (streams.to_string(), seconds.to_string());
    let limit = (seconds + 20).to_string();
    for attempt in 1..=2 {
        let server = iperf_server(c);
        let mut args = vec![
            limit.as_str(),
            "iperf3",
            "-c",
            SERVER_IP,
            "-p",
            "5201",
            "-t",
            t.as_str(),
            "-P",
            p.as_str(),
            "-J",
        ];
        if reverse {
            args.push("-R");
        }
        let out = c.try_exec(&c.client, c.placement.client, "timeout", &args);
        drop(server);
        match out
            .and_then(|o| serde_json::from_str::<Value>(&o).map_err(|e| format!("iperf3 JSON: {e}: {o}")))
        {
            Ok(v) => {
                let sum = &v["end"]["sum_received"];
                return (
                    sum["bits_per_second"].as_f64().unwrap_or(0.0),
                    sum["bytes"].as_f64().unwrap_or(0.0),
                );
            }
            Err(e) => tracing::warn!(attempt, error = %e, "iperf3 run failed"),
        }
    }
    panic!("iperf3 failed twice ({streams} streams, reverse {reverse})");
}

/// wrk from the client pod (HTTP/1.1; with `close`, a new connection for every request).
fn wrk(c: &Cluster, url: &str, conns: usize, seconds: u64, close: bool) -> Wrk {
    let (n, d) = (conns.to_string(), format!("{seconds}s"));
    let limit = (seconds + 30).to_string();
    let mut args = vec![
        limit.as_str(),
        "wrk",
        "-t1",
        "-c",
        n.as_str(),
        "-d",
        d.as_str(),
        "--latency",
        "-H",
        "Host: web",
    ];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    let out =
        c.try_exec(&c.client, c.placement.client, "timeout", &args).unwrap_or_else(|e| panic!("wrk: {e}"));
    parse_wrk(&out).unwrap_or_else(|e| panic!("{e}"))
}

/// h2load from the client pod (prior-knowledge HTTP/2, one stream at a time per connection).
fn h2load(c: &Cluster, url: &str, conns: usize, seconds: u64) -> H2load {
    let (n, d) = (conns.to_string(), seconds.to_string());
    let limit = (seconds + 30).to_string();
    let args = [
        limit.as_str(),
        "h2load",
        "-t1",
        "-c",
        n.as_str(),
        "-m1",
        "-D",
        d.as_str(),
        "-H",
        ":authority: web",
        url,
    ];
    let out =
        c.try_exec(&c.client, c.placement.client, "timeout", &args).unwrap_or_else(|e| panic!("h2load: {e}"));
    parse_h2load(&out).unwrap_or_else(|e| panic!("{e}"))
}

impl Settings {
    /// Whether a scenario is selected by `--only`.
    pub fn wants(&self, scenario: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| scenario.contains(o.as_str()))
    }
}

/// Runs every scenario once (one repeat) in the current mode.
pub fn run_once(c: &Cluster, s: &Settings, proxies: &Proxies<'_>, phase: &mut Phase) {
    let secs = s.seconds.to_string();
    let cpu = c.placement.client;

    // 1. L4 throughput (iperf3).
    for (streams, reverse) in [(1, false), (1, true), (4, false), (4, true)] {
        let name = format!(
            "l4 throughput, {streams} stream{}, {}",
            if streams > 1 { "s" } else { "" },
            if reverse { "server -> client" } else { "client -> server" }
        );
        if !s.wants(&name) {
            continue;
        }
        let before = proxies.ztunnel_cpu();
        let (bps, bytes) = iperf(c, streams, reverse, s.seconds);
        phase.push(&name, "throughput", "Gbit/s", bps / 1e9);
        if proxies.mesh.is_some() && bytes > 0.0 {
            phase.push(
                &name,
                "proxy CPU per GB",
                "CPU-s/GB",
                (proxies.ztunnel_cpu() - before) / (bytes / 1e9),
            );
        }
        info!(scenario = %name, gbps = bps / 1e9, "done");
    }

    // 2. L4 latency at fixed rates (open loop: our generator).
    let echo = format!("{SERVER_IP}:7000");
    for size in [64usize, 1024] {
        for (rate, conns) in [(1000u64, 4usize), (5000, 16)] {
            let name = format!("l4 latency, {size} B, {rate} req/s over {conns} conns");
            if !s.wants(&name) {
                continue;
            }
            let (r, n, z) = (rate.to_string(), conns.to_string(), size.to_string());
            let l: Latency = c.worker(
                &c.client,
                cpu,
                &["rr", "--addr", &echo, "--rate", &r, "--conns", &n, "--size", &z, "--seconds", &secs],
            );
            for (metric, v) in [("p50", l.p50_us), ("p90", l.p90_us), ("p99", l.p99_us), ("p99.9", l.p999_us)]
            {
                phase.push(&name, metric, "µs", v as f64);
            }
            phase.push(&name, "achieved rate", "req/s", l.achieved_rps);
            info!(scenario = %name, p50 = l.p50_us, p99 = l.p99_us, errors = l.errors, "done");
        }
    }

    // 3. Connection churn: wrk, `Connection: close`, against nginx (L4 through the ztunnels).
    let nginx = format!("http://{SERVER_IP}:{NGINX_H1_PORT}/");
    for conns in [8usize, 1] {
        let name = format!("l4 connection churn, wrk -c{conns}, Connection: close, nginx");
        if !s.wants(&name) {
            continue;
        }
        let before = proxies.ztunnel_cpu();
        let w = wrk(c, &nginx, conns, s.seconds, true);
        phase.push(&name, "new connections", "conn/s", w.per_second);
        phase.push(&name, "p99", "µs", w.p99_us);
        phase.push(&name, "max", "µs", w.max_us);
        phase.push(&name, "errors", "count", (w.socket_errors + w.non_2xx) as f64);
        if proxies.mesh.is_some() && w.requests > 0 {
            phase.push(
                &name,
                "proxy CPU per 1000 conns",
                "CPU-ms",
                (proxies.ztunnel_cpu() - before) * 1e6 / w.requests as f64,
            );
        }
        info!(scenario = %name, per_second = w.per_second, p99_us = w.p99_us, max_us = w.max_us, errors = w.socket_errors, "done");
    }

    // 4. L7 (the waypoint's part): direct to nginx in the pod, or through ztunnel -> waypoint
    //    -> ztunnel. Fixed rate (our open-loop generator) for latency, then closed loop (wrk for
    //    HTTP/1.1, h2load for HTTP/2) for the maximum rate and the waypoint's CPU per request.
    let rate = s.l7_rate.to_string();
    for (label, h2, vip, port) in
        [("HTTP/1.1", false, WEB_H1_VIP, NGINX_H1_PORT), ("HTTP/2", true, WEB_H2_VIP, NGINX_H2_PORT)]
    {
        let addr = if proxies.mesh.is_some() { format!("{vip}:80") } else { format!("{SERVER_IP}:{port}") };
        let name = format!("l7 {label}, {rate} req/s over 4 conns");
        if s.wants(&name) {
            let mut args = vec![
                "http",
                "--addr",
                addr.as_str(),
                "--authority",
                "web",
                "--rate",
                rate.as_str(),
                "--conns",
                "4",
                "--seconds",
                secs.as_str(),
            ];
            if h2 {
                args.push("--h2");
            }
            let l: Latency = c.worker(&c.client, cpu, &args);
            phase.push(&name, "p50", "µs", l.p50_us as f64);
            phase.push(&name, "p99", "µs", l.p99_us as f64);
            info!(scenario = %name, p50 = l.p50_us, p99 = l.p99_us, errors = l.errors, "done");
        }
        let name = if h2 {
            "l7 HTTP/2, closed loop, h2load -c4 -m1".to_string()
        } else {
            "l7 HTTP/1.1, closed loop, wrk -c4".to_string()
        };
        if !s.wants(&name) {
            continue;
        }
        let before = proxies.waypoint_cpu();
        let url = format!("http://{addr}/");
        let (per_second, requests, errors) = if h2 {
            let h = h2load(c, &url, 4, s.seconds);
            (h.per_second, h.succeeded, h.failed + h.errored)
        } else {
            let w = wrk(c, &url, 4, s.seconds, false);
            (w.per_second, w.requests, w.socket_errors + w.non_2xx)
        };
        phase.push(&name, "requests", "req/s", per_second);
        phase.push(&name, "errors", "count", errors as f64);
        if let Some(m) = proxies.mesh
            && requests > 0
        {
            phase.push(
                &name,
                "waypoint CPU per 1000 req",
                "CPU-ms",
                (proxies.waypoint_cpu() - before) * 1e6 / requests as f64,
            );
            phase.push(&name, "waypoint RSS", "MiB", m.waypoint.rss_kib() as f64 / 1024.0);
        }
        info!(scenario = %name, per_second, errors, "done");
    }
}

/// A mesh-only memory figure: (what, unit, value).
pub type MemoryFigure = (String, String, f64);

/// The names the memory figures are reported under ([`crate::targets`] reads them back).
pub mod label {
    /// RSS, or its anonymous part, of an idle ztunnel: `fresh`, right after start-up; else
    /// as [`super::memory`] reads it, after whatever scenarios ran before.
    pub fn idle(fresh: bool, anonymous: bool, side: &str) -> String {
        let rss = if anonymous { "anonymous RSS" } else { "RSS" };
        let when = if fresh { ", fresh process" } else { "" };
        format!("ztunnel {rss} idle{when} ({side} side)")
    }

    pub fn per_connection(n: usize, side: &str) -> String {
        format!("ztunnel memory per idle connection at {n} ({side} side)")
    }

    pub fn after_close(settle_seconds: u64, anonymous: bool, side: &str) -> String {
        let rss = if anonymous { "anonymous RSS" } else { "RSS" };
        format!("ztunnel {rss} {settle_seconds} s after the connections closed ({side} side)")
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Both ztunnels' RSS and anonymous RSS at idle, after the idle wait; returns their RSS in KiB
/// (client side, server side) with the figures.
fn idle(mesh: &Mesh, fresh: bool) -> ((u64, u64), Vec<MemoryFigure>) {
    std::thread::sleep(IDLE_WAIT);
    let (za, zb) = (&mesh.ztunnel_a, &mesh.ztunnel_b);
    let rss = (za.rss_kib(), zb.rss_kib());
    let mut out = vec![
        (label::idle(fresh, false, "client"), "MiB".to_string(), mib(rss.0)),
        (label::idle(fresh, false, "server"), "MiB".to_string(), mib(rss.1)),
    ];
    for (side, z) in [("client", za), ("server", zb)] {
        out.push((label::idle(fresh, true, side), "MiB".to_string(), mib(z.rss_anon_kib())));
    }
    (rss, out)
}

/// Both ztunnels' memory at idle right after start-up (and the idle wait), before any load:
/// what a node pays for a ztunnel that has not proxied yet. [`memory`] reads idle again after
/// the load scenarios, when the code they ran is resident too.
pub fn fresh_idle(mesh: &Mesh) -> Vec<MemoryFigure> {
    idle(mesh, true).1
}

/// Memory of both ztunnels (node A holds the client side of each connection, node B the
/// server side): idle, holding idle proxied connections, and after they close and the
/// processes settle. RSS counts the pages of the executable the process touched as well as
/// its own allocations; the anonymous part is reported beside it.
pub fn memory(c: &Cluster, s: &Settings, mesh: &Mesh) -> Vec<MemoryFigure> {
    let (za, zb) = (&mesh.ztunnel_a, &mesh.ztunnel_b);
    let (idle, mut out) = idle(mesh, false);
    let echo = format!("{SERVER_IP}:7000");
    for &n in &s.hold_counts {
        let (mut holder, opened) = c.hold(&echo, n);
        assert_eq!(opened, n, "could hold only {opened} of {n} connections through the mesh");
        std::thread::sleep(Duration::from_millis(500));
        let (a, b) = (za.rss_kib(), zb.rss_kib());
        for (side, held, idle) in [("client", a, idle.0), ("server", b, idle.1)] {
            out.push((
                format!("ztunnel RSS with {n} idle connections ({side} side)"),
                "MiB".into(),
                mib(held),
            ));
            out.push((
                label::per_connection(n, side),
                "KiB".into(),
                held.saturating_sub(idle) as f64 / n as f64,
            ));
        }
        holder.close_stdin();
        drop(holder);
        info!(connections = n, client_side_mib = mib(a), server_side_mib = mib(b), "held");
    }
    std::thread::sleep(Duration::from_secs(s.settle_seconds));
    for (side, z) in [("client", za), ("server", zb)] {
        out.push((label::after_close(s.settle_seconds, false, side), "MiB".into(), mib(z.rss_kib())));
        out.push((label::after_close(s.settle_seconds, true, side), "MiB".into(), mib(z.rss_anon_kib())));
    }
    out
}

/// Instructions one proxy process executed for a fixed workload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Instructions {
    pub workload: String,
    pub process: String,
    pub total: f64,
    pub units: u64,
    pub unit: String,
}

/// `callgrind_control <flag> <pid>` (zero or dump), bounded.
pub fn callgrind_control(flag: &str, pid: u32) {
    let out = std::process::Command::new("timeout")
        .args(["120", "callgrind_control", flag, &pid.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("callgrind_control: {e}"));
    assert!(
        out.status.success(),
        "callgrind_control {flag} {pid}: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The instruction total (`Ir`) of the newest dump callgrind wrote for `name` in `dir`.
fn last_dump_total(dir: &std::path::Path, name: &str) -> f64 {
    let prefix = format!("{name}.callgrind");
    let newest = std::fs::read_dir(dir)
        .expect("work dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("no callgrind dump for {name} in {}", dir.display()));
    let text = std::fs::read_to_string(newest.path()).expect("callgrind dump");
    text.lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no totals in {}", newest.path().display()))
}

/// Deterministic companion figures: with the mesh's proxies under callgrind, each fixed
/// workload runs, once to warm up and once counted: between a zeroing (a dump in `startup`
/// mode, which resets the counts too and keeps what warming up ran for the hot text) and a dump
/// of the counters of every proxy on its path.
/// `startup`: first, after the idle wait of the memory figures, dump every proxy's counts of
/// start-up and idle (what [`crate::hot_text`] lists first).
pub fn instructions(
    c: &Cluster,
    s: &Settings,
    mesh: &Mesh,
    dir: &std::path::Path,
    startup: bool,
) -> Vec<Instructions> {
    let smoke = s.seconds <= 1;
    let (conns, requests, mib) = if smoke { (10u64, 50u64, 4u64) } else { (200, 1000, 64) };
    let procs = [
        ("ztunnel A (client side)", &mesh.ztunnel_a, "ztunnel-a"),
        ("ztunnel B (server side)", &mesh.ztunnel_b, "ztunnel-b"),
        ("waypoint", &mesh.waypoint, "waypoint"),
    ];
    let mut out = Vec::new();
    if startup {
        std::thread::sleep(IDLE_WAIT);
        for p in &procs {
            callgrind_control("-d", p.1.pid());
        }
    }
    let mut measure = |workload: &str, unit: &str, units: u64, on_path: &[usize], run: &dyn Fn()| {
        // Warm: pooled connections and certificates are not part of the figure. (A dump resets
        // the counts as zeroing does; the hot text wants what warming ran, so it dumps.)
        run();
        for &i in on_path {
            callgrind_control(if startup { "-d" } else { "-z" }, procs[i].1.pid());
        }
        run();
        for &i in on_path {
            callgrind_control("-d", procs[i].1.pid());
            let total = last_dump_total(dir, procs[i].2);
            info!(workload, process = procs[i].0, total, per_unit = total / units as f64, "instructions");
            out.push(Instructions {
                workload: workload.to_string(),
                process: procs[i].0.to_string(),
                total,
                units,
                unit: unit.to_string(),
            });
        }
    };
    let cpu = c.placement.client;
    let echo = format!("{SERVER_IP}:7000");
    let n = conns.to_string();
    measure("L4: new connection, 1 byte each way (sequential)", "connection", conns, &[0, 1], &|| {
        let ok: usize = c.worker(&c.client, cpu, &["connections", "--addr", &echo, "--count", &n]);
        assert_eq!(ok as u64, conns, "connections through the counted mesh");
    });
    let bytes = format!("{mib}M");
    measure("L4: bulk bytes client -> server (iperf3 -n)", "MiB", mib, &[0, 1], &|| {
        let server = iperf_server(c);
        let out = c.try_exec(
            &c.client,
            cpu,
            "timeout",
            &["300", "iperf3", "-c", SERVER_IP, "-p", "5201", "-n", &bytes],
        );
        drop(server);
        out.unwrap_or_else(|e| panic!("iperf3 -n: {e}"));
    });
    let n = requests.to_string();
    for (label, vip, h1) in [("HTTP/1.1", WEB_H1_VIP, true), ("HTTP/2", WEB_H2_VIP, false)] {
        let url = format!("http://{vip}:80/");
        measure(
            &format!("L7: {label} request through the waypoint (h2load -n, 4 conns)"),
            "request",
            requests,
            &[0, 1, 2],
            &|| {
                let mut args =
                    vec!["300", "h2load", "-t1", "-c4", "-m1", "-n", n.as_str(), "-H", ":authority: web"];
                if h1 {
                    args.push("--h1");
                }
                args.push(url.as_str());
                let out =
                    c.try_exec(&c.client, cpu, "timeout", &args).unwrap_or_else(|e| panic!("h2load -n: {e}"));
                let h = parse_h2load(&out).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(h.succeeded, requests, "requests through the counted mesh: {out}");
            },
        );
    }
    out
}

/// Pairs the two phases into figures.
pub fn figures(direct: &Phase, mesh: &Phase) -> Vec<Figure> {
    mesh.values
        .iter()
        .map(|(scenario, metric, unit, runs)| {
            // The L7 direct runs share the scenario name.
            let d = direct
                .values
                .iter()
                .find(|(s, m, _, _)| s == scenario && m == metric)
                .map(|(_, _, _, r)| Spread::of(r.clone()));
            let m = Spread::of(runs.clone());
            let ratio = d.as_ref().filter(|d| d.median != 0.0).map(|d| m.median / d.median);
            let added = d.as_ref().filter(|_| unit == "µs").map(|d| m.median - d.median);
            Figure {
                scenario: scenario.clone(),
                metric: metric.clone(),
                unit: unit.clone(),
                direct: d,
                mesh: m,
                ratio,
                added,
            }
        })
        .collect()
}

/// What one xDS push costs the mesh state at 1k / 10k / 50k workloads (`state-bench`, run
/// after the mesh has stopped so that nothing else competes for the CPU).
pub fn control_plane(bin_dir: &std::path::Path, smoke: bool) -> anyhow::Result<Vec<mesh_bench::push::Size>> {
    let (sizes, repeats) = if smoke { ("1000", "3") } else { ("1000,10000,50000", "21") };
    let out = std::process::Command::new(bin_dir.join("state-bench"))
        .args(["--workloads", sizes, "--repeats", repeats])
        .output()?;
    anyhow::ensure!(out.status.success(), "state-bench failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("state-bench printed {l:?}: {e}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_ratio() {
        let s = Spread::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of(vec![4.0, 1.0]).median, 2.5);
        let mut d = Phase::default();
        let mut m = Phase::default();
        d.push("x", "p99", "µs", 100.0);
        m.push("x", "p99", "µs", 150.0);
        m.push("x", "cpu", "CPU-s/GB", 1.0);
        let f = figures(&d, &m);
        assert_eq!(f[0].ratio, Some(1.5));
        assert_eq!(f[0].added, Some(50.0));
        assert!(f[1].direct.is_none() && f[1].ratio.is_none());
    }
}
