//! The waypoint's configuration: one plain struct, parsed from flags and environment in one
//! place. Names follow Istio's where Istio has one (POD_NAMESPACE, XDS_ADDRESS, ...).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::Parser;
use common::telemetry::LogFormat;
use common::xds::{ControlPlaneArgs, NodeInfo, Source, SourceError};

use crate::route::normalize::PathNormalization;
use crate::upstream::Balance;

/// The `mesh` listener (HBONE).
pub const DEFAULT_LISTEN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15008);
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15020);
pub const DEFAULT_READINESS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15021);
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a new tunnel may stay silent before its protocol (HTTP/1.1 or HTTP/2) is known.
pub const DEFAULT_PROTOCOL_DETECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send a request's head (slowloris guard).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A tunnel with no request in flight for this long is closed (Envoy's HCM default).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// HTTP/2 PING interval on tunnels and the wait for its answer.
pub const DEFAULT_H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body buffered for retries or mirrors may take to arrive.
pub const DEFAULT_REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connecting to an endpoint (TCP, mTLS, CONNECT) (Istio's cluster connect timeout).
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on every wait of the request path, and how request paths are normalized.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Limits {
    /// Istio's `meshConfig.pathNormalization`: `BASE` (default), `MERGE_SLASHES`,
    /// `DECODE_AND_MERGE_SLASHES` or `NONE`.
    pub path_normalization: PathNormalization,
    #[serde(serialize_with = "human")]
    pub protocol_detection_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub header_read_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub h2_keepalive_interval: Duration,
    #[serde(serialize_with = "human")]
    pub h2_keepalive_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub request_body_timeout: Duration,
    #[serde(serialize_with = "human")]
    pub upstream_connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            path_normalization: PathNormalization::default(),
            protocol_detection_timeout: DEFAULT_PROTOCOL_DETECTION_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            h2_keepalive_interval: DEFAULT_H2_KEEPALIVE_INTERVAL,
            h2_keepalive_timeout: DEFAULT_H2_KEEPALIVE_TIMEOUT,
            request_body_timeout: DEFAULT_REQUEST_BODY_TIMEOUT,
            upstream_connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
        }
    }
}

fn human<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// A duration flag: `250ms`, `5s`, `1m`, `1h` (not zero).
fn duration_arg(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

pub use common::identity::CaConfig;

/// Everything the waypoint needs to start. Tests build it directly.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    #[serde(skip)]
    pub source: Source,
    pub source_description: String,
    pub node: NodeInfo,
    /// `namespace/name` of this waypoint (the Gateway); routes may attach to it.
    pub name: String,
    pub namespace: String,
    /// The identity the waypoint proves: `spiffe://<trust domain>/ns/<namespace>/sa/<this>`.
    pub service_account: String,
    pub trust_domain: String,
    /// `namespace/hostname` of the waypoint's own service (how services name their waypoint).
    pub service_hostname: String,
    /// The waypoint's own addresses (services may name their waypoint by address).
    pub addresses: Vec<IpAddr>,
    pub network: String,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub log_format: LogFormat,
    pub ca: CaConfig,
    pub cert_lifetime: Duration,
    pub balance: Balance,
    /// Access log destination: `-` (stdout) or a file.
    pub access_log: String,
    /// After SIGTERM, how long requests in flight may run before their tunnels are closed.
    pub drain_period: Duration,
    /// OTLP/gRPC collector for spans (`http://host:4317`); none: spans are not exported.
    pub otlp_endpoint: Option<String>,
    /// Percent of new traces sampled (a caller's decision is followed).
    pub trace_sampling: f64,
    pub limits: Limits,
}

#[derive(Debug, Parser)]
#[command(name = "waypoint", version, about = "L7 proxy of the ambient mesh")]
pub struct Args {
    #[command(flatten)]
    pub control_plane: ControlPlaneArgs,
    /// Name of the waypoint (its Gateway).
    #[arg(long, env = "WAYPOINT_NAME", default_value = "waypoint")]
    pub name: String,
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Service account (defaults to the waypoint's name, as Istio deploys it).
    #[arg(long, env = "SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    #[arg(long, env = "TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Hostname of the waypoint's service (default `<name>.<namespace>.svc.cluster.local`).
    #[arg(long, env = "WAYPOINT_SERVICE")]
    pub service_hostname: Option<String>,
    /// The waypoint's own addresses (comma-separated).
    #[arg(long = "address", env = "INSTANCE_IP", value_delimiter = ',')]
    pub addresses: Vec<IpAddr>,
    #[arg(long, env = "NETWORK", default_value = "")]
    pub network: String,
    #[arg(long, env = "NODE_NAME", default_value = "local")]
    pub node_name: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, default_value_t = DEFAULT_LISTEN_ADDR)]
    pub listen_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// `least-request` (default), `round-robin` or `random`; a DestinationRule may choose per service.
    #[arg(long, env = "LOAD_BALANCING", default_value = "least-request")]
    pub balance: Balance,
    /// Access log: `-` for stdout, or a file to append to.
    #[arg(long, env = "ACCESS_LOG", default_value = "-")]
    pub access_log: String,
    /// Seconds requests in flight may run after SIGTERM.
    #[arg(long, env = "DRAIN_PERIOD_SECONDS", default_value_t = 5)]
    pub drain_period_seconds: u64,
    /// OTLP/gRPC collector for spans, e.g. `http://otel-collector:4317`.
    #[arg(long, env = "OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Percent of new traces sampled (Istio's default is 1).
    #[arg(long, env = "TRACE_SAMPLING", default_value_t = 1.0)]
    pub trace_sampling: f64,
    /// Request path normalization: BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES or NONE.
    #[arg(long, env = "PATH_NORMALIZATION", default_value = "BASE")]
    pub path_normalization: PathNormalization,
    /// How long a new tunnel may stay silent before its protocol is known.
    /// Default: 5s.
    #[arg(long, env = "PROTOCOL_DETECTION_TIMEOUT", value_parser = duration_arg)]
    pub protocol_detection_timeout: Option<Duration>,
    /// How long a client may take to send a request's head.
    /// Default: 30s.
    #[arg(long, env = "HEADER_READ_TIMEOUT", value_parser = duration_arg)]
    pub header_read_timeout: Option<Duration>,
    /// A tunnel with no request in flight for this long is closed.
    /// Default: 1h.
    #[arg(long, env = "IDLE_TIMEOUT", value_parser = duration_arg)]
    pub idle_timeout: Option<Duration>,
    /// HTTP/2 PING interval on tunnels; a PING unanswered for `--h2-keepalive-timeout` closes it.
    /// Default: 30s.
    #[arg(long, env = "H2_KEEPALIVE_INTERVAL", value_parser = duration_arg)]
    pub h2_keepalive_interval: Option<Duration>,
    /// Default: 10s.
    #[arg(long, env = "H2_KEEPALIVE_TIMEOUT", value_parser = duration_arg)]
    pub h2_keepalive_timeout: Option<Duration>,
    /// How long a request body buffered for retries or mirrors may take to arrive.
    /// Default: 30s.
    #[arg(long, env = "REQUEST_BODY_TIMEOUT", value_parser = duration_arg)]
    pub request_body_timeout: Option<Duration>,
    /// Connecting to an endpoint (TCP, mTLS and CONNECT).
    /// Default: 10s.
    #[arg(long, env = "UPSTREAM_CONNECT_TIMEOUT", value_parser = duration_arg)]
    pub upstream_connect_timeout: Option<Duration>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    AdminNotLoopback(#[from] common::admin::NotLoopback),
    #[error(transparent)]
    Source(#[from] SourceError),
}

impl Config {
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        common::admin::require_loopback(args.admin_addr)?;
        let node = NodeInfo {
            proxy_type: "waypoint".into(),
            ip: args.addresses.first().map(ToString::to_string).unwrap_or_default(),
            pod_name: args.name.clone(),
            namespace: args.namespace.clone(),
            node_name: args.node_name.clone(),
            cluster_id: args.cluster_id.clone(),
            extra: Default::default(),
        };
        let ca = args.control_plane.ca();
        let (source, source_description) = args.control_plane.source(&node)?;
        let service_hostname = args
            .service_hostname
            .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", args.name, args.namespace));
        Ok(Self {
            source,
            source_description,
            node,
            name: format!("{}/{}", args.namespace, args.name),
            service_account: args.service_account.unwrap_or_else(|| args.name.clone()),
            namespace: args.namespace.clone(),
            trust_domain: args.trust_domain,
            service_hostname: format!("{}/{service_hostname}", args.namespace),
            addresses: args.addresses,
            network: args.network,
            listen_addr: args.listen_addr,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            log_format: args.log_format,
            ca,
            cert_lifetime: DEFAULT_CERT_LIFETIME,
            balance: args.balance,
            access_log: args.access_log,
            drain_period: Duration::from_secs(args.drain_period_seconds),
            otlp_endpoint: args.otlp_endpoint,
            trace_sampling: args.trace_sampling.clamp(0.0, 100.0),
            limits: {
                let d = Limits::default();
                Limits {
                    path_normalization: args.path_normalization,
                    protocol_detection_timeout: args
                        .protocol_detection_timeout
                        .unwrap_or(d.protocol_detection_timeout),
                    header_read_timeout: args.header_read_timeout.unwrap_or(d.header_read_timeout),
                    idle_timeout: args.idle_timeout.unwrap_or(d.idle_timeout),
                    h2_keepalive_interval: args.h2_keepalive_interval.unwrap_or(d.h2_keepalive_interval),
                    h2_keepalive_timeout: args.h2_keepalive_timeout.unwrap_or(d.h2_keepalive_timeout),
                    request_body_timeout: args.request_body_timeout.unwrap_or(d.request_body_timeout),
                    upstream_connect_timeout: args
                        .upstream_connect_timeout
                        .unwrap_or(d.upstream_connect_timeout),
                }
            },
        })
    }
}
