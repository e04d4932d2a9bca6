//! The answers of a node for endpoints its roles do not serve: the write side
//! and the query side can run as separate processes on one PostgreSQL.

use axum::http::StatusCode;

use crate::problem::Problem;

/// `POST /commands/…` on a node without the `command` role.
pub(crate) async fn not_a_command_node() -> Problem {
    Problem::new(
        StatusCode::MISDIRECTED_REQUEST,
        "not_a_command_node",
        "this node does not take commands (it runs without the `command` role): send \
         commands to a node started with --role command",
    )
}

/// A read on a node without the `query` role.
pub(crate) async fn not_a_query_node() -> Problem {
    Problem::new(
        StatusCode::MISDIRECTED_REQUEST,
        "not_a_query_node",
        "this node does not serve views, streams or the log (it runs without the `query` \
         role): read from a node started with --role query",
    )
}
