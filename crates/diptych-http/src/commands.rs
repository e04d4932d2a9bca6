//! `POST /commands/{name}`: the command side.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use diptych_core::{CommandContext, CommandOutcome};
use serde::Serialize;
use uuid::Uuid;

use crate::auth::Role;
use crate::problem::Problem;
use crate::request_id::RequestId;
use crate::{AppState, ApplicationError, POSITION_HEADER};

/// Ids derived from idempotency keys that are not UUIDs live under this namespace.
const IDEMPOTENCY_NAMESPACE: Uuid = Uuid::from_u128(0x6469_7074_7963_6800_0000_0000_0000_0001);

pub(crate) async fn execute(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    request_id: Option<Extension<RequestId>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Writer)?;
    if !state.application.commands().contains(&name.as_str()) {
        if let Some(elsewhere) = state.application.taken_elsewhere(&name) {
            return Err(Problem::new(
                StatusCode::MISDIRECTED_REQUEST,
                "wrong_service",
                format!("`{name}` is not taken here: {elsewhere}"),
            ));
        }
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_command",
            format!(
                "no command named `{name}`; this service takes {}",
                state.application.commands().join(", ")
            ),
        ));
    }
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!(
                    "the body is over the limit of {} bytes",
                    state.config.body_limit
                ),
            )
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "unreadable_body",
                rejection.body_text(),
            )
        }
    })?;
    let body: serde_json::Value = serde_json::from_slice(&body).map_err(|error| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not JSON: {error}"),
        )
    })?;
    let mut context = context_from(&headers)?;
    if context.correlation_id.is_none() {
        context.correlation_id = request_id.map(|Extension(RequestId(id))| id);
    }
    let started = std::time::Instant::now();
    let result = state.application.execute(&name, body, &context).await;
    let outcome = match &result {
        Ok(_) => "ok",
        Err(
            ApplicationError::Rejected { .. }
            | ApplicationError::Conflict { .. }
            | ApplicationError::Busy(_),
        ) => "rejected",
        Err(ApplicationError::Internal(_)) => "failed",
        Err(_) => "invalid",
    };
    crate::metrics::record_command(&name, outcome, started);
    Ok(outcome_response(&result.map_err(problem_of)?))
}

/// The command's context from its headers: `Idempotency-Key` becomes the command
/// id (a UUID as is, any other text hashed into one), `If-Match` the expected
/// version, `X-Correlation-Id` the correlation id.
fn context_from(headers: &HeaderMap) -> Result<CommandContext, Problem> {
    let text = |name: &str| -> Result<Option<String>, Problem> {
        headers
            .get(name)
            .map(|value| {
                value.to_str().map(str::to_owned).map_err(|_| {
                    Problem::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_header",
                        format!("the `{name}` header is not text"),
                    )
                    .with_field(name)
                })
            })
            .transpose()
    };
    let mut context = match text("idempotency-key")? {
        Some(key) if key.trim().is_empty() || key.len() > 200 => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "`Idempotency-Key` must be 1 to 200 characters",
            )
            .with_field("Idempotency-Key"));
        }
        Some(key) => CommandContext::new(
            Uuid::parse_str(&key)
                .unwrap_or_else(|_| Uuid::new_v5(&IDEMPOTENCY_NAMESPACE, key.as_bytes())),
        ),
        None => CommandContext::default(),
    };
    if let Some(version) = text("if-match")? {
        let version = version.trim().trim_matches('"');
        let version: u64 = version.parse().map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                format!("`If-Match` must be a stream version (a whole number), not `{version}`"),
            )
            .with_field("If-Match")
        })?;
        context = context.expecting_version(version);
    }
    if let Some(correlation) = text("x-correlation-id")? {
        context.correlation_id = Some(Uuid::parse_str(correlation.trim()).map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_header",
                "`X-Correlation-Id` must be a UUID",
            )
            .with_field("X-Correlation-Id")
        })?);
    }
    Ok(context)
}

/// A command's answer, written straight from the outcome it describes.
#[derive(Serialize)]
struct Answer<'a> {
    stream: &'a str,
    version: u64,
    position: u64,
    deduplicated: bool,
    events: Vec<AnswerEvent<'a>>,
}

/// One event the command stored.
#[derive(Serialize)]
struct AnswerEvent<'a> {
    #[serde(rename = "type")]
    event_type: &'a str,
    version: u64,
    position: u64,
    data: &'a serde_json::Value,
}

fn outcome_response(outcome: &CommandOutcome) -> Response {
    let answer = Answer {
        stream: outcome.stream.as_str(),
        version: outcome.version,
        position: outcome.position.0,
        deduplicated: outcome.deduplicated,
        events: outcome
            .events
            .iter()
            .map(|event| AnswerEvent {
                event_type: &event.event_type,
                version: event.stream_version,
                position: event.position.0,
                data: &event.payload,
            })
            .collect(),
    };
    let mut response = Json(answer).into_response();
    if let Ok(value) = HeaderValue::from_str(&outcome.position.0.to_string()) {
        response.headers_mut().insert(POSITION_HEADER, value);
    }
    response
}

/// The answer for an application's refusal.
pub(crate) fn problem_of(error: ApplicationError) -> Problem {
    match error {
        ApplicationError::UnknownCommand(name) => Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_command",
            format!("no command named `{name}`"),
        ),
        ApplicationError::InvalidInput { field, message } => {
            let problem = Problem::new(StatusCode::BAD_REQUEST, "invalid_field", message);
            match field {
                Some(field) => problem.with_field(field),
                None => problem,
            }
        }
        ApplicationError::Rejected {
            code,
            status,
            message,
        } => {
            // Only a client error may come from a rejection: a domain that says
            // 200 or 500 for a refusal is answered with the rule's usual 422.
            let status = StatusCode::from_u16(status)
                .ok()
                .filter(StatusCode::is_client_error)
                .unwrap_or(StatusCode::UNPROCESSABLE_ENTITY);
            Problem::new(status, code, message)
        }
        ApplicationError::Conflict { expected, actual } => Problem::new(
            StatusCode::CONFLICT,
            "version_conflict",
            format!(
                "the stream is at version {actual}, not {expected}: read it again and decide anew"
            ),
        ),
        ApplicationError::Busy(detail) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "stream_busy",
            format!("{detail}; try again"),
        ),
        ApplicationError::IdempotencyKeyReused => Problem::new(
            StatusCode::CONFLICT,
            "idempotency_key_reused",
            "this Idempotency-Key was used for another command; use a fresh key",
        ),
        ApplicationError::NotFound(message) => {
            Problem::new(StatusCode::NOT_FOUND, "not_found", message)
        }
        ApplicationError::Internal(cause) => Problem::internal(&cause),
    }
}
