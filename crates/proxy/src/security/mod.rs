//! Request-level security on the server side (inbound sidecars and gateways): JWT
//! authentication (`RequestAuthentication`) and authorization (`AuthorizationPolicy`).
//! Transport security (mTLS) lives in the listeners and upstream pools, with certificates from
//! the `identity` crate.

pub mod authz;
pub mod jwt;
