//! One established CONNECT stream, straight on the `h2` crate's stream handles: writes go to
//! the HTTP/2 send stream in the caller's task (no channel, no extra task per stream), reads
//! hand out the received DATA frames, and flow control follows what the caller consumed.
//!
//! Besides `AsyncRead`/`AsyncWrite` (for HTTP served over a tunnel), the stream offers
//! chunk-level access ([`RecvHalf::poll_chunk`], [`SendHalf::poll_send`], through
//! [`HboneStream::split`]) so a relay moves received frames and read buffers without copying
//! them again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An established tunnel: a bidirectional byte stream.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet handed to a reader (their window is not yet released).
    pending: Bytes,
    /// End of stream has been sent.
    shut: bool,
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream").field("pending", &self.pending.len()).field("shut", &self.shut).finish()
    }
}

/// A stream error as an I/O error. A peer ending the stream with NO_ERROR or CANCEL is a close
/// (as HTTP/2 CONNECT tunnels do), STREAM_CLOSED a broken pipe.
fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    match e.reason() {
        Some(Reason::STREAM_CLOSED) => io::Error::new(io::ErrorKind::BrokenPipe, e),
        _ => io::Error::other(e),
    }
}

fn is_close(e: &h2::Error) -> bool {
    matches!(e.reason(), Some(Reason::NO_ERROR) | Some(Reason::CANCEL)) && !e.is_io()
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self { send, recv, pending: Bytes::new(), shut: false }
    }

    /// The receiving and the sending side, usable at the same time (one task per direction).
    pub fn split(&mut self) -> (RecvHalf<'_>, SendHalf<'_>) {
        (
            RecvHalf { recv: &mut self.recv, pending: &mut self.pending },
            SendHalf { send: &mut self.send, shut: &mut self.shut },
        )
    }
}

/// The receiving side of an [`HboneStream`].
pub struct RecvHalf<'a> {
    recv: &'a mut RecvStream,
    pending: &'a mut Bytes,
}

impl RecvHalf<'_> {
    /// The next received bytes, `None` at end of stream. The caller must [`release`] what it
    /// has consumed of them, which reopens the peer's window.
    ///
    /// [`release`]: RecvHalf::release
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(self.pending))));
        }
        loop {
            return match ready!(self.recv.poll_data(cx)) {
                None => Poll::Ready(Ok(None)),
                Some(Ok(b)) if b.is_empty() => continue,
                Some(Ok(b)) => Poll::Ready(Ok(Some(b))),
                Some(Err(e)) if is_close(&e) => Poll::Ready(Ok(None)),
                Some(Err(e)) => Poll::Ready(Err(to_io(e))),
            };
        }
    }

    /// Gives `n` consumed bytes of window back to the peer.
    pub fn release(&mut self, n: usize) {
        let _ = self.recv.flow_control().release_capacity(n);
    }
}

/// The sending side of an [`HboneStream`].
pub struct SendHalf<'a> {
    send: &'a mut SendStream<Bytes>,
    shut: &'a mut bool,
}

impl SendHalf<'_> {
    /// Sends `data` whole once the stream has window for at least some of it (h2 holds the
    /// rest and sends it as the window opens; the next send waits until it has gone), so
    /// what is buffered per stream stays bounded by h2's send buffer plus one chunk.
    pub fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Option<Bytes>) -> Poll<io::Result<()>> {
        let Some(len) = data.as_ref().map(Bytes::len) else { return Poll::Ready(Ok(())) };
        ready!(self.poll_room(cx, len))?;
        if let Some(chunk) = data.take() {
            self.send.send_data(chunk, false).map_err(to_io)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Waits until the stream can take more data, reserving room for `want` bytes.
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<()>> {
        while self.send.capacity() == 0 {
            self.send.reserve_capacity(want);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies all of `buf` into a frame once the stream has room for some of it. Sending it
    /// whole leaves no capacity requested once it has gone: a partial send would keep the
    /// rest requested, and h2 would go on assigning the connection's window to an idle stream.
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        ready!(self.poll_room(cx, buf.len()))?;
        self.send.send_data(Bytes::copy_from_slice(buf), false).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    /// Ready once the peer has reset the stream (or the connection is gone): `None` when it
    /// only asks us to stop sending (NO_ERROR or CANCEL, as a peer does that has finished and
    /// closed its end), an error otherwise.
    pub fn poll_reset(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Error>> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(Reason::NO_ERROR | Reason::CANCEL) => None,
            Ok(reason) => Some(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by the peer ({reason:?})"),
            )),
            Err(e) => Some(to_io(e)),
        })
    }

    /// Sends end of stream (once).
    pub fn finish(&mut self) -> io::Result<()> {
        if !*self.shut {
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
            *self.shut = true;
        }
        Ok(())
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let (mut recv, _) = self.split();
        if recv.pending.is_empty() {
            match ready!(recv.poll_chunk(cx))? {
                Some(chunk) => *recv.pending = chunk,
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = recv.pending.len().min(buf.remaining());
        buf.put_slice(&recv.pending[..n]);
        recv.pending.advance(n);
        recv.release(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.split().1.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes what was sent; there is nothing held here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.split().1.finish())
    }
}
