//! Reader connections: each read runs on its own connection, so in WAL mode it
//! sees the last commit and never waits for the writer.
//!
//! The pool is a fixed set of reader threads, each keeping one connection, fed
//! from one queue. A burst of readers waits in the queue instead of opening fresh
//! connections (a fresh SQLite connection parses the whole schema and starts
//! with cold caches, which costs more than the read), and no read occupies a
//! thread of tokio's blocking pool, which grows a thread for every read that
//! finds none idle and kept dozens alive under load.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diptych_core::BackendError;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

use crate::error::backend;

/// The default pool size: two connections per core (a read may wait on the disk
/// while another computes), and never fewer than four.
pub(crate) fn default_size() -> usize {
    std::thread::available_parallelism()
        .map_or(4, |cores| cores.get() * 2)
        .max(4)
}

/// A read for a reader thread: given its connection, or why it could not open one.
type Job = Box<dyn FnOnce(Result<&Connection, BackendError>) + Send>;

/// Reader threads, each with the connection it opened on its first read.
pub(crate) struct ReaderPool {
    path: PathBuf,
    jobs: Mutex<Option<Sender<Job>>>,
    /// The connection of the rare caller that cannot wait asynchronously.
    spare: Mutex<Option<Connection>>,
}

impl ReaderPool {
    /// A pool for the file at `path` with `size` reader threads.
    pub(crate) fn new(path: PathBuf, size: usize) -> Self {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        for index in 0..size.max(1) {
            let (receiver, path) = (Arc::clone(&receiver), path.clone());
            // A thread that fails to start leaves the others to serve.
            let _ = std::thread::Builder::new()
                .name(format!("diptych-reader-{index}"))
                .spawn(move || serve(&path, &receiver));
        }
        Self {
            path,
            jobs: Mutex::new(Some(sender)),
            spare: Mutex::new(None),
        }
    }

    /// Runs `work` on a reader thread's connection, waiting (as a task, not a
    /// thread) while all of them are busy.
    pub(crate) async fn run<T, E>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<BackendError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |connection| {
            let _ = reply.send(connection.map_err(E::from).and_then(work));
        });
        let sent = self
            .jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(|jobs| jobs.send(job).is_ok());
        if !sent {
            return Err(BackendError::msg("the reader threads have stopped").into());
        }
        answer
            .await
            .map_err(|_| BackendError::msg("a read stopped before it answered"))?
    }

    /// Runs `work` on this thread, on a connection kept for such callers.
    pub(crate) fn with_connection<T, E: From<BackendError>>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut spare = self
            .spare
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if spare.is_none() {
            *spare = Some(open(&self.path)?);
        }
        match spare.as_ref() {
            Some(connection) => work(connection),
            None => Err(BackendError::msg("no reader connection").into()),
        }
    }
}

impl Drop for ReaderPool {
    fn drop(&mut self) {
        // Closing the queue ends every reader thread once it is idle.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
    }
}

/// A reader thread: takes reads from the queue until it closes.
fn serve(path: &Path, jobs: &Mutex<Receiver<Job>>) {
    let mut connection: Option<Connection> = None;
    loop {
        let job = match jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .recv()
        {
            Ok(job) => job,
            Err(_) => return,
        };
        if connection.is_none() {
            match open(path) {
                Ok(opened) => connection = Some(opened),
                Err(error) => {
                    job(Err(error));
                    continue;
                }
            }
        }
        if let Some(connection) = &connection {
            // A read that panics answers its caller with an error (its reply is
            // dropped) and leaves the thread serving.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(connection))));
        }
    }
}

fn open(path: &Path) -> Result<Connection, BackendError> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|connection| {
        crate::schema::plan_once(&connection)?;
        connection.execute_batch("PRAGMA query_only = ON;")?;
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.set_prepared_statement_cache_capacity(64);
        Ok(connection)
    })
    .map_err(|error| backend("opening a reader connection", error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::params;

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
                    pool.run(move |connection| -> Result<(i64, String), BackendError> {
                        let thread = std::thread::current().name().unwrap_or("").to_owned();
                        let now = in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        most.fetch_max(now, std::sync::atomic::Ordering::SeqCst);
                        let count = connection
                            .query_row("SELECT count(*) FROM numbers", [], |row| row.get(0))
                            .map_err(|error| backend("counting", error));
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        count.map(|count| (count, thread))
                    })
                    .await
                })
            })
            .collect();
        let mut threads = std::collections::BTreeSet::new();
        for read in reads {
            let (count, thread) = read.await.unwrap().unwrap();
            assert_eq!(count, 0);
            threads.insert(thread);
        }
        assert!(most.load(std::sync::atomic::Ordering::SeqCst) <= 3);
        assert!(
            threads.len() <= 3
                && threads
                    .iter()
                    .all(|name| name.starts_with("diptych-reader-")),
            "reads ran on {threads:?}"
        );
    }

    #[tokio::test]
    async fn readers_and_writers_plan_each_statement_once() {
        /// Runs a page read three times with three limits; how many times
        /// SQLite prepared it again.
        fn reprepares(connection: &Connection) -> rusqlite::Result<i32> {
            let mut statement =
                connection.prepare("SELECT n FROM numbers WHERE n > ?1 ORDER BY n LIMIT ?2")?;
            for limit in 1..=3 {
                statement
                    .query_map(params![0, limit], |row| row.get::<_, i64>(0))?
                    .count();
            }
            Ok(statement.get_status(rusqlite::StatementStatus::RePrepare))
        }
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pool.db");
        let writer = crate::schema::open_file(&path).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; CREATE TABLE numbers (n INTEGER PRIMARY KEY);
                 INSERT INTO numbers VALUES (1), (2), (3), (4);",
            )
            .unwrap();
        assert_eq!(reprepares(&writer).unwrap(), 0, "the writer re-prepared");
        let plain = Connection::open(&path).unwrap();
        assert!(
            reprepares(&plain).unwrap() > 0,
            "a plain connection re-prepares a bound LIMIT (or this test checks nothing)"
        );
        let pool = ReaderPool::new(path, 1);
        let reader = pool
            .run(|connection| reprepares(connection).map_err(|error| backend("reading", error)))
            .await;
        assert_eq!(reader.unwrap(), 0, "a reader re-prepared");
    }

    #[tokio::test]
    async fn a_read_that_panics_is_an_error_and_the_pool_keeps_serving() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("pool.db");
        Connection::open(&path).unwrap();
        let pool = ReaderPool::new(path, 1);
        let failed = pool
            .run(|_| -> Result<(), BackendError> { panic!("a bug in a read") })
            .await;
        assert!(failed.is_err());
        let answered = pool
            .run(|connection| -> Result<i64, BackendError> {
                connection
                    .query_row("SELECT 41 + 1", [], |row| row.get(0))
                    .map_err(|error| backend("adding", error))
            })
            .await;
        assert_eq!(answered.unwrap(), 42);
    }

    #[tokio::test]
    async fn a_file_that_cannot_be_opened_is_an_error_not_a_hang() {
        let directory = tempfile::tempdir().unwrap();
        let pool = ReaderPool::new(directory.path().join("missing/pool.db"), 2);
        let failed = pool
            .run(|_| -> Result<(), BackendError> { Ok(()) })
            .await
            .unwrap_err();
        assert!(
            failed.to_string().contains("opening a reader connection"),
            "{failed}"
        );
    }
}
