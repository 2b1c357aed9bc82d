//! Outlier detection: an endpoint that fails `consecutiveFailures` times in
//! a row (a 5xx, a refused connection, a reset) is ejected from the load
//! balancer for a while, so requests stop going to it.
//!
//! - The ejection lasts `baseEjectionTime` × the number of times the
//!   endpoint has been ejected, up to `maxEjectionTime`. An endpoint that
//!   stays in rotation for `maxEjectionTime` starts again from one.
//! - At most `maxEjectionPercent` of a service's endpoints are ejected at
//!   once, except when every endpoint is failing: then all of them are,
//!   and requests fail fast without touching them.
//! - When its time is up the endpoint is a candidate again, on probation:
//!   the next real request it gets decides. A failure ejects it again at
//!   once (for longer); a success clears it.
//!
//! State lives in atomics on each endpoint, so the hot path takes no lock:
//! a request reads one atomic to skip ejected endpoints, and writes one or
//! two when its outcome is known.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use outrigger_config::OutlierDetection;
use tokio::time::Instant;

/// One endpoint's failure record. Kept across configuration changes for as
/// long as the endpoint stays.
#[derive(Debug)]
pub struct Health {
    /// Times are kept as nanoseconds since this instant, in atomics.
    epoch: Instant,
    consecutive_failures: AtomicU32,
    /// 0: in rotation. Else: ejected until this time.
    ejected_until: AtomicU64,
    /// Ejections so far (drives the ejection time).
    times_ejected: AtomicU32,
    /// When the endpoint last came back from an ejection.
    returned_at: AtomicU64,
    /// Back from an ejection, and not yet proven healthy.
    probation: AtomicBool,
}

/// What recording an outcome did.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    None,
    /// The endpoint was ejected for this long.
    Ejected(Duration),
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Health {
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            times_ejected: AtomicU32::new(0),
            returned_at: AtomicU64::new(0),
            probation: AtomicBool::new(false),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        // 0 means "not ejected", so the clock starts at 1.
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Whether the endpoint is out of rotation at `now`, and whether this
    /// call saw its ejection end (true exactly once per ejection, so that
    /// caller can update the ejected-endpoints gauge).
    pub fn is_ejected(&self, now: Instant) -> (bool, bool) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return (false, false);
        }
        let now_ns = self.nanos(now);
        if now_ns < until {
            return (true, false);
        }
        // Its time is up: back in rotation, on probation.
        let returned = self
            .ejected_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if returned {
            self.probation.store(true, Ordering::Relaxed);
            self.returned_at.store(now_ns, Ordering::Relaxed);
        }
        (false, returned)
    }

    /// Counts a failure at `now`; `may_eject` says whether the service can
    /// spare this endpoint (the max-percent rule, decided by the caller,
    /// who sees all endpoints). Only called with outlier detection on.
    pub fn failed(
        &self,
        now: Instant,
        settings: &OutlierDetection,
        may_eject: impl FnOnce() -> bool,
    ) -> Change {
        let failures = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let on_probation = self.probation.load(Ordering::Relaxed);
        if failures < settings.consecutive_failures && !on_probation {
            return Change::None;
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 || !may_eject() {
            return Change::None;
        }
        let now_ns = self.nanos(now);
        // A long stretch in rotation forgives earlier ejections.
        let returned = self.returned_at.load(Ordering::Relaxed);
        let forgiven = u64::try_from(settings.max_ejection_time.as_nanos()).unwrap_or(u64::MAX);
        if returned != 0 && now_ns.saturating_sub(returned) >= forgiven {
            self.times_ejected.store(0, Ordering::Relaxed);
        }
        let times = self
            .times_ejected
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let duration = settings
            .base_ejection_time
            .saturating_mul(times)
            .min(settings.max_ejection_time);
        let until = now_ns.saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
        if self
            .ejected_until
            .compare_exchange(0, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // Another request ejected it first.
            return Change::None;
        }
        self.probation.store(false, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        Change::Ejected(duration)
    }

    pub fn succeeded(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.probation.load(Ordering::Relaxed) {
            self.probation.store(false, Ordering::Relaxed);
        }
    }

    /// Failures in a row so far.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// How long it stays ejected from `now` (`None`: in rotation).
    pub fn ejected_for(&self, now: Instant) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = self.nanos(now);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Whether it has reached the failure threshold (or is ejected): what
    /// "failing" means when deciding that every endpoint is failing.
    pub fn is_failing(&self, settings: &OutlierDetection) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
            || self.consecutive_failures.load(Ordering::Relaxed) >= settings.consecutive_failures
            || self.probation.load(Ordering::Relaxed)
                && self.consecutive_failures.load(Ordering::Relaxed) > 0
    }
}

/// The max-percent rule: may one more of `total` endpoints be ejected,
/// with `ejected` out already? Always yes when every endpoint is failing.
pub fn may_eject(
    settings: &OutlierDetection,
    total: usize,
    ejected: usize,
    all_failing: bool,
) -> bool {
    if all_failing {
        return true;
    }
    let allowed = total.saturating_mul(usize::from(settings.max_ejection_percent)) / 100;
    ejected < allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }

    fn fail(health: &Health, now: Instant) -> Change {
        health.failed(now, &settings(), || true)
    }

    #[test]
    fn ejects_after_the_threshold_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let h = Health::new(t0);
        assert_eq!(fail(&h, t0), Change::None);
        assert_eq!(fail(&h, t0), Change::None);
        h.succeeded();
        assert_eq!(fail(&h, t0), Change::None);
        assert_eq!(fail(&h, t0), Change::None);
        assert_eq!(fail(&h, t0), Change::Ejected(Duration::from_secs(30)));
        assert_eq!(h.is_ejected(t0 + Duration::from_secs(29)), (true, false));
        assert_eq!(
            h.ejected_for(t0 + Duration::from_secs(10)),
            Some(Duration::from_secs(20))
        );
    }

    #[test]
    fn comes_back_on_probation_and_a_failure_ejects_it_again_for_longer() {
        let t0 = Instant::now();
        let h = Health::new(t0);
        for _ in 0..3 {
            fail(&h, t0);
        }
        let back = t0 + Duration::from_secs(30);
        assert_eq!(h.is_ejected(back), (false, true), "returns, once");
        assert_eq!(h.is_ejected(back), (false, false));
        // One failure on probation is enough, and the time doubles.
        assert_eq!(fail(&h, back), Change::Ejected(Duration::from_secs(60)));
        // A success on probation clears it: the threshold applies again.
        let back = back + Duration::from_secs(60);
        assert!(!h.is_ejected(back).0);
        h.succeeded();
        assert_eq!(fail(&h, back), Change::None);
    }

    #[test]
    fn ejection_time_is_capped_and_forgiven_after_a_long_healthy_stretch() {
        let mut now = Instant::now();
        let h = Health::new(now);
        let mut durations = Vec::new();
        for _ in 0..12 {
            for _ in 0..3 {
                if let Change::Ejected(d) = fail(&h, now) {
                    durations.push(d.as_secs());
                }
            }
            now += h.ejected_for(now).unwrap_or_default();
            h.is_ejected(now);
        }
        assert_eq!(durations[..4], [30, 60, 90, 120]);
        assert_eq!(durations[11], 300, "capped at maxEjectionTime");

        // Five healthy minutes later the count starts over.
        let later = now + Duration::from_secs(300);
        h.succeeded();
        for _ in 0..2 {
            assert_eq!(fail(&h, later), Change::None);
        }
        assert_eq!(fail(&h, later), Change::Ejected(Duration::from_secs(30)));
    }

    #[test]
    fn the_caller_can_refuse_an_ejection() {
        let t0 = Instant::now();
        let h = Health::new(t0);
        for _ in 0..5 {
            assert_eq!(h.failed(t0, &settings(), || false), Change::None);
        }
        assert!(h.is_failing(&settings()));
        assert_eq!(h.is_ejected(t0), (false, false));
    }

    #[test]
    fn at_most_the_max_percent_unless_all_are_failing() {
        let s = settings();
        assert!(may_eject(&s, 3, 0, false), "1 of 3 is under 50%");
        assert!(!may_eject(&s, 3, 1, false), "2 of 3 is over");
        assert!(!may_eject(&s, 1, 0, false), "the last one stays");
        assert!(may_eject(&s, 1, 0, true), "unless it is failing too");
        assert!(may_eject(&s, 3, 2, true));
    }
}
