//! Outlier detection (DestinationRule `outlierDetection`), as Envoy does it: each endpoint's
//! consecutive 5xx, gateway errors (502, 503, 504) and locally originated failures (connection
//! failures, resets, timeouts) are counted from the outcomes of requests; an endpoint that
//! reaches a threshold is ejected for `baseEjectionTime` × the number of times it was ejected
//! (at most 300 s, or the base if longer), unless `maxEjectionPercent` of the cluster (but at
//! least one endpoint) is out already. Balancers skip ejected endpoints; an endpoint comes back
//! when its time is up. Below `minHealthPercent` healthy endpoints, ejections are ignored
//! (Envoy's panic mode). State lives with the cluster of one snapshot; nothing locks.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use trellis_config::snapshot::OutlierPolicy;

/// An outcome as outlier detection counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Result {
    /// A response with this status came from the endpoint.
    Status(u16),
    /// No response: connection failure, reset, timeout.
    LocalFailure,
}

/// Why an endpoint was ejected (metric label).
pub type Reason = &'static str;

#[derive(Default)]
struct Host {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Milliseconds since `epoch` until which the host is out; 0 when it is in.
    ejected_until: AtomicU64,
    times_ejected: AtomicU32,
}

pub struct Outlier {
    policy: OutlierPolicy,
    hosts: Vec<Host>,
    ejected: AtomicUsize,
    epoch: Instant,
}

const MAX_EJECTION: Duration = Duration::from_secs(300);

impl Outlier {
    pub fn new(policy: OutlierPolicy, endpoints: usize) -> Outlier {
        Outlier {
            policy,
            hosts: (0..endpoints).map(|_| Host::default()).collect(),
            ejected: AtomicUsize::new(0),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether endpoint `i` may be picked now (an ejection whose time is up ends here).
    pub fn usable(&self, i: usize) -> bool {
        let Some(h) = self.hosts.get(i) else { return true };
        let until = h.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.now_ms() >= until {
            if h.ejected_until.compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                tracing::debug!(endpoint = i, "endpoint returns from ejection");
                self.ejected.fetch_sub(1, Ordering::Relaxed);
                h.consecutive_5xx.store(0, Ordering::Relaxed);
                h.consecutive_gateway.store(0, Ordering::Relaxed);
                h.consecutive_local.store(0, Ordering::Relaxed);
            }
            return true;
        }
        // Panic mode: too few healthy endpoints left to honour ejections.
        let n = self.hosts.len();
        let healthy = n.saturating_sub(self.ejected.load(Ordering::Relaxed));
        healthy * 100 < n * self.policy.min_health_percent as usize
    }

    /// Endpoints out now.
    pub fn ejected(&self) -> usize {
        self.ejected.load(Ordering::Relaxed)
    }

    /// Counts an outcome of endpoint `i`; `Some(reason)` when it ejected the endpoint.
    pub fn record(&self, i: usize, result: Result) -> Option<Reason> {
        let h = self.hosts.get(i)?;
        let p = &self.policy;
        let bump = |c: &AtomicU32| c.fetch_add(1, Ordering::Relaxed) + 1;
        let reset = |c: &AtomicU32| c.store(0, Ordering::Relaxed);
        let (five, gateway, local) = match result {
            Result::Status(s) if s >= 500 => (true, matches!(s, 502..=504), false),
            Result::Status(_) => (false, false, false),
            // Not split: a local failure is a 503 to the counters.
            Result::LocalFailure if !p.split_local_origin => (true, true, false),
            Result::LocalFailure => (false, false, true),
        };
        let mut reason = None;
        if five {
            if p.consecutive_5xx > 0 && bump(&h.consecutive_5xx) >= p.consecutive_5xx {
                reason = Some("consecutive_5xx");
            }
        } else if !local {
            reset(&h.consecutive_5xx);
        }
        if gateway {
            if p.consecutive_gateway > 0 && bump(&h.consecutive_gateway) >= p.consecutive_gateway {
                reason = reason.or(Some("consecutive_gateway_errors"));
            }
        } else if !local {
            reset(&h.consecutive_gateway);
        }
        if local {
            if p.consecutive_local_origin > 0 && bump(&h.consecutive_local) >= p.consecutive_local_origin {
                reason = reason.or(Some("consecutive_local_origin_failures"));
            }
        } else if p.split_local_origin && !five {
            reset(&h.consecutive_local);
        }
        let reason = reason?;
        self.eject(h).then_some(reason)
    }

    fn eject(&self, h: &Host) -> bool {
        if h.ejected_until.load(Ordering::Relaxed) != 0 {
            return false;
        }
        let n = self.hosts.len();
        let max = (n * self.policy.max_ejection_percent as usize / 100).max(1);
        if self.ejected.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| (e < max).then_some(e + 1)).is_err() {
            return false;
        }
        let times = h.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let base = self.policy.base_ejection.0;
        let time = base.saturating_mul(times).min(MAX_EJECTION.max(base));
        h.ejected_until.store(self.now_ms() + time.as_millis() as u64, Ordering::Relaxed);
        h.consecutive_5xx.store(0, Ordering::Relaxed);
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        h.consecutive_local.store(0, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_config::model::Duration as D;

    fn policy(f: impl FnOnce(&mut OutlierPolicy)) -> OutlierPolicy {
        let mut p = OutlierPolicy {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            consecutive_local_origin: 5,
            split_local_origin: false,
            interval: D(Duration::from_secs(10)),
            base_ejection: D(Duration::from_secs(30)),
            max_ejection_percent: 100,
            min_health_percent: 0,
        };
        f(&mut p);
        p
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_resets_the_count() {
        let o = Outlier::new(policy(|_| {}), 3);
        assert_eq!(o.record(0, Result::Status(500)), None);
        assert_eq!(o.record(0, Result::Status(500)), None);
        assert_eq!(o.record(0, Result::Status(200)), None, "a success resets");
        assert_eq!(o.record(0, Result::Status(503)), None);
        assert_eq!(o.record(0, Result::LocalFailure), None, "a local failure counts as 5xx");
        assert_eq!(o.record(0, Result::Status(500)), Some("consecutive_5xx"));
        assert!(!o.usable(0) && o.usable(1));
        assert_eq!(o.ejected(), 1);
    }

    #[test]
    fn gateway_errors_and_split_local_failures_count_apart() {
        let o = Outlier::new(policy(|p| (p.consecutive_5xx, p.consecutive_gateway) = (0, 2)), 2);
        assert_eq!(o.record(0, Result::Status(500)), None, "500 is not a gateway error");
        assert_eq!(o.record(0, Result::Status(502)), None);
        assert_eq!(o.record(0, Result::Status(504)), Some("consecutive_gateway_errors"));
        let o = Outlier::new(policy(|p| (p.split_local_origin, p.consecutive_local_origin) = (true, 2)), 2);
        assert_eq!(o.record(1, Result::LocalFailure), None);
        assert_eq!(o.record(1, Result::Status(500)), None);
        assert_eq!(o.record(1, Result::LocalFailure), Some("consecutive_local_origin_failures"));
    }

    #[test]
    fn max_ejection_percent_keeps_endpoints_in_but_at_least_one_may_go() {
        let o = Outlier::new(policy(|p| p.max_ejection_percent = 34), 3);
        for i in 0..3 {
            for _ in 0..3 {
                o.record(i, Result::Status(500));
            }
        }
        assert_eq!(o.ejected(), 1, "34% of 3 is one endpoint");
        let o = Outlier::new(policy(|p| p.max_ejection_percent = 10), 3);
        for _ in 0..3 {
            o.record(2, Result::Status(500));
        }
        assert_eq!(o.ejected(), 1, "10% of 3 rounds down, but one endpoint may always go");
    }

    #[test]
    fn ejected_endpoints_return_when_their_time_is_up_and_stay_out_longer_next_time() {
        let o = Outlier::new(policy(|p| p.base_ejection = D(Duration::from_millis(1))), 2);
        for _ in 0..3 {
            o.record(0, Result::Status(500));
        }
        let h = &o.hosts[0];
        let first = h.ejected_until.load(Ordering::Relaxed) - o.now_ms();
        std::thread::sleep(Duration::from_millis(5)); // past the 1 ms ejection (a unit test of the clock)
        assert!(o.usable(0) && o.ejected() == 0, "back after baseEjectionTime");
        for _ in 0..3 {
            o.record(0, Result::Status(500));
        }
        let second = h.ejected_until.load(Ordering::Relaxed) - o.now_ms();
        assert!(first <= 1 && second <= 2 && h.times_ejected.load(Ordering::Relaxed) == 2, "{first} {second}");
    }

    #[test]
    fn below_min_health_ejections_are_ignored() {
        let o = Outlier::new(policy(|p| p.min_health_percent = 60), 2);
        for _ in 0..3 {
            o.record(0, Result::Status(500));
        }
        assert_eq!(o.ejected(), 1);
        assert!(o.usable(0), "one of two healthy (50%) is under 60%: panic mode uses every endpoint");
    }
}
