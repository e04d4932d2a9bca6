//! The event store contract every backend implements.
//!
//! # Contract
//!
//! A backend is correct when the conformance suite (`testkit`, run with
//! `diptych_core::event_store_conformance!`) passes. In words:
//!
//! 1. **Atomic appends.** [`EventStore::append`] writes all of its events or none.
//!    Versions in a stream are 1, 2, 3… with no gap and no duplicate, however many
//!    appends race.
//! 2. **Optimistic concurrency and idempotency.** An append whose
//!    [`ExpectedVersion`] does not hold fails with [`AppendError::Conflict`] and
//!    writes nothing. An append whose idempotency key was already used for the same
//!    stream writes nothing and returns the first append's outcome with
//!    [`AppendOutcome::deduplicated`] set.
//! 3. **One global order, no skipped events.** Every event gets a [`Position`].
//!    [`EventStore::read_all`] returns only events below which nothing can commit
//!    later: once a reader has seen position `p`, no event with a position lower than
//!    `p` ever appears. (A backend whose positions can commit out of order must hold
//!    back what is not yet safe to read.)
//! 4. **Durability.** Once `append` returns `Ok`, the events survive a crash of the
//!    process and of the machine.
//!
//! When an append breaks several rules, the one reported is the first of: its shape
//! ([`check_append_shape`]), a repeated idempotency key (a repeat for the same
//! stream wins over every later check), the expected version, then event id
//! uniqueness (the first offending id in request order). [`MemoryStore`] is the
//! reference for this order, and the property tests hold every backend to it.
//!
//! [`MemoryStore`]: crate::MemoryStore
//!
//! Reads of a stream that has no events fail with [`ReadError::StreamNotFound`].
//! [`EventStore::head_watch`] wakes waiters whenever the readable head moves, so
//! subscribers never poll.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::envelope::{NewEvent, Position, RecordedEvent, StreamId, Timestamp};
use crate::error::{AppendError, InvalidEvent, ReadError, SnapshotError};

/// What the caller believes about a stream's version before appending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// No check: append at the end, whatever the version.
    Any,
    /// The stream must not exist yet.
    NoStream,
    /// The stream must be exactly at this version (0 means it must not exist).
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    pub fn admits(self, actual: u64) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == 0,
            ExpectedVersion::Exact(expected) => expected == actual,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::Exact(version) => write!(f, "version {version}"),
        }
    }
}

/// One append: events for one stream, checked and written as a unit.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    /// The stream to append to.
    pub stream: StreamId,
    /// The version check.
    pub expected: ExpectedVersion,
    /// The events, in order. At least one.
    pub events: Vec<NewEvent>,
    /// When set, a second append with the same key returns the first outcome and
    /// writes nothing. Commands use their command id.
    pub idempotency_key: Option<String>,
}

impl AppendRequest {
    /// An append with no idempotency key.
    pub fn new(stream: StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> Self {
        Self {
            stream,
            expected,
            events,
            idempotency_key: None,
        }
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// What an append wrote (or, when deduplicated, what the first append wrote).
#[derive(Clone, Debug, PartialEq)]
pub struct AppendOutcome {
    /// The stored events, in order.
    pub events: Vec<RecordedEvent>,
    /// True when this append was a repeat of an earlier one with the same
    /// idempotency key and wrote nothing.
    pub deduplicated: bool,
}

impl AppendOutcome {
    /// The stream's version after the append.
    pub fn last_version(&self) -> u64 {
        self.events.last().map_or(0, |event| event.stream_version)
    }

    /// The position of the last event written: a consistency token for readers.
    pub fn last_position(&self) -> Position {
        self.events
            .last()
            .map_or(Position::START, |event| event.position)
    }
}

/// Which way to read a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

/// A page of one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamRead {
    /// The stream.
    pub stream: StreamId,
    /// The first version to return. Forwards, versions `>= from`; backwards,
    /// versions `<= from` (use `u64::MAX` for "from the end").
    pub from: u64,
    /// Which way.
    pub direction: Direction,
    /// At most this many events.
    pub limit: usize,
}

impl StreamRead {
    /// Oldest first, starting at version `from` (1 for the whole stream).
    pub fn forward(stream: StreamId, from: u64, limit: usize) -> Self {
        Self {
            stream,
            from,
            direction: Direction::Forward,
            limit,
        }
    }

    /// Newest first, starting at version `from` (`u64::MAX` for the end).
    pub fn backward(stream: StreamId, from: u64, limit: usize) -> Self {
        Self {
            stream,
            from,
            direction: Direction::Backward,
            limit,
        }
    }
}

/// An aggregate's state saved at a version, so loading need not replay everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The stream version the state includes.
    pub version: u64,
    /// The schema version of the state; a snapshot of another version is ignored.
    pub state_version: u32,
    /// The state as JSON.
    pub state: serde_json::Value,
    /// When it was taken.
    pub taken_at: Timestamp,
}

/// The event store: an append-only log of streams with one global order.
///
/// Object safe, so applications can hold an `Arc<dyn EventStore>` chosen at run
/// time; every future is `Send`. See the module documentation for the contract.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends events to one stream, atomically, checking the expected version and
    /// the idempotency key. Returns once the events are durable.
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError>;

    /// The outcome of an earlier append made with this idempotency key, if any.
    async fn find_idempotent_append(&self, key: &str) -> Result<Option<AppendOutcome>, ReadError>;

    /// A page of one stream. Fails with [`ReadError::StreamNotFound`] when the
    /// stream has no events at all.
    async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The current version of a stream (0 when it does not exist).
    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError>;

    /// Up to `limit` events of the global log with positions greater than `after`,
    /// in position order, holding back any not yet safe to read (see invariant 3).
    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError>;

    /// The position of the last readable event (0 for an empty store).
    async fn head(&self) -> Result<Position, ReadError>;

    /// A receiver that changes whenever the readable head moves, for waking
    /// subscribers without polling.
    fn head_watch(&self) -> watch::Receiver<Position>;

    /// How many events lie after `after` up to and including `upto`: a
    /// projection's lag. Positions may be sparse (PostgreSQL's are), so a backend
    /// whose positions are not dense counts; the default subtracts.
    async fn events_after(&self, after: Position, upto: Position) -> Result<u64, ReadError> {
        Ok(upto.0.saturating_sub(after.0))
    }

    /// The latest snapshot of a stream, if one was saved.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError>;

    /// Saves a snapshot, replacing the stream's snapshot unless that one is at a
    /// higher version (racing commands must not roll a snapshot back).
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError>;
}

/// Checks what every backend must refuse before touching storage: an append with no
/// events, or an event without a type name.
pub fn check_append_shape(request: &AppendRequest) -> Result<(), AppendError> {
    if request.events.is_empty() {
        return Err(AppendError::NoEvents {
            stream: request.stream.clone(),
        });
    }
    if request
        .events
        .iter()
        .any(|event| event.event_type.is_empty())
    {
        return Err(InvalidEvent::EmptyEventType.into());
    }
    Ok(())
}
