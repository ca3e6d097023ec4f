//! What a VM runs (deploy/vm): the systemd unit checks with systemd's own verifier and its
//! offline security review, and the example environment file resolves, through the real binary's
//! `config` command, to the host-mode configuration it documents. (The unit's capability set is
//! also the one the host-mode test runs ztunnel under: tests/tests/host.rs.) And an ECS task's
//! ztunnel takes its host addresses from the task metadata endpoint, here an HTTP server on
//! loopback answering the v4 document's documented shape (no ECS agent runs here).

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
    let (ok, out) = run_config(env);
    assert!(ok, "ztunnel config failed: {out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

/// `ztunnel config` with only `env`: whether it succeeded, and its stdout (or stderr).
fn run_config(env: &[(String, String)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztunnel-proc"))
        .arg("config")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run ztunnel config");
    if out.status.success() {
        (true, String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        (false, String::from_utf8_lossy(&out.stderr).into_owned())
    }
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
    assert_eq!(c["dns"]["host_address"], "10.128.0.5", "the host's DNS is answered for its workload");
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

/// Serves one HTTP response with `body` to the first request on a loopback port; returns the
/// port and the request line it got.
fn metadata_server(body: &'static str) -> (u16, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else { return };
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line.trim().to_string());
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).map_or(true, |n| n == 0) || header.trim().is_empty() {
                break;
            }
        }
        let mut out = stream;
        let _ = write!(
            out,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    });
    (port, rx)
}

#[test]
fn an_ecs_tasks_addresses_come_from_its_task_metadata() {
    // The v4 task document of an awsvpc task, as AWS documents its fields.
    let task = r#"{"Cluster": "default", "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/default/abc",
      "Family": "shop", "Containers": [{"Name": "app", "Networks": [{"NetworkMode": "awsvpc",
      "IPv4Addresses": ["10.0.2.106"], "IPv6Addresses": ["2600:1f14::6"]}]}]}"#;
    let (port, request) = metadata_server(task);
    let env: Vec<(String, String)> = [
        ("ECS_CONTAINER_METADATA_URI_V4", format!("http://127.0.0.1:{port}/v4/abc-container")),
        ("ZTUNNEL_HOST_FROM_ECS_METADATA", "true".into()),
        ("XDS_ADDRESS", "https://istiod.istio-system.svc:15012".into()),
        ("ZTUNNEL_HOST_CGROUP", "/sys/fs/cgroup".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let c = resolved(&env);
    assert_eq!(
        request.recv_timeout(std::time::Duration::from_secs(5)).expect("asked"),
        "GET /v4/abc-container/task HTTP/1.1"
    );
    assert_eq!(
        c["host"]["addresses"],
        serde_json::json!([{"ip": "10.0.2.106", "iface": null}, {"ip": "2600:1f14::6", "iface": null}]),
        "the task's addresses, on the interface carrying them (found at start): {c}"
    );
    assert_eq!(c["redirect"], true);
    assert_eq!(
        c["redirect_settings"]["pin_dir"], "/sys/fs/bpf/ambient-ztunnel-abc",
        "tasks sharing an instance's bpffs pin apart"
    );
    assert_eq!(c["dns"]["addr"], "127.0.0.1:15053", "the DNS proxy on loopback only: {c}");

    // No metadata endpoint: ztunnel does not start (it would not know what to capture).
    let mut missing = env.clone();
    missing.retain(|(k, _)| k != "ECS_CONTAINER_METADATA_URI_V4");
    let (ok, said) = run_config(&missing);
    assert!(!ok && said.contains("ECS_CONTAINER_METADATA_URI_V4 is not set"), "{said}");
    let (ok, said) = run_config(&[
        env[1].clone(),
        ("ECS_CONTAINER_METADATA_URI_V4".into(), "http://127.0.0.1:1/v4/x".into()),
    ]);
    assert!(!ok && said.contains("/v4/x/task"), "{said}");
}
