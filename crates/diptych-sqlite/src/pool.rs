//! Reader connections: each read runs on its own connection, so in WAL mode it
//! sees the last commit and never waits for the writer.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use diptych_core::BackendError;
use rusqlite::{Connection, OpenFlags};

use crate::error::backend;

/// Reader connections, opened on demand and kept for reuse.
pub(crate) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    keep: usize,
}

impl ReaderPool {
    /// A pool for the file at `path`, keeping up to `keep` idle connections.
    pub(crate) fn new(path: PathBuf, keep: usize) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
            keep: keep.max(1),
        }
    }

    /// Runs `work` on an idle connection, or a new one.
    pub(crate) fn with_connection<T, E: From<BackendError>>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let connection = match idle {
            Some(connection) => connection,
            None => self.open()?,
        };
        let result = work(&connection);
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < self.keep {
            idle.push(connection);
        }
        result
    }

    fn open(&self) -> Result<Connection, BackendError> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|connection| {
            connection.execute_batch("PRAGMA query_only = ON;")?;
            connection.busy_timeout(Duration::from_secs(5))?;
            connection.set_prepared_statement_cache_capacity(64);
            Ok(connection)
        })
        .map_err(|error| backend("opening a reader connection", error))?;
        Ok(connection)
    }
}
