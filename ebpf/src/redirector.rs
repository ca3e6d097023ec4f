//! Loads the capture program and enrolls pods: their addresses (IPv4 and IPv6) go into the
//! `enrolled` map and the program is attached at tc ingress of their host-side interface (TCX on
//! kernels >= 6.6, clsact + netlink otherwise). Uplinks get the same program for traffic from
//! other nodes.
//!
//! Everything is pinned (see [`crate::pin`]), so capture outlives this process: dropping the
//! redirector, a crash or `kill -9` leave the program attached and enrolled pods' new flows,
//! finding no ztunnel listener, are dropped. A new redirector adopts the pinned maps and
//! swaps its program into the pinned links atomically (`bpf_link_update`): the kernel keeps one
//! program per interface and capture never lapses. Only [`Redirector::unenroll`], detaching an
//! idle interface, or [`crate::pin::uninstall`] removes capture.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;

use aya::maps::{Array, HashMap, MapError, PerCpuArray, SockMap};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::sk_lookup::SkLookupLink;
use aya::programs::tc::{self, SchedClassifierLink, TcAttachType};
use aya::programs::{ProgramError, SchedClassifier, SkLookup};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfError, EbpfLoader};
use tracing::{debug, info};

use crate::pin::{self, PinError};
use crate::routing::{self, RoutingError};

/// The compiled program (see `bpf/redirect.c`).
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.o"));
/// Program (function) name; also what the kernel lists it as.
pub const PROGRAM_NAME: &str = "ztunnel_capture";
/// The sk_lookup program answering the kernel's listener lookups for enrolled pods' flows.
pub const LISTENER_PROGRAM_NAME: &str = "ztunnel_listener";

/// The role of one of ztunnel's transparent listeners (`enum listener_role` in the program).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ListenerRole {
    /// 15001: flows leaving enrolled pods.
    Outbound = 0,
    /// 15006: plaintext flows to enrolled pods.
    Inbound = 1,
    /// 15008: HBONE to enrolled pods.
    Hbone = 2,
}

/// One listening socket of ztunnel's, for [`Redirector::serve_listeners`].
#[derive(Clone, Copy, Debug)]
pub struct Listener {
    pub role: ListenerRole,
    pub ipv6: bool,
    /// The listening socket; it must stay open while the redirector serves it (closing it
    /// removes it from the map by itself).
    pub fd: std::os::fd::RawFd,
}

/// Mark set on packets handed to ztunnel; policy routing delivers them locally.
pub const DEFAULT_REDIRECT_MARK: u32 = 0x538;
/// `SO_MARK` on ztunnel's own sockets (Istio's 1337), so its traffic is never recaptured.
pub const DEFAULT_ZTUNNEL_MARK: u32 = 0x539;
/// Routing table holding the local-delivery route.
pub const DEFAULT_ROUTE_TABLE: u32 = 133;
/// Priority of the fwmark rule (before the main table's 32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("loading the eBPF object failed (needs root, or CAP_BPF + CAP_NET_ADMIN): {0}")]
    Load(#[from] EbpfError),
    #[error("eBPF program {PROGRAM_NAME}: {0}")]
    Program(#[from] ProgramError),
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: MapError },
    #[error("eBPF object has no {0}")]
    Missing(&'static str),
    #[error("attaching to {iface}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("routing: {0}")]
    Routing(#[from] RoutingError),
    #[error("pinning: {0}")]
    Pin(#[from] PinError),
    #[error("link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
}

/// Marks, table and ports the redirection uses.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Settings {
    pub redirect_mark: u32,
    pub ztunnel_mark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
    /// ztunnel's outbound transparent listener (15001).
    pub outbound_port: u16,
    /// Inbound plaintext listener (15006).
    pub inbound_port: u16,
    /// Inbound HBONE listener (15008).
    pub hbone_port: u16,
    /// Directory on a BPF filesystem where the program, maps and links are pinned; one per
    /// node (network namespace).
    pub pin_dir: PathBuf,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            redirect_mark: DEFAULT_REDIRECT_MARK,
            ztunnel_mark: DEFAULT_ZTUNNEL_MARK,
            route_table: DEFAULT_ROUTE_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
            outbound_port: 15001,
            inbound_port: 15006,
            hbone_port: 15008,
            pin_dir: PathBuf::from(pin::DEFAULT_PIN_DIR),
        }
    }
}

impl Settings {
    /// The `struct settings` the program reads.
    fn to_words(&self) -> [u32; 5] {
        [
            self.redirect_mark,
            self.ztunnel_mark,
            self.outbound_port.into(),
            self.inbound_port.into(),
            self.hbone_port.into(),
        ]
    }
}

/// Counters the program keeps (indexes of its `stats` map; `enum stat` in the C program).
/// They live in a pinned map, so they count across ztunnel restarts.
pub const STAT_NAMES: [&str; 9] = [
    "captured_outbound",
    "captured_inbound",
    "captured_hbone",
    "followed_socket",
    "dropped_no_listener",
    "assign_failed",
    "dropped_unparseable",
    "dropped_fragment",
    "dropped_no_socket",
];

/// What is attached where, for the admin endpoint and tests.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub settings: Option<Settings>,
    /// The kernel's id of the program this redirector loaded (and pinned).
    pub program_id: u32,
    /// Interface -> how it is attached and why.
    pub interfaces: BTreeMap<String, InterfaceStatus>,
    /// Enrolled pod address -> interface.
    pub pods: BTreeMap<IpAddr, String>,
    /// Program counters, summed over CPUs.
    pub stats: BTreeMap<&'static str, u64>,
    /// What was adopted from pins a previous ztunnel left: (links, pods).
    pub adopted: (usize, usize),
    /// The listeners (role, IPv6) the kernel's listener lookups are answered with.
    pub listeners: Vec<(ListenerRole, bool)>,
    /// Enrolled pod addresses whose DNS is not handed to the DNS proxy.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub dns_bypass: BTreeSet<IpAddr>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InterfaceStatus {
    /// `tcx` or `netlink`.
    pub mode: &'static str,
    pub uplink: bool,
    pub pods: BTreeSet<IpAddr>,
}

/// One interface the program is attached to.
struct Attached {
    /// The TCX link (kept open) and its pin; `None` for a netlink filter.
    link: Option<(FdLink, PathBuf)>,
    uplink: bool,
    pods: BTreeSet<IpAddr>,
}

/// The loaded program and everything attached with it.
pub struct Redirector {
    ebpf: Ebpf,
    settings: Settings,
    tcx: bool,
    program_id: u32,
    interfaces: BTreeMap<String, Attached>,
    pods: BTreeMap<IpAddr, String>,
    adopted: (usize, usize),
    /// The sk_lookup program's link to this network namespace (detached when dropped).
    listener_link: Option<SkLookupLink>,
    listeners_served: Vec<(ListenerRole, bool)>,
    /// What the `dns_bypass` map holds.
    dns_bypass: BTreeSet<IpAddr>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("interfaces", &self.interfaces.keys())
            .field("pods", &self.pods)
            .finish()
    }
}

/// The `enrolled` map's key for `ip`: IPv6, or IPv4 mapped into IPv6.
fn map_key(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl Redirector {
    /// Loads the program with the pinned maps of `settings.pin_dir` (creating them the first
    /// time), writes its settings, pins it, installs the routing rules (keeping a correct rule
    /// in place), and adopts what a previous ztunnel pinned. Needs CAP_BPF, CAP_NET_ADMIN and,
    /// to mount bpffs when it is missing, CAP_SYS_ADMIN.
    pub fn load(settings: Settings) -> Result<Self, RedirectError> {
        let dir = settings.pin_dir.clone();
        pin::ensure_bpffs(&dir)?;
        pin::check_pinned_maps(&dir)?;
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(&dir).load(PROGRAM_OBJECT)?;
        {
            let map = ebpf.map_mut("settings").ok_or(RedirectError::Missing("map settings"))?;
            let mut array: Array<_, [u32; 5]> =
                Array::try_from(map).map_err(|source| RedirectError::Map { name: "settings", source })?;
            array
                .set(0, settings.to_words(), 0)
                .map_err(|source| RedirectError::Map { name: "settings", source })?;
        }
        let prog = program(&mut ebpf)?;
        prog.load()?;
        let program_id = prog.info()?.id();
        // The previous program stays alive through its links until they are swapped below.
        let prog_pin = dir.join(pin::PROGRAM_PIN);
        pin::remove_pin(&prog_pin)?;
        prog.pin(&prog_pin).map_err(|e| RedirectError::Attach {
            iface: prog_pin.display().to_string(),
            reason: format!("pinning the program: {e}"),
        })?;
        routing::install(settings.redirect_mark, settings.route_table, settings.rule_priority)?;
        let tcx = KernelVersion::current().map(|v| v >= KernelVersion::new(6, 6, 0)).unwrap_or(false);
        let mut r = Self {
            ebpf,
            settings,
            tcx,
            program_id,
            interfaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            adopted: (0, 0),
            listener_link: None,
            listeners_served: Vec::new(),
            dns_bypass: BTreeSet::new(),
        };
        r.adopt()?;
        info!(
            tcx,
            program_id,
            pin_dir = %dir.display(),
            adopted_links = r.adopted.0,
            adopted_pods = r.adopted.1,
            mark = r.settings.redirect_mark,
            table = r.settings.route_table,
            "eBPF redirection loaded"
        );
        Ok(r)
    }

    /// Swaps our program into every pinned link (atomically: capture never lapses) and reads
    /// the enrolled pods back from the pinned map. Links whose interface is gone are unpinned.
    fn adopt(&mut self) -> Result<(), RedirectError> {
        let links_dir = self.settings.pin_dir.join(pin::LINKS_DIR);
        let mut names: Vec<PathBuf> = match std::fs::read_dir(&links_dir) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        for path in names {
            let Some(iface) = path.file_name().and_then(|n| n.to_str()).map(pin::iface_of_link_pin) else {
                continue;
            };
            match self.adopt_link(&path) {
                Ok(fd) => {
                    self.interfaces.insert(
                        iface,
                        Attached { link: Some((fd, path)), uplink: false, pods: BTreeSet::new() },
                    );
                    self.adopted.0 += 1;
                }
                Err(e) => {
                    info!(iface, reason = %e, "dropping a pinned link that cannot be adopted");
                    pin::remove_pin(&path)?;
                }
            }
        }
        let by_index: BTreeMap<u32, String> =
            routing::interface_indexes()?.into_iter().map(|(name, index)| (index, name)).collect();
        let entries: Vec<([u8; 16], u32)> = self.enrolled_map()?.iter().filter_map(Result::ok).collect();
        for (key, index) in entries {
            let ip = Ipv6Addr::from(key).to_canonical();
            match by_index.get(&index) {
                Some(iface) => {
                    if let Some(a) = self.interfaces.get_mut(iface) {
                        a.pods.insert(ip);
                    }
                    self.pods.insert(ip, iface.clone());
                    self.adopted.1 += 1;
                }
                // Its interface is gone (the pod left while no ztunnel ran).
                None => {
                    let _ = self.enrolled_map()?.remove(&key);
                }
            }
        }
        let bypass: Vec<[u8; 16]> = self.dns_bypass_map()?.keys().filter_map(Result::ok).collect();
        self.dns_bypass = bypass.into_iter().map(|k| Ipv6Addr::from(k).to_canonical()).collect();
        Ok(())
    }

    fn adopt_link(&mut self, path: &std::path::Path) -> Result<FdLink, RedirectError> {
        let link_err = |source| RedirectError::Link { path: path.to_path_buf(), source };
        let pinned = PinnedLink::from_pin(path).map_err(link_err)?;
        let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
        let prog = program(&mut self.ebpf)?;
        let id = prog.attach_to_link(link)?;
        let link = prog.take_link(id)?;
        FdLink::try_from(link).map_err(link_err)
    }

    /// Captures `ip`'s traffic on `iface` (its host-side interface). Idempotent; a pod that
    /// moved interface is re-attached.
    pub fn enroll(&mut self, ip: IpAddr, iface: &str) -> Result<(), RedirectError> {
        match self.pods.get(&ip) {
            Some(current) if current == iface => return Ok(()),
            Some(_) => {
                self.unenroll(ip)?;
            }
            None => {}
        }
        let index = routing::interface_index(iface)?;
        self.ensure_attached(iface, false)?;
        self.enrolled_map()?
            .insert(map_key(ip), index, 0)
            .map_err(|source| RedirectError::Map { name: "enrolled", source })?;
        if let Some(a) = self.interfaces.get_mut(iface) {
            a.pods.insert(ip);
        }
        self.pods.insert(ip, iface.to_string());
        info!(%ip, iface, "pod enrolled for redirection");
        Ok(())
    }

    /// Stops capturing `ip`; detaches from its interface when no enrolled pod is left there.
    /// Returns whether it was enrolled.
    pub fn unenroll(&mut self, ip: IpAddr) -> Result<bool, RedirectError> {
        let Some(iface) = self.pods.remove(&ip) else { return Ok(false) };
        match self.enrolled_map()?.remove(&map_key(ip)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(RedirectError::Map { name: "enrolled", source }),
        }
        let idle = self.interfaces.get_mut(&iface).is_some_and(|a| {
            a.pods.remove(&ip);
            a.pods.is_empty() && !a.uplink
        });
        if idle {
            self.detach(&iface)?;
        }
        info!(%ip, %iface, "pod unenrolled");
        Ok(true)
    }

    /// Captures traffic arriving on `iface` from other nodes for enrolled pods.
    pub fn attach_uplink(&mut self, iface: &str) -> Result<(), RedirectError> {
        self.ensure_attached(iface, true)?;
        if let Some(a) = self.interfaces.get_mut(iface) {
            a.uplink = true;
        }
        Ok(())
    }

    /// Forgets uplinks not among `existing` interfaces (their TCX link went with them).
    pub fn prune_missing_uplinks(&mut self, existing: &[String]) {
        let gone: Vec<String> = self
            .interfaces
            .iter()
            .filter(|(name, a)| a.uplink && a.pods.is_empty() && !existing.contains(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            debug!(iface = %name, "uplink interface gone");
            let _ = self.detach(&name);
        }
    }

    /// Detaches from interfaces that are neither uplinks in `uplinks` nor hold an enrolled pod
    /// (after adoption, once the wanted state is known). Returns how many.
    pub fn detach_unused(&mut self, uplinks: &[String]) -> Result<usize, RedirectError> {
        let unused: Vec<String> = self
            .interfaces
            .iter()
            .filter(|(name, a)| a.pods.is_empty() && !uplinks.contains(name))
            .map(|(name, _)| name.clone())
            .collect();
        for name in &unused {
            self.detach(name)?;
        }
        Ok(unused.len())
    }

    /// The interface `ip` is enrolled on, if it is.
    pub fn interface_of(&self, ip: IpAddr) -> Option<&str> {
        self.pods.get(&ip).map(String::as_str)
    }

    /// True if the program is attached to `iface` as an uplink.
    pub fn is_uplink(&self, iface: &str) -> bool {
        self.interfaces.get(iface).is_some_and(|a| a.uplink)
    }

    /// Serves the kernel's own listener lookups for enrolled pods' flows with `listeners`, by
    /// attaching the sk_lookup program to the calling thread's network namespace for as long as
    /// this redirector lives. Without it, a SYN reusing the 4-tuple of a ztunnel socket in
    /// TIME_WAIT is answered with a bare ACK and the client stalls, resets and retries (see
    /// `bpf/redirect.c`). Calling it again replaces the listeners.
    pub fn serve_listeners(&mut self, listeners: &[Listener]) -> Result<(), RedirectError> {
        let map_err = |source| RedirectError::Map { name: "listeners", source };
        {
            let map = self.ebpf.map_mut("listeners").ok_or(RedirectError::Missing("map listeners"))?;
            let mut sockets: SockMap<_> = SockMap::try_from(map).map_err(map_err)?;
            for l in listeners {
                let index = l.role as u32 * 2 + u32::from(l.ipv6);
                sockets.set(index, &l.fd, 0).map_err(map_err)?;
            }
        }
        if self.listener_link.is_none() {
            let netns =
                std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| RedirectError::Attach {
                    iface: "network namespace".into(),
                    reason: format!("opening /proc/thread-self/ns/net: {e}"),
                })?;
            let prog: &mut SkLookup = self
                .ebpf
                .program_mut(LISTENER_PROGRAM_NAME)
                .ok_or(RedirectError::Missing("program ztunnel_listener"))?
                .try_into()?;
            prog.load()?;
            let id = prog.attach(&netns)?;
            self.listener_link = Some(prog.take_link(id)?);
        }
        self.listeners_served = listeners.iter().map(|l| (l.role, l.ipv6)).collect();
        info!(listeners = ?self.listeners_served, "listener lookups of enrolled pods' flows served");
        Ok(())
    }

    /// Makes `want` the addresses whose DNS is not handed to the DNS proxy (pods that opted out
    /// with `ambient.istio.io/bypass-dns-capture`): adds the missing ones first, then removes
    /// the others. Only enrolled pods' DNS is captured at all, so an address may be set here
    /// before it is enrolled (and should be, so that its first query is not captured).
    pub fn set_dns_bypass(&mut self, want: &BTreeSet<IpAddr>) -> Result<(), RedirectError> {
        let map_err = |source| RedirectError::Map { name: "dns_bypass", source };
        let add: Vec<IpAddr> = want.difference(&self.dns_bypass).copied().collect();
        let remove: Vec<IpAddr> = self.dns_bypass.difference(want).copied().collect();
        for ip in add {
            self.dns_bypass_map()?.insert(map_key(ip), 1, 0).map_err(map_err)?;
            self.dns_bypass.insert(ip);
            info!(%ip, "DNS capture bypassed for the pod");
        }
        for ip in remove {
            match self.dns_bypass_map()?.remove(&map_key(ip)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => return Err(map_err(source)),
            }
            self.dns_bypass.remove(&ip);
            info!(%ip, "DNS capture no longer bypassed");
        }
        Ok(())
    }

    /// Makes `ports` the inbound ports of enrolled addresses left out of capture.
    pub fn set_inbound_bypass(&mut self, ports: &[u16]) -> Result<(), RedirectError> {
        let map_err = |source| RedirectError::Map { name: "inbound_bypass", source };
        let map = self.ebpf.map_mut("inbound_bypass").ok_or(RedirectError::Missing("map inbound_bypass"))?;
        let mut map: HashMap<_, u32, u32> = HashMap::try_from(map).map_err(map_err)?;
        let present: Vec<u32> = map.keys().filter_map(Result::ok).collect();
        for port in present.iter().filter(|p| !ports.iter().any(|w| u32::from(*w) == **p)) {
            map.remove(port).map_err(map_err)?;
        }
        for port in ports {
            map.insert(u32::from(*port), 1, 0).map_err(map_err)?;
        }
        if !ports.is_empty() {
            info!(?ports, "inbound ports left out of capture");
        }
        Ok(())
    }

    /// The addresses whose DNS is not handed to the DNS proxy.
    pub fn dns_bypassed(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.dns_bypass.iter().copied()
    }

    /// Enrolled pod addresses.
    pub fn enrolled(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.pods.keys().copied()
    }

    /// What is attached where, and the program's counters.
    pub fn status(&self) -> Status {
        let mode = if self.tcx { "tcx" } else { "netlink" };
        let interfaces = self
            .interfaces
            .iter()
            .map(|(name, a)| (name.clone(), InterfaceStatus { mode, uplink: a.uplink, pods: a.pods.clone() }))
            .collect();
        Status {
            settings: Some(self.settings.clone()),
            program_id: self.program_id,
            interfaces,
            pods: self.pods.clone(),
            stats: self.stats(),
            adopted: self.adopted,
            listeners: self.listeners_served.clone(),
            dns_bypass: self.dns_bypass.clone(),
        }
    }

    /// Lets go of the program without removing anything: capture stays in the kernel (pinned)
    /// for the next ztunnel to adopt. This is what dropping does too; it only logs it.
    pub fn release(self) {
        info!(
            pin_dir = %self.settings.pin_dir.display(),
            pods = self.pods.len(),
            "ztunnel stopping: capture stays in place (pinned); enrolled pods' new connections fail until a ztunnel runs again"
        );
    }

    fn stats(&self) -> BTreeMap<&'static str, u64> {
        let Some(map) = self.ebpf.map("stats") else { return BTreeMap::new() };
        let Ok(array) = PerCpuArray::<_, u64>::try_from(map) else { return BTreeMap::new() };
        STAT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = array.get(&(i as u32), 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0);
                (*name, total)
            })
            .collect()
    }

    fn enrolled_map(&mut self) -> Result<HashMap<&mut aya::maps::MapData, [u8; 16], u32>, RedirectError> {
        let map = self.ebpf.map_mut("enrolled").ok_or(RedirectError::Missing("map enrolled"))?;
        HashMap::try_from(map).map_err(|source| RedirectError::Map { name: "enrolled", source })
    }

    fn dns_bypass_map(&mut self) -> Result<HashMap<&mut aya::maps::MapData, [u8; 16], u32>, RedirectError> {
        let map = self.ebpf.map_mut("dns_bypass").ok_or(RedirectError::Missing("map dns_bypass"))?;
        HashMap::try_from(map).map_err(|source| RedirectError::Map { name: "dns_bypass", source })
    }

    fn ensure_attached(&mut self, iface: &str, uplink: bool) -> Result<(), RedirectError> {
        if self.interfaces.contains_key(iface) {
            return Ok(());
        }
        let attach_err = |reason: String| RedirectError::Attach { iface: iface.to_string(), reason };
        let link = if self.tcx {
            let path = self.settings.pin_dir.join(pin::LINKS_DIR).join(pin::link_pin_name(iface));
            // A pin adoption could not use (its interface was replaced) is stale.
            pin::remove_pin(&path)?;
            let prog = program(&mut self.ebpf)?;
            let id = prog.attach(iface, TcAttachType::Ingress).map_err(|e| attach_err(e.to_string()))?;
            let link = prog.take_link(id)?;
            let fd = FdLink::try_from(link).map_err(|e| attach_err(e.to_string()))?;
            let pinned = fd.pin(&path).map_err(|e| attach_err(format!("pinning the link: {e}")))?;
            Some((FdLink::from(pinned), path))
        } else {
            // Netlink filters outlive the process by themselves: add clsact if missing and drop
            // a filter a previous run left before adding ours.
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(e) if e.to_string().contains("exist") => {}
                Err(e) => return Err(attach_err(format!("adding clsact: {e}"))),
            }
            if tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM_NAME).is_ok() {
                info!(iface, "replaced a capture filter left by a previous run");
            }
            let prog = program(&mut self.ebpf)?;
            let id = prog.attach(iface, TcAttachType::Ingress).map_err(|e| attach_err(e.to_string()))?;
            // Owned by nobody: the filter stays when this process exits.
            std::mem::forget(prog.take_link(id)?);
            None
        };
        debug!(iface, tcx = self.tcx, "capture program attached");
        self.interfaces.insert(iface.to_string(), Attached { link, uplink, pods: BTreeSet::new() });
        Ok(())
    }

    fn detach(&mut self, iface: &str) -> Result<(), RedirectError> {
        let Some(attached) = self.interfaces.remove(iface) else { return Ok(()) };
        match attached.link {
            // Removing the pin and closing our descriptor releases the link.
            Some((fd, path)) => {
                pin::remove_pin(&path)?;
                drop(fd);
            }
            None => match tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM_NAME) {
                Ok(()) => {}
                Err(_) if !interface_exists(iface) => {}
                Err(e) => return Err(attach_err_tc(iface, e)),
            },
        }
        debug!(iface, "capture program detached");
        Ok(())
    }
}

fn attach_err_tc(iface: &str, e: tc::TcError) -> RedirectError {
    RedirectError::Attach { iface: iface.to_string(), reason: format!("detaching: {e}") }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, RedirectError> {
    let program = ebpf.program_mut(PROGRAM_NAME).ok_or(RedirectError::Missing("program ztunnel_capture"))?;
    Ok(program.try_into()?)
}

fn interface_exists(iface: &str) -> bool {
    // Unknown (the listing failed): assume it exists, so errors are reported, not hidden.
    routing::interfaces().map(|names| names.iter().any(|n| n == iface)).unwrap_or(true)
}

/// The programs attached (TCX, ingress) to `iface` in this namespace, by kernel id.
pub fn attached_programs(iface: &str) -> Result<Vec<u32>, RedirectError> {
    let (_, programs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)?;
    Ok(programs.iter().map(|p| p.id()).collect())
}
