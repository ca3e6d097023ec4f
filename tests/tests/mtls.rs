//! mTLS between proxies with real certificates from the local CA over loopback: identities are
//! checked by SPIFFE URI SAN both ways; wrong identity, unknown root, expired or not-yet-valid
//! certificates, a missing client certificate and a non-h2 client are refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::identity::{Identity, LocalCa, WorkloadCertificate};
use common::tls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa).expect("identity")
}

const HOUR: Duration = Duration::from_secs(3600);

/// Runs one handshake; returns the client's result and the server's (peer identity or error).
async fn handshake(
    server_cert: &WorkloadCertificate,
    client: rustls::ClientConfig,
) -> (Result<(), String>, Result<Identity, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(server_cert).expect("server config")));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut stream = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let (_, conn) = stream.get_ref();
        assert_eq!(conn.alpn_protocol(), Some(tls::ALPN_H2));
        let peer =
            tls::peer_identity(conn.peer_certificates(), "cluster.local").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        stream.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        stream.write_all(b"pong").await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector = TlsConnector::from(Arc::new(client));
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
        let mut stream = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        stream.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        if buf != b"pong" {
            return Err(format!("unexpected reply {buf:?}"));
        }
        Ok(())
    };
    let client = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .unwrap_or_else(|_| Err("client timed out".into()));
    let server = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .map_err(|_| "server timed out".to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .and_then(|r| r);
    (client, server)
}

#[tokio::test]
async fn both_sides_prove_their_spiffe_identity() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let server = ca.issue(&id("default", "echo"), HOUR).expect("server cert");
    let client = ca.issue(&id("default", "client"), HOUR).expect("client cert");
    let config = tls::client_config(&client, vec![id("default", "echo")]).expect("client config");
    let (c, s) = handshake(&server, config).await;
    assert_eq!(c, Ok(()));
    assert_eq!(s, Ok(id("default", "client")), "server sees the client's identity");
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let server = ca.issue(&id("default", "imposter"), HOUR).expect("server cert");
    let client = ca.issue(&id("default", "client"), HOUR).expect("client cert");
    let config = tls::client_config(&client, vec![id("default", "echo")]).expect("client config");
    let (c, _) = handshake(&server, config).await;
    let err = c.expect_err("identity mismatch must fail");
    assert!(err.contains("imposter") && err.contains("IdentityMismatch"), "{err}");
}

#[tokio::test]
async fn expired_and_not_yet_valid_server_certificates_are_refused() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let client = ca.issue(&id("default", "client"), HOUR).expect("client cert");
    let now = SystemTime::now();
    let expired =
        ca.issue_with_validity(&id("default", "echo"), now - 2 * HOUR, now - HOUR).expect("expired");
    let config = tls::client_config(&client, vec![id("default", "echo")]).expect("client config");
    let err = handshake(&expired, config.clone()).await.0.expect_err("expired must fail");
    assert!(err.to_lowercase().contains("expired"), "{err}");
    let future = ca.issue_with_validity(&id("default", "echo"), now + HOUR, now + 2 * HOUR).expect("future");
    let err = handshake(&future, config).await.0.expect_err("not yet valid must fail");
    assert!(
        err.to_lowercase().contains("not valid yet") || err.to_lowercase().contains("notvalidyet"),
        "{err}"
    );
}

#[tokio::test]
async fn expired_client_certificate_is_refused_by_the_server() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let server = ca.issue(&id("default", "echo"), HOUR).expect("server");
    let now = SystemTime::now();
    let client =
        ca.issue_with_validity(&id("default", "client"), now - 2 * HOUR, now - HOUR).expect("expired");
    let config = tls::client_config(&client, vec![id("default", "echo")]).expect("client config");
    let (c, s) = handshake(&server, config).await;
    let err = s.expect_err("server must refuse an expired client");
    assert!(err.to_lowercase().contains("expired"), "{err}");
    assert!(c.is_err(), "the client's exchange fails too");
}

#[tokio::test]
async fn unknown_root_is_refused_both_ways() {
    let ours = LocalCa::generate("cluster.local").expect("ca");
    let theirs = LocalCa::generate("cluster.local").expect("other ca");
    let client = ours.issue(&id("default", "client"), HOUR).expect("client");
    let foreign_server = theirs.issue(&id("default", "echo"), HOUR).expect("server");
    let config = tls::client_config(&client, vec![id("default", "echo")]).expect("client config");
    let err = handshake(&foreign_server, config).await.0.expect_err("unknown issuer");
    assert!(
        err.to_lowercase().contains("unknownissuer") || err.to_lowercase().contains("unknown issuer"),
        "{err}"
    );

    let server = ours.issue(&id("default", "echo"), HOUR).expect("server");
    let foreign_client = theirs.issue(&id("default", "client"), HOUR).expect("client");
    // The foreign client trusts our root, so only the server's check can stop it.
    let mut trusting = foreign_client.clone();
    trusting.roots = ours.roots().expect("roots");
    let config = tls::client_config(&trusting, vec![id("default", "echo")]).expect("client config");
    let (_, s) = handshake(&server, config).await;
    let err = s.expect_err("server must refuse a client from another root");
    assert!(err.to_lowercase().contains("unknown"), "{err}");
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let server = ca.issue(&id("default", "echo"), HOUR).expect("server");
    let config = mesh_tests::client_without_certificate(&ca, id("default", "echo"));
    let (c, s) = handshake(&server, config).await;
    let err = s.expect_err("no client certificate");
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(c.is_err());
}

#[tokio::test]
async fn client_offering_only_http1_is_refused() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let server = ca.issue(&id("default", "echo"), HOUR).expect("server");
    let client = ca.issue(&id("default", "client"), HOUR).expect("client");
    let mut config = tls::client_config(&client, vec![id("default", "echo")]).expect("client config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (c, s) = handshake(&server, config).await;
    assert!(c.is_err() && s.is_err(), "ALPN mismatch must fail: {c:?} {s:?}");
}

#[test]
fn peer_from_another_trust_domain_is_refused() {
    let other = LocalCa::generate("other.td").expect("ca");
    let cert = other.issue(&Identity::new("other.td", "default", "x").expect("id"), HOUR).expect("cert");
    let err = tls::peer_identity(Some(&cert.chain), "cluster.local").expect_err("foreign trust domain");
    assert!(matches!(err, tls::TlsError::TrustDomain { .. }), "{err}");
    assert!(matches!(tls::peer_identity(None, "cluster.local"), Err(tls::TlsError::NoPeerCertificate)));
}
