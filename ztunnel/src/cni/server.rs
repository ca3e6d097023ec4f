//! The enrollment socket: one request and one reply per connection (see
//! `ambient_cni::protocol`), at most [`MAX_CONCURRENT`] at a time, each bounded in size and
//! time. ADD decides with the watch's pod and namespace labels (waiting briefly for a pod it
//! has not seen), enrolls the pod's addresses at once when it is in the mesh, and refuses when
//! it cannot tell or cannot enroll, so that the pod does not start uncaptured. DEL withdraws
//! the sandbox's announcement (or the pod's, re-made from the watch after a restart, by its uid
//! and addresses). CHECK compares the capture with the labels. Every refusal is
//! logged and counted.

use std::net::IpAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ambient_cni::protocol::{self, Command, MAX_MESSAGE, Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{Instrument, info, info_span, warn};

use super::announced::{AnnouncedPod, Which};
use super::decide::Decision;
use super::metrics::CniMetrics;
use super::pods::{Missing, PodCache, PodKey};
use crate::redirect::{AnnounceError, Enrollment};

/// Requests served at once; more are closed unanswered (the plugin fails and is retried).
pub const MAX_CONCURRENT: usize = 32;
/// How long a client may take to send its request, and ztunnel to write the reply.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Most addresses one pod may announce.
pub const MAX_IPS: usize = 16;

/// Why the socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("enrollment socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("enrollment socket {0}: a file that is not a socket is in the way")]
    NotASocket(PathBuf),
}

/// Binds `path` (replacing a socket a previous ztunnel left), readable and writable by its
/// owner only: the plugin runs as root.
pub fn bind(path: &Path) -> Result<UnixListener, BindError> {
    let io = |source| BindError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(io)?,
        Ok(_) => return Err(BindError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// What answering needs.
pub struct Handler {
    pub cache: Arc<PodCache>,
    pub enrollment: Enrollment,
    pub metrics: CniMetrics,
    /// How long an ADD or CHECK waits for the watch to deliver the pod or its namespace.
    pub wait: Duration,
}

/// Serves the socket until the task is dropped.
pub async fn serve(listener: UnixListener, handler: Arc<Handler>) {
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "enrollment socket: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            handler.metrics.refused("unknown", "busy");
            warn!(limit = MAX_CONCURRENT, "enrollment socket busy: request closed unanswered");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            handler.connection(stream).await;
            drop(permit);
        });
    }
}

impl Handler {
    async fn connection(&self, stream: UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = Vec::new();
        let mut reader = BufReader::new(read.take(MAX_MESSAGE as u64 + 1));
        let reply = match tokio::time::timeout(IO_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Err(_) => self.refuse("unknown", "bad_request", "no request in time".into()),
            Ok(Err(e)) => self.refuse("unknown", "bad_request", format!("reading the request: {e}")),
            Ok(Ok(_)) if line.len() > MAX_MESSAGE => {
                self.refuse("unknown", "bad_request", format!("request longer than {MAX_MESSAGE} bytes"))
            }
            Ok(Ok(_)) => match protocol::decode::<Request>(&line) {
                Err(e) => self.refuse("unknown", "bad_request", format!("malformed request: {e}")),
                Ok(req) => {
                    let span = info_span!(
                        "cni",
                        command = req.command.as_str(),
                        pod = %format_args!("{}/{}", req.namespace, req.name),
                        sandbox = %short(&req.container_id),
                    );
                    self.handle(req).instrument(span).await
                }
            },
        };
        let sent = tokio::time::timeout(IO_TIMEOUT, write.write_all(&protocol::encode(&reply))).await;
        if !matches!(sent, Ok(Ok(()))) {
            warn!(?reply, "enrollment socket: the plugin left before the reply");
        }
        let _ = write.shutdown().await;
    }

    /// Answers one request.
    pub async fn handle(&self, req: Request) -> Reply {
        let command = req.command.as_str();
        if let Err(reason) = validate(&req) {
            return self.refuse(command, "bad_request", reason);
        }
        let key = PodKey::new(&req.namespace, &req.name);
        match req.command {
            Command::Add => self.add(key, req).await,
            Command::Del => self.del(key, req).await,
            Command::Check => self.check(key, req).await,
        }
    }

    fn refuse(&self, command: &'static str, label: &'static str, reason: String) -> Reply {
        self.metrics.refused(command, label);
        warn!(%reason, "CNI request refused: the pod does not start until it is retried");
        Reply::Refused { reason }
    }

    fn unknown(&self, command: &'static str, key: &PodKey, missing: Missing) -> Reply {
        let what = match missing {
            Missing::Pod => {
                format!("pod {key} is not known to ztunnel (not among this node's pods in its watch)")
            }
            Missing::Namespace => format!("the namespace of pod {key} is not known to ztunnel's watch"),
        };
        self.refuse(command, missing.label(), format!("{what} after {:?}", self.wait))
    }

    fn announced_gauge(&self) {
        self.metrics.announced(self.enrollment.announced_count());
    }

    async fn add(&self, key: PodKey, req: Request) -> Reply {
        let decision = match self.cache.decide(&key, req.uid.as_deref(), self.wait).await {
            Ok(d) => d,
            Err(missing) => return self.unknown("add", &key, missing),
        };
        let why = match decision {
            Decision::Skip(why) => {
                if self.enrollment.withdraw(key, Which::Any).await.is_some() {
                    self.announced_gauge();
                }
                self.metrics.result("add", "not_enrolled");
                info!(reason = why, "pod not in the mesh: passed through");
                return Reply::NotEnrolled { reason: why.to_string() };
            }
            Decision::Enroll(why) => why,
        };
        let interface = match interface(&req).await {
            Ok(i) => i,
            Err(reason) => return self.refuse("add", "no_interface", reason),
        };
        let since_unix_s =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        let bypass_dns = self.cache.bypasses_dns(&key);
        let pod = AnnouncedPod {
            pod: key,
            uid: req.uid,
            container_id: req.container_id,
            ips: req.ips,
            interface,
            since_unix_s,
            bypass_dns,
        };
        let (ips, iface) = (pod.ips.clone(), pod.interface.clone());
        let key = pod.pod.clone();
        match self.enrollment.announce(pod).await {
            Ok(()) => {
                self.announced_gauge();
                self.metrics.result("add", "enrolled");
                info!(?ips, %iface, reason = why, bypass_dns, "pod enrolled at creation");
                Reply::Enrolled
            }
            Err(e) => {
                let label = match e {
                    AnnounceError::Full(_) => "full",
                    AnnounceError::ShuttingDown => "shutting_down",
                    AnnounceError::Enroll { .. } | AnnounceError::Task(_) => "enroll_failed",
                };
                self.refuse("add", label, format!("cannot enroll pod {key}: {e}"))
            }
        }
    }

    async fn del(&self, key: PodKey, req: Request) -> Reply {
        // The sandbox's announcement, or the pod's re-made from the watch after a restart
        // (which knows no sandbox id): see `Which::Del`.
        let which = Which::Del { sandbox: req.container_id, uid: req.uid, ips: req.ips };
        match self.enrollment.withdraw(key, which).await {
            Some(removed) => {
                self.announced_gauge();
                info!(ips = ?removed.ips, "pod unenrolled (sandbox deleted)");
            }
            None => info!("sandbox deleted; nothing of it was announced"),
        }
        self.metrics.result("del", "unenrolled");
        Reply::Unenrolled
    }

    async fn check(&self, key: PodKey, req: Request) -> Reply {
        let decision = match self.cache.decide(&key, req.uid.as_deref(), self.wait).await {
            Ok(d) => d,
            Err(missing) => return self.unknown("check", &key, missing),
        };
        let status = self.enrollment.status();
        let captured = |ip: &IpAddr| status.pods.contains_key(ip);
        match decision {
            Decision::Enroll(_) => match req.ips.iter().find(|ip| !captured(ip)) {
                None => {
                    self.metrics.result("check", "enrolled");
                    Reply::Enrolled
                }
                Some(ip) => self.refuse(
                    "check",
                    "check_mismatch",
                    format!("pod {key} should be in the mesh but {ip} is not captured"),
                ),
            },
            Decision::Skip(why) => match req.ips.iter().find(|ip| captured(ip)) {
                None => {
                    self.metrics.result("check", "not_enrolled");
                    Reply::NotEnrolled { reason: why.to_string() }
                }
                Some(ip) => self.refuse(
                    "check",
                    "check_mismatch",
                    format!("pod {key} is not in the mesh ({why}) but {ip} is captured"),
                ),
            },
        }
    }
}

/// The host interface the plugin named, or the one the node routes the pod's first address by.
async fn interface(req: &Request) -> Result<String, String> {
    if let Some(name) = &req.host_interface {
        return Ok(name.clone());
    }
    let Some(ip) = req.ips.first().copied() else {
        return Err("no address to find the pod's interface by".into());
    };
    match tokio::task::spawn_blocking(move || ebpf::interface_for(ip)).await {
        Ok(Ok(name)) => Ok(name),
        Ok(Err(e)) => Err(format!("cannot find the host interface of {ip}: {e}")),
        Err(e) => Err(format!("interface lookup failed: {e}")),
    }
}

/// The first 12 characters of a container id, as runtimes print them.
fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// Checks what the plugin sent before anything is done with it.
fn validate(req: &Request) -> Result<(), String> {
    pod_key(&req.namespace, &req.name)?;
    token("container id", &req.container_id, MAX_CONTAINER_ID)?;
    if let Some(uid) = &req.uid {
        token("uid", uid, MAX_UID)?;
    }
    pod_ips(&req.ips)?;
    if req.command == Command::Add && req.ips.is_empty() {
        return Err("ADD without the pod's addresses".into());
    }
    if let Some(iface) = &req.host_interface {
        host_interface(iface)?;
    }
    Ok(())
}

/// Longest container id accepted.
pub(super) const MAX_CONTAINER_ID: usize = 256;
/// Longest pod uid accepted.
pub(super) const MAX_UID: usize = 128;

/// A pod's namespace and name, as Kubernetes allows them.
pub(super) fn pod_key(namespace: &str, name: &str) -> Result<(), String> {
    dns_name("namespace", namespace, 63)?;
    dns_name("pod name", name, 253)
}

/// Non-empty printable ASCII of at most `max` characters.
pub(super) fn token(what: &str, s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max || !s.chars().all(|c| c.is_ascii_graphic()) {
        Err(format!("{what} {s:?} is empty, longer than {max} or not printable ASCII"))
    } else {
        Ok(())
    }
}

/// At most [`MAX_IPS`] addresses, each one a pod can have.
pub(super) fn pod_ips(ips: &[IpAddr]) -> Result<(), String> {
    if ips.len() > MAX_IPS {
        return Err(format!("{} addresses (at most {MAX_IPS})", ips.len()));
    }
    if let Some(ip) = ips.iter().find(|ip| ip.is_unspecified() || ip.is_loopback() || ip.is_multicast()) {
        return Err(format!("{ip} cannot be a pod's address"));
    }
    Ok(())
}

/// A name the host side of a pod's interface can have.
pub(super) fn host_interface(iface: &str) -> Result<(), String> {
    token("host interface", iface, 15)?;
    if iface.contains('/') || iface == "lo" {
        return Err(format!("{iface:?} cannot be a pod's host interface"));
    }
    Ok(())
}

/// A DNS-1123 name (lower-case alphanumerics, `-` and `.`) of at most `max` characters.
fn dns_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok { Ok(()) } else { Err(format!("{what} {s:?} is not a Kubernetes name")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add() -> Request {
        Request {
            command: Command::Add,
            namespace: "demo".into(),
            name: "a-1".into(),
            uid: Some("0b5c-11".into()),
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/x".into(),
            ips: vec!["10.1.1.2".parse().expect("ip")],
            host_interface: Some("veth1234".into()),
        }
    }

    #[test]
    fn requests_are_checked() {
        assert_eq!(validate(&add()), Ok(()));
        let bad = [
            Request { namespace: "Demo".into(), ..add() },
            Request { name: String::new(), ..add() },
            Request { name: "a/../b".into(), ..add() },
            Request { container_id: "c 1".into(), ..add() },
            Request { uid: Some("x".repeat(129)), ..add() },
            Request { ips: vec![], ..add() },
            Request { ips: vec!["127.0.0.1".parse().expect("ip")], ..add() },
            Request { ips: vec!["0.0.0.0".parse().expect("ip")], ..add() },
            Request { ips: vec!["10.0.0.1".parse().expect("ip"); MAX_IPS + 1], ..add() },
            Request { host_interface: Some("lo".into()), ..add() },
            Request { host_interface: Some("a-very-long-interface".into()), ..add() },
            Request { host_interface: Some("../x".into()), ..add() },
        ];
        for req in bad {
            assert!(validate(&req).is_err(), "{req:?}");
        }
        // DEL may come without addresses.
        assert_eq!(validate(&Request { command: Command::Del, ips: vec![], ..add() }), Ok(()));
        assert_eq!(short("0123456789abcdef"), "0123456789ab");
    }

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_only() {
        let temp = tempfile::tempdir().expect("tempdir");
        let dir = temp.path();
        let path = dir.join("sub").join("z.sock");
        let first = bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        drop(first);
        bind(&path).expect("a stale socket is replaced");
        let file = dir.join("plain");
        std::fs::write(&file, b"x").expect("file");
        assert!(matches!(bind(&file), Err(BindError::NotASocket(_))));
    }
}
