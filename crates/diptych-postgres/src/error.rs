//! Errors of opening a store, and the mapping of PostgreSQL errors to core's kinds.

use diptych_core::BackendError;

/// Why a store could not be opened. Nothing is written in any case but the
/// migrations of a schema this build knows.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The schema name cannot be used as a PostgreSQL identifier as given.
    #[error(
        "`{0}` is not a valid schema name: use 1 to 48 lowercase letters, digits and underscores, starting with a letter"
    )]
    InvalidSchemaName(String),
    /// The schema was written by a newer diptych.
    #[error(
        "the {component} tables in schema `{schema}` are at version {found}, newer than the {supported} this build of diptych knows: upgrade diptych to use them"
    )]
    NewerSchema {
        /// The PostgreSQL schema.
        schema: String,
        /// Which tables: `events` or `views`.
        component: &'static str,
        /// Their version.
        found: i64,
        /// The newest this build supports.
        supported: i64,
    },
    /// The database could not be reached or set up.
    #[error("could not open the PostgreSQL store: {0}")]
    Backend(#[from] BackendError),
}

/// Wraps a PostgreSQL error with what was being done, keeping the server's own
/// message (its `DbError`) visible in the chain.
pub(crate) fn backend(context: impl Into<String>, error: tokio_postgres::Error) -> BackendError {
    BackendError::with_source(context, error)
}

/// Wraps a pool error (no connection could be had) with what was being done.
pub(crate) fn pool_error(context: &str, error: deadpool_postgres::PoolError) -> BackendError {
    BackendError::with_source(format!("{context}: no PostgreSQL connection"), error)
}
