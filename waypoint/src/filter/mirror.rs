//! Request mirroring: a copy of a percentage of requests goes to another service, fire and
//! forget (its answer is read and dropped, its failure only logged). The copy's authority gets
//! `-shadow` appended, as Istio does, so the mirror can tell copies from real traffic.

use proto::waypoint as wp;
use rand::Rng;

use crate::route::ServiceRef;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Mirror {
    pub service: ServiceRef,
    pub percentage: f64,
}

impl Mirror {
    pub fn from_proto(m: &wp::Mirror) -> Result<Self, String> {
        let s = m.service.as_ref().ok_or("mirror needs a service")?;
        if s.namespace.is_empty() || s.hostname.is_empty() {
            return Err("mirror service needs a namespace and a hostname".into());
        }
        if !(0.0..=100.0).contains(&m.percentage) {
            return Err(format!("mirror percentage {} is not within 0..=100", m.percentage));
        }
        let port = u16::try_from(s.port).map_err(|_| format!("mirror port {}", s.port))?;
        Ok(Self {
            service: ServiceRef { namespace: s.namespace.clone(), hostname: s.hostname.clone(), port },
            percentage: m.percentage,
        })
    }

    /// Whether this request is copied.
    pub fn hit(&self) -> bool {
        rand::rng().random_range(0.0..100.0) < self.percentage
    }
}

/// `host[:port]` -> `host-shadow[:port]`.
pub fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_authorities() {
        assert_eq!(shadow_authority("echo.demo:80"), "echo.demo-shadow:80");
        assert_eq!(shadow_authority("echo"), "echo-shadow");
        let m = wp::Mirror { service: None, percentage: 10.0 };
        assert!(Mirror::from_proto(&m).is_err());
    }
}
