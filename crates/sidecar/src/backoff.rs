//! Jittered exponential backoff for reconnecting to the controller: the ceiling
//! doubles from `base` up to `max` with each failed attempt, and each delay is
//! drawn from the upper half of the ceiling ("equal jitter"), so a fleet of
//! sidecars that lost the controller together does not reconnect in lockstep,
//! yet no sidecar retries much sooner than the ceiling says.

use std::time::Duration;

/// Backoff state: how many attempts failed in a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Default for Backoff {
    /// 200 ms doubling up to 30 s.
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(30))
    }
}

impl Backoff {
    /// Backoff from `base` doubling up to `max` (`max` is raised to `base` if
    /// lower).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The ceiling after `failures` failures in a row: `base · 2^(failures-1)`,
    /// at most `max`.
    pub fn ceiling(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .map_or(self.max, |d| d.min(self.max))
    }

    /// Records a failure and returns how long to wait, with `random` in `[0, 1)`
    /// choosing where in `[ceiling/2, ceiling)` the delay falls.
    pub fn next_delay_with(&mut self, random: f64) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let ceiling = self.ceiling(self.failures);
        let half = ceiling / 2;
        half + half.mul_f64(random.clamp(0.0, 1.0))
    }

    /// Records a failure and returns a jittered delay (system randomness).
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(random_fraction())
    }

    /// Forgets the failures (after a connection that worked).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// A uniformly random number in `[0, 1)` from the system RNG (0.5 if it fails:
/// jitter is an optimisation, not a security property).
fn random_fraction() -> f64 {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        return 0.5;
    }
    // The top 53 bits make an exactly representable fraction below 1.
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ceiling_doubles_from_base_up_to_max() {
        let backoff = Backoff::default();
        assert_eq!(backoff.ceiling(1), ms(200));
        assert_eq!(backoff.ceiling(2), ms(400));
        assert_eq!(backoff.ceiling(3), ms(800));
        assert_eq!(backoff.ceiling(8), ms(25_600));
        assert_eq!(backoff.ceiling(9), ms(30_000));
        assert_eq!(backoff.ceiling(u32::MAX), ms(30_000));
    }

    #[test]
    fn delays_fall_in_the_upper_half_of_the_ceiling() {
        let mut backoff = Backoff::default();
        assert_eq!(backoff.next_delay_with(0.0), ms(100));
        let almost_ceiling = backoff.next_delay_with(0.999_999);
        assert!(almost_ceiling > ms(399) && almost_ceiling < ms(400));
        assert_eq!(backoff.next_delay_with(0.5), ms(600));
        for _ in 0..10 {
            backoff.next_delay();
        }
        for _ in 0..100 {
            let delay = backoff.next_delay();
            assert!(delay >= ms(15_000) && delay < ms(30_000), "{delay:?}");
        }
    }

    #[test]
    fn reset_starts_over() {
        let mut backoff = Backoff::default();
        for _ in 0..5 {
            backoff.next_delay();
        }
        assert_eq!(backoff.failures(), 5);
        backoff.reset();
        assert!(backoff.next_delay() < ms(200));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut delays = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut backoff = Backoff::default();
            delays.insert(backoff.next_delay());
        }
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }

    #[test]
    fn random_fraction_is_below_one() {
        for _ in 0..1000 {
            let r = random_fraction();
            assert!((0.0..1.0).contains(&r), "{r}");
        }
    }
}
