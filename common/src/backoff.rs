//! Jittered exponential backoff, shared by every retry loop (xDS reconnects, certificate fetches).

use std::time::Duration;

use rand::Rng;

/// Doubles from `initial` up to `max`; each delay is jittered into [d/2, d].
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, current: initial }
    }

    /// The next delay to wait, jittered; the one after it doubles (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        let delay = jitter(self.current);
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the initial delay (after a success).
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

/// Full jitter in [d/2, d].
pub fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        for _ in 0..1000 {
            let d = jitter(Duration::from_millis(100));
            assert!(d >= Duration::from_millis(50) && d <= Duration::from_millis(100), "{d:?}");
        }
    }

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        let delays: Vec<_> = (0..4).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(10));
        assert!(delays[1] > Duration::from_millis(9) && delays[1] <= Duration::from_millis(20));
        assert!(delays[3] >= Duration::from_millis(17) && delays[3] <= Duration::from_millis(35));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
