//! Patch documents: JSON merge patch (RFC 7386), a strategic merge patch read as a merge patch,
//! and JSON patch (RFC 6902: add, remove, replace, move, copy, test).

use serde_json::{Map, Value};

/// RFC 7386: maps merge recursively, `null` removes a key, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// A strategic merge patch read as a merge patch: lists are replaced rather than merged by key.
/// The `$patch: replace` and `$patch: delete` directives on maps are honoured; other `$` directives
/// (`$setElementOrder/...`, `$retainKeys`, `$deleteFromPrimitiveList/...`) are dropped.
pub(crate) fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            *target = strip_directives(patch);
            return;
        }
        Some("delete") => {
            *target = Value::Null;
            return;
        }
        _ => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch.iter().filter(|(k, _)| !k.starts_with('$')) {
            if value.is_null() {
                target.remove(key);
                continue;
            }
            let slot = target.entry(key.clone()).or_insert(Value::Null);
            strategic_merge_patch(slot, value);
            if slot.is_null() {
                target.remove(key);
            }
        }
    }
}

fn strip_directives(map: &Map<String, Value>) -> Value {
    let kept = map
        .iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .map(|(k, v)| {
            let v = match v {
                Value::Object(inner) => strip_directives(inner),
                other => other.clone(),
            };
            (k.clone(), v)
        })
        .collect();
    Value::Object(kept)
}

/// Why a JSON patch could not be applied.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum JsonPatchError {
    /// The document is not a list of operations, or an operation is malformed.
    Malformed(String),
    /// A `test` operation failed or a path does not exist.
    Failed(String),
}

/// RFC 6902, all or nothing: `doc` is changed only when every operation succeeds.
pub(crate) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), JsonPatchError> {
    let ops =
        patch.as_array().ok_or_else(|| JsonPatchError::Malformed("a JSON patch must be a list".into()))?;
    let mut work = doc.clone();
    for op in ops {
        apply_op(&mut work, op)?;
    }
    *doc = work;
    Ok(())
}

fn apply_op(doc: &mut Value, op: &Value) -> Result<(), JsonPatchError> {
    let field = |name: &str| {
        op.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| JsonPatchError::Malformed(format!("operation {op} lacks a string {name:?}")))
    };
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| JsonPatchError::Malformed(format!("operation {op} lacks \"value\"")))
    };
    let path = parse_pointer(field("path")?)?;
    match field("op")? {
        "add" => add(doc, &path, value()?),
        "remove" => remove(doc, &path).map(drop),
        "replace" => {
            let slot = lookup_mut(doc, &path)?;
            *slot = value()?;
            Ok(())
        }
        "move" => {
            let from = parse_pointer(field("from")?)?;
            if path.len() > from.len() && path.starts_with(&from) {
                return Err(JsonPatchError::Failed("cannot move a value into itself".into()));
            }
            let moved = remove(doc, &from)?;
            add(doc, &path, moved)
        }
        "copy" => {
            let from = parse_pointer(field("from")?)?;
            let copied = lookup_mut(doc, &from)?.clone();
            add(doc, &path, copied)
        }
        "test" => {
            let expected = value()?;
            if *lookup_mut(doc, &path)? == expected {
                Ok(())
            } else {
                Err(JsonPatchError::Failed(format!("test failed at {}", field("path")?)))
            }
        }
        other => Err(JsonPatchError::Malformed(format!("unknown operation {other:?}"))),
    }
}

/// Splits a JSON pointer into unescaped reference tokens.
fn parse_pointer(pointer: &str) -> Result<Vec<String>, JsonPatchError> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| JsonPatchError::Malformed(format!("path {pointer:?} does not start with '/'")))?;
    Ok(rest.split('/').map(|t| t.replace("~1", "/").replace("~0", "~")).collect())
}

fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, JsonPatchError> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    let index: usize = if valid { token.parse().unwrap_or(usize::MAX) } else { usize::MAX };
    let limit = if allow_end { len } else { len.saturating_sub(1) };
    if index <= limit && (allow_end || len > 0) {
        Ok(index)
    } else {
        Err(JsonPatchError::Failed(format!("array index {token:?} out of range")))
    }
}

fn lookup_mut<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, JsonPatchError> {
    let mut at = doc;
    for token in path {
        at = match at {
            Value::Object(map) => map.get_mut(token),
            Value::Array(list) => {
                let index = array_index(token, list.len(), false)?;
                list.get_mut(index)
            }
            _ => None,
        }
        .ok_or_else(|| JsonPatchError::Failed(format!("path element {token:?} does not exist")))?;
    }
    Ok(at)
}

fn add(doc: &mut Value, path: &[String], value: Value) -> Result<(), JsonPatchError> {
    let Some((last, parent)) = path.split_last() else {
        *doc = value;
        return Ok(());
    };
    match lookup_mut(doc, parent)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(list) => {
            let index = array_index(last, list.len(), true)?;
            list.insert(index, value);
            Ok(())
        }
        _ => Err(JsonPatchError::Failed(format!("cannot add {last:?} to a scalar"))),
    }
}

fn remove(doc: &mut Value, path: &[String]) -> Result<Value, JsonPatchError> {
    let Some((last, parent)) = path.split_last() else {
        return Err(JsonPatchError::Failed("cannot remove the whole document".into()));
    };
    match lookup_mut(doc, parent)? {
        Value::Object(map) => {
            map.remove(last).ok_or_else(|| JsonPatchError::Failed(format!("no key {last:?} to remove")))
        }
        Value::Array(list) => {
            let index = array_index(last, list.len(), false)?;
            Ok(list.remove(index))
        }
        _ => Err(JsonPatchError::Failed(format!("cannot remove {last:?} from a scalar"))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_patch_rfc_examples() {
        let mut doc = json!({ "a": "b", "c": { "d": "e", "f": "g" }, "l": [1, 2] });
        merge_patch(&mut doc, &json!({ "a": "z", "c": { "f": null }, "l": [3] }));
        assert_eq!(doc, json!({ "a": "z", "c": { "d": "e" }, "l": [3] }));
    }

    #[test]
    fn strategic_directives() {
        let mut doc = json!({ "spec": { "a": 1, "b": 2 }, "x": { "y": 1 } });
        let patch = json!({
            "spec": { "$patch": "replace", "c": 3 },
            "x": { "$patch": "delete" },
            "$setElementOrder/list": [],
        });
        strategic_merge_patch(&mut doc, &patch);
        assert_eq!(doc, json!({ "spec": { "c": 3 } }));
    }

    #[test]
    fn json_patch_ops() {
        let mut doc = json!({ "a": { "b": [1, 2] }, "c/d": 1 });
        let patch = json!([
            { "op": "test", "path": "/a/b/0", "value": 1 },
            { "op": "add", "path": "/a/b/-", "value": 3 },
            { "op": "add", "path": "/a/b/0", "value": 0 },
            { "op": "remove", "path": "/c~1d" },
            { "op": "replace", "path": "/a/b/1", "value": 10 },
            { "op": "copy", "from": "/a/b", "path": "/copy" },
            { "op": "move", "from": "/copy", "path": "/moved" },
        ]);
        json_patch(&mut doc, &patch).unwrap();
        assert_eq!(doc, json!({ "a": { "b": [0, 10, 2, 3] }, "moved": [0, 10, 2, 3] }));
    }

    #[test]
    fn json_patch_is_atomic() {
        let mut doc = json!({ "a": 1 });
        let patch = json!([
            { "op": "replace", "path": "/a", "value": 2 },
            { "op": "test", "path": "/a", "value": 1 },
        ]);
        assert!(matches!(json_patch(&mut doc, &patch), Err(JsonPatchError::Failed(_))));
        assert_eq!(doc, json!({ "a": 1 }));
        assert!(matches!(json_patch(&mut doc, &json!({})), Err(JsonPatchError::Malformed(_))));
        let bad_index = json!([{ "op": "add", "path": "/a/01", "value": 1 }]);
        assert!(json_patch(&mut json!({ "a": [1, 2] }), &bad_index).is_err());
        let remove_missing = json!([{ "op": "remove", "path": "/x" }]);
        assert!(json_patch(&mut doc, &remove_missing).is_err());
    }
}
