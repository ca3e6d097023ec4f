//! Label and field selectors from `labelSelector` / `fieldSelector` query parameters, and matching
//! objects against them.
//!
//! Labels: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, comma-separated (ANDed).
//! Fields: `path=v`, `path==v`, `path!=v` for any dotted path (`metadata.name`, `spec.nodeName`, ...);
//! a missing field compares as the empty string. The real server accepts only a few paths per kind;
//! this one accepts any.

use serde_json::Value;

/// One label requirement.
#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl LabelReq {
    fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        match self {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        }
    }
}

/// One field requirement: the value at a dotted path equals (or not) a string.
#[derive(Clone, Debug, PartialEq)]
struct FieldReq {
    path: Vec<String>,
    value: String,
    equal: bool,
}

impl FieldReq {
    fn matches(&self, object: &Value) -> bool {
        let mut at = Some(object);
        for key in &self.path {
            at = at.and_then(|v| v.get(key));
        }
        let found = match at {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        };
        (found == self.value) == self.equal
    }
}

/// The parsed selectors of one list, watch or delete-collection request.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Filter {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    /// Parses the two selector strings (absent means everything).
    pub fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Self, String> {
        let labels = match labels {
            Some(s) => parse_labels(s)?,
            None => Vec::new(),
        };
        let fields = match fields {
            Some(s) => parse_fields(s)?,
            None => Vec::new(),
        };
        Ok(Self { labels, fields })
    }

    /// A filter on `metadata.name` alone (a watch of one object).
    pub fn name(name: &str) -> Self {
        let field =
            FieldReq { path: vec!["metadata".into(), "name".into()], value: name.into(), equal: true };
        Self { labels: Vec::new(), fields: vec![field] }
    }

    /// Adds the requirements of `other`.
    pub fn and(mut self, other: Filter) -> Self {
        self.labels.extend(other.labels);
        self.fields.extend(other.fields);
        self
    }

    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        self.labels.iter().all(|r| r.matches(labels)) && self.fields.iter().all(|r| r.matches(object))
    }
}

/// Splits on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&s[start..]);
    terms.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect()
}

fn valid_key(key: &str) -> Result<String, String> {
    let ok = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok { Ok(key.to_string()) } else { Err(format!("invalid label key {key:?}")) }
}

fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    split_terms(s).into_iter().map(parse_label_term).collect()
}

fn parse_label_term(term: &str) -> Result<LabelReq, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelReq::NotExists(valid_key(key.trim())?));
    }
    let key_end = term.find(|c: char| c.is_whitespace() || c == '=' || c == '!').unwrap_or(term.len());
    let key = valid_key(&term[..key_end])?;
    let rest = term[key_end..].trim_start();
    if rest.is_empty() {
        return Ok(LabelReq::Exists(key));
    }
    if let Some(value) = rest.strip_prefix("!=") {
        return Ok(LabelReq::NotEq(key, value.trim().to_string()));
    }
    if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
        return Ok(LabelReq::Eq(key, value.trim().to_string()));
    }
    if let Some(list) = rest.strip_prefix("notin") {
        return Ok(LabelReq::NotIn(key, parse_set(list)?));
    }
    if let Some(list) = rest.strip_prefix("in") {
        return Ok(LabelReq::In(key, parse_set(list)?));
    }
    Err(format!("unable to parse requirement {term:?}"))
}

/// Parses ` (a, b)` into its values.
fn parse_set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesized set of values, found {s:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

fn parse_fields(s: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    for term in split_terms(s) {
        let (path, value, equal) = if let Some((p, v)) = term.split_once("!=") {
            (p, v, false)
        } else if let Some((p, v)) = term.split_once("==") {
            (p, v, true)
        } else if let Some((p, v)) = term.split_once('=') {
            (p, v, true)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        let path = path.trim();
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(format!("invalid field path {path:?}"));
        }
        let path = path.split('.').map(str::to_string).collect();
        reqs.push(FieldReq { path, value: value.trim().to_string(), equal });
    }
    Ok(reqs)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(labels: Value, node: &str) -> Value {
        json!({ "metadata": { "name": "p", "namespace": "ns", "labels": labels }, "spec": { "nodeName": node } })
    }

    #[test]
    fn label_forms() {
        let p = pod(json!({ "app": "web", "tier": "front" }), "n");
        let m = |s: &str| Filter::parse(Some(s), None).unwrap().matches(&p);
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("missing!=x"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(m("app in (db, web)"));
        assert!(!m("app notin (db,web)"));
        assert!(m("missing notin (a)"));
        assert!(m("app in (web),tier notin (back)"));
        assert!(Filter::parse(Some("app in web"), None).is_err());
        assert!(Filter::parse(Some("=x"), None).is_err());
    }

    #[test]
    fn field_forms() {
        let p = pod(json!({}), "node-a");
        let m = |s: &str| Filter::parse(None, Some(s)).unwrap().matches(&p);
        assert!(m("spec.nodeName=node-a"));
        assert!(m("spec.nodeName==node-a,metadata.namespace=ns"));
        assert!(!m("spec.nodeName!=node-a"));
        assert!(m("spec.missing="));
        assert!(Filter::parse(None, Some("spec.nodeName")).is_err());
    }
}
