//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, parsed and printed strictly.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// The default trust domain of an Istio mesh.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";

/// A workload's SPIFFE identity. Only the Istio form is accepted: a trust domain, then exactly
/// `ns/<namespace>/sa/<service-account>`. Cheap to clone (shared), as it is copied into pool
/// keys, connection records and errors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("{0:?} is not spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    Shape(String),
    #[error("{input:?} has an invalid {part}: {value:?}")]
    Part { input: String, part: &'static str, value: String },
}

/// Trust domains: lowercase letters, digits, `.`, `-`, `_` (SPIFFE), non-empty, max 255.
fn valid_trust_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// Namespace and service-account names: Kubernetes DNS labels/subdomains (lowercase
/// alphanumerics, `-` and `.`, starting and ending alphanumeric), max 253.
fn valid_name(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| alnum(b) || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum)
}

impl Identity {
    /// Builds an identity, validating every part.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, IdentityError> {
        let input = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        let check = |ok: bool, part: &'static str, value: &str| {
            if ok {
                Ok(())
            } else {
                Err(IdentityError::Part { input: input.clone(), part, value: value.into() })
            }
        };
        check(valid_trust_domain(trust_domain), "trust domain", trust_domain)?;
        check(valid_name(namespace), "namespace", namespace)?;
        check(valid_name(service_account), "service account", service_account)?;
        Ok(Self(Arc::new(Parts {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        })))
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.0.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.0.service_account
    }

    /// The form policies match: without the `spiffe://` prefix
    /// (`cluster.local/ns/default/sa/client`).
    pub fn principal(&self) -> String {
        let p = &self.0;
        format!("{}/ns/{}/sa/{}", p.trust_domain, p.namespace, p.service_account)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| IdentityError::Scheme(s.into()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Identity::new(td, ns, sa).map_err(|e| match e {
                IdentityError::Part { part, value, .. } => {
                    IdentityError::Part { input: s.into(), part, value }
                }
                other => other,
            }),
            _ => Err(IdentityError::Shape(s.into())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.0;
        // Piece by piece (`write!` with arguments cost twice as much): written twice in every
        // access line. Like the `write!` it replaces, it ignores width and precision.
        for part in [SCHEME, &p.trust_domain, "/ns/", &p.namespace, "/sa/", &p.service_account] {
            f.write_str(part)?;
        }
        Ok(())
    }
}

impl serde::Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_istio_form() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/client".parse().expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "client");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/client");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/client");
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "cluster.local/ns/default/sa/client",
            "SPIFFE://cluster.local/ns/default/sa/client",
            "spiffe://cluster.local/ns/default/sa/client/",
            "spiffe://cluster.local/ns/default/sa/",
            "spiffe://cluster.local/ns//sa/client",
            "spiffe:///ns/default/sa/client",
            "spiffe://cluster.local/namespace/default/sa/client",
            "spiffe://cluster.local/ns/default/serviceaccount/client",
            "spiffe://cluster.local/ns/default/sa/client/extra",
            "spiffe://Cluster.Local/ns/default/sa/client",
            "spiffe://cluster.local/ns/Default/sa/client",
            "spiffe://cluster.local/ns/default/sa/-client",
            "spiffe://cluster.local/ns/default/sa/cli ent",
            "spiffe://cluster.local:8080/ns/default/sa/client",
            "spiffe://cluster.local/ns/default/sa/client?x=1",
            "spiffe://cluster.local/ns/default/sa/client#frag",
            "spiffe://cluster.local/ns/../sa/client",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn print_then_parse_is_identity() {
        let names = ["a", "default", "kube-system", "x.y", "a1-b2", "istio-system"];
        let domains = ["cluster.local", "example.org", "td_1", "a-b.c"];
        for td in domains {
            for ns in names {
                for sa in names {
                    let id = Identity::new(td, ns, sa).expect("valid parts");
                    assert_eq!(id.to_string().parse::<Identity>(), Ok(id.clone()));
                }
            }
        }
    }
}
