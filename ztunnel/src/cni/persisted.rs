//! The announced pods, kept across ztunnel restarts. Capture outlives ztunnel (pinned in the
//! kernel) but the announcements lived in its memory: a pod announced moments before a restart,
//! whose addresses neither xDS nor the watch shows yet, would be unenrolled by the restarted
//! ztunnel's first narrowing. So the announced set is written to a file next to the enrollment
//! socket on every change (a temporary file renamed over it, mode 0600), and a restarted
//! ztunnel announces its pods again before it may narrow (see `super::recover`).
//!
//! A missing file is normal (the first start). A file that is not a regular file, is writable
//! by others, is larger than the bound, is not valid JSON of this version, holds more than
//! [`MAX_ANNOUNCED`] pods or any entry the enrollment socket would have refused, is not trusted
//! at all: [`load`] says why, and the caller logs, counts and ignores it.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::announced::{AnnouncedPod, FROM_WATCH, MAX_ANNOUNCED};
use super::server;

/// The file's name, in the enrollment socket's directory.
pub const FILE_NAME: &str = "announced.json";
/// The format written (and the only one read).
const VERSION: u32 = 1;
/// Largest file read: [`MAX_ANNOUNCED`] pods of at most 2 KiB each (an entry at every field's
/// bound is about 1.5 KiB).
pub const MAX_FILE_BYTES: u64 = MAX_ANNOUNCED as u64 * 2048;

/// The announced pods' file for the enrollment socket `socket`.
pub fn next_to(socket: &Path) -> PathBuf {
    socket.parent().unwrap_or_else(|| Path::new("")).join(FILE_NAME)
}

#[derive(Serialize)]
struct Written<'a> {
    version: u32,
    pods: &'a [AnnouncedPod],
}

#[derive(Deserialize)]
struct Loaded {
    version: u32,
    pods: Vec<AnnouncedPod>,
}

/// Why the file is not trusted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
    #[error("{path}: writable by group or others (mode {mode:o})")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{0}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge(PathBuf),
    #[error("{path}: malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// The pods of the file at `path`; none when there is no file.
pub fn load(path: &Path) -> Result<Vec<AnnouncedPod>, LoadError> {
    let io = |source| LoadError::Io { path: path.to_path_buf(), source };
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(e)),
    };
    if !meta.file_type().is_file() {
        return Err(LoadError::NotAFile(path.to_path_buf()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(LoadError::Writable { path: path.to_path_buf(), mode });
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge(path.to_path_buf()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path).map_err(io)?.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(LoadError::TooLarge(path.to_path_buf()));
    }
    let malformed = |reason: String| LoadError::Malformed { path: path.to_path_buf(), reason };
    let file: Loaded = serde_json::from_slice(&bytes).map_err(|e| malformed(e.to_string()))?;
    if file.version != VERSION {
        return Err(malformed(format!("version {} (this ztunnel reads {VERSION})", file.version)));
    }
    check(&file.pods).map_err(malformed)?;
    Ok(file.pods)
}

/// What the enrollment socket would accept, at most [`MAX_ANNOUNCED`] pods, each pod and each
/// address once.
fn check(pods: &[AnnouncedPod]) -> Result<(), String> {
    if pods.len() > MAX_ANNOUNCED {
        return Err(format!("{} pods (at most {MAX_ANNOUNCED})", pods.len()));
    }
    let (mut keys, mut ips) = (BTreeSet::new(), BTreeSet::new());
    for p in pods {
        let entry = |reason: String| format!("pod {}: {reason}", p.pod);
        server::pod_key(&p.pod.namespace, &p.pod.name).map_err(entry)?;
        if p.container_id != FROM_WATCH {
            server::token("container id", &p.container_id, server::MAX_CONTAINER_ID).map_err(entry)?;
        }
        if let Some(uid) = &p.uid {
            server::token("uid", uid, server::MAX_UID).map_err(entry)?;
        }
        if p.ips.is_empty() {
            return Err(entry("no address".into()));
        }
        server::pod_ips(&p.ips).map_err(entry)?;
        server::host_interface(&p.interface).map_err(entry)?;
        if !keys.insert(&p.pod) {
            return Err(entry("listed twice".into()));
        }
        if let Some(ip) = p.ips.iter().find(|ip| !ips.insert(**ip)) {
            return Err(entry(format!("{ip} is listed for another pod too")));
        }
    }
    Ok(())
}

/// Replaces the file at `path` with `pods`, atomically: written to a temporary file beside it
/// (created afresh, mode 0600) and renamed over it. A crash of ztunnel leaves the old file or
/// the new one, never a part of one; the node's crash takes the pinned capture too.
pub fn save(path: &Path, pods: &[AnnouncedPod]) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(&Written { version: VERSION, pods })?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir)?;
    }
    let mut name = path.file_name().unwrap_or(std::ffi::OsStr::new(FILE_NAME)).to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // `create_new` (O_EXCL) follows no link left in its place.
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    file.write_all(&bytes)?;
    drop(file);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::super::pods::PodKey;
    use super::*;

    fn pod(name: &str, container: &str, ip: &str) -> AnnouncedPod {
        AnnouncedPod {
            pod: PodKey::new("demo", name),
            uid: Some(format!("uid-{name}")),
            container_id: container.into(),
            ips: vec![ip.parse().expect("ip")],
            interface: format!("veth-{name}"),
            since_unix_s: 17,
            bypass_dns: false,
        }
    }

    #[test]
    fn saved_pods_load_again_and_a_missing_file_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = next_to(&dir.path().join("run").join("z.sock"));
        assert_eq!(path, dir.path().join("run").join(FILE_NAME));
        assert_eq!(load(&path).expect("missing is fine"), vec![]);
        let pods = vec![pod("a", "c1", "10.0.0.2"), pod("b", FROM_WATCH, "10.0.0.3")];
        save(&path, &pods).expect("save");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(&path).expect("load"), pods);
        // Saved again over a stale temporary file (left by a crash).
        std::fs::write(dir.path().join("run").join("announced.json.tmp"), b"junk").expect("junk");
        save(&path, &pods[..1]).expect("save");
        assert_eq!(load(&path).expect("load"), pods[..1].to_vec());
    }

    #[test]
    fn an_untrusted_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(FILE_NAME);
        let write = |text: &str| {
            std::fs::write(&path, text).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("mode");
        };
        let entry = |p: &AnnouncedPod| serde_json::to_string(p).expect("json");
        let refused = |text: &str| {
            write(text);
            assert!(matches!(load(&path), Err(LoadError::Malformed { .. })), "{text}");
        };
        refused("");
        refused("{\"version\":1,\"pods\":[");
        refused("[]");
        refused("{\"version\":2,\"pods\":[]}");
        let bad_iface = AnnouncedPod { interface: "../x".into(), ..pod("a", "c1", "10.0.0.2") };
        refused(&format!("{{\"version\":1,\"pods\":[{}]}}", entry(&bad_iface)));
        let loopback = pod("a", "c1", "127.0.0.1");
        refused(&format!("{{\"version\":1,\"pods\":[{}]}}", entry(&loopback)));
        let (a, b) = (pod("a", "c1", "10.0.0.2"), pod("b", "c2", "10.0.0.2"));
        refused(&format!("{{\"version\":1,\"pods\":[{},{}]}}", entry(&a), entry(&b)));
        let many: Vec<AnnouncedPod> = (0..=MAX_ANNOUNCED)
            .map(|i| pod(&format!("p{i}"), "c", &format!("10.{}.{}.1", i / 256, i % 256)))
            .collect();
        save(&path, &many).expect("save");
        assert!(matches!(load(&path), Err(LoadError::Malformed { .. })), "over the bound");

        write(&" ".repeat(MAX_FILE_BYTES as usize + 1));
        assert!(matches!(load(&path), Err(LoadError::TooLarge(_))));
        write("{\"version\":1,\"pods\":[]}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).expect("mode");
        assert!(matches!(load(&path), Err(LoadError::Writable { .. })));
        std::fs::remove_file(&path).expect("rm");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).expect("symlink");
        assert!(matches!(load(&path), Err(LoadError::NotAFile(_))));
    }
}
