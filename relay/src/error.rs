//! The one error type of the relay's handlers: a status code and a message that says what to
//! do, answered as `{"error": "..."}`.

use agentrun_protocol::RunId;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// An error answered as `{"error": "..."}` with a status code.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// Redis (at `target`, as the settings name it) did not answer.
    pub fn redis(target: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Redis at {target} did not answer ({e}); retry when it is reachable"),
        )
    }

    pub fn not_found(run: &RunId) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!(
                "run {run} was not found in Redis: it never started here, or it ended and its data expired; list runs with GET /api/runs"
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}
