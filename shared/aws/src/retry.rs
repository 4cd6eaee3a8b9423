//! Backoff with full jitter for the retries GeoStream does itself (partial failures of batch
//! calls; the SDK's own retry config handles throttled and failed calls as a whole).

use std::time::Duration;

use rand::Rng;

/// How many times a partially failed batch call is repeated for its failed entries.
pub const PARTIAL_FAILURE_ATTEMPTS: u32 = 5;

/// Delay before retry `attempt` (1-based): uniform in [0, min(cap, base * 2^attempt)].
pub fn backoff(attempt: u32) -> Duration {
    let base_ms: u64 = 50;
    let cap_ms: u64 = 5_000;
    let ceiling = base_ms.saturating_mul(1 << attempt.min(16)).min(cap_ms);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_grows() {
        for attempt in 1..30 {
            assert!(backoff(attempt) <= Duration::from_millis(5_000));
        }
        let early: u128 = (0..200).map(|_| backoff(1).as_millis()).sum();
        let late: u128 = (0..200).map(|_| backoff(6).as_millis()).sum();
        assert!(late > early);
    }
}
