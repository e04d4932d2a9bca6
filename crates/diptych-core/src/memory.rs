//! The in-memory event store: for tests, for prototypes, and as the reference model
//! the property tests compare every other backend against. It is deliberately the
//! simplest code that keeps the contract: one lock around plain collections.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::envelope::{Position, RecordedEvent, StreamId, Timestamp};
use crate::error::{AppendError, ReadError, SnapshotError};
use crate::store::{
    AppendOutcome, AppendRequest, Direction, EventStore, Snapshot, StreamRead, check_append_shape,
};

/// An event store held in memory. Nothing survives the process.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    head: watch::Sender<Position>,
}

#[derive(Default)]
struct Inner {
    /// The log; the event at index `i` has position `i + 1`.
    log: Vec<RecordedEvent>,
    /// Per stream, the log indexes of its events in version order.
    streams: HashMap<StreamId, Vec<usize>>,
    /// Idempotency key to the log index range of the first append.
    appends_by_key: HashMap<String, (usize, usize)>,
    event_ids: HashSet<Uuid>,
    snapshots: HashMap<StreamId, Snapshot>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            head: watch::Sender::new(Position::START),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a half-done append behind
        // (appends mutate only after every check), so a poisoned lock is still sound.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Inner {
    fn outcome(&self, range: (usize, usize), deduplicated: bool) -> AppendOutcome {
        AppendOutcome {
            events: self.log[range.0..range.1].to_vec(),
            deduplicated,
        }
    }

    fn version_of(&self, stream: &StreamId) -> u64 {
        self.streams
            .get(stream)
            .map_or(0, |indexes| indexes.len() as u64)
    }
}

#[async_trait]
impl EventStore for MemoryStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
        check_append_shape(&request)?;
        let mut inner = self.lock();
        if let Some(key) = &request.idempotency_key {
            if let Some(&range) = inner.appends_by_key.get(key) {
                let first_stream = &inner.log[range.0].stream_id;
                if *first_stream != request.stream {
                    return Err(AppendError::IdempotencyKeyReused {
                        key: key.clone(),
                        first_stream: first_stream.clone(),
                        stream: request.stream,
                    });
                }
                return Ok(inner.outcome(range, true));
            }
        }
        let actual = inner.version_of(&request.stream);
        if !request.expected.admits(actual) {
            return Err(AppendError::Conflict {
                stream: request.stream,
                expected: request.expected,
                actual,
            });
        }
        let mut batch_ids = HashSet::new();
        for event in &request.events {
            if inner.event_ids.contains(&event.event_id) || !batch_ids.insert(event.event_id) {
                return Err(AppendError::DuplicateEventId {
                    event_id: event.event_id,
                });
            }
        }
        let start = inner.log.len();
        // Never before the previous event, whatever the wall clock does.
        let recorded_at = inner.log.last().map_or(Timestamp::now(), |last| {
            last.recorded_at.max(Timestamp::now())
        });
        for (offset, event) in request.events.into_iter().enumerate() {
            let index = inner.log.len();
            inner.event_ids.insert(event.event_id);
            inner.log.push(RecordedEvent {
                event_id: event.event_id,
                stream_id: request.stream.clone(),
                stream_version: actual + offset as u64 + 1,
                position: Position(index as u64 + 1),
                recorded_at,
                event_type: event.event_type,
                schema_version: event.schema_version,
                payload: event.payload,
                metadata: event.metadata,
            });
            inner
                .streams
                .entry(request.stream.clone())
                .or_default()
                .push(index);
        }
        let range = (start, inner.log.len());
        if let Some(key) = request.idempotency_key {
            inner.appends_by_key.insert(key, range);
        }
        let outcome = inner.outcome(range, false);
        self.head.send_replace(outcome.last_position());
        Ok(outcome)
    }

    async fn find_idempotent_append(&self, key: &str) -> Result<Option<AppendOutcome>, ReadError> {
        let inner = self.lock();
        Ok(inner
            .appends_by_key
            .get(key)
            .map(|&range| inner.outcome(range, true)))
    }

    async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError> {
        let inner = self.lock();
        let Some(indexes) = inner.streams.get(&read.stream) else {
            return Err(ReadError::StreamNotFound {
                stream: read.stream,
            });
        };
        let events = indexes.iter().map(|&index| &inner.log[index]);
        let page = match read.direction {
            Direction::Forward => events
                .filter(|event| event.stream_version >= read.from)
                .take(read.limit)
                .cloned()
                .collect(),
            Direction::Backward => events
                .rev()
                .filter(|event| event.stream_version <= read.from)
                .take(read.limit)
                .cloned()
                .collect(),
        };
        Ok(page)
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
        Ok(self.lock().version_of(stream))
    }

    async fn read_all(
        &self,
        after: Position,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, ReadError> {
        let inner = self.lock();
        let start = usize::try_from(after.0)
            .unwrap_or(usize::MAX)
            .min(inner.log.len());
        Ok(inner.log[start..].iter().take(limit).cloned().collect())
    }

    async fn head(&self) -> Result<Position, ReadError> {
        Ok(Position(self.lock().log.len() as u64))
    }

    fn head_watch(&self) -> watch::Receiver<Position> {
        self.head.subscribe()
    }

    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, SnapshotError> {
        Ok(self.lock().snapshots.get(stream).cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
        let mut inner = self.lock();
        let newer_kept = inner
            .snapshots
            .get(&snapshot.stream)
            .is_some_and(|kept| kept.version > snapshot.version);
        if !newer_kept {
            inner.snapshots.insert(snapshot.stream.clone(), snapshot);
        }
        Ok(())
    }
}
