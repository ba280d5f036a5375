//! The admission webhooks the API server calls, served by the control plane over HTTPS.
//!
//! - `POST /validate`: a resource of an Istio kind is checked with the rules of `trellis
//!   analyze`, against the rest of the config in force: a finding about the resource itself that
//!   is an error denies it, with the field named; findings about how it relates to others (a host
//!   or subset not applied yet) and warnings admit it, with `warnings` that kubectl prints, as
//!   Istio's webhook does.
//! - `POST /inject`: see [`crate::inject`].
//!
//! Both answer an `admission.k8s.io/v1` AdmissionReview. The server's certificate is signed by
//! the mesh CA, whose root is the webhook configuration's `caBundle`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use trellis_config::{Finding, Severity};
use trellis_control::ConfigStore;

use crate::convert;
use crate::inject::Injector;

/// AdmissionReview bodies larger than this are refused (the API server sends at most ~3 MiB).
const MAX_BODY: usize = 8 * 1024 * 1024;

/// What the webhooks need.
pub struct Webhooks {
    pub store: Arc<ConfigStore>,
    pub injector: Option<Injector>,
}

/// Serves the webhooks on `listener` with `tls` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, hooks: Arc<Webhooks>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("webhook accept failed: {e}");
                continue;
            }
        };
        let (acceptor, hooks) = (acceptor.clone(), hooks.clone());
        tokio::spawn(async move {
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%peer, "webhook TLS handshake failed: {e}");
                    return;
                }
            };
            let svc = hyper::service::service_fn(move |req| {
                let hooks = hooks.clone();
                async move { Ok::<_, Infallible>(handle(&hooks, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(hooks: &Webhooks, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if req.method() != Method::POST || !matches!(path.as_str(), "/validate" | "/inject") {
        return reply(StatusCode::NOT_FOUND, json!({"error": "POST /validate or /inject"}));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": format!("cannot read the body: {e}")})),
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": format!("not an AdmissionReview: {e}")})),
    };
    let Some(request) = review.get("request") else {
        return reply(StatusCode::BAD_REQUEST, json!({"error": "AdmissionReview without a request"}));
    };
    let uid = request.get("uid").cloned().unwrap_or(Value::Null);
    let mut response = match path.as_str() {
        "/validate" => validate(&hooks.store, request),
        _ => match &hooks.injector {
            Some(injector) => injector.admit(request),
            None => json!({"allowed": true}),
        },
    };
    response["uid"] = uid;
    reply(StatusCode::OK, json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}))
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

/// Checks one object against the config in force: an AdmissionResponse (without its uid).
pub fn validate(store: &ConfigStore, request: &Value) -> Value {
    if request.get("operation").and_then(Value::as_str) == Some("DELETE") {
        return json!({"allowed": true});
    }
    let Some(object) = request.get("object") else { return json!({"allowed": true}) };
    let (errors, warnings) = check(store, object);
    let mut response = json!({"allowed": errors.is_empty()});
    if !errors.is_empty() {
        let message = format!(
            "admission webhook \"validation.trellis.dev\" denied the request: {}",
            errors.iter().map(describe).collect::<Vec<_>>().join("; ")
        );
        response["status"] = json!({"code": 400, "reason": "Invalid", "message": message});
    }
    if !warnings.is_empty() {
        response["warnings"] = Value::Array(warnings.iter().map(|f| Value::String(describe(f))).collect());
    }
    response
}

/// The errors that deny `object`, and the findings to warn about.
pub fn check(store: &ConfigStore, object: &Value) -> (Vec<Finding>, Vec<Finding>) {
    let converted = convert::object(object);
    let mut findings = converted.findings;
    if let Some(resource) = converted.resource {
        let id = resource.id();
        let current = store.current();
        let mut resources: Vec<_> = current.resources.iter().filter(|r| r.id() != id).cloned().collect();
        resources.push(resource);
        findings.extend(
            trellis_config::analyze::analyze(&resources, &[])
                .into_iter()
                .filter(|f| f.resource.as_deref() == Some(id.as_str())),
        );
    }
    let (errors, rest): (Vec<Finding>, Vec<Finding>) =
        findings.into_iter().partition(|f| f.is_error() && !f.code.refers_to_others());
    let warnings = rest.into_iter().filter(|f| f.severity != Severity::Info).collect();
    (errors, warnings)
}

/// A finding as kubectl shows it: the field first, then what is wrong, then the code.
fn describe(f: &Finding) -> String {
    match &f.path {
        Some(path) => format!("{path}: {} ({})", f.message, f.code),
        None => format!("{} ({})", f.message, f.code),
    }
}
