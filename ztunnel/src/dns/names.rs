//! Which names the DNS proxy answers itself, and with what: the mesh's service hostnames (by
//! FQDN, and by the short forms a pod's search domains make of them), ServiceEntry hosts
//! (wildcards included), headless services (their endpoints' addresses). Anything else is not
//! ours and goes upstream: no answer is invented.

use std::net::IpAddr;
use std::sync::Arc;

use common::state::{Service, Snapshot};

/// The addresses a name of the mesh resolves to (both families; the query type picks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The service's hostname the name matched.
    pub hostname: String,
    pub addresses: Vec<IpAddr>,
}

/// The names `qname` stands for, most specific first, for a client in namespace `ns` (if
/// known) in a cluster whose domain is `domain`: the name itself, then what the Kubernetes
/// search path makes of it (`name` -> `name.<ns>.svc.<domain>`, `name.other` ->
/// `name.other.svc.<domain>`, `name.other.svc` -> `name.other.svc.<domain>`), also when the
/// client's resolver already appended its own search domain to a short form.
pub fn candidates(qname: &str, ns: Option<&str>, domain: &str) -> Vec<String> {
    let mut out = vec![qname.to_string()];
    let mut push = |c: String| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    // A short form with one of the pod's search domains appended by its resolver.
    let mut bases = vec![qname];
    if let Some(ns) = ns
        && let Some(base) = qname.strip_suffix(&format!(".{ns}.svc.{domain}"))
    {
        bases.push(base);
    }
    if let Some(base) = qname.strip_suffix(&format!(".svc.{domain}")) {
        bases.push(base);
    }
    if let Some(base) = qname.strip_suffix(&format!(".{domain}")) {
        bases.push(base);
    }
    for base in bases {
        let labels: Vec<&str> = base.split('.').collect();
        match labels.as_slice() {
            [name] => {
                if let Some(ns) = ns {
                    push(format!("{name}.{ns}.svc.{domain}"));
                }
            }
            [name, other] => push(format!("{name}.{other}.svc.{domain}")),
            [name, other, "svc"] => push(format!("{name}.{other}.svc.{domain}")),
            _ => {}
        }
    }
    out
}

/// The wildcard hosts that would cover `name`, most specific first (`a.b.c` -> `*.b.c`, `*.c`).
fn wildcards(name: &str) -> impl Iterator<Item = String> + '_ {
    name.match_indices('.').map(|(i, _)| format!("*{}", &name[i..]))
}

/// What `qname` (lower case, without the trailing dot) resolves to for a client in namespace
/// `ns`, or `None` when it is not a name of the mesh (or one without any address to give).
pub fn lookup(snapshot: &Snapshot, qname: &str, ns: Option<&str>, domain: &str) -> Option<Found> {
    for candidate in candidates(qname, ns, domain) {
        let exact = std::iter::once(candidate.clone());
        for host in exact.chain(wildcards(&candidate)) {
            let Some(service) = pick(snapshot, &host, ns) else { continue };
            let addresses = addresses(snapshot, &service);
            if !addresses.is_empty() {
                return Some(Found { hostname: host, addresses });
            }
        }
    }
    None
}

/// Among the services with `host` (one per namespace that declares it), the client's
/// namespace's, else the first by `namespace/hostname`.
fn pick(snapshot: &Snapshot, host: &str, ns: Option<&str>) -> Option<Arc<Service>> {
    let mut all = snapshot.services_by_host(host);
    let first = all.next()?;
    if ns.is_none_or(|ns| first.namespace == ns) {
        return Some(first.clone());
    }
    let mine = all.find(|s| ns.is_some_and(|ns| s.namespace == ns));
    Some(mine.unwrap_or(first).clone())
}

/// A service's addresses on our network: its VIPs, or for a headless service (no VIP) the
/// addresses of its healthy endpoints.
fn addresses(snapshot: &Snapshot, service: &Service) -> Vec<IpAddr> {
    let network = snapshot.network();
    let vips: Vec<IpAddr> = service.vips.iter().filter(|(n, _)| n == network).map(|(_, ip)| *ip).collect();
    if !vips.is_empty() || !service.vips.is_empty() {
        return vips;
    }
    let mut ips: Vec<IpAddr> = snapshot
        .endpoints(service)
        .iter()
        .filter(|e| e.workload.healthy && e.workload.network == network)
        .flat_map(|e| e.workload.addresses.iter().copied())
        .collect();
    ips.sort();
    ips.dedup();
    ips
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_forms_expand_along_the_search_path() {
        let c = |q: &str| candidates(q, Some("demo"), "cluster.local");
        assert_eq!(c("web"), ["web", "web.demo.svc.cluster.local"]);
        assert_eq!(c("web.shop"), ["web.shop", "web.shop.svc.cluster.local"]);
        assert_eq!(c("web.shop.svc"), ["web.shop.svc", "web.shop.svc.cluster.local"]);
        assert_eq!(c("web.demo.svc.cluster.local"), ["web.demo.svc.cluster.local"]);
        // The resolver appended the pod's own search domain to `web.shop`.
        assert_eq!(
            c("web.shop.demo.svc.cluster.local"),
            ["web.shop.demo.svc.cluster.local", "web.shop.svc.cluster.local"]
        );
        // Without a known namespace a bare name stands only for itself.
        assert_eq!(candidates("web", None, "cluster.local"), ["web"]);
        assert_eq!(
            wildcards("a.b.example.com").collect::<Vec<_>>(),
            ["*.b.example.com", "*.example.com", "*.com"]
        );
    }
}
