//! The local CA: a root generated on first start and persisted to a directory, signing leaf
//! certificates in-process. The default for the local demo, tests and a machine without istiod.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::Identity;
use super::cert::{CertError, WorkloadCertificate, parse_certs};

/// Root validity: ten years.
pub const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Workload certificate lifetime (Istio's default).
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Leaves are back-dated this much to tolerate clock skew.
const BACKDATE: Duration = Duration::from_secs(60);
const ROOT_CERT_FILE: &str = "root-cert.pem";
const ROOT_KEY_FILE: &str = "root-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA file {path:?}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("local CA: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("local CA: {0}")]
    Cert(#[from] CertError),
    #[error("local CA: identity {identity} is outside trust domain {trust_domain}")]
    TrustDomain { identity: Identity, trust_domain: String },
}

/// An in-process certificate authority.
pub struct LocalCa {
    trust_domain: String,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

fn to_offset(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

impl LocalCa {
    /// A fresh root held in memory only.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        // A unique name per root, so two roots are never mistaken for each other.
        let tag: u64 = rand::random();
        params.distinguished_name.push(DnType::CommonName, format!("ambient mesh local root {tag:016x}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + ROOT_LIFETIME);
        let root = params.self_signed(&key)?;
        Ok(Self { trust_domain: trust_domain.into(), root_pem: root.pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads the root from `dir`, or generates one and writes it there (key mode 0600).
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let root_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let key = KeyPair::from_pem(&key_pem)?;
            let issuer = Issuer::from_ca_cert_pem(&root_pem, key)?;
            tracing::info!(dir = %dir.display(), "loaded local CA root");
            return Ok(Self { trust_domain: trust_domain.into(), root_pem, issuer });
        }
        let ca = Self::generate(trust_domain)?;
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        write_private(&key_path, &ca.issuer.key().serialize_pem()).map_err(io(&key_path))?;
        std::fs::write(&cert_path, &ca.root_pem).map_err(io(&cert_path))?;
        tracing::info!(dir = %dir.display(), "generated local CA root");
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a key and certificate for `id`, valid for `lifetime` from now.
    pub fn issue(&self, id: &Identity, lifetime: Duration) -> Result<WorkloadCertificate, CaError> {
        let now = SystemTime::now();
        self.issue_with_validity(id, now - BACKDATE, now + lifetime)
    }

    /// Issues a key and certificate with an explicit validity window (tests use it for expired
    /// and not-yet-valid certificates).
    pub fn issue_with_validity(
        &self,
        id: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCertificate, CaError> {
        self.check_domain(id)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = leaf_params(id, not_before, not_after)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.pem(), self.root_pem.clone()];
        Ok(WorkloadCertificate::from_pem_chain(&chain, &key.serialize_pem())?)
    }

    /// Signs a PEM CSR for `id` (the identity is ours to decide, whatever the CSR asks for),
    /// returning the chain as a CA reply does: leaf first, root last.
    pub fn sign_csr(&self, csr_pem: &str, id: &Identity, lifetime: Duration) -> Result<Vec<String>, CaError> {
        self.check_domain(id)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let now = SystemTime::now();
        let csr = CertificateSigningRequestParams {
            params: leaf_params(id, now - BACKDATE, now + lifetime)?,
            public_key: csr.public_key,
        };
        let cert = csr.signed_by(&self.issuer)?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }

    /// Roots to trust, parsed.
    pub fn roots(&self) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, CaError> {
        Ok(parse_certs(&self.root_pem)?)
    }

    fn check_domain(&self, id: &Identity) -> Result<(), CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomain {
                identity: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        Ok(())
    }
}

fn leaf_params(
    id: &Identity,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = to_offset(not_before);
    params.not_after = to_offset(not_after);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Generates a P-256 key and a CSR for `id` (what a proxy sends to a CA). Returns (csr, key) PEMs.
pub fn new_csr(id: &Identity) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("identity")
    }

    #[test]
    fn issues_leaf_with_identity_and_validity() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let cert = ca.issue(&id("client"), Duration::from_secs(3600)).expect("leaf");
        assert_eq!(cert.identity, id("client"));
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.roots.len(), 1);
        assert!(cert.lifetime() >= Duration::from_secs(3600));
        assert!(cert.remaining() > Duration::from_secs(3500));
        let err = ca.issue(&Identity::new("other.td", "a", "b").expect("id"), DEFAULT_LEAF_LIFETIME);
        assert!(matches!(err, Err(CaError::TrustDomain { .. })));
    }

    #[test]
    fn root_persists_across_restarts() {
        let dir = std::env::temp_dir().join(format!("local-ca-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = LocalCa::load_or_create(&dir, "cluster.local").expect("create");
        let second = LocalCa::load_or_create(&dir, "cluster.local").expect("load");
        assert_eq!(first.root_pem(), second.root_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(ROOT_KEY_FILE)).expect("key file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "root key must be private");
        // A leaf signed by the reloaded CA names the same issuer.
        let leaf = second.issue(&id("a"), DEFAULT_LEAF_LIFETIME).expect("leaf");
        assert_eq!(leaf.roots, first.roots().expect("roots"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn signs_csr_with_the_identity_it_decides() {
        let ca = LocalCa::generate("cluster.local").expect("ca");
        let (csr, key) = new_csr(&id("asked-for")).expect("csr");
        let chain = ca.sign_csr(&csr, &id("granted"), Duration::from_secs(600)).expect("signed");
        let cert = WorkloadCertificate::from_pem_chain(&chain, &key).expect("cert");
        assert_eq!(cert.identity, id("granted"));
        assert!(ca.sign_csr("not a csr", &id("x"), Duration::from_secs(1)).is_err());
    }
}
