//! Bidirectional byte copying between a downstream and an upstream stream, with half-close
//! passed through, buffers that start small and grow only for busy streams, and live byte
//! counters for telemetry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use crate::hbone::HboneStream;
use crate::hbone::stream::{RecvHalf, SendHalf};

/// Starting buffer per direction: an idle connection costs little.
pub const INITIAL_BUFFER: usize = 1024;
/// Largest buffer a busy direction grows to.
pub const MAX_BUFFER: usize = 256 * 1024;
/// Consecutive reads that fill the buffer before it doubles.
const GROW_AFTER_FULL_READS: u32 = 2;

/// Bytes moved so far, readable while the copy runs.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Downstream to upstream (what the client sent).
    pub sent: AtomicU64,
    /// Upstream to downstream (what the client received).
    pub received: AtomicU64,
}

impl ByteCounters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Which way bytes were flowing when a copy failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToUpstream,
    ToDownstream,
}

#[derive(Debug, thiserror::Error)]
#[error("copy {direction:?}: {source}")]
pub struct CopyError {
    pub direction: Direction,
    pub source: std::io::Error,
}

/// Copies both ways until both sides have closed. EOF from one side is passed on as a write
/// shutdown (half-close) to the other while the opposite direction keeps flowing. The first
/// error ends both directions.
pub async fn copy_bidirectional<D, U>(
    downstream: D,
    upstream: U,
    counters: &ByteCounters,
) -> Result<(), CopyError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_upstream = copy_one(&mut down_read, &mut up_write, &counters.sent, Direction::ToUpstream);
    let to_downstream = copy_one(&mut up_read, &mut down_write, &counters.received, Direction::ToDownstream);
    tokio::try_join!(to_upstream, to_downstream).map(|_| ())
}

/// Copies one direction until EOF, then shuts the writer down.
async fn copy_one<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &AtomicU64,
    direction: Direction,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let fail = |source| CopyError { direction, source };
    let mut buf = vec![0u8; INITIAL_BUFFER];
    let mut full_reads = 0;
    loop {
        let n = reader.read(&mut buf).await.map_err(fail)?;
        if n == 0 {
            writer.shutdown().await.map_err(fail)?;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await.map_err(fail)?;
        writer.flush().await.map_err(fail)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if n == buf.len() && buf.len() < MAX_BUFFER {
            full_reads += 1;
            if full_reads >= GROW_AFTER_FULL_READS {
                buf.resize(buf.len() * 2, 0);
                full_reads = 0;
            }
        } else {
            full_reads = 0;
        }
    }
}

/// Copies both ways between a TCP connection and an HBONE stream, like [`copy_bidirectional`]
/// with fewer copies and no buffer held while idle: a read buffer is taken only once the
/// socket is readable and is handed to HTTP/2 as the DATA frame itself; received frames are
/// written to the socket as they came, and their window is given back once written.
/// `tcp_is_downstream` says which way the counters count.
pub async fn copy_tcp_hbone(
    tcp: &TcpStream,
    hbone: &mut HboneStream,
    tcp_is_downstream: bool,
    counters: &ByteCounters,
) -> Result<(), CopyError> {
    let (from_tcp, to_tcp) = if tcp_is_downstream {
        ((&counters.sent, Direction::ToUpstream), (&counters.received, Direction::ToDownstream))
    } else {
        ((&counters.received, Direction::ToDownstream), (&counters.sent, Direction::ToUpstream))
    };
    let (recv, send) = hbone.split();
    tokio::try_join!(
        tcp_to_hbone(tcp, send, from_tcp.0, from_tcp.1),
        hbone_to_tcp(recv, tcp, to_tcp.0, to_tcp.1)
    )
    .map(|_| ())
}

async fn tcp_to_hbone(
    tcp: &TcpStream,
    mut send: SendHalf<'_>,
    counter: &AtomicU64,
    direction: Direction,
) -> Result<(), CopyError> {
    let fail = |source| CopyError { direction, source };
    let mut size = INITIAL_BUFFER;
    let mut full_reads = 0;
    let mut buf = BytesMut::new();
    loop {
        // Quiet here means waiting on the socket; a reset of the stream meanwhile ends this
        // direction (what was received before it is still delivered the other way). Polled
        // by hand: a connection waits here for most of its life, and `readable()` and
        // `select!` would each add their own state to its task.
        let woken = std::future::poll_fn(|cx| match send.poll_reset(cx) {
            Poll::Ready(reset) => Poll::Ready(Err(reset)),
            Poll::Pending => tcp.poll_read_ready(cx).map(Ok),
        })
        .await;
        match woken {
            Ok(ready) => ready.map_err(fail)?,
            Err(reset) => return reset.map_or(Ok(()), |e| Err(fail(e))),
        }
        if buf.capacity() < size {
            buf = BytesMut::with_capacity(size);
        }
        let n = match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                send.finish().map_err(fail)?;
                return Ok(());
            }
            Ok(n) => n,
            // The readiness was stale (the last read emptied the socket without seeing it
            // empty): the buffer goes back, or every idle connection would keep one.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                buf = BytesMut::new();
                continue;
            }
            Err(e) => return Err(fail(e)),
        };
        // A read that filled at least half the buffer becomes the frame itself (the buffer
        // goes with it); a short one is copied out, so a queued frame never holds more than
        // twice its size. Either way no buffer is kept while the socket is quiet.
        let mut frame = Some(if n >= size / 2 { buf.split().freeze() } else { Bytes::copy_from_slice(&buf) });
        buf = BytesMut::new();
        std::future::poll_fn(|cx| send.poll_send(cx, &mut frame)).await.map_err(fail)?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if n == size && size < MAX_BUFFER {
            full_reads += 1;
            if full_reads >= GROW_AFTER_FULL_READS {
                size *= 2;
                full_reads = 0;
            }
        } else {
            full_reads = 0;
            if n < size / 2 {
                size = (size / 2).max(INITIAL_BUFFER);
            }
        }
    }
}

async fn hbone_to_tcp(
    mut recv: RecvHalf<'_>,
    tcp: &TcpStream,
    counter: &AtomicU64,
    direction: Direction,
) -> Result<(), CopyError> {
    let fail = |source| CopyError { direction, source };
    let mut next = std::future::poll_fn(|cx| recv.poll_chunk(cx)).await.map_err(fail)?;
    while let Some(chunk) = next.take() {
        // Look at what follows without waiting: when the peer's end of stream came with this
        // chunk, the chunk is written held back (MSG_MORE) and the FIN joins it, so the
        // reader sees the data and the close together, as it would from the server itself.
        // Written apart, a reader on this CPU ran between them, read the last bytes and closed
        // first: TIME_WAIT then landed in the client instead of the server, and a client that
        // churns connections ran out of ephemeral ports.
        let ahead = std::future::poll_fn(|cx| Poll::Ready(recv.poll_chunk(cx))).await;
        let last = matches!(ahead, Poll::Ready(Ok(None)));
        let mut written = 0;
        while written < chunk.len() {
            std::future::poll_fn(|cx| tcp.poll_write_ready(cx)).await.map_err(fail)?;
            let rest = &chunk[written..];
            let r = if last {
                tcp.try_io(Interest::WRITABLE, || {
                    socket2::SockRef::from(tcp).send_with_flags(rest, libc::MSG_MORE)
                })
            } else {
                tcp.try_write(rest)
            };
            match r {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(fail(e)),
            }
        }
        recv.release(chunk.len());
        counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        next = match ahead {
            Poll::Ready(r) => r.map_err(fail)?,
            Poll::Pending => std::future::poll_fn(|cx| recv.poll_chunk(cx)).await.map_err(fail)?,
        };
    }
    socket2::SockRef::from(tcp).shutdown(std::net::Shutdown::Write).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (client, proxy_down) = duplex(64 * 1024);
        let (proxy_up, server) = duplex(64 * 1024);
        let counters = std::sync::Arc::new(ByteCounters::default());
        let c = counters.clone();
        let proxy = tokio::spawn(async move { copy_bidirectional(proxy_down, proxy_up, &c).await });

        let (mut server_read, mut server_write) = tokio::io::split(server);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let request = vec![7u8; 300_000];
        let send = request.clone();
        let writer = tokio::spawn(async move {
            client_write.write_all(&send).await.expect("write");
            client_write.shutdown().await.expect("half-close");
        });
        // The server sees the whole request and then EOF, and can still answer afterwards.
        let mut got = Vec::new();
        server_read.read_to_end(&mut got).await.expect("server read");
        assert_eq!(got, request);
        server_write.write_all(b"answer after half-close").await.expect("server write");
        server_write.shutdown().await.expect("server close");
        let mut answer = Vec::new();
        client_read.read_to_end(&mut answer).await.expect("client read");
        assert_eq!(answer, b"answer after half-close");
        writer.await.expect("writer");
        proxy.await.expect("join").expect("copy ok");
        assert_eq!(counters.sent(), 300_000);
        assert_eq!(counters.received(), 23);
    }

    /// A reader that hands out `chunk` bytes per read (or fills the buffer when `chunk` is
    /// None) and records the buffer sizes it was offered.
    struct Recording {
        left: usize,
        chunk: Option<usize>,
        offered: Vec<usize>,
    }

    impl AsyncRead for Recording {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.offered.push(buf.remaining());
            let n = self.chunk.unwrap_or(usize::MAX).min(buf.remaining()).min(self.left);
            buf.put_slice(&vec![1u8; n]);
            self.left -= n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    async fn offered_sizes(total: usize, chunk: Option<usize>) -> Vec<usize> {
        let mut reader = Recording { left: total, chunk, offered: Vec::new() };
        let mut sink = Vec::new();
        let counter = AtomicU64::new(0);
        copy_one(&mut reader, &mut sink, &counter, Direction::ToUpstream).await.expect("copy");
        assert_eq!(sink.len(), total);
        assert_eq!(counter.load(Ordering::Relaxed), total as u64);
        reader.offered
    }

    #[tokio::test]
    async fn buffer_grows_only_under_load() {
        let busy = offered_sizes(8 * MAX_BUFFER, None).await;
        assert_eq!(busy[0], INITIAL_BUFFER);
        assert_eq!(busy.iter().max(), Some(&MAX_BUFFER), "a busy stream grows to the cap");
        assert!(busy.len() < 40, "{} reads for 2 MiB", busy.len());
        let trickle = offered_sizes(100 * 10, Some(10)).await;
        assert!(trickle.iter().all(|&n| n == INITIAL_BUFFER), "small reads never grow the buffer");
    }
}
