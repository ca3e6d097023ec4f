//! The HBONE pool over loopback with certificates from the manager: streams share a bounded
//! number of connections (10k sequential, 1k concurrent), the stream cap opens further
//! connections, a wrong server identity is refused and not pooled, idle connections are
//! released, and a certificate rotation moves new streams to a new connection while streams on
//! the old one finish.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::hbone::connect::Authority;
use common::hbone::pool::{Pool, PoolConfig, PoolError, PoolKey, PoolMetrics};
use common::hbone::server::{self, ConnectRequest, Decision, ManagedTls};
use common::identity::{CaSource, CertMetrics, CertificateManager, Identity, LocalCa};
use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const HOUR: Duration = Duration::from_secs(3600);
const TARGET: &str = "10.0.0.1:8080";

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).expect("identity")
}

struct Setup {
    hbone: SocketAddr,
    /// Client-side certificate manager (source identity `client`).
    certs: CertificateManager,
    /// TCP peers the server has seen, one per HBONE connection.
    connections: Arc<Mutex<HashSet<SocketAddr>>>,
}

/// An HBONE server as `echo` whose streams echo until EOF; client certs live `client_lifetime`.
async fn setup(client_lifetime: Duration) -> Setup {
    let ca = Arc::new(LocalCa::generate("cluster.local").expect("ca"));
    let server_certs = CertificateManager::new(CaSource::Local(ca.clone(), HOUR), CertMetrics::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hbone = listener.local_addr().expect("addr");
    let connections = Arc::new(Mutex::new(HashSet::new()));
    let seen = connections.clone();
    let handler = move |req: ConnectRequest| -> server::BoxFuture<Decision> {
        seen.lock().expect("lock").insert(req.peer_addr);
        Box::pin(async move {
            Decision::Accept(Box::new(|stream| {
                Box::pin(async move {
                    let (mut rd, mut wr) = tokio::io::split(stream);
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                })
            }))
        })
    };
    let tls = ManagedTls::new(server_certs, id("echo"));
    let failures = server::InboundFailures::default();
    tokio::spawn(server::serve(listener, Arc::new(tls), "cluster.local".into(), Arc::new(handler), failures));
    let certs = CertificateManager::new(CaSource::Local(ca, client_lifetime), CertMetrics::default());
    Setup { hbone, certs, connections }
}

impl Setup {
    fn key(&self, expect: &str) -> PoolKey {
        PoolKey::new(id("client"), vec![id(expect)], None, self.hbone)
    }

    fn pool(&self, max_streams: usize, idle_timeout: Duration) -> Pool {
        Pool::new(
            self.certs.clone(),
            PoolConfig { max_streams, idle_timeout, ..Default::default() },
            PoolMetrics::default(),
        )
    }

    fn server_connections(&self) -> usize {
        self.connections.lock().expect("lock").len()
    }
}

fn authority() -> Authority {
    Authority::Addr(TARGET.parse().expect("addr"))
}

/// Writes `msg`, half-closes, reads the echo to EOF.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, msg: &[u8]) {
    stream.write_all(msg).await.expect("write");
    stream.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sequential_streams_share_one_connection() {
    let s = setup(HOUR).await;
    let pool = s.pool(100, HOUR);
    let key = s.key("echo");
    for i in 0..10_000u32 {
        let stream = pool.connect(&key, &authority(), HeaderMap::new()).await.expect("stream");
        round_trip(stream, &i.to_be_bytes()).await;
    }
    assert_eq!(s.server_connections(), 1, "every stream reused the first connection");
    assert_eq!(pool.connection_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_fill_connections_to_the_cap() {
    let s = setup(HOUR).await;
    let pool = s.pool(100, HOUR);
    let key = s.key("echo");
    // Every stream stays open until all 1000 are open, so they are truly concurrent.
    let barrier = Arc::new(tokio::sync::Barrier::new(1000));
    let tasks: Vec<_> = (0..1000u32)
        .map(|i| {
            let (pool, key, barrier) = (pool.clone(), key.clone(), barrier.clone());
            tokio::spawn(async move {
                let stream = pool.connect(&key, &authority(), HeaderMap::new()).await.expect("stream");
                barrier.wait().await;
                round_trip(stream, &i.to_be_bytes()).await;
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t).await.expect("no hang").expect("stream ok");
    }
    assert_eq!(s.server_connections(), 10, "1000 streams / 100 per connection");
    assert_eq!(pool.connection_count(), 10);
}

#[tokio::test]
async fn wrong_server_identity_is_refused_and_not_pooled() {
    let s = setup(HOUR).await;
    let pool = s.pool(100, HOUR);
    let err = pool.connect(&s.key("not-echo"), &authority(), HeaderMap::new()).await.err().expect("refused");
    assert!(matches!(err, PoolError::Client(_)), "{err}");
    assert!(err.to_string().contains("not-echo") || err.to_string().contains("TLS"), "{err}");
    assert_eq!(pool.connection_count(), 0);
    let stream = pool.connect(&s.key("echo"), &authority(), HeaderMap::new()).await.expect("right identity");
    round_trip(stream, b"ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_burst_only_one_idle_connection_per_key_is_kept() {
    let s = setup(HOUR).await;
    let pool = Pool::new(
        s.certs.clone(),
        PoolConfig {
            max_streams: 2,
            idle_timeout: HOUR,
            surplus_idle_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        PoolMetrics::default(),
    );
    let key = s.key("echo");
    // Six concurrent streams at two per connection: three connections.
    let mut streams = Vec::new();
    for _ in 0..6 {
        streams.push(pool.connect(&key, &authority(), HeaderMap::new()).await.expect("stream"));
    }
    assert_eq!(pool.connection_count(), 3);
    for (i, stream) in streams.into_iter().enumerate() {
        round_trip(stream, &[i as u8]).await;
    }
    tokio::time::timeout(Duration::from_secs(10), async {
        while pool.connection_count() > 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("surplus idle connections released");
    // The one kept (idle_timeout is an hour) carries the next stream: no new dial.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.connection_count(), 1, "the first idle connection stays for idle_timeout");
    let stream = pool.connect(&key, &authority(), HeaderMap::new()).await.expect("stream");
    round_trip(stream, b"again").await;
    assert_eq!(s.server_connections(), 3, "no dial after the burst");
}

#[tokio::test]
async fn idle_connections_are_released() {
    let s = setup(HOUR).await;
    let pool = s.pool(100, Duration::from_millis(200));
    let stream = pool.connect(&s.key("echo"), &authority(), HeaderMap::new()).await.expect("stream");
    round_trip(stream, b"once").await;
    assert_eq!(pool.connection_count(), 1);
    tokio::time::timeout(Duration::from_secs(5), async {
        while pool.connection_count() > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("idle connection released");
    // The next stream dials afresh.
    let stream = pool.connect(&s.key("echo"), &authority(), HeaderMap::new()).await.expect("stream");
    round_trip(stream, b"again").await;
    assert_eq!(s.server_connections(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_moves_new_streams_while_old_ones_finish() {
    // Client certificates live 2 s, so the manager rotates after about 1 s.
    let s = setup(Duration::from_secs(2)).await;
    let pool = s.pool(100, HOUR);
    let key = s.key("echo");
    let before = s.certs.fetch(&id("client")).await.expect("cert");
    let mut old_stream = pool.connect(&key, &authority(), HeaderMap::new()).await.expect("stream");
    old_stream.write_all(b"started before rotation, ").await.expect("write");

    let after = tokio::time::timeout(Duration::from_secs(5), s.certs.rotated(&id("client"), &before))
        .await
        .expect("rotated");
    assert_ne!(after.chain[0], before.chain[0], "a new leaf");
    assert!(after.not_after >= before.not_after);
    let new_stream = pool.connect(&key, &authority(), HeaderMap::new()).await.expect("stream after rotation");
    assert_eq!(s.server_connections(), 2, "the new certificate needs a new connection");
    assert_eq!(pool.connection_count(), 1, "the old connection takes no new streams");
    round_trip(new_stream, b"new").await;

    // The stream on the old connection still works to its end.
    old_stream.write_all(b"finished after").await.expect("write");
    old_stream.shutdown().await.expect("half-close");
    let mut got = Vec::new();
    old_stream.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, b"started before rotation, finished after");
}

#[tokio::test]
async fn a_peer_that_never_completes_the_handshake_is_a_connect_timeout() {
    let s = setup(HOUR).await;
    // Accepts TCP and then says nothing (no TLS): the dial must give up at the pool's bound.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let after = Duration::from_millis(300);
    let pool = Pool::new(
        s.certs.clone(),
        PoolConfig { connect_timeout: after, ..Default::default() },
        PoolMetrics::default(),
    );
    let key = PoolKey::new(id("client"), vec![id("echo")], None, silent_addr);
    let started = std::time::Instant::now();
    let e = pool.connect(&key, &authority(), HeaderMap::new()).await.err().expect("refused");
    assert!(matches!(e, common::hbone::pool::PoolError::ConnectTimeout { .. }), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}
