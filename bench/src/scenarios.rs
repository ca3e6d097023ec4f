//! The scenarios, each run the same way directly (no mesh) and through the mesh, repeated, with
//! min/median/max and the mesh/direct ratio of the medians.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use tracing::info;

use crate::load::{Churn, HttpLoad, Latency};
use crate::topology::{Cluster, Mesh, SERVER_IP, WEB_H1_VIP, WEB_H2_VIP};

/// How long and how often.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub seconds: u64,
    pub repeats: usize,
    /// Idle connections held for the memory figures.
    pub hold_counts: Vec<usize>,
    /// Wait after load before the last memory reading.
    pub settle_seconds: u64,
    pub l7_rate: u64,
}

impl Settings {
    pub fn full() -> Self {
        Self { seconds: 5, repeats: 3, hold_counts: vec![1000, 10_000], settle_seconds: 60, l7_rate: 500 }
    }

    pub fn smoke() -> Self {
        Self { seconds: 1, repeats: 1, hold_counts: vec![10, 50], settle_seconds: 1, l7_rate: 100 }
    }
}

/// Min, median and max of repeated runs.
#[derive(Clone, Debug, Default, Serialize)]
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
#[derive(Clone, Debug, Serialize)]
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

/// One iperf3 test against a fresh one-off server (`-s -1`), so that a test that goes wrong
/// cannot leave the server stuck for the next. Bounded by `timeout`; retried once.
fn iperf(c: &Cluster, streams: usize, reverse: bool, seconds: u64) -> (f64, f64) {
    let (p, t) = (streams.to_string(), seconds.to_string());
    let limit = (seconds + 20).to_string();
    for attempt in 1..=2 {
        let server = c.spawn(
            "iperf3-server",
            &c.server,
            c.placement.server,
            std::path::Path::new("iperf3"),
            &["-s", "-1", "-p", "5201"],
        );
        std::thread::sleep(Duration::from_millis(200));
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

/// Runs every scenario once (one repeat) in the current mode.
pub fn run_once(c: &Cluster, s: &Settings, proxies: &Proxies<'_>, phase: &mut Phase) {
    let secs = s.seconds.to_string();
    let cpu = c.placement.client;

    // 1. L4 throughput.
    for (streams, reverse) in [(1, false), (1, true), (4, false), (4, true)] {
        let name = format!(
            "l4 throughput, {streams} stream{}, {}",
            if streams > 1 { "s" } else { "" },
            if reverse { "server -> client" } else { "client -> server" }
        );
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

    // 2. L4 latency at fixed rates.
    let echo = format!("{SERVER_IP}:7000");
    for size in [64usize, 1024] {
        for (rate, conns) in [(1000u64, 4usize), (5000, 16)] {
            let name = format!("l4 latency, {size} B, {rate} req/s over {conns} conns");
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

    // 3. Connection churn.
    let ch: Churn =
        c.worker(&c.client, cpu, &["churn", "--addr", &echo, "--concurrency", "8", "--seconds", &secs]);
    phase.push("l4 connection churn, 8 workers", "new connections", "conn/s", ch.per_second);
    info!(per_second = ch.per_second, errors = ch.errors, "churn done");

    // 5. L7 (the waypoint's part): direct to the pod, or through ztunnel -> waypoint -> ztunnel.
    let rate = s.l7_rate.to_string();
    for (label, h2, vip) in [("HTTP/1.1", false, WEB_H1_VIP), ("HTTP/2", true, WEB_H2_VIP)] {
        let addr = if proxies.mesh.is_some() { format!("{vip}:80") } else { format!("{SERVER_IP}:8080") };
        let name = format!("l7 {label}, {rate} req/s over 4 conns");
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
        let before = proxies.waypoint_cpu();
        let h: HttpLoad = c.worker(&c.client, cpu, &args);
        phase.push(&name, "p50", "µs", h.latency.p50_us as f64);
        phase.push(&name, "p99", "µs", h.latency.p99_us as f64);
        phase.push(&format!("l7 {label}, closed loop over 4 conns"), "requests", "req/s", h.max_rps);
        if let Some(m) = proxies.mesh {
            let requests = h.latency.count as f64 + h.max_rps * s.seconds as f64;
            if requests > 0.0 {
                phase.push(
                    &name,
                    "waypoint CPU per 1000 req",
                    "CPU-ms",
                    (proxies.waypoint_cpu() - before) * 1e6 / requests,
                );
            }
            phase.push(&name, "waypoint RSS", "MiB", m.waypoint.rss_kib() as f64 / 1024.0);
        }
        info!(scenario = %name, p99 = h.latency.p99_us, max_rps = h.max_rps, errors = h.latency.errors, "done");
    }
}

/// Memory of ztunnel (node A, the client side) idle, holding idle proxied connections, and
/// after they close and the process settles.
pub fn memory(c: &Cluster, s: &Settings, mesh: &Mesh) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    let idle = mesh.ztunnel_a.rss_kib() as f64;
    out.push(("ztunnel RSS idle".to_string(), "MiB".to_string(), idle / 1024.0));
    let echo = format!("{SERVER_IP}:7000");
    for &n in &s.hold_counts {
        let (mut holder, opened) = c.hold(&echo, n);
        assert_eq!(opened, n, "could hold only {opened} of {n} connections through the mesh");
        std::thread::sleep(Duration::from_millis(500));
        let (a, b) = (mesh.ztunnel_a.rss_kib() as f64, mesh.ztunnel_b.rss_kib() as f64);
        out.push((format!("ztunnel RSS with {n} idle connections (client side)"), "MiB".into(), a / 1024.0));
        out.push((format!("ztunnel RSS with {n} idle connections (server side)"), "MiB".into(), b / 1024.0));
        out.push((
            format!("ztunnel memory per idle connection at {n} (client side)"),
            "KiB".into(),
            (a - idle) / n as f64,
        ));
        holder.close_stdin();
        drop(holder);
        info!(connections = n, client_side_mib = a / 1024.0, server_side_mib = b / 1024.0, "held");
    }
    std::thread::sleep(Duration::from_secs(s.settle_seconds));
    out.push((
        format!("ztunnel RSS {} s after the load stopped", s.settle_seconds),
        "MiB".into(),
        mesh.ztunnel_a.rss_kib() as f64 / 1024.0,
    ));
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
