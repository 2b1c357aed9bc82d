//! The circuit breaker's concurrency limits for one destination, as in
//! Envoy:
//!
//! - `maxRequests`: requests in flight to the service. A request holds its
//!   slot until its response ends.
//! - `maxConnections`: upstream connections open, over all endpoints.
//! - `maxPendingRequests`: requests waiting for a new connection to be
//!   made. hyper's pool makes one connection per request that finds no
//!   idle one, so this counts connection attempts under way.
//!
//! Over a limit, a request fails at once with 503: waiting in a queue is
//! what lets one slow dependency take the whole caller down. The counts
//! are atomics shared by every version of the destination, so a
//! configuration change neither resets nor doubles them.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::Relaxed;

use metrics::Counter;
use outrigger_config::CircuitBreaker;

pub const OVERFLOW_TOTAL: &str = "outrigger_circuit_overflow_total";

/// A limit that refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// The TrafficPolicy field, e.g. `maxRequests`.
    pub limit: &'static str,
    pub max: u32,
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.limit {
            "maxConnections" => "connections open",
            "maxPendingRequests" => "requests waiting for a connection",
            _ => "requests in flight",
        };
        write!(f, "{} {what} (circuitBreaker.{})", self.max, self.limit)
    }
}

impl std::error::Error for Overflow {}

/// One counted limit.
#[derive(Debug)]
struct Gate {
    name: &'static str,
    current: AtomicU32,
    max: AtomicU32,
    refused: Counter,
}

impl Gate {
    fn new(name: &'static str, refused: Counter) -> Self {
        Self {
            name,
            current: AtomicU32::new(0),
            max: AtomicU32::new(u32::MAX),
            refused,
        }
    }

    fn enter(&self) -> Result<(), Overflow> {
        let max = self.max.load(Relaxed);
        let entered = self
            .current
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1));
        entered.map(|_| ()).map_err(|_| {
            self.refused.increment(1);
            Overflow {
                limit: self.name,
                max,
            }
        })
    }

    fn leave(&self) {
        self.current.fetch_sub(1, Relaxed);
    }
}

/// One destination's limits and what is counted against them.
#[derive(Debug)]
pub struct Limits {
    requests: Gate,
    connections: Gate,
    pending: Gate,
}

impl Limits {
    pub fn new(service: &str) -> Self {
        let refused = |limit: &'static str| metrics::counter!(OVERFLOW_TOTAL, "service" => service.to_string(), "limit" => limit);
        Self {
            requests: Gate::new("maxRequests", refused("maxRequests")),
            connections: Gate::new("maxConnections", refused("maxConnections")),
            pending: Gate::new("maxPendingRequests", refused("maxPendingRequests")),
        }
    }

    /// Counts without metrics (the local app behind an inbound listener).
    pub fn unmetered() -> Self {
        Self {
            requests: Gate::new("maxRequests", Counter::noop()),
            connections: Gate::new("maxConnections", Counter::noop()),
            pending: Gate::new("maxPendingRequests", Counter::noop()),
        }
    }

    /// Takes the limits of a (new) policy; what is in flight stays counted.
    pub fn set(&self, policy: &CircuitBreaker) {
        self.requests.max.store(policy.max_requests, Relaxed);
        self.connections.max.store(policy.max_connections, Relaxed);
        self.pending.max.store(policy.max_pending_requests, Relaxed);
    }

    pub fn admit_request(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.requests.enter()?;
        Ok(Permit {
            limits: self.clone(),
            kind: Kind::Request,
        })
    }

    /// A connection attempt: counted as pending until it is made (then
    /// call [`Permit::connected`]) or fails.
    pub fn admit_connect(self: &Arc<Self>) -> Result<Permit, Overflow> {
        self.pending.enter()?;
        Ok(Permit {
            limits: self.clone(),
            kind: Kind::Pending,
        })
    }

    /// Requests and connections counted now, for `/config`.
    pub fn in_flight(&self) -> (u32, u32) {
        (
            self.requests.current.load(Relaxed),
            self.connections.current.load(Relaxed),
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Pending,
    Connection,
}

/// A slot under one limit, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limits: Arc<Limits>,
    kind: Kind,
}

impl Permit {
    /// The pending connection attempt succeeded: it becomes an open
    /// connection, counted under `maxConnections` for as long as the
    /// returned permit lives (the connection holds it).
    pub fn connected(self) -> Result<Permit, Overflow> {
        let limits = self.limits.clone();
        drop(self);
        limits.connections.enter()?;
        Ok(Permit {
            limits,
            kind: Kind::Connection,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        match self.kind {
            Kind::Request => self.limits.requests.leave(),
            Kind::Pending => self.limits.pending.leave(),
            Kind::Connection => self.limits.connections.leave(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(requests: u32, connections: u32, pending: u32) -> Arc<Limits> {
        let limits = Arc::new(Limits::new("shop/api"));
        limits.set(&CircuitBreaker {
            max_connections: connections,
            max_pending_requests: pending,
            max_requests: requests,
        });
        limits
    }

    #[test]
    fn requests_over_the_limit_are_refused_until_a_slot_frees() {
        let limits = limits(2, 10, 10);
        let a = limits.admit_request().expect("first");
        let _b = limits.admit_request().expect("second");
        let refused = limits.admit_request().expect_err("third");
        assert_eq!(
            refused.to_string(),
            "2 requests in flight (circuitBreaker.maxRequests)"
        );
        drop(a);
        assert!(limits.admit_request().is_ok());
    }

    #[test]
    fn connections_count_from_made_to_closed() {
        let limits = limits(10, 1, 1);
        let pending = limits.admit_connect().expect("pending");
        assert_eq!(
            limits
                .admit_connect()
                .expect_err("one pending at most")
                .limit,
            "maxPendingRequests"
        );
        let open = pending.connected().expect("open");
        assert_eq!(limits.in_flight(), (0, 1));
        let second = limits.admit_connect().expect("pending again");
        assert_eq!(
            second.connected().expect_err("one open at most").limit,
            "maxConnections"
        );
        drop(open);
        assert_eq!(limits.in_flight(), (0, 0));
    }

    #[test]
    fn a_new_policy_keeps_the_counts() {
        let limits = limits(1, 1, 1);
        let _held = limits.admit_request().expect("held");
        limits.set(&CircuitBreaker::default());
        assert!(limits.admit_request().is_ok(), "the limit grew");
        assert_eq!(limits.in_flight().0, 1);
    }
}
