//! Bounds on an HTTP tunnel's waits: the protocol must be known within the detection timeout
//! (a silent tunnel is closed), and a tunnel with no request in flight for the idle timeout is
//! closed.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("no protocol within {0:?}")]
    Timeout(Duration),
    #[error("the tunnel closed before a request")]
    Closed,
    #[error("reading the tunnel: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads until the protocol is known (the HTTP/2 preface, or bytes that cannot start it), at
/// most for `timeout`. Returns the stream with those bytes put back.
pub async fn detect<S: AsyncRead + Unpin>(
    mut stream: S,
    timeout: Duration,
) -> Result<Rewind<S>, DetectError> {
    let mut seen = BytesMut::with_capacity(H2_PREFACE.len());
    let read = async {
        while seen.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&seen) {
            let mut chunk = [0u8; 24];
            let want = H2_PREFACE.len() - seen.len();
            let n = stream.read(&mut chunk[..want]).await?;
            if n == 0 {
                return Err(DetectError::Closed);
            }
            seen.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| DetectError::Timeout(timeout))??;
    Ok(Rewind { prefix: seen.freeze(), inner: stream })
}

/// Requests in flight on one tunnel and when the last one ended.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds since `started` of the last request's end.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { started: Instant::now(), in_flight: AtomicUsize::new(0), last: AtomicU64::new(0) })
    }

    /// Counts a request in flight until the guard is dropped (with the response body).
    pub fn begin(self: &Arc<Self>) -> ActiveGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }

    /// How long the tunnel has been idle (zero while a request is in flight).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Resolves once the tunnel has been idle for `limit`.
    pub async fn idle(&self, limit: Duration) {
        loop {
            let idle = self.idle_for();
            if idle >= limit {
                return;
            }
            tokio::time::sleep(limit - idle).await;
        }
    }
}

pub struct ActiveGuard(Arc<Activity>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.last.store(a.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
pub struct Tracked<B> {
    inner: B,
    _guard: ActiveGuard,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: ActiveGuard) -> Self {
        Self { inner, _guard: guard }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn detection_rewinds_what_it_read_and_times_out_on_silence() {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        let mut rewound = detect(server, Duration::from_secs(1)).await.expect("detected");
        let mut buf = [0u8; 16];
        rewound.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"GET / HTTP/1.1\r\n");

        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(H2_PREFACE).await.expect("write");
        let mut rewound = detect(server, Duration::from_secs(1)).await.expect("detected");
        let mut buf = [0u8; 24];
        rewound.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, H2_PREFACE);

        let (_silent, server) = tokio::io::duplex(64);
        let err = detect(server, Duration::from_millis(50)).await.err().expect("times out");
        assert!(matches!(err, DetectError::Timeout(_)), "{err}");
        // A partial preface that stalls is silence too.
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"PRI * HT").await.expect("write");
        assert!(matches!(detect(server, Duration::from_millis(50)).await, Err(DetectError::Timeout(_))));
    }

    #[tokio::test]
    async fn idle_waits_for_requests_in_flight() {
        let a = Activity::new();
        let guard = a.begin();
        let limit = Duration::from_millis(100);
        let idle = a.idle(limit);
        tokio::pin!(idle);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut idle).await.is_err(),
            "busy is not idle"
        );
        drop(guard);
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), idle).await.expect("idle after the request ends");
        assert!(started.elapsed() >= Duration::from_millis(90), "{:?}", started.elapsed());
    }
}
