//! The process: with an `install` or `uninstall` subcommand it manages the plugin on the node
//! (the DaemonSet's job); without one it is the CNI plugin the runtime executes, reading
//! `CNI_*` from the environment and the configuration from stdin.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::conf::{DEFAULT_SOCKET, Invocation};
use crate::error::{CniError, Code};
use crate::install::{self, Install};
use crate::plugin;

/// How often `install --watch` re-checks, unless told.
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// The most configuration read from stdin.
const MAX_STDIN: u64 = 1024 * 1024;

/// `ambient-cni install|uninstall ...`; with no arguments, the CNI plugin.
#[derive(Debug, Parser)]
#[command(
    name = "ambient-cni",
    version,
    about = "Chained CNI plugin enrolling new pods with the node's ztunnel"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copies this binary into the CNI bin directory and appends the plugin to the runtime's
    /// network configuration (idempotent).
    Install {
        /// The CNI bin directory (as the host's `/opt/cni/bin` is mounted here).
        #[arg(long)]
        bin_dir: PathBuf,
        /// The CNI configuration directory (the host's `/etc/cni/net.d`).
        #[arg(long)]
        conf_dir: PathBuf,
        /// ztunnel's enrollment socket, as the plugin (on the host) sees it.
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Namespaces whose pods are passed through without asking ztunnel.
        #[arg(long, value_delimiter = ',', default_value = "kube-system")]
        exclude_namespaces: Vec<String>,
        /// Keep running, re-installing when the primary CNI rewrites its configuration.
        #[arg(long)]
        watch: bool,
        /// Seconds between checks with `--watch`.
        #[arg(long, default_value_t = DEFAULT_WATCH_INTERVAL.as_secs())]
        interval_seconds: u64,
    },
    /// Removes the plugin from every conflist of the configuration directory, and its binary.
    Uninstall {
        #[arg(long)]
        bin_dir: PathBuf,
        #[arg(long)]
        conf_dir: PathBuf,
    },
}

/// Runs the process with `args` (including the program name) and returns its exit code.
pub fn main(args: Vec<OsString>) -> i32 {
    if args.len() <= 1 {
        return cni();
    }
    let parsed = match Args::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match parsed.command {
        Command::Install { bin_dir, conf_dir, socket, exclude_namespaces, watch, interval_seconds } => {
            let binary = match std::env::current_exe() {
                Ok(b) => b,
                Err(e) => return fail(&format!("install: cannot find its own binary: {e}")),
            };
            let install = Install { binary, bin_dir, conf_dir, socket, exclude_namespaces };
            if watch {
                watch_forever(&install, Duration::from_secs(interval_seconds.max(1)));
            }
            match install.run() {
                Ok(done) => say(&format!("installed: {done:?}")),
                Err(e) => fail(&format!("install: {e}")),
            }
        }
        Command::Uninstall { bin_dir, conf_dir } => match install::uninstall(&bin_dir, &conf_dir) {
            Ok(removed) => say(&format!("uninstalled: {removed:?}")),
            Err(e) => fail(&format!("uninstall: {e}")),
        },
    }
}

/// Logs `line` on stderr; exit code 0.
fn say(line: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "ambient-cni {line}");
    0
}

/// Logs `line` on stderr; exit code 1.
fn fail(line: &str) -> i32 {
    say(line);
    1
}

/// Installs, then re-checks every `interval` for as long as the process runs; failures (no
/// network configuration yet, say) are logged once each and retried.
fn watch_forever(install: &Install, interval: Duration) -> ! {
    let mut last_error = String::new();
    loop {
        match install.run() {
            Ok(done) => {
                if done.binary || done.config {
                    say(&format!("installed: {done:?}"));
                }
                last_error.clear();
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    say(&format!("install: {text}; retrying every {}s", interval.as_secs()));
                    last_error = text;
                }
            }
        }
        std::thread::sleep(interval);
    }
}

/// One CNI invocation: the result (or error) on stdout, the exit code returned.
fn cni() -> i32 {
    let mut invocation = Invocation::from_env(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin) {
        invocation = Err(CniError::new(Code::Io, "cannot read stdin", e.to_string()));
    }
    let outcome = plugin::run(invocation, &stdin, &mut std::io::stderr());
    let mut out = std::io::stdout();
    if !outcome.stdout.is_empty()
        && (out.write_all(outcome.stdout.as_bytes()).is_err() || out.flush().is_err())
    {
        return 1;
    }
    outcome.exit_code
}
