//! Errors of opening a store, and the mapping of SQLite errors to core's kinds.

use std::path::PathBuf;

use diptych_core::BackendError;

/// Why a store could not be opened. Nothing is written to the file in any case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The file exists but is not a diptych database.
    #[error(
        "{path} is not a diptych database ({reason}): point diptych at another file or an empty directory"
    )]
    NotDiptychDatabase {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The file was written by a newer diptych with a schema this build cannot read.
    #[error(
        "{path} has schema version {found}, newer than the {supported} this build of diptych knows: upgrade diptych to open it"
    )]
    NewerSchema {
        /// The file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build supports.
        supported: i64,
    },
    /// The file could not be opened or set up.
    #[error("could not open the store: {0}")]
    Backend(#[from] BackendError),
}

/// Wraps an SQLite error with what was being done.
pub(crate) fn backend(context: impl Into<String>, error: rusqlite::Error) -> BackendError {
    BackendError::with_source(context, error)
}
