//! `GET /openapi.json`, generated from the table of endpoints below and the
//! application's command names. A test checks that every endpoint of the table
//! is routed, so the document and the router cannot drift apart silently.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItemBuilder,
};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::{InfoBuilder, OpenApiBuilder, PathsBuilder, Required};

use crate::AppState;
use crate::auth::Role;

/// Where a parameter goes.
#[derive(Clone, Copy)]
pub(crate) enum In {
    Path,
    Query,
    Header,
}

/// One endpoint of the API.
pub(crate) struct Endpoint {
    pub(crate) post: bool,
    pub(crate) path: &'static str,
    pub(crate) summary: &'static str,
    /// The least role needed when tokens are configured; `None`: open.
    pub(crate) role: Option<Role>,
    pub(crate) parameters: &'static [(&'static str, In, &'static str)],
}

const WAIT: (&str, In, &str) = (
    "X-Diptych-Wait-For",
    In::Header,
    "A consistency token the view must have applied first: a position in this log, or `<service>:<position>` for another service whose events are copied here; also `?wait_for=`",
);

/// Every endpoint, as served by [`crate::app`].
pub(crate) const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        post: true,
        path: "/commands/{name}",
        summary: "Run a command (JSON body). Answers its events and X-Diptych-Position.",
        role: Some(Role::Writer),
        parameters: &[
            ("name", In::Path, "The command's name"),
            (
                "Idempotency-Key",
                In::Header,
                "Repeats return the first result and write nothing",
            ),
            (
                "If-Match",
                In::Header,
                "The stream version the command expects",
            ),
            (
                "X-Correlation-Id",
                In::Header,
                "A UUID carried into the events' metadata",
            ),
        ],
    },
    Endpoint {
        post: false,
        path: "/views/{view}",
        summary: "Query a view: field=value, field[lt|le|gt|ge]=value, q, order, limit, cursor",
        role: Some(Role::Reader),
        parameters: &[
            ("view", In::Path, "The view"),
            ("q", In::Query, "Words to search in the view's text fields"),
            (
                "order",
                In::Query,
                "An indexed field, or -field for largest first",
            ),
            ("limit", In::Query, "Page size, 1 to 1000 (100)"),
            ("cursor", In::Query, "The next_cursor of the previous page"),
            WAIT,
        ],
    },
    Endpoint {
        post: false,
        path: "/views/{view}/{key}",
        summary: "One document of a view",
        role: Some(Role::Reader),
        parameters: &[
            ("view", In::Path, "The view"),
            ("key", In::Path, "The key"),
            WAIT,
        ],
    },
    Endpoint {
        post: false,
        path: "/views/{view}/{key}/live",
        summary: "Server-Sent Events: the document, then each new version",
        role: Some(Role::Reader),
        parameters: &[
            ("view", In::Path, "The view"),
            ("key", In::Path, "The key"),
            (
                "Last-Event-ID",
                In::Header,
                "Resume after this position (or ?after=)",
            ),
        ],
    },
    Endpoint {
        post: false,
        path: "/streams/{stream}",
        summary: "A stream's events (its audit trail), paged with from and limit",
        role: Some(Role::Reader),
        parameters: &[
            ("stream", In::Path, "The stream, <kind>-<id>"),
            ("from", In::Query, "The first version (1)"),
            ("limit", In::Query, "Page size, 1 to 1000 (100)"),
        ],
    },
    Endpoint {
        post: false,
        path: "/streams/{stream}/state",
        summary: "The aggregate's state, now or at ?version= or ?at=<RFC 3339>",
        role: Some(Role::Reader),
        parameters: &[
            ("stream", In::Path, "The stream, <kind>-<id>"),
            ("version", In::Query, "The state after this version"),
            ("at", In::Query, "The state at this time"),
        ],
    },
    Endpoint {
        post: false,
        path: "/events",
        summary: "The global log after a position",
        role: Some(Role::Reader),
        parameters: &[
            ("after", In::Query, "A position (0)"),
            ("limit", In::Query, "Page size, 1 to 1000 (100)"),
        ],
    },
    Endpoint {
        post: false,
        path: "/events/live",
        summary: "Server-Sent Events: the global log after a position, then live",
        role: Some(Role::Reader),
        parameters: &[
            ("after", In::Query, "A position (0)"),
            ("Last-Event-ID", In::Header, "Resume after this position"),
        ],
    },
    Endpoint {
        post: false,
        path: "/projections",
        summary: "Each projection's position, head, lag, state and parked events",
        role: Some(Role::Reader),
        parameters: &[],
    },
    Endpoint {
        post: true,
        path: "/projections/{name}/rebuild",
        summary: "Rebuild a projection blue/green",
        role: Some(Role::Admin),
        parameters: &[("name", In::Path, "The projection")],
    },
    Endpoint {
        post: false,
        path: "/metrics",
        summary: "Prometheus metrics",
        role: None,
        parameters: &[],
    },
    Endpoint {
        post: false,
        path: "/health/live",
        summary: "The process is up",
        role: None,
        parameters: &[],
    },
    Endpoint {
        post: false,
        path: "/health/ready",
        summary: "The stores answer",
        role: None,
        parameters: &[],
    },
    Endpoint {
        post: false,
        path: "/",
        summary: "The web console: projections, a view browser, the log live",
        role: None,
        parameters: &[],
    },
    Endpoint {
        post: false,
        path: "/openapi.json",
        summary: "This document",
        role: None,
        parameters: &[],
    },
];

/// `GET /openapi.json`.
pub(crate) async fn document(State(state): State<AppState>) -> Response {
    let mut paths = PathsBuilder::new();
    for endpoint in ENDPOINTS {
        let mut description = endpoint.summary.to_owned();
        if endpoint.path == "/commands/{name}" {
            description.push_str(&format!(
                ". Commands: {}",
                state.application.commands().join(", ")
            ));
        }
        if let Some(role) = endpoint.role {
            description.push_str(&format!(". Needs the {role:?} role.").to_lowercase());
        }
        let mut operation = OperationBuilder::new()
            .summary(Some(endpoint.summary))
            .description(Some(description))
            .response("200", ResponseBuilder::new().description("Success").build())
            .response(
                "4XX",
                ResponseBuilder::new()
                    .description("application/problem+json with a stable `code`")
                    .build(),
            );
        for (name, location, description) in endpoint.parameters {
            let (parameter_in, required) = match location {
                In::Path => (ParameterIn::Path, Required::True),
                In::Query => (ParameterIn::Query, Required::False),
                In::Header => (ParameterIn::Header, Required::False),
            };
            operation = operation.parameter(
                ParameterBuilder::new()
                    .name(*name)
                    .parameter_in(parameter_in)
                    .required(required)
                    .description(Some(*description)),
            );
        }
        let method = if endpoint.post {
            HttpMethod::Post
        } else {
            HttpMethod::Get
        };
        paths = paths.path(
            endpoint.path,
            PathItemBuilder::new().operation(method, operation).build(),
        );
    }
    let document = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("diptych service")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Commands, views with consistency tokens, streams, the log, live feeds \
                     and projections of a service built with diptych.",
                ))
                .build(),
        )
        .paths(paths.build())
        .build();
    Json(document).into_response()
}
