//! Fault injection with Istio VirtualService semantics: a fixed delay and/or an abort, each on a
//! percentage of requests. A delayed request carries flag `DI`, an aborted one `FI`.

use std::time::Duration;

use proto::waypoint as wp;
use rand::Rng;

use crate::convert::duration_from_proto;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<(u16, f64)>,
}

/// A share of requests: within 0..=100 (NaN is not).
fn percentage(p: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&p) { Ok(p) } else { Err(format!("percentage {p} is not within 0..=100")) }
}

impl Fault {
    pub fn from_proto(f: &wp::Fault) -> Result<Self, String> {
        let delay = match &f.delay {
            None => None,
            Some(d) => {
                let fixed = d
                    .fixed_delay
                    .map(|d| duration_from_proto(d, "fixedDelay"))
                    .transpose()?
                    .ok_or("delay needs a fixed delay")?;
                Some((fixed, percentage(d.percentage)?))
            }
        };
        let abort = match &f.abort {
            None => None,
            Some(a) => {
                let status = u16::try_from(a.http_status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or_else(|| format!("abort status {} is not an HTTP status", a.http_status))?;
                Some((status, percentage(a.percentage)?))
            }
        };
        Ok(Self { delay, abort })
    }

    /// Whether this request is delayed, and by how much.
    pub fn delay(&self) -> Option<Duration> {
        self.delay.filter(|(_, p)| hit(*p)).map(|(d, _)| d)
    }

    /// Whether this request is aborted, and with which status.
    pub fn abort(&self) -> Option<u16> {
        self.abort.filter(|(_, p)| hit(*p)).map(|(s, _)| s)
    }
}

fn hit(percentage: f64) -> bool {
    rand::rng().random_range(0.0..100.0) < percentage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_hold_and_bad_values_are_refused() {
        let f = Fault { delay: None, abort: Some((503, 25.0)) };
        let aborted = (0..10_000).filter(|_| f.abort().is_some()).count();
        assert!((2200..2800).contains(&aborted), "{aborted}");
        let never = Fault { delay: Some((Duration::from_millis(1), 0.0)), abort: None };
        assert!((0..1000).all(|_| never.delay().is_none()));
        let bad =
            wp::Fault { delay: None, abort: Some(wp::fault::Abort { http_status: 42, percentage: 10.0 }) };
        assert!(Fault::from_proto(&bad).is_err());
        let over =
            wp::Fault { delay: None, abort: Some(wp::fault::Abort { http_status: 503, percentage: 150.0 }) };
        assert!(Fault::from_proto(&over).is_err());
    }

    #[test]
    fn hostile_delays_and_percentages_are_refused_not_a_panic() {
        let delay = |seconds: i64, nanos: i32, percentage: f64| wp::Fault {
            delay: Some(wp::fault::Delay {
                fixed_delay: Some(prost_types::Duration { seconds, nanos }),
                percentage,
            }),
            abort: None,
        };
        for (s, n) in [(i64::MIN, 0), (i64::MIN, -1), (-1, 0), (i64::MAX, i32::MAX)] {
            assert!(Fault::from_proto(&delay(s, n, 50.0)).is_err(), "{s}s {n}ns");
        }
        for p in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5, 100.5] {
            assert!(Fault::from_proto(&delay(1, 0, p)).is_err(), "{p}");
        }
        let ok = Fault::from_proto(&delay(0, 5_000_000, 100.0)).expect("fault");
        assert_eq!(ok.delay(), Some(Duration::from_millis(5)));
    }
}
