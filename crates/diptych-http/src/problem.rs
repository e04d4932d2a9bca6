//! `application/problem+json` errors with stable codes.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// An error answer: an HTTP status, a stable `code` clients match on, a title
/// and detail for people, and the field at fault when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem(Box<Body>);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Body {
    status: u16,
    code: String,
    title: String,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_id: Option<String>,
}

impl Problem {
    /// A problem with this status, code and detail.
    pub fn new(status: StatusCode, code: &str, detail: impl Into<String>) -> Self {
        Self(Box::new(Body {
            status: status.as_u16(),
            code: code.to_owned(),
            title: status.canonical_reason().unwrap_or("error").to_owned(),
            detail: detail.into(),
            field: None,
            error_id: None,
        }))
    }

    /// Names the field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.0.field = Some(field.into());
        self
    }

    /// A 500 that shows only an error id; the cause is logged under it (within
    /// the request's span, which carries the request id).
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        let error_id = uuid::Uuid::now_v7().to_string();
        tracing::error!(error_id = %error_id, error = %cause, "internal error");
        let mut problem = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the service failed to handle the request; report the error id",
        );
        problem.0.error_id = Some(error_id);
        problem
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// The stable code.
    pub fn code(&self) -> &str {
        &self.0.code
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&*self.0).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}
