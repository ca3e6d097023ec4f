//! The CNI commands. As a chained plugin this one changes nothing in the pod's network: on
//! ADD it hands the pod (namespace, name, sandbox, addresses, host interface) to the node's
//! ztunnel and passes the previous result on unchanged, or fails the ADD when ztunnel refuses
//! or cannot be reached (fail closed: the runtime retries the sandbox). DEL tells ztunnel and
//! never fails; CHECK asks ztunnel whether the pod is enrolled as its labels say.
//!
//! Pods of excluded namespaces, and containers without Kubernetes pod arguments, are passed
//! through without asking ztunnel.

use std::io::Write;
use std::path::Path;

use crate::conf::{CniCommand, Invocation, NetConf, SUPPORTED_VERSIONS};
use crate::error::{CniError, Code};
use crate::peer;
use crate::protocol::{self, Command, ExchangeError, Reply, Request};
use crate::result::PrevResult;

/// The version errors are reported in when the configuration does not say.
const FALLBACK_VERSION: &str = "1.0.0";

/// What one invocation printed and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

/// Runs one CNI command: `invocation` from the environment, the network configuration on
/// `stdin`; progress and problems go to `log` (the runtime's log of the plugin's stderr).
pub fn run(invocation: Result<Invocation, CniError>, stdin: &[u8], log: &mut dyn Write) -> Outcome {
    let version = cni_version(stdin);
    let result = invocation.and_then(|inv| execute(&inv, stdin, log));
    match result {
        Ok(stdout) => Outcome { stdout, exit_code: 0 },
        Err(e) => {
            let _ = writeln!(log, "ambient-cni: {e}");
            Outcome { stdout: e.to_json(&version), exit_code: 1 }
        }
    }
}

/// The configuration's `cniVersion` when it has a supported one.
fn cni_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(|v| v.as_str()).map(String::from))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| FALLBACK_VERSION.to_string())
}

fn execute(inv: &Invocation, stdin: &[u8], log: &mut dyn Write) -> Result<String, CniError> {
    match inv.command {
        CniCommand::Version => Ok(version()),
        CniCommand::Add => add(inv, &NetConf::parse(stdin)?, log),
        CniCommand::Check => check(inv, &NetConf::parse(stdin)?, log).map(|()| String::new()),
        CniCommand::Del => {
            del(inv, stdin, log);
            Ok(String::new())
        }
    }
}

fn version() -> String {
    serde_json::json!({"cniVersion": FALLBACK_VERSION, "supportedVersions": SUPPORTED_VERSIONS}).to_string()
}

/// The pod this invocation is about, or `None` for containers that are no Kubernetes pod and
/// pods of excluded namespaces.
fn pod_of<'a>(inv: &'a Invocation, conf: &NetConf, log: &mut dyn Write) -> Option<(&'a str, &'a str)> {
    let (Some(namespace), Some(name)) = (inv.pod.namespace.as_deref(), inv.pod.name.as_deref()) else {
        let _ = writeln!(
            log,
            "ambient-cni: container {} has no K8S_POD_NAMESPACE/K8S_POD_NAME: not a Kubernetes pod, passed through",
            inv.container_id
        );
        return None;
    };
    (!conf.excludes(namespace)).then_some((namespace, name))
}

/// The previous result, which a chained plugin needs on ADD and CHECK.
fn prev_result(conf: &NetConf) -> Result<&serde_json::Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "no prevResult",
            "ambient-cni is a chained plugin: list it after the plugin that sets up the pod's network",
        )
    })
}

/// The request describing the pod from the invocation and the previous result.
fn request(
    command: Command,
    inv: &Invocation,
    (namespace, name): (&str, &str),
    prev: &PrevResult,
    log: &mut dyn Write,
) -> Result<Request, CniError> {
    let ips = prev.pod_ips(&inv.ifname)?;
    let netns = inv.netns.clone().unwrap_or_default();
    let host_interface = match prev.host_interface() {
        Some(name) => Some(name.to_string()),
        None if netns.is_empty() => None,
        None => match peer::host_peer(&netns, &inv.ifname) {
            Ok(name) => Some(name),
            Err(e) => {
                let _ = writeln!(
                    log,
                    "ambient-cni: host side of {} not found ({e}); ztunnel will look it up",
                    inv.ifname
                );
                None
            }
        },
    };
    Ok(Request {
        command,
        namespace: namespace.to_string(),
        name: name.to_string(),
        uid: inv.pod.uid.clone(),
        container_id: inv.container_id.clone(),
        netns,
        ips,
        host_interface,
    })
}

/// Asks ztunnel; anything but a reply is a retryable failure.
fn ask(conf: &NetConf, request: &Request) -> Result<Reply, CniError> {
    protocol::exchange(&conf.socket, request, conf.timeout())
        .map_err(|e| unreachable(&conf.socket, request, &e))
}

fn unreachable(socket: &Path, request: &Request, e: &ExchangeError) -> CniError {
    let msg = match e {
        ExchangeError::Unreachable(_) => "ztunnel is unreachable",
        ExchangeError::Io(_) | ExchangeError::Malformed(_) => "no usable answer from ztunnel",
    };
    CniError::new(
        Code::TryAgainLater,
        msg,
        format!(
            "pod {}/{}: {} ({e}); pods that may be in the mesh do not start without it",
            request.namespace,
            request.name,
            socket.display()
        ),
    )
}

fn add(inv: &Invocation, conf: &NetConf, log: &mut dyn Write) -> Result<String, CniError> {
    let prev_value = prev_result(conf)?;
    let pass_through = || {
        serde_json::to_string(prev_value)
            .map_err(|e| CniError::new(Code::Io, "cannot encode the result", e.to_string()))
    };
    let Some(pod) = pod_of(inv, conf, log) else { return pass_through() };
    let prev = PrevResult::parse(prev_value)?;
    let request = request(Command::Add, inv, pod, &prev, log)?;
    if request.ips.is_empty() {
        return Err(CniError::new(
            Code::InvalidConfig,
            "prevResult has no address for the pod",
            format!("pod {}/{}: ztunnel cannot enroll a pod without addresses", pod.0, pod.1),
        ));
    }
    match ask(conf, &request)? {
        Reply::Enrolled => {
            let _ = writeln!(log, "ambient-cni: pod {}/{} enrolled ({:?})", pod.0, pod.1, request.ips);
            pass_through()
        }
        Reply::NotEnrolled { reason } => {
            let _ = writeln!(log, "ambient-cni: pod {}/{} not in the mesh: {reason}", pod.0, pod.1);
            pass_through()
        }
        Reply::Refused { reason } => Err(refused(pod, &reason)),
        Reply::Unenrolled => Err(unexpected(pod, "unenrolled")),
    }
}

fn refused((namespace, name): (&str, &str), reason: &str) -> CniError {
    CniError::new(Code::Refused, "ztunnel refused the pod", format!("pod {namespace}/{name}: {reason}"))
}

fn unexpected((namespace, name): (&str, &str), reply: &str) -> CniError {
    CniError::new(
        Code::TryAgainLater,
        "unexpected answer from ztunnel",
        format!("pod {namespace}/{name}: {reply}"),
    )
}

fn check(inv: &Invocation, conf: &NetConf, log: &mut dyn Write) -> Result<(), CniError> {
    let prev_value = prev_result(conf)?;
    let Some(pod) = pod_of(inv, conf, log) else { return Ok(()) };
    let prev = PrevResult::parse(prev_value)?;
    let request = request(Command::Check, inv, pod, &prev, log)?;
    match ask(conf, &request)? {
        Reply::Enrolled | Reply::NotEnrolled { .. } => Ok(()),
        Reply::Refused { reason } => Err(refused(pod, &reason)),
        Reply::Unenrolled => Err(unexpected(pod, "unenrolled")),
    }
}

/// Tells ztunnel the sandbox is gone. Whatever happens, DEL succeeds (the spec requires it
/// when resources are already gone, and a failing DEL would wedge the pod's teardown).
fn del(inv: &Invocation, stdin: &[u8], log: &mut dyn Write) {
    let conf = match NetConf::parse(stdin) {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(log, "ambient-cni: DEL with an unreadable configuration ({e}); nothing to do");
            return;
        }
    };
    let Some(pod) = pod_of(inv, &conf, log) else { return };
    let prev = conf.prev_result.as_ref().and_then(|v| PrevResult::parse(v).ok()).unwrap_or_default();
    let request = Request {
        command: Command::Del,
        namespace: pod.0.to_string(),
        name: pod.1.to_string(),
        uid: inv.pod.uid.clone(),
        container_id: inv.container_id.clone(),
        netns: inv.netns.clone().unwrap_or_default(),
        ips: prev.pod_ips(&inv.ifname).unwrap_or_default(),
        host_interface: prev.host_interface().map(String::from),
    };
    match protocol::exchange(&conf.socket, &request, conf.timeout()) {
        Ok(reply) => {
            let _ = writeln!(log, "ambient-cni: DEL of pod {}/{}: {reply:?}", pod.0, pod.1);
        }
        Err(e) => {
            let _ = writeln!(
                log,
                "ambient-cni: DEL of pod {}/{} not delivered to ztunnel ({e}); it unenrolls the pod when its watch sees it go",
                pod.0, pod.1
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    use super::*;
    use crate::conf::PodArgs;

    fn invocation(command: CniCommand, namespace: &str) -> Invocation {
        Invocation {
            command,
            container_id: "c1".into(),
            netns: Some("/var/run/netns/p".into()),
            ifname: "eth0".into(),
            pod: PodArgs {
                namespace: Some(namespace.into()),
                name: Some("a".into()),
                uid: Some("u1".into()),
            },
        }
    }

    const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"veth1"},{"name":"eth0","sandbox":"/var/run/netns/p"}],
        "ips":[{"interface":1,"address":"10.1.1.2/24","gateway":"10.1.1.1"}]}"#;

    fn stdin(socket: &Path) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"k8s","type":"ambient-cni","socket":{},"timeout_ms":2000,"prevResult":{PREV}}}"#,
            serde_json::to_string(&socket.display().to_string()).expect("json")
        )
        .into_bytes()
    }

    /// A stand-in ztunnel answering every request with `reply`; returns what it was asked.
    fn ztunnel(listener: UnixListener, reply: Reply, n: usize) -> std::thread::JoinHandle<Vec<Request>> {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..n {
                let (mut s, _) = listener.accept().expect("accept");
                let mut line = String::new();
                BufReader::new(&s).read_line(&mut line).expect("read");
                seen.push(protocol::decode(line.as_bytes()).expect("request"));
                s.write_all(&protocol::encode(&reply)).expect("reply");
            }
            seen
        })
    }

    fn prev_value() -> serde_json::Value {
        serde_json::from_str(PREV).expect("json")
    }

    #[test]
    fn add_hands_the_pod_over_and_passes_the_result_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.sock");
        let server = ztunnel(UnixListener::bind(&path).expect("bind"), Reply::Enrolled, 1);
        let mut log = Vec::new();
        let out = run(Ok(invocation(CniCommand::Add, "demo")), &stdin(&path), &mut log);
        assert_eq!(out.exit_code, 0, "{out:?}");
        let printed: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(printed, prev_value(), "prevResult unchanged");
        let seen = server.join().expect("server");
        assert_eq!(
            seen,
            vec![Request {
                command: Command::Add,
                namespace: "demo".into(),
                name: "a".into(),
                uid: Some("u1".into()),
                container_id: "c1".into(),
                netns: "/var/run/netns/p".into(),
                ips: vec!["10.1.1.2".parse().expect("ip")],
                host_interface: Some("veth1".into()),
            }]
        );
    }

    #[test]
    fn a_refusal_fails_add_with_a_cni_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.sock");
        let reply = Reply::Refused { reason: "pod demo/a is not known".into() };
        let server = ztunnel(UnixListener::bind(&path).expect("bind"), reply, 1);
        let mut log = Vec::new();
        let out = run(Ok(invocation(CniCommand::Add, "demo")), &stdin(&path), &mut log);
        server.join().expect("server");
        assert_eq!(out.exit_code, 1);
        let err: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(err["code"], 100);
        assert_eq!(err["cniVersion"], "1.0.0");
        assert_eq!(err["msg"], "ztunnel refused the pod");
        assert!(err["details"].as_str().expect("details").contains("is not known"), "{err}");
    }

    #[test]
    fn without_ztunnel_add_fails_and_del_passes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let mut log = Vec::new();
        let out = run(Ok(invocation(CniCommand::Add, "demo")), &stdin(&path), &mut log);
        assert_eq!(out.exit_code, 1);
        let err: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(err["code"], 11, "{err}");
        assert_eq!(err["msg"], "ztunnel is unreachable");

        let out = run(Ok(invocation(CniCommand::Del, "demo")), &stdin(&path), &mut log);
        assert_eq!(out, Outcome { stdout: String::new(), exit_code: 0 });
        // Even with a configuration it cannot read.
        let out = run(Ok(invocation(CniCommand::Del, "demo")), b"{", &mut log);
        assert_eq!(out.exit_code, 0);
        assert!(String::from_utf8_lossy(&log).contains("not delivered to ztunnel"));
    }

    #[test]
    fn excluded_namespaces_and_non_pods_are_passed_through_without_asking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.sock");
        let mut log = Vec::new();
        let out = run(Ok(invocation(CniCommand::Add, "kube-system")), &stdin(&path), &mut log);
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert_eq!(serde_json::from_str::<serde_json::Value>(&out.stdout).expect("json"), prev_value());
        let mut bare = invocation(CniCommand::Add, "demo");
        bare.pod = PodArgs::default();
        assert_eq!(run(Ok(bare), &stdin(&path), &mut log).exit_code, 0);
    }

    #[test]
    fn check_and_del_ask_ztunnel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = ztunnel(listener, Reply::Refused { reason: "pod should be enrolled".into() }, 2);
        let mut log = Vec::new();
        let out = run(Ok(invocation(CniCommand::Check, "demo")), &stdin(&path), &mut log);
        assert_eq!(out.exit_code, 1, "a mismatch fails CHECK");
        let out = run(Ok(invocation(CniCommand::Del, "demo")), &stdin(&path), &mut log);
        assert_eq!(out.exit_code, 0, "DEL never fails");
        let seen = server.join().expect("server");
        assert_eq!(seen.iter().map(|r| r.command).collect::<Vec<_>>(), vec![Command::Check, Command::Del]);
        assert_eq!(seen[1].ips, vec!["10.1.1.2".parse::<std::net::IpAddr>().expect("ip")]);
    }

    #[test]
    fn version_and_missing_prev_result() {
        let mut log = Vec::new();
        let out = run(Ok(invocation(CniCommand::Version, "")), br#"{"cniVersion":"1.0.0"}"#, &mut log);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!(v["supportedVersions"], serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"]));
        let out = run(
            Ok(invocation(CniCommand::Add, "demo")),
            br#"{"cniVersion":"0.4.0","type":"ambient-cni"}"#,
            &mut log,
        );
        let err: serde_json::Value = serde_json::from_str(&out.stdout).expect("json");
        assert_eq!((err["code"].as_u64(), err["cniVersion"].as_str()), (Some(7), Some("0.4.0")));
        let out =
            run(Err(CniError::new(Code::InvalidEnvironment, "CNI_COMMAND is not set", "")), b"", &mut log);
        assert_eq!(out.exit_code, 1);
        assert!(out.stdout.contains("\"code\":4"), "{}", out.stdout);
    }
}
