//! The Gateway API status the controller owes: our GatewayClass `Accepted`; each waypoint
//! Gateway's `Accepted`, `Programmed`, `addresses` (the waypoint Service's cluster IP, which is
//! what istiod reads to name the waypoint to every ztunnel) and its `mesh` listener; and, on
//! each HTTPRoute/GRPCRoute attached to one of our waypoints (directly or through a Service that
//! uses it), one `parents` entry per such parentRef with `Accepted` and `ResolvedRefs`.
//!
//! Conditions keep their `lastTransitionTime` while their status stays the same, so an
//! unchanged status computes to the very same value and is not written again.

use common::translate::ObjectStatus;
use serde_json::{Value, json};

/// One condition as we mean it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cond {
    pub kind: &'static str,
    pub ok: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Cond {
    pub fn new(kind: &'static str, ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self { kind, ok, reason, message: message.into() }
    }
}

/// Renders `conds` for an object at `generation`, keeping each condition's previous
/// `lastTransitionTime` from `previous` when its status did not change.
pub fn conditions(conds: &[Cond], previous: Option<&Value>, generation: i64, now: &str) -> Value {
    let prev = |kind: &str| {
        previous
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|c| c.get("type").and_then(Value::as_str) == Some(kind)))
    };
    Value::Array(
        conds
            .iter()
            .map(|c| {
                let status = if c.ok { "True" } else { "False" };
                let since = prev(c.kind)
                    .filter(|p| p.get("status").and_then(Value::as_str) == Some(status))
                    .and_then(|p| p.get("lastTransitionTime").cloned())
                    .unwrap_or_else(|| json!(now));
                json!({
                    "type": c.kind,
                    "status": status,
                    "reason": c.reason,
                    "message": c.message,
                    "observedGeneration": generation,
                    "lastTransitionTime": since,
                })
            })
            .collect(),
    )
}

pub fn generation(obj: &Value) -> i64 {
    obj.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0)
}

/// What the controller knows about one of its Gateways.
#[derive(Clone, Debug)]
pub struct GatewayFacts {
    /// The translation's fault, when the Gateway was refused.
    pub refused: Option<String>,
    /// Why its `parametersRef` cannot be used, if so.
    pub invalid_parameters: Option<String>,
    /// Why it could not be deployed (an object of its name is not its), if so.
    pub not_provisioned: Option<String>,
    /// The waypoint Service's cluster IPs (empty until assigned).
    pub addresses: Vec<String>,
    /// Routes attached through the `mesh` listener.
    pub attached_routes: usize,
}

/// The Gateway's whole `status`.
pub fn gateway_status(gateway: &Value, facts: &GatewayFacts, now: &str) -> Value {
    let generation = generation(gateway);
    let previous = gateway.get("status");
    let accepted = match (&facts.refused, &facts.invalid_parameters) {
        (Some(fault), _) if fault.contains("listener") => {
            Cond::new("Accepted", false, "ListenersNotValid", fault.clone())
        }
        (Some(fault), _) => Cond::new("Accepted", false, "Invalid", fault.clone()),
        (None, Some(why)) => Cond::new("Accepted", false, "InvalidParameters", why.clone()),
        (None, None) => {
            Cond::new("Accepted", true, "Accepted", "accepted by the ambient waypoint controller")
        }
    };
    let programmed = match (&facts.refused, &facts.not_provisioned, facts.addresses.is_empty()) {
        (Some(_), _, _) => Cond::new("Programmed", false, "Invalid", "the Gateway is not accepted"),
        (None, _, _) if !accepted.ok => {
            Cond::new("Programmed", false, "Invalid", "the Gateway is not accepted")
        }
        (None, Some(why), _) => Cond::new("Programmed", false, "Invalid", why.clone()),
        (None, None, true) => Cond::new(
            "Programmed",
            false,
            "AddressNotAssigned",
            "waiting for the waypoint Service's cluster IP",
        ),
        (None, None, false) => {
            Cond::new("Programmed", true, "Programmed", "the waypoint is deployed and configured")
        }
    };
    let listener_prev = previous
        .and_then(|s| s.get("listeners"))
        .and_then(Value::as_array)
        .and_then(|l| l.iter().find(|l| l.get("name").and_then(Value::as_str) == Some("mesh")))
        .and_then(|l| l.get("conditions"));
    let ok = accepted.ok;
    let listener = json!({
        "name": "mesh",
        "supportedKinds": [
            {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
            {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"},
        ],
        "attachedRoutes": facts.attached_routes,
        "conditions": conditions(&[
            Cond::new("Accepted", ok, if ok { "Accepted" } else { "Invalid" }, ""),
            Cond::new("Programmed", programmed.ok, if programmed.ok { "Programmed" } else { "Invalid" }, ""),
            Cond::new("ResolvedRefs", true, "ResolvedRefs", ""),
            Cond::new("Conflicted", false, "NoConflicts", ""),
        ], listener_prev, generation, now),
    });
    let has_mesh = gateway
        .pointer("/spec/listeners")
        .and_then(Value::as_array)
        .is_some_and(|l| l.iter().any(|l| l.get("name").and_then(Value::as_str) == Some("mesh")));
    json!({
        "addresses": facts.addresses.iter().map(|a| json!({"type": "IPAddress", "value": a})).collect::<Vec<_>>(),
        "conditions": conditions(&[accepted, programmed], previous.and_then(|s| s.get("conditions")), generation, now),
        "listeners": if has_mesh { vec![listener] } else { vec![] },
    })
}

/// Our GatewayClass's `status`.
pub fn gateway_class_status(class: &Value, now: &str) -> Value {
    json!({
        "conditions": conditions(
            &[Cond::new("Accepted", true, "Accepted", "handled by the ambient waypoint controller")],
            class.pointer("/status/conditions"),
            generation(class),
            now,
        ),
    })
}

/// The route's `Accepted` and `ResolvedRefs`, from the translation's verdict on it.
pub fn route_conditions(status: Option<&ObjectStatus>) -> [Cond; 2] {
    let fault = status.and_then(|s| s.fault.as_ref());
    let accepted = match (status, fault) {
        (None, _) => Cond::new("Accepted", false, "Pending", "not translated yet"),
        (Some(s), _) if s.accepted => Cond::new("Accepted", true, "Accepted", s.notes.join("; ")),
        (Some(_), Some(f)) if f.field.starts_with("spec.parentRefs") && f.reason.contains("allow") => {
            Cond::new("Accepted", false, "NotAllowedByListeners", f.to_string())
        }
        (Some(_), Some(f)) if f.field.starts_with("spec.parentRefs") => {
            Cond::new("Accepted", false, "NoMatchingParent", f.to_string())
        }
        (Some(_), Some(f)) => Cond::new("Accepted", false, "UnsupportedValue", f.to_string()),
        (Some(_), None) => Cond::new("Accepted", false, "UnsupportedValue", "refused"),
    };
    let resolved = match fault {
        Some(f) if f.field.contains("backendRefs") && f.reason.contains("ReferenceGrant") => {
            Cond::new("ResolvedRefs", false, "RefNotPermitted", f.to_string())
        }
        Some(f)
            if f.field.contains("backendRefs")
                && (f.field.ends_with(".kind") || f.field.ends_with(".group")) =>
        {
            Cond::new("ResolvedRefs", false, "InvalidKind", f.to_string())
        }
        Some(f) if f.field.contains("backendRefs") => {
            Cond::new("ResolvedRefs", false, "BackendNotFound", f.to_string())
        }
        _ => Cond::new("ResolvedRefs", true, "ResolvedRefs", ""),
    };
    [accepted, resolved]
}

/// The route's new `status.parents`: one entry of ours per parentRef `ours` picks, with
/// `conds`. Entries keep their places (other controllers' untouched, ours updated where they
/// are, ours that no longer apply removed, new ones appended), so two controllers that both
/// keep foreign entries never reorder each other's writes. `None` when unchanged.
pub fn route_parents(
    route: &Value,
    controller_name: &str,
    ours: impl Fn(&Value) -> bool,
    conds: &[Cond],
    now: &str,
) -> Option<Value> {
    let generation = generation(route);
    let existing: Vec<Value> =
        route.pointer("/status/parents").and_then(Value::as_array).cloned().unwrap_or_default();
    let mine = |p: &Value| p.get("controllerName").and_then(Value::as_str) == Some(controller_name);
    let refs = route.pointer("/spec/parentRefs").and_then(Value::as_array).cloned().unwrap_or_default();
    let wanted: Vec<&Value> = refs.iter().filter(|r| ours(r)).collect();
    let entry = |r: &Value, previous: Option<&Value>| {
        json!({
            "parentRef": r,
            "controllerName": controller_name,
            "conditions": conditions(conds, previous, generation, now),
        })
    };
    let mut parents = Vec::with_capacity(existing.len() + wanted.len());
    let mut placed: Vec<&Value> = Vec::new();
    for p in &existing {
        if !mine(p) {
            parents.push(p.clone());
            continue;
        }
        let Some(r) = wanted.iter().find(|r| p.get("parentRef") == Some(**r) && !placed.contains(*r)) else {
            continue; // ours, no longer applies
        };
        parents.push(entry(r, p.get("conditions")));
        placed.push(r);
    }
    for r in wanted.iter().filter(|r| !placed.contains(*r)) {
        parents.push(entry(r, None));
    }
    (parents != existing).then_some(Value::Array(parents))
}

#[cfg(test)]
mod tests;
