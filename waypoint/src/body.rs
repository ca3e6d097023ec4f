//! Bodies the proxy passes on: counted as they flow, and a response body that reports when it
//! ends (bytes and gRPC status from its trailers) so metrics and the access log cover the whole
//! exchange, streaming included.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// The body type on both sides of the proxy.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

pub fn empty() -> ProxyBody {
    http_body_util::Empty::new().map_err(|never| match never {}).boxed()
}

pub fn text(s: impl Into<String>) -> ProxyBody {
    http_body_util::Full::new(Bytes::from(s.into())).map_err(|never| match never {}).boxed()
}

/// Counts the data bytes of the body it wraps into a shared counter.
pub struct Counted<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Counted<B> {
    pub fn new(inner: B, count: Arc<AtomicU64>) -> Self {
        Self { inner, count }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What a finished response body reports.
#[derive(Clone, Debug, Default)]
pub struct Finished {
    pub bytes: u64,
    /// `grpc-status` from the trailers, if any.
    pub grpc_status: Option<String>,
    /// The body ended early (error, or the client went away).
    pub aborted: bool,
}

type OnDone = Box<dyn FnOnce(Finished) + Send + Sync>;

/// A response body that calls `on_done` once, when it ends or is dropped.
pub struct Observed<B: Body> {
    inner: B,
    state: Finished,
    on_done: Option<OnDone>,
}

impl<B: Body> Observed<B> {
    pub fn new(inner: B, on_done: impl FnOnce(Finished) + Send + Sync + 'static) -> Self {
        Self { inner, state: Finished::default(), on_done: Some(Box::new(on_done)) }
    }

    fn finish(&mut self, aborted: bool) {
        if let Some(done) = self.on_done.take() {
            self.state.aborted = aborted;
            done(std::mem::take(&mut self.state));
        }
    }
}

impl<B: Body> Drop for Observed<B> {
    fn drop(&mut self) {
        // Dropped before its end was read: the client went away (or hyper saw the end flag).
        let aborted = !self.inner.is_end_stream();
        self.finish(aborted);
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.state.bytes += data.len() as u64;
                }
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(s) = trailers.get("grpc-status").and_then(|v| v.to_str().ok())
                {
                    self.state.grpc_status = Some(s.to_string());
                }
            }
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
