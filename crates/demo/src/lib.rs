//! Demo workloads. Today: `echo`, a gRPC service with every call shape.
#![forbid(unsafe_code)]

pub mod echo;
