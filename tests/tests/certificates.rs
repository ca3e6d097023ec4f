//! Certificates from the three sources: the Istio CA over real gRPC (an in-test
//! `CreateCertificate` server signing with a local root), the manager coalescing, retrying and
//! counting fetches, backing off from certificates too short-lived to rotate, dropping the
//! identities of departed workloads and naming the missing ones in readiness, and mounted files
//! reloaded when they change.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::admin::{self, Router};
use common::grpc::GrpcTarget;
use common::identity::ca_client::{CaClientError, IstioCaClient};
use common::identity::files::CertificateFiles;
use common::identity::local_ca::new_csr;
use common::identity::manager::ManagerError;
use common::identity::{CaSource, CertMetrics, CertificateManager, Identity, LocalCa};
use common::readiness::Ready;
use mesh_tests::ca_server::{self, CaBehaviour};
use mesh_tests::http::get;
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

/// CA requests made for `identity` (by impersonation).
fn requests_for(behaviour: &CaBehaviour, identity: &Identity) -> usize {
    let asked = identity.to_string();
    behaviour.impersonated.lock().expect("lock").iter().filter(|s| **s == asked).count()
}

/// The sum of every sample of the metric lines starting with `prefix`.
fn metric_sum(registry: &Registry, prefix: &str) -> u64 {
    let text = common::metrics::render(registry);
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The CA issues 1-second certificates (X.509 keeps whole seconds, so 0-1 s remain): rotating
/// at half life would ask it every half second or faster. The manager asks no faster than once
/// a second and backs off, and counts them.
#[tokio::test]
async fn manager_backs_off_from_a_ca_issuing_short_lived_certificates() {
    let (behaviour, target, _dir) = ca(Some(TOKEN)).await;
    let mut registry = Registry::with_prefix("istio");
    let metrics = CertMetrics::new(&mut registry);
    let client = IstioCaClient::new(target, Duration::from_secs(1), true).expect("client");
    let manager = CertificateManager::new(CaSource::Istio(client), metrics);
    manager.prefetch(&id("a"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Requests at 0, 1 s and 2-3 s.
    let requests = requests_for(&behaviour, &id("a"));
    assert!((2..=4).contains(&requests), "{requests} CA requests in 3 s");
    let counted = metric_sum(&registry, r#"istio_certificate_unusable_total{source="istio""#);
    assert!(counted + 1 >= requests as u64 && counted <= requests as u64, "{counted} of {requests} counted");
}

/// A workload leaves: its identity is dropped and its certificate no longer refreshed, while
/// the identity still wanted keeps rotating.
#[tokio::test]
async fn identities_no_longer_wanted_are_dropped_and_not_refreshed() {
    let (behaviour, target, _dir) = ca(Some(TOKEN)).await;
    let client = IstioCaClient::new(target, Duration::from_secs(1), true).expect("client");
    let manager = CertificateManager::new(CaSource::Istio(client), CertMetrics::default());
    let (a, b) = (id("a"), id("b"));
    manager.prefetch(&a);
    manager.prefetch(&b);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(requests_for(&behaviour, &b) >= 2, "b refreshed while wanted");

    assert_eq!(manager.retain([&a]), vec![b.clone()]);
    tokio::time::sleep(Duration::from_millis(200)).await; // a request already on the wire lands
    let (a_before, b_before) = (requests_for(&behaviour, &a), requests_for(&behaviour, &b));
    let held: Vec<String> = manager.summary().into_iter().map(|s| s.identity).collect();
    assert_eq!(held, vec![a.to_string()]);
    // a's next refreshes come within 1-2 s and 2-4 s of its last one.
    tokio::time::sleep(Duration::from_millis(5500)).await;
    assert_eq!(requests_for(&behaviour, &b), b_before, "b no longer refreshed");
    assert!(requests_for(&behaviour, &a) > a_before, "a still refreshed");
}

/// Readiness names the identity whose certificate cannot be issued, and why, and turns ready
/// once the CA issues it.
#[tokio::test]
async fn readiness_names_the_identity_the_ca_does_not_issue() {
    let (behaviour, target, _dir) = ca(Some(TOKEN)).await;
    behaviour.fail_first.store(usize::MAX, Ordering::SeqCst);
    let client = IstioCaClient::new(target, HOUR, true).expect("client");
    let manager = CertificateManager::new(CaSource::Istio(client), CertMetrics::default());
    let ready = Ready::new();
    let listener = admin::bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(admin::serve(listener, admin::readiness_routes(Router::new(), ready.clone()), "readiness"));

    let block = ready.register("workload certificates");
    let wanted = Arc::new(Mutex::new(BTreeSet::from([id("a")])));
    let (_changes, rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn({
        let (manager, wanted) = (manager.clone(), wanted.clone());
        async move { manager.follow(rx, move || wanted.lock().expect("lock").clone(), block).await }
    });

    let expected = format!("not ready: workload certificates: missing {} (CA error: ", id("a"));
    let start = Instant::now();
    let body = loop {
        let (status, body) = get(addr, "/healthz/ready").await.expect("readiness");
        assert_eq!(status, 503, "{body}");
        if body.contains("CA error") {
            break body;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never named: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(body.starts_with(&expected) && body.contains("CA warming up"), "{body}");

    behaviour.fail_first.store(0, Ordering::SeqCst);
    tokio::time::timeout(Duration::from_secs(35), ready.wait()).await.expect("ready once issued");
    let (status, body) = get(addr, "/healthz/ready").await.expect("readiness");
    assert_eq!((status, body.as_str()), (200, "ready\n"));
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
