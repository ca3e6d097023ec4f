//! The policy routing that delivers redirected packets locally, and interface discovery, done
//! with iproute2's `ip` (present on every node; its JSON output is stable).
//!
//! A packet the tc program assigned to a ztunnel socket carries the redirect mark; the rule
//! `fwmark <mark> lookup <table>` with `local 0.0.0.0/0 dev lo` (and `local ::/0 dev lo` for
//! IPv6) in that table makes the kernel deliver it locally although its destination address is
//! not ours. Installing is idempotent and never removes a rule that is already right, so a
//! restarted ztunnel adopts the rule without a moment in which captured packets would be
//! routed away.

use std::net::IpAddr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot run `ip {args}`: {source} (iproute2 is required)")]
    Spawn { args: String, source: std::io::Error },
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("`ip {args}` printed unexpected output: {detail}")]
    Output { args: String, detail: String },
    #[error("no route to {0}: cannot find its interface")]
    NoInterface(IpAddr),
    #[error("no interface named {0}")]
    NoSuchInterface(String),
    #[error("cannot list interfaces: {0}")]
    List(nix::Error),
}

/// Runs `ip <args>`, returning stdout.
fn ip(args: &[&str]) -> Result<String, RoutingError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| RoutingError::Spawn { args: joined.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(RoutingError::Failed { args: joined, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The two address families, as `ip` flags, with the catch-all local route of each.
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

/// Installs the rules and local routes for both families: keeps one correct rule where there
/// is one, removes duplicates, adds what is missing. Returns how many stale copies it removed.
pub fn install(mark: u32, table: u32, priority: u32) -> Result<usize, RoutingError> {
    let (mark_s, table_s, priority_s) = (format!("{mark:#x}"), table.to_string(), priority.to_string());
    let mut removed = 0;
    for (family, everything) in FAMILIES {
        let n = count_family_rules(family, mark, table)?;
        for _ in 1..n {
            ip(&[family, "rule", "del", "fwmark", &mark_s, "lookup", &table_s])?;
            removed += 1;
        }
        if n == 0 {
            ip(&[family, "rule", "add", "fwmark", &mark_s, "lookup", &table_s, "priority", &priority_s])?;
        }
        ip(&[family, "route", "replace", "local", everything, "dev", "lo", "table", &table_s])?;
    }
    if removed > 0 {
        tracing::info!(removed, mark, table, "removed duplicate redirect rules");
    }
    Ok(removed)
}

/// Removes the rules and flushes the table, for both families. Idempotent. Returns how many
/// rules and routes it removed.
pub fn uninstall(mark: u32, table: u32) -> Result<(usize, usize), RoutingError> {
    let (mut rules, mut routes) = (0, 0);
    let (mark_s, table_s) = (format!("{mark:#x}"), table.to_string());
    for (family, _) in FAMILIES {
        for _ in 0..count_family_rules(family, mark, table)? {
            ip(&[family, "rule", "del", "fwmark", &mark_s, "lookup", &table_s])?;
            rules += 1;
        }
        let n = count_family_routes(family, table)?;
        if n > 0 {
            ip(&[family, "route", "flush", "table", &table_s])?;
            routes += n;
        }
    }
    Ok((rules, routes))
}

/// How many `fwmark <mark> lookup <table>` rules exist, both families together.
pub fn count_rules(mark: u32, table: u32) -> Result<usize, RoutingError> {
    Ok(count_family_rules("-4", mark, table)? + count_family_rules("-6", mark, table)?)
}

fn count_family_rules(family: &str, mark: u32, table: u32) -> Result<usize, RoutingError> {
    let args = ["-j", family, "rule", "show"];
    let text = ip(&args)?;
    let rules: Vec<serde_json::Value> =
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
            .map_err(|e| RoutingError::Output { args: args.join(" "), detail: e.to_string() })?;
    let want_mark = format!("{mark:#x}");
    let want_table = table.to_string();
    Ok(rules
        .iter()
        .filter(|r| {
            r.get("fwmark").and_then(|m| m.as_str()) == Some(want_mark.as_str())
                && r.get("table").map(|t| t.as_str().map(String::from).unwrap_or_else(|| t.to_string()))
                    == Some(want_table.clone())
        })
        .count())
}

/// Routes in `table`, both families (to check that nothing is left behind).
pub fn count_routes(table: u32) -> Result<usize, RoutingError> {
    Ok(count_family_routes("-4", table)? + count_family_routes("-6", table)?)
}

fn count_family_routes(family: &str, table: u32) -> Result<usize, RoutingError> {
    let table = table.to_string();
    let args = ["-j", family, "route", "show", "table", table.as_str()];
    let text = match ip(&args) {
        Ok(t) => t,
        Err(RoutingError::Failed { .. }) => return Ok(0),
        Err(e) => return Err(e),
    };
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
            .map_err(|e| RoutingError::Output { args: args.join(" "), detail: e.to_string() })?;
    Ok(routes.len())
}

/// The interface the host routes `ip` through (a pod's host-side veth).
pub fn interface_for(addr: IpAddr) -> Result<String, RoutingError> {
    let target = addr.to_string();
    let args = ["-j", "route", "get", target.as_str()];
    let text = ip(&args).map_err(|_| RoutingError::NoInterface(addr))?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| RoutingError::Output { args: args.join(" "), detail: e.to_string() })?;
    routes
        .first()
        .and_then(|r| r.get("dev"))
        .and_then(|d| d.as_str())
        .map(String::from)
        .ok_or(RoutingError::NoInterface(addr))
}

/// The interface (not loopback) that carries `addr` as one of its own addresses: where a
/// host's traffic to that address arrives.
pub fn interface_with_address(addr: IpAddr) -> Result<String, RoutingError> {
    let args = ["-j", "addr", "show"];
    let text = ip(&args)?;
    let links: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| RoutingError::Output { args: args.join(" "), detail: e.to_string() })?;
    let wanted = addr.to_string();
    links
        .iter()
        .filter(|l| l.get("ifname").and_then(|n| n.as_str()) != Some("lo"))
        .find(|l| {
            l.get("addr_info").and_then(|a| a.as_array()).is_some_and(|infos| {
                infos.iter().any(|i| i.get("local").and_then(|v| v.as_str()) == Some(&wanted))
            })
        })
        .and_then(|l| l.get("ifname").and_then(|n| n.as_str()).map(String::from))
        .ok_or(RoutingError::NoInterface(addr))
}

/// Every network interface of this namespace but loopback (asked over netlink, so it follows
/// the calling thread's namespace, unlike `/sys/class/net`).
pub fn interfaces() -> Result<Vec<String>, RoutingError> {
    Ok(interface_indexes()?.into_iter().map(|(name, _)| name).collect())
}

/// Every interface but loopback with its index, sorted by name: `if_nameindex(3)`, one netlink
/// dump in this process (ztunnel lists them every few seconds; an `ip` process each time cost
/// milliseconds of the CPU it shares with the pods it serves).
pub fn interface_indexes() -> Result<Vec<(String, u32)>, RoutingError> {
    let list = nix::net::if_::if_nameindex().map_err(RoutingError::List)?;
    let mut out: Vec<(String, u32)> = list
        .iter()
        .filter_map(|i| {
            let name = i.name().to_str().ok()?;
            (name != "lo").then(|| (name.to_string(), i.index()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The index of `iface`.
pub fn interface_index(iface: &str) -> Result<u32, RoutingError> {
    interface_indexes()?
        .into_iter()
        .find_map(|(name, index)| (name == iface).then_some(index))
        .ok_or_else(|| RoutingError::NoSuchInterface(iface.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The netlink listing names what iproute2 names, with the same indexes, loopback left out.
    #[test]
    fn interfaces_match_what_ip_lists() {
        let text = ip(&["-j", "link", "show"]).expect("ip runs");
        let links: Vec<serde_json::Value> = serde_json::from_str(&text).expect("json");
        let mut want: Vec<(String, u32)> = links
            .iter()
            .filter_map(|l| {
                let name = l.get("ifname")?.as_str()?.to_string();
                let index = u32::try_from(l.get("ifindex")?.as_u64()?).ok()?;
                (name != "lo").then_some((name, index))
            })
            .collect();
        want.sort();
        assert_eq!(interface_indexes().expect("listed"), want);
        assert!(!interfaces().expect("listed").iter().any(|n| n == "lo"));
    }
}
