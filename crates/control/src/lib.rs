//! The Trellis control plane.
//!
//! It holds the config ([`store`]: files, watched, validated with the `analyze` rules; a bad
//! change is reported and the last good config stays), knows every connected proxy
//! ([`proxies`]), and for each one compiles its own snapshot and pushes it over the streaming
//! gRPC API ([`server`]) whenever it changes: debounced, only to proxies whose snapshot changed,
//! acknowledged (ACK) or rejected with a reason (NACK) by the proxy.
//!
//! It never proxies traffic and never blocks a proxy: proxies keep serving their last snapshot
//! when the control plane is gone.
#![forbid(unsafe_code)]

pub mod ca;
pub mod proxies;
pub mod server;
pub mod store;

use std::net::SocketAddr;

pub use server::ControlService;
pub use store::ConfigStore;

/// Serves the control-plane API (`ControlService::new(store, certificates)`) on `listener`
/// until `shutdown` resolves.
pub async fn serve(
    svc: ControlService,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(svc.into_server())
        // TCP_NODELAY, as tonic's own `serve` sets: a push is written when it is ready, not
        // held back by Nagle until the previous one is acknowledged.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// The address the control plane listens on unless told otherwise (Istio's plaintext xDS port).
pub const DEFAULT_ADDR: &str = "127.0.0.1:15010";

/// Parses `DEFAULT_ADDR`.
pub fn default_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15010))
}
