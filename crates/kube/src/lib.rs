//! Trellis on Kubernetes.
//!
//! The cluster is a config source like a folder of files: [`source`] lists and watches Services,
//! Pods and the Istio kinds (every kind the cluster serves, at its preferred version) through the
//! API server and hands them to the control plane's [`ConfigStore`](trellis_control::ConfigStore),
//! which runs the same rules and the same compiler as for files. A ready Pod is an endpoint of the
//! Services that select it; one that goes away stops being one at the next push.
//!
//! On a cluster, proxies prove who they are with their Pod's service-account token, checked with
//! a TokenReview ([`identity`]).
//!
//! The control plane also serves the API server's admission webhooks ([`webhook`]): validation
//! with the rules of `trellis analyze`, and sidecar injection ([`inject`]); the injected init
//! container programs transparent capture ([`capture`]).
//!
//! `trellis dashboard --kubernetes` serves the console of a control plane in the cluster on the
//! user's machine through the API server's Service proxy ([`dashboard`]).
//!
//! This crate talks to the API server only through kube-rs; it proxies no mesh traffic.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod capture;
pub mod convert;
pub mod dashboard;
pub mod identity;
pub mod inject;
pub mod source;
pub mod webhook;

pub use source::{run, Error};

/// Connects with the ambient configuration, as kubectl does: `KUBECONFIG` or `~/.kube/config`,
/// else the Pod's service account when running in a cluster.
pub async fn client() -> Result<kube::Client, Error> {
    let config = kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?;
    kube::Client::try_from(config).map_err(Error::Client)
}

/// A client for passing requests on ([`dashboard`]): the ambient configuration or a kubeconfig
/// context of its own (`--context`, as kubectl's), and no retries of the API server's 503s
/// (kube-rs retries them by default; the caller answering them at once is what a proxy does).
pub async fn proxy_client(context: Option<&str>) -> Result<kube::Client, Error> {
    let mut config = match context {
        None => kube::Config::infer().await.map_err(|e| Error::Config(e.to_string()))?,
        Some(c) => {
            let options = kube::config::KubeConfigOptions { context: Some(c.to_string()), ..Default::default() };
            kube::Config::from_kubeconfig(&options).await.map_err(|e| Error::Config(e.to_string()))?
        }
    };
    config.default_retry = false;
    kube::Client::try_from(config).map_err(Error::Client)
}
