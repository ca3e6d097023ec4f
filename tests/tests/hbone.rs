//! HBONE over loopback with real certificates from the local CA: CONNECT streams carry bytes
//! both ways with half-close, the server's handler sees the peer identity and authority and
//! may refuse, malformed CONNECTs get 400, and one connection multiplexes many streams.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::hbone::client::{ClientError, Connection};
use common::hbone::connect::Authority;
use common::hbone::server::{self, ConnectRequest, Decision, Failure, InboundFailures};
use common::identity::{Identity, LocalCa};
use common::tls;
use http::{HeaderMap, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

const HOUR: Duration = Duration::from_secs(3600);
const TRAILER: &[u8] = b"<eof seen>";

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa).expect("identity")
}

/// An upstream that echoes until the client half-closes, then sends a trailer and closes.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = s.write_all(TRAILER).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

struct Setup {
    hbone: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    seen: mpsc::UnboundedReceiver<(Identity, Authority, Option<String>)>,
    /// (sent, received) byte counts of each finished tunnel, from the server's copy.
    bytes: mpsc::UnboundedReceiver<(u64, u64)>,
    /// How the slow handler (port 4011) ended: "completed" or "cancelled".
    slow: mpsc::UnboundedReceiver<&'static str>,
    /// What a stream accepted for port 4012 held the moment it was accepted.
    held: mpsc::UnboundedReceiver<Vec<u8>>,
    /// The server's `istio_hbone_inbound_failures_total`.
    registry: prometheus_client::registry::Registry,
    ca: LocalCa,
    foreign_ca: LocalCa,
}

impl Setup {
    /// `istio_hbone_inbound_failures_total{reason}` of the server.
    fn failures(&self, why: Failure) -> u64 {
        failures_in(&self.registry, why)
    }
}

/// `istio_hbone_inbound_failures_total{reason}` in `registry`.
fn failures_in(registry: &prometheus_client::registry::Registry, why: Failure) -> u64 {
    let text = common::metrics::render(registry);
    let series = format!("istio_hbone_inbound_failures_total{{reason=\"{}\"}} ", why.reason());
    text.lines().find_map(|l| l.strip_prefix(series.as_str())).map_or(0, |v| v.parse().expect("count"))
}

/// Reports "cancelled" when dropped before it is disarmed.
struct CancelGuard(Option<mpsc::UnboundedSender<&'static str>>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send("cancelled");
        }
    }
}

/// Starts an HBONE server as `echo` that forwards to the requested address unless the
/// authority's port is 4010 (refused with 401), 4011 (a handler that takes 2 s, then refuses)
/// or 4012 (accepted; reports what had already arrived on the stream, without waiting).
async fn setup() -> Setup {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let mut server_cert = ca.issue(&id("echo"), HOUR).expect("server cert");
    // The server also trusts the root of another trust domain (as during a migration): the
    // chain of its certificates verifies, their identity is still refused.
    let foreign_ca = LocalCa::generate("other.td").expect("ca");
    server_cert.roots.extend(foreign_ca.roots().expect("roots"));
    let client_cert = ca.issue(&id("client"), HOUR).expect("client cert");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hbone = listener.local_addr().expect("addr");
    let (tx, seen) = mpsc::unbounded_channel();
    let (bytes_tx, bytes) = mpsc::unbounded_channel();
    let (slow_tx, slow) = mpsc::unbounded_channel();
    let (held_tx, held) = mpsc::unbounded_channel();
    let handler = move |req: ConnectRequest| -> server::BoxFuture<Decision> {
        let (tx, bytes_tx, slow_tx, held_tx) =
            (tx.clone(), bytes_tx.clone(), slow_tx.clone(), held_tx.clone());
        Box::pin(async move {
            let baggage = req.headers.get("baggage").and_then(|v| v.to_str().ok()).map(String::from);
            let _ = tx.send((req.peer.clone(), req.authority.clone(), baggage));
            let Authority::Addr(target) = req.authority else {
                return Decision::Refuse(StatusCode::BAD_REQUEST, "hostname".into());
            };
            if target.port() == 4010 {
                return Decision::Refuse(StatusCode::UNAUTHORIZED, "policy".into());
            }
            if target.port() == 4011 {
                let mut guard = CancelGuard(Some(slow_tx));
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Some(tx) = guard.0.take() {
                    let _ = tx.send("completed");
                }
                return Decision::Refuse(StatusCode::SERVICE_UNAVAILABLE, "slow".into());
            }
            if target.port() == 4012 {
                return Decision::Accept(Box::new(move |mut stream| {
                    Box::pin(async move {
                        let mut buf = vec![0u8; 1024];
                        // A zero timeout polls the read once.
                        let n = match tokio::time::timeout(Duration::ZERO, stream.read(&mut buf)).await {
                            Ok(Ok(n)) => n,
                            _ => 0,
                        };
                        let _ = held_tx.send(buf[..n].to_vec());
                    })
                }));
            }
            match tokio::net::TcpStream::connect(target).await {
                Err(e) => Decision::Refuse(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                // The server relays the way ztunnel does (frames straight to the socket); the
                // client side reads and writes the stream as a byte stream.
                Ok(upstream) => Decision::Accept(Box::new(move |mut stream| {
                    Box::pin(async move {
                        let counters = common::copy::ByteCounters::default();
                        let _ = common::copy::copy_tcp_hbone(&upstream, &mut stream, false, &counters).await;
                        let _ = bytes_tx.send((counters.sent(), counters.received()));
                    })
                })),
            }
        })
    };
    let config = Arc::new(tls::server_config(&server_cert).expect("server config"));
    let mut registry = common::metrics::new_registry();
    let failures = InboundFailures::register(&mut registry);
    tokio::spawn(server::serve(
        listener,
        Arc::new(server::FixedTls(config)),
        "cluster.local".into(),
        Arc::new(handler),
        failures,
    ));
    let client = Arc::new(tls::client_config(&client_cert, vec![id("echo")]).expect("client config"));
    Setup { hbone, client, seen, bytes, slow, held, registry, ca, foreign_ca }
}

#[tokio::test]
async fn tunnel_carries_bytes_both_ways_with_half_close() {
    let mut s = setup().await;
    let upstream = echo_upstream().await;
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let mut headers = HeaderMap::new();
    headers.insert("baggage", "k8s.namespace.name=default".parse().expect("header"));
    let stream = conn.open(&Authority::Addr(upstream), headers).await.expect("CONNECT accepted");
    let (peer, authority, baggage) = s.seen.recv().await.expect("handler saw the request");
    assert_eq!(peer, id("client"), "server sees the client's identity");
    assert_eq!(authority, Authority::Addr(upstream));
    assert_eq!(baggage.as_deref(), Some("k8s.namespace.name=default"));

    // 20 MiB up (more than the connection's 16 MiB window: the windows must be given back as
    // bytes are consumed, or this stalls), then half-close; everything comes back, then the
    // upstream's own data after it saw our EOF, then EOF.
    let payload: Vec<u8> = (0..20 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let expected_len = payload.len() + TRAILER.len();
    let writer = tokio::spawn(async move {
        wr.write_all(&payload).await.expect("write");
        wr.shutdown().await.expect("half-close");
        payload
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut got))
        .await
        .expect("no hang")
        .expect("read");
    let payload = writer.await.expect("writer");
    assert_eq!(got.len(), expected_len);
    assert_eq!(&got[..payload.len()], &payload[..]);
    assert_eq!(&got[payload.len()..], TRAILER);
    let (sent, received) = s.bytes.recv().await.expect("tunnel finished");
    assert_eq!(sent, payload.len() as u64, "bytes towards the upstream");
    assert_eq!(received, expected_len as u64, "bytes back to the client");
}

#[tokio::test]
async fn handler_refusals_and_bad_connects_get_their_status() {
    let s = setup().await;
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let refused =
        conn.open(&Authority::Addr("127.0.0.1:4010".parse().expect("addr")), HeaderMap::new()).await;
    assert!(
        matches!(refused, Err(ClientError::Status { status: StatusCode::UNAUTHORIZED, .. })),
        "{refused:?}"
    );
    // Port 1 on loopback has no listener: upstream connect failure is 503.
    let dead = conn.open(&Authority::Addr("127.0.0.1:1".parse().expect("addr")), HeaderMap::new()).await;
    assert!(
        matches!(dead, Err(ClientError::Status { status: StatusCode::SERVICE_UNAVAILABLE, .. })),
        "{dead:?}"
    );
    // A malformed authority never reaches the handler: 400.
    let bad = conn.open(&Authority::Host { host: "1.2.3".into(), port: 80 }, HeaderMap::new()).await;
    assert!(matches!(bad, Err(ClientError::Status { status: StatusCode::BAD_REQUEST, .. })), "{bad:?}");
    // The connection survives refusals.
    assert!(conn.is_open());
}

/// A plain CONNECT on `conn` to the echo `upstream`: `hello <i>` comes back, then the trailer.
async fn round_trip(conn: &Connection, upstream: SocketAddr, i: usize) {
    let mut stream = conn.open(&Authority::Addr(upstream), HeaderMap::new()).await.expect("stream");
    let msg = format!("hello {i}");
    stream.write_all(msg.as_bytes()).await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, [msg.as_bytes(), TRAILER].concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_multiplexes_many_streams() {
    let s = setup().await;
    let upstream = echo_upstream().await;
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    for i in 0..300 {
        round_trip(&conn, upstream, i).await;
    }
    // 150 at once: more than fit under one server's stream limit are queued, not failed.
    let mut tasks = Vec::new();
    for i in 0..150 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move { round_trip(&conn, upstream, i).await }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(30), t).await.expect("no hang").expect("stream ok");
    }
}

#[tokio::test]
async fn a_peer_silent_after_the_tls_handshake_is_dropped() {
    let s = setup().await;
    let tcp = tokio::net::TcpStream::connect(s.hbone).await.expect("connect");
    let name = rustls_pki_types::ServerName::IpAddress(s.hbone.ip().into());
    let mut tls =
        tokio_rustls::TlsConnector::from(s.client.clone()).connect(name, tcp).await.expect("mTLS handshake");
    // Not even the HTTP/2 preface: the server closes after FIRST_REQUEST_TIMEOUT.
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(common::hbone::FIRST_REQUEST_TIMEOUT + Duration::from_secs(5), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the silent peer was never dropped");
    assert!(started.elapsed() >= common::hbone::FIRST_REQUEST_TIMEOUT - Duration::from_millis(100));
    wait_for_count(&s, Failure::NoRequest, 1).await;
}

/// Waits (bounded) until the server has counted `n` failures of `why` (it counts after it
/// closes the connection, so just after the client sees the close).
async fn wait_for_count(s: &Setup, why: Failure, n: u64) {
    wait_for_count_in(&s.registry, why, n).await
}

async fn wait_for_count_in(registry: &prometheus_client::registry::Registry, why: Failure, n: u64) {
    let count = || failures_in(registry, why);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count() < n {
        assert!(std::time::Instant::now() < deadline, "{why:?} counted {} times, not {n}", count());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(count(), n, "{why:?} counted once per failure");
}

/// A server with no certificate for the address a connection arrived on (its CA down, say)
/// closes the connection before TLS, and the refusal is counted as `no_certificate`: the
/// server itself counts, whatever handler it serves.
#[tokio::test]
async fn a_connection_without_a_server_certificate_is_refused_and_counted() {
    struct NoCertificate;
    impl server::ServerTls for NoCertificate {
        fn config_for(&self, _: SocketAddr) -> server::BoxFuture<Result<Arc<rustls::ServerConfig>, String>> {
            Box::pin(async { Err("the CA is unreachable".to_string()) })
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut registry = common::metrics::new_registry();
    let failures = InboundFailures::register(&mut registry);
    let (seen, mut asked) = mpsc::unbounded_channel();
    let handler = move |req: ConnectRequest| -> server::BoxFuture<Decision> {
        let _ = seen.send(req.authority);
        Box::pin(async { Decision::Refuse(StatusCode::FORBIDDEN, "test".into()) })
    };
    tokio::spawn(server::serve(
        listener,
        Arc::new(NoCertificate),
        "cluster.local".into(),
        Arc::new(handler),
        failures,
    ));
    for n in 1..=2 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // A TLS ClientHello's first bytes; the server answers nothing and closes.
        let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05]).await;
        until_closed(&mut tcp).await;
        wait_for_count_in(&registry, Failure::NoCertificate, n).await;
    }
    assert_eq!(failures_in(&registry, Failure::TlsHandshake), 0);
    assert!(asked.try_recv().is_err(), "nothing reached the handler");
}

/// Reads until the server closes (or 10 s pass: a failure).
async fn until_closed(mut r: impl tokio::io::AsyncRead + Unpin) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server did not close");
}

/// Each way to fail before the handler decides is refused and counted under its own reason
/// (the test counts only its own server's failures): plaintext garbage, TLS without a client
/// certificate, a certificate of another trust domain, TLS and then no HTTP/2, a malformed
/// CONNECT, a CONNECT the client cancels. None reaches the handler.
#[tokio::test]
async fn every_failure_before_a_decision_is_counted_by_reason() {
    let mut s = setup().await;
    let name = rustls_pki_types::ServerName::IpAddress(s.hbone.ip().into());
    // Plaintext where TLS is expected.
    let mut tcp = tokio::net::TcpStream::connect(s.hbone).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    until_closed(&mut tcp).await;
    wait_for_count(&s, Failure::TlsHandshake, 1).await;
    // TLS without a client certificate (the server asks for one and requires it).
    let no_cert = mesh_tests::client_without_certificate(&s.ca, id("echo"));
    let tcp = tokio::net::TcpStream::connect(s.hbone).await.expect("connect");
    if let Ok(tls) = tokio_rustls::TlsConnector::from(Arc::new(no_cert)).connect(name.clone(), tcp).await {
        // TLS 1.3: the client finishes before the server has judged its (missing) certificate.
        until_closed(tls).await;
    }
    wait_for_count(&s, Failure::TlsHandshake, 2).await;
    // A certificate from a root the server trusts, for another trust domain.
    let foreign = Identity::new("other.td", "default", "client").expect("identity");
    let mut cert = s.foreign_ca.issue(&foreign, HOUR).expect("cert");
    cert.roots = s.ca.roots().expect("roots");
    let config = Arc::new(tls::client_config(&cert, vec![id("echo")]).expect("client config"));
    let tcp = tokio::net::TcpStream::connect(s.hbone).await.expect("connect");
    if let Ok(tls) = tokio_rustls::TlsConnector::from(config).connect(name.clone(), tcp).await {
        until_closed(tls).await;
    }
    wait_for_count(&s, Failure::PeerIdentity, 1).await;
    // mTLS, then something that is not the HTTP/2 preface.
    let tcp = tokio::net::TcpStream::connect(s.hbone).await.expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(s.client.clone()).connect(name, tcp).await.expect("mTLS");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    until_closed(&mut tls).await;
    wait_for_count(&s, Failure::Http2Handshake, 1).await;
    // A malformed CONNECT, then one the client gives up on, on one connection.
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let bad = conn.open(&Authority::Host { host: "1.2.3".into(), port: 80 }, HeaderMap::new()).await;
    assert!(matches!(bad, Err(ClientError::Status { status: StatusCode::BAD_REQUEST, .. })), "{bad:?}");
    wait_for_count(&s, Failure::BadConnect, 1).await;
    let slow = Authority::Addr("127.0.0.1:4011".parse().expect("addr"));
    let gave_up = tokio::time::timeout(Duration::from_millis(300), conn.open(&slow, HeaderMap::new())).await;
    assert!(gave_up.is_err(), "the slow handler answered early: {gave_up:?}");
    wait_for_count(&s, Failure::CancelledByClient, 1).await;
    // Only the slow CONNECT reached the handler; each failure was counted once.
    assert!(matches!(s.seen.try_recv(), Ok((_, Authority::Addr(a), _)) if a.port() == 4011));
    assert!(s.seen.try_recv().is_err(), "nothing else reached the handler");
    assert_eq!((s.failures(Failure::TlsHandshake), s.failures(Failure::NoRequest)), (2, 0));
}

/// A client that gives up on a CONNECT (its stream is reset) while the server's handler still
/// works stops that handler: a ztunnel must not go on to dial the destination for a request
/// nobody waits for (nor start handlers without bound for a flood of HEADERS and RST_STREAM).
#[tokio::test]
async fn a_connect_reset_by_the_client_stops_its_handler() {
    let mut s = setup().await;
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let slow = Authority::Addr("127.0.0.1:4011".parse().expect("addr"));
    let gave_up = tokio::time::timeout(Duration::from_millis(300), conn.open(&slow, HeaderMap::new())).await;
    assert!(gave_up.is_err(), "the slow handler answered early: {gave_up:?}");
    let ended =
        tokio::time::timeout(Duration::from_secs(10), s.slow.recv()).await.expect("the handler ended");
    assert_eq!(ended, Some("cancelled"), "the handler ran on after the client reset the stream");
    // The connection carries on.
    let upstream = echo_upstream().await;
    let mut stream = conn.open(&Authority::Addr(upstream), HeaderMap::new()).await.expect("stream");
    stream.write_all(b"x").await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, [b"x".as_slice(), TRAILER].concat());
}

/// The segments the accepted socket on `port` has received so far, from `ss -ti`.
fn segments_in(port: u16) -> (u64, String) {
    let out = std::process::Command::new("ss")
        .args(["-tinH", "state", "close-wait", "sport", "=", &format!(":{port}")])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = text.split_whitespace().find_map(|w| w.strip_prefix("segs_in:"));
    let n =
        field.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("no segs_in for port {port} in: {text}"));
    (n, text.into_owned())
}

/// When the end of stream comes with the last data, the relay hands the socket both in one
/// segment: the reader finds the close together with the bytes, as it would from the peer
/// itself, and so does not close first. (Written apart, a client on the same CPU read the last
/// bytes and closed before the FIN came: TIME_WAIT moved from the server into the client, whose
/// ephemeral ports ran out under connection churn.)
#[tokio::test]
async fn the_last_data_and_the_close_reach_the_socket_together() {
    let s = setup().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let mut stream = conn.open(&Authority::Addr(upstream), HeaderMap::new()).await.expect("stream");
    let (mut accepted, _) = listener.accept().await.expect("the relay connects");
    // Both frames are queued before this task yields, so they travel together.
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    stream.shutdown().await.expect("end of stream");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), accepted.read_to_end(&mut got))
        .await
        .expect("no hang")
        .expect("read");
    assert_eq!(got, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    // The SYN and the handshake's ACK, then one segment with the data and the FIN (written
    // apart, they make four).
    let (n, ss) = segments_in(upstream.port());
    assert_eq!(n, 3, "the data and the FIN came in separate segments: {ss}");
}

/// Bytes the client has already written go right behind the CONNECT, a round trip before the
/// response would have let them go: the server finds them on the stream as it accepts it.
/// A refusal with early data is still a plain refusal, and the connection keeps serving (that
/// refused early data reaches no destination is shown end to end in `l4.rs`, under a DENY).
#[tokio::test]
async fn early_data_rides_with_the_connect_and_only_an_accepted_stream_delivers_it() {
    let mut s = setup().await;
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let peek = Authority::Addr("127.0.0.1:4012".parse().expect("addr"));
    let _stream = conn.open_with(&peek, HeaderMap::new(), "hello".into()).await.expect("accepted");
    let held = tokio::time::timeout(Duration::from_secs(10), s.held.recv()).await.expect("reported");
    assert_eq!(held.as_deref(), Some(b"hello".as_slice()), "the early bytes were not there on accept");
    // Without early data nothing is there yet: the check above can fail.
    let _stream = conn.open(&peek, HeaderMap::new()).await.expect("accepted");
    let held = tokio::time::timeout(Duration::from_secs(10), s.held.recv()).await.expect("reported");
    assert_eq!(held.as_deref(), Some(b"".as_slice()));

    let refused = Authority::Addr("127.0.0.1:4010".parse().expect("addr"));
    let err = conn.open_with(&refused, HeaderMap::new(), "secret".into()).await.expect_err("refused");
    assert!(matches!(err, ClientError::Status { status: StatusCode::UNAUTHORIZED, .. }), "{err}");

    // Accepted for real: the upstream gets the early bytes once, then the rest, in order.
    let upstream = echo_upstream().await;
    let mut stream =
        conn.open_with(&Authority::Addr(upstream), HeaderMap::new(), "early,".into()).await.expect("stream");
    stream.write_all(b"late").await.expect("write");
    stream.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got))
        .await
        .expect("no hang")
        .expect("read");
    assert_eq!(got, [b"early,late".as_slice(), TRAILER].concat());
    // The connection still serves streams.
    let mut stream = conn.open(&Authority::Addr(upstream), HeaderMap::new()).await.expect("stream");
    stream.shutdown().await.expect("shutdown");
}

/// A CONNECT whose header block is over the server's limit (16 KiB; h2's default would take
/// 16 MiB) is refused on its own: the handler never sees it, and the connection keeps serving
/// other streams.
#[tokio::test]
async fn a_connect_with_oversized_headers_is_refused_and_the_connection_survives() {
    let mut s = setup().await;
    let upstream = echo_upstream().await;
    let conn = Connection::connect(s.hbone, s.client.clone()).await.expect("HBONE connection");
    let mut big = HeaderMap::new();
    let value = "x".repeat(common::hbone::MAX_HEADER_LIST_SIZE as usize + 1024);
    big.insert("x-padding", http::HeaderValue::from_str(&value).expect("value"));
    let refused = tokio::time::timeout(Duration::from_secs(10), conn.open(&Authority::Addr(upstream), big))
        .await
        .expect("an answer, not a hang");
    // h2 answers it itself, before our handler: 431 Request Header Fields Too Large.
    assert!(
        matches!(
            refused,
            Err(ClientError::Status { status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, .. })
        ),
        "{refused:?}"
    );
    assert!(s.seen.try_recv().is_err(), "the handler saw the oversized CONNECT");
    // A normal CONNECT on the same connection afterwards.
    round_trip(&conn, upstream, 0).await;
}
