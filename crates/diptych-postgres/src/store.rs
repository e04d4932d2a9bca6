//! [`PgStore`]: the event store on PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::{
    AppendError, AppendOutcome, AppendRequest, BackendError, Direction, EventStore,
    ExpectedVersion, Metadata, Position, ReadError, RecordedEvent, Snapshot, SnapshotError,
    StreamId, StreamRead, Timestamp, check_append_shape,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::database::{Database, PgConfig};
use crate::error::{OpenError, backend};
use crate::events_schema::{
    CONFLICT, EVENTS, KEY_REUSED, MAX_EVENTS_PER_TRANSACTION, NOT_FIRST_WRITE, READABLE_BOUND,
    TOO_MANY_EVENTS,
};

const EVENT_COLUMNS: &str = "position, stream_id, version, event_id, event_type, \
                             schema_version, payload, metadata, recorded_at";

/// How soon the head is re-read while committed events are held back behind a
/// transaction still in progress (the commit that releases them may be any write
/// transaction on the server, which does not notify), doubling up to
/// `HELD_BACK_RECHECK_MAX` while they stay held.
const HELD_BACK_RECHECK: Duration = Duration::from_millis(5);
const HELD_BACK_RECHECK_MAX: Duration = Duration::from_millis(100);

/// How often the head is re-read with no notification at all.
const IDLE_RECHECK: Duration = Duration::from_secs(1);

/// The event store on PostgreSQL, shared by any number of processes.
///
/// Appends from many connections run concurrently: each locks only its own
/// stream, and PostgreSQL flushes the WAL of concurrent commits together. The
/// global order needs no lock either (see the crate documentation).
///
/// Appends do not `NOTIFY` in their own transaction: PostgreSQL serialises the
/// commits of notifying transactions on one lock, which would serialise every
/// writer. Instead a notifier task sends one notification after a burst of
/// appends, outside their transactions, and wakes this process's own
/// subscribers directly.
pub struct PgStore {
    database: Arc<Database>,
    head: watch::Sender<Position>,
    /// Moves after each append, for the notifier.
    appended: watch::Sender<u64>,
    /// Moves after an append that was not yet readable, for the follower.
    held_back: watch::Sender<u64>,
    tasks: [JoinHandle<()>; 2],
    readable_wait: Duration,
}

impl PgStore {
    /// Connects to the store described by `config`, creating or migrating its
    /// tables.
    pub async fn connect(config: &PgConfig) -> Result<Self, OpenError> {
        let database = Arc::new(Database::open(config, &EVENTS, &["events"]).await?);
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
        Ok(Self {
            database,
            head,
            appended,
            held_back,
            tasks: [follower, notifier],
            readable_wait: config.readable_wait,
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.database.schema
    }

    async fn try_append(&self, request: &AppendRequest) -> Result<AppendOutcome, Attempt> {
        let client = self.database.connection("appending").await?;
        let expected: Option<i64> = match request.expected {
            ExpectedVersion::Any => None,
            ExpectedVersion::NoStream => Some(0),
            ExpectedVersion::Exact(version) => Some(to_sql(version)),
        };
        let ids: Vec<Uuid> = request.events.iter().map(|e| e.event_id).collect();
        let types: Vec<&str> = request
            .events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect();
        let schema_versions: Vec<i32> = request
            .events
            .iter()
            // Stored bit for bit: PostgreSQL has no unsigned integers.
            .map(|e| e.schema_version as i32)
            .collect();
        let payloads: Vec<&serde_json::Value> = request.events.iter().map(|e| &e.payload).collect();
        let metadata: Vec<serde_json::Value> = request
            .events
            .iter()
            .map(|e| serde_json::to_value(&e.metadata).unwrap_or_default())
            .collect();
        let statement = client
            .prepare_cached("SELECT * FROM diptych_append($1, $2, $3, $4, $5, $6, $7, $8)")
            .await
            .map_err(|error| Attempt::Failed(backend("preparing the append", error).into()))?;
        let bound = client
            .prepare_cached(&format!("SELECT {READABLE_BOUND}"))
            .await
            .map_err(|error| Attempt::Failed(backend("preparing the append", error).into()))?;
        // Pipelined behind the append on the same connection, so it runs right
        // after the append commits at no extra round trip: whether the events
        // are already readable in the global order (they usually are).
        let stream = request.stream.as_str();
        let params: [&(dyn ToSql + Sync); 8] = [
            &stream,
            &expected,
            &request.idempotency_key,
            &ids,
            &types,
            &schema_versions,
            &payloads,
            &metadata,
        ];
        let (appended, readable_bound) = tokio::join!(
            client.query_one(&statement, &params),
            client.query_one(&bound, &[]),
        );
        let row = appended.map_err(|error| classify(request, error))?;
        if let Ok(bound) = readable_bound {
            let last: i64 = row.get("last_position");
            if last < bound.get::<_, i64>(0) {
                self.head.send_if_modified(|head| {
                    let moved = Position(last as u64) > *head;
                    *head = (*head).max(Position(last as u64));
                    moved
                });
            }
        }
        let first: i64 = row.get("first_position");
        let last: i64 = row.get("last_position");
        if row.get::<_, bool>("deduplicated") {
            let events = events_between(&client, first, last)
                .await
                .map_err(|error| Attempt::Failed(error.into()))?;
            return Ok(AppendOutcome {
                events,
                deduplicated: true,
            });
        }
        let first_version: i64 = row.get("first_version");
        let recorded_at = Timestamp::from_unix_micros(row.get("recorded_at"));
        let events = request
            .events
            .iter()
            .enumerate()
            .map(|(offset, event)| RecordedEvent {
                event_id: event.event_id,
                stream_id: request.stream.clone(),
                stream_version: (first_version + offset as i64) as u64,
                position: Position((first + offset as i64) as u64),
                recorded_at,
                event_type: event.event_type.clone(),
                schema_version: event.schema_version,
                payload: event.payload.clone(),
                metadata: event.metadata.clone(),
            })
            .collect();
        Ok(AppendOutcome {
            events,
            deduplicated: false,
        })
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

    /// The first event id of `request`, in request order, that is already stored
    /// or repeated earlier in the request.
    async fn first_duplicate_id(
        &self,
        request: &AppendRequest,
    ) -> Result<Option<Uuid>, BackendError> {
        let client = self
            .database
            .connection("finding a duplicate event id")
            .await?;
        let ids: Vec<Uuid> = request.events.iter().map(|e| e.event_id).collect();
        let row = client
            .query_opt(
                "SELECT u.id FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n) \
                 WHERE EXISTS (SELECT 1 FROM events e WHERE e.event_id = u.id) \
                    OR EXISTS (SELECT 1 FROM unnest($1::uuid[]) WITH ORDINALITY AS v(id, m) \
                               WHERE v.id = u.id AND v.m < u.n) \
                 ORDER BY u.n LIMIT 1",
                &[&ids],
            )
            .await
            .map_err(|error| backend("finding a duplicate event id", error))?;
        Ok(row.map(|row| row.get(0)))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// How one try at an append ended, when it did not succeed.
enum Attempt {
    /// A final answer for the caller.
    Failed(AppendError),
    /// A unique index refused an event id: find which, or retry if the
    /// conflicting transaction rolled back meanwhile.
    DuplicateId,
    /// A racing append created the stream or claimed the key first: retry, and
    /// the checks will see what it wrote.
    Raced,
}

impl From<BackendError> for Attempt {
    fn from(error: BackendError) -> Self {
        Attempt::Failed(error.into())
    }
}

fn classify(request: &AppendRequest, error: tokio_postgres::Error) -> Attempt {
    let Some(db) = error.as_db_error() else {
        return Attempt::Failed(backend("appending", error).into());
    };
    let code = db.code().code();
    if code == CONFLICT {
        let actual = db.message().parse().unwrap_or(0);
        return Attempt::Failed(AppendError::Conflict {
            stream: request.stream.clone(),
            expected: request.expected,
            actual,
        });
    }
    if code == KEY_REUSED {
        return match StreamId::new(db.message()) {
            Ok(first_stream) => Attempt::Failed(AppendError::IdempotencyKeyReused {
                key: request.idempotency_key.clone().unwrap_or_default(),
                first_stream,
                stream: request.stream.clone(),
            }),
            Err(_) => Attempt::Failed(backend("appending", error).into()),
        };
    }
    if code == NOT_FIRST_WRITE {
        return Attempt::Failed(AppendError::Backend(BackendError::msg(
            "diptych_append was called in a transaction that had already written: call it \
             first, once per transaction, or the stream's order in the log could break",
        )));
    }
    if code == TOO_MANY_EVENTS {
        return Attempt::Failed(too_many_events(request.events.len()));
    }
    if db.code() == &SqlState::UNIQUE_VIOLATION {
        return match db.constraint() {
            Some("events_event_id_key") => Attempt::DuplicateId,
            _ => Attempt::Raced,
        };
    }
    Attempt::Failed(backend("appending", error).into())
}

fn too_many_events(events: usize) -> AppendError {
    AppendError::Backend(BackendError::msg(format!(
        "an append to PostgreSQL holds at most {MAX_EVENTS_PER_TRANSACTION} events, and this one has {events}: split it into several appends"
    )))
}

/// Converts a count or version to PostgreSQL's bigint, saturating.
fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn event_from_row(row: &Row) -> Result<RecordedEvent, BackendError> {
    let position: i64 = row.get(0);
    let corrupt = |what: &str, detail: String| {
        BackendError::msg(format!(
            "the event at position {position} is corrupt: {what} ({detail})"
        ))
    };
    let stream_id = StreamId::new(row.get::<_, String>(1))
        .map_err(|error| corrupt("its stream id is invalid", error.to_string()))?;
    let metadata: Metadata = serde_json::from_value(row.get(7))
        .map_err(|error| corrupt("its metadata is not valid", error.to_string()))?;
    Ok(RecordedEvent {
        event_id: row.get(3),
        stream_id,
        stream_version: row.get::<_, i64>(2) as u64,
        position: Position(position as u64),
        recorded_at: Timestamp::from_unix_micros(row.get(8)),
        event_type: row.get(4),
        schema_version: row.get::<_, i32>(5) as u32,
        payload: row.get(6),
        metadata,
    })
}

async fn query_events(
    client: &deadpool_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<RecordedEvent>, BackendError> {
    let statement = client
        .prepare_cached(sql)
        .await
        .map_err(|error| backend("preparing an event query", error))?;
    client
        .query(&statement, params)
        .await
        .map_err(|error| backend("reading events", error))?
        .iter()
        .map(event_from_row)
        .collect()
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

/// Tells other processes that events were appended: one `NOTIFY` at a time,
/// each covering every append committed before it was sent. It commits without
/// waiting for the disk, since a lost wake-up costs nothing: the notification
/// carries no data, and listeners re-read after reconnecting.
async fn notify_appends(database: Arc<Database>, mut appended: watch::Receiver<u64>) {
    let channel = crate::database::channel(&database.schema, "events");
    while appended.changed().await.is_ok() {
        appended.borrow_and_update();
        let sent = async {
            let client = database.connection("notifying an append").await?;
            client
                .batch_execute(&format!(
                    "BEGIN; SET LOCAL synchronous_commit = off; NOTIFY {channel}; COMMIT;"
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
        // A race is resolved by the next try seeing what the winner wrote; a
        // handful of tries is far more than any real race needs.
        let mut tries = 0;
        loop {
            tries += 1;
            match self.try_append(&request).await {
                Ok(outcome) => {
                    if !outcome.deduplicated {
                        self.appended.send_modify(|count| *count += 1);
                    }
                    if *self.head.borrow() < outcome.last_position() {
                        // Held back: have the follower poll until it is released.
                        self.held_back.send_modify(|count| *count += 1);
                        self.until_readable(outcome.last_position()).await;
                    }
                    return Ok(outcome);
                }
                Err(Attempt::Failed(error)) => return Err(error),
                Err(Attempt::DuplicateId) => {
                    if let Some(event_id) = self.first_duplicate_id(&request).await? {
                        return Err(AppendError::DuplicateEventId { event_id });
                    }
                }
                Err(Attempt::Raced) => {}
            }
            if tries >= 8 {
                return Err(BackendError::msg(format!(
                    "the append to `{}` kept racing other appends; retry it",
                    request.stream
                ))
                .into());
            }
        }
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
            Direction::Forward => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version >= $2 \
                 ORDER BY version LIMIT $3"
            ),
            Direction::Backward => format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND version <= $2 \
                 ORDER BY version DESC LIMIT $3"
            ),
        };
        let events = query_events(
            &client,
            &sql,
            &[
                &read.stream.as_str(),
                &to_sql(read.from),
                &to_sql(read.limit as u64),
            ],
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
