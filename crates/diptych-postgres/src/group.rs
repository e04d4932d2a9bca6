//! Group commit: appends that arrive together share one transaction and one
//! round trip to PostgreSQL.
//!
//! Each append joins a queue. A *lane* is a task that takes everything queued
//! (up to a cap) as one group, writes it with one call of
//! `diptych_append_group` (one statement, so one transaction and one commit
//! flush), answers each member, and goes on while the queue holds more. At most
//! [`PgConfig::append_lanes`](crate::PgConfig) lanes run at once, each on one
//! pooled connection for the length of its call; an append waits in the queue,
//! never for a connection of its own. A lone append (nothing else being
//! written) is written at once, on its caller's task, with the one-append
//! function of step 1, the cheapest: there is no pacing delay, a group is
//! simply whatever queued while the previous groups were being written, so
//! groups grow with the load and vanish without it. One lane is the default:
//! on a small server the fewer, larger groups cost less per append than
//! several concurrent ones (`BENCHMARKS.md`).
//!
//! Each member is checked on its own, in queue order (the idempotency key, then
//! the expected version, as the contract orders them): a refused member writes
//! nothing and the others commit. A second append to a stream in the same
//! group sees the first. The order of the log is kept as in a lone append: the
//! group's stream locks are all taken, sorted by key so that two groups never
//! wait for each other in a cycle, before the transaction gets its id
//! (`docs/postgres-ordering.md`).
//!
//! What only the database can see (a duplicate event id, an idempotency key
//! claimed meanwhile on another stream, a deadlock) fails the whole statement,
//! and so the whole transaction: nothing was written. The lane then writes the
//! members one at a time, each in a group of its own, so each gets its own
//! answer and a member at fault fails alone.
//!
//! A lane also keeps the head watch: the readable bound, pipelined behind the
//! group's call on the same connection, is read right after the commit, and
//! what it passes of this store's groups becomes the head. What it does not
//! pass (an older transaction was still running) waits for a later group's
//! bound or for the follower, which polls while events are held back.

use std::collections::VecDeque;
use std::error::Error;
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use diptych_core::{
    AppendError, AppendRequest, BackendError, ExpectedVersion, Metadata, Position, StreamId,
};
use futures_util::FutureExt;
use tokio::sync::{oneshot, watch};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use uuid::Uuid;

use crate::database::Database;
use crate::error::backend;
use crate::events_schema::{
    CONFLICT, KEY_REUSED, MAX_EVENTS_PER_TRANSACTION, NOT_FIRST_WRITE, READABLE_BOUND,
    TOO_MANY_EVENTS,
};

/// The most appends one group takes: enough for every writer of a busy
/// process, few enough that the function's per-group bookkeeping (linear
/// look-ups among the group's streams and keys) stays small.
const MAX_GROUP_APPENDS: usize = 128;

/// The most events one group takes, unless its first append alone has more.
/// Far below the 65,536 a transaction can number.
const MAX_GROUP_EVENTS: usize = 8_192;

/// How many times a lone append is tried again after a race the database
/// reported (a deadlock, a unique index that another transaction claimed then
/// released). A handful is far more than any real race needs.
const MAX_TRIES: usize = 8;

const APPEND_ONE: &str = "SELECT first_position, last_position, first_version, recorded_at, \
                          deduplicated FROM diptych_append($1, $2, $3, $4, $5, $6, $7, $8)";

const APPEND_GROUP: &str = "SELECT outcome, first_position, last_position, first_version, \
                            recorded_at, detail FROM diptych_append_group(\
                            $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// JSON already serialized, sent as `jsonb`: the caller's task serializes its
/// own events, so a lane only copies bytes.
#[derive(Debug)]
pub(crate) struct JsonText(String);

impl ToSql for JsonText {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        // jsonb's binary format: a version byte, then the text.
        out.put_u8(1);
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::JSONB
    }

    to_sql_checked!();
}

/// An append with its events' JSON serialized.
pub(crate) struct PreparedAppend {
    /// The request.
    pub request: AppendRequest,
    payloads: Vec<JsonText>,
    metadata: Vec<JsonText>,
}

impl PreparedAppend {
    /// Serializes the payloads and metadata of `request`.
    pub fn new(request: AppendRequest) -> Self {
        let payloads = request
            .events
            .iter()
            .map(|event| JsonText(event.payload.to_string()))
            .collect();
        let metadata = request
            .events
            .iter()
            .map(|event| {
                JsonText(if event.metadata == Metadata::default() {
                    "{}".to_owned()
                } else {
                    serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".to_owned())
                })
            })
            .collect();
        Self {
            request,
            payloads,
            metadata,
        }
    }
}

/// What an append that was not refused did.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stored {
    /// Wrote its events from this position and version on.
    Written {
        first_position: i64,
        first_version: i64,
        recorded_at: i64,
    },
    /// Repeated an earlier append with the same key, which wrote these positions.
    Repeat {
        first_position: i64,
        last_position: i64,
    },
}

/// An append's answer, with the append handed back to its caller.
pub(crate) type Answer = (PreparedAppend, Result<Stored, AppendError>);

struct Member {
    append: PreparedAppend,
    reply: oneshot::Sender<Answer>,
    /// Set once a group found one of its stream's locks taken: next time it is
    /// written alone, waiting for that lock on a task of its own.
    found_busy: bool,
}

/// Whether a call waits for stream locks other transactions hold.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Locks {
    /// Waits: an append written alone waits for its own stream only.
    Wait,
    /// Skips the appends whose stream is locked, answering them `busy`, so a
    /// group never makes its members wait for one another's streams.
    Skip,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Member>,
    busy_lanes: usize,
    /// An append is being written on its caller's task, outside any lane.
    alone_in_flight: bool,
}

/// Where a lane reports what it committed.
pub(crate) struct Signals {
    /// The readable head, moved by the lanes when their groups are readable.
    pub head: watch::Sender<Position>,
    /// Moves after each group that wrote, for the notifier.
    pub appended: watch::Sender<u64>,
    /// Moves when a group stays held back, so the follower polls the head.
    pub held_back: watch::Sender<u64>,
}

/// The queue of appends and the lanes that write them.
pub(crate) struct GroupCommit {
    database: Arc<Database>,
    signals: Signals,
    lanes: usize,
    queue: Mutex<Queue>,
    /// The last positions of this store's groups that were committed but not
    /// yet readable, released as soon as a readable bound passes them.
    held: Mutex<Vec<Position>>,
}

impl GroupCommit {
    pub fn new(database: Arc<Database>, signals: Signals, lanes: usize) -> Self {
        Self {
            database,
            signals,
            lanes: lanes.max(1),
            queue: Mutex::new(Queue::default()),
            held: Mutex::new(Vec::new()),
        }
    }

    /// Writes an append: at once, on the caller's task, when nothing else is
    /// being written (so a lone writer pays no hand-over between tasks and
    /// uses the one-append function, the cheapest); otherwise in the next
    /// group a lane writes. The lone append holds no lane: if it waits for its
    /// stream's lock, appends to other streams go on in the lane meanwhile.
    pub async fn append(self: &Arc<Self>, append: PreparedAppend) -> Option<Answer> {
        let alone = {
            let mut queue = self.queue.lock().unwrap();
            let alone = queue.waiting.is_empty() && queue.busy_lanes == 0 && !queue.alone_in_flight;
            if alone {
                queue.alone_in_flight = true;
            }
            alone
        };
        if alone {
            let answer = {
                // Clears the flag even if the caller stops waiting halfway.
                let _alone = AloneGuard(self);
                self.commit_alone(&append, Locks::Wait).await
            };
            let answer = answer.expect("an append that waits for its lock is never busy");
            return Some((append, answer));
        }
        self.submit(append).await.ok()
    }

    /// Queues an append; the answer arrives once its group has committed (or
    /// refused it). A lane is started if one is free.
    fn submit(self: &Arc<Self>, append: PreparedAppend) -> oneshot::Receiver<Answer> {
        let (reply, answer) = oneshot::channel();
        let start_lane = {
            let mut queue = self.queue.lock().unwrap();
            queue.waiting.push_back(Member {
                append,
                reply,
                found_busy: false,
            });
            let free = queue.busy_lanes < self.lanes;
            if free {
                queue.busy_lanes += 1;
            }
            free
        };
        if start_lane {
            tokio::spawn(Arc::clone(self).run_lane());
        }
        answer
    }

    /// Called when a lone append written on its caller's task is done:
    /// appends that queued meanwhile get a lane if one is free.
    fn alone_done(self: &Arc<Self>) {
        let start_lane = {
            let mut queue = self.queue.lock().unwrap();
            queue.alone_in_flight = false;
            let start = !queue.waiting.is_empty() && queue.busy_lanes < self.lanes;
            if start {
                queue.busy_lanes += 1;
            }
            start
        };
        if start_lane {
            tokio::spawn(Arc::clone(self).run_lane());
        }
    }

    /// Writes groups while appends are queued. A lane is a task of its own, not
    /// the caller's: a caller that gives up waiting cannot abandon the others'
    /// appends halfway.
    async fn run_lane(self: Arc<Self>) {
        loop {
            let group = {
                let mut queue = self.queue.lock().unwrap();
                if queue.waiting.is_empty() {
                    queue.busy_lanes -= 1;
                    return;
                }
                take_group(&mut queue.waiting)
            };
            let answers = std::panic::AssertUnwindSafe(self.commit(&group))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| {
                    let failed = AppendError::Backend(BackendError::msg(
                        "appending failed unexpectedly (a panic while writing a group); \
                         retry with the same idempotency key",
                    ));
                    group.iter().map(|_| Some(Err(failed.clone()))).collect()
                });
            let mut busy = Vec::new();
            for (mut member, answer) in group.into_iter().zip(answers) {
                match answer {
                    // A caller that stopped waiting no longer needs its answer.
                    Some(answer) => drop(member.reply.send((member.append, answer))),
                    None if member.found_busy => {
                        let groups = Arc::clone(&self);
                        tokio::spawn(async move {
                            let answer = groups.commit_alone(&member.append, Locks::Wait).await;
                            let answer = answer.expect("an append that waits is never busy");
                            let _ = member.reply.send((member.append, answer));
                        });
                    }
                    None => {
                        member.found_busy = true;
                        busy.push(member);
                    }
                }
            }
            // First in the next group: a lock another group held is usually
            // free by then.
            let mut queue = self.queue.lock().unwrap();
            for member in busy.into_iter().rev() {
                queue.waiting.push_front(member);
            }
        }
    }

    /// One answer per member, in order; `None` for a member whose stream was
    /// locked by another transaction, left for a later try.
    async fn commit(&self, group: &[Member]) -> Vec<Option<Result<Stored, AppendError>>> {
        let appends: Vec<&PreparedAppend> = group.iter().map(|member| &member.append).collect();
        if appends.len() == 1 {
            return vec![self.commit_alone(appends[0], Locks::Skip).await];
        }
        match self.write(&appends, Locks::Skip).await {
            Ok(answers) => answers,
            // The database refused the statement, so nothing of it was
            // written: find whose fault it was by writing each on its own.
            Err(Failure::Refused(_)) => {
                let mut answers = Vec::with_capacity(appends.len());
                for append in appends {
                    answers.push(self.commit_alone(append, Locks::Skip).await);
                }
                answers
            }
            Err(Failure::Lost(error)) => appends.iter().map(|_| Some(Err(error.clone()))).collect(),
        }
    }

    /// Writes one append in a group of its own, trying again after races;
    /// `None` when its stream was locked and `locks` said to skip it.
    async fn commit_alone(
        &self,
        append: &PreparedAppend,
        locks: Locks,
    ) -> Option<Result<Stored, AppendError>> {
        let request = &append.request;
        for _ in 0..MAX_TRIES {
            let written = match locks {
                Locks::Wait => self.write_lone(append).await,
                Locks::Skip => self.write(&[append], locks).await,
            };
            let error = match written {
                Ok(mut answers) => return answers.pop().expect("one answer per append"),
                Err(Failure::Lost(error)) => return Some(Err(error)),
                Err(Failure::Refused(error)) => error,
            };
            let Some(db) = error.as_db_error() else {
                return Some(Err(backend("appending", error).into()));
            };
            let code = db.code();
            if code.code() == TOO_MANY_EVENTS {
                return Some(Err(too_many_events(request.events.len())));
            }
            if code.code() == NOT_FIRST_WRITE {
                return Some(Err(AppendError::Backend(BackendError::msg(
                    "an append function was called in a transaction that had already \
                     written: call it first, once per transaction, or the stream's order in \
                     the log could break",
                ))));
            }
            if code == &SqlState::UNIQUE_VIOLATION && db.constraint() == Some("events_event_id_key")
            {
                // The first offender in request order; none if the transaction
                // that held it rolled back meanwhile, and then a retry passes.
                match self.first_duplicate_id(request).await {
                    Ok(Some(event_id)) => {
                        return Some(Err(AppendError::DuplicateEventId { event_id }));
                    }
                    Ok(None) => continue,
                    Err(error) => return Some(Err(error.into())),
                }
            }
            // A key claimed by a transaction that was still running (it is
            // now visible, and the next try reports it), or a deadlock on keys.
            let raced = code == &SqlState::UNIQUE_VIOLATION
                || code == &SqlState::T_R_DEADLOCK_DETECTED
                || code == &SqlState::T_R_SERIALIZATION_FAILURE;
            if !raced {
                return Some(Err(backend("appending", error).into()));
            }
        }
        Some(Err(BackendError::msg(format!(
            "the append to `{}` kept racing other appends; retry it",
            request.stream
        ))
        .into()))
    }

    /// One call of `diptych_append_group` for `appends`, then the signals.
    async fn write(
        &self,
        appends: &[&PreparedAppend],
        locks: Locks,
    ) -> Result<Vec<Option<Result<Stored, AppendError>>>, Failure> {
        let client = self
            .database
            .connection("appending")
            .await
            .map_err(|error| Failure::Lost(error.into()))?;
        let statement = client
            .prepare_cached(APPEND_GROUP)
            .await
            .map_err(|error| Failure::Lost(backend("preparing the append", error).into()))?;
        let bound_statement = client
            .prepare_cached(&format!("SELECT {READABLE_BOUND}"))
            .await
            .map_err(|error| Failure::Lost(backend("preparing the append", error).into()))?;
        let columns = Columns::new(appends, locks);
        let params = columns.params();
        // The readable bound is pipelined behind the group on the same
        // connection, so it is read right after the commit at no extra round
        // trip: whether the group is readable in the global order yet.
        let (rows, bound) = tokio::join!(
            client.query(&statement, &params),
            client.query_one(&bound_statement, &[]),
        );
        let bound = bound.ok().map(|row| Position(row.get::<_, i64>(0) as u64));
        let rows = rows.map_err(|error| {
            // A statement the server answered with an error rolled back
            // whole; anything else (a lost connection) leaves its fate
            // unknown, and only the caller's retry with its key can tell.
            if error.as_db_error().is_some() {
                Failure::Refused(error)
            } else {
                Failure::Lost(backend("appending", error).into())
            }
        })?;
        if rows.len() != appends.len() {
            return Err(Failure::Lost(AppendError::Backend(BackendError::msg(
                format!(
                    "diptych_append_group answered {} rows for {} appends",
                    rows.len(),
                    appends.len()
                ),
            ))));
        }
        let mut last_written: Option<Position> = None;
        let answers = rows
            .iter()
            .zip(appends)
            .map(|(row, append)| {
                let answer = answer(row, &append.request);
                if let Some(Ok(Stored::Written { first_position, .. })) = &answer {
                    let last =
                        Position((first_position + append.request.events.len() as i64 - 1) as u64);
                    last_written = last_written.max(Some(last));
                }
                answer
            })
            .collect();
        self.committed(last_written, bound);
        Ok(answers)
    }

    /// One call of `diptych_append`, for an append that waits for its stream's
    /// lock (on a task that holds no lane): the function of step 1, whose
    /// blocking lock is what is needed there, with fewer statements than a
    /// group's, so a writer alone is not slowed by what groups need.
    async fn write_lone(
        &self,
        append: &PreparedAppend,
    ) -> Result<Vec<Option<Result<Stored, AppendError>>>, Failure> {
        let client = self
            .database
            .connection("appending")
            .await
            .map_err(|error| Failure::Lost(error.into()))?;
        let statement = client
            .prepare_cached(APPEND_ONE)
            .await
            .map_err(|error| Failure::Lost(backend("preparing the append", error).into()))?;
        let bound_statement = client
            .prepare_cached(&format!("SELECT {READABLE_BOUND}"))
            .await
            .map_err(|error| Failure::Lost(backend("preparing the append", error).into()))?;
        let request = &append.request;
        let columns = Columns::new(&[append], Locks::Wait);
        let params: [&(dyn ToSql + Sync); 8] = [
            &columns.streams[0],
            &columns.expected[0],
            &columns.keys[0],
            &columns.ids,
            &columns.types,
            &columns.schema_versions,
            &columns.payloads,
            &columns.metadata,
        ];
        let (row, bound) = tokio::join!(
            client.query_one(&statement, &params),
            client.query_one(&bound_statement, &[]),
        );
        let bound = bound.ok().map(|row| Position(row.get::<_, i64>(0) as u64));
        let row = match row {
            Ok(row) => row,
            Err(error) => {
                let refusal = error.as_db_error().and_then(|db| match db.code().code() {
                    CONFLICT => Some(AppendError::Conflict {
                        stream: request.stream.clone(),
                        expected: request.expected,
                        actual: db.message().parse().unwrap_or(0),
                    }),
                    KEY_REUSED => StreamId::new(db.message()).ok().map(|first_stream| {
                        AppendError::IdempotencyKeyReused {
                            key: request.idempotency_key.clone().unwrap_or_default(),
                            first_stream,
                            stream: request.stream.clone(),
                        }
                    }),
                    _ => None,
                });
                return match refusal {
                    Some(refusal) => Ok(vec![Some(Err(refusal))]),
                    None if error.as_db_error().is_some() => Err(Failure::Refused(error)),
                    None => Err(Failure::Lost(backend("appending", error).into())),
                };
            }
        };
        let first_position: i64 = row.get("first_position");
        let stored = if row.get::<_, bool>("deduplicated") {
            Stored::Repeat {
                first_position,
                last_position: row.get("last_position"),
            }
        } else {
            let last = Position(row.get::<_, i64>("last_position") as u64);
            self.committed(Some(last), bound);
            Stored::Written {
                first_position,
                first_version: row.get("first_version"),
                recorded_at: row.get("recorded_at"),
            }
        };
        Ok(vec![Some(Ok(stored))])
    }

    /// Moves the head and wakes the notifier after a group committed, given
    /// the readable bound read right after the commit.
    fn committed(&self, last_written: Option<Position>, bound: Option<Position>) {
        if last_written.is_some() {
            self.signals.appended.send_modify(|count| *count += 1);
        }
        let bound = bound.unwrap_or(Position::START);
        let head = *self.signals.head.borrow();
        // This group and any of this store's earlier groups that were still
        // held back: those below the bound are readable now.
        let (released, still_held) = {
            let mut held = self.held.lock().unwrap();
            held.extend(last_written);
            let released = held.iter().copied().filter(|last| *last < bound).max();
            held.retain(|last| *last >= bound && *last > head);
            (released, !held.is_empty())
        };
        if let Some(released) = released {
            advance(&self.signals.head, released);
        }
        if still_held {
            // Released by a later group's bound, or by the follower, which
            // polls while events are held back.
            self.signals.held_back.send_modify(|count| *count += 1);
        }
    }

    /// The first event id of `request`, in request order, that is already
    /// stored or repeated earlier in the request.
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

/// Marks the end of a lone append written on its caller's task, when dropped.
struct AloneGuard<'a>(&'a Arc<GroupCommit>);

impl Drop for AloneGuard<'_> {
    fn drop(&mut self) {
        self.0.alone_done();
    }
}

/// Moves the head watch forward to `position` (never back).
pub(crate) fn advance(head: &watch::Sender<Position>, position: Position) {
    head.send_if_modified(|current| {
        let moved = position > *current;
        *current = (*current).max(position);
        moved
    });
}

/// How a group's statement failed.
enum Failure {
    /// The server refused it: nothing was written.
    Refused(tokio_postgres::Error),
    /// No answer, or none that can be trusted: the members get this error.
    Lost(AppendError),
}

/// Takes the next group off the queue: at least one append, then more while
/// under both caps.
fn take_group(waiting: &mut VecDeque<Member>) -> Vec<Member> {
    let mut group = Vec::new();
    let mut events = 0;
    while let Some(next) = waiting.front() {
        let count = next.append.request.events.len();
        let full = group.len() >= MAX_GROUP_APPENDS
            || events + count > MAX_GROUP_EVENTS.max(count).min(MAX_EVENTS_PER_TRANSACTION);
        if !group.is_empty() && full {
            break;
        }
        events += count;
        group.extend(waiting.pop_front());
    }
    group
}

/// A member's answer from its row; `None` when its stream was busy.
fn answer(
    row: &tokio_postgres::Row,
    request: &AppendRequest,
) -> Option<Result<Stored, AppendError>> {
    let outcome: &str = row.get("outcome");
    let detail: Option<&str> = row.get("detail");
    Some(match outcome {
        "busy" => return None,
        "written" => Ok(Stored::Written {
            first_position: row.get("first_position"),
            first_version: row.get("first_version"),
            recorded_at: row.get("recorded_at"),
        }),
        "repeat" => Ok(Stored::Repeat {
            first_position: row.get("first_position"),
            last_position: row.get("last_position"),
        }),
        "conflict" => Err(AppendError::Conflict {
            stream: request.stream.clone(),
            expected: request.expected,
            actual: detail.and_then(|actual| actual.parse().ok()).unwrap_or(0),
        }),
        "key_reused" => match detail.map(StreamId::new) {
            Some(Ok(first_stream)) => Err(AppendError::IdempotencyKeyReused {
                key: request.idempotency_key.clone().unwrap_or_default(),
                first_stream,
                stream: request.stream.clone(),
            }),
            _ => Err(AppendError::Backend(BackendError::msg(
                "an idempotency key is stored with an invalid stream id",
            ))),
        },
        other => Err(AppendError::Backend(BackendError::msg(format!(
            "diptych_append_group answered an unknown outcome `{other}`"
        )))),
    })
}

/// The refusal of an append too large for one transaction.
pub(crate) fn too_many_events(events: usize) -> AppendError {
    AppendError::Backend(BackendError::msg(format!(
        "an append to PostgreSQL holds at most {MAX_EVENTS_PER_TRANSACTION} events, and this one has {events}: split it into several appends"
    )))
}

/// A group's appends as the function's array parameters.
struct Columns<'a> {
    wait: bool,
    streams: Vec<&'a str>,
    expected: Vec<Option<i64>>,
    keys: Vec<Option<&'a str>>,
    counts: Vec<i32>,
    event_appends: Vec<i32>,
    event_offsets: Vec<i32>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    schema_versions: Vec<i32>,
    payloads: Vec<&'a JsonText>,
    metadata: Vec<&'a JsonText>,
}

impl<'a> Columns<'a> {
    fn new(appends: &[&'a PreparedAppend], locks: Locks) -> Self {
        let events: usize = appends.iter().map(|a| a.request.events.len()).sum();
        let mut columns = Self {
            wait: locks == Locks::Wait,
            streams: Vec::with_capacity(appends.len()),
            expected: Vec::with_capacity(appends.len()),
            keys: Vec::with_capacity(appends.len()),
            counts: Vec::with_capacity(appends.len()),
            event_appends: Vec::with_capacity(events),
            event_offsets: Vec::with_capacity(events),
            ids: Vec::with_capacity(events),
            types: Vec::with_capacity(events),
            schema_versions: Vec::with_capacity(events),
            payloads: Vec::with_capacity(events),
            metadata: Vec::with_capacity(events),
        };
        for (index, append) in appends.iter().enumerate() {
            let request = &append.request;
            columns.streams.push(request.stream.as_str());
            columns.expected.push(match request.expected {
                ExpectedVersion::Any => None,
                ExpectedVersion::NoStream => Some(0),
                ExpectedVersion::Exact(version) => Some(i64::try_from(version).unwrap_or(i64::MAX)),
            });
            columns.keys.push(request.idempotency_key.as_deref());
            columns.counts.push(request.events.len() as i32);
            for (offset, event) in request.events.iter().enumerate() {
                // 1-based, as SQL arrays are.
                columns.event_appends.push(index as i32 + 1);
                columns.event_offsets.push(offset as i32);
                columns.ids.push(event.event_id);
                columns.types.push(&event.event_type);
                // Stored bit for bit: PostgreSQL has no unsigned integers.
                columns.schema_versions.push(event.schema_version as i32);
            }
            columns.payloads.extend(&append.payloads);
            columns.metadata.extend(&append.metadata);
        }
        columns
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.wait,
            &self.streams,
            &self.expected,
            &self.keys,
            &self.counts,
            &self.event_appends,
            &self.event_offsets,
            &self.ids,
            &self.types,
            &self.schema_versions,
            &self.payloads,
            &self.metadata,
        ]
    }
}
