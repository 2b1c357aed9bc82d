//! Cheap randomness for the data path: picking endpoints, jittering
//! backoffs, trace and span ids. A per-thread xorshift64* generator,
//! seeded from the OS through std's `RandomState`: no lock, no syscall
//! per draw. Not for secrets.

use std::cell::Cell;

/// 64 random bits, never all zero.
pub fn random_u64() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    let x = STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    });
    // xorshift64*: the multiply (by an odd constant, so a non-zero state
    // stays non-zero) makes the high bits the good ones.
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A number in `0..bound` (`bound` > 0). Scaling the high bits (rather
/// than `%` on the low ones) keeps two draws in a row independent.
pub fn random_below(bound: usize) -> usize {
    let r = random_u64();
    let bound = u64::try_from(bound.max(1)).unwrap_or(u64::MAX);
    let picked = if bound <= u64::from(u32::MAX) {
        ((r >> 32) * bound) >> 32
    } else {
        r % bound
    };
    usize::try_from(picked).unwrap_or(0)
}

fn seed() -> u64 {
    use std::hash::BuildHasher;
    // std seeds RandomState from the OS: a fresh, random seed per thread.
    std::collections::hash_map::RandomState::new().hash_one(std::thread::current().id()) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_below_stays_in_range_and_spreads() {
        let mut seen = [0usize; 4];
        for _ in 0..4000 {
            seen[random_below(4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        assert_eq!(random_below(1), 0);
    }

    #[test]
    fn ids_are_never_zero_and_differ() {
        let a = random_u64();
        let b = random_u64();
        assert!(a != 0 && b != 0 && a != b);
    }
}
