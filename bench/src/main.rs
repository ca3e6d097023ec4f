//! mesh-bench: the benchmark runner (`run`) and the workers it starts inside pods.
//!
//! `run` builds two nodes and pods in network namespaces, measures every scenario directly and
//! through the mesh in the same run, and writes a Markdown + JSON report. See benches/run.sh.

mod hot_text;
mod load;
mod report;
mod scenarios;
mod targets;
mod tools;
mod topology;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use tracing::info;

use scenarios::{Phase, Proxies, Settings};
use topology::{Cluster, Mesh, Placement};

#[derive(Debug, Parser)]
#[command(about = "Benchmarks of the mesh against no mesh, in network namespaces")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every scenario, direct and through the mesh, and write the report (root).
    Run {
        /// Where ztunnel, waypoint, xds-server and mesh-bench are.
        #[arg(long, default_value = "target/release")]
        bin_dir: PathBuf,
        /// Report directory.
        #[arg(long, default_value = "benches/results")]
        out: PathBuf,
        /// A few seconds of everything (CI's check that the runner works).
        #[arg(long)]
        smoke: bool,
        /// Only the scenarios whose name contains this (repeatable); memory figures are
        /// measured only when none is given or one matches "memory".
        #[arg(long)]
        only: Vec<String>,
        /// After the mesh has started and warmed up, create this file and wait until it is
        /// removed (time to profile the running mesh by hand: the log names the namespaces).
        #[arg(long)]
        pause_file: Option<PathBuf>,
        /// Keep the callgrind dumps of the instruction counts here (for callgrind_annotate)
        /// instead of in the run's temporary directory.
        #[arg(long)]
        callgrind_dir: Option<PathBuf>,
        /// After the instruction counts, write `<DIR>/ztunnel/hot-text.ld` and
        /// `<DIR>/waypoint/hot-text.ld` (DIR: the repository) from the functions the proxies ran,
        /// start-up first: the link order of their release builds (bench/src/hot_text.rs).
        #[arg(long)]
        hot_text: Option<PathBuf>,
    },
    /// Print a report's section against issue 19's targets, from the report's JSON (for
    /// reports written before the runner added it).
    Judge {
        /// `<date>-<commit>.json` from `run`.
        report: PathBuf,
    },
    /// Echo server (request/response and churn).
    EchoServer {
        #[arg(long)]
        port: u16,
    },
    /// Fixed-rate request/response client.
    Rr {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        seconds: u64,
    },
    /// Exactly `count` sequential connections (one byte each way); prints how many succeeded.
    Connections {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Hold idle connections until stdin closes.
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
    },
    /// Fixed-rate HTTP GETs.
    Http {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        authority: String,
        #[arg(long)]
        rate: u64,
        #[arg(long)]
        conns: usize,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        h2: bool,
    },
}

/// Open-file limit for the runner and everything it starts (10k proxied connections).
const NOFILE: u64 = 262_144;

#[allow(clippy::print_stdout)]
fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string(v).unwrap_or_default());
}

#[allow(clippy::print_stdout)]
fn print_text(text: &str) {
    print!("{text}");
}

fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, NOFILE, NOFILE);
    match args.command {
        Command::Run { bin_dir, out, smoke, only, pause_file, callgrind_dir, hot_text } => {
            common::telemetry::init(common::telemetry::LogFormat::Text);
            let result = run(bin_dir, out, smoke, only, pause_file, callgrind_dir, hot_text);
            common::telemetry::flush();
            result?;
        }
        Command::Judge { report } => {
            let json = std::fs::read_to_string(&report)?;
            let report: report::Report = serde_json::from_str(&json)?;
            print_text(&targets::markdown(&report));
        }
        Command::EchoServer { port } => runtime().block_on(load::echo_server(port))?,
        Command::Rr { addr, rate, conns, size, seconds } => {
            let l = runtime().block_on(load::request_response(
                addr,
                rate,
                conns,
                size,
                Duration::from_secs(seconds),
            ));
            print_json(&l);
        }
        Command::Connections { addr, count } => {
            print_json(&runtime().block_on(load::connections(addr, count)));
        }
        Command::Hold { addr, count } => {
            runtime().block_on(load::hold(addr, count));
        }
        Command::Http { addr, authority, rate, conns, seconds, h2 } => {
            let h = runtime().block_on(load::http_load(
                addr,
                authority,
                h2,
                rate,
                conns,
                Duration::from_secs(seconds),
            ));
            print_json(&h);
        }
    }
    Ok(())
}

fn commit() -> String {
    let out = std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output();
    out.ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn run(
    bin_dir: PathBuf,
    out: PathBuf,
    smoke: bool,
    only: Vec<String>,
    pause_file: Option<PathBuf>,
    callgrind_dir: Option<PathBuf>,
    hot_text: Option<PathBuf>,
) -> anyhow::Result<()> {
    mesh_tests::netns::require_root("the benchmark runner");
    for tool in ["iperf3", "taskset", "curl", "wrk", "h2load", "nginx", "valgrind", "callgrind_control"] {
        let found = std::process::Command::new("sh").args(["-c", &format!("command -v {tool}")]).output();
        anyhow::ensure!(
            found.is_ok_and(|o| o.status.success()),
            "{tool} is needed (benches/run.sh installs it)"
        );
    }
    for bin in ["ztunnel", "waypoint", "xds-server", "mesh-bench", "state-bench"] {
        anyhow::ensure!(
            bin_dir.join(bin).exists(),
            "{} is missing: build it first",
            bin_dir.join(bin).display()
        );
    }
    let started = Instant::now();
    let settings = Settings { only, ..if smoke { Settings::smoke() } else { Settings::full() } };
    if let Some(repo) = &hot_text {
        hot_text::check(repo, settings.wants("instructions"))?;
    }
    let work = tempfile::tempdir()?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let placement = Placement::for_cpus(cpus);
    let cluster = Cluster::build(&bin_dir, placement.clone(), work.path());
    let _servers = cluster.servers();
    std::thread::sleep(Duration::from_millis(300));

    let mut direct = Phase::default();
    for r in 0..settings.repeats {
        info!(repeat = r + 1, of = settings.repeats, "direct");
        scenarios::run_once(&cluster, &settings, &Proxies { mesh: None }, &mut direct);
    }
    let mesh_procs = Mesh::start(&cluster);
    let fresh = if settings.wants("memory") { scenarios::fresh_idle(&mesh_procs) } else { Vec::new() };
    // Warm up: certificates, pooled HBONE connections, waypoint upstreams.
    let warm = Settings { seconds: 1, repeats: 1, ..settings.clone() };
    scenarios::run_once(&cluster, &warm, &Proxies { mesh: Some(&mesh_procs) }, &mut Phase::default());
    if let Some(pause) = &pause_file {
        std::fs::write(pause, "remove this file to go on\n")?;
        info!(
            file = %pause.display(),
            client = %cluster.client.name,
            server = %cluster.server.name,
            node_a = %cluster.node_a.name,
            node_b = %cluster.node_b.name,
            ztunnel_a = mesh_procs.ztunnel_a.pid(),
            ztunnel_b = mesh_procs.ztunnel_b.pid(),
            waypoint = mesh_procs.waypoint.pid(),
            "paused: the mesh is up; remove the file to go on"
        );
        while pause.exists() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let mut mesh = Phase::default();
    for r in 0..settings.repeats {
        info!(repeat = r + 1, of = settings.repeats, "mesh");
        scenarios::run_once(&cluster, &settings, &Proxies { mesh: Some(&mesh_procs) }, &mut mesh);
    }
    let memory = if settings.wants("memory") {
        fresh.into_iter().chain(scenarios::memory(&cluster, &settings, &mesh_procs)).collect()
    } else {
        Vec::new()
    };
    mesh_procs.stop(&cluster);
    let mut hot_text_written = None;
    let instructions = if settings.wants("instructions") {
        info!("instruction counts: the mesh again, under valgrind --tool=callgrind");
        let dir = callgrind_dir.unwrap_or_else(|| work.path().to_path_buf());
        std::fs::create_dir_all(&dir)?;
        if hot_text.is_some() {
            hot_text::clear_dumps(&dir)?;
        }
        let counting = Mesh::start_counting(&cluster, &dir, hot_text.is_some());
        let counts = scenarios::instructions(&cluster, &settings, &counting, &dir, hot_text.is_some());
        if let Some(repo) = &hot_text {
            // Written after the report, so that a failure here does not lose the run.
            hot_text_written = Some(list_hot_text(&cluster, &counting, &dir, &bin_dir, repo));
        }
        counting.stop(&cluster);
        counts
    } else {
        Vec::new()
    };

    let control_plane = if settings.wants("control plane") {
        info!("control plane: one push into the mesh state (state-bench)");
        scenarios::control_plane(&bin_dir, smoke)?
    } else {
        Vec::new()
    };

    let date = common_date();
    let report = report::Report {
        date,
        commit: commit(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: report::Machine::read(),
        placement,
        settings,
        figures: scenarios::figures(&direct, &mesh),
        memory,
        instructions,
        control_plane,
        duration_seconds: started.elapsed().as_secs_f64(),
    };
    let path = report.write(&out)?;
    info!(report = %path.display(), seconds = report.duration_seconds, "report written");
    hot_text_written.unwrap_or(Ok(()))
}

/// After the instruction counts, with the mesh still under callgrind: every scenario once,
/// briefly, for the code paths the fixed workloads leave out (concurrent connections, several
/// streams, pooled HBONE connections, more than one HBONE connection per peer when holding
/// 250), a dump, and the hot-text linker scripts written from all the dumps.
fn list_hot_text(
    cluster: &Cluster,
    counting: &Mesh,
    dir: &std::path::Path,
    bin_dir: &std::path::Path,
    repo: &std::path::Path,
) -> anyhow::Result<()> {
    info!("hot text: every scenario once more, under callgrind");
    let brief = Settings { only: Vec::new(), hold_counts: vec![250], ..Settings::smoke() };
    scenarios::run_once(cluster, &brief, &Proxies { mesh: Some(counting) }, &mut Phase::default());
    scenarios::memory(cluster, &brief, counting);
    counting.dump_counts();
    hot_text::write(dir, bin_dir, repo)
}

/// Today as `YYYY-MM-DDTHH:MM:SSZ`.
fn common_date() -> String {
    let format =
        time::format_description::parse_borrowed::<2>("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    match format {
        Ok(f) => time::OffsetDateTime::now_utc().format(&f).unwrap_or_default(),
        Err(_) => "unknown".into(),
    }
}
