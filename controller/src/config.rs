//! The controller's configuration: one plain struct, parsed from flags and environment in one
//! place. Tests build [`Config`] directly.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::identity::{CaConfig, Identity};
use common::telemetry::LogFormat;

/// The GatewayClass we own by default.
pub const DEFAULT_GATEWAY_CLASS: &str = "ambient-waypoint";
/// The `controllerName` of our GatewayClass (a domain of ours).
pub const DEFAULT_CONTROLLER_NAME: &str = "waypoint.ambient.dev/controller";
/// Where waypoints reach our delta ADS server (mTLS).
pub const DEFAULT_XDS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15012);
pub const DEFAULT_ADMIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15000);
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15020);
pub const DEFAULT_READINESS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 15021);
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_ISTIOD_ADDRESS: &str = common::xds::args::DEFAULT_ISTIOD_ADDRESS;
/// How long a leader's Lease lasts without renewal before another replica may take it.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(
    name = "ambient-controller",
    version,
    about = "Waypoint controller of the ambient mesh: provisions waypoint Gateways and serves their configuration"
)]
pub struct Args {
    /// The GatewayClass whose Gateways we provision and program.
    #[arg(long, env = "GATEWAY_CLASS", default_value = DEFAULT_GATEWAY_CLASS)]
    pub gateway_class: String,
    /// The GatewayClass `spec.controllerName` we answer to.
    #[arg(long, env = "CONTROLLER_NAME", default_value = DEFAULT_CONTROLLER_NAME)]
    pub controller_name: String,
    /// Image of the waypoints we deploy.
    #[arg(long, env = "WAYPOINT_IMAGE", default_value = "ambient-waypoint:latest")]
    pub waypoint_image: String,
    /// Namespace the controller runs in (its Lease lives there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambient-system")]
    pub namespace: String,
    /// This replica's name (holder of the Lease).
    #[arg(long, env = "POD_NAME", default_value = "ambient-controller")]
    pub pod_name: String,
    /// The controller's service account (its SPIFFE identity).
    #[arg(long, env = "SERVICE_ACCOUNT", default_value = "ambient-controller")]
    pub service_account: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Name of the Lease that elects the replica writing to the API server.
    #[arg(long, env = "LEASE_NAME", default_value = "ambient-controller")]
    pub lease_name: String,
    /// The address waypoints are told to fetch their configuration from (our xDS service).
    #[arg(long, env = "WAYPOINT_XDS_ADDRESS")]
    pub waypoint_xds_address: Option<String>,
    /// istiod's CA, for our own certificate and the waypoints' (the mesh CA).
    #[arg(long, env = "CA_ADDRESS", default_value = DEFAULT_ISTIOD_ADDRESS)]
    pub ca_address: String,
    /// PEM root(s) of the mesh (istiod's `istio-ca-root-cert`).
    #[arg(long, env = "XDS_ROOT_CA", default_value = "/var/run/secrets/istio/root-cert.pem")]
    pub root_cert: PathBuf,
    /// Service-account token (audience `istio-ca`) sent to the CA.
    #[arg(long, env = "XDS_TOKEN_PATH", default_value = "/var/run/secrets/tokens/istio-token")]
    pub token_path: PathBuf,
    /// Sign certificates with a local root kept in DIR instead of istiod's CA (tests, demos).
    #[arg(long, env = "LOCAL_CA_DIR", value_name = "DIR")]
    pub local_ca: Option<PathBuf>,
    #[arg(long, env = "XDS_LISTEN_ADDR", default_value_t = DEFAULT_XDS_ADDR)]
    pub xds_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value_t = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

/// Everything the controller runs with.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub gateway_class: String,
    pub controller_name: String,
    pub waypoint_image: String,
    pub namespace: String,
    pub pod_name: String,
    /// Our own identity (the server identity waypoints verify).
    pub identity: Identity,
    pub trust_domain: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    /// What provisioned waypoints are configured with to reach us and the CA.
    pub waypoint_xds_address: String,
    pub waypoint_ca_address: String,
    pub ca: CaConfig,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub log_format: LogFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    AdminNotLoopback(#[from] common::admin::NotLoopback),
    #[error("invalid identity: {0}")]
    Identity(String),
}

impl Config {
    pub fn from_args(args: Args) -> Result<Self, ConfigError> {
        common::admin::require_loopback(args.admin_addr)?;
        let identity = Identity::new(&args.trust_domain, &args.namespace, &args.service_account)
            .map_err(|e| ConfigError::Identity(e.to_string()))?;
        let ca = CaConfig::from_flags(
            args.local_ca.as_deref(),
            Some(&args.ca_address),
            None,
            DEFAULT_ISTIOD_ADDRESS,
            &args.root_cert,
            Some(&args.token_path),
        );
        let waypoint_xds_address = args.waypoint_xds_address.unwrap_or_else(|| {
            format!("https://{}.{}.svc:{}", args.service_account, args.namespace, args.xds_addr.port())
        });
        Ok(Self {
            gateway_class: args.gateway_class,
            controller_name: args.controller_name,
            waypoint_image: args.waypoint_image,
            namespace: args.namespace,
            pod_name: args.pod_name,
            identity,
            trust_domain: args.trust_domain,
            lease_name: args.lease_name,
            lease_duration: DEFAULT_LEASE_DURATION,
            waypoint_xds_address,
            waypoint_ca_address: args.ca_address,
            ca,
            xds_addr: args.xds_addr,
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            log_format: args.log_format,
        })
    }
}
