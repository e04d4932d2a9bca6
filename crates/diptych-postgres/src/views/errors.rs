//! PostgreSQL errors as the view store reports them.

use diptych_core::BackendError;
use tokio_postgres::error::SqlState;

/// The server's own message, which `tokio_postgres::Error`'s display ("db
/// error") leaves out.
pub(crate) fn describe(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map_or_else(|| error.to_string(), |db| db.message().to_owned())
}

/// A failure while doing `context`, saying what the server said.
pub(crate) fn failure(context: impl AsRef<str>, error: tokio_postgres::Error) -> BackendError {
    BackendError::with_source(format!("{}: {}", context.as_ref(), describe(&error)), error)
}

/// Whether a read failed because its table was dropped by a generation switch.
pub(crate) fn table_gone(error: &BackendError) -> bool {
    // The source may be wrapped (in an `Arc`): look down the whole chain.
    std::iter::successors(std::error::Error::source(error), |cause| cause.source()).any(|cause| {
        cause
            .downcast_ref::<tokio_postgres::error::DbError>()
            .is_some_and(|db| *db.code() == SqlState::UNDEFINED_TABLE)
    })
}
