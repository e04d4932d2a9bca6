//! Waiting for another service's consistency token (`catalog:1234`): the read
//! waits until that service's events are copied here and then until the view has
//! applied the copies; a token from a service not received here, or malformed,
//! is a 400 naming the field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use diptych_core::{
    AppendRequest, CollectionSpec, CommandContext, CommandOutcome, Declaration, EventStore,
    ExpectedVersion, HandlerKind, MemoryStore, MemoryViews, NewEvent, Position, StreamId,
    ViewCommit, ViewStore,
};
use diptych_http::{
    AppState, Application, ApplicationError, Auth, HttpConfig, StateAt, StreamState, app,
};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

struct Nothing;

#[async_trait]
impl Application for Nothing {
    fn commands(&self) -> Vec<&'static str> {
        Vec::new()
    }

    async fn execute(
        &self,
        name: &str,
        _: Value,
        _: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError> {
        Err(ApplicationError::UnknownCommand(name.to_owned()))
    }

    async fn state(&self, _: &StreamId, _: StateAt) -> Result<StreamState, ApplicationError> {
        Err(ApplicationError::NotFound("no states here".to_owned()))
    }
}

struct Service {
    state: AppState,
    store: Arc<MemoryStore>,
    views: Arc<MemoryViews>,
}

/// A service with two local events, a `tallies` view at 0 and the copies of
/// `catalog` at catalog position 0.
async fn append_two(store: &MemoryStore) {
    for n in 0..2 {
        store
            .append(AppendRequest {
                stream: StreamId::new("tally-a").unwrap(),
                expected: ExpectedVersion::Any,
                events: vec![NewEvent::new("Added", json!({ "n": n }))],
                idempotency_key: None,
            })
            .await
            .unwrap();
    }
}

async fn service_receiving(sources: &[(&str, &str)]) -> Service {
    let store = Arc::new(MemoryStore::new());
    append_two(&store).await;
    let views = Arc::new(MemoryViews::new());
    for (name, collections) in [
        ("tallies", vec![CollectionSpec::new("tallies")]),
        ("copies-catalog", vec![]),
    ] {
        views
            .register(&Declaration {
                name: name.to_owned(),
                kind: HandlerKind::Projection,
                collections,
            })
            .await
            .unwrap();
    }
    let state = AppState {
        application: Arc::new(Nothing),
        store: store.clone(),
        views: views.clone(),
        auth: Auth::open(),
        config: HttpConfig {
            default_wait: Duration::from_secs(2),
            sources: sources
                .iter()
                .map(|(source, projection)| (source.to_string(), projection.to_string()))
                .collect::<BTreeMap<_, _>>(),
            ..HttpConfig::default()
        },
    };
    Service {
        state,
        store,
        views,
    }
}

async fn commit(views: &MemoryViews, projection: &str, to: u64) {
    let record = views.projection(projection).await.unwrap();
    views
        .commit(ViewCommit::new(
            projection,
            record.generation,
            record.position,
            Position(to),
        ))
        .await
        .unwrap();
}

async fn read(state: &AppState, token: &str) -> (StatusCode, Option<String>, Value) {
    let request = Request::builder()
        .uri("/views/tallies")
        .header("X-Diptych-Wait-For", token)
        .body(Body::empty())
        .unwrap();
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let position = response
        .headers()
        .get("X-Diptych-Position")
        .map(|value| value.to_str().unwrap().to_owned());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, position, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn a_read_waits_for_the_copies_then_for_the_view() {
    let service = service_receiving(&[("catalog", "copies-catalog")]).await;
    let (store, views) = (service.store.clone(), service.views.clone());
    // The copies arrive (two local events, 3 and 4), then the view applies
    // what came before them, then them.
    let mover = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        append_two(&store).await;
        commit(&views, "copies-catalog", 900).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        commit(&views, "tallies", 2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        commit(&views, "tallies", 4).await;
    });
    let (status, position, body) = read(&service.state, "catalog:750").await;
    mover.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        position.as_deref(),
        Some("4"),
        "the view applied the copies, not only what was here before them"
    );
}

#[tokio::test]
async fn a_token_from_a_service_whose_events_have_not_arrived_times_out() {
    let service = service_receiving(&[("catalog", "copies-catalog")]).await;
    commit(&service.views, "tallies", 2).await;
    let (status, _, problem) = read(&service.state, "catalog:750").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(problem["code"], "wait_timeout");
    assert!(
        problem["detail"].as_str().unwrap().contains("`catalog`"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_token_from_a_service_not_received_here_is_refused() {
    let service = service_receiving(&[("catalog", "copies-catalog")]).await;
    let (status, _, problem) = read(&service.state, "billing:5").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert_eq!(problem["field"], "wait_for");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("tokens from catalog"),
        "{problem}"
    );

    let alone = service_receiving(&[]).await;
    let (status, _, problem) = read(&alone.state, "catalog:5").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("receives no other service's events"),
        "{problem}"
    );
}

#[tokio::test]
async fn a_malformed_token_is_refused() {
    let service = service_receiving(&[("catalog", "copies-catalog")]).await;
    for token in ["catalog:", "catalog:twelve", "catalog"] {
        let (status, _, problem) = read(&service.state, token).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{token}: {problem}");
        assert_eq!(problem["field"], "wait_for", "{token}: {problem}");
    }
}
