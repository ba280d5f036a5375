//! Per-request telemetry on the proxy side: a record created when a request arrives and
//! finished exactly once, when the response body ends or is dropped (the client went away),
//! whatever path the request took (routed, rejected, failed). It feeds the `istio_*` metrics.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use trellis_telemetry::identity::ServiceLabels;
use trellis_telemetry::metrics::{ProxyMetrics, Reporter, RequestLabels};
use trellis_telemetry::Identity;

use crate::http::{Body, BoxError};

/// What one request will be recorded as.
pub struct RequestRecord {
    pub metrics: Arc<ProxyMetrics>,
    pub start: Instant,
    pub reporter: Reporter,
    pub source: Arc<Identity>,
    pub destination: Arc<Identity>,
    pub service: Arc<ServiceLabels>,
    pub protocol: &'static str,
    pub status: u16,
    pub grpc_status: Option<u32>,
    pub flags: &'static str,
    pub security: &'static str,
    pub request_bytes: Arc<AtomicU64>,
    pub response_bytes: u64,
    done: bool,
}

impl RequestRecord {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        metrics: Arc<ProxyMetrics>,
        start: Instant,
        reporter: Reporter,
        source: Arc<Identity>,
        destination: Arc<Identity>,
        service: Arc<ServiceLabels>,
        protocol: &'static str,
        request_bytes: Arc<AtomicU64>,
    ) -> Self {
        let security = if reporter == Reporter::Destination { "none" } else { "unknown" };
        RequestRecord {
            metrics,
            start,
            reporter,
            source,
            destination,
            service,
            protocol,
            status: 0,
            grpc_status: None,
            flags: "-",
            security,
            request_bytes,
            response_bytes: 0,
            done: false,
        }
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let labels = RequestLabels::new(
            self.reporter,
            &self.source,
            &self.destination,
            &self.service,
            self.protocol,
            self.status,
            self.grpc_status,
            self.flags,
            self.security,
        );
        let ms = self.start.elapsed().as_secs_f64() * 1000.0;
        self.metrics.record(&labels, ms, self.request_bytes.load(Ordering::Relaxed), self.response_bytes);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok())
}

pin_project_lite::pin_project! {
    /// A response body that finishes its request's record when it ends, or, if it is dropped
    /// before its end (the client went away), records the request with Envoy's `DC` flag.
    pub struct Recorded {
        #[pin]
        inner: Body,
        record: RequestRecord,
    }

    impl PinnedDrop for Recorded {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !this.record.done {
                if !this.inner.is_end_stream() && this.record.flags == "-" {
                    this.record.flags = "DC";
                }
                this.record.finish();
            }
        }
    }
}

impl Recorded {
    pub fn new(inner: Body, mut record: RequestRecord, headers: &http::HeaderMap) -> Self {
        // Trailers-only gRPC responses carry the status in the headers.
        record.grpc_status = grpc_status(headers);
        Recorded { inner, record }
    }
}

impl HttpBody for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.record.response_bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_ref() {
                    if let Some(s) = grpc_status(t) {
                        this.record.grpc_status = Some(s);
                    }
                }
                // Servers stop polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    this.record.finish();
                }
            }
            Poll::Ready(None) => this.record.finish(),
            Poll::Ready(Some(Err(_))) => {
                // The upstream reset the stream mid-response.
                this.record.flags = "UR";
                this.record.finish();
            }
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

pin_project_lite::pin_project! {
    /// A request body that counts the bytes it carries.
    pub struct Counted<B> {
        #[pin]
        inner: B,
        bytes: Arc<AtomicU64>,
    }
}

impl<B> Counted<B> {
    pub fn new(inner: B, bytes: Arc<AtomicU64>) -> Self {
        Counted { inner, bytes }
    }
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(d) = frame.data_ref() {
                this.bytes.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
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
