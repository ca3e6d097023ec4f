//! A certificate chain and key proving one identity, with the trust roots it chains to.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::{Identity, IdentityError};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("no certificate in the chain")]
    Empty,
    #[error("cannot parse PEM {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("cannot parse certificate: {0}")]
    X509(String),
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("certificate identity: {0}")]
    Identity(#[from] IdentityError),
}

/// Proof of one identity: leaf (+ intermediates), its private key, and the roots it chains to.
#[derive(Clone)]
pub struct WorkloadCertificate {
    pub identity: Identity,
    /// Leaf first, then intermediates (not the root).
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 private key of the leaf.
    pub key: Arc<PrivateKeyDer<'static>>,
    /// Trust roots (the last element of a CA reply; may hold several roots).
    pub roots: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for WorkloadCertificate {
    // Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificate")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCertificate {
    /// Builds from a CA reply (`cert_chain`: leaf first, root(s) last) and the key we generated.
    pub fn from_pem_chain(chain: &[String], key_pem: &str) -> Result<Self, CertError> {
        let (roots_pem, certs_pem) = match chain {
            [] => return Err(CertError::Empty),
            [only] => (only.as_str(), std::slice::from_ref(only)),
            [certs @ .., roots] => (roots.as_str(), certs),
        };
        let mut certs = Vec::new();
        for pem in certs_pem {
            certs.extend(parse_certs(pem)?);
        }
        Self::new(certs, parse_key(key_pem)?, parse_certs(roots_pem)?)
    }

    /// Builds from parsed parts; reads identity and validity from the leaf.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or(CertError::Empty)?;
        let info = LeafInfo::parse(leaf)?;
        let identity = info.identity.ok_or(CertError::NoSpiffeId)??;
        Ok(Self {
            identity,
            chain,
            key: Arc::new(key),
            roots,
            not_before: info.not_before,
            not_after: info.not_after,
        })
    }

    /// Time left before expiry (zero once expired).
    pub fn remaining(&self) -> Duration {
        self.not_after.duration_since(SystemTime::now()).unwrap_or_default()
    }

    /// Total validity period.
    pub fn lifetime(&self) -> Duration {
        self.not_after.duration_since(self.not_before).unwrap_or_default()
    }

    /// Whether this certificate may be presented at `now`: it must have a validity period at all
    /// and not be past its end. (A `notBefore` slightly ahead of us is left to the peer: CAs
    /// back-date, and clocks differ by a little.)
    pub fn check_usable(&self, now: SystemTime) -> Result<(), Unusable> {
        if self.not_after <= self.not_before {
            return Err(Unusable::NoLifetime {
                not_before: unix(self.not_before),
                not_after: unix(self.not_after),
            });
        }
        if self.not_after <= now {
            return Err(Unusable::Expired { not_after: unix(self.not_after) });
        }
        Ok(())
    }
}

/// Why a certificate cannot be presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    /// `notAfter` is not after `notBefore` (times in Unix seconds).
    #[error("certificate has no validity period (notBefore {not_before}, notAfter {not_after})")]
    NoLifetime { not_before: u64, not_after: u64 },
    /// `notAfter` has passed (Unix seconds).
    #[error("certificate expired (notAfter {not_after})")]
    Expired { not_after: u64 },
}

impl Unusable {
    /// A short label value for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Unusable::NoLifetime { .. } => "no_lifetime",
            Unusable::Expired { .. } => "expired",
        }
    }
}

/// Unix seconds (0 before the epoch).
fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Parses every certificate in a PEM text.
pub fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| CertError::Pem { what: "certificate", detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(CertError::Empty);
    }
    Ok(certs)
}

/// Parses a PEM private key.
pub fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CertError::Pem { what: "private key", detail: e.to_string() })
}

/// What we read from a leaf certificate.
pub struct LeafInfo {
    /// The first spiffe:// URI SAN, if any.
    pub identity: Option<Result<Identity, IdentityError>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
        let (_, cert) =
            X509Certificate::from_der(der.as_ref()).map_err(|e| CertError::X509(e.to_string()))?;
        let to_time = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 { UNIX_EPOCH + Duration::from_secs(secs as u64) } else { UNIX_EPOCH }
        };
        let mut identity = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            identity = san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some(uri.parse::<Identity>()),
                _ => None,
            });
        }
        Ok(Self {
            identity,
            not_before: to_time(cert.validity().not_before),
            not_after: to_time(cert.validity().not_after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    #[test]
    fn expired_and_empty_validity_are_unusable() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let id = Identity::new("cluster.local", "ns", "sa").expect("id");
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);

        let good = ca.issue(&id, hour).expect("cert");
        assert_eq!(good.check_usable(now), Ok(()));
        assert!(matches!(good.check_usable(now + 2 * hour), Err(Unusable::Expired { .. })));

        let expired = ca.issue_with_validity(&id, now - 2 * hour, now - hour).expect("cert");
        let err = expired.check_usable(now).expect_err("expired");
        assert_eq!(err.reason(), "expired");

        let instant = ca.issue_with_validity(&id, now + hour, now + hour).expect("cert");
        let err = instant.check_usable(now).expect_err("no lifetime");
        assert_eq!(err.reason(), "no_lifetime");
    }
}
