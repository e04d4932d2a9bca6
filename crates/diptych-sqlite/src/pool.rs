//! Reader connections: each read runs on its own connection, so in WAL mode it
//! sees the last commit and never waits for the writer.
//!
//! The pool is bounded: at most `size` reads run at once and every connection is
//! kept. A burst of readers waits for a connection instead of opening fresh ones,
//! because a fresh SQLite connection parses the whole schema and starts with a cold
//! statement cache and page cache, which costs more than the read itself. On a
//! machine with few cores, more concurrent readers than connections buys nothing.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diptych_core::BackendError;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use crate::error::backend;

/// The default pool size: two connections per core (a read may wait on the disk
/// while another computes), and never fewer than four.
pub(crate) fn default_size() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |cores| cores.get() * 2)
        .max(4)
}

/// Reader connections, opened on first use and kept for the pool's life.
pub(crate) struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection: a read holds one while it runs.
    permits: Arc<Semaphore>,
    size: usize,
}

impl ReaderPool {
    /// A pool for the file at `path` with at most `size` connections.
    pub(crate) fn new(path: PathBuf, size: usize) -> Self {
        let size = size.max(1);
        Self {
            path,
            idle: Mutex::new(Vec::with_capacity(size)),
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    /// Runs `work` on a pooled connection on the blocking thread pool, waiting
    /// (without holding a thread) while all connections are busy.
    pub(crate) async fn run<T, E>(
        self: &Arc<Self>,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<BackendError> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|error| BackendError::with_source("the reader pool is closed", error))?;
        let pool = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let result = pool.with_connection(work);
            drop(permit);
            result
        })
        .await
        .map_err(|error| BackendError::with_source("a read task failed", error))?
    }

    /// Runs `work` on a pooled connection on this thread, for the rare caller that
    /// cannot wait asynchronously. It does not take a permit, so it may open one
    /// connection beyond the bound; that connection is closed again if the pool is
    /// full.
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
        if idle.len() < self.size {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_reads_share_the_bounded_connections() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pool.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE numbers (n INTEGER);")
            .unwrap();
        let pool = Arc::new(ReaderPool::new(path, 3));
        let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reads: Vec<_> = (0..64)
            .map(|_| {
                let (pool, in_flight, most) = (pool.clone(), in_flight.clone(), most.clone());
                tokio::spawn(async move {
                    pool.run(move |connection| -> Result<i64, BackendError> {
                        let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        let count = connection
                            .query_row("SELECT count(*) FROM numbers", [], |row| row.get(0))
                            .map_err(|error| backend("counting", error));
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        count
                    })
                    .await
                })
            })
            .collect();
        for read in reads {
            assert_eq!(read.await.unwrap().unwrap(), 0);
        }
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        let kept = pool.idle.lock().unwrap().len();
        assert!((1..=3).contains(&kept), "{kept} connections kept");
    }
}
