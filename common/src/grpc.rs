//! Reaching istiod's gRPC endpoints (xDS and the CA share them): address, TLS root, server name
//! and the bearer token, read afresh on every connect so a rotated token is picked up.
//!
//! A target may instead be reached over the mesh's mutual TLS ([`MeshTls`]): the proxy presents
//! its own workload certificate and accepts the server only if its SPIFFE identity is the one
//! configured (our waypoint controller's xDS service, whose certificate comes from the mesh CA
//! and carries no DNS name). The certificate current at each connect is used, so rotation needs
//! no restart.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::identity::{CertificateManager, Identity};

/// Timeout for establishing the TCP (+TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connect waits for our own certificate (mesh mTLS).
const CERT_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("{address}: mesh mTLS to {server} needs our own workload certificate, which is not set up")]
    NoClientCertificate { address: String, server: Identity },
    #[error("{address}: no certificate for {identity} within {timeout:?}: {reason}")]
    Certificate { address: String, identity: Identity, timeout: Duration, reason: String },
    #[error("{address}: {source}")]
    Tls { address: String, source: crate::tls::TlsError },
    #[error("cannot connect to {address}: {source}")]
    Connect { address: String, source: tonic::transport::Error },
}

/// Mutual TLS with mesh identities toward a gRPC server: our certificate from `certs` for
/// `own`, the server accepted only as `server`.
#[derive(Clone, Debug)]
pub struct MeshTls {
    pub certs: CertificateManager,
    pub own: Identity,
    pub server: Identity,
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
    /// The SPIFFE identity the server must prove; set, the connection is mesh mTLS (`mesh_tls`
    /// must then be attached) instead of TLS verified by DNS name.
    pub server_identity: Option<Identity>,
    /// Our certificate for mesh mTLS (attached by the app once its certificate manager exists).
    pub mesh_tls: Option<MeshTls>,
}

impl GrpcTarget {
    /// A target with no TLS root and no token (fill them in for `https`).
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            root_cert: None,
            server_name: None,
            token_path: None,
            server_identity: None,
            mesh_tls: None,
        }
    }

    /// Attaches our certificate source for mesh mTLS (used when `server_identity` is set).
    pub fn with_mesh_tls(mut self, certs: CertificateManager, own: Identity) -> Self {
        if let Some(server) = self.server_identity.clone() {
            self.mesh_tls = Some(MeshTls { certs, own, server });
        }
        self
    }

    /// Connects: over mesh mTLS when a server identity is configured (refusing to fall back to
    /// anything weaker), else as [`GrpcTarget::endpoint`] says.
    pub async fn connect(&self) -> Result<Channel, GrpcError> {
        let address = &self.address;
        let Some(server) = &self.server_identity else {
            let endpoint = self.endpoint()?;
            return endpoint
                .connect()
                .await
                .map_err(|source| GrpcError::Connect { address: address.clone(), source });
        };
        let tls = self.mesh_tls.as_ref().ok_or_else(|| GrpcError::NoClientCertificate {
            address: address.clone(),
            server: server.clone(),
        })?;
        let cert = match tokio::time::timeout(CERT_TIMEOUT, tls.certs.fetch(&tls.own)).await {
            Ok(Ok(cert)) => cert,
            Ok(Err(e)) => {
                return Err(GrpcError::Certificate {
                    address: address.clone(),
                    identity: tls.own.clone(),
                    timeout: CERT_TIMEOUT,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(GrpcError::Certificate {
                    address: address.clone(),
                    identity: tls.own.clone(),
                    timeout: CERT_TIMEOUT,
                    reason: "timed out".into(),
                });
            }
        };
        let config = crate::tls::client_config(&cert, vec![server.clone()])
            .map_err(|source| GrpcError::Tls { address: address.clone(), source })?;
        let connector = Arc::new(tokio_rustls::TlsConnector::from(Arc::new(config)));
        // The connector does TLS itself: tonic sees a plaintext URI for the same authority.
        let bad = |source| GrpcError::Address { address: address.clone(), source };
        let plain = address.replacen("https://", "http://", 1);
        let endpoint = Endpoint::from_shared(plain)
            .map_err(bad)?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let connect = tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            async move {
                let authority =
                    uri.authority().ok_or_else(|| std::io::Error::other("address without host"))?;
                let port = authority.port_u16().unwrap_or(443);
                let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
                    .await
                    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
                let _ = tcp.set_nodelay(true);
                // SNI is off in the mesh config; the name only satisfies the API.
                let name = rustls_pki_types::ServerName::try_from("xds.mesh.invalid")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let stream =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await.map_err(
                        |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"),
                    )??;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        endpoint
            .connect_with_connector(connect)
            .await
            .map_err(|source| GrpcError::Connect { address: address.clone(), source })
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

    /// `Bearer <token>` for the `authorization` metadata, if a token file is configured. Never
    /// toward a server reached over mesh mTLS: our certificate authenticates us there, and the
    /// token (audience `istio-ca`) would let that server ask istiod for our certificates.
    pub fn bearer(&self) -> Result<Option<MetadataValue<Ascii>>, GrpcError> {
        if self.server_identity.is_some() {
            return Ok(None);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_goes_to_istiod_but_never_to_a_server_reached_over_mesh_mtls() {
        let path = std::env::temp_dir().join(format!("grpc-token-{}", std::process::id()));
        std::fs::write(&path, "secret-jwt\n").expect("token file");
        let mut target = GrpcTarget::new("https://istiod.istio-system.svc:15012");
        target.token_path = Some(path.clone());
        let bearer = target.bearer().expect("readable").expect("a token");
        assert_eq!(bearer.to_str().ok(), Some("Bearer secret-jwt"));
        target.server_identity =
            Some("spiffe://cluster.local/ns/ambient-system/sa/ambient-controller".parse().expect("id"));
        assert!(target.bearer().expect("no read").is_none());
        let _ = std::fs::remove_file(&path);
    }
}
