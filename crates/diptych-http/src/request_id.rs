//! Request ids: each request gets one (the client's `X-Request-Id` if it sent
//! a UUID, a fresh one otherwise), answered in `X-Request-Id`, recorded on the
//! request's tracing span, and used as the correlation id of the events a
//! command writes when the client gave none.

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;
use uuid::Uuid;

/// The request id, as an extension of the request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RequestId(pub(crate) Uuid);

pub(crate) async fn assign(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|text| Uuid::parse_str(text.trim()).ok())
        .unwrap_or_else(Uuid::now_v7);
    request.extensions_mut().insert(RequestId(id));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path()
    );
    let mut response = next.run(request).instrument(span).await;
    if let Ok(value) = HeaderValue::from_str(&id.to_string()) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}
