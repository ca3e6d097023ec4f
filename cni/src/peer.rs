//! The host side of a pod's veth, asked of the kernel when `prevResult` does not say: the
//! container interface's peer index (`link_index`, read inside the pod's namespace with
//! `nsenter` + `ip`), matched against the interfaces of the namespace the plugin runs in (the
//! host's), whose own peer must be the container interface.

use std::process::Command;

/// One interface as `ip -j link show` lists it.
#[derive(Debug, serde::Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    link_index: Option<u32>,
}

fn links(output: &[u8]) -> Result<Vec<Link>, String> {
    serde_json::from_slice(output).map_err(|e| format!("cannot read `ip -j link` output: {e}"))
}

fn run(program: &str, args: &[&str]) -> Result<Vec<u8>, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// The name, in this namespace, of the peer of `ifname` inside the namespace at `netns`.
pub fn host_peer(netns: &str, ifname: &str) -> Result<String, String> {
    if !netns.starts_with('/') {
        return Err(format!("CNI_NETNS {netns:?} is not an absolute path"));
    }
    let net = format!("--net={netns}");
    let inside = links(&run("nsenter", &[&net, "ip", "-j", "link", "show", "dev", ifname])?)?;
    let container = inside.first().ok_or_else(|| format!("{ifname} not found in {netns}"))?;
    let peer_index =
        container.link_index.ok_or_else(|| format!("{ifname} in {netns} has no peer (not a veth?)"))?;
    let host = links(&run("ip", &["-j", "link", "show"])?)?;
    pick_peer(&host, peer_index, container.ifindex)
        .ok_or_else(|| format!("no interface here with index {peer_index} paired with {ifname} of {netns}"))
}

/// The interface numbered `peer_index` whose own peer is `container_index`.
fn pick_peer(host: &[Link], peer_index: u32, container_index: u32) -> Option<String> {
    host.iter()
        .find(|l| l.ifindex == peer_index && l.link_index == Some(container_index))
        .map(|l| l.ifname.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_must_point_back() {
        let host = links(
            br#"[{"ifindex":1,"ifname":"lo"},
                 {"ifindex":2,"link_index":2,"ifname":"vethe9cbd4cb","link_netnsid":0},
                 {"ifindex":3,"link_index":7,"ifname":"veth-other","link_netnsid":1}]"#,
        )
        .expect("links");
        assert_eq!(pick_peer(&host, 2, 2).as_deref(), Some("vethe9cbd4cb"));
        assert_eq!(pick_peer(&host, 3, 2), None, "index 3 pairs with another namespace's 7");
        assert_eq!(pick_peer(&host, 9, 2), None);
    }

    #[test]
    fn relative_netns_is_refused() {
        assert!(host_peer("netns/p", "eth0").expect_err("relative").contains("absolute"));
    }
}
