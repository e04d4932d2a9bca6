//! Server-Sent Events: the global log, and one view document, live.
//!
//! Each SSE event's `id` is a log position. A client that reconnects with
//! `Last-Event-ID` (browsers do it by themselves) or `?after=` resumes after it,
//! with no gap and no duplicate: the log feed is a subscription from that
//! position, and the document feed sends the document whenever the view's
//! checkpoint passes it and the document changed.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query as QueryString, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use diptych_core::{Position, Subscription};
use futures_util::stream::{self, Stream};

use crate::AppState;
use crate::auth::Role;
use crate::problem::Problem;

/// How often an idle feed sends a comment, so proxies keep the connection.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Where a feed resumes: `Last-Event-ID`, else `?after=`, else `default`.
fn resume_after(
    headers: &HeaderMap,
    parameters: &[(String, String)],
    default: u64,
) -> Result<Position, Problem> {
    let given = headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            parameters
                .iter()
                .find(|(name, _)| name == "after")
                .map(|(_, value)| value.clone())
        });
    match given {
        None => Ok(Position(default)),
        Some(text) => text.trim().parse().map(Position).map_err(|_| {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("a feed resumes after a log position (a whole number), not `{text}`"),
            )
            .with_field("after")
        }),
    }
}

/// `GET /events/live`: every event after the given position, then live.
pub(crate) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    QueryString(parameters): QueryString<Vec<(String, String)>>,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let after = resume_after(&headers, &parameters, 0)?;
    let subscription = Subscription::new(state.store.clone(), after);
    let feed = stream::unfold(subscription, |mut subscription| async move {
        match subscription.next().await {
            Ok(event) => {
                let sse = Event::default()
                    .id(event.position.0.to_string())
                    .event(event.event_type.clone())
                    .json_data(&event)
                    .unwrap_or_else(|_| Event::default().comment("unencodable event"));
                Some((Ok::<_, Infallible>(sse), subscription))
            }
            // The store closed: end the feed; the client reconnects and resumes.
            Err(_) => None,
        }
    });
    Ok(sse(feed))
}

/// `GET /views/{view}/{key}/live`: the document now (if the view is past the
/// resume position), then each new version of it.
pub(crate) async fn document(
    State(state): State<AppState>,
    Path((view, key)): Path<(String, String)>,
    headers: HeaderMap,
    QueryString(parameters): QueryString<Vec<(String, String)>>,
) -> Result<Response, Problem> {
    state.auth.require(&headers, Role::Reader)?;
    let after = resume_after(&headers, &parameters, 0)?;
    let owner = state.views.owner_of(&view).await.map_err(|_| {
        Problem::new(
            StatusCode::NOT_FOUND,
            "unknown_view",
            format!("no view named `{view}`"),
        )
    })?;
    // A partitioned view moves when any partition does.
    let watch = diptych_core::view::group_watch(&*state.views, &owner);
    struct Follow {
        state: AppState,
        view: String,
        key: String,
        watch: tokio::sync::watch::Receiver<Position>,
        sent: Position,
        last: Option<Option<serde_json::Value>>,
    }
    let start = Follow {
        state,
        view,
        key,
        watch,
        sent: after,
        last: None,
    };
    let feed = stream::unfold(start, |mut follow| async move {
        loop {
            let position = *follow.watch.borrow_and_update();
            if position > follow.sent {
                let document = follow
                    .state
                    .views
                    .get(&follow.view, &follow.key)
                    .await
                    .ok()?;
                follow.sent = position;
                let changed = follow.last.as_ref() != Some(&document);
                follow.last = Some(document.clone());
                if changed {
                    let data = document.unwrap_or(serde_json::Value::Null);
                    let sse = Event::default()
                        .id(position.0.to_string())
                        .event("document")
                        .json_data(&data)
                        .unwrap_or_else(|_| Event::default().comment("unencodable document"));
                    return Some((Ok::<_, Infallible>(sse), follow));
                }
            }
            follow.watch.changed().await.ok()?;
        }
    });
    Ok(sse(feed))
}

fn sse(feed: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(feed)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}
