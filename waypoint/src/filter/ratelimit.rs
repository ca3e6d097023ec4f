//! Local rate limiting: one token bucket per policy, shared by every request to its target.
//! A request that finds the bucket empty is answered 429 with flag `RL`. A request under
//! several buckets (waypoint, service, route) takes a token from each or from none
//! ([`acquire_all`]).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use proto::waypoint as wp;

use crate::convert::duration_from_proto;

#[derive(Debug)]
pub struct TokenBucket {
    max: u32,
    per_fill: u32,
    interval: Duration,
    /// Tokens left and when they were last refilled.
    state: Mutex<(u32, Instant)>,
}

impl TokenBucket {
    pub fn from_proto(r: &wp::LocalRateLimit) -> Result<Self, String> {
        let interval = r
            .fill_interval
            .map(|d| duration_from_proto(d, "fillInterval"))
            .transpose()?
            .filter(|d| !d.is_zero())
            .ok_or("rate limit needs a positive fill interval")?;
        if r.max_tokens == 0 || r.tokens_per_fill == 0 {
            return Err("rate limit needs maxTokens and tokensPerFill above 0".into());
        }
        Ok(Self::new(r.max_tokens, r.tokens_per_fill, interval))
    }

    /// A full bucket. A zero `interval` is taken as one nanosecond.
    pub fn new(max: u32, per_fill: u32, interval: Duration) -> Self {
        Self {
            max,
            per_fill,
            interval: interval.max(Duration::from_nanos(1)),
            state: Mutex::new((max, Instant::now())),
        }
    }

    /// Takes a token if there is one. Refills by whole intervals, as Envoy's local rate limit does.
    pub fn try_acquire(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = &mut *state;
        self.refill(tokens, last, Instant::now());
        if *tokens >= 1 {
            *tokens -= 1;
            true
        } else {
            false
        }
    }

    /// Adds the tokens of the whole intervals since `last` (integer math that saturates,
    /// whatever the rate and however long the bucket sat idle) and moves `last` on by them.
    fn refill(&self, tokens: &mut u32, last: &mut Instant, now: Instant) {
        let interval = self.interval.as_nanos();
        let fills = now.saturating_duration_since(*last).as_nanos() / interval;
        if fills == 0 {
            return;
        }
        let added = fills.saturating_mul(u128::from(self.per_fill));
        let total = u128::from(*tokens).saturating_add(added).min(u128::from(self.max));
        *tokens = u32::try_from(total).unwrap_or(self.max);
        // At most the time elapsed, so it fits a `Duration` and `last` stays within `now`.
        let advance = fills.saturating_mul(interval);
        let advance = Duration::new((advance / 1_000_000_000) as u64, (advance % 1_000_000_000) as u32);
        *last = last.checked_add(advance).unwrap_or(now);
    }
}

/// Takes a token from every bucket in `buckets`, or from none. All of them are locked (in
/// address order, so two requests never wait on each other crosswise) while they are checked,
/// so a request refused by one bucket never holds another's token, even for an instant. A
/// bucket listed twice is counted once.
pub fn acquire_all<'a>(buckets: impl IntoIterator<Item = &'a Arc<TokenBucket>>) -> bool {
    let mut unique: Vec<&TokenBucket> = buckets.into_iter().map(|b| &**b).collect();
    unique.sort_by_key(|b| std::ptr::from_ref::<TokenBucket>(b) as usize);
    unique.dedup_by(|a, b| std::ptr::eq(*a, *b));
    let now = Instant::now();
    let mut states: Vec<_> =
        unique.iter().map(|b| b.state.lock().unwrap_or_else(PoisonError::into_inner)).collect();
    for (bucket, state) in unique.iter().zip(states.iter_mut()) {
        let (tokens, last) = &mut **state;
        bucket.refill(tokens, last, now);
    }
    if states.iter().any(|s| s.0 == 0) {
        return false;
    }
    for state in &mut states {
        state.0 -= 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(b: &TokenBucket) -> u32 {
        b.state.lock().unwrap_or_else(PoisonError::into_inner).0
    }

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

    #[test]
    fn several_buckets_take_a_token_from_each_or_from_none() {
        let route = Arc::new(TokenBucket::new(5, 1, Duration::from_secs(3600)));
        let service = Arc::new(TokenBucket::new(1, 1, Duration::from_secs(3600)));
        assert!(acquire_all([&route, &service]));
        assert_eq!((tokens(&route), tokens(&service)), (4, 0));
        for _ in 0..3 {
            assert!(!acquire_all([&route, &service]), "the service bucket is empty");
        }
        assert_eq!(tokens(&route), 4, "refused requests cost the route bucket nothing");
        assert!(acquire_all([&route, &route]), "one bucket listed twice");
        assert_eq!(tokens(&route), 3, "is taken from once");
        assert!(acquire_all(std::iter::empty::<&Arc<TokenBucket>>()));
    }

    #[test]
    fn refill_saturates_for_any_rate_and_idle_time() {
        let b = TokenBucket::new(u32::MAX, u32::MAX, Duration::from_nanos(1));
        let (mut tokens, mut last) = (0, Instant::now());
        let later = last + Duration::from_secs(10 * 365 * 24 * 3600);
        b.refill(&mut tokens, &mut last, later);
        assert_eq!(tokens, u32::MAX, "capped at the maximum");
        assert!(last <= later);
        let slow = TokenBucket::new(2, 1, Duration::MAX);
        let (mut tokens, mut last) = (0, Instant::now());
        slow.refill(&mut tokens, &mut last, later);
        assert_eq!(tokens, 0, "no whole interval yet");
        assert!(
            TokenBucket::from_proto(&wp::LocalRateLimit {
                max_tokens: 1,
                tokens_per_fill: 1,
                fill_interval: Some(prost_types::Duration { seconds: i64::MIN, nanos: 0 }),
            })
            .is_err()
        );
    }
}
