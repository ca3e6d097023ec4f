//! The xDS client in istiod mode: TLS verified against a configured root, and a bearer token
//! read from a file. A wrong token or an untrusted server never syncs.

use std::time::Duration;

use common::readiness::Ready;
use common::xds::{Handlers, NodeInfo, ResourceStore, XdsClient, XdsConfig, XdsMetrics, validate};
use mesh_tests::xds_server::{self, ServerOptions, XdsStore};
use proto::ADDRESS_TYPE_URL;
use proto::workload::{Address, Workload, address};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

const SERVER_NAME: &str = "istiod.istio-system.svc";

struct Pki {
    root_pem: String,
    server_cert: String,
    server_key: String,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().expect("ca key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec![SERVER_NAME.to_string()]).expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    Pki { root_pem: ca_cert.pem(), server_cert: cert.pem(), server_key: key.serialize_pem() }
}

struct Setup {
    _dir: tempfile::TempDir,
    config: XdsConfig,
}

fn client_config(url: String, root_pem: &str, token: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root-cert.pem");
    let token_path = dir.path().join("istio-token");
    std::fs::write(&root, root_pem).expect("root");
    std::fs::write(&token_path, format!("{token}\n")).expect("token");
    let node = NodeInfo { proxy_type: "ztunnel".into(), ip: "10.0.0.5".into(), ..Default::default() };
    let mut config = XdsConfig::new(url, node);
    config.target.root_cert = Some(root);
    config.target.token_path = Some(token_path);
    config.target.server_name = Some(SERVER_NAME.into());
    config.backoff_max = Duration::from_millis(200);
    Setup { _dir: dir, config }
}

fn run(
    config: XdsConfig,
) -> (
    Ready,
    std::sync::Arc<ResourceStore<Address>>,
    prometheus_client::registry::Registry,
    tokio::task::JoinHandle<()>,
) {
    let store = ResourceStore::<Address>::new(validate::address);
    let mut handlers = Handlers::new();
    handlers.add::<Address, _>(ADDRESS_TYPE_URL, store.clone());
    let ready = Ready::new();
    let mut registry = common::metrics::new_registry();
    let metrics = XdsMetrics::new(&mut registry);
    let task = tokio::spawn(XdsClient::new(config, handlers, &ready, metrics).run());
    (ready, store, registry, task)
}

async fn istiod_like(pki: &Pki) -> xds_server::XdsServerHandle {
    let store = XdsStore::new();
    let w = Workload {
        uid: "u1".into(),
        name: "a".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        ..Default::default()
    };
    store.insert(ADDRESS_TYPE_URL, "u1", &Address { r#type: Some(address::Type::Workload(w)) });
    let options = ServerOptions {
        tls: Some((pki.server_cert.clone(), pki.server_key.clone())),
        bearer_token: Some("sa-token-123".into()),
    };
    xds_server::start_with("127.0.0.1:0".parse().expect("addr"), store, options).await.expect("server")
}

#[tokio::test]
async fn tls_and_bearer_token_sync() {
    let pki = pki();
    let server = istiod_like(&pki).await;
    let setup = client_config(format!("https://{}", server.addr), &pki.root_pem, "sa-token-123");
    let (ready, store, _registry, task) = run(setup.config);
    tokio::time::timeout(Duration::from_secs(20), ready.wait()).await.expect("syncs over TLS with the token");
    assert!(store.get("u1").is_some());
    task.abort();
    server.stop().await;
}

#[tokio::test]
async fn wrong_token_or_untrusted_server_never_syncs() {
    let pki = pki();
    let server = istiod_like(&pki).await;

    // Right root, wrong token: the server refuses every stream.
    let setup = client_config(format!("https://{}", server.addr), &pki.root_pem, "stolen");
    let (ready, store, registry, task) = run(setup.config);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!ready.is_ready() && store.is_empty());
    let text = common::metrics::render(&registry);
    assert!(text.contains("istio_xds_connection_terminations_total{reason=\"stream_error\"}"), "{text}");
    task.abort();

    // Right token, but the server's certificate does not chain to our root.
    let other = pki_other_root();
    let setup = client_config(format!("https://{}", server.addr), &other, "sa-token-123");
    let (ready, store, registry, task) = run(setup.config);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!ready.is_ready() && store.is_empty());
    let text = common::metrics::render(&registry);
    assert!(text.contains("istio_xds_connection_terminations_total{reason=\"connect_error\"}"), "{text}");
    task.abort();
    server.stop().await;
}

fn pki_other_root() -> String {
    pki().root_pem
}
