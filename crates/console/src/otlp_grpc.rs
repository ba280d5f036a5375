//! OTLP/gRPC on the console's port: `TraceService/Export` and `LogsService/Export`, as the
//! OpenTelemetry SDKs' and Collector's default (`grpc`) exporters send them, plain or gzip.
//!
//! tonic does the gRPC (framing, compression, status trailers, message-size limit); the
//! message passes through as the bytes that arrived, and the stores decode what they keep from
//! them, as for OTLP/HTTP ([`crate::api`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use hyper::body::Incoming;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

use crate::api::{Encoding, Ingest, Signal};
use crate::Console;

const TRACES: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
const LOGS: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";

/// Serves one HTTP/2 connection of OTLP/gRPC exports.
pub(crate) async fn connection(console: Arc<Console>, stream: tokio::net::TcpStream, ingest: Ingest) {
    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
        let console = console.clone();
        async move { Ok::<_, Infallible>(export(console, req, ingest).await) }
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await;
}

async fn export(
    console: Arc<Console>,
    req: http::Request<Incoming>,
    ingest: Ingest,
) -> http::Response<tonic::body::Body> {
    let signal = match req.uri().path() {
        TRACES => Signal::Traces,
        LOGS => Signal::Logs,
        other => {
            return Status::unimplemented(format!("{other}: the console receives traces ({TRACES}) and logs ({LOGS})"))
                .into_http()
        }
    };
    let mut grpc = tonic::server::Grpc::new(Passthrough)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(crate::api::MAX_BODY);
    grpc.unary(Export { console, signal, ingest }, req).await
}

/// One export: stored before the answer, as OTLP asks. The answer is an empty
/// `Export*ServiceResponse`; a malformed message is `INVALID_ARGUMENT`, and a console behind on
/// its stores `UNAVAILABLE` (which OTLP exporters retry).
struct Export {
    console: Arc<Console>,
    signal: Signal,
    ingest: Ingest,
}

impl tonic::server::UnaryService<Bytes> for Export {
    type Response = ();
    type Future = futures_util::future::BoxFuture<'static, Result<tonic::Response<()>, Status>>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let (console, signal, ingest) = (self.console.clone(), self.signal, self.ingest);
        Box::pin(async move {
            let body = request.into_inner();
            match crate::api::store(&console, ingest, signal, body, Encoding::default()).await {
                Some(Ok(_)) => Ok(tonic::Response::new(())),
                Some(Err((_, e))) => Err(Status::invalid_argument(e)),
                None => Err(Status::unavailable("the console is behind; retry later")),
            }
        })
    }
}

/// The messages as bytes: requests are handed on as they arrived (tonic has already inflated
/// them), and the response, an empty message, is no bytes at all.
struct Passthrough;

impl Codec for Passthrough {
    type Encode = ();
    type Decode = Bytes;
    type Encoder = Passthrough;
    type Decoder = Passthrough;

    fn encoder(&mut self) -> Passthrough {
        Passthrough
    }

    fn decoder(&mut self) -> Passthrough {
        Passthrough
    }
}

impl Encoder for Passthrough {
    type Item = ();
    type Error = Status;

    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for Passthrough {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}
