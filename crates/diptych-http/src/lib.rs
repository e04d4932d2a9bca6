//! The HTTP layer every diptych service gets: commands, views, streams, the
//! global log, projections, health, bearer-token auth and problem+json errors.
//!
//! An application plugs in through [`Application`]: it runs a command given its
//! name and JSON body, and folds a stream into its state at a version or a time.
//! Everything else (views, streams, the log, projections) is served straight from
//! the [`EventStore`] and [`ViewStore`] in [`AppState`], so this crate knows no
//! domain and the domain knows no HTTP. [`app`] returns the whole `Router`, which
//! tests drive with `oneshot(request)` and servers bind to a socket.
//!
//! Errors are `application/problem+json` with a stable `code`: 400 for input
//! that cannot be read (the field named), 404 for an unknown command, view,
//! stream or document, 409 for a version conflict, 422 for a business rule, 413
//! for a body over the limit, 401/403 for missing or insufficient credentials. A
//! failure of the service itself is a 500 that shows only an error id; its
//! cause goes to the log under that id. Every answer carries `X-Request-Id`,
//! which is also the correlation id of a command's events unless the client
//! sent `X-Correlation-Id`.

mod auth;
mod commands;
mod errors;
mod live;
mod metrics;
mod observe;
mod openapi;
mod problem;
mod reads;
mod request_id;
mod roles;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::routing::{get, post};
use diptych_core::{CommandContext, CommandOutcome, EventStore, StreamId, Timestamp, ViewStore};

pub use auth::{Auth, Role};
pub use metrics::metered;
pub use problem::Problem;

/// The name of the header carrying a consistency token (a log position): set on
/// every answer, and read by view queries that must include a client's write.
pub const POSITION_HEADER: &str = "x-diptych-position";
/// The request header asking a view read to wait for a position.
pub const WAIT_FOR_HEADER: &str = "x-diptych-wait-for";

/// A point in a stream's history to read its state at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateAt {
    /// The latest state.
    Latest,
    /// After this version.
    Version(u64),
    /// As it was at this time.
    Time(Timestamp),
}

/// A stream's state as an application folds it.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamState {
    /// The version the state reflects.
    pub version: u64,
    /// The state, as JSON.
    pub state: serde_json::Value,
}

/// Why an application did not run a command or fold a state.
#[derive(Debug, thiserror::Error)]
pub enum ApplicationError {
    /// No command of that name.
    #[error("no command named `{0}`")]
    UnknownCommand(String),
    /// The input cannot be read or a field is invalid.
    #[error("{message}")]
    InvalidInput {
        /// The field at fault, when known.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A business rule said no.
    #[error("{message}")]
    Rejected {
        /// The stable code (`insufficient_stock`).
        code: &'static str,
        /// The HTTP status, a 4xx: 422 for a business rule unless the domain
        /// says otherwise (see [`diptych_core::RejectionCode::status`]).
        status: u16,
        /// What happened, for people.
        message: String,
    },
    /// `If-Match` named another version than the aggregate's.
    #[error("the stream is at version {actual}, not {expected}")]
    Conflict {
        /// The version asked for.
        expected: u64,
        /// The version found.
        actual: u64,
    },
    /// The stream kept changing under the command (many writers on one
    /// aggregate); trying again later may succeed.
    #[error("the stream is busy: {0}")]
    Busy(String),
    /// The idempotency key was used before for another command.
    #[error("this idempotency key was used for another command")]
    IdempotencyKeyReused,
    /// Nothing there (a stream the application does not know).
    #[error("{0}")]
    NotFound(String),
    /// The service failed; the cause is logged, not shown.
    #[error("internal error: {0}")]
    Internal(Box<dyn std::error::Error + Send + Sync>),
}

/// What a service built on diptych plugs into the HTTP layer.
#[async_trait]
pub trait Application: Send + Sync + 'static {
    /// The names of the commands it takes.
    fn commands(&self) -> Vec<&'static str>;

    /// For a command it does not take but another service does: where to send
    /// it, for people (answered with 421 `wrong_service` rather than 404).
    fn taken_elsewhere(&self, command: &str) -> Option<String> {
        let _ = command;
        None
    }

    /// Runs the command `name` with its JSON body.
    async fn execute(
        &self,
        name: &str,
        body: serde_json::Value,
        context: &CommandContext,
    ) -> Result<CommandOutcome, ApplicationError>;

    /// The state of the aggregate behind `stream` at a point of its history.
    async fn state(&self, stream: &StreamId, at: StateAt) -> Result<StreamState, ApplicationError>;
}

/// Settings of the HTTP layer.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// The largest request body accepted, in bytes.
    pub body_limit: usize,
    /// How long a read waits for a consistency token at most.
    pub max_wait: Duration,
    /// The wait when a client asks for one without a limit of its own.
    pub default_wait: Duration,
    /// Whether this node takes commands (the `command` role). A node that does
    /// not answers `POST /commands/…` with 421 and says where to send them.
    pub commands: bool,
    /// Whether this node serves views, streams and the log (the `query` role).
    pub reads: bool,
    /// Other services whose consistency tokens a read may wait for
    /// (`X-Diptych-Wait-For: catalog:1234`), each with the local projection
    /// whose checkpoint is a position in that service's log (its
    /// [`diptych_core::StreamCopies`] consumer).
    pub sources: BTreeMap<String, String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            body_limit: 64 * 1024,
            max_wait: Duration::from_secs(30),
            default_wait: Duration::from_secs(5),
            commands: true,
            reads: true,
            sources: BTreeMap::new(),
        }
    }
}

/// Everything the routes need.
#[derive(Clone)]
pub struct AppState {
    /// The application.
    pub application: Arc<dyn Application>,
    /// Its event store.
    pub store: Arc<dyn EventStore>,
    /// Its view store.
    pub views: Arc<dyn ViewStore>,
    /// Who may do what.
    pub auth: Auth,
    /// Limits.
    pub config: HttpConfig,
}

/// The whole HTTP API of a service.
pub fn app(state: AppState) -> Router {
    metrics::install();
    let body_limit = state.config.body_limit;
    let commands = if state.config.commands {
        Router::new().route("/commands/{name}", post(commands::execute))
    } else {
        Router::new().route("/commands/{name}", post(roles::not_a_command_node))
    };
    let reads = if state.config.reads {
        Router::new()
            .route("/views/{view}", get(reads::query_view))
            .route("/views/{view}/{key}", get(reads::get_document))
            .route("/streams/{stream}", get(reads::read_stream))
            .route("/streams/{stream}/state", get(reads::stream_state))
            .route("/events", get(reads::read_log))
            .route("/events/live", get(live::events))
            .route("/views/{view}/{key}/live", get(live::document))
    } else {
        Router::new()
            .route("/views/{*rest}", get(roles::not_a_query_node))
            .route("/streams/{*rest}", get(roles::not_a_query_node))
            .route("/events", get(roles::not_a_query_node))
            .route("/events/live", get(roles::not_a_query_node))
    };
    Router::new()
        .route("/", get(reads::console))
        .route("/metrics", get(metrics::render))
        .route("/openapi.json", get(openapi::document))
        .merge(commands)
        .merge(reads)
        .route("/projections", get(reads::projections))
        .route("/projections/{name}/rebuild", post(reads::rebuild))
        .route("/health/live", get(reads::live))
        .route("/health/ready", get(reads::ready))
        .fallback(reads::no_route)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(observe::Observe)
        .with_state(state)
}
