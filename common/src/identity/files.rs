//! Certificates from mounted files (a VM host that gets them from elsewhere): a PEM chain (leaf
//! first), a PEM key and PEM roots, reloaded when any of them changes.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::cert::{CertError, WorkloadCertificate, parse_certs, parse_key};

#[derive(Debug, thiserror::Error)]
pub enum FileCertError {
    #[error("cannot read {what} {path:?}: {source}")]
    Read { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{what} {path:?}: {source}")]
    Parse { what: &'static str, path: PathBuf, source: CertError },
}

/// The three files that make up a certificate.
#[derive(Clone, Debug)]
pub struct CertificateFiles {
    /// Leaf then intermediates.
    pub chain: PathBuf,
    pub key: PathBuf,
    pub roots: PathBuf,
}

/// What we compare to notice a change (modification time and size of each file).
pub type Fingerprint = Vec<Option<(SystemTime, u64)>>;

impl CertificateFiles {
    /// Istio's file names in `dir`: `cert-chain.pem`, `key.pem`, `root-cert.pem`.
    pub fn in_dir(dir: &Path) -> Self {
        Self { chain: dir.join("cert-chain.pem"), key: dir.join("key.pem"), roots: dir.join("root-cert.pem") }
    }

    /// Reads and parses all three files.
    pub fn load(&self) -> Result<WorkloadCertificate, FileCertError> {
        let chain = read("certificate chain", &self.chain)?;
        let key = read("private key", &self.key)?;
        let roots = read("roots", &self.roots)?;
        let chain = parse_certs(&chain).map_err(parse_err("certificate chain", &self.chain))?;
        let key = parse_key(&key).map_err(parse_err("private key", &self.key))?;
        let roots = parse_certs(&roots).map_err(parse_err("roots", &self.roots))?;
        WorkloadCertificate::new(chain, key, roots).map_err(parse_err("certificate chain", &self.chain))
    }

    /// Changes whenever one of the files is rewritten or replaced.
    pub fn fingerprint(&self) -> Fingerprint {
        [&self.chain, &self.key, &self.roots]
            .iter()
            .map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
            .collect()
    }
}

fn read(what: &'static str, path: &Path) -> Result<String, FileCertError> {
    std::fs::read_to_string(path).map_err(|source| FileCertError::Read { what, path: path.into(), source })
}

fn parse_err(what: &'static str, path: &Path) -> impl FnOnce(CertError) -> FileCertError {
    let path = path.to_path_buf();
    move |source| FileCertError::Parse { what, path, source }
}
