//! A line echo server for pods in the root-only tests and the local demo: each line a client
//! sends is answered with one line saying who answered and which client address it saw, so a
//! reply proves both the path and whether the source address was kept.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// Serves `listener` on background threads; each line gets `reply(name, client ip, line)`.
pub fn serve_lines(listener: TcpListener, reply: fn(&str, &str, &str) -> String, name: String) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let peer = stream.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let Ok(mut out) = stream.try_clone() else { return };
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(out, "{}", reply(&name, &peer, &line)).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A line echo server in `ns` on `bind`:8080 named `name`, answering `<name> <peer ip> <line>`
/// (bind `::` to serve both families).
pub fn serve_pod(ns: &crate::netns::Netns, bind: &str, name: &str) {
    let listener = ns
        .enter(|| TcpListener::bind((bind, 8080)))
        .unwrap_or_else(|e| panic!("bind the echo server in {}: {e}", ns.name));
    serve_lines(listener, |name, peer, line| format!("{name} {peer} {line}"), name.to_string());
}

/// Connects from `ns` to `dst`, sends `line`, half-closes, and returns everything received
/// (trailing newline trimmed). A refused connection is an error or an empty reply.
pub fn exchange(ns: &crate::netns::Netns, dst: &str, line: &str) -> Result<String, String> {
    use std::io::Read;
    ns.enter(|| {
        let addr: std::net::SocketAddr = dst.parse().map_err(|e| format!("{dst}: {e}"))?;
        let timeout = std::time::Duration::from_secs(3);
        let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(15))).map_err(|e| e.to_string())?;
        writeln!(s, "{line}").map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
        Ok(reply.trim_end().to_string())
    })
}

/// Fails the test unless `outcome` (of [`exchange`]) was refused: an error or an empty reply.
pub fn expect_refused(outcome: Result<String, String>, what: &str) {
    if let Ok(reply) = &outcome {
        assert!(reply.is_empty(), "{what} should be refused, got {reply:?}");
    }
}

/// What reached a [`sink`]: connections accepted and bytes read.
#[derive(Default)]
pub struct Arrivals {
    pub connections: std::sync::atomic::AtomicUsize,
    pub bytes: std::sync::atomic::AtomicUsize,
}

/// A server in `ns` on `bind` that answers nothing: it counts each connection it accepts and
/// every byte it reads, and closes at the client's end of stream.
pub fn sink(ns: &crate::netns::Netns, bind: std::net::SocketAddr) -> std::sync::Arc<Arrivals> {
    use std::io::Read;
    use std::sync::atomic::Ordering;
    let listener =
        ns.enter(|| TcpListener::bind(bind)).unwrap_or_else(|e| panic!("bind the sink in {}: {e}", ns.name));
    let arrivals = std::sync::Arc::new(Arrivals::default());
    let counted = arrivals.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counted.connections.fetch_add(1, Ordering::SeqCst);
            let counted = counted.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    counted.bytes.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    arrivals
}

/// Sends an HTTP/1.1 request in plaintext to `addr` (an mTLS port, to see it refused) and reads
/// until the server closes; panics if it has not closed within 10 s.
pub async fn plaintext_until_closed(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp =
        tokio::net::TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: echo\r\n\r\n").await.expect("write");
    let mut buf = [0u8; 256];
    // A TLS alert at most, then the close.
    while tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{addr} did not close within 10 s"))
        .is_ok_and(|n| n > 0)
    {}
}
