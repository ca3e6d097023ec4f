//! The API server's errors and their rendering as a `meta/v1` `Status`, the body kube-rs parses
//! into `kube::core::Status` (`kube::Error::Api`).

use serde_json::{Value, json};

use super::registry::ResourceType;

/// A failed request: the HTTP code, the `Status.reason` and a message, as the real server sends it.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status code, repeated in `Status.code`.
    pub code: u16,
    /// `Status.reason`, such as `NotFound`, `AlreadyExists`, `Conflict`, `Invalid`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
    /// `Status.details`, when the real server sends some (the object named, conflict causes).
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into(), details: None }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    fn object_details(res: &ResourceType, name: &str) -> Value {
        json!({ "name": name, "group": res.group, "kind": res.plural })
    }

    /// 404 for a path or resource type the server does not serve (a CRD that is not installed).
    pub fn unknown_resource() -> Self {
        Self::new(404, "NotFound", "the server could not find the requested resource")
    }

    /// 404 for an object that does not exist.
    pub fn not_found(res: &ResourceType, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{} \"{name}\" not found", res.resource_name()))
            .with_details(Self::object_details(res, name))
    }

    /// 409 for a create of an object that exists.
    pub fn already_exists(res: &ResourceType, name: &str) -> Self {
        Self::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", res.resource_name()))
            .with_details(Self::object_details(res, name))
    }

    /// 409 for a write whose resourceVersion (or uid) precondition does not hold.
    pub fn conflict(res: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply \
                 your changes to the latest version and try again",
                res.resource_name()
            ),
        )
        .with_details(Self::object_details(res, name))
    }

    /// 409 for a server-side apply that would take fields owned by other managers.
    pub fn apply_conflict(res: &ResourceType, name: &str, conflicts: &[(String, String)]) -> Self {
        let causes: Vec<Value> = conflicts
            .iter()
            .map(|(manager, field)| {
                json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with \"{manager}\""),
                    "field": field,
                })
            })
            .collect();
        let listed: Vec<String> = conflicts
            .iter()
            .map(|(manager, field)| format!("conflict with \"{manager}\": {field}"))
            .collect();
        let noun = if conflicts.len() == 1 { "conflict" } else { "conflicts" };
        let mut details = Self::object_details(res, name);
        details["causes"] = Value::Array(causes);
        Self::new(
            409,
            "Conflict",
            format!("Apply failed with {} {noun}: {}", conflicts.len(), listed.join(", ")),
        )
        .with_details(details)
    }

    /// 400 for a request the server cannot make sense of.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    /// 422 for an object that breaks a validation rule.
    pub fn invalid(res: &ResourceType, name: &str, message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", format!("{} \"{name}\" is invalid: {}", res.kind, message.into()))
            .with_details(Self::object_details(res, name))
    }

    /// 401 for a request without the required bearer token.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 405 for a verb the path does not support.
    pub fn method_not_allowed(method: &str) -> Self {
        Self::new(405, "MethodNotAllowed", format!("the server does not allow this method ({method}) here"))
    }

    /// 410 for a watch from a resourceVersion older than the retained history.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    /// 413 for a request body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(413, "RequestEntityTooLarge", format!("the request body is larger than {limit} bytes"))
    }

    /// 415 for a patch content type the server does not know.
    pub fn unsupported_media_type(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format ({content_type})"),
        )
    }

    /// 500 for a limit of the fake itself (an exhausted address range).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// The `Status` object, as the body of an error response or the object of a watch `ERROR` event.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}
