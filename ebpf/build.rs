//! Compiles the C programs under `bpf/` with clang into `$OUT_DIR`, to be embedded in the crate.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};

const PROGRAMS: &[&str] = &["redirect"];

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR")?);
    let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
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
            .with_context(|| {
                format!("running {clang} (install clang, llvm and libbpf-dev to build the eBPF programs)")
            })?;
        if !status.success() {
            bail!("{clang} failed to compile {src}: {status}");
        }
    }
    Ok(())
}
