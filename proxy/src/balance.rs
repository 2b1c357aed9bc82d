//! Choosing an endpoint for a request.
//!
//! Round robin over the service's endpoints for now; P2C over peak-EWMA
//! latency and outlier ejection replace the policy here without changing
//! the callers.

use std::sync::atomic::{AtomicUsize, Ordering};

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
                let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                self.endpoints.get(i)
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
}
