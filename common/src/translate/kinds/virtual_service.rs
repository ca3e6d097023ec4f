//! Istio `networking.istio.io` VirtualService: the HTTP subset waypoints apply (routes with
//! matches, destinations, header changes, redirect, rewrite, timeout, retries, fault, mirror).
//! `tcp`, `tls`, `gateways`, subsets and delegation are refused with the field's name.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::IgnoredAny;

pub use super::istio::PortSelector;

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Option<serde_json::Value>,
    #[serde(default)]
    pub tls: Option<serde_json::Value>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<Destination>,
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub rewrite: Option<Rewrite>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub retries: Option<Retries>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub mirror: Option<DestinationRef>,
    #[serde(default)]
    pub mirrors: Vec<MirrorPolicy>,
    #[serde(default)]
    pub mirror_percentage: Option<Percent>,
    #[serde(default)]
    pub headers: Option<Headers>,
    #[serde(default)]
    pub delegate: Option<serde_json::Value>,
    #[serde(default)]
    pub direct_response: Option<serde_json::Value>,
    #[serde(default)]
    pub cors_policy: Option<serde_json::Value>,
}

/// Istio's StringMatch: exactly one of exact, prefix, regex.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uri: Option<StringMatch>,
    #[serde(default)]
    pub method: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub ignore_uri_case: Option<bool>,
    #[serde(default)]
    pub without_headers: Option<serde_json::Value>,
    #[serde(default)]
    pub source_labels: Option<serde_json::Value>,
    #[serde(default)]
    pub source_namespace: Option<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub scheme: Option<serde_json::Value>,
    #[serde(default)]
    pub authority: Option<serde_json::Value>,
    #[serde(default)]
    pub stat_prefix: IgnoredAny,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub destination: DestinationRef,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRef {
    pub host: String,
    #[serde(default)]
    pub subset: Option<String>,
    #[serde(default)]
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorPolicy {
    pub destination: DestinationRef,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub redirect_code: Option<u16>,
    #[serde(default)]
    pub derive_port: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub uri_regex_rewrite: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retries {
    #[serde(default)]
    pub attempts: Option<u32>,
    #[serde(default)]
    pub per_try_timeout: Option<String>,
    #[serde(default)]
    pub retry_on: Option<String>,
    #[serde(default)]
    pub retry_remote_localities: Option<bool>,
    #[serde(default)]
    pub retry_ignore_previous_hosts: Option<bool>,
    #[serde(default)]
    pub backoff: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    #[serde(default)]
    pub delay: Option<Delay>,
    #[serde(default)]
    pub abort: Option<Abort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    #[serde(default)]
    pub fixed_delay: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
    #[serde(default)]
    pub percent: Option<u32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    #[serde(default)]
    pub http_status: Option<u32>,
    #[serde(default)]
    pub grpc_status: Option<String>,
    #[serde(default)]
    pub percentage: Option<Percent>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    #[serde(default)]
    pub request: Option<HeaderOperations>,
    #[serde(default)]
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}
