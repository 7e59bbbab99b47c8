//! API errors as the real server renders them: `Status` objects (`NotFound`, `Conflict`,
//! `Invalid` with one cause per field, ...) and the field errors inside them.

use serde_json::{Value, json};

/// An API error rendered as a Kubernetes `Status` object.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: Value::Null,
        }
    }

    pub fn with_details(mut self, details: Value) -> Self {
        self.details = details;
        self
    }

    /// An error about one object, whose name, group and resource go in the details; `message`
    /// is given the qualified resource (`pods`, `agentruns.agentrun.dev`).
    fn about_object(
        code: u16,
        reason: &'static str,
        (group, plural, name): (&str, &str, &str),
        message: impl FnOnce(String) -> String,
    ) -> Self {
        ApiError::new(code, reason, message(qualified(group, plural)))
            .with_details(json!({"name": name, "group": group, "kind": plural}))
    }

    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        Self::about_object(404, "NotFound", (group, plural, name), |res| {
            format!("{res} \"{name}\" not found")
        })
    }

    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        Self::about_object(409, "AlreadyExists", (group, plural, name), |res| {
            format!("{res} \"{name}\" already exists")
        })
    }

    pub fn conflict(group: &str, plural: &str, name: &str) -> Self {
        Self::about_object(409, "Conflict", (group, plural, name), |res| {
            format!(
                "Operation cannot be fulfilled on {res} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            )
        })
    }

    /// 403 Forbidden from admission: `pods "x" is forbidden: <why>`.
    pub fn forbidden(group: &str, plural: &str, name: &str, why: &str) -> Self {
        Self::about_object(403, "Forbidden", (group, plural, name), |res| {
            if name.is_empty() {
                format!("{res} is forbidden: {why}")
            } else {
                format!("{res} \"{name}\" is forbidden: {why}")
            }
        })
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        ApiError::new(405, "MethodNotAllowed", message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        ApiError::new(410, "Expired", message)
    }

    /// 422 Invalid with one cause per field error.
    pub fn invalid(kind: &str, group: &str, name: &str, errors: &[FieldError]) -> Self {
        let full_kind = if group.is_empty() {
            kind.to_string()
        } else {
            format!("{kind}.{group}")
        };
        let list: Vec<String> = errors.iter().map(FieldError::to_string).collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.reason, "message": e.message(), "field": e.field}))
            .collect();
        ApiError::new(
            422,
            "Invalid",
            format!("{full_kind} \"{name}\" is invalid: {joined}"),
        )
        .with_details(json!({"name": name, "group": group, "kind": kind, "causes": causes}))
    }

    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if !self.details.is_null() {
            v["details"] = self.details.clone();
        }
        v
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn qualified(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    }
}

/// One field validation error, rendered like `spec.command: Required value`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    /// Kubernetes cause reason: FieldValueRequired, FieldValueInvalid, FieldValueNotSupported,
    /// FieldValueTypeInvalid, FieldValueTooMany, FieldValueDuplicate, FieldValueTooLong.
    pub reason: &'static str,
    pub detail: String,
}

impl FieldError {
    pub fn required(field: &str) -> Self {
        FieldError {
            field: field.to_string(),
            reason: "FieldValueRequired",
            detail: String::new(),
        }
    }

    pub fn invalid(field: &str, value: &Value, detail: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            reason: "FieldValueInvalid",
            detail: format!("Invalid value: {}: {}", short_value(value), detail.into()),
        }
    }

    pub fn with(field: &str, reason: &'static str, detail: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            reason,
            detail: detail.into(),
        }
    }

    pub fn message(&self) -> String {
        if self.reason == "FieldValueRequired" && self.detail.is_empty() {
            "Required value".to_string()
        } else {
            self.detail.clone()
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message())
    }
}

/// A value as the API server quotes it in error messages.
pub fn short_value(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Object(_) => "\"object\"".to_string(),
        Value::Array(_) => "\"array\"".to_string(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_message_names_field() {
        let e = ApiError::invalid(
            "AgentRun",
            "agentrun.dev",
            "x",
            &[FieldError::required("spec.command")],
        );
        assert_eq!(
            e.message,
            "AgentRun.agentrun.dev \"x\" is invalid: spec.command: Required value"
        );
    }
}
