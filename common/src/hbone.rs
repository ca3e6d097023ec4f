//! HBONE: HTTP/2 `CONNECT` streams inside mutual TLS (shared/spec/hbone.md).
//!
//! `connect` validates a CONNECT request, `server` terminates HBONE and hands each accepted
//! stream to the caller, `client` opens streams over one mTLS HTTP/2 connection, `pool` shares such
//! connections between callers.

pub mod client;
pub mod connect;
pub mod pool;
pub mod server;
pub mod stream;

pub use connect::{forwarded_for, proven_client};
pub use stream::HboneStream;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// HTTP/2 stream window (4 MiB).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window (16 MiB; must exceed the stream window).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 max frame size (1 MiB).
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
/// Streams a server allows per connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 200;
/// Keepalive PING interval and the time to wait for its answer.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a peer may wait after the TLS handshake before its first CONNECT (the HTTP/2
/// preface and SETTINGS come first); a silent connection is dropped.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Data h2 holds per stream beyond its window before a write waits (1 MiB).
pub const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Largest header block accepted from a peer (a CONNECT carries a handful of headers).
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Keeps an eye on a connection's peer: every [`KEEPALIVE_INTERVAL`] in which nothing was
/// read from it, pings it; returns why once a ping goes unanswered for [`KEEPALIVE_TIMEOUT`] or
/// cannot be sent. A connection that is receiving is not pinged (its PONG could queue behind
/// megabytes of data on a slow link). The connection must be polled meanwhile.
pub(crate) async fn keepalive(mut pings: h2::PingPong, heard: Arc<AtomicU64>) -> String {
    watch_peer(&heard, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, &mut pings).await
}

/// Something that asks the peer whether it is there.
trait Ping {
    async fn ping(&mut self) -> Result<(), String>;
}

impl Ping for h2::PingPong {
    async fn ping(&mut self) -> Result<(), String> {
        h2::PingPong::ping(self, h2::Ping::opaque()).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

async fn watch_peer(
    heard: &AtomicU64,
    interval: Duration,
    timeout: Duration,
    pinger: &mut impl Ping,
) -> String {
    let mut seen = heard.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(interval).await;
        let now = heard.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            continue;
        }
        match tokio::time::timeout(timeout, pinger.ping()).await {
            Ok(Ok(())) => seen = heard.load(Ordering::Relaxed),
            Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
            Err(_) => return format!("no answer to a keepalive ping within {timeout:?}"),
        }
    }
}

/// A connection's I/O that counts the bytes read from it (for [`keepalive`]).
pub(crate) struct Heard<T> {
    inner: T,
    bytes: Arc<AtomicU64>,
}

impl<T> Heard<T> {
    pub(crate) fn new(inner: T) -> (Self, Arc<AtomicU64>) {
        let bytes = Arc::new(AtomicU64::new(0));
        (Self { inner, bytes: bytes.clone() }, bytes)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Heard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Heard<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_secs(10);

    /// Answers the n-th ping with `answer(n)`; `None` never answers.
    struct Answers<F> {
        asked: u32,
        answer: F,
    }

    impl<F: Fn(u32) -> Option<Result<(), String>>> Ping for Answers<F> {
        async fn ping(&mut self) -> Result<(), String> {
            self.asked += 1;
            match (self.answer)(self.asked) {
                Some(r) => r,
                None => std::future::pending().await,
            }
        }
    }
    const WAIT: Duration = Duration::from_secs(20);

    /// A peer that keeps sending is never pinged; once quiet it is, and a PONG that never
    /// comes ends the watch after the timeout.
    #[tokio::test(start_paused = true)]
    async fn a_receiving_connection_is_not_pinged_and_a_silent_one_is_dropped() {
        let heard = Arc::new(AtomicU64::new(0));
        let feeder = heard.clone();
        // Data arrives every 3 s for the first 60 s.
        tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                feeder.fetch_add(100, Ordering::Relaxed);
            }
        });
        let started = tokio::time::Instant::now();
        let mut silent = Answers { asked: 0, answer: |_| None };
        let why = watch_peer(&heard, TICK, WAIT, &mut silent).await;
        assert!(why.contains("no answer"), "{why}");
        assert_eq!(silent.asked, 1, "pinged only once the data stopped");
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(60) + WAIT, "dropped while data still arrived: {took:?}");
        assert!(took <= Duration::from_secs(60) + 2 * TICK + WAIT, "noticed late: {took:?}");
    }

    /// A quiet peer that answers is pinged each interval and kept; a failed ping ends it.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_peer_that_answers_is_kept() {
        let heard = AtomicU64::new(0);
        let mut peer = Answers {
            asked: 0,
            answer: |n| Some(if n < 5 { Ok(()) } else { Err("connection closed".into()) }),
        };
        let why = watch_peer(&heard, TICK, WAIT, &mut peer).await;
        assert_eq!(peer.asked, 5);
        assert!(why.contains("connection closed"), "{why}");
    }
}
