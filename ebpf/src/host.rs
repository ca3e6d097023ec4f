//! Capture of a host's own processes (host mode: a VM or ECS host where ztunnel runs beside the
//! application). The cgroup programs of `bpf/host.c` are attached to the cgroup whose processes
//! are the host's workload: their TCP connects go to ztunnel's outbound listener on loopback,
//! and the original destination is kept in a map ztunnel reads for each connection it accepts
//! ([`HostCapture::original_dst`]). Their DNS (UDP or TCP to port 53) goes to ztunnel's DNS
//! proxy on loopback while it is bound there. Only sockets carrying ztunnel's mark are handed
//! anything (a squatter of its ports gets nothing). ztunnel's own cgroups (each ztunnel adds
//! its own, [`exclude_own_cgroup`] before any connection) and sockets carrying its mark are
//! left alone; link-local destinations are never captured; SCTP and DCCP sockets are refused. Inbound to the host is the tc program ([`crate::Redirector`]) with the host's
//! address enrolled on its interface.
//!
//! Like the tc capture, everything is pinned under the pin directory (`host_links/`, the
//! `host_*` maps): capture outlives ztunnel, and while none runs the host's processes' connects
//! are sent to a listener that is not there and fail. A starting ztunnel attaches its programs
//! before it lets go of the pinned ones (both run meanwhile, and agree), so capture never
//! lapses. [`crate::pin::uninstall`] removes it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};
use tracing::{info, warn};

use crate::pin;
use crate::redirector::RedirectError;

/// The compiled programs (see `bpf/host.c`).
static HOST_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host.o"));
/// The cgroup sock_addr programs.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    "host_connect4",
    "host_connect6",
    "host_sendmsg4",
    "host_sendmsg6",
    "host_recvmsg4",
    "host_recvmsg6",
    "host_getpeername4",
    "host_getpeername6",
];
/// The sockops program.
const SOCKOPS_PROGRAM: &str = "host_sockops_connect";
/// The cgroup sock_create program (refuses SCTP and DCCP sockets).
const SOCK_CREATE_PROGRAM: &str = "host_sock_create";
/// Counters the programs keep (`enum host_stat` in the C program).
pub const HOST_STAT_NAMES: [&str; 4] = ["host_captured", "host_own", "host_refused", "host_dns"];

/// What host capture needs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostSettings {
    /// Where the tc capture pins too (one directory per host).
    pub pin_dir: PathBuf,
    /// The cgroup (v2) whose processes are the host's workload.
    pub cgroup: PathBuf,
    /// ztunnel's outbound listener port (on loopback).
    pub outbound_port: u16,
    pub ztunnel_mark: u32,
    /// ztunnel's DNS proxy port (on loopback), where the host's DNS goes while it is bound;
    /// 0: the host's DNS is not captured.
    pub dns_port: u16,
}

/// An address and port as the programs key them: the address IPv6 or IPv4-mapped, then the
/// port in network order, then two bytes of padding.
type Endpoint = [u8; 20];

fn endpoint(addr: SocketAddr) -> Endpoint {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let mut e = [0; 20];
    e[..16].copy_from_slice(&ip.octets());
    e[16..18].copy_from_slice(&addr.port().to_be_bytes());
    e
}

fn socket_addr(e: &Endpoint) -> SocketAddr {
    let mut ip = [0; 16];
    ip.copy_from_slice(&e[..16]);
    SocketAddr::new(Ipv6Addr::from(ip).to_canonical(), u16::from_be_bytes([e[16], e[17]]))
}

/// The loaded and attached host programs, and the map of original destinations.
pub struct HostCapture {
    ebpf: Ebpf,
    orig_dst: Mutex<HashMap<MapData, Endpoint, Endpoint>>,
    settings: HostSettings,
    ztunnel_cgroup: u64,
}

impl std::fmt::Debug for HostCapture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCapture").field("settings", &self.settings).finish()
    }
}

impl HostCapture {
    /// Loads the programs with the pinned maps, writes the settings (and ztunnel's own cgroup),
    /// attaches them to `settings.cgroup` and pins the links (then lets go of the links a
    /// previous ztunnel pinned). Needs CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON.
    pub fn load(settings: HostSettings) -> Result<Self, RedirectError> {
        let dir = settings.pin_dir.clone();
        let attach_err =
            |reason: String| RedirectError::Attach { iface: settings.cgroup.display().to_string(), reason };
        pin::ensure_bpffs(&dir)?;
        pin::check_pinned_maps(&dir)?;
        let ztunnel_cgroup = own_cgroup_id().map_err(|reason| {
            attach_err(format!("cannot tell ztunnel's own cgroup, which must stay uncaptured: {reason}"))
        })?;
        let captured = std::fs::metadata(&settings.cgroup)
            .map_err(|e| attach_err(format!("the cgroup to capture: {e}")))?
            .ino();
        if captured == ztunnel_cgroup {
            return Err(attach_err(
                "that is ztunnel's own cgroup, which is never captured, so nothing would be: name the \
                 workload's cgroup, or an ancestor of both"
                    .into(),
            ));
        }
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&dir).load(HOST_OBJECT)?;
        {
            let map_err = |name| move |source| RedirectError::Map { name, source };
            let map =
                ebpf.map_mut("host_own_cgroups").ok_or(RedirectError::Missing("map host_own_cgroups"))?;
            let mut own: HashMap<_, u64, u32> =
                HashMap::try_from(map).map_err(map_err("host_own_cgroups"))?;
            own.insert(ztunnel_cgroup, 1, 0).map_err(map_err("host_own_cgroups"))?;
            let map = ebpf.map_mut("host_settings").ok_or(RedirectError::Missing("map host_settings"))?;
            let mut array: Array<_, [u32; 4]> = Array::try_from(map).map_err(map_err("host_settings"))?;
            let words =
                [u32::from(settings.outbound_port), settings.ztunnel_mark, u32::from(settings.dns_port), 0];
            array.set(0, words, 0).map_err(map_err("host_settings"))?;
        }
        let cgroup = std::fs::File::open(&settings.cgroup)
            .map_err(|e| attach_err(format!("opening the cgroup: {e}")))?;
        let links_dir = dir.join(pin::HOST_LINKS_DIR);
        std::fs::create_dir_all(&links_dir)
            .map_err(|e| attach_err(format!("{}: {e}", links_dir.display())))?;
        let previous: Vec<PathBuf> = match std::fs::read_dir(&links_dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        let mut pinned = Vec::new();
        // Attached as links (the kernel refuses flags there, hence `Single`): links of several
        // programs to one cgroup coexist all the same, which the hand-over relies on.
        for name in SOCK_ADDR_PROGRAMS.iter().chain(&[SOCKOPS_PROGRAM, SOCK_CREATE_PROGRAM]) {
            let program = ebpf.program_mut(name).ok_or(RedirectError::Missing("a host program"))?;
            let link: FdLink = if *name == SOCKOPS_PROGRAM {
                let prog: &mut SockOps = program.try_into()?;
                prog.load()?;
                let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
                prog.take_link(id)?.try_into().map_err(|e| attach_err(format!("{name}: {e}")))?
            } else if *name == SOCK_CREATE_PROGRAM {
                let prog: &mut CgroupSock = program.try_into()?;
                prog.load()?;
                let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
                prog.take_link(id)?.try_into().map_err(|e| attach_err(format!("{name}: {e}")))?
            } else {
                let prog: &mut CgroupSockAddr = program.try_into()?;
                prog.load()?;
                let id = prog.attach(&cgroup, CgroupAttachMode::Single)?;
                prog.take_link(id)?.try_into().map_err(|e| attach_err(format!("{name}: {e}")))?
            };
            let id = program.info()?.id();
            // bpffs refuses dots in names.
            let path = links_dir.join(format!("{name}-{id}"));
            pin::remove_pin(&path)?;
            link.pin(&path).map_err(|e| attach_err(format!("pinning {name}: {e}")))?;
            pinned.push(path);
        }
        // Ours run now; the previous ztunnel's go (until here both ran, with the same maps).
        for old in previous.iter().filter(|p| !pinned.contains(p)) {
            pin::remove_pin(old)?;
        }
        let orig = ebpf.take_map("host_orig_dst").ok_or(RedirectError::Missing("map host_orig_dst"))?;
        let orig_dst =
            HashMap::try_from(orig).map_err(|source| RedirectError::Map { name: "host_orig_dst", source })?;
        info!(
            cgroup = %settings.cgroup.display(),
            ztunnel_cgroup,
            replaced = previous.len(),
            "host capture attached: the host's processes' connections go to ztunnel"
        );
        Ok(Self { ebpf, orig_dst: Mutex::new(orig_dst), settings, ztunnel_cgroup })
    }

    /// The original destination of a captured connection whose client ztunnel sees as `peer`
    /// (on loopback), taken out of the map; `None` when it was not captured here.
    pub fn original_dst(&self, peer: SocketAddr) -> Option<SocketAddr> {
        let key = endpoint(peer);
        let mut map = self.orig_dst.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let found = map.get(&key, 0).ok()?;
        if let Err(e) = map.remove(&key) {
            warn!(%peer, error = %e, "cannot remove a used original destination (the map evicts it)");
        }
        Some(socket_addr(&found))
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&self) -> Vec<(&'static str, u64)> {
        let Some(map) = self.ebpf.map("host_stats") else { return Vec::new() };
        let Ok(array) = PerCpuArray::<_, u64>::try_from(map) else { return Vec::new() };
        HOST_STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| (*name, array.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0)))
            .collect()
    }

    pub fn settings(&self) -> &HostSettings {
        &self.settings
    }

    /// The cgroup id the programs leave alone (ztunnel's own).
    pub fn ztunnel_cgroup(&self) -> u64 {
        self.ztunnel_cgroup
    }
}

/// Before ztunnel makes any connection (its control plane, an ECS task's metadata): when a
/// previous ztunnel left host capture pinned in `pin_dir`, adds this process's cgroup to the
/// cgroups it leaves alone, so that a ztunnel restarted in a new cgroup (a systemd restart, a
/// new container) is not captured itself. Without pinned capture there is nothing to do.
pub fn exclude_own_cgroup(pin_dir: &Path) -> Result<(), String> {
    let pinned = pin_dir.join("host_own_cgroups");
    if !pinned.exists() {
        return Ok(());
    }
    let id = own_cgroup_id()?;
    let data = MapData::from_pin(&pinned).map_err(|e| format!("{}: {e}", pinned.display()))?;
    let mut map: HashMap<MapData, u64, u32> = HashMap::try_from(aya::maps::Map::LruHashMap(data))
        .map_err(|e| format!("{}: {e}", pinned.display()))?;
    map.insert(id, 1, 0).map_err(|e| format!("{}: {e}", pinned.display()))?;
    info!(cgroup = id, "own cgroup excluded from the pinned host capture");
    Ok(())
}

/// This process's cgroup (v2) id: the inode of its directory under the cgroup2 mount, checked
/// by finding this process among the directory's members (a cgroup namespace or a second
/// cgroup2 mount would otherwise name another one).
fn own_cgroup_id() -> Result<u64, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let rel =
        own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 line in /proc/self/cgroup")?;
    let mount = cgroup2_mount()?;
    let path = mount.join(rel.trim_start_matches('/'));
    let procs = path.join("cgroup.procs");
    let members = std::fs::read_to_string(&procs).map_err(|e| format!("{}: {e}", procs.display()))?;
    let pid = std::process::id().to_string();
    if !members.lines().any(|l| l.trim() == pid) {
        return Err(format!(
            "{} does not list this process (a cgroup namespace?): mount the host's cgroup2 hierarchy",
            path.display()
        ));
    }
    std::fs::metadata(&path).map(|m| m.ino()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Where cgroup2 is mounted in this mount namespace.
pub fn cgroup2_mount() -> Result<PathBuf, String> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    info.lines()
        .find_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let mount_point = before.split_whitespace().nth(4)?;
            (after.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or_else(|| "cgroup2 is not mounted".to_string())
}

/// True when `path` is a cgroup2 directory.
pub fn is_cgroup(path: &Path) -> bool {
    path.join("cgroup.procs").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_round_trip_in_the_programs_layout() {
        for addr in ["10.1.2.3:8080", "[fd00::7]:443", "127.0.0.1:40000"] {
            let a: SocketAddr = addr.parse().expect("addr");
            assert_eq!(socket_addr(&endpoint(a)), a);
        }
        let e = endpoint("10.1.2.3:8080".parse().expect("addr"));
        assert_eq!(&e[10..16], &[0xff, 0xff, 10, 1, 2, 3], "IPv4 mapped");
        assert_eq!(&e[16..], &[0x1f, 0x90, 0, 0], "port in network order, then padding");
    }
}
