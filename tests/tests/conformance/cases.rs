//! The conformance cases as `tests/conformance/cases.yaml` writes them, what a request got back,
//! and the comparison of the two (the first mismatch, in words).

use std::collections::BTreeMap;

use serde::Deserialize;

/// `cases.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// The suite's ShortName.
    pub name: String,
    pub about: String,
    /// Why a failure is not held against us (what Istio's waypoints lack too).
    #[serde(default)]
    pub unsupported: Option<String>,
    /// YAML objects loaded with the base.
    #[serde(default)]
    pub routes: Option<String>,
    pub requests: Vec<Request>,
}

/// The pod a request is sent from.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    #[default]
    Client,
    Consumer,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    #[serde(default)]
    pub from: Source,
    #[serde(default)]
    pub protocol: Protocol,
    /// `<service>[.<namespace>][:<port>]` or `pod/<pod name prefix>:<port>`.
    pub host: String,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// How many times to send it.
    #[serde(default)]
    pub count: Option<usize>,
    pub expect: Expect,
}

impl Request {
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("GET")
    }

    pub fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// `GET echo/v2?x=1`, for reports.
    pub fn describe(&self) -> String {
        match self.protocol {
            Protocol::Http => format!("{} {}{}", self.method(), self.host, self.path()),
            Protocol::Grpc => format!("gRPC {} Say", self.host),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Expect {
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    #[serde(default)]
    pub tolerance: Option<f64>,
    #[serde(default)]
    pub request: Option<SeenRequest>,
    #[serde(default)]
    pub response_headers: BTreeMap<String, String>,
    #[serde(default)]
    pub absent_response_headers: Vec<String>,
    #[serde(default)]
    pub redirect: Option<Redirect>,
}

fn ok() -> u16 {
    200
}

/// What the backend must have received.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SeenRequest {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub absent_headers: Vec<String>,
}

/// The parts of a redirect's Location.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub scheme: String,
    pub host: String,
    pub path: String,
    /// None: no port, or the scheme's well-known one.
    #[serde(default)]
    pub port: Option<u16>,
}

/// What an echo backend says about a request it answered.
#[derive(Clone, Debug, Default, Deserialize, serde::Serialize)]
pub struct Echo {
    pub pod: String,
    pub namespace: String,
    #[serde(default)]
    pub method: String,
    /// The path with its query.
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub host: String,
    /// Header name (lower case) -> its values, in order.
    #[serde(default)]
    pub headers: BTreeMap<String, Vec<String>>,
}

/// What the client got for one request.
#[derive(Debug, Default)]
pub struct Reply {
    /// HTTP status (200 for a gRPC OK); 0 when nothing came back.
    pub status: u16,
    pub headers: http::HeaderMap,
    /// The backend's account, when a backend answered.
    pub echo: Option<Echo>,
    /// Why there is no (good) answer: a transport error, a gRPC status, a body that is not an echo.
    pub error: Option<String>,
}

/// The first way `reply` differs from `expect`.
pub fn check(expect: &Expect, reply: &Reply) -> Result<(), String> {
    if reply.status != expect.status {
        let why = reply.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default();
        return Err(format!("status {} instead of {}{why}", reply.status, expect.status));
    }
    for (name, want) in &expect.response_headers {
        let got: Vec<&str> =
            reply.headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
        if got.join(",") != *want {
            return Err(format!("response header {name}: {got:?} instead of {want:?}"));
        }
    }
    for name in &expect.absent_response_headers {
        if let Some(v) = reply.headers.get(name.as_str()) {
            return Err(format!("response header {name} should be absent, got {v:?}"));
        }
    }
    if let Some(r) = &expect.redirect {
        check_redirect(r, reply)?;
    }
    let needs_echo = expect.backend.is_some() || expect.namespace.is_some() || expect.request.is_some();
    if !needs_echo {
        return Ok(());
    }
    let Some(echo) = &reply.echo else {
        return Err(format!("no backend's answer ({})", reply.error.as_deref().unwrap_or("no body")));
    };
    if let Some(b) = &expect.backend
        && !echo.pod.starts_with(b.as_str())
    {
        return Err(format!("answered by {}, not {b}-*", echo.pod));
    }
    if let Some(ns) = &expect.namespace
        && echo.namespace != *ns
    {
        return Err(format!("answered from namespace {}, not {ns}", echo.namespace));
    }
    if let Some(seen) = &expect.request {
        check_seen(seen, echo)?;
    }
    Ok(())
}

fn check_seen(seen: &SeenRequest, echo: &Echo) -> Result<(), String> {
    let field = |what: &str, want: &Option<String>, got: &str| match want {
        Some(w) if w != got => Err(format!("backend saw {what} {got:?}, not {w:?}")),
        _ => Ok(()),
    };
    field("path", &seen.path, &echo.path)?;
    field("host", &seen.host, &echo.host)?;
    field("method", &seen.method, &echo.method)?;
    for (name, want) in &seen.headers {
        match echo.headers.get(&name.to_ascii_lowercase()) {
            None => return Err(format!("backend did not get header {name} (wanted {want:?})")),
            Some(got) if got.join(",") != *want => {
                return Err(format!("backend got header {name}: {:?}, not {want:?}", got.join(",")));
            }
            Some(_) => {}
        }
    }
    for name in &seen.absent_headers {
        if let Some(got) = echo.headers.get(&name.to_ascii_lowercase()) {
            return Err(format!("backend got header {name}: {got:?}, which should be gone"));
        }
    }
    Ok(())
}

fn check_redirect(want: &Redirect, reply: &Reply) -> Result<(), String> {
    let location = reply
        .headers
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| "a redirect without Location".to_string())?;
    let uri: http::Uri = location.parse().map_err(|e| format!("Location {location:?}: {e}"))?;
    let scheme = uri.scheme_str().unwrap_or_default();
    let host = uri.host().unwrap_or_default();
    let path = uri.path();
    let default_port = match want.scheme.as_str() {
        "https" => 443,
        _ => 80,
    };
    let port_ok = match (want.port, uri.port_u16()) {
        (Some(w), got) => got == Some(w),
        (None, got) => got.is_none_or(|p| p == default_port),
    };
    if scheme != want.scheme || host != want.host || path != want.path || !port_ok {
        let port = want.port.map(|p| format!(":{p}")).unwrap_or_default();
        return Err(format!(
            "Location {location:?}, expected {}://{}{port}{}",
            want.scheme, want.host, want.path
        ));
    }
    Ok(())
}

/// Whether the answers of a repeated request share out as `expect.weights` say (`pods`: the
/// answering pods' names); the shares seen either way.
pub fn check_weights(expect: &Expect, pods: &[String]) -> Result<String, String> {
    let tolerance = expect.tolerance.unwrap_or(0.05);
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for pod in pods {
        let Some(backend) = expect.weights.keys().find(|b| pod.starts_with(&format!("{b}-"))) else {
            return Err(format!("answered by {pod}, which is none of {:?}", expect.weights.keys()));
        };
        *seen.entry(backend).or_default() += 1;
    }
    let total = pods.len().max(1) as f64;
    let mut shares = Vec::new();
    let mut off = false;
    for (backend, want) in &expect.weights {
        let got = seen.get(backend.as_str()).copied().unwrap_or(0) as f64 / total;
        shares.push(format!("{backend} {got:.2}"));
        off |= (got - want).abs() > tolerance || (*want > 0.0 && got == 0.0);
    }
    let weights: Vec<String> = expect.weights.iter().map(|(b, w)| format!("{b} {w}")).collect();
    match off {
        false => Ok(format!("{} of {}", shares.join(", "), pods.len())),
        true => Err(format!(
            "shares {} of {} requests, want {} +/-{tolerance}",
            shares.join(", "),
            pods.len(),
            weights.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect_reply(location: &str) -> Reply {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::LOCATION, location.parse().expect("value"));
        Reply { status: 302, headers, ..Default::default() }
    }

    #[test]
    fn redirect_ports_default_to_the_scheme() {
        let want = Redirect { scheme: "https".into(), host: "echo".into(), path: "/x".into(), port: None };
        assert!(check_redirect(&want, &redirect_reply("https://echo/x")).is_ok());
        assert!(check_redirect(&want, &redirect_reply("https://echo:443/x")).is_ok());
        assert!(check_redirect(&want, &redirect_reply("https://echo:80/x")).is_err());
    }
}
