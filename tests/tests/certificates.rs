//! Certificates from the three sources: the Istio CA over real gRPC (an in-test
//! `CreateCertificate` server signing with a local root), the manager coalescing, retrying and
//! counting fetches, and mounted files reloaded when they change.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::grpc::GrpcTarget;
use common::identity::ca_client::{CaClientError, IstioCaClient};
use common::identity::files::CertificateFiles;
use common::identity::local_ca::new_csr;
use common::identity::manager::ManagerError;
use common::identity::{CaSource, CertMetrics, CertificateManager, Identity, LocalCa};
use mesh_tests::ca_server::{self, CaBehaviour};
use prometheus_client::registry::Registry;

const TOKEN: &str = "a-service-account-jwt";
const HOUR: Duration = Duration::from_secs(3600);

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).expect("identity")
}

async fn ca(token: Option<&str>) -> (Arc<CaBehaviour>, GrpcTarget, tempfile::TempDir) {
    let behaviour = CaBehaviour::new(LocalCa::generate("cluster.local").expect("ca"));
    let addr = ca_server::start("127.0.0.1:0".parse().expect("addr"), behaviour.clone(), Some(TOKEN.into()))
        .await
        .expect("CA server");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut target = GrpcTarget::new(format!("http://{addr}"));
    if let Some(token) = token {
        let path = dir.path().join("istio-token");
        std::fs::write(&path, format!("{token}\n")).expect("token");
        target.token_path = Some(path);
    }
    (behaviour, target, dir)
}

#[tokio::test]
async fn istio_ca_issues_for_the_impersonated_identity() {
    let (behaviour, target, _dir) = ca(Some(TOKEN)).await;
    let client = IstioCaClient::new(target, HOUR, true).expect("client");
    let cert = client.fetch(&id("reviews")).await.expect("certificate");
    assert_eq!(cert.identity, id("reviews"));
    assert_eq!(cert.roots, behaviour.ca.roots().expect("roots"), "roots come from the reply's last element");
    let lifetime = cert.lifetime();
    assert!(lifetime >= HOUR && lifetime <= HOUR + Duration::from_secs(120), "{lifetime:?}");
    assert_eq!(*behaviour.impersonated.lock().expect("lock"), vec![id("reviews").to_string()]);
    // The issued key and chain make a working TLS config.
    common::tls::server_config(&cert).expect("usable certificate");
}

#[tokio::test]
async fn istio_ca_refusals_are_clear_errors() {
    let (_, target, _dir) = ca(Some("wrong-token")).await;
    let err =
        IstioCaClient::new(target, HOUR, true).expect("client").fetch(&id("a")).await.expect_err("token");
    assert!(
        matches!(&err, CaClientError::Status { status, .. } if status.code() == tonic::Code::Unauthenticated),
        "{err}"
    );

    let (behaviour, target, _dir) = ca(Some(TOKEN)).await;
    *behaviour.mis_issue.lock().expect("lock") = Some(id("someone-else"));
    let err =
        IstioCaClient::new(target, HOUR, true).expect("client").fetch(&id("a")).await.expect_err("mis-issue");
    assert!(matches!(err, CaClientError::WrongIdentity { .. }), "{err}");

    // Not impersonating: the CA has no identity to grant and says so.
    let (_, target, _dir) = ca(Some(TOKEN)).await;
    let err =
        IstioCaClient::new(target, HOUR, false).expect("client").fetch(&id("a")).await.expect_err("no id");
    assert!(err.to_string().contains("no identity"), "{err}");
}

#[tokio::test]
async fn manager_coalesces_retries_and_counts() {
    let (behaviour, target, _dir) = ca(Some(TOKEN)).await;
    behaviour.fail_first.store(2, Ordering::SeqCst);
    let mut registry = Registry::with_prefix("istio");
    let metrics = CertMetrics::new(&mut registry);
    let client = IstioCaClient::new(target, HOUR, true).expect("client");
    let manager = CertificateManager::new(CaSource::Istio(client), metrics);

    // The first attempt fails; callers are told why rather than left waiting.
    let err = manager.fetch(&id("a")).await.expect_err("CA warming up");
    assert!(matches!(&err, ManagerError::Fetch { reason, .. } if reason.contains("warming up")), "{err}");
    // The worker retries with backoff until it succeeds.
    let cert =
        tokio::time::timeout(Duration::from_secs(10), manager.wait_ready(&id("a"))).await.expect("retried");
    assert_eq!(cert.identity, id("a"));
    assert_eq!(behaviour.requests.load(Ordering::SeqCst), 3);

    // 50 concurrent first asks for a new identity make one CA request.
    let before = behaviour.requests.load(Ordering::SeqCst);
    let asks: Vec<_> = (0..50)
        .map(|_| {
            let m = manager.clone();
            tokio::spawn(async move { m.fetch(&id("b")).await })
        })
        .collect();
    for ask in asks {
        assert_eq!(ask.await.expect("join").expect("cert").identity, id("b"));
    }
    assert_eq!(behaviour.requests.load(Ordering::SeqCst) - before, 1, "concurrent asks coalesce");

    let text = common::metrics::render(&registry);
    assert!(text.contains(r#"istio_certificate_fetches_total{source="istio",outcome="error"} 2"#), "{text}");
    assert!(
        text.contains(r#"istio_certificate_fetches_total{source="istio",outcome="success"} 2"#),
        "{text}"
    );
    let expiry = format!(r#"istio_certificate_expiry_timestamp_seconds{{identity="{}"}}"#, id("a"));
    assert!(text.contains(&expiry), "{text}");
    let summary = manager.summary();
    assert_eq!(summary.len(), 2);
    assert!(summary.iter().all(|s| s.state == "ready" && s.not_after.is_some()));
}

/// Writes a leaf for `identity` signed by `ca` into the three files.
fn write_files(ca: &LocalCa, files: &CertificateFiles, identity: &Identity, lifetime: Duration) {
    let (csr, key) = new_csr(identity).expect("csr");
    let chain = ca.sign_csr(&csr, identity, lifetime).expect("sign");
    std::fs::write(&files.chain, &chain[0]).expect("chain");
    std::fs::write(&files.key, key).expect("key");
    std::fs::write(&files.roots, &chain[1]).expect("roots");
}

#[tokio::test]
async fn file_certificates_reload_when_they_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = CertificateFiles {
        chain: dir.path().join("cert-chain.pem"),
        key: dir.path().join("key.pem"),
        roots: dir.path().join("root-cert.pem"),
    };
    let ca = LocalCa::generate("cluster.local").expect("ca");
    write_files(&ca, &files, &id("vm"), HOUR);
    let manager = CertificateManager::new(CaSource::Files(files.clone()), CertMetrics::default());
    let first = manager.fetch(&id("vm")).await.expect("loaded");
    assert_eq!(first.identity, id("vm"));
    let err = manager.fetch(&id("not-the-vm")).await.expect_err("files prove one identity");
    assert!(matches!(err, ManagerError::NotOurs { .. }), "{err}");

    // Rewritten files (a longer lifetime, so a larger file too) are picked up.
    write_files(&ca, &files, &id("vm"), 3 * HOUR);
    let second = tokio::time::timeout(Duration::from_secs(10), manager.rotated(&id("vm"), &first))
        .await
        .expect("reload after the files changed");
    assert!(second.not_after > first.not_after);

    // A broken rewrite keeps the last good certificate in force.
    std::fs::write(&files.key, "garbage").expect("key");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let held = manager.current(&id("vm")).expect("still held");
    assert!(Arc::ptr_eq(&held, &second));
}
