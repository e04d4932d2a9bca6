//! Request ids: each request gets one (the client's `X-Request-Id` if it sent
//! a UUID, a fresh one otherwise), answered in `X-Request-Id`, recorded on the
//! request's tracing span, and used as the correlation id of the events a
//! command writes when the client gave none. [`crate::observe`] assigns them.

use axum::extract::Request;
use uuid::Uuid;

/// The request id, as an extension of the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestId(pub(crate) Uuid);

/// The id the client sent, if it is a UUID, or a fresh one.
pub(crate) fn id_of(request: &Request) -> Uuid {
    request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| Uuid::parse_str(text.trim()).ok())
        .unwrap_or_else(Uuid::now_v7)
}
