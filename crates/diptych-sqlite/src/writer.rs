//! The writer thread: the one connection that writes, committing appends in groups.
//!
//! Appends arrive on a queue (`queue.rs`). The writer opens a transaction with
//! the first, writes the others as they arrive (up to a cap, and for a moment
//! longer while the callers of the last group are still coming back, see
//! [`GroupPacer`]), and commits them all with one fsync: while it waits for the
//! disk, the next group gathers in the queue. So the number of fsyncs falls as
//! concurrency rises, and each append still waits for the fsync of its own group
//! before it is acknowledged.
//!
//! Each append is checked on its own: one that fails its checks (a version
//! conflict, a reused key) writes nothing and the rest of the group commits; one
//! that fails halfway through its inserts (a duplicate event id) makes the writer
//! roll back and write the group again without it. If the commit itself fails,
//! every append in the group fails.

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use diptych_core::{
    AppendError, AppendOutcome, AppendRequest, BackendError, Metadata, Position, RecordedEvent,
    Snapshot, SnapshotError, StreamId, Timestamp,
};
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use tokio::sync::{OwnedSemaphorePermit, oneshot, watch};

use crate::error::backend;
use crate::queue::{JobReceiver, spare_core};
use crate::rows::{events_between, head_position, keyed_append, stream_version, to_sql_int};

/// An append with its payloads already serialized by the caller's task, so the
/// single writer thread spends its time on SQLite, not on JSON.
pub struct PreparedAppend {
    /// The request.
    pub request: AppendRequest,
    /// Each event's payload as JSON text.
    pub payloads: Vec<String>,
    /// Each event's metadata as JSON text.
    pub metadata: Vec<String>,
}

impl PreparedAppend {
    /// Serializes the payloads and metadata of a request.
    pub fn new(request: AppendRequest) -> Self {
        let payloads = request
            .events
            .iter()
            .map(|event| event.payload.to_string())
            .collect();
        let metadata = request
            .events
            .iter()
            .map(|event| {
                if event.metadata == Metadata::default() {
                    "{}".to_owned()
                } else {
                    serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".into())
                }
            })
            .collect();
        Self {
            request,
            payloads,
            metadata,
        }
    }
}

/// Work for the writer thread, with the queue slot it holds until it is done.
pub struct Queued {
    /// The work.
    pub job: Job,
    /// Released when the job is done, making room for another caller.
    pub permit: OwnedSemaphorePermit,
}

/// Where the writer sends an append's result, handing the append back with it:
/// the caller turns it into its outcome (and frees it) on its own task, keeping
/// that work off the single writer thread.
pub type AppendReply = oneshot::Sender<(PreparedAppend, Result<Written, AppendError>)>;

/// Work for the writer thread.
pub enum Job {
    /// Append and reply with the outcome once durable.
    Append {
        /// The append.
        append: PreparedAppend,
        /// Where the outcome goes.
        reply: AppendReply,
    },
    /// Save a snapshot.
    SaveSnapshot {
        /// The snapshot.
        snapshot: Snapshot,
        /// Where the result goes.
        reply: oneshot::Sender<Result<(), SnapshotError>>,
    },
}

impl Job {
    fn event_count(&self) -> usize {
        match self {
            Job::Append { append, .. } => append.request.events.len(),
            Job::SaveSnapshot { .. } => 1,
        }
    }
}

/// Starts the writer thread on `connection`.
pub fn spawn(
    connection: Connection,
    jobs: JobReceiver,
    head: watch::Sender<Position>,
    max_group_events: usize,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("diptych-sqlite-writer".into())
        .spawn(move || {
            Writer {
                last_recorded_at: last_recorded_at(&connection),
                connection,
                head,
                max_group_events,
            }
            .run(jobs);
        })
}

struct Writer {
    connection: Connection,
    /// The time stamped on the last group.
    last_recorded_at: Timestamp,
    head: watch::Sender<Position>,
    max_group_events: usize,
}

impl Writer {
    fn run(mut self, jobs: JobReceiver) {
        jobs.attach_to_current_thread();
        let mut pacer = GroupPacer::default();
        while let Some(first) = jobs.recv(pacer.expected_group() <= 1 && spare_core()) {
            // Times never go backwards along the log, even if the wall clock
            // does, so "the state at time T" is always a prefix of each stream.
            self.last_recorded_at = self.last_recorded_at.max(Timestamp::now());
            // The group's transaction opens with its first append and takes the
            // others as they arrive, so inserting overlaps with callers preparing
            // their appends instead of waiting for all of them first.
            let mut group = OpenGroup::begin(&self.connection, self.last_recorded_at);
            group.push(&self.connection, first);
            let gather_until = Instant::now() + pacer.patience();
            while group.events < self.max_group_events {
                if let Some(queued) = jobs.try_recv() {
                    group.push(&self.connection, queued);
                    continue;
                }
                let missing = pacer.expected_group().saturating_sub(group.jobs.len());
                if missing == 0 || Instant::now() >= gather_until {
                    break;
                }
                jobs.wait_for(missing, Some(gather_until));
            }
            let appends = group.jobs.len();
            let commit_started = Instant::now();
            let (jobs, results) = group.commit(&self.connection);
            pacer.record(appends, commit_started.elapsed());
            self.reply(jobs, results);
        }
    }

    fn reply(&self, jobs: Vec<Job>, results: Vec<Result<Written, AppendError>>) {
        let mut new_head = None;
        for (job, result) in jobs.into_iter().zip(results) {
            match job {
                Job::Append { append, reply } => {
                    if let Ok(written) = &result {
                        new_head = new_head.max(written.last_position());
                    }
                    let _ = reply.send((append, result));
                }
                Job::SaveSnapshot { reply, .. } => {
                    let _ = reply.send(result.map(|_| ()).map_err(|error| match error {
                        AppendError::Backend(error) => SnapshotError::Backend(error),
                        other => SnapshotError::Backend(BackendError::msg(other.to_string())),
                    }));
                }
            }
        }
        if let Some(head) = new_head {
            self.head.send_if_modified(|current| {
                let moved = head > *current;
                *current = (*current).max(head);
                moved
            });
        }
    }
}

/// The time of the newest event in the file (the epoch for an empty one).
fn last_recorded_at(connection: &Connection) -> Timestamp {
    connection
        .query_row(
            "SELECT recorded_at FROM events ORDER BY position DESC LIMIT 1",
            [],
            |row| row.get(0),
        )
        .optional()
        .ok()
        .flatten()
        .map_or(Timestamp::from_unix_micros(0), Timestamp::from_unix_micros)
}

/// A group commit in progress: one open transaction and the jobs written into it.
///
/// Checks that can refuse an append (idempotency key, expected version) run
/// before it writes anything, so a refused append leaves nothing to undo. Only a
/// failure in the middle of an append's inserts (a duplicate event id, or I/O)
/// leaves partial writes: then the transaction is rolled back and the group is
/// written again without that append. This keeps the common path free of
/// per-append savepoints, which cost a statement journal each.
struct OpenGroup {
    jobs: Vec<Job>,
    /// Queue slots, freed when the group is done.
    permits: Vec<OwnedSemaphorePermit>,
    /// Jobs that failed halfway and are left out of rewrites.
    failed: Vec<Option<AppendError>>,
    results: Vec<Result<Written, AppendError>>,
    next_position: i64,
    /// Set once the transaction itself failed: every job then fails with it.
    broken: Option<BackendError>,
    events: usize,
    recorded_at: Timestamp,
    /// Versions of the streams this transaction has read or written, so a hot
    /// stream's version is read from SQLite once per group, not once per append.
    versions: HashMap<StreamId, u64>,
}

impl OpenGroup {
    /// Opens a group stamped `recorded_at`.
    fn begin(connection: &Connection, recorded_at: Timestamp) -> Self {
        let mut group = Self {
            jobs: Vec::new(),
            permits: Vec::new(),
            failed: Vec::new(),
            results: Vec::new(),
            next_position: 1,
            broken: None,
            events: 0,
            recorded_at,
            versions: HashMap::new(),
        };
        group.open_transaction(connection);
        group
    }

    fn open_transaction(&mut self, connection: &Connection) {
        self.versions.clear();
        let opened = connection
            .prepare_cached("BEGIN IMMEDIATE")
            .and_then(|mut begin| begin.execute([]))
            .map_err(|error| backend("starting a write transaction", error))
            .and_then(|_| head_position(connection));
        match opened {
            Ok(head) => self.next_position = head.0 as i64 + 1,
            Err(error) => self.broken = Some(error),
        }
    }

    fn push(&mut self, connection: &Connection, queued: Queued) {
        self.events += queued.job.event_count();
        self.jobs.push(queued.job);
        self.permits.push(queued.permit);
        self.failed.push(None);
        if !self.write(connection, self.jobs.len() - 1) {
            self.rewrite(connection);
        }
    }

    /// Writes one job. Returns false when it failed halfway: the transaction
    /// then holds partial writes and must be rewritten without it.
    fn write(&mut self, connection: &Connection, index: usize) -> bool {
        if self.broken.is_some() {
            return true;
        }
        if let Some(error) = &self.failed[index] {
            self.results.push(Err(error.clone()));
            return true;
        }
        let result = match &self.jobs[index] {
            Job::Append { append, .. } => write_append(
                connection,
                append,
                self.next_position,
                self.recorded_at,
                &mut self.versions,
            ),
            Job::SaveSnapshot { snapshot, .. } => save_snapshot(connection, snapshot)
                .map(|()| Written::Snapshot)
                .map_err(|error| Partial(AppendError::Backend(error))),
        };
        match result {
            Ok(written) => {
                if let Written::Events {
                    first_position,
                    count,
                    ..
                } = &written
                {
                    self.next_position = first_position + *count as i64;
                }
                self.results.push(Ok(written));
                true
            }
            // SQLite rolls a whole transaction back by itself after some errors
            // (I/O, a full disk, out of memory). Going on would run the next
            // statements outside any transaction on stale state, so a refusal
            // that lost the transaction is handled like a partial write.
            Err(Refused(error)) if connection.is_autocommit() => {
                self.failed[index] = Some(error);
                false
            }
            Err(Refused(error)) => {
                self.results.push(Err(error));
                true
            }
            Err(Partial(error)) => {
                self.failed[index] = Some(error);
                false
            }
        }
    }

    /// Rolls back and writes every job again, leaving out those that failed.
    ///
    /// A loop, not recursion: if another job fails halfway during the rewrite,
    /// it starts over from a fresh transaction rather than writing the rest twice.
    /// Each round leaves one more job out, so it ends.
    fn rewrite(&mut self, connection: &Connection) {
        'rounds: loop {
            // Nothing to roll back if SQLite already did.
            if !connection.is_autocommit() {
                if let Err(error) = connection.execute_batch("ROLLBACK") {
                    self.broken = Some(backend("rolling back a failed append", error));
                    return;
                }
            }
            self.results.clear();
            self.open_transaction(connection);
            for index in 0..self.jobs.len() {
                if !self.write(connection, index) {
                    continue 'rounds;
                }
            }
            return;
        }
    }

    /// Commits, returning each job with its result: all written, or all failed.
    fn commit(mut self, connection: &Connection) -> (Vec<Job>, Vec<Result<Written, AppendError>>) {
        if self.broken.is_none() {
            let committed = connection
                .prepare_cached("COMMIT")
                .and_then(|mut commit| commit.execute([]));
            if let Err(error) = committed {
                self.broken = Some(backend("committing appended events", error));
            }
        }
        // Whatever failed, never leave a transaction open: every later group
        // would fail to begin and the store would be stuck.
        if !connection.is_autocommit() {
            let _ = connection.execute_batch("ROLLBACK");
        }
        let results = match self.broken {
            None => self.results,
            Some(error) => self
                .failed
                .into_iter()
                .map(|own| Err(own.unwrap_or_else(|| AppendError::Backend(error.clone()))))
                .collect(),
        };
        (self.jobs, results)
    }
}

/// What one job wrote, to be turned into its reply once the group is durable.
pub enum Written {
    /// New events at these positions and versions.
    Events {
        /// The position of the first event.
        first_position: i64,
        /// The stream version of the first event.
        first_version: u64,
        /// How many events.
        count: usize,
        /// The time stamped on them.
        recorded_at: Timestamp,
    },
    /// A repeat of an earlier append with the same idempotency key.
    Repeat(Vec<RecordedEvent>),
    /// A snapshot.
    Snapshot,
}

impl Written {
    fn last_position(&self) -> Option<Position> {
        match self {
            Written::Events {
                first_position,
                count,
                ..
            } => Some(Position((first_position + *count as i64 - 1) as u64)),
            Written::Repeat(_) | Written::Snapshot => None,
        }
    }
}

/// How one job failed inside a transaction.
enum JobFailure {
    /// Refused before writing anything: the transaction is unharmed.
    Refused(AppendError),
    /// Failed after writing part of itself: the transaction must be rolled back.
    Partial(AppendError),
}

use JobFailure::{Partial, Refused};

/// Decides how long the writer waits for a group to fill before committing.
///
/// Right after a commit, the callers it acknowledged come back with their next
/// appends one by one; committing as soon as the first arrives would split them
/// into a small group and a large one, doubling the fsyncs. So when the last groups
/// were larger than what is queued now, the writer waits a little for the rest:
/// at most half the last commit's duration, which bounds the added latency by the
/// fsync it saves. With one caller the expected group is 1 and it never waits.
#[derive(Default)]
struct GroupPacer {
    recent_groups: [usize; 2],
    last_commit: Duration,
}

impl GroupPacer {
    const MAX_PATIENCE: Duration = Duration::from_millis(2);

    fn expected_group(&self) -> usize {
        self.recent_groups[0].max(self.recent_groups[1])
    }

    fn patience(&self) -> Duration {
        (self.last_commit / 2).min(Self::MAX_PATIENCE)
    }

    fn record(&mut self, appends: usize, commit: Duration) {
        self.recent_groups = [appends, self.recent_groups[0]];
        self.last_commit = commit;
    }
}

/// Checks and inserts one append. Refusals happen before any write.
fn write_append(
    connection: &Connection,
    append: &PreparedAppend,
    first_position: i64,
    recorded_at: Timestamp,
    versions: &mut HashMap<StreamId, u64>,
) -> Result<Written, JobFailure> {
    let request = &append.request;
    if let Some(key) = &request.idempotency_key {
        if let Some(first) = keyed_append(connection, key).map_err(|error| Refused(error.into()))? {
            if first.stream != request.stream.as_str() {
                let first_stream = StreamId::new(first.stream).map_err(|error| {
                    Refused(BackendError::msg(format!("corrupt idempotency entry: {error}")).into())
                })?;
                return Err(Refused(AppendError::IdempotencyKeyReused {
                    key: key.clone(),
                    first_stream,
                    stream: request.stream.clone(),
                }));
            }
            let events = events_between(connection, first.first, first.last)
                .map_err(|error| Refused(error.into()))?;
            return Ok(Written::Repeat(events));
        }
    }
    let actual = match versions.get(&request.stream) {
        Some(&version) => version,
        None => {
            let version = stream_version(connection, &request.stream)
                .map_err(|error| Refused(error.into()))?;
            versions.insert(request.stream.clone(), version);
            version
        }
    };
    if !request.expected.admits(actual) {
        return Err(Refused(AppendError::Conflict {
            stream: request.stream.clone(),
            expected: request.expected,
            actual,
        }));
    }
    let mut insert = connection
        .prepare_cached(
            "INSERT INTO events (position, stream_id, version, event_id, event_type, \
             schema_version, payload, metadata, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(|error| Refused(backend("preparing the event insert", error).into()))?;
    for (offset, ((event, payload), metadata)) in request
        .events
        .iter()
        .zip(&append.payloads)
        .zip(&append.metadata)
        .enumerate()
    {
        let inserted = insert.execute(params![
            first_position + offset as i64,
            request.stream.as_str(),
            to_sql_int(actual + offset as u64 + 1),
            event.event_id.as_bytes().as_slice(),
            event.event_type,
            event.schema_version,
            payload,
            metadata,
            recorded_at.as_unix_micros(),
        ]);
        if let Err(error) = inserted {
            // The first insert of an append writes nothing when it fails, but later
            // ones leave their predecessors behind: either way, roll back to be safe.
            return Err(Partial(match unique_violation(&error) {
                Some(UniqueIndex::EventId) => AppendError::DuplicateEventId {
                    event_id: event.event_id,
                },
                // Only another process writing the same file between our version
                // read and this insert can get here; it is a conflict all the same.
                Some(UniqueIndex::StreamVersion) => AppendError::Conflict {
                    stream: request.stream.clone(),
                    expected: request.expected,
                    actual: actual + offset as u64 + 1,
                },
                None => AppendError::Backend(backend("inserting an event", error)),
            }));
        }
    }
    let count = request.events.len();
    // The lookup above put the stream in the map.
    if let Some(version) = versions.get_mut(&request.stream) {
        *version = actual + count as u64;
    }
    if let Some(key) = &request.idempotency_key {
        connection
            .prepare_cached(
                "INSERT INTO idempotency (key, stream_id, first_position, last_position) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    key,
                    request.stream.as_str(),
                    first_position,
                    first_position + count as i64 - 1
                ])
            })
            .map_err(|error| Partial(backend("recording an idempotency key", error).into()))?;
    }
    Ok(Written::Events {
        first_position,
        first_version: actual + 1,
        count,
        recorded_at,
    })
}

/// The unique indexes of the events table.
enum UniqueIndex {
    EventId,
    StreamVersion,
}

/// Which unique index an insert violated, if that is why it failed. SQLite names
/// the columns in the message; the extended code alone does not say which index.
fn unique_violation(error: &rusqlite::Error) -> Option<UniqueIndex> {
    match error {
        rusqlite::Error::SqliteFailure(failure, message)
            if failure.code == ErrorCode::ConstraintViolation
                && failure.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            let message = message.as_deref().unwrap_or_default();
            if message.contains("events.event_id") {
                Some(UniqueIndex::EventId)
            } else {
                Some(UniqueIndex::StreamVersion)
            }
        }
        _ => None,
    }
}

impl PreparedAppend {
    /// Turns what was written into the caller's outcome, moving the events'
    /// payloads rather than copying them.
    pub fn finish(self, written: Written) -> AppendOutcome {
        match written {
            Written::Repeat(events) => AppendOutcome {
                events,
                deduplicated: true,
            },
            Written::Events {
                first_position,
                first_version,
                recorded_at,
                ..
            } => {
                let stream = self.request.stream;
                let events = self
                    .request
                    .events
                    .into_iter()
                    .enumerate()
                    .map(|(offset, event)| RecordedEvent {
                        event_id: event.event_id,
                        stream_id: stream.clone(),
                        stream_version: first_version + offset as u64,
                        position: Position((first_position + offset as i64) as u64),
                        recorded_at,
                        event_type: event.event_type,
                        schema_version: event.schema_version,
                        payload: event.payload,
                        metadata: event.metadata,
                    })
                    .collect();
                AppendOutcome {
                    events,
                    deduplicated: false,
                }
            }
            Written::Snapshot => AppendOutcome {
                events: Vec::new(),
                deduplicated: false,
            },
        }
    }
}

fn save_snapshot(connection: &Connection, snapshot: &Snapshot) -> Result<(), BackendError> {
    connection
        .prepare_cached(
            "INSERT INTO snapshots (stream_id, version, state_version, state, taken_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, \
             state_version = excluded.state_version, state = excluded.state, \
             taken_at = excluded.taken_at \
             WHERE excluded.version >= snapshots.version",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                snapshot.stream.as_str(),
                to_sql_int(snapshot.version),
                snapshot.state_version,
                snapshot.state.to_string(),
                snapshot.taken_at.as_unix_micros(),
            ])
        })
        .map(|_| ())
        .map_err(|error| backend("saving a snapshot", error))
}
