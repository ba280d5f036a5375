//! The response body as it streams back: keeps the endpoint's in-flight count until the last
//! byte (or the client going away) and never buffers.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use super::InFlight;
use crate::http::BoxError;

pin_project_lite::pin_project! {
    /// An upstream response body that holds its endpoint's in-flight guard.
    pub struct Tracked {
        #[pin]
        inner: Incoming,
        guard: Option<InFlight>,
    }
}

impl Tracked {
    pub fn new(inner: Incoming, guard: InFlight) -> Self {
        Tracked { inner, guard: Some(guard) }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(None) => {
                if let Some(g) = this.guard.take() {
                    g.complete();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.take();
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                // Servers stop polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    if let Some(g) = this.guard.take() {
                        g.complete();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
