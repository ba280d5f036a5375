//! The demo workloads Trellis ships (the `trellis-demo` binary): the reference platform
//! (Services A–H), the color app, the DJ app, the slow/fast tracing demo and a gRPC echo service. They know nothing of the
//! mesh beyond forwarding trace headers; tests and benchmarks use them as real workloads.
#![forbid(unsafe_code)]

pub mod color;
pub mod dj;
pub mod echo;
pub mod redis;
pub mod reference;
pub mod slowfast;
pub mod web;
