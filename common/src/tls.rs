//! Mutual TLS for HBONE with rustls: TLS 1.3, ALPN `h2`, identities checked by SPIFFE URI SAN
//! rather than DNS names.
//!
//! Server: requires a client certificate chaining to the trust roots and exposes the client's
//! identity, refusing a different trust domain. Client: verifies the server chain and accepts
//! the server only if its URI SAN is one of the identities expected for the destination.

mod verify;

use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::identity::cert::LeafInfo;
use crate::identity::{Identity, WorkloadCertificate};
pub use verify::SpiffeServerVerifier;

/// ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: no usable trust root: {0}")]
    Roots(String),
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer certificate: {0}")]
    PeerCertificate(String),
    #[error("peer identity {peer} is outside our trust domain {ours}")]
    TrustDomain { peer: Identity, ours: String },
}

/// The crypto provider we use everywhere (ring; AES-GCM suites first, as the spec asks).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 | rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        )
    });
    Arc::new(p)
}

pub(crate) fn root_store(roots: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if added == 0 {
        return Err(TlsError::Roots(format!("none of {} root(s) parsed ({ignored} ignored)", roots.len())));
    }
    Ok(store)
}

/// Server side of mTLS for `cert`'s identity: client certificates are required.
pub fn server_config(cert: &WorkloadCertificate) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let roots = Arc::new(root_store(&cert.roots)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client side of mTLS presenting `cert`, accepting only a server whose URI SAN is one of
/// `expected`.
pub fn client_config(cert: &WorkloadCertificate, expected: Vec<Identity>) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier::new(root_store(&cert.roots)?, expected, provider.clone());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The identity of a verified peer (its first URI SAN), required to share `trust_domain`.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>, trust_domain: &str) -> Result<Identity, TlsError> {
    let leaf = certs.and_then(|c| c.first()).ok_or(TlsError::NoPeerCertificate)?;
    let info = LeafInfo::parse(leaf).map_err(|e| TlsError::PeerCertificate(e.to_string()))?;
    let id = info
        .identity
        .ok_or_else(|| TlsError::PeerCertificate("no spiffe:// URI SAN".into()))?
        .map_err(|e| TlsError::PeerCertificate(e.to_string()))?;
    if id.trust_domain() != trust_domain {
        return Err(TlsError::TrustDomain { peer: id, ours: trust_domain.into() });
    }
    Ok(id)
}
