//! [`PgStore`]: the event store on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::{
    AppendError, AppendOutcome, AppendRequest, BackendError, Direction, EventStore, Position,
    ReadError, RecordedEvent, Snapshot, SnapshotError, StreamId, StreamRead, Timestamp,
    check_append_shape,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::database::{Database, PgConfig};
use crate::error::{OpenError, backend};
use crate::events_schema::{EVENTS, MAX_EVENTS_PER_TRANSACTION, READABLE_BOUND};
use crate::group::{GroupCommit, PreparedAppend, Signals, Stored, too_many_events};
use crate::rows::{
    EVENT_COLUMNS, STREAM_READ_BACKWARD, STREAM_READ_FORWARD, event_from_row, query_decoded,
    stream_event_from_row,
};

/// Every statement of the store looks rows up by key or by a range of an
/// index. A plan made while a table is still nearly empty (a fresh store, the
/// first minute before statistics are gathered) would scan it instead, and a
/// cached plan kept scanning as the table grew: each read and append slower
/// than the last. With scans off the store's sessions always use the indexes.
const INDEXED_ONLY: &str = "-c enable_seqscan=off";

/// How soon the head is re-read while committed events are held back behind a
/// transaction still in progress (the commit that releases them may be any write
/// transaction on the server, which does not notify), doubling up to
/// `HELD_BACK_RECHECK_MAX` while they stay held.
const HELD_BACK_RECHECK: Duration = Duration::from_millis(5);
const HELD_BACK_RECHECK_MAX: Duration = Duration::from_millis(100);

/// How often the head is re-read with no notification at all.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The least time between two notifications of appends. A notification costs
/// the server a transaction and a wake-up of every listening session: sent
/// after every append, it cost a lone writer more than half again its appends'
/// own work (`BENCHMARKS.md`). An append after a quiet spell is still notified
/// at once; under a steady stream of appends, other processes hear of them at
/// most this much later, in one notification covering them all.
const NOTIFY_SPACING: Duration = Duration::from_millis(5);

/// The event store on PostgreSQL, shared by any number of processes.
///
/// Appends that arrive together are written together: one transaction and one
/// round trip for the group, each append checked on its own (see `group.rs`).
/// Groups from several lanes and processes run concurrently: each locks only
/// its own streams, and PostgreSQL flushes the WAL of concurrent commits
/// together. The global order needs no lock either (see the crate
/// documentation).
///
/// Appends do not `NOTIFY` in their own transaction: PostgreSQL serialises the
/// commits of notifying transactions on one lock, which would serialise every
/// writer. Instead a notifier task sends one notification after a burst of
/// appends, outside their transactions, and wakes this process's own
/// subscribers directly.
pub struct PgStore {
    database: Arc<Database>,
    head: watch::Sender<Position>,
    /// Moves when an append is found held back, for the follower.
    held_back: watch::Sender<u64>,
    groups: Arc<GroupCommit>,
    tasks: [JoinHandle<()>; 2],
    readable_wait: Duration,
}

impl PgStore {
    /// Connects to the store described by `config`, creating or migrating its
    /// tables.
    pub async fn connect(config: &PgConfig) -> Result<Self, OpenError> {
        let database = Arc::new(Database::open(config, &EVENTS, &["events"], INDEXED_ONLY).await?);
        let (readable, _) = read_head(&database).await?;
        let head = watch::Sender::new(readable);
        let appended = watch::Sender::new(0);
        let held_back = watch::Sender::new(0);
        let follower = tokio::spawn(follow_head(
            Arc::clone(&database),
            held_back.subscribe(),
            head.clone(),
        ));
        let notifier = tokio::spawn(notify_appends(Arc::clone(&database), appended.subscribe()));
        let groups = Arc::new(GroupCommit::new(
            Arc::clone(&database),
            Signals {
                head: head.clone(),
                appended,
                held_back: held_back.clone(),
            },
            config.append_lanes.min(config.pool_size),
        ));
        Ok(Self {
            database,
            head,
            held_back,
            groups,
            tasks: [follower, notifier],
            readable_wait: config.readable_wait,
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.database.schema
    }

    /// Waits (at most `readable_wait`) until the head reaches `position`.
    async fn until_readable(&self, position: Position) {
        let mut head = self.head.subscribe();
        let reached =
            tokio::time::timeout(self.readable_wait, head.wait_for(|head| *head >= position)).await;
        if reached.is_err() {
            tracing::warn!(
                %position,
                waited = ?self.readable_wait,
                "an append is durable but not yet readable: a transaction older than it is \
                 still open on the server (see pg_stat_activity)"
            );
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// The outcome of an append that wrote its events from `first_position` and
/// `first_version` on.
fn written(
    append: PreparedAppend,
    first_position: i64,
    first_version: i64,
    recorded_at: i64,
) -> AppendOutcome {
    let recorded_at = Timestamp::from_unix_micros(recorded_at);
    let request = append.request;
    let stream = request.stream;
    let events = request
        .events
        .into_iter()
        .enumerate()
        .map(|(offset, event)| RecordedEvent {
            event_id: event.event_id,
            stream_id: stream.clone(),
            stream_version: (first_version + offset as i64) as u64,
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

/// Converts a count or version to PostgreSQL's bigint, saturating.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

async fn query_events(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<RecordedEvent>, BackendError> {
    query_decoded(client, sql, params, 0, event_from_row).await
}

async fn events_between(
    client: &deadpool_postgres::Client,
    first: i64,
    last: i64,
) -> Result<Vec<RecordedEvent>, BackendError> {
    query_events(
        client,
        &format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position BETWEEN $1 AND $2 ORDER BY position"
        ),
        &[&first, &last],
    )
    .await
}

/// The readable head, and the highest committed position (above the head while
/// a transaction in progress holds events back).
async fn read_head(database: &Database) -> Result<(Position, Position), BackendError> {
    let client = database.connection("reading the head").await?;
    let row = client
        .query_one(
            &format!(
                "SELECT (SELECT COALESCE(max(position), 0) FROM events \
                         WHERE position < {READABLE_BOUND}), \
                        (SELECT COALESCE(max(position), 0) FROM events)"
            ),
            &[],
        )
        .await
        .map_err(|error| backend("reading the head", error))?;
    Ok((
        Position(row.get::<_, i64>(0) as u64),
        Position(row.get::<_, i64>(1) as u64),
    ))
}

/// Tells other processes that events were appended: one `NOTIFY` at a time, at
/// least [`NOTIFY_SPACING`] apart, each covering every append committed before
/// it was sent. It commits without waiting for the disk, since a lost wake-up
/// costs nothing: the notification carries no data, and listeners re-read after
/// reconnecting.
async fn notify_appends(database: Arc<Database>, mut appended: watch::Receiver<u64>) {
    let channel = crate::database::channel(&database.schema, "events");
    // This store's own listener skips notifications carrying its origin: its
    // appends move its head themselves.
    let origin = &database.origin;
    let mut last_sent: Option<tokio::time::Instant> = None;
    while appended.changed().await.is_ok() {
        if let Some(next) = last_sent.map(|sent| sent + NOTIFY_SPACING)
            && next > tokio::time::Instant::now()
        {
            tokio::time::sleep_until(next).await;
        }
        appended.borrow_and_update();
        last_sent = Some(tokio::time::Instant::now());
        let sent = async {
            let client = database.connection("notifying an append").await?;
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY {channel}, '{origin}'; COMMIT;"
                ))
                .await
                .map_err(|error| backend("notifying an append", error))
        };
        if let Err(error) = sent.await {
            tracing::warn!(%error, "could not notify other processes of an append; retrying");
            // Try again even if nothing else is appended: other processes'
            // subscribers would otherwise wait for the next append.
            appended.mark_changed();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Keeps the head watch up to date: re-reads the head whenever another
/// process's append is notified, and every few milliseconds while committed
/// events are held back (`appended` moves when one of this process's own
/// appends found itself held back).
async fn follow_head(
    database: Arc<Database>,
    mut appended: watch::Receiver<u64>,
    head: watch::Sender<Position>,
) {
    let mut wakes = database.wakes("events");
    // How long to wait for a wake-up before reading the head anyway: short while
    // events are held back (backing off while they stay held), and
    // `IDLE_RECHECK` otherwise, a safety net for a notification that was lost
    // (a writer that died between its commit and its NOTIFY).
    let mut patience = IDLE_RECHECK;
    loop {
        let woken = async {
            tokio::select! {
                changed = wakes.changed() => changed.is_ok(),
                changed = appended.changed() => changed.is_ok(),
            }
        };
        if let Ok(false) = tokio::time::timeout(patience, woken).await {
            return;
        }
        wakes.borrow_and_update();
        appended.borrow_and_update();
        match read_head(&database).await {
            Ok((readable, committed)) => {
                patience = match (committed > readable, patience >= IDLE_RECHECK) {
                    (true, true) => HELD_BACK_RECHECK,
                    (true, false) => (patience * 2).min(HELD_BACK_RECHECK_MAX),
                    (false, _) => IDLE_RECHECK,
                };
                head.send_if_modified(|current| {
                    let moved = readable > *current;
                    *current = (*current).max(readable);
                    moved
                });
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the event store's head");
                patience = HELD_BACK_RECHECK_MAX;
            }
        }
    }
}

#[async_trait]
impl EventStore for PgStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        check_append_shape(&request)?;
        if request.events.len() > MAX_EVENTS_PER_TRANSACTION {
            return Err(too_many_events(request.events.len()));
        }
        let answer = self.groups.append(PreparedAppend::new(request)).await;
        let Some((append, stored)) = answer else {
            return Err(BackendError::msg(
                "the append was abandoned before its group was written (is the runtime \
                 shutting down?); retry it with the same idempotency key",
            )
            .into());
        };
        let outcome = match stored? {
            Stored::Written {
                first_position,
                first_version,
                recorded_at,
            } => written(append, first_position, first_version, recorded_at),
            Stored::Repeat {
                first_position,
                last_position,
            } => {
                let client = self
                    .database
                    .connection("reading a repeated append")
                    .await?;
                AppendOutcome {
                    events: events_between(&client, first_position, last_position).await?,
                    deduplicated: true,
                }
            }
        };
        // Only a caller that asked to read its writes in the global order waits
        // (see `PgConfig::readable_wait`): a consistency token never needs it.
        if *self.head.borrow() < outcome.last_position() && !self.readable_wait.is_zero() {
            self.held_back.send_modify(|count| *count += 1);
            self.until_readable(outcome.last_position()).await;
        }
        Ok(outcome)
    }

    async fn find_idempotent_append(&self, key: &str) -> Result<Option<AppendOutcome>, ReadError> {
        let client = self
            .database
            .connection("reading an idempotency key")
            .await?;
        let row = client
            .query_opt(
                "SELECT first_position, last_position FROM idempotency \
                 WHERE key = $1 AND first_position IS NOT NULL",
                &[&key],
            )
            .await
            .map_err(|error| backend("reading an idempotency key", error))?;
        let Some(row) = row else {
            return Ok(None);
        };
        Ok(Some(AppendOutcome {
            events: events_between(&client, row.get(0), row.get(1)).await?,
            deduplicated: true,
        }))
    }

    async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError> {
        let client = self.database.connection("reading a stream").await?;
        let sql = match read.direction {
            Direction::Forward => STREAM_READ_FORWARD,
            Direction::Backward => STREAM_READ_BACKWARD,
        };
        let stream = &read.stream;
        let events = query_decoded(
            &client,
            sql,
            &[
                &stream.as_str(),
                &to_sql(read.from),
                &to_sql(read.limit as u64),
            ],
            // Room for a whole page when pages are small; a large page grows
            // as it arrives rather than reserving what a short stream never fills.
            read.limit.min(1024),
            |row| stream_event_from_row(row, stream),
        )
        .await?;
        if events.is_empty() && stream_version(&client, &read.stream).await? == 0 {
            return Err(ReadError::StreamNotFound {
                stream: read.stream,
            });
        }
        Ok(events)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        let client = self.database.connection("reading a stream version").await?;
        Ok(stream_version(&client, stream).await?)
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let client = self.database.connection("reading the log").await?;
        Ok(query_events(
            &client,
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events \
                 WHERE position > $1 AND position < {READABLE_BOUND} \
                 ORDER BY position LIMIT $2"
            ),
            &[&to_sql(after.0), &to_sql(limit as u64)],
        )
        .await?)
    }

    async fn head(&self) -> Result<Position, ReadError> {
        Ok(read_head(&self.database).await?.0)
    }

    fn head_watch(&self) -> watch::Receiver<Position> {
        self.head.subscribe()
    }

    async fn events_after(&self, after: Position, upto: Position) -> Result<u64, ReadError> {
        if upto <= after {
            return Ok(0);
        }
        let client = self.database.connection("counting events").await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM events WHERE position > $1 AND position <= $2",
                &[&to_sql(after.0), &to_sql(upto.0)],
            )
            .await
            .map_err(|error| backend("counting events", error))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        let client = self.database.connection("loading a snapshot").await?;
        let row = client
            .query_opt(
                "SELECT version, state_version, state, taken_at FROM snapshots \
                 WHERE stream_id = $1",
                &[&stream.as_str()],
            )
            .await
            .map_err(|error| backend("loading a snapshot", error))?;
        Ok(row.map(|row| Snapshot {
            stream: stream.clone(),
            version: row.get::<_, i64>(0) as u64,
            state_version: row.get::<_, i32>(1) as u32,
            state: row.get(2),
            taken_at: Timestamp::from_unix_micros(row.get(3)),
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        let client = self.database.connection("saving a snapshot").await?;
        client
            .execute(
                "INSERT INTO snapshots (stream_id, version, state_version, state, taken_at) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, \
                     state_version = excluded.state_version, state = excluded.state, \
                     taken_at = excluded.taken_at \
                 WHERE excluded.version >= snapshots.version",
                &[
                    &snapshot.stream.as_str(),
                    &to_sql(snapshot.version),
                    &(snapshot.state_version as i32),
                    &snapshot.state,
                    &snapshot.taken_at.as_unix_micros(),
                ],
            )
            .await
            .map_err(|error| backend("saving a snapshot", error))?;
        Ok(())
    }
}

async fn stream_version(
    client: &deadpool_postgres::Client,
    stream: &StreamId,
) -> Result<u64, BackendError> {
    let row = client
        .query_opt(
            "SELECT COALESCE(max(version), 0) FROM events WHERE stream_id = $1",
            &[&stream.as_str()],
        )
        .await
        .map_err(|error| backend("reading a stream version", error))?;
    Ok(row.map_or(0, |row| row.get::<_, i64>(0) as u64))
}
