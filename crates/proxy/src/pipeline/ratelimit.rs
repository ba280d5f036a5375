//! Local rate limiting (EnvoyFilter `envoy.filters.http.local_ratelimit`, or a RateLimit): a
//! token bucket per policy in front of one side of the proxy. A request takes a token; with none
//! left it is answered 429 (flag `RL`) with `x-ratelimit-limit`, `-remaining` and `-reset`, and
//! the policy's extra headers, before anything else of the request path runs. Tokens come back
//! `tokens_per_fill` at a time every `fill_interval`, up to `max_tokens`, as in Envoy.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{HeaderName, Response, StatusCode};

use trellis_config::snapshot::{Direction, RateLimitPolicy};

use crate::http::{full, Body};
use crate::runtime::error::Problem;

/// One policy's bucket (per snapshot).
pub struct Limiter {
    pub policy: RateLimitPolicy,
    bucket: Mutex<Bucket>,
    extra: Vec<(HeaderName, HeaderValue)>,
}

struct Bucket {
    tokens: u32,
    /// When the next fill is due.
    next_fill: Instant,
}

/// What the limiter says of one request.
pub enum Verdict {
    Allow,
    /// Over the limit: the 429 to answer (unless the policy only counts, `filter_enforced`).
    Limited(Response<Body>),
    /// Over the limit, not enforced: counted only.
    Counted,
}

impl Limiter {
    pub fn new(policy: RateLimitPolicy) -> Result<Limiter, Problem> {
        let extra = policy
            .response_headers
            .iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::from_bytes(k.as_bytes()).map_err(|_| Problem::HeaderName(k.clone()))?,
                    HeaderValue::from_str(v).map_err(|_| Problem::HeaderValue(k.clone()))?,
                ))
            })
            .collect::<Result<_, Problem>>()?;
        let bucket = Bucket { tokens: policy.max_tokens, next_fill: Instant::now() + policy.fill_interval.0 };
        Ok(Limiter { policy, bucket: Mutex::new(bucket), extra })
    }

    /// Whether the policy is in front of this side of the proxy.
    pub fn applies(&self, direction: Direction) -> bool {
        self.policy.direction.is_none_or(|d| d == direction)
    }

    pub fn check(&self) -> Verdict {
        let p = &self.policy;
        if p.enabled_percent < 100.0 && fastrand::f64() * 100.0 >= p.enabled_percent {
            return Verdict::Allow;
        }
        let now = Instant::now();
        let (allowed, remaining, reset) = {
            let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            if now >= b.next_fill {
                let interval = p.fill_interval.0.max(Duration::from_millis(1));
                let fills = ((now - b.next_fill).as_nanos() / interval.as_nanos()) as u32 + 1;
                b.tokens = b.tokens.saturating_add(fills.saturating_mul(p.tokens_per_fill)).min(p.max_tokens);
                b.next_fill += interval * fills;
            }
            let allowed = b.tokens > 0;
            if allowed {
                b.tokens -= 1;
            }
            (allowed, b.tokens, b.next_fill.saturating_duration_since(now))
        };
        if allowed {
            return Verdict::Allow;
        }
        if p.enforced_percent < 100.0 && fastrand::f64() * 100.0 >= p.enforced_percent {
            return Verdict::Counted;
        }
        let mut r = Response::new(full("local_rate_limited"));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        let h = r.headers_mut();
        h.insert("x-ratelimit-limit", HeaderValue::from(p.max_tokens));
        h.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
        h.insert("x-ratelimit-reset", HeaderValue::from(reset.as_secs_f64().ceil() as u64));
        h.insert(crate::http::error::FLAGS_HEADER, HeaderValue::from_static("RL"));
        for (k, v) in &self.extra {
            h.insert(k.clone(), v.clone());
        }
        Verdict::Limited(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::model::Duration as D;

    fn limiter(max: u32, per_fill: u32, interval_ms: u64) -> Limiter {
        Limiter::new(RateLimitPolicy {
            name: "t".into(),
            direction: None,
            routes: None,
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: D(Duration::from_millis(interval_ms)),
            enabled_percent: 100.0,
            enforced_percent: 100.0,
            response_headers: vec![("x-local-rate-limit".into(), "true".into())],
        })
        .expect("limiter")
    }

    #[test]
    fn a_full_bucket_serves_max_tokens_then_refuses_with_headers() {
        let l = limiter(3, 3, 60_000);
        for _ in 0..3 {
            assert!(matches!(l.check(), Verdict::Allow));
        }
        let Verdict::Limited(r) = l.check() else { panic!("not limited") };
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-ratelimit-limit"], "3");
        assert_eq!(r.headers()["x-ratelimit-remaining"], "0");
        assert_eq!(r.headers()["x-local-rate-limit"], "true");
        assert!(r.headers()["x-ratelimit-reset"].to_str().expect("reset").parse::<u64>().expect("secs") <= 60);
    }

    #[test]
    fn tokens_come_back_each_fill_interval() {
        let l = limiter(2, 1, 50);
        assert!(matches!(l.check(), Verdict::Allow));
        assert!(matches!(l.check(), Verdict::Allow));
        assert!(matches!(l.check(), Verdict::Limited(_)));
        std::thread::sleep(Duration::from_millis(60)); // one fill interval (a unit test of the bucket's clock)
        assert!(matches!(l.check(), Verdict::Allow), "one token back");
        assert!(matches!(l.check(), Verdict::Limited(_)));
    }
}
