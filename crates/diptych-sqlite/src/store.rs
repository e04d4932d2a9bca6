//! [`SqliteStore`]: the event store on one SQLite file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::{
    AppendError, AppendOutcome, AppendRequest, BackendError, Direction, EventStore, Position,
    ReadError, RecordedEvent, Snapshot, SnapshotError, StreamId, StreamRead, Timestamp,
    check_append_shape,
};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Semaphore, oneshot, watch};

use crate::error::{OpenError, backend};
use crate::pool::ReaderPool;
use crate::queue::{JobSender, job_queue, spare_core};
use crate::rows::{
    EVENT_COLUMNS, events_between, head_position, keyed_append, query_events, stream_version,
    to_sql_int,
};
use crate::schema;
use crate::writer::{self, Job, PreparedAppend, Queued};

/// Settings of a [`SqliteStore`].
#[derive(Clone, Debug)]
pub struct SqliteConfig {
    /// How many reader threads (each with its connection) the store keeps; at most this many reads run
    /// at once and the rest wait their turn. Defaults to two per core, at least 4.
    pub reader_connections: usize,
    /// The most events one group commit holds; bounds a transaction's size.
    pub max_group_events: usize,
    /// How many appends may wait for the writer before callers wait to enqueue.
    pub queue_capacity: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            reader_connections: crate::pool::default_size(),
            max_group_events: 4096,
            queue_capacity: 4096,
        }
    }
}

/// The event store on one SQLite file, in WAL mode with `synchronous=FULL`: an
/// acknowledged append has been fsynced and survives a power loss.
///
/// One writer thread owns the only writing connection and commits appends in
/// groups (see the crate documentation); reads run on a small pool of their own
/// connections on tokio's blocking threads, so they never wait for the writer.
pub struct SqliteStore {
    path: PathBuf,
    jobs: Option<JobSender>,
    /// Bounds the queue: a caller takes a slot before enqueueing and the writer
    /// frees it when done, so a flood of appends waits instead of piling up.
    queue_slots: Arc<Semaphore>,
    queue_capacity: usize,
    writer: Option<JoinHandle<()>>,
    readers: Arc<ReaderPool>,
    head: watch::Sender<Position>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` with default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        Self::open_with(path, SqliteConfig::default())
    }

    /// Opens (creating if needed) the store at `path`.
    ///
    /// Refuses, without writing anything, a file that is not a diptych database or
    /// whose schema is newer than this build's.
    pub fn open_with(path: impl AsRef<Path>, config: SqliteConfig) -> Result<Self, OpenError> {
        let path = path.as_ref().to_owned();
        let mut connection = schema::open_file(&path)?;
        schema::check_identity(&connection, &path)?;
        configure_writer(&connection)?;
        schema::migrate(&mut connection)?;
        let head = watch::Sender::new(head_position(&connection)?);
        let (jobs, receiver) = job_queue();
        let writer = writer::spawn(
            connection,
            receiver,
            head.clone(),
            config.max_group_events.max(1),
        )
        .map_err(|error| BackendError::with_source("starting the writer thread", error))?;
        Ok(Self {
            readers: Arc::new(ReaderPool::new(path.clone(), config.reader_connections)),
            path,
            jobs: Some(jobs),
            queue_slots: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
            queue_capacity: config.queue_capacity.max(1),
            writer: Some(writer),
            head,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `job` for the writer. Returns whether it was the only job in
    /// flight.
    async fn submit(&self, job: Job) -> Result<bool, BackendError> {
        let Some(jobs) = &self.jobs else {
            return Err(writer_gone());
        };
        let permit = Arc::clone(&self.queue_slots)
            .acquire_owned()
            .await
            .map_err(|_| writer_gone())?;
        let alone = self.queue_slots.available_permits() + 1 == self.queue_capacity;
        jobs.send(Queued { job, permit })
            .map_err(|_| writer_gone())?;
        Ok(alone)
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, ReadError> + Send + 'static,
    ) -> Result<T, ReadError> {
        self.readers.run(work).await
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish its last group and exit; joining
        // makes sure the file is closed when the store is gone.
        self.jobs.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// How long the only append in flight keeps looking for its answer before it
/// sleeps: about what a lone append takes the writer.
const ANSWER_SOON: Duration = Duration::from_micros(300);

/// The answer to the only append in flight. Its caller, with nothing else to
/// wait for, looks for the answer between other tasks for [`ANSWER_SOON`]
/// instead of sleeping at once: waking a sleeping runtime thread cost a lone
/// writer's command about a fifth of its time (`BENCHMARKS.md`). It costs
/// processor time (the look yields to other tasks, each turn a poll of the
/// runtime's driver), so only a lone append on a machine with a core to spare
/// looks. Busier callers just wait: their runtime has other work and the
/// writer groups them.
/// `None` when the writer dropped the append unanswered.
async fn answer_soon<T>(mut outcome: oneshot::Receiver<T>) -> Option<T> {
    let until = std::time::Instant::now() + ANSWER_SOON;
    while std::time::Instant::now() < until {
        match outcome.try_recv() {
            Ok(answer) => return Some(answer),
            Err(oneshot::error::TryRecvError::Empty) => tokio::task::yield_now().await,
            Err(oneshot::error::TryRecvError::Closed) => return None,
        }
    }
    outcome.await.ok()
}

fn writer_gone() -> BackendError {
    BackendError::msg("the SQLite writer thread has stopped; reopen the store")
}

/// WAL so readers never wait for the writer; FULL so a commit is fsynced before
/// it returns; a 64 MiB page cache because with the default 2 MiB a third of the
/// writer's time went to re-reading evicted index pages (see BENCHMARKS.md).
fn configure_writer(connection: &Connection) -> Result<(), OpenError> {
    connection
        .execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             PRAGMA cache_size = -65536;
             PRAGMA foreign_keys = ON;",
        )
        .and_then(|()| connection.busy_timeout(Duration::from_secs(5)))
        .map_err(|error| OpenError::Backend(backend("configuring the writer connection", error)))
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        check_append_shape(&request)?;
        let (reply, outcome) = oneshot::channel();
        let append = PreparedAppend::new(request);
        let alone = self.submit(Job::Append { append, reply }).await?;
        let answer = if alone && spare_core() {
            answer_soon(outcome).await
        } else {
            outcome.await.ok()
        };
        let (append, written) = answer.ok_or_else(writer_gone)?;
        Ok(append.finish(written?))
    }

    async fn find_idempotent_append(&self, key: &str) -> Result<Option<AppendOutcome>, ReadError> {
        let key = key.to_owned();
        self.read(move |connection| {
            let Some(keyed) = keyed_append(connection, &key)? else {
                return Ok(None);
            };
            Ok(Some(AppendOutcome {
                events: events_between(connection, keyed.first, keyed.last)?,
                deduplicated: true,
            }))
        })
        .await
    }

    async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError> {
        self.read(move |connection| {
            let sql = match read.direction {
                Direction::Forward => format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ?1 AND version >= ?2 \
                     ORDER BY version LIMIT ?3"
                ),
                Direction::Backward => format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = ?1 AND version <= ?2 \
                     ORDER BY version DESC LIMIT ?3"
                ),
            };
            let events = query_events(
                connection,
                &sql,
                params![
                    read.stream.as_str(),
                    to_sql_int(read.from),
                    to_sql_int(read.limit as u64)
                ],
            )?;
            if events.is_empty() && stream_version(connection, &read.stream)? == 0 {
                return Err(ReadError::StreamNotFound {
                    stream: read.stream,
                });
            }
            Ok(events)
        })
        .await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        let stream = stream.clone();
        self.read(move |connection| Ok(stream_version(connection, &stream)?))
            .await
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        self.read(move |connection| {
            Ok(query_events(
                connection,
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2"
                ),
                params![to_sql_int(after.0), to_sql_int(limit as u64)],
            )?)
        })
        .await
    }

    async fn head(&self) -> Result<Position, ReadError> {
        self.read(|connection| Ok(head_position(connection)?)).await
    }

    fn head_watch(&self) -> watch::Receiver<Position> {
        self.head.subscribe()
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        let stream = stream.clone();
        let loaded = self
            .read(move |connection| {
                let row: Option<(i64, u32, String, i64)> = connection
                    .prepare_cached(
                        "SELECT version, state_version, state, taken_at FROM snapshots \
                         WHERE stream_id = ?1",
                    )
                    .and_then(|mut statement| {
                        statement
                            .query_row(params![stream.as_str()], |row| {
                                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                            })
                            .optional()
                    })
                    .map_err(|error| backend("loading a snapshot", error))?;
                let Some((version, state_version, state, taken_at)) = row else {
                    return Ok(None);
                };
                let state = serde_json::from_str(&state).map_err(|error| {
                    BackendError::with_source(
                        format!("the snapshot of `{stream}` is corrupt"),
                        error,
                    )
                })?;
                Ok(Some(Snapshot {
                    stream,
                    version: version as u64,
                    state_version,
                    state,
                    taken_at: Timestamp::from_unix_micros(taken_at),
                }))
            })
            .await;
        loaded.map_err(|error| match error {
            ReadError::Backend(error) => SnapshotError::Backend(error),
            other => SnapshotError::Backend(BackendError::with_source("loading a snapshot", other)),
        })
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        let (reply, outcome) = oneshot::channel();
        self.submit(Job::SaveSnapshot { snapshot, reply }).await?;
        outcome.await.map_err(|_| writer_gone())?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lone_append_gets_an_answer_sent_at_once_or_long_after() {
        let (sent, outcome) = oneshot::channel();
        sent.send(1).expect("receiver alive");
        assert_eq!(answer_soon(outcome).await, Some(1));

        // Sent well after the caller stopped looking: it waits for it.
        let (sent, outcome) = oneshot::channel();
        let (started, looking) = oneshot::channel::<()>();
        let sender = tokio::spawn(async move {
            looking.await.expect("the caller started");
            tokio::time::sleep(ANSWER_SOON * 10).await;
            sent.send(2).expect("receiver alive");
        });
        started.send(()).expect("sender alive");
        assert_eq!(answer_soon(outcome).await, Some(2));
        sender.await.expect("sends");
    }

    #[tokio::test]
    async fn a_lone_append_whose_writer_is_gone_gets_an_error() {
        let (sent, outcome) = oneshot::channel::<u8>();
        drop(sent);
        assert_eq!(answer_soon(outcome).await, None);
    }
}
