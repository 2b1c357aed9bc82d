//! Choosing an endpoint for a request, and keeping score of each one.
//!
//! - [`RoundRobin`]: a plain rotation (opaque TCP uses it).
//! - [`Balancer`]: what HTTP destinations use. Per the TrafficPolicy's
//!   `loadBalancer`:
//!   - `p2c-ewma` (default, as in Linkerd) takes two endpoints at random
//!     and sends to the cheaper one. The cost is the peak-EWMA of its
//!     response times × (its requests in flight + 1).
//!   - `least-request` does the same on requests in flight alone.
//!   - `round-robin` rotates.
//!
//!   Ejected endpoints (see `outlier.rs`) are never candidates.
//!
//! Scores live in atomics on each endpoint, kept across configuration
//! changes while the endpoint stays. Picking takes no lock and does not
//! allocate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Duration;

use metrics::{Counter, Gauge};
use outrigger_config::{LoadBalancer, OutlierDetection};
use tokio::time::Instant;

use crate::outlier::{self, Change, Health};
use crate::random::random_below;

use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;

/// Endpoints of one destination, and where the rotation is.
#[derive(Debug)]
pub struct RoundRobin<E> {
    endpoints: Vec<E>,
    next: AtomicUsize,
}

impl<E> RoundRobin<E> {
    pub fn new(endpoints: Vec<E>) -> Self {
        Self {
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    pub fn endpoints(&self) -> &[E] {
        &self.endpoints
    }

    /// The next endpoint, or `None` when there are none.
    pub fn pick(&self) -> Option<&E> {
        match self.endpoints.len() {
            0 => None,
            1 => self.endpoints.first(),
            n => {
                let i = self.next.fetch_add(1, Relaxed) % n;
                self.endpoints.get(i)
            }
        }
    }
}

// === Balancer ===

/// What an endpoint's response time is taken to be before it has answered.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast old response times fade: a sample's weight halves in about
/// 7 s (e^-t/10s).
const DECAY: Duration = Duration::from_secs(10);
/// A failure counts as at least this slow, so an endpoint that fails fast
/// does not look like the fastest one and draw more traffic.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// One endpoint's live score: requests in flight, response times, health.
#[derive(Debug)]
pub struct Score {
    pub addr: SocketAddr,
    pending: AtomicU32,
    /// Peak-EWMA of response times in nanoseconds (f64 bits).
    rtt_ns: AtomicU64,
    /// When `rtt_ns` was last updated, in nanoseconds since `epoch`.
    rtt_at: AtomicU64,
    epoch: Instant,
    pub health: Health,
}

impl Score {
    pub fn new(addr: SocketAddr) -> Self {
        let now = Instant::now();
        Self {
            addr,
            pending: AtomicU32::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            rtt_at: AtomicU64::new(0),
            epoch: now,
            health: Health::new(now),
        }
    }

    fn nanos_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The response-time estimate at `now`: it fades towards zero while
    /// no answers come, so a once-slow endpoint is tried again.
    fn rtt_estimate(&self, now: Instant) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Relaxed));
        let at = self.rtt_at.load(Relaxed);
        let elapsed = self.nanos_since_epoch(now).saturating_sub(at) as f64;
        rtt * (-elapsed / DECAY.as_nanos() as f64).exp()
    }

    /// Adds a response time: a slower one than the estimate replaces it
    /// (the peak), a faster one is blended in by how recent the last was.
    fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let current = f64::from_bits(self.rtt_ns.load(Relaxed));
        let now_ns = self.nanos_since_epoch(now);
        let next = if sample > current {
            sample
        } else {
            let elapsed = now_ns.saturating_sub(self.rtt_at.load(Relaxed)) as f64;
            let decay = (-elapsed / DECAY.as_nanos() as f64).exp();
            current * decay + sample * (1.0 - decay)
        };
        // Two racing updates may lose one sample: an estimate can afford it.
        self.rtt_ns.store(next.to_bits(), Relaxed);
        self.rtt_at.store(now_ns, Relaxed);
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Relaxed)
    }

    /// The EWMA as `/config` shows it.
    pub fn rtt_ewma(&self, now: Instant) -> Duration {
        Duration::from_nanos(self.rtt_estimate(now) as u64)
    }

    fn cost(&self, algorithm: LoadBalancer, now: Instant) -> f64 {
        let pending = f64::from(self.pending()) + 1.0;
        match algorithm {
            LoadBalancer::LeastRequest | LoadBalancer::RoundRobin => pending,
            LoadBalancer::P2cEwma => self.rtt_estimate(now) * pending,
        }
    }
}

/// An endpoint's client and score.
#[derive(Debug)]
pub struct Endpoint<E> {
    pub client: E,
    pub score: Arc<Score>,
}

/// A request in flight to an endpoint: counted as pending until dropped.
#[derive(Debug)]
pub struct InFlight {
    score: Arc<Score>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.score.pending.fetch_sub(1, Relaxed);
    }
}

/// How an attempt at an endpoint went, for its score.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx, a refused connection or a reset.
    Failure,
}

/// Why no endpoint was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoPick {
    NoEndpoints,
    /// Every endpoint is ejected (outlier detection).
    AllEjected,
}

/// Per-service outlier metrics.
#[derive(Clone, Debug)]
pub struct OutlierMetrics {
    ejections: Counter,
    ejected: Gauge,
    /// 1 while every endpoint is ejected (requests fail fast).
    open: Gauge,
}

pub const EJECTIONS_TOTAL: &str = "outrigger_outlier_ejections_total";
pub const EJECTED_ENDPOINTS: &str = "outrigger_outlier_ejected_endpoints";
pub const CIRCUIT_OPEN: &str = "outrigger_circuit_open";

impl OutlierMetrics {
    /// Records nothing.
    pub fn noop() -> Self {
        Self {
            ejections: Counter::noop(),
            ejected: Gauge::noop(),
            open: Gauge::noop(),
        }
    }

    pub fn new(service: &str) -> Self {
        Self {
            ejections: metrics::counter!(EJECTIONS_TOTAL, "service" => service.to_string()),
            ejected: metrics::gauge!(EJECTED_ENDPOINTS, "service" => service.to_string()),
            open: metrics::gauge!(CIRCUIT_OPEN, "service" => service.to_string()),
        }
    }
}

/// The endpoints of one destination and the way to choose among them.
#[derive(Debug)]
pub struct Balancer<E> {
    service: Arc<str>,
    endpoints: Vec<Endpoint<E>>,
    algorithm: LoadBalancer,
    outlier: Option<OutlierDetection>,
    next: AtomicUsize,
    metrics: OutlierMetrics,
}

impl<E> Balancer<E> {
    pub fn new(
        service: Arc<str>,
        endpoints: Vec<Endpoint<E>>,
        algorithm: LoadBalancer,
        outlier: Option<OutlierDetection>,
        metrics: OutlierMetrics,
    ) -> Self {
        let balancer = Self {
            service,
            endpoints,
            algorithm,
            outlier,
            next: AtomicUsize::new(0),
            metrics,
        };
        balancer.update_gauge(Instant::now());
        balancer
    }

    pub fn endpoints(&self) -> &[Endpoint<E>] {
        &self.endpoints
    }

    pub fn metrics(&self) -> &OutlierMetrics {
        &self.metrics
    }

    fn is_ejected(&self, endpoint: &Endpoint<E>, now: Instant) -> bool {
        if self.outlier.is_none() {
            return false;
        }
        let (ejected, returned) = endpoint.score.health.is_ejected(now);
        if returned {
            tracing::info!(service = %self.service, endpoint = %endpoint.score.addr, "endpoint back in rotation after its ejection (on probation)");
            self.update_gauge(now);
        }
        ejected
    }

    fn update_gauge(&self, now: Instant) {
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.score.health.ejected_for(now).is_some())
            .count();
        self.metrics.ejected.set(ejected as f64);
        let open = ejected > 0 && ejected == self.endpoints.len();
        self.metrics.open.set(if open { 1.0 } else { 0.0 });
    }

    /// The endpoint for the next request, counted as in flight until the
    /// returned guard drops.
    pub fn pick(&self, now: Instant) -> Result<(&Endpoint<E>, InFlight), NoPick> {
        let n = self.endpoints.len();
        if n == 0 {
            return Err(NoPick::NoEndpoints);
        }
        let usable = |i: usize| -> Option<usize> {
            (0..n).map(|k| (i + k) % n).find(|&j| {
                self.endpoints
                    .get(j)
                    .is_some_and(|e| !self.is_ejected(e, now))
            })
        };
        let chosen = match (self.algorithm, n) {
            (_, 1) => usable(0),
            (LoadBalancer::RoundRobin, _) => usable(self.next.fetch_add(1, Relaxed) % n),
            (algorithm, _) => {
                // Two distinct random endpoints (each moved on to the next
                // usable one if ejected); the cheaper wins.
                let a = random_below(n);
                let b = (a + 1 + random_below(n - 1)) % n;
                match (usable(a), usable(b)) {
                    (Some(a), Some(b)) => {
                        let cost = |i: usize| {
                            self.endpoints
                                .get(i)
                                .map_or(f64::MAX, |e| e.score.cost(algorithm, now))
                        };
                        Some(if cost(b) < cost(a) { b } else { a })
                    }
                    (a, b) => a.or(b),
                }
            }
        };
        let endpoint = chosen
            .and_then(|i| self.endpoints.get(i))
            .ok_or(NoPick::AllEjected)?;
        endpoint.score.pending.fetch_add(1, Relaxed);
        let guard = InFlight {
            score: endpoint.score.clone(),
            started: now,
        };
        Ok((endpoint, guard))
    }

    /// Records how a request picked with `in_flight` went, at `now`.
    pub fn record(&self, in_flight: InFlight, outcome: Outcome, now: Instant) {
        let score = &in_flight.score;
        let took = now.saturating_duration_since(in_flight.started);
        match outcome {
            Outcome::Success => {
                score.observe(took, now);
                score.health.succeeded();
            }
            Outcome::Failure => {
                score.observe(took.max(FAILURE_PENALTY), now);
                let Some(settings) = &self.outlier else {
                    return;
                };
                let change = score.health.failed(now, settings, || {
                    let ejected = self
                        .endpoints
                        .iter()
                        .filter(|e| e.score.health.ejected_for(now).is_some())
                        .count();
                    let all_failing = self.endpoints.iter().all(|e| {
                        Arc::ptr_eq(&e.score, score) || e.score.health.is_failing(settings)
                    });
                    outlier::may_eject(settings, self.endpoints.len(), ejected, all_failing)
                });
                if let Change::Ejected(duration) = change {
                    tracing::warn!(service = %self.service, endpoint = %score.addr, ?duration, "endpoint ejected after failing {} times in a row", settings.consecutive_failures);
                    self.metrics.ejections.increment(1);
                    self.update_gauge(now);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_through_every_endpoint() {
        let rr = RoundRobin::new(vec!["a", "b", "c"]);
        let picked: Vec<&str> = (0..6).filter_map(|_| rr.pick().copied()).collect();
        assert_eq!(picked, ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn empty_has_nothing_to_pick() {
        let rr: RoundRobin<&str> = RoundRobin::new(vec![]);
        assert!(rr.pick().is_none());
    }

    fn balancer(
        n: u16,
        algorithm: LoadBalancer,
        outlier: Option<OutlierDetection>,
    ) -> Balancer<u16> {
        let endpoints = (1..=n)
            .map(|port| Endpoint {
                client: port,
                score: Arc::new(Score::new(SocketAddr::from(([127, 0, 0, 1], port)))),
            })
            .collect();
        Balancer::new(
            Arc::from("shop/api"),
            endpoints,
            algorithm,
            outlier,
            OutlierMetrics::new("shop/api"),
        )
    }

    /// Which endpoint (its port) each of `n` picks lands on, each request
    /// answered at once with `outcome`.
    fn spread(b: &Balancer<u16>, n: usize, now: Instant) -> Vec<usize> {
        let mut counts = vec![0; b.endpoints().len() + 1];
        for _ in 0..n {
            let (endpoint, guard) = b.pick(now).expect("an endpoint");
            counts[usize::from(endpoint.client)] += 1;
            drop(guard);
        }
        counts
    }

    fn outlier() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 2,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }

    #[test]
    fn p2c_ewma_sends_most_requests_away_from_a_slow_endpoint() {
        let b = balancer(3, LoadBalancer::P2cEwma, None);
        let now = Instant::now();
        // Endpoint 3 answered in 50 ms, the others in 1 ms.
        for (i, endpoint) in b.endpoints().iter().enumerate() {
            let rtt = if i == 2 { 50 } else { 1 };
            endpoint.score.observe(Duration::from_millis(rtt), now);
        }
        let counts = spread(&b, 3000, now);
        // The two drawn are always distinct, and the slow one loses every
        // comparison.
        assert_eq!(counts[3], 0, "{counts:?}");
        assert_eq!(counts[1] + counts[2], 3000, "{counts:?}");
    }

    #[test]
    fn p2c_weighs_requests_in_flight() {
        let b = balancer(2, LoadBalancer::P2cEwma, None);
        let now = Instant::now();
        // Same response times; endpoint 1 has 5 requests in flight.
        let held: Vec<InFlight> = (0..5)
            .map(|_| {
                let (_, guard) = b.pick(now).expect("pick");
                guard
            })
            .take(1)
            .collect();
        let busy = b.endpoints()[0].score.clone();
        busy.pending.fetch_add(4, Relaxed);
        assert_eq!(spread(&b, 100, now)[2], 100);
        busy.pending.fetch_sub(4, Relaxed);
        drop(held);
        assert_eq!(b.endpoints()[0].score.pending(), 0);
    }

    #[test]
    fn least_request_and_round_robin() {
        let b = balancer(2, LoadBalancer::LeastRequest, None);
        let now = Instant::now();
        b.endpoints()[1].score.pending.fetch_add(1, Relaxed);
        assert_eq!(spread(&b, 50, now)[1], 50);

        let b = balancer(3, LoadBalancer::RoundRobin, None);
        assert_eq!(spread(&b, 30, now), [0, 10, 10, 10]);
    }

    #[test]
    fn a_slow_endpoint_is_tried_again_as_its_estimate_fades() {
        let score = Score::new(SocketAddr::from(([127, 0, 0, 1], 1)));
        let now = Instant::now();
        score.observe(Duration::from_millis(500), now);
        assert_eq!(
            score.rtt_ewma(now),
            Duration::from_millis(500),
            "the peak counts at once"
        );
        let later = now + Duration::from_secs(30);
        assert!(
            score.rtt_ewma(later) < Duration::from_millis(30),
            "{:?}",
            score.rtt_ewma(later)
        );
        // A fast answer is blended in by how long since the last one.
        score.observe(Duration::from_millis(10), now + Duration::from_millis(100));
        let blended = score.rtt_ewma(now + Duration::from_millis(100));
        assert!(blended > Duration::from_millis(400), "{blended:?}");
    }

    #[test]
    fn failing_endpoints_are_ejected_and_skipped_then_all_ejected_fails_fast() {
        let b = balancer(2, LoadBalancer::RoundRobin, Some(outlier()));
        let now = Instant::now();
        let fail = |port: u16| {
            let (endpoint, guard) = loop {
                let (e, g) = b.pick(now).expect("pick");
                if e.client == port {
                    break (e, g);
                }
            };
            let _ = endpoint;
            b.record(guard, Outcome::Failure, now);
        };
        fail(1);
        fail(1);
        assert!(b.endpoints()[0].score.health.ejected_for(now).is_some());
        assert_eq!(spread(&b, 10, now)[1], 0, "ejected: no traffic");
        // Endpoint 2 fails too: 50% allows only one ejection, but every
        // endpoint is failing, so both go and requests fail fast.
        for _ in 0..2 {
            let (_, guard) = b.pick(now).expect("pick 2");
            b.record(guard, Outcome::Failure, now);
        }
        assert_eq!(b.pick(now).err(), Some(NoPick::AllEjected));
        // Their time is up: both are candidates again.
        let later = now + Duration::from_secs(30);
        assert!(b.pick(later).is_ok());
    }

    #[test]
    fn the_max_percent_keeps_healthy_capacity() {
        let b = balancer(4, LoadBalancer::RoundRobin, Some(outlier()));
        let now = Instant::now();
        // Endpoints 1..=3 fail; 50% of 4 lets two be ejected, and
        // endpoint 4 is healthy, so the third stays in.
        for _ in 0..40 {
            let (endpoint, guard) = b.pick(now).expect("pick");
            let outcome = if endpoint.client == 4 {
                Outcome::Success
            } else {
                Outcome::Failure
            };
            b.record(guard, outcome, now);
        }
        let ejected = b
            .endpoints()
            .iter()
            .filter(|e| e.score.health.ejected_for(now).is_some())
            .count();
        assert_eq!(ejected, 2);
    }
}
