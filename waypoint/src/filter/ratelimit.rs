//! Local rate limiting: one token bucket per policy, shared by every request to its target.
//! A request that finds the bucket empty is answered 429 with flag `RL`.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::waypoint as wp;

#[derive(Debug)]
pub struct TokenBucket {
    max: f64,
    per_fill: f64,
    interval: Duration,
    /// Tokens left and when they were last refilled.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub fn from_proto(r: &wp::LocalRateLimit) -> Result<Self, String> {
        let interval = r
            .fill_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .ok_or("rate limit needs a positive fill interval")?;
        if r.max_tokens == 0 || r.tokens_per_fill == 0 {
            return Err("rate limit needs maxTokens and tokensPerFill above 0".into());
        }
        Ok(Self::new(r.max_tokens, r.tokens_per_fill, interval))
    }

    pub fn new(max: u32, per_fill: u32, interval: Duration) -> Self {
        Self {
            max: f64::from(max),
            per_fill: f64::from(per_fill),
            interval,
            state: Mutex::new((f64::from(max), Instant::now())),
        }
    }

    /// Takes a token if there is one. Refills by whole intervals, as Envoy's local rate limit does.
    pub fn try_acquire(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        let fills = (last.elapsed().as_secs_f64() / self.interval.as_secs_f64()).floor();
        if fills >= 1.0 {
            *tokens = (*tokens + fills * self.per_fill).min(self.max);
            *last += self.interval.mul_f64(fills);
        }
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_per_interval() {
        let b = TokenBucket::new(3, 2, Duration::from_millis(100));
        assert_eq!((0..5).filter(|_| b.try_acquire()).count(), 3, "burst of max tokens");
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!((0..5).filter(|_| b.try_acquire()).count(), 2, "one fill of 2");
        assert!(
            TokenBucket::from_proto(&wp::LocalRateLimit {
                max_tokens: 0,
                tokens_per_fill: 1,
                fill_interval: None
            })
            .is_err()
        );
    }
}
