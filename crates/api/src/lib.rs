//! The control-plane API (`trellis.control.v1`), generated from `proto/` at build time.
#![forbid(unsafe_code)]

pub mod control {
    #![allow(clippy::all, rust_2018_idioms, unreachable_pub)]
    tonic::include_proto!("trellis.control.v1");
}
