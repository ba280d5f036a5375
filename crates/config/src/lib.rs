//! Trellis' config model.
//!
//! Reads Istio resources (and the Kubernetes `Service` kind) from multi-document YAML, keeping
//! the position of every node ([`yaml`], [`load`]); validates them with stable finding codes
//! ([`analyze`], [`finding`]); and compiles them, for one proxy, into the plain-data routing
//! [`snapshot`] the data plane serves ([`compile`]).
//!
//! This crate does no I/O beyond reading config files and knows nothing of sockets.
#![forbid(unsafe_code)]

pub mod analyze;
mod annotations;
pub mod authz_keys;
pub mod cidr;
pub mod compile;
mod conditions;
mod crosscheck;
pub mod encode;
pub mod envoy_filter;
pub mod filter;
pub mod finding;
pub mod gateway_api;
pub mod hash;
pub mod istio_annotations;
pub mod jwks;
pub mod load;
pub mod model;
pub mod registry;
mod schema_warnings;
pub mod snapshot;
pub mod watch;
pub mod yaml;

pub use finding::{Code, Finding, Severity};
pub use load::{load_paths, load_str, Loaded};
pub use model::{Kind, Resource, Spec};

/// Loads `paths` and runs every rule: load findings first, then analysis findings, sorted.
pub fn check(paths: &[std::path::PathBuf], recursive: bool) -> Loaded {
    let mut loaded = load_paths(paths, recursive);
    let more = analyze::analyze(&loaded.resources, &[]);
    loaded.findings.extend(more);
    finding::sort(&mut loaded.findings);
    loaded
}
