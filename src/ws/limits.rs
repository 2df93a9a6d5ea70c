//! Per-connection request rate limiting: a token bucket that takes the time as an argument.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `per_second` tokens, refilled at `per_second`.
    pub fn new(per_second: u32, now: Instant) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            capacity: rate,
            per_second: rate,
            tokens: rate,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the next token.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs_f64(((1.0 - self.tokens) / self.per_second).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert_eq!((0..15).filter(|_| b.allow(t0)).count(), 10);
        assert!(!b.allow(t0));
        assert!(b.retry_after() > Duration::ZERO);
        assert!(
            b.allow(t0 + Duration::from_millis(100)),
            "one token per 100 ms"
        );
        assert!(!b.allow(t0 + Duration::from_millis(100)));
        assert_eq!(
            (0..50)
                .filter(|_| b.allow(t0 + Duration::from_secs(60)))
                .count(),
            10,
            "capped at the burst"
        );
    }
}
