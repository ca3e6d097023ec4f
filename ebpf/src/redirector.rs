//! Loads the capture program once, and enrolls pods: their IP goes into the `enrolled` map and
//! the program is attached at tc ingress of their host-side interface (TCX on kernels >= 6.6,
//! clsact + netlink otherwise). Uplinks get the same program for traffic from other nodes.
//! Dropping the redirector detaches everything and removes the routing rule.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use aya::maps::{Array, HashMap, MapError, PerCpuArray};
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachType};
use aya::programs::{ProgramError, SchedClassifier};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfError};
use tracing::{debug, info, warn};

use crate::routing::{self, RoutingError};

/// The compiled program (see `bpf/redirect.c`).
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect.o"));
/// Program (function) name; also what the kernel lists it as.
pub const PROGRAM_NAME: &str = "ztunnel_capture";

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
    #[error("only IPv4 pods are redirected so far; {0} is IPv6")]
    Ipv6(IpAddr),
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

/// Counters the program keeps (indexes of its `stats` map).
const STAT_NAMES: [&str; 6] = [
    "captured_outbound",
    "captured_inbound",
    "captured_hbone",
    "followed_socket",
    "dropped_no_listener",
    "assign_failed",
];

/// What is attached where, for the admin endpoint and tests.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Status {
    pub settings: Option<Settings>,
    /// Interface -> how it is attached and why.
    pub interfaces: BTreeMap<String, InterfaceStatus>,
    /// Enrolled pod IP -> interface.
    pub pods: BTreeMap<Ipv4Addr, String>,
    /// Program counters, summed over CPUs.
    pub stats: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct InterfaceStatus {
    /// `tcx` or `netlink`.
    pub mode: &'static str,
    pub uplink: bool,
    pub pods: BTreeSet<Ipv4Addr>,
}

struct Attached {
    link: SchedClassifierLinkId,
    mode: &'static str,
    uplink: bool,
    pods: BTreeSet<Ipv4Addr>,
}

/// The loaded program and everything attached with it.
pub struct Redirector {
    ebpf: Ebpf,
    settings: Settings,
    tcx: bool,
    interfaces: BTreeMap<String, Attached>,
    pods: BTreeMap<Ipv4Addr, String>,
    /// False once torn down.
    active: bool,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("interfaces", &self.interfaces.keys())
            .field("pods", &self.pods)
            .finish()
    }
}

impl Redirector {
    /// Loads the program, writes its settings and installs the routing rule (replacing any
    /// left by a previous run). Needs CAP_BPF and CAP_NET_ADMIN.
    pub fn load(settings: Settings) -> Result<Self, RedirectError> {
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT)?;
        {
            let map = ebpf.map_mut("settings").ok_or(RedirectError::Missing("map settings"))?;
            let mut array: Array<_, [u32; 5]> =
                Array::try_from(map).map_err(|source| RedirectError::Map { name: "settings", source })?;
            array
                .set(0, settings.to_words(), 0)
                .map_err(|source| RedirectError::Map { name: "settings", source })?;
        }
        program(&mut ebpf)?.load()?;
        routing::install(settings.redirect_mark, settings.route_table, settings.rule_priority)?;
        let tcx = KernelVersion::current().map(|v| v >= KernelVersion::new(6, 6, 0)).unwrap_or(false);
        info!(tcx, mark = settings.redirect_mark, table = settings.route_table, "eBPF redirection loaded");
        Ok(Self { ebpf, settings, tcx, interfaces: BTreeMap::new(), pods: BTreeMap::new(), active: true })
    }

    /// Captures `ip`'s traffic on `iface` (its host-side interface). Idempotent; a pod that
    /// moved interface is re-attached.
    pub fn enroll(&mut self, ip: IpAddr, iface: &str) -> Result<(), RedirectError> {
        let IpAddr::V4(ip) = ip else { return Err(RedirectError::Ipv6(ip)) };
        match self.pods.get(&ip) {
            Some(current) if current == iface => return Ok(()),
            Some(_) => {
                self.unenroll(IpAddr::V4(ip))?;
            }
            None => {}
        }
        self.ensure_attached(iface, false)?;
        self.enrolled_map()?
            .insert(u32::from_ne_bytes(ip.octets()), 1, 0)
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
        let IpAddr::V4(ip) = ip else { return Ok(false) };
        let Some(iface) = self.pods.remove(&ip) else { return Ok(false) };
        match self.enrolled_map()?.remove(&u32::from_ne_bytes(ip.octets())) {
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
        self.interfaces.retain(|name, a| {
            let keep = !(a.uplink && a.pods.is_empty() && !existing.contains(name));
            if !keep {
                debug!(iface = %name, "uplink interface gone");
            }
            keep
        });
    }

    /// The interface `ip` is enrolled on, if it is.
    pub fn interface_of(&self, ip: IpAddr) -> Option<&str> {
        let IpAddr::V4(ip) = ip else { return None };
        self.pods.get(&ip).map(String::as_str)
    }

    /// True if the program is attached to `iface` as an uplink.
    pub fn is_uplink(&self, iface: &str) -> bool {
        self.interfaces.get(iface).is_some_and(|a| a.uplink)
    }

    /// Enrolled pod IPs.
    pub fn enrolled(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.pods.keys().copied()
    }

    /// What is attached where, and the program's counters.
    pub fn status(&self) -> Status {
        let interfaces = self
            .interfaces
            .iter()
            .map(|(name, a)| {
                (name.clone(), InterfaceStatus { mode: a.mode, uplink: a.uplink, pods: a.pods.clone() })
            })
            .collect();
        Status {
            settings: Some(self.settings.clone()),
            interfaces,
            pods: self.pods.clone(),
            stats: self.stats(),
        }
    }

    /// Detaches from every interface and removes the routing rule.
    pub fn shutdown(mut self) -> Result<(), RedirectError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), RedirectError> {
        self.active = false;
        let names: Vec<String> = self.interfaces.keys().cloned().collect();
        let mut first_err = None;
        for name in names {
            if let Err(e) = self.detach(&name) {
                warn!(iface = %name, error = %e, "detach failed");
                first_err.get_or_insert(e);
            }
        }
        self.pods.clear();
        if let Err(e) = routing::uninstall(self.settings.redirect_mark, self.settings.route_table) {
            first_err.get_or_insert(e.into());
        }
        info!("eBPF redirection removed");
        first_err.map_or(Ok(()), Err)
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

    fn enrolled_map(&mut self) -> Result<HashMap<&mut aya::maps::MapData, u32, u8>, RedirectError> {
        let map = self.ebpf.map_mut("enrolled").ok_or(RedirectError::Missing("map enrolled"))?;
        HashMap::try_from(map).map_err(|source| RedirectError::Map { name: "enrolled", source })
    }

    fn ensure_attached(&mut self, iface: &str, uplink: bool) -> Result<(), RedirectError> {
        if self.interfaces.contains_key(iface) {
            return Ok(());
        }
        let attach_err = |reason: String| RedirectError::Attach { iface: iface.to_string(), reason };
        if !self.tcx {
            // Netlink filters outlive the process: add clsact if missing and drop a filter a
            // previous run left before adding ours.
            match tc::qdisc_add_clsact(iface) {
                Ok(()) => {}
                Err(e) if e.to_string().contains("exist") => {}
                Err(e) => return Err(attach_err(format!("adding clsact: {e}"))),
            }
            if tc::qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM_NAME).is_ok() {
                info!(iface, "removed a stale capture filter left by a previous run");
            }
        }
        let link = program(&mut self.ebpf)?
            .attach(iface, TcAttachType::Ingress)
            .map_err(|e| attach_err(e.to_string()))?;
        let mode = if self.tcx { "tcx" } else { "netlink" };
        debug!(iface, mode, "capture program attached");
        self.interfaces.insert(iface.to_string(), Attached { link, mode, uplink, pods: BTreeSet::new() });
        Ok(())
    }

    fn detach(&mut self, iface: &str) -> Result<(), RedirectError> {
        let Some(attached) = self.interfaces.remove(iface) else { return Ok(()) };
        match program(&mut self.ebpf)?.detach(attached.link) {
            Ok(()) => {
                debug!(iface, "capture program detached");
                Ok(())
            }
            // The interface went away with its pod: nothing left to detach.
            Err(e) if !interface_exists(iface) => {
                debug!(iface, error = %e, "interface gone before detach");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Redirector {
    fn drop(&mut self) {
        if self.active
            && let Err(e) = self.teardown()
        {
            warn!(error = %e, "eBPF redirection teardown incomplete");
        }
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, RedirectError> {
    let program = ebpf.program_mut(PROGRAM_NAME).ok_or(RedirectError::Missing("program ztunnel_capture"))?;
    Ok(program.try_into()?)
}

fn interface_exists(iface: &str) -> bool {
    // Unknown (the listing failed): assume it exists, so errors are reported, not hidden.
    routing::interfaces().map(|names| names.iter().any(|n| n == iface)).unwrap_or(true)
}
