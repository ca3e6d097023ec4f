//! A log line that repeats with every failed request (an upstream down, a peer refusing) is
//! written at most once per period; the ones held back are counted and reported with the next.
//! The metric of the failure still counts every one.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one pass per `period`.
#[derive(Debug)]
pub struct Throttle {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(period: Duration) -> Self {
        Self { period, state: Mutex::new((None, 0)) }
    }

    /// `Some(held back since the last pass)` when a line may be written now, else `None` (and
    /// this one is counted as held back).
    pub fn pass(&self) -> Option<u64> {
        self.pass_at(Instant::now())
    }

    fn pass_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (last, held) = &mut *state;
        match last {
            Some(t) if now.saturating_duration_since(*t) < self.period => {
                *held += 1;
                None
            }
            _ => {
                *last = Some(now);
                Some(std::mem::take(held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pass_per_period_and_the_held_back_are_counted() {
        let t = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(t.pass_at(start), Some(0));
        assert_eq!(t.pass_at(start + Duration::from_secs(1)), None);
        assert_eq!(t.pass_at(start + Duration::from_secs(9)), None);
        assert_eq!(t.pass_at(start + Duration::from_secs(10)), Some(2));
        assert_eq!(t.pass_at(start + Duration::from_secs(11)), None);
        assert_eq!(t.pass_at(start + Duration::from_secs(30)), Some(1));
    }
}
