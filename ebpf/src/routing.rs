//! The policy routing that delivers redirected packets locally, and interface discovery, done
//! with iproute2's `ip` (present on every node; its JSON output is stable).
//!
//! A packet the tc program assigned to a ztunnel socket carries the redirect mark; the rule
//! `fwmark <mark> lookup <table>` with `local 0.0.0.0/0 dev lo` in that table makes the kernel
//! deliver it locally although its destination address is not ours.

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

/// Installs the rule and the local route, first removing any copies a previous run left.
pub fn install(mark: u32, table: u32, priority: u32) -> Result<(), RoutingError> {
    let stale = remove_rules(mark, table)?;
    if stale > 0 {
        tracing::info!(stale, mark, table, "removed stale redirect rules left by a previous run");
    }
    let (mark, table, priority) = (format!("{mark:#x}"), table.to_string(), priority.to_string());
    ip(&["-4", "rule", "add", "fwmark", &mark, "lookup", &table, "priority", &priority])?;
    ip(&["-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
    Ok(())
}

/// Removes the rule(s) and flushes the table. Idempotent.
pub fn uninstall(mark: u32, table: u32) -> Result<(), RoutingError> {
    remove_rules(mark, table)?;
    match ip(&["-4", "route", "flush", "table", &table.to_string()]) {
        Ok(_) => Ok(()),
        // An empty or unknown table is already clean.
        Err(RoutingError::Failed { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes every `fwmark <mark> lookup <table>` rule; returns how many there were.
fn remove_rules(mark: u32, table: u32) -> Result<usize, RoutingError> {
    let n = count_rules(mark, table)?;
    let (mark, table) = (format!("{mark:#x}"), table.to_string());
    for _ in 0..n {
        ip(&["-4", "rule", "del", "fwmark", &mark, "lookup", &table])?;
    }
    Ok(n)
}

/// How many `fwmark <mark> lookup <table>` rules exist.
pub fn count_rules(mark: u32, table: u32) -> Result<usize, RoutingError> {
    let args = ["-j", "-4", "rule", "show"];
    let text = ip(&args)?;
    let rules: Vec<serde_json::Value> = serde_json::from_str(&text)
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

/// Routes in `table` (to check that nothing is left behind).
pub fn count_routes(table: u32) -> Result<usize, RoutingError> {
    let table = table.to_string();
    let args = ["-j", "-4", "route", "show", "table", table.as_str()];
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

/// Every network interface of this namespace but loopback (asked over netlink, so it follows
/// the calling thread's namespace, unlike `/sys/class/net`).
pub fn interfaces() -> Result<Vec<String>, RoutingError> {
    let args = ["-j", "link", "show"];
    let text = ip(&args)?;
    let links: Vec<serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| RoutingError::Output { args: args.join(" "), detail: e.to_string() })?;
    let mut names: Vec<String> = links
        .iter()
        .filter_map(|l| l.get("ifname").and_then(|n| n.as_str()))
        .filter(|n| *n != "lo")
        .map(String::from)
        .collect();
    names.sort();
    Ok(names)
}
