//! The error envelope every API returns: `{code, message, details}`.
//!
//! Codes are stable strings that clients match on; messages are for people
//! and may change. [`ErrorCode::http_status`] is the one place that maps a
//! code to an HTTP status.

use serde::{Deserialize, Serialize};

/// Stable, machine-readable error codes. Adding a code is fine; renaming one
/// breaks clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was malformed or a value was out of range.
    InvalidArgument,
    /// The named object does not exist.
    NotFound,
    /// The object exists but is in a state that forbids the request.
    Conflict,
    /// The object is busy with another request that must finish first.
    InProgress,
    /// A tarball was refused: hostile entry, bad format, or over a limit.
    UnprocessableTar,
    /// The service (or the sandbox's agent) is not ready yet.
    NotReady,
    /// The sandbox's agent could not be reached or stopped answering.
    AgentUnreachable,
    /// A deadline passed before the work was done.
    Timeout,
    /// The caller is not authenticated or not allowed.
    Unauthorized,
    /// A bug or an unexpected host failure; the message says which step.
    Internal,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// The request body is larger than the route accepts.
    PayloadTooLarge,
    /// The request body is not of a type the route accepts (JSON routes
    /// require `Content-Type: application/json`).
    UnsupportedMediaType,
    /// The client did not send its request (or its body) in time.
    RequestTimeout,
    /// The sandbox stopped while a request ran in it (an exec or attach
    /// stream ends with this).
    SandboxStopped,
    /// The object's state does not allow this change (e.g. resuming an
    /// instance that is not suspended).
    InvalidTransition,
    /// The object is already where the request would take it.
    NoOp,
}

impl ErrorCode {
    /// The HTTP status an error with this code is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::InProgress => 409,
            ErrorCode::UnprocessableTar => 422,
            ErrorCode::Internal => 500,
            ErrorCode::AgentUnreachable => 502,
            ErrorCode::NotReady => 503,
            ErrorCode::Timeout => 504,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::SandboxStopped => 409,
            ErrorCode::InvalidTransition => 409,
            ErrorCode::NoOp => 409,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InProgress => "in_progress",
            ErrorCode::UnprocessableTar => "unprocessable_tar",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::AgentUnreachable => "agent_unreachable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Internal => "internal",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::SandboxStopped => "sandbox_stopped",
            ErrorCode::InvalidTransition => "invalid_transition",
            ErrorCode::NoOp => "no_op",
        }
    }

    /// The code a client should assume for a bare HTTP status (used when a
    /// response carries no envelope, e.g. from a proxy).
    pub fn from_http_status(status: u16) -> ErrorCode {
        match status {
            400 => ErrorCode::InvalidArgument,
            401 | 403 => ErrorCode::Unauthorized,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            408 => ErrorCode::RequestTimeout,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::PayloadTooLarge,
            415 => ErrorCode::UnsupportedMediaType,
            422 => ErrorCode::UnprocessableTar,
            502 => ErrorCode::AgentUnreachable,
            503 => ErrorCode::NotReady,
            504 => ErrorCode::Timeout,
            _ => ErrorCode::Internal,
        }
    }
}

/// The error envelope. `details` carries structured context, such as the tar
/// entry that was refused or the create step that timed out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error, utoipa::ToSchema)]
#[error("{message} ({})", code.as_str())]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into(), details: None }
    }

    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_as_snake_case() {
        let e = ApiError::new(ErrorCode::UnprocessableTar, "entry ../x escapes")
            .with_details(serde_json::json!({"entry": "../x"}));
        let s = serde_json::to_string(&e).unwrap();
        assert!(s.contains("\"code\":\"unprocessable_tar\""), "{s}");
        let back: ApiError = serde_json::from_str(&s).unwrap();
        assert_eq!(back, e);
        assert_eq!(back.http_status(), 422);
        assert_eq!(serde_json::to_value(e.code).unwrap(), e.code.as_str());
    }

    #[test]
    fn every_status_maps_back_to_its_code_family() {
        for code in [
            ErrorCode::InvalidArgument,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::UnprocessableTar,
            ErrorCode::NotReady,
            ErrorCode::AgentUnreachable,
            ErrorCode::Timeout,
            ErrorCode::Unauthorized,
            ErrorCode::Internal,
        ] {
            assert_eq!(ErrorCode::from_http_status(code.http_status()), code);
        }
    }
}
