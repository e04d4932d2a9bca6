//! The read side of the API: views (with consistency tokens), streams, the log,
//! projections and health.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query as QueryString, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use diptych_core::{
    Comparison, Control, Cursor, Position, Query, StreamId, StreamRead, Timestamp, ViewError,
    WaitError, projection_status, wait_for,
};
use serde_json::{Value, json};

use crate::auth::Role;
use crate::commands::problem_of;
use crate::problem::Problem;
use crate::{AppState, POSITION_HEADER, StateAt, WAIT_FOR_HEADER};

type Parameters = QueryString<Vec<(String, String)>>;

/// The most items one page of a view or the log holds.
const MAX_PAGE: usize = 1000;

pub(crate) async fn get_document(
    State(state): State<AppState>,
    Path((view, key)): Path<(String, String)>,
    headers: HeaderMap,
    QueryString(parameters): Parameters,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let position = wait_if_asked(&state, &view, &headers, &parameters).await?;
    let document = state.views.get(&view, &key).await.map_err(view_problem)?;
    let Some(document) = document else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no document `{key}` in view `{view}`"),
        ));
    };
    Ok(with_position(Json(document).into_response(), position))
}

pub(crate) async fn query_view(
    State(state): State<AppState>,
    Path(view): Path<String>,
    headers: HeaderMap,
    QueryString(parameters): Parameters,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let position = wait_if_asked(&state, &view, &headers, &parameters).await?;
    let query = view_query(&parameters)?;
    let page = state
        .views
        .query(&view, &query)
        .await
        .map_err(view_problem)?;
    let items: Vec<Value> = page
        .items
        .into_iter()
        .map(|(key, document)| json!({ "key": key, "document": document }))
        .collect();
    let body = json!({ "items": items, "next_cursor": page.next.map(|cursor| cursor.to_string()) });
    Ok(with_position(Json(body).into_response(), position))
}

/// Reads a view query from the query string: `q` (words to search), `limit`,
/// `cursor`, `order` (`field`, or `-field` for largest first), and filters
/// `field=value` or `field[lt|le|gt|ge|eq]=value`. A value is read as JSON when
/// it is a number, `true` or `false`, or a quoted string, and as text otherwise.
fn view_query(parameters: &[(String, String)]) -> Result<Query, Problem> {
    let mut query = Query::default().limit(100);
    for (name, value) in parameters {
        match name.as_str() {
            "wait_for" => {}
            "q" => query = query.text(value.clone()),
            "limit" => {
                let limit: usize = value
                    .parse()
                    .ok()
                    .filter(|limit| (1..=MAX_PAGE).contains(limit))
                    .ok_or_else(|| {
                        invalid(
                            "limit",
                            format!("`limit` must be 1 to {MAX_PAGE}, not `{value}`"),
                        )
                    })?;
                query = query.limit(limit);
            }
            "cursor" => query = query.after(Cursor::from_text(value.clone())),
            "order" => {
                query = match value.strip_prefix('-') {
                    Some(field) => query.order_by(field, true),
                    None => query.order_by(value.clone(), false),
                }
            }
            filter => {
                let (field, comparison) = match filter.split_once('[') {
                    Some((field, operator)) => {
                        let comparison = match operator.trim_end_matches(']') {
                            "eq" => Comparison::Eq,
                            "lt" => Comparison::Lt,
                            "le" => Comparison::Le,
                            "gt" => Comparison::Gt,
                            "ge" => Comparison::Ge,
                            other => {
                                return Err(invalid(
                                    filter,
                                    format!(
                                        "`{other}` is not a comparison: use eq, lt, le, gt or ge"
                                    ),
                                ));
                            }
                        };
                        (field, comparison)
                    }
                    None => (filter, Comparison::Eq),
                };
                query = query.filter(field, comparison, filter_value(value));
            }
        }
    }
    Ok(query)
}

fn filter_value(text: &str) -> Value {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ (Value::Number(_) | Value::Bool(_) | Value::String(_))) => value,
        _ => Value::String(text.to_owned()),
    }
}

fn invalid(field: &str, detail: String) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail).with_field(field)
}

/// Waits for the position a client asked for (header or `wait_for`), then
/// returns the view's position for the answer's header.
async fn wait_if_asked(
    state: &AppState,
    view: &str,
    headers: &HeaderMap,
    parameters: &[(String, String)],
) -> Result<Position, Problem> {
    let asked = headers
        .get(WAIT_FOR_HEADER)
        .map(|value| value.to_str().unwrap_or("").to_owned())
        .or_else(|| {
            parameters
                .iter()
                .find(|(name, _)| name == "wait_for")
                .map(|(_, value)| value.clone())
        });
    if let Some(asked) = asked {
        let (source, position) = read_token(state, &asked)?;
        let timeout = state.config.default_wait.min(state.config.max_wait);
        let started = tokio::time::Instant::now();
        let position = match source {
            None => Position(position),
            Some((source, copies)) => {
                wait_for_source(state, source, copies, Position(position), timeout).await?
            }
        };
        let timeout = timeout.saturating_sub(started.elapsed());
        return match wait_for(&*state.views, view, position, timeout).await {
            Ok(reached) => Ok(reached),
            Err(WaitError::UnknownView(view)) => Err(unknown_view(&view)),
            Err(WaitError::Timeout { reached, .. }) => Err(Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "wait_timeout",
                format!(
                    "view `{view}` did not reach position {position} within {timeout:?} (it is at {reached}); try again"
                ),
            )),
            Err(WaitError::View(error)) => Err(view_problem(error)),
            Err(other) => Err(Problem::internal(&other)),
        };
    }
    state
        .views
        .served_position(view)
        .await
        .map_err(view_problem)
}

/// Another service, by name, and the local projection that copies its streams.
type Source<'a> = (&'a str, &'a str);

/// A consistency token: a position in this service's log (`1234`), or in
/// another's whose events this one receives (`catalog:1234`), with the local
/// projection that follows that service.
fn read_token<'a>(
    state: &'a AppState,
    asked: &'a str,
) -> Result<(Option<Source<'a>>, u64), Problem> {
    let (source, position) = match asked.trim().rsplit_once(':') {
        Some((source, position)) => (Some(source), position),
        None => (None, asked.trim()),
    };
    let position: u64 = position.parse().map_err(|_| {
        invalid(
            "wait_for",
            format!(
                "a consistency token is a log position (a whole number), or `<service>:<position>` for another service's, not `{asked}`"
            ),
        )
    })?;
    let Some(source) = source else {
        return Ok((None, position));
    };
    match state.config.sources.get_key_value(source) {
        Some((source, copies)) => Ok((Some((source.as_str(), copies.as_str())), position)),
        None => {
            let known: Vec<&str> = state.config.sources.keys().map(String::as_str).collect();
            Err(invalid(
                "wait_for",
                if known.is_empty() {
                    format!(
                        "this service receives no other service's events, so it cannot wait for a token from `{source}`"
                    )
                } else {
                    format!(
                        "this service receives no events from `{source}`; it can wait for tokens from {}",
                        known.join(", ")
                    )
                },
            ))
        }
    }
}

/// Waits until the events of `source` up to `position` are copied here, and
/// returns the local position below which they all are.
async fn wait_for_source(
    state: &AppState,
    source: &str,
    copies: &str,
    position: Position,
    timeout: Duration,
) -> Result<Position, Problem> {
    let not_yet = |reached: Position| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "wait_timeout",
            format!(
                "the events of `{source}` up to {position} did not arrive within {timeout:?} (they have up to {reached}); try again"
            ),
        )
    };
    match wait_for(&*state.views, copies, position, timeout).await {
        Ok(_) => {}
        // Nothing received from the source yet.
        Err(WaitError::UnknownView(_)) => return Err(not_yet(Position::START)),
        Err(WaitError::Timeout { reached, .. }) => return Err(not_yet(reached)),
        Err(WaitError::View(error)) => return Err(view_problem(error)),
        Err(other) => return Err(Problem::internal(&other)),
    }
    // Copies are appended before their checkpoint moves: the head now is past
    // every one of them.
    state
        .store
        .head()
        .await
        .map_err(|error| Problem::internal(&error))
}

fn with_position(mut response: Response, position: Position) -> Response {
    if let Ok(value) = HeaderValue::from_str(&position.0.to_string()) {
        response.headers_mut().insert(POSITION_HEADER, value);
    }
    response
}

fn unknown_view(view: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "unknown_view",
        format!("no view named `{view}`"),
    )
}

fn view_problem(error: ViewError) -> Problem {
    match error {
        ViewError::UnknownCollection(view) => unknown_view(&view),
        ViewError::NotIndexed { field, .. } => Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("the view cannot be filtered or ordered by `{field}`"),
        )
        .with_field(field),
        ViewError::InvalidQuery(detail) => {
            Problem::new(StatusCode::BAD_REQUEST, "invalid_query", detail)
        }
        other => Problem::internal(&other),
    }
}

fn stream_id(text: &str) -> Result<StreamId, Problem> {
    StreamId::new(text).map_err(|error| {
        Problem::new(StatusCode::BAD_REQUEST, "invalid_stream", error.to_string())
            .with_field("stream")
    })
}

fn number(parameters: &[(String, String)], name: &str, default: u64) -> Result<u64, Problem> {
    parameters
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| {
            value.parse().map_err(|_| {
                invalid(
                    name,
                    format!("`{name}` must be a whole number, not `{value}`"),
                )
            })
        })
        .transpose()
        .map(|value| value.unwrap_or(default))
}

pub(crate) async fn read_stream(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    QueryString(parameters): Parameters,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let stream = stream_id(&stream)?;
    let from = number(&parameters, "from", 1)?.max(1);
    let limit = number(&parameters, "limit", 100)?.clamp(1, MAX_PAGE as u64) as usize;
    let events = state
        .store
        .read_stream(StreamRead::forward(stream.clone(), from, limit))
        .await
        .map_err(|error| match error {
            diptych_core::ReadError::StreamNotFound { .. } => Problem::new(
                StatusCode::NOT_FOUND,
                "unknown_stream",
                format!("no stream `{stream}`"),
            ),
            other => Problem::internal(&other),
        })?;
    let next_from = (events.len() == limit).then(|| events.last().map(|e| e.stream_version + 1));
    let head = state
        .store
        .head()
        .await
        .map_err(|error| Problem::internal(&error))?;
    let body =
        json!({ "stream": stream.as_str(), "events": events, "next_from": next_from.flatten() });
    Ok(with_position(Json(body).into_response(), head))
}

pub(crate) async fn stream_state(
    State(state): State<AppState>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    QueryString(parameters): Parameters,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let stream = stream_id(&stream)?;
    let version = parameters.iter().find(|(name, _)| name == "version");
    let at = parameters.iter().find(|(name, _)| name == "at");
    let point = match (version, at) {
        (Some(_), Some(_)) => {
            return Err(invalid("at", "give `version` or `at`, not both".to_owned()));
        }
        (Some(_), None) => StateAt::Version(number(&parameters, "version", 0)?),
        (None, Some((_, at))) => StateAt::Time(Timestamp::parse_rfc3339(at).map_err(|error| {
            invalid(
                "at",
                format!("`at` must be an RFC 3339 time such as 2026-11-22T10:00:00Z: {error}"),
            )
        })?),
        (None, None) => StateAt::Latest,
    };
    let found = state
        .application
        .state(&stream, point)
        .await
        .map_err(problem_of)?;
    Ok(
        Json(json!({ "stream": stream.as_str(), "version": found.version, "state": found.state }))
            .into_response(),
    )
}

pub(crate) async fn read_log(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryString(parameters): Parameters,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let after = number(&parameters, "after", 0)?;
    let limit = number(&parameters, "limit", 100)?.clamp(1, MAX_PAGE as u64) as usize;
    let events = state
        .store
        .read_all(Position(after), limit)
        .await
        .map_err(|error| Problem::internal(&error))?;
    let next_after = events.last().map(|event| event.position.0);
    let head = state
        .store
        .head()
        .await
        .map_err(|error| Problem::internal(&error))?;
    let body = json!({ "events": events, "next_after": next_after });
    Ok(with_position(Json(body).into_response(), head))
}

pub(crate) async fn projections(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let statuses = projection_status(&*state.store, &*state.views)
        .await
        .map_err(|error| Problem::internal(&error))?;
    Ok(Json(statuses).into_response())
}

pub(crate) async fn rebuild(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Admin)?;
    match state.views.control(&name, Control::Rebuild).await {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "projection": name, "rebuild": "requested" })),
        )
            .into_response()),
        Err(ViewError::UnknownProjection(name)) => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_projection",
            format!("no projection named `{name}`"),
        )),
        Err(ViewError::NotPossible { reason, .. }) => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_rebuildable",
            reason,
        )),
        Err(other) => Err(Problem::internal(&other)),
    }
}

pub(crate) async fn live() -> Response {
    Json(json!({ "status": "live" })).into_response()
}

pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    let store = state.store.head().await;
    let views = state.views.projections().await;
    match (store, views) {
        (Ok(head), Ok(_)) => Json(json!({ "status": "ready", "head": head.0 })).into_response(),
        (store, views) => {
            let detail = format!(
                "event store: {}; views: {}",
                store.map_or_else(|e| e.to_string(), |_| "ok".to_owned()),
                views.map_or_else(|e| e.to_string(), |_| "ok".to_owned())
            );
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", detail).into_response()
        }
    }
}

/// `GET /`: the web console, one page embedded in the binary.
pub(crate) async fn console() -> Response {
    axum::response::Html(include_str!("console.html")).into_response()
}

pub(crate) async fn no_route() -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "no_route",
        "no such endpoint: see /openapi.json",
    )
}
