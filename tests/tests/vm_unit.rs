//! What a VM runs (deploy/vm): the systemd unit checks with systemd's own verifier and its
//! offline security review, and the example environment file resolves, through the real binary's
//! `config` command, to the host-mode configuration it documents. (The unit's capability set is
//! also the one the host-mode test runs ztunnel under: tests/tests/host.rs.)

use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(file: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/vm").join(file);
    std::fs::canonicalize(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The KEY=VALUE lines of an environment file (comments and blank lines skipped).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// `ztunnel config` with only `env` as its environment: the resolved configuration.
fn resolved(env: &[(String, String)]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-proc"))
        .arg("config")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run ztunnel config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ztunnel config failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stderr}"))
}

#[test]
fn the_example_environment_file_is_host_mode_on_istiod() {
    let env = env_file(&std::fs::read_to_string(deploy("ztunnel.env")).expect("ztunnel.env"));
    let c = resolved(&env);
    assert_eq!(c["host"]["addresses"], serde_json::json!([{"ip": "10.128.0.5", "iface": "eth0"}]), "{c}");
    assert_eq!(c["redirect"], true, "host mode captures");
    assert_eq!(c["inbound_bypass_ports"], serde_json::json!([22]));
    assert_eq!(c["node_name"], "vm-1");
    assert_eq!(c["log_format"], "json", "JSON lines for the journal");
    assert_eq!(c["ca"]["istio"]["address"], "https://istiod.istio-system.svc:15012", "{c}");
    assert_eq!(c["source_description"], "xds https://istiod.istio-system.svc:15012");
    assert_eq!(c["dns"], serde_json::Value::Null);
    assert_eq!(c["redirect_settings"]["pin_dir"], "/sys/fs/bpf/ambient-ztunnel");
    // Certificates from files instead: the commented alternative.
    let mut files = env.clone();
    files.push(("CERT_DIR".into(), "/etc/certs".into()));
    assert_eq!(resolved(&files)["ca"], serde_json::json!({"files": {"dir": "/etc/certs"}}));
}

#[test]
fn the_unit_passes_systemds_verifier_and_security_review() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = std::fs::read_to_string(deploy("ztunnel.service")).expect("ztunnel.service");
    // The installed paths, pointed at this build and this checkout so the verifier finds them.
    let unit = unit
        .replace("ExecStart=/usr/bin/ztunnel", &format!("ExecStart={}", env!("CARGO_BIN_EXE_ztunnel-proc")))
        .replace("/etc/ztunnel/ztunnel.env", deploy("ztunnel.env").to_str().expect("path"));
    let path = dir.path().join("ztunnel.service");
    std::fs::write(&path, unit).expect("unit");
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze (deploy/setup.sh installs systemd): {e}"));
    let said = String::from_utf8_lossy(&verify.stderr).to_string() + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");

    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&security.stdout);
    let exposure: f64 = text
        .lines()
        .find_map(|l| l.split("Overall exposure level for ztunnel.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    // systemd rates 0 (locked down) to 10; under 3 is "OK". A root service holding eBPF and
    // network administration cannot get much lower.
    assert!(exposure <= 3.0, "exposure {exposure}:\n{text}");
}
