//! Reaching istiod's gRPC endpoints (xDS and the CA share them): address, TLS root, server name
//! and the bearer token, read afresh on every connect so a rotated token is picked up.

use std::path::PathBuf;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Timeout for establishing the TCP (+TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("invalid gRPC address {address:?}: {source}")]
    Address { address: String, source: tonic::transport::Error },
    #[error("cannot read {what} {path:?}: {source}")]
    ReadFile { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("https address {0:?} needs a root certificate")]
    MissingRoot(String),
    #[error("bearer token in {0:?} is not a valid header value")]
    BadToken(PathBuf),
}

/// One gRPC server and how to authenticate to it.
#[derive(Clone, Debug)]
pub struct GrpcTarget {
    /// `http://host:port` (plaintext, local control plane) or `https://host:port` (istiod, 15012).
    pub address: String,
    /// PEM root(s) that sign the server's certificate; required for `https`.
    pub root_cert: Option<PathBuf>,
    /// TLS server name to verify (istiod's is `istiod.istio-system.svc`); defaults to the host.
    pub server_name: Option<String>,
    /// File holding a bearer token (a Kubernetes service-account JWT), re-read on every connect.
    pub token_path: Option<PathBuf>,
}

impl GrpcTarget {
    /// A target with no TLS root and no token (fill them in for `https`).
    pub fn new(address: impl Into<String>) -> Self {
        Self { address: address.into(), root_cert: None, server_name: None, token_path: None }
    }

    /// The tonic endpoint, with TLS when the address is `https`.
    pub fn endpoint(&self) -> Result<Endpoint, GrpcError> {
        let address = &self.address;
        let bad = |source| GrpcError::Address { address: address.clone(), source };
        let mut endpoint = Endpoint::from_shared(address.clone())
            .map_err(bad)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        if address.starts_with("https://") {
            let path = self.root_cert.as_ref().ok_or_else(|| GrpcError::MissingRoot(address.clone()))?;
            let pem = std::fs::read(path).map_err(|source| GrpcError::ReadFile {
                what: "root certificate",
                path: path.clone(),
                source,
            })?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(name) = &self.server_name {
                tls = tls.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(tls).map_err(bad)?;
        }
        Ok(endpoint)
    }

    /// `Bearer <token>` for the `authorization` metadata, if a token file is configured.
    pub fn bearer(&self) -> Result<Option<MetadataValue<Ascii>>, GrpcError> {
        let Some(path) = &self.token_path else { return Ok(None) };
        let token = std::fs::read_to_string(path).map_err(|source| GrpcError::ReadFile {
            what: "bearer token",
            path: path.clone(),
            source,
        })?;
        let value = format!("Bearer {}", token.trim());
        value.parse().map(Some).map_err(|_| GrpcError::BadToken(path.clone()))
    }
}
