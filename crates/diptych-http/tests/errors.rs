//! The error answers an application cannot provoke on purpose: a service
//! failure (a 500 that shows an error id, never the cause) and a stream too busy
//! to take the command (503), a rejection's own status (and 422 in place of a
//! status that is not a client error), through an application that fails on
//! demand.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use diptych_core::{CommandContext, CommandOutcome, MemoryStore, MemoryViews, StreamId};
use diptych_http::{
    AppState, Application, ApplicationError, Auth, HttpConfig, StateAt, StreamState, app,
};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// Fails every command the way its name says.
struct Failing;

#[async_trait]
impl Application for Failing {
    fn commands(&self) -> Vec<&'static str> {
        vec!["Crash", "Contend", "Locked", "Misstated"]
    }

    async fn execute(
        &self,
        name: &str,
        _: Value,
        _: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError> {
        Err(match name {
            "Crash" => ApplicationError::Internal("disk on fire at /var/secret/path".into()),
            "Locked" => ApplicationError::Rejected {
                code: "locked",
                status: 423,
                message: "the account is locked".to_owned(),
            },
            "Misstated" => ApplicationError::Rejected {
                code: "odd",
                status: 200,
                message: "a refusal that claims success".to_owned(),
            },
            _ => ApplicationError::Busy("the aggregate kept changing".to_owned()),
        })
    }

    async fn state(&self, _: &StreamId, _: StateAt) -> Result<StreamState, ApplicationError> {
        Err(ApplicationError::Internal("no states here".into()))
    }
}

async fn post(command: &str) -> (StatusCode, Value) {
    let state = AppState {
        application: Arc::new(Failing),
        store: Arc::new(MemoryStore::new()),
        views: Arc::new(MemoryViews::new()),
        auth: Auth::open(),
        config: HttpConfig::default(),
    };
    let request = Request::builder()
        .method("POST")
        .uri(format!("/commands/{command}"))
        .body(Body::from("{}"))
        .unwrap();
    let response = app(state).oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn a_service_failure_is_a_500_with_an_error_id_and_no_cause() {
    let (status, problem) = post("Crash").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(problem["code"], "internal");
    assert!(
        problem["error_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36),
        "{problem}"
    );
    assert!(
        !problem.to_string().contains("secret"),
        "the cause leaked: {problem}"
    );
}

#[tokio::test]
async fn a_stream_too_busy_is_a_503_to_retry() {
    let (status, problem) = post("Contend").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(problem["code"], "stream_busy");
}

#[tokio::test]
async fn a_rejection_is_answered_with_its_own_client_error_status() {
    let (status, problem) = post("Locked").await;
    assert_eq!(status, StatusCode::LOCKED);
    assert_eq!(problem["code"], "locked");
    assert_eq!(problem["status"], 423);
    let (status, problem) = post("Misstated").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem["code"], "odd");
}
