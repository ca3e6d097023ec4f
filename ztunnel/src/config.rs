//! ztunnel's configuration: one plain struct, parsed from flags and environment in one place.
//! Environment names follow Istio's ztunnel so a DaemonSet spec carries over.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use common::telemetry::LogFormat;
use common::xds::{ControlPlaneArgs, NodeInfo, Source, SourceError};

use crate::cni::{CniConfig, DEFAULT_POD_WAIT};
use crate::proxy::{OutboundPolicy, ProxyConfig};
use crate::redirect::StaticPod;

/// Admin endpoint (config dump, log level); loopback only.
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
/// Prometheus endpoint.
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15020);
/// Readiness endpoint.
pub const DEFAULT_READINESS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15021);
/// istiod's xDS address inside a cluster.
pub const DEFAULT_XDS_ADDRESS: &str = common::xds::args::DEFAULT_ISTIOD_ADDRESS;
/// Outbound capture listener.
pub const DEFAULT_OUTBOUND_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15001);
/// Inbound plaintext capture listener.
pub const DEFAULT_INBOUND_PLAINTEXT_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15006);
/// Inbound HBONE listener.
pub const DEFAULT_INBOUND_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15008);
/// Trust domain of workloads that name none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Lifetime asked for workload certificates.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long open connections may run after SIGTERM.
pub const DEFAULT_DRAIN_PERIOD: Duration = Duration::from_secs(5);

pub use common::identity::CaConfig;

/// Everything ztunnel needs to start. Tests build it directly.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    /// Where workloads, services and policies come from.
    #[serde(skip)]
    pub source: Source,
    /// Human-readable form of `source`, for the start-up log and the config dump.
    pub source_description: String,
    /// The node this ztunnel serves (matches workloads' `node` field).
    pub node_name: String,
    /// Who we are to the control plane.
    pub node: NodeInfo,
    /// Admin server (must be a loopback address).
    pub admin_addr: SocketAddr,
    /// Prometheus server.
    pub metrics_addr: SocketAddr,
    /// Readiness server.
    pub readiness_addr: SocketAddr,
    /// Log format.
    pub log_format: LogFormat,
    /// Redirect enrolled pods' traffic with eBPF (needs root or CAP_BPF + CAP_NET_ADMIN).
    pub redirect: bool,
    /// Interfaces traffic from other nodes arrives on (captured for enrolled pods); `*` is every
    /// interface but loopback, including other pods' veths.
    pub uplinks: Vec<String>,
    /// Pods enrolled whatever the control plane says (VM/ECS hosts): `ip` or `ip@interface`.
    pub static_pods: Vec<StaticPod>,
    /// Marks, ports and the bpffs pin directory of the eBPF redirection.
    pub redirect_settings: ebpf::Settings,
    /// The network this node is on (workload and VIP addresses are looked up in it).
    pub network: String,
    /// Where workload certificates come from.
    pub ca: CaConfig,
    /// Lifetime asked for workload certificates.
    pub cert_lifetime: Duration,
    /// The proxies (15001/15006/15008); `None` when ztunnel only syncs configuration.
    pub proxy: Option<ProxyConfig>,
    /// After SIGTERM, how long open connections may run before they are closed.
    pub drain_period: Duration,
    /// Enrollment at pod creation through the CNI plugin (socket + Kubernetes watch); `None`
    /// when off.
    pub enrollment: Option<CniConfig>,
    /// The DNS proxy (15053); `None` when off.
    pub dns: Option<crate::dns::DnsConfig>,
    /// Host mode (a VM or ECS host): the host's own processes are the workload; `None` when off.
    pub host: Option<HostConfig>,
    /// Inbound ports of enrolled addresses left out of capture (a host's SSH).
    pub inbound_bypass_ports: Vec<u16>,
}

/// Host mode: ztunnel is the mesh proxy of the host it runs on.
#[derive(Clone, Debug, serde::Serialize)]
pub struct HostConfig {
    /// The host's workload addresses (as the control plane knows the workload), each with the
    /// interface its inbound traffic arrives on (else the one carrying it, found at start); also
    /// the source of its captured connections.
    pub addresses: Vec<StaticPod>,
    /// The cgroup (v2) whose processes' connections are captured (ztunnel's own cgroup inside it
    /// is left alone).
    pub cgroup: PathBuf,
}

/// Command line and environment.
#[derive(Debug, Parser)]
#[command(name = "ztunnel", version, about = "L4 node proxy of the ambient mesh")]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,
    /// Directory on a BPF filesystem where the capture (program, maps, links) is pinned so it
    /// outlives ztunnel; one per node. Mounted as bpffs when its parent is not one.
    #[arg(long, env = "ZTUNNEL_BPF_PIN_DIR", default_value = ebpf::pin::DEFAULT_PIN_DIR, global = true)]
    pub bpf_pin_dir: PathBuf,
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    pub node_name: String,
    #[arg(long, env = "POD_NAME", default_value = "ztunnel")]
    pub pod_name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub pod_namespace: String,
    #[arg(long, env = "INSTANCE_IP", default_value = "127.0.0.1")]
    pub instance_ip: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, default_value_t = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    /// `text` or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Redirect enrolled pods' traffic to ztunnel with eBPF.
    #[arg(long, env = "ZTUNNEL_REDIRECT")]
    pub redirect: bool,
    /// Uplink interfaces (comma-separated) whose traffic to enrolled pods is captured; `*` for
    /// every interface but loopback.
    #[arg(long = "uplink", env = "ZTUNNEL_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,
    /// Pods to enroll explicitly (comma-separated `ip` or `ip@interface`), for hosts without
    /// Kubernetes.
    #[arg(long = "enroll", env = "ZTUNNEL_ENROLL", value_delimiter = ',')]
    pub static_pods: Vec<StaticPod>,
    /// Trust domain peers must share.
    #[arg(long, env = "TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Network of this node.
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    /// Unknown destinations: `passthrough` (default) or `registry-only`.
    #[arg(long, env = "OUTBOUND_POLICY", default_value = "passthrough")]
    pub outbound_policy: OutboundPolicy,
    /// Seconds open connections may run after SIGTERM.
    #[arg(long, env = "DRAIN_PERIOD_SECONDS", default_value_t = DEFAULT_DRAIN_PERIOD.as_secs())]
    pub drain_period_seconds: u64,
    /// Only sync configuration; do not bind the proxies (15001/15006/15008).
    #[arg(long)]
    pub no_proxy: bool,
    /// Unix socket on which the CNI plugin hands new pods over for enrollment before they
    /// start (off when unset; the plugin's default is /var/run/ambient/ztunnel-cni.sock).
    /// Needs --kube-watch and --redirect.
    #[arg(long, env = "ENROLLMENT_SOCKET")]
    pub enrollment_socket: Option<PathBuf>,
    /// Watch this node's pods and the namespaces on Kubernetes, for the enrollment socket's
    /// decisions (client from the in-cluster environment, --kubeconfig or KUBECONFIG).
    #[arg(long, env = "KUBE_WATCH")]
    pub kube_watch: bool,
    /// Kubeconfig file for --kube-watch, instead of the in-cluster environment or KUBECONFIG.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The DNS proxy on 15053, UDP and TCP: answers the mesh's service names itself and
    /// forwards the rest (`--dns-proxy false` turns it off).
    #[arg(long, env = "ZTUNNEL_DNS_PROXY", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_proxy: bool,
    /// Where the DNS proxy listens.
    #[arg(long, env = "ZTUNNEL_DNS_ADDR", default_value_t = DEFAULT_DNS_ADDR)]
    pub dns_addr: SocketAddr,
    /// Resolvers for names that are not the mesh's (comma-separated `ip` or `ip:port`); the
    /// name servers of /etc/resolv.conf when unset.
    #[arg(long = "dns-upstream", env = "ZTUNNEL_DNS_UPSTREAMS", value_delimiter = ',')]
    pub dns_upstreams: Vec<String>,
    /// Milliseconds each upstream resolver may take to answer.
    #[arg(long, env = "ZTUNNEL_DNS_UPSTREAM_TIMEOUT_MS", default_value_t = 2000)]
    pub dns_upstream_timeout_ms: u64,
    /// The cluster's DNS domain (short names expand under it).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Host mode (VM or ECS host): the host's workload addresses, comma-separated `ip` or
    /// `ip@interface` (the interface its inbound traffic arrives on; by default the one that
    /// carries the address). Its processes' TCP
    /// connections are captured (see --host-cgroup), and inbound to these addresses. Implies
    /// --redirect.
    #[arg(long = "host-address", env = "ZTUNNEL_HOST_ADDRESSES", value_delimiter = ',')]
    pub host_addresses: Vec<StaticPod>,
    /// Host mode: the cgroup (v2) whose processes are the workload; the whole cgroup2 hierarchy
    /// (every process of the host but ztunnel itself) when unset.
    #[arg(long, env = "ZTUNNEL_HOST_CGROUP")]
    pub host_cgroup: Option<PathBuf>,
    /// Host mode in an ECS task (awsvpc): the host addresses are the task's own, read at start
    /// from the task metadata endpoint ($ECS_CONTAINER_METADATA_URI_V4/task).
    #[arg(long, env = "ZTUNNEL_HOST_FROM_ECS_METADATA")]
    pub host_from_ecs_metadata: bool,
    /// Inbound ports of enrolled addresses left out of capture, comma-separated (e.g. a host's
    /// SSH port, so it stays reachable while no ztunnel runs).
    #[arg(long = "inbound-bypass-port", env = "ZTUNNEL_INBOUND_BYPASS_PORTS", value_delimiter = ',')]
    pub inbound_bypass_ports: Vec<u16>,
}

/// Where the DNS proxy listens by default.
pub const DEFAULT_DNS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 15053);

/// An upstream resolver given as `ip` (port 53) or `ip:port`.
fn upstream(s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| ConfigError::DnsUpstream(s.to_string()))
}

/// What to do instead of running the proxy.
#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Removes the pinned capture (program, maps, links), netlink filters and routing rules from
    /// this node, and says what it removed. Capture otherwise stays when ztunnel stops; run this
    /// with no ztunnel running, when taking the mesh off the node.
    Uninstall,
    /// Prints the configuration the flags and environment (e.g. a systemd unit's
    /// EnvironmentFile) resolve to, as JSON, and exits: a check before starting.
    Config,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    AdminNotLoopback(#[from] common::admin::NotLoopback),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("--enrollment-socket needs --kube-watch: enrollment is decided with pod and namespace labels")]
    EnrollmentNeedsWatch,
    #[error("--enrollment-socket needs --redirect: enrolling a pod is capturing it with eBPF")]
    EnrollmentNeedsRedirect,
    #[error("--kube-watch only serves --enrollment-socket; set both or neither")]
    WatchWithoutEnrollment,
    #[error("--xds-server-identity is for waypoints fed by our controller; ztunnel's xDS server is istiod")]
    ServerIdentity,
    #[error("--dns-upstream {0:?} is neither an IP address nor ip:port")]
    DnsUpstream(String),
    #[error("host mode: {0}")]
    HostCgroup(String),
    #[error("host mode needs the proxies (not --no-proxy)")]
    HostWithoutProxy,
}

impl Config {
    /// Builds the config from parsed arguments. Binds nothing, spawns nothing.
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        common::admin::require_loopback(args.admin_addr)?;
        if args.control_plane.xds_server_identity.is_some() {
            // ztunnel authenticates to istiod with its token; it would never present a
            // certificate to such a server and so never connect.
            return Err(ConfigError::ServerIdentity);
        }
        let node = NodeInfo {
            proxy_type: "ztunnel".into(),
            ip: args.instance_ip,
            pod_name: args.pod_name,
            namespace: args.pod_namespace,
            node_name: args.node_name.clone(),
            cluster_id: args.cluster_id,
            extra: Default::default(),
        };
        let ca = args.control_plane.ca();
        let proxy = (!args.no_proxy).then(|| ProxyConfig {
            node_name: args.node_name.clone(),
            trust_domain: args.trust_domain.clone(),
            outbound_addr: DEFAULT_OUTBOUND_ADDR,
            inbound_addr: DEFAULT_INBOUND_ADDR,
            inbound_plaintext_addr: DEFAULT_INBOUND_PLAINTEXT_ADDR,
            mark: ebpf::redirector::DEFAULT_ZTUNNEL_MARK,
            outbound_policy: args.outbound_policy,
            host_addresses: args.host_addresses.iter().map(|a| a.ip).collect(),
        });
        let host = if args.host_addresses.is_empty() {
            None
        } else {
            if args.no_proxy {
                return Err(ConfigError::HostWithoutProxy);
            }
            let cgroup = match args.host_cgroup {
                Some(c) => c,
                None => ebpf::host::cgroup2_mount().map_err(ConfigError::HostCgroup)?,
            };
            Some(HostConfig { addresses: args.host_addresses.clone(), cgroup })
        };
        let dns = if args.dns_proxy && !args.no_proxy {
            let mut upstreams =
                args.dns_upstreams.iter().map(|s| upstream(s)).collect::<Result<Vec<_>, _>>()?;
            if upstreams.is_empty() {
                let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                upstreams = crate::dns::forward::resolv_conf(&conf);
            }
            // In host mode, on loopback only: the host's own queries come there, and an address
            // on the network would be an open resolver.
            let host_mode = !args.host_addresses.is_empty();
            let addr = if host_mode && args.dns_addr == DEFAULT_DNS_ADDR {
                SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), DEFAULT_DNS_ADDR.port())
            } else {
                args.dns_addr
            };
            Some(crate::dns::DnsConfig {
                addr,
                upstreams,
                upstream_timeout: Duration::from_millis(args.dns_upstream_timeout_ms),
                domain: args.cluster_domain.trim_matches('.').to_ascii_lowercase(),
                mark: Some(ebpf::redirector::DEFAULT_ZTUNNEL_MARK),
                host_address: args.host_addresses.first().map(|a| a.ip),
            })
        } else {
            None
        };
        let (source, source_description) = args.control_plane.source(&node)?;
        let enrollment = match (args.enrollment_socket, args.kube_watch) {
            (Some(_), false) => return Err(ConfigError::EnrollmentNeedsWatch),
            (Some(_), true) if !args.redirect => return Err(ConfigError::EnrollmentNeedsRedirect),
            (Some(socket), true) => {
                let announced_file = crate::cni::persisted::next_to(&socket);
                Some(CniConfig {
                    socket,
                    kubeconfig: args.kubeconfig,
                    pod_wait: DEFAULT_POD_WAIT,
                    announced_file,
                })
            }
            (None, true) => return Err(ConfigError::WatchWithoutEnrollment),
            (None, false) => None,
        };
        Ok(Self {
            source,
            source_description,
            node_name: args.node_name,
            node,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            log_format: args.log_format,
            redirect: args.redirect || host.is_some(),
            uplinks: args.uplinks,
            static_pods: args.static_pods.into_iter().chain(args.host_addresses).collect(),
            redirect_settings: ebpf::Settings { pin_dir: args.bpf_pin_dir, ..Default::default() },
            network: args.network,
            ca,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            proxy,
            drain_period: Duration::from_secs(args.drain_period_seconds),
            enrollment,
            dns,
            host,
            inbound_bypass_ports: args.inbound_bypass_ports,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let args =
            Args::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied())).expect("parses");
        Config::from_args(args)
    }

    #[test]
    fn admin_must_be_loopback() {
        assert!(matches!(parse(&["--admin-addr", "0.0.0.0:15000"]), Err(ConfigError::AdminNotLoopback(_))));
        assert!(parse(&["--admin-addr", "127.0.0.1:15000"]).is_ok());
    }

    #[test]
    fn one_source_only() {
        let both = parse(&["--local-config", "a.yaml", "--xds-address", "http://127.0.0.1:1"]);
        assert!(matches!(both, Err(ConfigError::Source(SourceError::TwoSources))));
        let local = parse(&["--local-config", "a.yaml"]).expect("local");
        assert!(matches!(local.source, Source::File(_)));
        let istiod = parse(&[]).expect("default");
        let Source::Xds(x) = istiod.source else { panic!("default is xds") };
        assert_eq!(x.target.address, DEFAULT_XDS_ADDRESS);
        assert!(x.target.root_cert.is_some(), "https needs a root");
        let plain = parse(&["--xds-address", "http://127.0.0.1:15010"]).expect("plain");
        let Source::Xds(x) = plain.source else { panic!("xds") };
        assert!(x.target.root_cert.is_none());
    }

    #[test]
    fn the_dns_proxy_is_on_by_default_with_upstreams_from_flags_or_resolv_conf() {
        let on = parse(&[]).expect("default").dns.expect("on by default");
        assert_eq!(on.addr, DEFAULT_DNS_ADDR);
        assert_eq!(on.domain, "cluster.local");
        let set = parse(&["--dns-upstream", "10.0.0.10,10.0.0.11:5353", "--cluster-domain", "Corp.Local."]);
        let set = set.expect("parses").dns.expect("on");
        assert_eq!(set.upstreams, ["10.0.0.10:53".parse().expect("a"), "10.0.0.11:5353".parse().expect("b")]);
        assert_eq!(set.domain, "corp.local");
        assert!(parse(&["--dns-proxy", "false"]).expect("parses").dns.is_none());
        assert!(parse(&["--no-proxy"]).expect("parses").dns.is_none());
        assert!(matches!(parse(&["--dns-upstream", "resolver"]), Err(ConfigError::DnsUpstream(_))));
    }

    #[test]
    fn enrollment_socket_needs_the_watch_and_capture() {
        assert!(parse(&[]).expect("default").enrollment.is_none(), "off by default");
        let sock = ["--enrollment-socket", "/run/z.sock"];
        assert!(matches!(parse(&sock), Err(ConfigError::EnrollmentNeedsWatch)));
        assert!(matches!(
            parse(&[&sock[..], &["--kube-watch"]].concat()),
            Err(ConfigError::EnrollmentNeedsRedirect)
        ));
        assert!(matches!(parse(&["--kube-watch"]), Err(ConfigError::WatchWithoutEnrollment)));
        let on =
            parse(&[&sock[..], &["--kube-watch", "--redirect", "--kubeconfig", "/k"]].concat()).expect("on");
        let cni = on.enrollment.expect("enrollment");
        assert_eq!(cni.socket, PathBuf::from("/run/z.sock"));
        assert_eq!(cni.announced_file, PathBuf::from("/run/announced.json"), "kept next to the socket");
        assert_eq!(cni.kubeconfig, Some(PathBuf::from("/k")));
        assert_eq!(cni.pod_wait, DEFAULT_POD_WAIT);
    }
}
