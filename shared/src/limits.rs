//! Per-device request limits: a device (one vehicle) may post at most `per_second` requests a
//! second on average, with `burst` more at once (a tracker flushing what it queued while out of
//! coverage). A request carrying several vehicles' readings (a gateway's) counts once for each
//! vehicle in it. Past its limit a device is answered 429 with the seconds until it may post
//! again, and costs nothing further downstream.
//!
//! [`LocalDeviceLimits`] keeps the count in this process, as GCRA (the `governor` crate): exact
//! for the local runner, which is one process, and per execution environment on Lambda, where
//! the deny list of [`DeviceLimits`] implementations shared across environments adds what one
//! environment cannot see.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

/// A device's allowance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceRateLimit {
    /// Requests a second, on average (fractions allowed: 0.2 is one every 5 s).
    pub per_second: f64,
    /// Requests allowed at once above the average.
    pub burst: u32,
}

impl Default for DeviceRateLimit {
    /// 2 requests a second with a burst of 20: 4 to 20 times what a vehicle reporting every
    /// 2-10 s sends, so a fleet's devices never meet it and a device gone wild does.
    fn default() -> Self {
        DeviceRateLimit {
            per_second: 2.0,
            burst: 20,
        }
    }
}

impl DeviceRateLimit {
    /// A limit from its two numbers, or what is wrong with them.
    pub fn new(per_second: f64, burst: u32) -> Result<Self, String> {
        if !(0.001..=1_000_000.0).contains(&per_second) {
            return Err(format!(
                "a device's rate must be between 0.001 and 1,000,000 requests a second, not {per_second}"
            ));
        }
        if burst == 0 {
            return Err("a device's burst must be at least 1 request".into());
        }
        Ok(DeviceRateLimit { per_second, burst })
    }

    fn quota(&self) -> Quota {
        let period = Duration::from_secs_f64(1.0 / self.per_second);
        // The period is at least a microsecond (the rate is bounded in `new`).
        let quota =
            Quota::with_period(period).unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX));
        quota.allow_burst(NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN))
    }
}

/// Whether a device may post now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// Over its limit: it may post again after this long.
    RetryAfter(Duration),
}

/// Decides whether a device may post now (and counts the request when it may).
#[async_trait]
pub trait DeviceLimits: Send + Sync {
    async fn admit(&self, device: &str) -> Admission;
    fn limit(&self) -> DeviceRateLimit;
}

/// How many requests pass between two sweeps of the devices whose allowance is whole again.
const SWEEP_EVERY: u64 = 100_000;

/// Per-device GCRA in this process.
pub struct LocalDeviceLimits<C: Clock = DefaultClock> {
    limiter: RateLimiter<String, DashMapStateStore<String>, C, NoOpMiddleware<C::Instant>>,
    limit: DeviceRateLimit,
    checks: AtomicU64,
}

impl LocalDeviceLimits {
    pub fn new(limit: DeviceRateLimit) -> Self {
        LocalDeviceLimits::with_clock(limit, DefaultClock::default())
    }
}

impl<C: Clock> LocalDeviceLimits<C> {
    /// On another clock (tests move a fake one).
    pub fn with_clock(limit: DeviceRateLimit, clock: C) -> Self {
        LocalDeviceLimits {
            limiter: RateLimiter::new(limit.quota(), DashMapStateStore::default(), clock),
            limit,
            checks: AtomicU64::new(0),
        }
    }

    /// Counts a request of `device`, if its allowance has room.
    pub fn check(&self, device: &str) -> Admission {
        // Devices whose allowance is whole again hold nothing worth keeping.
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            self.limiter.retain_recent();
        }
        match self.limiter.check_key(&device.to_string()) {
            Ok(()) => Admission::Admitted,
            Err(not_until) => {
                Admission::RetryAfter(not_until.wait_time_from(self.limiter.clock().now()))
            }
        }
    }

    /// Devices currently holding state.
    pub fn tracked_devices(&self) -> usize {
        self.limiter.len()
    }
}

#[async_trait]
impl<C: Clock> DeviceLimits for LocalDeviceLimits<C>
where
    C: Send + Sync,
    C::Instant: Send + Sync,
{
    async fn admit(&self, device: &str) -> Admission {
        self.check(device)
    }

    fn limit(&self) -> DeviceRateLimit {
        self.limit
    }
}

/// The whole seconds of a `Retry-After` header for a wait: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.as_secs() == 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limits(
        per_second: f64,
        burst: u32,
    ) -> (LocalDeviceLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let limit = DeviceRateLimit::new(per_second, burst).unwrap();
        (LocalDeviceLimits::with_clock(limit, clock.clone()), clock)
    }

    #[test]
    fn a_device_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let (limits, clock) = limits(2.0, 5);
        for _ in 0..5 {
            assert_eq!(limits.check("flooder"), Admission::Admitted);
        }
        let Admission::RetryAfter(wait) = limits.check("flooder") else {
            panic!("the sixth request at once is over the burst");
        };
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(limits.check("neighbour"), Admission::Admitted);
        clock.advance(Duration::from_millis(500));
        assert_eq!(limits.check("flooder"), Admission::Admitted);
        assert!(matches!(limits.check("flooder"), Admission::RetryAfter(_)));

        // 50x its rate for a minute: about the rate passes, the rest is refused.
        let admitted = (0..6_000)
            .filter(|_| {
                clock.advance(Duration::from_millis(10));
                limits.check("flooder") == Admission::Admitted
            })
            .count();
        assert!(
            (119..=122).contains(&admitted),
            "{admitted} of 6,000 admitted"
        );
    }

    #[test]
    fn a_fractional_rate_spaces_requests_out() {
        let (limits, clock) = limits(0.2, 1);
        assert_eq!(limits.check("slow"), Admission::Admitted);
        assert_eq!(
            limits.check("slow"),
            Admission::RetryAfter(Duration::from_secs(5))
        );
        clock.advance(Duration::from_secs(5));
        assert_eq!(limits.check("slow"), Admission::Admitted);
    }

    #[test]
    fn devices_whose_allowance_is_whole_again_are_swept_away() {
        let (limits, clock) = limits(2.0, 20);
        for device in 0..SWEEP_EVERY - 1 {
            limits.check(&format!("vehicle-{device}"));
        }
        assert_eq!(limits.tracked_devices() as u64, SWEEP_EVERY - 1);
        clock.advance(Duration::from_secs(11));
        limits.check("vehicle-0");
        assert_eq!(
            limits.tracked_devices(),
            1,
            "only the device that just posted"
        );
    }

    #[test]
    fn limits_that_make_no_sense_are_refused() {
        assert!(DeviceRateLimit::new(0.0, 10).is_err());
        assert!(DeviceRateLimit::new(f64::NAN, 10).is_err());
        assert!(DeviceRateLimit::new(1e12, 10).is_err());
        assert!(DeviceRateLimit::new(1.0, 0).is_err());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2_001)), 3);
    }
}
