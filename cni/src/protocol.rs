//! What the plugin and the node's ztunnel say to each other on ztunnel's unix socket: one
//! request, one reply, each a single line of JSON (the object, then `\n`), after which the
//! connection closes. ztunnel's server uses these types too, so the two sides cannot drift.
//!
//! ```text
//! -> {"command":"add","namespace":"demo","name":"a","uid":"…","container_id":"…",
//!     "netns":"/var/run/netns/cni-…","ips":["10.1.1.2"],"host_interface":"veth1a2b"}
//! <- {"result":"enrolled"}
//! <- {"result":"not_enrolled","reason":"pod opted out (istio.io/dataplane-mode=none)"}
//! <- {"result":"refused","reason":"pod demo/a is not known to ztunnel (not in the node's pod watch)"}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Largest request or reply either side reads; longer is malformed.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the runtime asked the plugin to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// The sandbox was created: enroll the pod (or say why not) before its containers start.
    Add,
    /// The sandbox is going away: unenroll. Always answered with success.
    Del,
    /// Is the pod enrolled as its labels say it should be?
    Check,
}

impl Command {
    /// The lower-case name, as in the JSON and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "add",
            Command::Del => "del",
            Command::Check => "check",
        }
    }
}

/// The pod as the runtime described it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// `K8S_POD_NAMESPACE`.
    pub namespace: String,
    /// `K8S_POD_NAME`.
    pub name: String,
    /// `K8S_POD_UID` when the runtime passes it: tells a pod from an older one of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// `CNI_CONTAINERID`: the sandbox.
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace (a path); empty on a DEL without one.
    #[serde(default)]
    pub netns: String,
    /// The pod's addresses, from `prevResult` (empty on DEL when the runtime has none).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// The host side of the pod's veth, where capture attaches; ztunnel looks the route up
    /// when the plugin could not tell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_interface: Option<String>,
}

/// ztunnel's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// The pod's addresses are captured from now on.
    Enrolled,
    /// The pod is not in the mesh (by its or its namespace's labels, a sidecar, host network):
    /// nothing captured, the pod starts as usual.
    NotEnrolled { reason: String },
    /// DEL is done (whether or not anything was enrolled).
    Unenrolled,
    /// ztunnel will not let the pod start now (unknown pod, enrollment failed, CHECK found a
    /// mismatch): the plugin fails and the runtime retries.
    Refused { reason: String },
}

/// Why an exchange with ztunnel failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// Nothing listens on the socket (missing file, refused connection).
    Unreachable(std::io::Error),
    /// Connected, but writing the request or reading the reply failed or timed out.
    Io(std::io::Error),
    /// The reply was not one this plugin understands.
    Malformed(String),
}

impl std::fmt::Display for ExchangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExchangeError::Unreachable(e) => write!(f, "cannot connect: {e}"),
            ExchangeError::Io(e) if is_timeout(e) => write!(f, "no reply in time: {e}"),
            ExchangeError::Io(e) => write!(f, "exchange failed: {e}"),
            ExchangeError::Malformed(m) => write!(f, "malformed reply: {m}"),
        }
    }
}

impl std::error::Error for ExchangeError {}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

/// One line of JSON: the encoding of a request or a reply.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Decodes one line (with or without its `\n`).
pub fn decode<'a, T: Deserialize<'a>>(line: &'a [u8]) -> Result<T, String> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    serde_json::from_slice(line).map_err(|e| e.to_string())
}

/// Sends `request` to ztunnel on `socket` and waits for its reply, all within `timeout`.
pub fn exchange(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, ExchangeError> {
    let deadline = Instant::now() + timeout;
    let remaining = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    let mut stream = UnixStream::connect(socket).map_err(ExchangeError::Unreachable)?;
    stream.set_write_timeout(Some(remaining())).map_err(ExchangeError::Io)?;
    stream.write_all(&encode(request)).map_err(ExchangeError::Io)?;
    stream.set_read_timeout(Some(remaining())).map_err(ExchangeError::Io)?;
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream).take(MAX_MESSAGE as u64 + 1);
    reader.read_until(b'\n', &mut line).map_err(ExchangeError::Io)?;
    if line.len() > MAX_MESSAGE {
        return Err(ExchangeError::Malformed(format!("longer than {MAX_MESSAGE} bytes")));
    }
    if line.is_empty() {
        return Err(ExchangeError::Malformed("ztunnel closed the connection without a reply".into()));
    }
    decode(&line).map_err(ExchangeError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_line_of_json() {
        let req = Request {
            command: Command::Add,
            namespace: "demo".into(),
            name: "a".into(),
            uid: None,
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            ips: vec!["10.1.1.2".parse().expect("ip"), "fd00::2".parse().expect("ip")],
            host_interface: Some("veth1".into()),
        };
        let line = encode(&req);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        assert!(line.ends_with(b"\n"));
        let text = String::from_utf8(line.clone()).expect("utf-8");
        assert!(text.starts_with(r#"{"command":"add","namespace":"demo""#), "{text}");
        assert!(!text.contains("uid"), "absent uid is left out: {text}");
        assert_eq!(decode::<Request>(&line), Ok(req));

        for reply in [
            Reply::Enrolled,
            Reply::NotEnrolled { reason: "opted out".into() },
            Reply::Unenrolled,
            Reply::Refused { reason: "unknown".into() },
        ] {
            assert_eq!(decode::<Reply>(&encode(&reply)), Ok(reply));
        }
        assert_eq!(
            String::from_utf8(encode(&Reply::Refused { reason: "r".into() })).expect("utf-8"),
            "{\"result\":\"refused\",\"reason\":\"r\"}\n"
        );
        assert!(decode::<Reply>(br#"{"result":"maybe"}"#).is_err());
    }

    #[test]
    fn an_absent_socket_is_unreachable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let req = Request {
            command: Command::Del,
            namespace: "n".into(),
            name: "p".into(),
            uid: None,
            container_id: "c".into(),
            netns: String::new(),
            ips: vec![],
            host_interface: None,
        };
        let err = exchange(&dir.path().join("none.sock"), &req, Duration::from_secs(1)).expect_err("absent");
        assert!(matches!(err, ExchangeError::Unreachable(_)), "{err}");
    }

    #[test]
    fn a_silent_server_times_out_and_a_bad_reply_is_malformed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("z.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        let req = Request {
            command: Command::Check,
            namespace: "n".into(),
            name: "p".into(),
            uid: Some("u".into()),
            container_id: "c".into(),
            netns: "/x".into(),
            ips: vec![],
            host_interface: None,
        };
        let server = std::thread::spawn(move || {
            let (silent, _) = listener.accept().expect("accept");
            let (mut chatty, _) = listener.accept().expect("accept");
            let mut line = String::new();
            BufReader::new(&chatty).read_line(&mut line).expect("read");
            chatty.write_all(b"not json\n").expect("write");
            (silent, line)
        });
        let started = Instant::now();
        let err = exchange(&path, &req, Duration::from_millis(300)).expect_err("silent");
        assert!(matches!(err, ExchangeError::Io(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let err = exchange(&path, &req, Duration::from_secs(2)).expect_err("bad reply");
        assert!(matches!(err, ExchangeError::Malformed(_)), "{err}");
        let (_silent, line) = server.join().expect("server");
        assert_eq!(decode::<Request>(line.as_bytes()), Ok(req));
    }
}
