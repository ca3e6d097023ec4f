//! The report: JSON (everything, raw runs included) and Markdown (the tables people read),
//! with the machine, the commit, the CPU placement and the command that produced it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scenarios::{Figure, Settings};
use crate::topology::Placement;

#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let kernel =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        Self {
            cpu,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_gib: kib / 1048576.0,
            kernel,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub commit: String,
    pub command: String,
    pub machine: Machine,
    pub placement: Placement,
    pub settings: Settings,
    pub figures: Vec<Figure>,
    /// Mesh-only memory figures: (what, unit, value).
    pub memory: Vec<(String, String, f64)>,
    /// Deterministic companions: instructions per unit of work, counted by callgrind.
    pub instructions: Vec<crate::scenarios::Instructions>,
    /// What one xDS push costs the mesh state, by mesh size (`state-bench`).
    pub control_plane: Vec<mesh_bench::push::Size>,
    pub duration_seconds: f64,
}

pub(crate) fn num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmark report: {} ({})\n", self.date, self.commit);
        let _ = writeln!(md, "Command: `{}`  ", self.command);
        let m = &self.machine;
        let _ = writeln!(
            md,
            "Machine: {} CPU(s), {}, {:.0} GiB, kernel {}  ",
            m.cpus, m.cpu, m.memory_gib, m.kernel
        );
        let p = &self.placement;
        let _ = writeln!(
            md,
            "CPU placement (the same for direct and mesh runs): client {}, server {}, ztunnel node A {}, ztunnel node B {}, waypoint {}, control plane {}  ",
            p.client, p.server, p.ztunnel_a, p.ztunnel_b, p.waypoint, p.control_plane
        );
        let s = &self.settings;
        let _ = writeln!(
            md,
            "Each figure: {} run(s) of {} s; min / median / max; ratio = mesh median / direct median. Took {:.0} s.\n",
            s.repeats, s.seconds, self.duration_seconds
        );
        let _ = writeln!(
            md,
            "Direct = client pod -> node A -> link -> node B -> server pod, no mesh. Mesh = the same path with eBPF capture, ztunnel A -> HBONE/mTLS -> ztunnel B (L4), and for L7 ztunnel A -> waypoint -> ztunnel B.\n"
        );
        let _ = writeln!(
            md,
            "Generators: iperf3 (throughput), wrk against nginx (churn with `Connection: close`, and HTTP/1.1 closed loop), h2load against nginx (HTTP/2 closed loop), our open-loop generator (fixed-rate latency, where a standard tool with a fixed open-loop rate is not packaged). Each runs the same way direct and through the mesh, so the direct column is the generator's own ceiling on this path: a mesh figure near it could be held down by the generator, not the mesh; such figures are listed under the table.\n"
        );
        let _ = writeln!(
            md,
            "| scenario | metric | direct (min / median / max) | mesh (min / median / max) | mesh/direct | added |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for f in &self.figures {
            let spread = |s: &crate::scenarios::Spread| {
                format!("{} / **{}** / {} {}", num(s.min), num(s.median), num(s.max), f.unit)
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                f.scenario,
                f.metric,
                f.direct.as_ref().map_or("-".to_string(), spread),
                spread(&f.mesh),
                f.ratio.map_or("-".to_string(), |r| format!("{r:.2}x")),
                f.added.map_or("-".to_string(), |a| format!("{} {}", num(a), f.unit)),
            );
        }
        let near: Vec<String> = self
            .figures
            .iter()
            // Fixed-rate scenarios' "achieved rate" is set by the schedule, not a ceiling.
            .filter(|f| f.metric != "achieved rate")
            .filter(|f| {
                matches!(f.unit.as_str(), "conn/s" | "req/s" | "Gbit/s") && f.ratio.is_some_and(|r| r >= 0.9)
            })
            .map(|f| format!("{} ({})", f.scenario, f.metric))
            .collect();
        if near.is_empty() {
            let _ = writeln!(md, "\nNo rate figure of the mesh came within 10% of its direct ceiling.");
        } else {
            let _ = writeln!(
                md,
                "\nWithin 10% of the generator's direct ceiling (may be generator-bound): {}.",
                near.join("; ")
            );
        }
        let _ = writeln!(md, "\n## Memory (ztunnel, mesh only)\n");
        let _ = writeln!(md, "| figure | value |");
        let _ = writeln!(md, "|---|---|");
        for (what, unit, v) in &self.memory {
            let _ = writeln!(md, "| {what} | {} {unit} |", num(*v));
        }
        if !self.instructions.is_empty() {
            let _ = writeln!(
                md,
                "\n## Instructions (deterministic companion figures)\n\nCounted by `valgrind --tool=callgrind` in each proxy process over a fixed workload (counters zeroed before it, dumped after), so they do not depend on machine noise: compare them between reports to see a regression. This machine's hypervisor exposes no hardware counters to `perf stat`.\n"
            );
            let _ = writeln!(md, "| workload | process | instructions | per unit |");
            let _ = writeln!(md, "|---|---|---|---|");
            for i in &self.instructions {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.0} per {} |",
                    i.workload,
                    i.process,
                    i.total,
                    i.total / i.units.max(1) as f64,
                    i.unit
                );
            }
        }
        if !self.control_plane.is_empty() {
            let _ = writeln!(
                md,
                "\n## Control plane: one push into the mesh state\n\n`state-bench` feeds the state the way the xDS client does (encoded `istio.workload.Address` / `istio.security.Authorization` through the registered handlers, decoding included): a mesh of N workloads (a service per 10, 100 namespaces with a namespace policy each, a global policy, a selector policy per service), then single-resource pushes. Time: median of the pushes (machine noise applies). Allocations: jemalloc's own count of allocation requests per push, which does not depend on machine noise.\n"
            );
            let _ = writeln!(md, "| workloads | push | median time | allocations | bytes allocated |");
            let _ = writeln!(md, "|---|---|---|---|---|");
            for size in &self.control_plane {
                let _ = writeln!(
                    md,
                    "| {} | whole mesh at once ({} services, {} policies) | {} ms | {} | - |",
                    size.workloads,
                    size.services,
                    size.policies,
                    num(size.load_ms),
                    size.load_allocations
                );
                for p in &size.pushes {
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} µs | {} | {} KiB |",
                        size.workloads,
                        p.kind,
                        num(p.median_us),
                        p.allocations,
                        num(p.alloc_bytes as f64 / 1024.0)
                    );
                }
            }
        }
        md.push_str(&crate::targets::markdown(self));
        md
    }

    /// A report with nothing measured, for tests to fill in.
    #[cfg(test)]
    pub fn empty_for_tests() -> Self {
        Self {
            date: "2026-01-01T00:00:00Z".into(),
            commit: "0000000".into(),
            command: "test".into(),
            machine: Machine { cpu: "test".into(), cpus: 2, memory_gib: 1.0, kernel: "test".into() },
            placement: Placement::for_cpus(2),
            settings: Settings {
                seconds: 1,
                repeats: 1,
                hold_counts: vec![],
                settle_seconds: 0,
                l7_rate: 0,
                only: vec![],
            },
            figures: vec![],
            memory: vec![],
            instructions: vec![],
            control_plane: vec![],
            duration_seconds: 0.0,
        }
    }

    /// Writes `<dir>/<date>-<commit>.{json,md}`; returns the Markdown path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let stem = format!("{}-{}", &self.date[..10.min(self.date.len())], self.commit);
        std::fs::write(
            dir.join(format!("{stem}.json")),
            serde_json::to_string_pretty(self).unwrap_or_default(),
        )?;
        let md = dir.join(format!("{stem}.md"));
        std::fs::write(&md, self.markdown())?;
        Ok(md)
    }
}
