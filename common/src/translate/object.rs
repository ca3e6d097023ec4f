//! The object envelope every document carries (`apiVersion`, `kind`, `metadata`), reading a
//! stream of multi-document YAML into objects, and decoding a body into its typed spec with the
//! path of the field at fault.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::Value;

/// Which object: kind, namespace and name (namespace empty for cluster-scoped kinds).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// Kubernetes object metadata: what the translation reads, and the fields a real object may
/// carry that it does not need (accepted, ignored). Anything else is a typo and refused.
// The real API's fields that are accepted and ignored are never read.
#[allow(dead_code)]
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339; orders routes of equal precedence (older first).
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
    #[serde(default)]
    generate_name: IgnoredAny,
    #[serde(default)]
    uid: IgnoredAny,
    #[serde(default)]
    resource_version: IgnoredAny,
    #[serde(default)]
    generation: IgnoredAny,
    #[serde(default)]
    finalizers: IgnoredAny,
    #[serde(default)]
    managed_fields: IgnoredAny,
    #[serde(default)]
    deletion_timestamp: IgnoredAny,
    #[serde(default)]
    deletion_grace_period_seconds: IgnoredAny,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
}

/// One document as read: its identity and its still-untyped body.
#[derive(Clone, Debug)]
pub struct RawObject {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub body: Value,
    /// Where it came from ("file.yaml#3"), for messages.
    pub origin: String,
    /// Why the envelope is wrong (a metadata typo, an unknown top-level field) although the
    /// object's kind and name could be read: the object is then refused as itself, so that its
    /// previous version (or its fail-safe form) stays in force.
    pub envelope_fault: Option<Fault>,
}

/// Why a document or object was not taken: the field at fault (a path such as
/// `spec.rules[0].backendRefs[1].port`, empty for the whole object) and the reason.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Fault {
    pub field: String,
    pub reason: String,
}

impl Fault {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", self.field, self.reason)
        }
    }
}

/// A document that could not even be read as an object (no kind, not a map, bad YAML).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Unreadable {
    pub origin: String,
    pub fault: Fault,
}

/// The largest file read.
pub const MAX_TEXT_BYTES: usize = 4 << 20;
/// The most YAML aliases (`*name`) one file may use.
pub const MAX_ALIASES: usize = 64;

/// Counts the YAML alias tokens (`*name` where a value starts, outside quotes) of a text: an
/// upper bound on the alias expansions its parse does, cheap to take before parsing.
fn count_aliases(text: &str) -> usize {
    let mut n = 0;
    for line in text.lines() {
        let (mut single, mut double) = (false, false);
        let mut prev = ' ';
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\'' if !double => single = !single,
                '"' if !single => double = !double,
                '#' if !single && !double && prev.is_whitespace() => break,
                '*' if !single
                    && !double
                    && matches!(prev, ' ' | '\t' | '[' | '{' | ',' | ':' | '-')
                    && chars.peek().is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
                {
                    n += 1;
                }
                _ => {}
            }
            prev = c;
        }
    }
    n
}

/// Reads every document of a YAML text (`---` separated). Empty documents are skipped; a
/// document that is not an object is reported and the others are still read. A YAML syntax
/// error ends the stream there (what follows cannot be trusted to be split correctly).
pub fn read_documents(text: &str, source: &str) -> (Vec<RawObject>, Vec<Unreadable>) {
    let mut objects = Vec::new();
    let mut unreadable = Vec::new();
    // Bounds on what one file may cost: its size, and YAML aliases (each expands a copy of its
    // anchor, so a small file could otherwise unfold into gigabytes).
    if text.len() > MAX_TEXT_BYTES {
        let fault = Fault::new("", format!("{} bytes is over the limit of {MAX_TEXT_BYTES}", text.len()));
        return (objects, vec![Unreadable { origin: source.to_string(), fault }]);
    }
    let aliases = count_aliases(text);
    if aliases > MAX_ALIASES {
        let fault = Fault::new("", format!("{aliases} YAML aliases is over the limit of {MAX_ALIASES}"));
        return (objects, vec![Unreadable { origin: source.to_string(), fault }]);
    }
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = format!("{source}#{}", i + 1);
        // Through YAML's own value first: it refuses a key given twice (which a JSON map would
        // silently take the last of, e.g. a second `action:`).
        let yaml = match serde_yaml_ng::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                unreadable.push(Unreadable { origin, fault: Fault::new("", format!("not valid YAML: {e}")) });
                break;
            }
        };
        let value = match serde_json::to_value(yaml) {
            Ok(v) => v,
            Err(e) => {
                unreadable.push(Unreadable {
                    origin,
                    fault: Fault::new("", format!("not a Kubernetes object: {e}")),
                });
                continue;
            }
        };
        if value.is_null() {
            continue;
        }
        match envelope(value, origin.clone()) {
            Ok(o) => objects.push(o),
            Err(fault) => unreadable.push(Unreadable { origin, fault }),
        }
    }
    (objects, unreadable)
}

impl RawObject {
    /// An object as the Kubernetes API returns it (JSON), checked as a document is.
    pub fn from_value(value: Value, origin: String) -> Result<Self, Fault> {
        envelope(value, origin)
    }
}

fn envelope(value: Value, origin: String) -> Result<RawObject, Fault> {
    let Value::Object(mut map) = value else {
        return Err(Fault::new("", "a document must be an object with apiVersion, kind and metadata"));
    };
    let text = |map: &mut serde_json::Map<String, Value>, key: &str| match map.remove(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(Fault::new(key, "must be a non-empty string")),
        None => Err(Fault::new(key, "is required")),
    };
    let api_version = text(&mut map, "apiVersion")?;
    let kind = text(&mut map, "kind")?;
    let raw_metadata = map.remove("metadata").ok_or_else(|| Fault::new("metadata", "is required"))?;
    let mut envelope_fault = None;
    let metadata = match decode::<Metadata>(raw_metadata.clone()) {
        Ok(m) => m,
        Err(fault) => {
            // Keep what identifies the object; the object is refused for the fault.
            let name = raw_metadata.get("name").and_then(Value::as_str).unwrap_or_default().to_string();
            let namespace =
                raw_metadata.get("namespace").and_then(Value::as_str).unwrap_or_default().to_string();
            envelope_fault = Some(fault.under("metadata"));
            Metadata { name, namespace, ..Metadata::default() }
        }
    };
    if metadata.name.is_empty() {
        return Err(Fault::new("metadata.name", "is required"));
    }
    // Names become parts of resource names: only Kubernetes' syntax, so none can collide.
    if !is_dns_subdomain(&metadata.name) {
        return Err(Fault::new(
            "metadata.name",
            format!("{:?} is not a Kubernetes name (lower-case letters, digits, '-' and '.')", metadata.name),
        ));
    }
    if !metadata.namespace.is_empty() && !is_dns_label(&metadata.namespace) {
        return Err(Fault::new(
            "metadata.namespace",
            format!("{:?} is not a Kubernetes namespace name", metadata.namespace),
        ));
    }
    if let Some(key) = map.keys().find(|k| !matches!(k.as_str(), "spec" | "status" | "data")) {
        envelope_fault.get_or_insert(Fault::new(
            key.clone(),
            "unknown field (expected apiVersion, kind, metadata, spec, status)",
        ));
    }
    Ok(RawObject { api_version, kind, metadata, body: Value::Object(map), origin, envelope_fault })
}

/// RFC 1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: up to 253 characters, labels joined by dots.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl Fault {
    /// Prefixes the field path with `parent`.
    pub fn under(mut self, parent: &str) -> Self {
        self.field = match (parent.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => parent.to_string(),
            (false, false) if self.field.starts_with('[') => format!("{parent}{}", self.field),
            (false, false) => format!("{parent}.{}", self.field),
        };
        self
    }
}

/// Decodes a value into `T`, naming the field at fault on failure.
pub fn decode<T: DeserializeOwned>(value: Value) -> Result<T, Fault> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        Fault::new(field, e.into_inner().to_string())
    })
}

impl RawObject {
    /// Decodes `spec` (an absent spec is an empty one), faults named from `spec`.
    pub fn spec<T: DeserializeOwned>(&self) -> Result<T, Fault> {
        let spec = self.body.get("spec").cloned().unwrap_or(Value::Object(Default::default()));
        decode(spec).map_err(|f| f.under("spec"))
    }

    /// Decodes `status` (absent: empty), faults named from `status`.
    pub fn status<T: DeserializeOwned>(&self) -> Result<T, Fault> {
        let status = self.body.get("status").cloned().unwrap_or(Value::Object(Default::default()));
        decode(status).map_err(|f| f.under("status"))
    }
}
