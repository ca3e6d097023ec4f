//! Reading the previous plugins' result (`prevResult`): the pod's addresses and the host side
//! of its veth. Only the fields needed are read; the result itself is passed on untouched.

use std::net::IpAddr;

use serde::Deserialize;

use crate::error::{CniError, Code};

/// The parts of a CNI result (0.3.0 to 1.0.0 share them) this plugin reads.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct PrevResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    /// Set (the netns path) on interfaces inside the container.
    #[serde(default)]
    pub sandbox: Option<String>,
}

impl Interface {
    fn in_sandbox(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct IpConfig {
    /// `ip/prefix`.
    pub address: String,
    /// Index into `interfaces` of the interface holding the address.
    #[serde(default)]
    pub interface: Option<usize>,
}

impl PrevResult {
    pub fn parse(value: &serde_json::Value) -> Result<Self, CniError> {
        serde_json::from_value(value.clone())
            .map_err(|e| CniError::new(Code::Decode, "cannot decode prevResult", e.to_string()))
    }

    /// The pod's addresses, in result order without repeats: those on the container interface
    /// `ifname`, or else on any interface inside the sandbox. Addresses not tied to an
    /// interface (older plugins) count as the pod's; those on host-side interfaces do not.
    pub fn pod_ips(&self, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let on = |pred: &dyn Fn(&Interface) -> bool| -> Result<Vec<IpAddr>, CniError> {
            let mut out = Vec::new();
            for ip in &self.ips {
                let ours = match ip.interface {
                    None => true,
                    Some(i) => self.interfaces.get(i).is_some_and(pred),
                };
                if ours {
                    let addr = parse_cidr_address(&ip.address)?;
                    if !out.contains(&addr) {
                        out.push(addr);
                    }
                }
            }
            Ok(out)
        };
        let named = on(&|i: &Interface| i.in_sandbox() && i.name == ifname)?;
        if !named.is_empty() {
            return Ok(named);
        }
        on(&|i: &Interface| i.in_sandbox())
    }

    /// The host side of the pod's veth when the result names exactly one interface outside
    /// the sandbox; `None` when it names none or several (a bridge and its port, say).
    pub fn host_interface(&self) -> Option<&str> {
        let mut host = self.interfaces.iter().filter(|i| !i.in_sandbox() && !i.name.is_empty());
        match (host.next(), host.next()) {
            (Some(only), None) => Some(only.name.as_str()),
            _ => None,
        }
    }
}

/// `10.1.1.2/24` -> `10.1.1.2` (a bare address is accepted too).
fn parse_cidr_address(cidr: &str) -> Result<IpAddr, CniError> {
    let addr = cidr.split_once('/').map_or(cidr, |(a, _)| a);
    addr.parse()
        .map_err(|e| CniError::new(Code::Decode, "bad address in prevResult", format!("{cidr:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> PrevResult {
        PrevResult::parse(&serde_json::from_str(json).expect("json")).expect("result")
    }

    #[test]
    fn ptp_result() {
        // What Debian's ptp + host-local print (1.0.0).
        let r = parse(
            r#"{"cniVersion":"1.0.0",
                "interfaces":[{"name":"vethe9cbd4cb","mac":"de:82:b9:49:e1:38"},
                              {"name":"eth0","mac":"a2:d0:6e:8c:b0:5c","sandbox":"/run/netns/p"}],
                "ips":[{"interface":1,"address":"10.77.0.2/24","gateway":"10.77.0.1"},
                       {"interface":1,"address":"fd00:77::2/64","gateway":"fd00:77::1"}],
                "dns":{}}"#,
        );
        assert_eq!(
            r.pod_ips("eth0").expect("ips"),
            vec!["10.77.0.2".parse::<IpAddr>().expect("ip"), "fd00:77::2".parse().expect("ip")]
        );
        assert_eq!(r.host_interface(), Some("vethe9cbd4cb"));
    }

    #[test]
    fn bridge_result_is_ambiguous_about_the_host_side() {
        let r = parse(
            r#"{"interfaces":[{"name":"cni0"},{"name":"veth1"},{"name":"eth0","sandbox":"/run/netns/p"}],
                "ips":[{"interface":2,"address":"10.88.0.5/16"},{"interface":0,"address":"10.88.0.1/16"}]}"#,
        );
        assert_eq!(r.pod_ips("eth0").expect("ips"), vec!["10.88.0.5".parse::<IpAddr>().expect("ip")]);
        assert_eq!(r.host_interface(), None, "bridge and port: the plugin asks the kernel instead");
    }

    #[test]
    fn addresses_without_interface_and_other_ifnames() {
        let r = parse(r#"{"ips":[{"address":"10.0.0.2/32"},{"address":"10.0.0.2/32"}]}"#);
        assert_eq!(r.pod_ips("eth0").expect("ips"), vec!["10.0.0.2".parse::<IpAddr>().expect("ip")]);
        assert_eq!(r.host_interface(), None);
        // The runtime's ifname is net1 but the sandbox interface is eth0: still the pod's.
        let r = parse(
            r#"{"interfaces":[{"name":"eth0","sandbox":"/p"}],"ips":[{"interface":0,"address":"10.0.0.3/24"}]}"#,
        );
        assert_eq!(r.pod_ips("net1").expect("ips"), vec!["10.0.0.3".parse::<IpAddr>().expect("ip")]);
        // An index out of range ties the address to nothing of the pod's.
        let r = parse(r#"{"interfaces":[],"ips":[{"interface":4,"address":"10.0.0.4/24"}]}"#);
        assert!(r.pod_ips("eth0").expect("ips").is_empty());
    }

    #[test]
    fn malformed_results() {
        let bad = serde_json::json!({"ips":[{"address":"ten.zero/8"}]});
        let r = PrevResult::parse(&bad).expect("shape is fine");
        assert_eq!(r.pod_ips("eth0").expect_err("address").code, Code::Decode);
        let bad = serde_json::json!({"interfaces":"eth0"});
        assert_eq!(PrevResult::parse(&bad).expect_err("shape").code, Code::Decode);
    }
}
