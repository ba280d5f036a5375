//! Telemetry the proxy records for every request, with the names and labels Istio uses so
//! dashboards and alerts written for Istio work unchanged.
//!
//! - [`identity`]: who a proxy, a peer or an endpoint is, as metric labels see it;
//! - [`peer`]: the metadata a client proxy passes to the server proxy (Istio's peer-metadata
//!   exchange), so the server side knows who called;
//! - [`metrics`]: the `istio_*` families and the proxy's own health metrics.
//!
//! Nothing here does I/O; the proxy decides when to record and where to expose.
#![forbid(unsafe_code)]

pub mod identity;
pub mod metrics;
pub mod peer;

pub use identity::Identity;
