//! Load balancing over a cluster's endpoints, as DestinationRule `trafficPolicy.loadBalancer`
//! configures it: round robin, least request (power of two choices), random, and consistent
//! hashing on a header, a cookie, the source IP or a query parameter (a ring, like Envoy's
//! ring hash). Every policy is built once per snapshot; picking never locks or allocates
//! (except when a hash cookie must be minted). Endpoints outlier detection ejected
//! (`outlier`) are skipped by every policy.

pub mod outlier;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::HeaderMap;
use trellis_config::hash::fnv1a64;
use trellis_config::snapshot::{HashPolicy, LbPolicy};

use crate::upstream::Endpoint;

/// What a balancer may look at.
pub struct PickCtx<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    pub source_ip: IpAddr,
}

/// A cookie to set on the response, when consistent hashing minted one.
#[derive(Debug, Clone)]
pub struct NewCookie(pub String);

pub enum Balancer {
    RoundRobin { next: AtomicUsize, schedule: Option<Vec<u32>> },
    LeastRequest,
    PeakEwma,
    Random { cumulative: Option<Vec<u64>> },
    Ring { ring: Vec<(u64, u32)>, policy: HashPolicy },
}

impl Balancer {
    pub fn new(policy: &LbPolicy, endpoints: &[(Arc<Endpoint>, u32)]) -> Balancer {
        let weights: Vec<u32> = endpoints.iter().map(|(_, w)| (*w).max(1)).collect();
        let uneven = weights.windows(2).any(|w| w[0] != w[1]);
        match policy {
            LbPolicy::RoundRobin => Balancer::RoundRobin {
                next: AtomicUsize::new(fastrand::usize(..endpoints.len().max(1))),
                schedule: uneven.then(|| weighted_schedule(&weights)),
            },
            LbPolicy::LeastRequest => Balancer::LeastRequest,
            LbPolicy::PeakEwma => Balancer::PeakEwma,
            LbPolicy::Random => Balancer::Random {
                cumulative: uneven.then(|| {
                    weights
                        .iter()
                        .scan(0u64, |acc, w| {
                            *acc += u64::from(*w);
                            Some(*acc)
                        })
                        .collect()
                }),
            },
            LbPolicy::RingHash { hash, min_ring_size } => {
                Balancer::Ring { ring: build_ring(endpoints, &weights, *min_ring_size), policy: hash.clone() }
            }
        }
    }

    /// Picks an endpoint index among those `usable` says may serve (not ejected, not tried
    /// already); `None` when none may.
    pub fn pick(
        &self,
        endpoints: &[(Arc<Endpoint>, u32)],
        cx: &PickCtx<'_>,
        usable: &dyn Fn(usize) -> bool,
    ) -> Option<(usize, Option<NewCookie>)> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            // Still mint a hash cookie so the client sticks once more endpoints appear.
            let cookie = match self {
                Balancer::Ring { policy, .. } => hash_key(policy, cx).1,
                _ => None,
            };
            return usable(0).then_some((0, cookie));
        }
        let first_usable = |from: usize| (0..n).map(|k| (from + k) % n).find(|i| usable(*i));
        let idx = match self {
            Balancer::RoundRobin { next, schedule } => {
                let len = schedule.as_ref().map_or(n, Vec::len);
                (0..len).find_map(|_| {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let idx = match schedule {
                        Some(s) => s[i % s.len()] as usize,
                        None => i % n,
                    };
                    usable(idx).then_some(idx)
                })?
            }
            Balancer::PeakEwma => {
                two_choices(n, usable, |i| endpoints[i].0.ewma_cost() / f64::from(endpoints[i].1.max(1)))?
            }
            Balancer::LeastRequest => {
                two_choices(n, usable, |i| endpoints[i].0.in_flight() as f64 / f64::from(endpoints[i].1.max(1)))?
            }
            Balancer::Random { cumulative } => {
                let draw = || match cumulative {
                    None => fastrand::usize(..n),
                    Some(c) => {
                        let total = c.last().copied().unwrap_or(1);
                        let x = fastrand::u64(..total);
                        c.partition_point(|&acc| acc <= x)
                    }
                };
                match (0..4).map(|_| draw()).find(|i| usable(*i)) {
                    Some(i) => i,
                    None => first_usable(fastrand::usize(..n))?,
                }
            }
            Balancer::Ring { ring, policy } => {
                let (key, cookie) = hash_key(policy, cx);
                let idx = match key {
                    // The first usable endpoint at or after the key's place on the ring.
                    Some(h) if !ring.is_empty() => {
                        let pos = ring.partition_point(|(p, _)| *p < h);
                        (0..ring.len())
                            .map(|k| (ring[(pos + k) % ring.len()].1 as usize).min(n - 1))
                            .find(|i| usable(*i))?
                    }
                    // No key (header absent): Envoy picks at random.
                    _ => first_usable(fastrand::usize(..n))?,
                };
                return Some((idx, cookie));
            }
        };
        Some((idx, None))
    }
}

/// Power of two choices: of two distinct endpoints drawn at random (a few draws, until one may
/// serve), the one of lower `cost`; else the cheapest that may serve. `n` is at least 2.
fn two_choices(n: usize, usable: &dyn Fn(usize) -> bool, cost: impl Fn(usize) -> f64) -> Option<usize> {
    let drawn = (0..4).find_map(|_| {
        let a = fastrand::usize(..n);
        let mut b = fastrand::usize(..n - 1);
        if b >= a {
            b += 1;
        }
        match (usable(a), usable(b)) {
            (true, true) => Some(if cost(b) < cost(a) { b } else { a }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            (false, false) => None,
        }
    });
    drawn.or_else(|| (0..n).filter(|i| usable(*i)).min_by(|x, y| cost(*x).total_cmp(&cost(*y))))
}

/// The hash of the request's key, and a cookie to set when the key is a missing cookie that
/// has a TTL (Envoy's behaviour).
fn hash_key(policy: &HashPolicy, cx: &PickCtx<'_>) -> (Option<u64>, Option<NewCookie>) {
    match policy {
        HashPolicy::Header(name) => (cx.headers.get(name.as_str()).map(|v| fnv1a64(v.as_bytes())), None),
        HashPolicy::SourceIp => (Some(fnv1a64(cx.source_ip.to_string().as_bytes())), None),
        HashPolicy::QueryParam(name) => {
            let v = cx.query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })
            });
            (v.map(|v| fnv1a64(v.as_bytes())), None)
        }
        HashPolicy::Cookie { name, path, ttl } => {
            if let Some(v) = cookie_value(cx.headers, name) {
                return (Some(fnv1a64(v.as_bytes())), None);
            }
            match ttl {
                Some(ttl) => {
                    let value = format!("{:016x}", fastrand::u64(..));
                    let mut c = format!("{name}=\"{value}\"; Max-Age={}", ttl.0.as_secs());
                    if let Some(p) = path {
                        c.push_str(&format!("; Path={p}"));
                    }
                    c.push_str("; HttpOnly");
                    (Some(fnv1a64(format!("\"{value}\"").as_bytes())), Some(NewCookie(c)))
                }
                None => (None, None),
            }
        }
    }
}

fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get_all(http::header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then_some(v)
        })
    })
}

/// A smooth weighted round-robin sequence (nginx's algorithm), reduced by the weights' gcd.
fn weighted_schedule(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0u32, |a, &b| gcd(a, b)).max(1);
    let w: Vec<i64> = weights.iter().map(|x| i64::from(x / g)).collect();
    let total: i64 = w.iter().sum();
    let len = total.min(10_000) as usize;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        for (c, wi) in current.iter_mut().zip(&w) {
            *c += wi;
        }
        let (best, _) = current.iter().enumerate().max_by_key(|(i, c)| (**c, -(*i as i64))).unwrap_or((0, &0));
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn build_ring(endpoints: &[(Arc<Endpoint>, u32)], weights: &[u32], min_size: u64) -> Vec<(u64, u32)> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum::<u64>().max(1);
    let mut ring = Vec::new();
    for (i, ((ep, _), w)) in endpoints.iter().zip(weights).enumerate() {
        let points = (min_size * u64::from(*w)).div_ceil(total).max(1);
        for p in 0..points {
            ring.push((fnv1a64(format!("{}_{p}", ep.address).as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::Pools;

    fn eps(n: usize) -> Vec<(Arc<Endpoint>, u32)> {
        let pools = Pools::default();
        (0..n).map(|i| (pools.endpoint(&format!("127.0.0.1:{}", 1000 + i)), 1)).collect()
    }

    fn cx(h: &HeaderMap) -> PickCtx<'_> {
        PickCtx { headers: h, query: None, source_ip: IpAddr::from([127, 0, 0, 1]) }
    }

    #[test]
    fn round_robin_cycles() {
        let e = eps(3);
        let b = Balancer::new(&LbPolicy::RoundRobin, &e);
        let h = HeaderMap::new();
        let picks: Vec<usize> = (0..6).map(|_| b.pick(&e, &cx(&h), &|_| true).map(|p| p.0).unwrap_or(99)).collect();
        let mut counts = [0; 3];
        for p in picks {
            counts[p] += 1;
        }
        assert_eq!(counts, [2, 2, 2]);
    }

    #[test]
    fn weighted_schedule_is_smooth_and_exact() {
        let s = weighted_schedule(&[2, 1]);
        assert_eq!(s.len(), 3);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 2);
    }

    #[test]
    fn ring_hash_is_sticky_per_key_and_spreads_keys() {
        let e = eps(4);
        let b =
            Balancer::new(&LbPolicy::RingHash { hash: HashPolicy::Header("x-user".into()), min_ring_size: 1024 }, &e);
        let mut seen = std::collections::HashSet::new();
        for user in 0..200 {
            let mut h = HeaderMap::new();
            h.insert("x-user", format!("user-{user}").parse().expect("header"));
            let first = b.pick(&e, &cx(&h), &|_| true).map(|p| p.0);
            for _ in 0..3 {
                assert_eq!(b.pick(&e, &cx(&h), &|_| true).map(|p| p.0), first);
            }
            seen.insert(first);
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn hash_cookie_minted_when_missing() {
        let e = eps(2);
        let policy = HashPolicy::Cookie {
            name: "sticky".into(),
            path: Some("/".into()),
            ttl: Some(trellis_config::model::Duration(std::time::Duration::from_secs(60))),
        };
        let b = Balancer::new(&LbPolicy::RingHash { hash: policy, min_ring_size: 64 }, &e);
        let h = HeaderMap::new();
        let (_, cookie) = b.pick(&e, &cx(&h), &|_| true).expect("pick");
        let cookie = cookie.expect("cookie minted").0;
        assert!(cookie.starts_with("sticky=\""), "{cookie}");
        assert!(cookie.contains("Max-Age=60"));
    }

    #[test]
    fn least_request_prefers_idle() {
        let e = eps(2);
        let b = Balancer::new(&LbPolicy::LeastRequest, &e);
        let _busy: Vec<_> = (0..5).map(|_| e[0].0.start_request()).collect();
        let h = HeaderMap::new();
        for _ in 0..20 {
            assert_eq!(b.pick(&e, &cx(&h), &|_| true).map(|p| p.0), Some(1));
        }
    }

    #[test]
    fn every_policy_skips_endpoints_that_may_not_serve() {
        let e = eps(3);
        let mut h = HeaderMap::new();
        h.insert("x-user", http::HeaderValue::from_static("alice"));
        let hash = HashPolicy::Header("x-user".into());
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::LeastRequest,
            LbPolicy::PeakEwma,
            LbPolicy::Random,
            LbPolicy::RingHash { hash, min_ring_size: 64 },
        ] {
            let b = Balancer::new(&policy, &e);
            for _ in 0..50 {
                assert_eq!(b.pick(&e, &cx(&h), &|i| i == 1).map(|p| p.0), Some(1), "{policy:?}");
            }
            assert!(b.pick(&e, &cx(&h), &|_| false).is_none(), "{policy:?}: none may serve");
        }
    }

    #[test]
    fn peak_ewma_prefers_the_faster_endpoint() {
        let e = eps(2);
        e[0].0.observe_latency(std::time::Duration::from_millis(50));
        e[1].0.observe_latency(std::time::Duration::from_millis(2));
        let b = Balancer::new(&LbPolicy::PeakEwma, &e);
        let h = HeaderMap::new();
        let fast = (0..200).filter(|_| b.pick(&e, &cx(&h), &|_| true).map(|p| p.0) == Some(1)).count();
        assert_eq!(fast, 200, "two choices of two: the cheaper always wins");
        // A peak is taken at once; a lower sample only pulls the average down with time.
        e[1].0.observe_latency(std::time::Duration::from_millis(500));
        assert!(e[1].0.ewma_cost() > e[0].0.ewma_cost());
    }
}
