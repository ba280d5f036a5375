//! Telemetry the proxy records for every request, with the names and labels Istio uses so
//! dashboards and alerts written for Istio work unchanged.
//!
//! - [`identity`]: who a proxy, a peer or an endpoint is, as metric labels see it;
//! - [`peer`]: the metadata a client proxy passes to the server proxy (Istio's peer-metadata
//!   exchange), so the server side knows who called;
//! - [`metrics`]: the `istio_*` families and the proxy's own health metrics;
//! - [`trace`]: trace context in every common format, sampling, span data;
//! - [`export`]: batched span export (OTLP/HTTP, Zipkin) through a bounded queue;
//! - [`access_log`]: JSON access log lines through a bounded queue.
//!
//! Nothing here runs on the request path but counting and queueing: the proxy decides when to
//! record, exporters and writers run on their own tasks.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod export;
pub mod grpc;
pub mod identity;
pub mod idle;
pub mod metrics;
pub mod peer;
pub mod trace;

/// OTLP trace and log messages (a wire-compatible subset), generated from `proto/otlp_trace.proto`
/// and `proto/otlp_logs.proto`.
pub mod otlp {
    #![allow(clippy::all, rust_2018_idioms, unreachable_pub)]
    include!(concat!(env!("OUT_DIR"), "/trellis.otlp.v1.rs"));

    /// The same requests as a receiver (the console) reads them, building only what it stores
    /// (`proto/otlp_receive.proto`): decode them from a `bytes::Bytes` body.
    pub mod receive {
        #![allow(clippy::all, rust_2018_idioms, unreachable_pub)]
        include!(concat!(env!("OUT_DIR"), "/trellis.otlp.receive.v1.rs"));
    }
}

pub use identity::Identity;
