//! The control-plane flags both binaries take (flattened into their own `Args`): where
//! configuration comes from (istiod, a local control plane or a file) and where certificates
//! come from (istiod's CA or a local root). Environment names follow Istio's.

use std::path::PathBuf;

use super::{NodeInfo, Source, XdsConfig};
use crate::identity::CaConfig;

/// istiod's xDS and CA address inside a cluster.
pub const DEFAULT_ISTIOD_ADDRESS: &str = "https://istiod.istio-system.svc:15012";

#[derive(Clone, Debug, clap::Args)]
pub struct ControlPlaneArgs {
    /// Local config instead of a control plane: a YAML file, or a directory of them, of the
    /// standard kinds (Pod, Service, Gateway, HTTPRoute, AuthorizationPolicy, ...).
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_config: Option<PathBuf>,
    /// xDS server: `https://host:15012` (istiod) or `http://host:port` (local control plane).
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// PEM root(s) to verify an https xDS server (and istiod's CA) with.
    #[arg(long, env = "XDS_ROOT_CA", default_value = "/var/run/secrets/istio/root-cert.pem")]
    pub xds_root_cert: PathBuf,
    /// TLS name of the xDS server (defaults to the address host).
    #[arg(long, env = "XDS_SERVER_NAME")]
    pub xds_server_name: Option<String>,
    /// SPIFFE identity of the xDS server (e.g. our waypoint controller,
    /// `spiffe://cluster.local/ns/ambient-system/sa/ambient-controller`): the connection is then
    /// mutual TLS with this proxy's own workload certificate, and the server must prove exactly
    /// this identity.
    #[arg(long, env = "XDS_SERVER_IDENTITY")]
    pub xds_server_identity: Option<String>,
    /// Bearer token file sent to the xDS server and the CA (a service-account JWT).
    #[arg(long, env = "XDS_TOKEN_PATH")]
    pub xds_token_path: Option<PathBuf>,
    /// Sign certificates with a local root kept in DIR (shared by every proxy of the mesh)
    /// instead of asking istiod's CA.
    #[arg(long, env = "LOCAL_CA_DIR", value_name = "DIR")]
    pub local_ca: Option<PathBuf>,
    /// Certificates from files in DIR (`cert-chain.pem`, `key.pem`, `root-cert.pem`, as a VM's
    /// provisioning places them), reloaded when they change, instead of asking a CA.
    #[arg(long, env = "CERT_DIR", value_name = "DIR", conflicts_with = "local_ca")]
    pub cert_dir: Option<PathBuf>,
    /// istiod's CA (defaults to the xDS address when that is https, else istiod's).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("give either --local-config or --xds-address, not both")]
    TwoSources,
    #[error("--xds-server-identity {0:?}: {1}")]
    ServerIdentity(String, String),
    #[error("--xds-server-identity needs an https xDS address, not {0:?}")]
    ServerIdentityPlaintext(String),
    #[error("--xds-server-identity is for an xDS server, not --local-config")]
    ServerIdentityWithFile,
}

impl ControlPlaneArgs {
    /// The configuration source for `node`, and a description for logs and dumps.
    pub fn source(&self, node: &NodeInfo) -> Result<(Source, String), SourceError> {
        match (&self.local_config, &self.xds_address) {
            (Some(_), Some(_)) => Err(SourceError::TwoSources),
            (Some(_), None) if self.xds_server_identity.is_some() => Err(SourceError::ServerIdentityWithFile),
            (Some(path), None) => Ok((Source::File(path.clone()), format!("file {}", path.display()))),
            (None, address) => {
                let address = address.clone().unwrap_or_else(|| DEFAULT_ISTIOD_ADDRESS.to_string());
                let mut xds = XdsConfig::new(address.clone(), node.clone());
                xds.target.root_cert = address.starts_with("https://").then(|| self.xds_root_cert.clone());
                xds.target.server_name = self.xds_server_name.clone();
                xds.target.token_path = self.xds_token_path.clone();
                if let Some(id) = &self.xds_server_identity {
                    if !address.starts_with("https://") {
                        return Err(SourceError::ServerIdentityPlaintext(address));
                    }
                    let parsed = id
                        .parse::<crate::identity::Identity>()
                        .map_err(|e| SourceError::ServerIdentity(id.clone(), e.to_string()))?;
                    xds.target.server_identity = Some(parsed);
                }
                Ok((Source::Xds(Box::new(xds)), format!("xds {address}")))
            }
        }
    }

    /// Where certificates come from.
    /// An xDS server reached over mesh mTLS (`--xds-server-identity`, our controller) is no CA:
    /// the CA then defaults to istiod's, not to the xDS address.
    pub fn ca(&self) -> CaConfig {
        if let Some(dir) = &self.cert_dir {
            return CaConfig::Files { dir: dir.clone() };
        }
        let xds_is_istiod = self.xds_server_identity.is_none();
        CaConfig::from_flags(
            self.local_ca.as_deref(),
            self.ca_address.as_deref(),
            self.xds_address.as_deref().filter(|_| xds_is_istiod),
            DEFAULT_ISTIOD_ADDRESS,
            &self.xds_root_cert,
            self.xds_token_path.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        cp: ControlPlaneArgs,
    }

    fn ca_address(args: &[&str]) -> String {
        let flags = Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied())).expect("flags");
        match flags.cp.ca() {
            CaConfig::Istio { address, .. } => address,
            CaConfig::Local { .. } => "local".into(),
            CaConfig::Files { .. } => "files".into(),
        }
    }

    #[test]
    fn certificates_from_files_exclude_the_local_ca() {
        assert_eq!(
            ca_address(&["--cert-dir", "/etc/certs", "--xds-address", "https://istiod:15012"]),
            "files"
        );
        let both = Flags::try_parse_from(["x", "--cert-dir", "/etc/certs", "--local-ca", "/ca"]);
        assert!(both.is_err(), "one certificate source");
    }

    #[test]
    fn the_ca_follows_istiod_but_never_our_controller() {
        let istiod = "https://istiod.example:15012";
        assert_eq!(ca_address(&["--xds-address", istiod]), istiod);
        let controller = "https://ambient-controller.ambient-system.svc:15012";
        let id = "spiffe://cluster.local/ns/ambient-system/sa/ambient-controller";
        assert_eq!(
            ca_address(&["--xds-address", controller, "--xds-server-identity", id]),
            DEFAULT_ISTIOD_ADDRESS
        );
        assert_eq!(
            ca_address(&["--xds-address", controller, "--xds-server-identity", id, "--ca-address", istiod]),
            istiod
        );
    }

    #[test]
    fn a_server_identity_needs_https_and_a_spiffe_id() {
        let node = NodeInfo::default();
        let parse = |args: &[&str]| {
            Flags::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .expect("flags")
                .cp
                .source(&node)
        };
        let id = "spiffe://cluster.local/ns/ambient-system/sa/ambient-controller";
        assert!(matches!(
            parse(&["--xds-address", "http://10.0.0.1:15012", "--xds-server-identity", id]),
            Err(SourceError::ServerIdentityPlaintext(_))
        ));
        assert!(matches!(
            parse(&["--xds-address", "https://10.0.0.1:15012", "--xds-server-identity", "controller"]),
            Err(SourceError::ServerIdentity(..))
        ));
        assert!(parse(&["--xds-address", "https://10.0.0.1:15012", "--xds-server-identity", id]).is_ok());
    }
}
