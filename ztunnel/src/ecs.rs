//! ECS tasks (awsvpc network mode): ztunnel runs as a container of the task, in the task's
//! network namespace, and the task's own addresses are the host addresses of host mode. They
//! come from the task metadata endpoint the ECS agent gives every container
//! (`$ECS_CONTAINER_METADATA_URI_V4/task`): the `IPv4Addresses` and `IPv6Addresses` of the
//! task's awsvpc network, which all its containers share.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

/// The variable the ECS agent sets in every container of a task.
pub const METADATA_ENV: &str = "ECS_CONTAINER_METADATA_URI_V4";
/// How long the metadata endpoint may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest task metadata document read.
const MAX_BYTES: usize = 1 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Task {
    #[serde(rename = "TaskARN", default)]
    task_arn: String,
    #[serde(default)]
    containers: Vec<Container>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Container {
    #[serde(default)]
    networks: Vec<Network>,
}

#[derive(Debug, Deserialize)]
struct Network {
    #[serde(rename = "NetworkMode", default)]
    mode: String,
    #[serde(rename = "IPv4Addresses", default)]
    ipv4: Vec<String>,
    #[serde(rename = "IPv6Addresses", default)]
    ipv6: Vec<String>,
}

/// The task's ARN and its awsvpc addresses, from a task metadata (v4) document.
pub fn task_addresses(document: &[u8]) -> Result<(String, Vec<IpAddr>), String> {
    let task: Task = serde_json::from_slice(document).map_err(|e| format!("task metadata: {e}"))?;
    let mut addresses = Vec::new();
    for network in task.containers.iter().flat_map(|c| &c.networks).filter(|n| n.mode == "awsvpc") {
        for a in network.ipv4.iter().chain(&network.ipv6) {
            let ip: IpAddr = a.parse().map_err(|e| format!("task metadata address {a:?}: {e}"))?;
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
        }
    }
    if addresses.is_empty() {
        return Err("task metadata names no awsvpc address (host mode needs the task's own network)".into());
    }
    Ok((task.task_arn, addresses))
}

/// The task's id, the last part of its ARN, when it is a plain token (letters, digits, `-`).
pub fn task_id(arn: &str) -> Option<&str> {
    let id = arn.rsplit('/').next()?;
    (!id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .then_some(id)
}

/// Reads the task's addresses from the metadata endpoint named by [`METADATA_ENV`].
pub async fn fetch_task_addresses(base: &str) -> Result<(String, Vec<IpAddr>), String> {
    let uri = format!("{}/task", base.trim_end_matches('/'));
    let body = common::fetch::get(&uri, FETCH_TIMEOUT, MAX_BYTES).await.map_err(|e| format!("{uri}: {e}"))?;
    task_addresses(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like the task metadata v4 document AWS documents for an awsvpc task.
    const TASK: &str = r#"{
      "Cluster": "arn:aws:ecs:us-west-2:111122223333:cluster/default",
      "TaskARN": "arn:aws:ecs:us-west-2:111122223333:task/default/158d1c8083dd49d6b527399fd6414f5c",
      "Family": "shop", "Revision": "3", "LaunchType": "FARGATE",
      "Containers": [
        {"Name": "app", "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2.106"],
          "IPv6Addresses": ["2600:1f14:aaaa:bbbb::1"], "AttachmentIndex": 0,
          "MACAddress": "0e:9e:32:c7:48:85", "IPv4SubnetCIDRBlock": "10.0.2.0/24"}]},
        {"Name": "ztunnel", "Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2.106"]}]}
      ]
    }"#;

    #[test]
    fn the_tasks_awsvpc_addresses_once_each() {
        let (arn, addrs) = task_addresses(TASK.as_bytes()).expect("parsed");
        assert!(arn.ends_with("/158d1c8083dd49d6b527399fd6414f5c"));
        assert_eq!(task_id(&arn), Some("158d1c8083dd49d6b527399fd6414f5c"));
        assert_eq!(task_id("arn:aws:ecs:r:1:task/c/../x y"), None);
        let want: Vec<IpAddr> =
            vec!["10.0.2.106".parse().expect("ip"), "2600:1f14:aaaa:bbbb::1".parse().expect("ip")];
        assert_eq!(addrs, want);
    }

    #[test]
    fn a_task_without_its_own_network_is_refused() {
        let bridge = r#"{"TaskARN": "t", "Containers": [{"Networks": [{"NetworkMode": "bridge", "IPv4Addresses": ["172.17.0.2"]}]}]}"#;
        assert!(task_addresses(bridge.as_bytes()).is_err());
        assert!(task_addresses(b"not json").is_err());
        let bad =
            r#"{"Containers": [{"Networks": [{"NetworkMode": "awsvpc", "IPv4Addresses": ["10.0.2"]}]}]}"#;
        assert!(task_addresses(bad.as_bytes()).is_err());
    }
}
