//! Server-certificate verification by SPIFFE identity: the chain must lead to our roots and be
//! valid for server authentication now; the DNS name is ignored and the URI SAN must be one of
//! the identities we expect for this destination.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, Error, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::Identity;
use crate::identity::cert::LeafInfo;

/// Verifies a server by chain and SPIFFE identity.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

/// Why a server's identity was refused (surfaced as `rustls::Error::Other`).
#[derive(Debug, thiserror::Error)]
#[error("server identity {presented} is not the expected {expected}")]
pub struct IdentityMismatch {
    pub presented: String,
    pub expected: String,
}

impl SpiffeServerVerifier {
    pub fn new(roots: RootCertStore, expected: Vec<Identity>, provider: Arc<CryptoProvider>) -> Self {
        Self { roots, expected, provider }
    }
}

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    let c = match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::CertNotValidForName(_) => CertificateError::NotValidForName,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => return refused(WebpkiOther(other)),
    };
    Error::InvalidCertificate(c)
}

#[derive(Debug, thiserror::Error)]
#[error("certificate refused: {0:?}")]
struct WebpkiOther(webpki::Error);

/// A certificate refused for a reason rustls has no variant for.
fn refused(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(webpki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.roots.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(webpki_error)?;
        let info = LeafInfo::parse(end_entity).map_err(refused)?;
        let presented = match info.identity {
            Some(Ok(id)) => id,
            Some(Err(e)) => return Err(refused(e)),
            None => {
                let presented = "no spiffe:// URI SAN".to_string();
                return Err(refused(IdentityMismatch { presented, expected: self.expected_list() }));
            }
        };
        if !self.expected.contains(&presented) {
            return Err(refused(IdentityMismatch {
                presented: presented.to_string(),
                expected: self.expected_list(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl SpiffeServerVerifier {
    fn expected_list(&self) -> String {
        let names: Vec<String> = self.expected.iter().map(ToString::to_string).collect();
        if names.is_empty() { "(none)".into() } else { names.join(" or ") }
    }
}
