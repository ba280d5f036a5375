//! Retries: whether a try's outcome asks for another (Envoy's `retryOn` conditions), whether
//! the request may be sent again (method, body), the cluster's retry budget, and the jittered
//! backoff between tries. The attempt loop itself is in `forward`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};
use trellis_config::snapshot::{RetryBudget, RetryOn, RetryPolicy};

use crate::http::{Flag, ProxyError};

/// What one try came to.
pub enum Outcome<'a> {
    Response {
        status: StatusCode,
        headers: &'a HeaderMap,
    },
    Error(&'a ProxyError),
    /// The try ran out of its `perTryTimeout`.
    PerTryTimeout,
}

/// What the request itself says about retries (Envoy's `x-envoy-retriable-status-codes` and
/// `x-envoy-retriable-header-names`), read only when the policy has the condition.
#[derive(Default)]
pub struct Hints {
    status_codes: Vec<u16>,
    header_names: Vec<http::HeaderName>,
    /// A gRPC request: its responses' `grpc-status` is read for the gRPC conditions.
    grpc: bool,
}

const RETRIABLE_STATUS_CODES: http::HeaderName = http::HeaderName::from_static("x-envoy-retriable-status-codes");
const RETRIABLE_HEADER_NAMES: http::HeaderName = http::HeaderName::from_static("x-envoy-retriable-header-names");

impl Hints {
    pub fn of(policy: &RetryPolicy, request: &HeaderMap, grpc: bool) -> Hints {
        let list = |name: &http::HeaderName| {
            request.get(name).and_then(|v| v.to_str().ok()).map(|v| v.split(',').map(str::trim).collect::<Vec<_>>())
        };
        let mut h = Hints { grpc, ..Hints::default() };
        if policy.retry_on.contains(&RetryOn::RetriableStatusCodes) {
            h.status_codes =
                list(&RETRIABLE_STATUS_CODES).unwrap_or_default().iter().filter_map(|c| c.parse().ok()).collect();
        }
        if policy.retry_on.contains(&RetryOn::RetriableHeaders) {
            h.header_names = list(&RETRIABLE_HEADER_NAMES)
                .unwrap_or_default()
                .iter()
                .filter_map(|n| http::HeaderName::from_bytes(n.as_bytes()).ok())
                .collect();
        }
        h
    }
}

/// The `retryOn` condition that asks for another try after `outcome`, if any.
pub fn reason(policy: &RetryPolicy, hints: &Hints, outcome: &Outcome<'_>) -> Option<&'static str> {
    let on = |c: RetryOn| policy.retry_on.contains(&c);
    let five_or_gateway = on(RetryOn::FiveXx) || on(RetryOn::GatewayError);
    match outcome {
        Outcome::PerTryTimeout => five_or_gateway.then_some("per-try-timeout"),
        Outcome::Error(e) => match e.flag {
            Flag::UpstreamConnectFailure if on(RetryOn::ConnectFailure) || five_or_gateway => Some("connect-failure"),
            Flag::UpstreamReset if e.refused && (on(RetryOn::RefusedStream) || five_or_gateway) => {
                Some("refused-stream")
            }
            Flag::UpstreamReset if on(RetryOn::Reset) || five_or_gateway => Some("reset"),
            _ => None,
        },
        Outcome::Response { status, headers } => {
            let code = status.as_u16();
            if on(RetryOn::FiveXx) && status.is_server_error() {
                return Some("5xx");
            }
            if on(RetryOn::GatewayError) && matches!(code, 502..=504) {
                return Some("gateway-error");
            }
            if on(RetryOn::Retriable4xx) && code == 409 {
                return Some("retriable-4xx");
            }
            if on(RetryOn::RetriableStatusCodes)
                && (policy.status_codes.contains(&code) || hints.status_codes.contains(&code))
            {
                return Some("retriable-status-codes");
            }
            if on(RetryOn::RetriableHeaders) && hints.header_names.iter().any(|n| headers.contains_key(n)) {
                return Some("retriable-headers");
            }
            if hints.grpc {
                grpc_reason(policy, headers)
            } else {
                None
            }
        }
    }
}

/// gRPC conditions: the status of a trailers-only response (in its headers).
fn grpc_reason(policy: &RetryPolicy, headers: &HeaderMap) -> Option<&'static str> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    let status = headers.get(GRPC_STATUS)?.to_str().ok()?.parse::<u32>().ok()?;
    let (cond, name) = match status {
        1 => (RetryOn::Cancelled, "cancelled"),
        4 => (RetryOn::DeadlineExceeded, "deadline-exceeded"),
        8 => (RetryOn::ResourceExhausted, "resource-exhausted"),
        13 => (RetryOn::Internal, "internal"),
        14 => (RetryOn::Unavailable, "unavailable"),
        _ => return None,
    };
    policy.retry_on.contains(&cond).then_some(name)
}

/// Methods RFC 9110 §9.2.2 calls idempotent: sending them twice means what sending once does.
pub fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// The full-jitter backoff before retry `n` (1-based): uniform in `[0, base·2^(n-1))`, the
/// ceiling capped at 10× base (Envoy's).
pub fn backoff(base: Duration, n: u32) -> Duration {
    let ceiling = base.saturating_mul(1 << (n.saturating_sub(1)).min(16)).min(base.saturating_mul(10));
    let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(fastrand::u64(0..nanos))
}

/// A cluster's retry budget in force: retries in flight may not exceed `percent` of the
/// requests in flight (first tries and retries), but may always reach `min_concurrency`.
pub struct Budget {
    config: RetryBudget,
    requests: AtomicUsize,
    retries: AtomicUsize,
}

/// Counts one request (or one retry) in flight until dropped.
pub struct InFlight {
    budget: Arc<Budget>,
    retry: bool,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.budget.requests.fetch_sub(1, Ordering::Relaxed);
        if self.retry {
            self.budget.retries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Budget {
    pub fn new(config: RetryBudget) -> Arc<Budget> {
        Arc::new(Budget { config, requests: AtomicUsize::new(0), retries: AtomicUsize::new(0) })
    }

    /// A first try starts.
    pub fn request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight { budget: self.clone(), retry: false }
    }

    /// Requests in flight (first tries and retries).
    pub fn in_flight(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    /// A retry may start if the budget has room, and fewer than `max` retries are in flight
    /// (then it counts until dropped).
    pub fn retry(self: &Arc<Self>, max: Option<u32>) -> Option<InFlight> {
        let requests = self.requests.load(Ordering::Relaxed) + 1;
        let allowed = ((requests as f64) * self.config.percent / 100.0) as usize;
        let allowed = allowed.max(self.config.min_concurrency as usize).min(max.map_or(usize::MAX, |m| m as usize));
        self.retries.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| (r < allowed).then_some(r + 1)).ok()?;
        self.requests.fetch_add(1, Ordering::Relaxed);
        Some(InFlight { budget: self.clone(), retry: true })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy(on: &str) -> RetryPolicy {
        let (retry_on, status_codes) = RetryOn::parse_list(on).expect("retryOn");
        RetryPolicy { retry_on, status_codes, ..RetryPolicy::istio_default() }
    }

    fn response(p: &RetryPolicy, code: u16, headers: &[(&'static str, &'static str)]) -> Option<&'static str> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        let status = StatusCode::from_u16(code).expect("status");
        let hints = Hints { grpc: h.contains_key("grpc-status"), ..Hints::default() };
        reason(p, &hints, &Outcome::Response { status, headers: &h })
    }

    #[test]
    fn status_conditions() {
        assert_eq!(response(&policy("5xx"), 500, &[]), Some("5xx"));
        assert_eq!(response(&policy("5xx"), 404, &[]), None);
        assert_eq!(response(&policy("gateway-error"), 500, &[]), None);
        assert_eq!(response(&policy("gateway-error"), 503, &[]), Some("gateway-error"));
        assert_eq!(response(&policy("retriable-4xx"), 409, &[]), Some("retriable-4xx"));
        assert_eq!(response(&policy("429,503"), 429, &[]), Some("retriable-status-codes"));
        assert_eq!(response(&policy("connect-failure"), 503, &[]), None);
        assert_eq!(response(&policy("unavailable"), 200, &[("grpc-status", "14")]), Some("unavailable"));
        assert_eq!(response(&policy("unavailable"), 200, &[("grpc-status", "13")]), None);
        assert_eq!(response(&policy("internal"), 200, &[("grpc-status", "13")]), Some("internal"));
        let mut req = HeaderMap::new();
        req.insert("x-envoy-retriable-header-names", HeaderValue::from_static("x-retry-me"));
        let mut resp = HeaderMap::new();
        resp.insert("x-retry-me", HeaderValue::from_static("1"));
        let p = policy("retriable-headers,retriable-status-codes");
        let hints = Hints::of(&p, &req, false);
        assert_eq!(
            reason(&p, &hints, &Outcome::Response { status: StatusCode::OK, headers: &resp }),
            Some("retriable-headers")
        );
        req.insert("x-envoy-retriable-status-codes", HeaderValue::from_static("418, 429"));
        let hints = Hints::of(&p, &req, false);
        let teapot = StatusCode::from_u16(418).expect("418");
        assert_eq!(
            reason(&p, &hints, &Outcome::Response { status: teapot, headers: &HeaderMap::new() }),
            Some("retriable-status-codes")
        );
    }

    #[test]
    fn error_conditions() {
        let refused = ProxyError { refused: true, ..ProxyError::reset("e", "refused") };
        let reset = ProxyError::reset("e", "closed");
        let connect = ProxyError::connect_failure("e", "refused");
        let p = policy("connect-failure,refused-stream");
        assert_eq!(reason(&p, &Hints::default(), &Outcome::Error(&connect)), Some("connect-failure"));
        assert_eq!(reason(&p, &Hints::default(), &Outcome::Error(&refused)), Some("refused-stream"));
        assert_eq!(reason(&p, &Hints::default(), &Outcome::Error(&reset)), None, "reset is not asked for");
        assert_eq!(reason(&p, &Hints::default(), &Outcome::PerTryTimeout), None);
        let p = policy("5xx");
        assert_eq!(reason(&p, &Hints::default(), &Outcome::Error(&reset)), Some("reset"));
        assert_eq!(reason(&p, &Hints::default(), &Outcome::PerTryTimeout), Some("per-try-timeout"));
        let uh = ProxyError::no_healthy_upstream("c");
        assert_eq!(reason(&p, &Hints::default(), &Outcome::Error(&uh)), None);
    }

    #[test]
    fn methods() {
        assert!(idempotent(&Method::GET) && idempotent(&Method::PUT) && idempotent(&Method::DELETE));
        assert!(!idempotent(&Method::POST) && !idempotent(&Method::PATCH));
    }

    #[test]
    fn backoff_is_jittered_under_a_growing_ceiling() {
        let base = Duration::from_millis(25);
        for n in 1..6 {
            let ceiling = base * (1 << (n - 1)).min(10);
            for _ in 0..100 {
                assert!(backoff(base, n) < ceiling.max(Duration::from_nanos(1)));
            }
        }
        assert!(backoff(base, 30) < base * 10, "capped at 10x base");
    }

    #[test]
    fn the_budget_allows_a_share_of_requests_in_flight_with_a_floor() {
        let b = Budget::new(RetryBudget { percent: 20.0, min_concurrency: 3 });
        let firsts: Vec<InFlight> = (0..50).map(|_| b.request()).collect();
        let retries: Vec<InFlight> = std::iter::from_fn(|| b.retry(None)).take(100).collect();
        // 20% of (50 + retries in flight): 12 at most.
        assert!((10..=13).contains(&retries.len()), "{}", retries.len());
        drop(retries);
        drop(firsts);
        let floor: Vec<InFlight> = std::iter::from_fn(|| b.retry(None)).take(100).collect();
        assert_eq!(floor.len(), 3, "min concurrency with nothing else in flight");
        drop(floor);
        assert_eq!((b.requests.load(Ordering::Relaxed), b.retries.load(Ordering::Relaxed)), (0, 0));
    }
}
