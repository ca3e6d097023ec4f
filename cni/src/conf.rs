//! The plugin's inputs: the network configuration the runtime writes on stdin (this plugin's
//! entry of the conflist, with `cniVersion`, `name` and the previous plugin's `prevResult`
//! added) and the `CNI_*` environment, `CNI_ARGS` included.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::error::{CniError, Code};

/// The `type` of this plugin in a conflist (and its binary's name in the CNI bin dir).
pub const PLUGIN_TYPE: &str = "ambient-cni";
/// Where the node's ztunnel listens for the plugin.
pub const DEFAULT_SOCKET: &str = "/var/run/ambient/ztunnel-cni.sock";
/// Namespaces passed through without asking ztunnel.
pub const DEFAULT_EXCLUDE_NAMESPACES: [&str; 1] = ["kube-system"];
/// How long the plugin waits for ztunnel's reply (ztunnel itself waits up to 2 s for a pod
/// its watch has not seen yet).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// The CNI versions this plugin speaks (their results share one shape).
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];

/// This plugin's network configuration.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    /// The network's name.
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// ztunnel's enrollment socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Pods in these namespaces are passed through without asking ztunnel.
    #[serde(default = "default_exclude_namespaces")]
    pub exclude_namespaces: Vec<String>,
    /// How long to wait for ztunnel, in milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The result of the plugins before this one, passed on unchanged.
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_exclude_namespaces() -> Vec<String> {
    DEFAULT_EXCLUDE_NAMESPACES.iter().map(|s| s.to_string()).collect()
}

impl NetConf {
    /// Parses the configuration on stdin and checks its version is one this plugin speaks.
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(Code::Decode, "cannot decode the network configuration", e.to_string())
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                "unsupported CNI version",
                format!("{:?}; this plugin speaks {}", conf.cni_version, SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        Ok(conf)
    }

    /// How long to wait for ztunnel.
    pub fn timeout(&self) -> Duration {
        self.timeout_ms.map_or(DEFAULT_TIMEOUT, Duration::from_millis)
    }

    /// True if pods of `namespace` are passed through without asking ztunnel.
    pub fn excludes(&self, namespace: &str) -> bool {
        self.exclude_namespaces.iter().any(|n| n == namespace)
    }
}

/// `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Version,
}

impl std::str::FromStr for CniCommand {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, CniError> {
        match s {
            "ADD" => Ok(Self::Add),
            "DEL" => Ok(Self::Del),
            "CHECK" => Ok(Self::Check),
            "VERSION" => Ok(Self::Version),
            other => Err(CniError::new(
                Code::InvalidEnvironment,
                "unknown CNI_COMMAND",
                format!("{other:?} (ADD, DEL, CHECK or VERSION)"),
            )),
        }
    }
}

/// The Kubernetes facts the runtime passes in `CNI_ARGS` (`K=V;K=V`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

impl PodArgs {
    /// Parses `CNI_ARGS`; keys other than the pod's are ignored, a pair without `=` is an error.
    pub fn parse(args: &str) -> Result<Self, CniError> {
        let mut out = Self::default();
        for pair in args.split(';').filter(|p| !p.is_empty()) {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(CniError::new(
                    Code::InvalidEnvironment,
                    "malformed CNI_ARGS",
                    format!("{pair:?} is not KEY=VALUE"),
                ));
            };
            let value = (!value.is_empty()).then(|| value.to_string());
            match key {
                "K8S_POD_NAMESPACE" => out.namespace = value,
                "K8S_POD_NAME" => out.name = value,
                "K8S_POD_UID" => out.uid = value,
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Everything the environment says about one invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    pub command: CniCommand,
    pub container_id: String,
    /// `CNI_NETNS` (a path); DEL may come without one.
    pub netns: Option<String>,
    pub ifname: String,
    pub pod: PodArgs,
}

impl Invocation {
    /// Reads the `CNI_*` variables through `env`, requiring what the command needs.
    pub fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let get = |key: &str| env(key).filter(|v| !v.is_empty());
        let command: CniCommand = get("CNI_COMMAND")
            .ok_or_else(|| CniError::new(Code::InvalidEnvironment, "CNI_COMMAND is not set", ""))?
            .parse()?;
        let required = |key: &str| {
            get(key).ok_or_else(|| {
                CniError::new(
                    Code::InvalidEnvironment,
                    format!("{key} is not set"),
                    "required for this command",
                )
            })
        };
        let pod = PodArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
        match command {
            CniCommand::Version => {
                Ok(Self { command, container_id: String::new(), netns: None, ifname: String::new(), pod })
            }
            CniCommand::Del => Ok(Self {
                command,
                container_id: required("CNI_CONTAINERID")?,
                netns: get("CNI_NETNS"),
                ifname: get("CNI_IFNAME").unwrap_or_default(),
                pod,
            }),
            CniCommand::Add | CniCommand::Check => Ok(Self {
                command,
                container_id: required("CNI_CONTAINERID")?,
                netns: Some(required("CNI_NETNS")?),
                ifname: required("CNI_IFNAME")?,
                pod,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn config_defaults_and_prev_result() {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"k8s","type":"ambient-cni"}"#).expect("parses");
        assert_eq!(conf.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(conf.exclude_namespaces, vec!["kube-system".to_string()]);
        assert_eq!(conf.timeout(), DEFAULT_TIMEOUT);
        assert!(conf.prev_result.is_none());
        assert!(conf.excludes("kube-system") && !conf.excludes("demo"));

        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"k8s","type":"ambient-cni","socket":"/run/z.sock",
                "exclude_namespaces":[],"timeout_ms":250,"unknown":true,
                "prevResult":{"cniVersion":"0.4.0","ips":[{"address":"10.0.0.2/24"}]}}"#,
        )
        .expect("parses");
        assert_eq!(conf.socket, PathBuf::from("/run/z.sock"));
        assert!(!conf.excludes("kube-system"), "an empty list excludes nothing");
        assert_eq!(conf.timeout(), Duration::from_millis(250));
        assert_eq!(conf.prev_result.expect("prevResult")["ips"][0]["address"], "10.0.0.2/24");
    }

    #[test]
    fn bad_config_is_a_cni_error() {
        let e = NetConf::parse(b"{").expect_err("truncated");
        assert_eq!(e.code, Code::Decode);
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","type":"ambient-cni"}"#).expect_err("version");
        assert_eq!(e.code, Code::IncompatibleVersion);
        let e = NetConf::parse(br#"{"cniVersion":"1.0.0","exclude_namespaces":"kube-system"}"#)
            .expect_err("wrong type");
        assert_eq!(e.code, Code::Decode);
    }

    #[test]
    fn cni_args() {
        let args =
            PodArgs::parse("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a-1;K8S_POD_INFRA_CONTAINER_ID=c;K8S_POD_UID=u-1")
                .expect("parses");
        assert_eq!(
            args,
            PodArgs { namespace: Some("demo".into()), name: Some("a-1".into()), uid: Some("u-1".into()) }
        );
        assert_eq!(PodArgs::parse("").expect("empty"), PodArgs::default());
        assert_eq!(PodArgs::parse("K8S_POD_NAME=;").expect("empty value"), PodArgs::default());
        assert_eq!(PodArgs::parse("K8S_POD_NAME").expect_err("no =").code, Code::InvalidEnvironment);
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn environment_per_command() {
        let add = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/p"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a"),
            ("CNI_PATH", "/opt/cni/bin"),
        ];
        let inv = Invocation::from_env(env(&add)).expect("add");
        assert_eq!(inv.command, CniCommand::Add);
        assert_eq!(inv.netns.as_deref(), Some("/var/run/netns/p"));
        assert_eq!(inv.pod.name.as_deref(), Some("a"));
        // ADD and CHECK need the netns; DEL does not.
        let no_netns: Vec<_> = add.iter().copied().filter(|(k, _)| *k != "CNI_NETNS").collect();
        assert_eq!(Invocation::from_env(env(&no_netns)).expect_err("add").code, Code::InvalidEnvironment);
        let mut del = no_netns.clone();
        del[0] = ("CNI_COMMAND", "DEL");
        assert_eq!(Invocation::from_env(env(&del)).expect("del").netns, None);
        assert_eq!(
            Invocation::from_env(env(&[("CNI_COMMAND", "VERSION")])).expect("version").command,
            CniCommand::Version
        );
        assert_eq!(Invocation::from_env(env(&[])).expect_err("none").code, Code::InvalidEnvironment);
        assert_eq!(
            Invocation::from_env(env(&[("CNI_COMMAND", "GC")])).expect_err("gc").code,
            Code::InvalidEnvironment
        );
    }
}
