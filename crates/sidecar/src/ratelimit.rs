//! Rate limits: token buckets, one per (limit, session) or per (limit, agent).
//! A bucket holds `calls` tokens and refills at `calls / period`, so a burst of
//! `calls` is allowed and the long-run rate is `calls` per `period`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One token bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    updated: Option<Instant>,
}

impl TokenBucket {
    /// A full bucket of `calls` tokens refilled over `period`.
    pub fn new(calls: u32, period: Duration) -> Self {
        let capacity = f64::from(calls.max(1));
        Self {
            capacity,
            per_second: capacity / period.as_secs_f64().max(0.001),
            tokens: capacity,
            updated: None,
        }
    }

    /// Adopts a changed limit (a new snapshot) without refilling.
    pub fn reconfigure(&mut self, calls: u32, period: Duration) {
        let capacity = f64::from(calls.max(1));
        self.capacity = capacity;
        self.per_second = capacity / period.as_secs_f64().max(0.001);
        self.tokens = self.tokens.min(capacity);
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if let Some(updated) = self.updated {
            let elapsed = now.saturating_duration_since(updated).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        }
        self.updated = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The per-agent buckets, shared by every session of this sidecar.
#[derive(Debug, Default)]
pub struct AgentRateLimits {
    buckets: Mutex<HashMap<Arc<str>, TokenBucket>>,
}

impl AgentRateLimits {
    /// Takes a token from agent-wide limit `id`.
    pub fn try_take(&self, id: &Arc<str>, calls: u32, period: Duration, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets
            .entry(Arc::clone(id))
            .or_insert_with(|| TokenBucket::new(calls, period));
        bucket.reconfigure(calls, period);
        bucket.try_take(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refills() {
        let mut bucket = TokenBucket::new(2, Duration::from_secs(10));
        let now = Instant::now();
        assert!(bucket.try_take(now));
        assert!(bucket.try_take(now));
        assert!(!bucket.try_take(now));
        assert!(bucket.try_take(now + Duration::from_secs(5)));
        assert!(!bucket.try_take(now + Duration::from_secs(5)));
    }

    #[test]
    fn agent_limits_are_shared_per_id() {
        let limits = AgentRateLimits::default();
        let id: Arc<str> = Arc::from("ns/p/r");
        let now = Instant::now();
        assert!(limits.try_take(&id, 1, Duration::from_secs(60), now));
        assert!(!limits.try_take(&id, 1, Duration::from_secs(60), now));
        assert!(limits.try_take(&Arc::from("ns/p/other"), 1, Duration::from_secs(60), now));
    }
}
