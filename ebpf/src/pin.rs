//! Where the capture lives while no ztunnel runs: a directory on a BPF filesystem holding the
//! program (`prog`), its maps (by name) and one TCX link per interface (`links/<ifname>`).
//! Pinned objects stay in the kernel when the process that made them exits, whatever the
//! reason; only removing the pins (unenrolling, or [`uninstall`]) takes capture away.
//!
//! Each mount of bpffs is its own instance, so every process that must see the pins has to see
//! the same mount. `ip netns exec` remounts `/sys` (hiding `/sys/fs/bpf`), so tests and the demo
//! pin under a bpffs mounted elsewhere (`/run/...`) in the host's mount namespace.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::programs::TcAttachType;
use aya::programs::tc;
use tracing::info;

use crate::redirector::{PROGRAM_NAME, Settings};
use crate::routing;

/// Default pin directory (a DaemonSet mounts the host's `/sys/fs/bpf`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ambient-ztunnel";
/// The program's pin, inside the pin directory.
pub const PROGRAM_PIN: &str = "prog";
/// The directory of link pins, one per interface, inside the pin directory.
pub const LINKS_DIR: &str = "links";
/// Maps the program pins by name (`LIBBPF_PIN_BY_NAME` in `bpf/redirect.c`).
pub const MAP_NAMES: [&str; 5] = ["enrolled", "dns_bypass", "inbound_bypass", "settings", "stats"];
/// The pin name of `iface`'s link. bpffs refuses dots in names (reserved), and interface names
/// may have them (a VLAN's `eth0.100`): `%` and `.` are escaped as `%25` and `%2e`.
pub fn link_pin_name(iface: &str) -> String {
    iface.replace('%', "%25").replace('.', "%2e")
}

/// The interface a link pin name stands for (see [`link_pin_name`]).
pub fn iface_of_link_pin(name: &str) -> String {
    name.replace("%2e", ".").replace("%25", "%")
}

/// The directory of the host programs' link pins (`bpf/host.c`), inside the pin directory.
pub const HOST_LINKS_DIR: &str = "host_links";
/// Maps the host programs pin by name.
pub const HOST_MAP_NAMES: [&str; 5] =
    ["host_settings", "host_own_cgroups", "host_by_cookie", "host_orig_dst", "host_stats"];

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot mount a BPF filesystem at {path}: {detail}")]
    Mount { path: PathBuf, detail: String },
    #[error(
        "pinned map {path} has key/value sizes {found:?}, this build expects {expected:?}: it was pinned by an incompatible version; run `ztunnel uninstall` first"
    )]
    Incompatible { path: PathBuf, found: (u32, u32), expected: (u32, u32) },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io { path: path.to_path_buf(), source }
}

/// Where a node's BPF filesystem is conventionally mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` exists on a BPF filesystem. Under `/sys/fs/bpf`, mounts bpffs there when
/// it is not mounted yet (as a DaemonSet finds it mounted on a node); anywhere else the caller
/// must have mounted one (see [`mount_bpffs`]), since mounting over an arbitrary directory could
/// hide what it holds.
pub fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && fs_type(root).as_deref() != Some("bpf") {
        mount_bpffs(root)?;
    }
    let mut existing = dir;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if fs_type(existing).as_deref() != Some("bpf") {
        return Err(PinError::Mount {
            path: dir.to_path_buf(),
            detail: format!(
                "{} is not on a BPF filesystem; mount one first (`mount -t bpf bpf <dir>`)",
                existing.display()
            ),
        });
    }
    let links = dir.join(LINKS_DIR);
    std::fs::create_dir_all(&links).map_err(io_err(&links))?;
    Ok(())
}

/// Mounts a BPF filesystem at `path` (creating the directory) unless one is mounted there.
pub fn mount_bpffs(path: &Path) -> Result<(), PinError> {
    std::fs::create_dir_all(path).map_err(io_err(path))?;
    if is_mount_of(path, "bpf") {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(path)
        .output()
        .map_err(|e| PinError::Mount { path: path.to_path_buf(), detail: e.to_string() })?;
    if !out.status.success() {
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(PinError::Mount { path: path.to_path_buf(), detail });
    }
    info!(path = %path.display(), "mounted a BPF filesystem for the capture's pins");
    Ok(())
}

/// True when a filesystem of `fstype` is mounted exactly at `path`.
fn is_mount_of(path: &Path, fstype: &str) -> bool {
    let Ok(path) = path.canonicalize() else { return false };
    mounts().iter().any(|(mp, t)| Path::new(mp) == path && t == fstype)
}

/// (mount point, filesystem type) of every mount, in `/proc/self/mountinfo` order.
fn mounts() -> Vec<(String, String)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    info.lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint options [optional...] - fstype source super
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            Some(((*mount_point).to_string(), (*fstype).to_string()))
        })
        .collect()
}

/// The type of the filesystem mounted at the longest mount point that contains `path`.
fn fs_type(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let mut best: Option<(usize, String)> = None;
    for (mount_point, fstype) in mounts() {
        let mount_point = Path::new(&mount_point);
        if path.starts_with(mount_point) {
            let depth = mount_point.components().count();
            // Later lines of the same mount point are mounted over earlier ones.
            if best.as_ref().is_none_or(|(d, _)| depth >= *d) {
                best = Some((depth, fstype));
            }
        }
    }
    best.map(|(_, t)| t)
}

/// Fails when a map pinned in `dir` does not have the sizes this build's program expects.
pub fn check_pinned_maps(dir: &Path) -> Result<(), PinError> {
    const EXPECTED: [(&str, (u32, u32)); 10] = [
        ("enrolled", (16, 4)),
        ("dns_bypass", (16, 4)),
        ("inbound_bypass", (4, 4)),
        ("settings", (4, 20)),
        ("stats", (4, 8)),
        ("host_settings", (4, 16)),
        ("host_own_cgroups", (8, 4)),
        ("host_by_cookie", (8, 20)),
        ("host_orig_dst", (20, 20)),
        ("host_stats", (4, 8)),
    ];
    for (name, expected) in EXPECTED {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else { continue };
        let found = (info.key_size(), info.value_size());
        if found != expected {
            return Err(PinError::Incompatible { path, found, expected });
        }
    }
    Ok(())
}

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// TCX links unpinned (each detaches once no process holds it open).
    pub links: usize,
    /// Netlink tc filters removed (kernels before 6.6).
    pub filters: usize,
    pub programs: usize,
    pub maps: usize,
    pub rules: usize,
    pub routes: usize,
}

impl std::fmt::Display for Removed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} link(s), {} tc filter(s), {} program(s), {} map(s), {} routing rule(s), {} route(s)",
            self.links, self.filters, self.programs, self.maps, self.rules, self.routes
        )
    }
}

/// Removes everything the redirector installed in this network namespace and pin directory:
/// link pins (detaching the program from every interface), the program and map pins, the
/// directory, netlink filters of our program, and the routing rules and routes. Idempotent.
/// Run it with no ztunnel running on the node (a running one holds its links open).
pub fn uninstall(settings: &Settings) -> Result<Removed, PinError> {
    let mut removed = Removed::default();
    let dir = &settings.pin_dir;
    for links in [dir.join(LINKS_DIR), dir.join(HOST_LINKS_DIR)] {
        if let Ok(entries) = std::fs::read_dir(&links) {
            for entry in entries.flatten() {
                remove_pin(&entry.path())?;
                removed.links += 1;
            }
            let _ = std::fs::remove_dir(&links);
        }
    }
    if remove_pin(&dir.join(PROGRAM_PIN))? {
        removed.programs += 1;
    }
    for name in MAP_NAMES.iter().chain(&HOST_MAP_NAMES) {
        if remove_pin(&dir.join(name))? {
            removed.maps += 1;
        }
    }
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(io_err(dir))?;
    }
    // Filters a netlink attachment (kernels before 6.6) left on any interface.
    if let Ok(names) = routing::interfaces() {
        for name in names {
            if tc::qdisc_detach_program(&name, TcAttachType::Ingress, PROGRAM_NAME).is_ok() {
                removed.filters += 1;
            }
        }
    }
    let (rules, routes) = routing::uninstall(settings.redirect_mark, settings.route_table)
        .map_err(|e| PinError::Io { path: dir.clone(), source: io::Error::other(e.to_string()) })?;
    removed.rules = rules;
    removed.routes = routes;
    Ok(removed)
}

/// Removes one pin; false when it was not there.
pub fn remove_pin(path: &Path) -> Result<bool, PinError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(PinError::Io { path: path.to_path_buf(), source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pin_names_have_no_dot_and_give_the_interface_back() {
        for iface in ["eth0", "eth0.100", "a%2eb", "a%.b", "v.1.2", "%25"] {
            let name = link_pin_name(iface);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(iface_of_link_pin(&name), iface);
        }
    }
}
