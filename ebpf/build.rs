//! Compiles the C programs under `bpf/` with clang into `$OUT_DIR`, to be embedded in the crate.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

const PROGRAMS: &[&str] = &["redirect", "host"];

/// The libbpf header the programs include; its absence means libbpf-dev is not installed.
const BPF_HELPERS: &str = "/usr/include/bpf/bpf_helpers.h";

/// The one line a machine without the eBPF toolchain gets, naming the script that installs it.
const MISSING: &str = "ebpf: clang/libbpf-dev missing; run ./deploy/setup.sh (as root)";

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    println!("cargo:rerun-if-changed={BPF_HELPERS}");
    let clang_runs = Command::new(&clang)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !clang_runs || !Path::new(BPF_HELPERS).exists() {
        missing_toolchain();
    }
    for name in PROGRAMS {
        let src = format!("bpf/{name}.c");
        println!("cargo:rerun-if-changed={src}");
        let obj = out.join(format!("{name}.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
            .arg(format!("-I/usr/include/{arch}-linux-gnu"))
            .args(["-c", &src, "-o"])
            .arg(&obj)
            .status()
            .with_context(|| format!("running {clang}"))?;
        if !status.success() {
            bail!("{clang} failed to compile {src}: {status}");
        }
    }
    Ok(())
}

/// Stops the build with one line naming the set-up script. Not an anyhow error: with
/// `RUST_BACKTRACE` set, that would print a backtrace under the line.
#[expect(clippy::print_stderr, reason = "a build script's stderr is what cargo shows on failure")]
fn missing_toolchain() -> ! {
    println!("cargo:warning={MISSING}");
    eprintln!("{MISSING}");
    std::process::exit(1)
}
