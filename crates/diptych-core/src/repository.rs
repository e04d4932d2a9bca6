//! The command path: load an aggregate, decide, append with the expected version,
//! and retry on conflict.

use std::collections::BTreeMap;
use std::sync::Arc;

use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::codec::EventCodec;
use crate::envelope::{Metadata, Position, RecordedEvent, StreamId, Timestamp};
use crate::error::{AppendError, CommandError, LoadError, ReadError};
use crate::store::{
    AppendOutcome, AppendRequest, EventStore, ExpectedVersion, Snapshot, StreamRead,
};

/// How many events a load reads per round trip.
const LOAD_PAGE: usize = 512;

/// Settings of a [`Repository`].
#[derive(Clone, Debug)]
pub struct RepositoryConfig {
    /// How many times a command is decided and appended before giving up when the
    /// stream keeps changing underneath it. At least 1.
    pub max_attempts: u32,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        Self { max_attempts: 5 }
    }
}

/// Who sent a command and what it expects, carried into the events' metadata.
#[derive(Clone, Debug)]
pub struct CommandContext {
    /// The command's id, also its idempotency key: sending the same id twice
    /// returns the first result and writes nothing new.
    pub command_id: Uuid,
    /// The id of the whole conversation; the command id when not given.
    pub correlation_id: Option<Uuid>,
    /// What caused the command (an event, for process managers); the command id
    /// when not given.
    pub causation_id: Option<Uuid>,
    /// When set, the command only applies to the aggregate at exactly this version
    /// and is not retried on conflict (HTTP's `If-Match`).
    pub expected_version: Option<u64>,
    /// Free key/values stored with every event.
    pub extra: BTreeMap<String, String>,
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new(Uuid::now_v7())
    }
}

impl CommandContext {
    /// A context for the command with this id.
    pub fn new(command_id: Uuid) -> Self {
        Self {
            command_id,
            correlation_id: None,
            causation_id: None,
            expected_version: None,
            extra: BTreeMap::new(),
        }
    }

    /// Requires the aggregate to be at this version.
    pub fn expecting_version(mut self, version: u64) -> Self {
        self.expected_version = Some(version);
        self
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            command_id: Some(self.command_id),
            correlation_id: Some(self.correlation_id.unwrap_or(self.command_id)),
            causation_id: Some(self.causation_id.unwrap_or(self.command_id)),
            extra: self.extra.clone(),
        }
    }
}

/// An aggregate's state as loaded, and the version it reflects.
#[derive(Clone, Debug)]
pub struct Loaded<A> {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The state.
    pub state: A,
    /// The last event applied (0 when the stream does not exist).
    pub version: u64,
    /// The time of the last event applied, when there was one.
    pub last_recorded_at: Option<Timestamp>,
}

/// What a command did.
#[derive(Clone, Debug, PartialEq)]
pub struct CommandOutcome {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The events written, or the ones the first run wrote when deduplicated.
    pub events: Vec<RecordedEvent>,
    /// The stream's version after the command.
    pub version: u64,
    /// The global position of the last event written (a consistency token), or 0
    /// when the command decided no events.
    pub position: Position,
    /// True when this command id had already been handled.
    pub deduplicated: bool,
}

/// Loads and runs commands against aggregates of one type.
pub struct Repository<A: Aggregate> {
    store: Arc<dyn EventStore>,
    codec: EventCodec<A::Event>,
    config: RepositoryConfig,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            codec: self.codec.clone(),
            config: self.config.clone(),
        }
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository on this store with default settings.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self::with_config(store, RepositoryConfig::default())
    }

    /// A repository with explicit settings.
    pub fn with_config(store: Arc<dyn EventStore>, config: RepositoryConfig) -> Self {
        Self {
            store,
            codec: EventCodec::new(A::upcasters()),
            config,
        }
    }

    /// The codec used for this aggregate's events.
    pub fn codec(&self) -> &EventCodec<A::Event> {
        &self.codec
    }

    /// The stream of the aggregate with this id.
    pub fn stream_of(&self, id: &str) -> Result<StreamId, LoadError> {
        Ok(StreamId::for_aggregate(A::KIND, id)?)
    }

    /// The current state: the latest usable snapshot plus the events after it.
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, LoadError> {
        self.load_until(id, u64::MAX, None).await
    }

    /// The state as it was right after version `version` (or the current state when
    /// the stream is shorter).
    pub async fn load_at_version(&self, id: &str, version: u64) -> Result<Loaded<A>, LoadError> {
        self.load_until(id, version, None).await
    }

    /// The state as it was at time `at`: every event recorded at or before it.
    pub async fn load_at_time(&self, id: &str, at: Timestamp) -> Result<Loaded<A>, LoadError> {
        self.load_until(id, u64::MAX, Some(at)).await
    }

    /// Runs a command: load, decide, append at the loaded version; on a conflict,
    /// load and decide again, up to [`RepositoryConfig::max_attempts`] times.
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        let stream = self.stream_of(id)?;
        let key = context.command_id.to_string();
        // A repeated command must return its first result even if deciding it again
        // would now fail (the stock it reserved is gone, say), so look first.
        if let Some(repeat) = self.repeat_of(&stream, &key).await? {
            return Ok(repeat);
        }
        let attempts = self.config.max_attempts.max(1);
        let mut last_conflict = None;
        for _ in 0..attempts {
            let loaded = self.load(id).await?;
            // A first run of this same command may have committed since the check
            // above (a client retrying after a timeout): its result, not an answer
            // computed from the state it changed, is the answer.
            if let Some(expected) = context.expected_version {
                if expected != loaded.version {
                    if let Some(repeat) = self.repeat_of(&stream, &key).await? {
                        return Ok(repeat);
                    }
                    return Err(CommandError::Append(AppendError::Conflict {
                        stream,
                        expected: ExpectedVersion::Exact(expected),
                        actual: loaded.version,
                    }));
                }
            }
            let decided = match loaded.state.decide(command) {
                Ok(decided) => decided,
                Err(rejection) => {
                    if let Some(repeat) = self.repeat_of(&stream, &key).await? {
                        return Ok(repeat);
                    }
                    return Err(CommandError::Rejected(rejection));
                }
            };
            if decided.is_empty() {
                if let Some(repeat) = self.repeat_of(&stream, &key).await? {
                    return Ok(repeat);
                }
                return Ok(CommandOutcome {
                    stream,
                    events: Vec::new(),
                    version: loaded.version,
                    position: Position::START,
                    deduplicated: false,
                });
            }
            let metadata = context.metadata();
            let events = decided
                .iter()
                .map(|event| Ok(self.codec.encode(event)?.with_metadata(metadata.clone())))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CommandError::Encode)?;
            let request = AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(loaded.version),
                events,
            )
            .with_idempotency_key(key.clone());
            match self.store.append(request).await {
                Ok(outcome) => {
                    if !outcome.deduplicated {
                        self.snapshot_if_due(loaded, &decided).await;
                    }
                    return Ok(CommandOutcome {
                        stream,
                        version: outcome.last_version(),
                        position: outcome.last_position(),
                        deduplicated: outcome.deduplicated,
                        events: outcome.events,
                    });
                }
                Err(conflict @ AppendError::Conflict { .. })
                    if context.expected_version.is_none() =>
                {
                    last_conflict = Some(conflict);
                }
                Err(other) => return Err(CommandError::Append(other)),
            }
        }
        Err(CommandError::TooManyConflicts {
            attempts,
            last: last_conflict.unwrap_or(AppendError::Conflict {
                stream,
                expected: ExpectedVersion::Any,
                actual: 0,
            }),
        })
    }

    /// The outcome of an earlier run of the command with this key, if there was one.
    async fn repeat_of(
        &self,
        stream: &StreamId,
        key: &str,
    ) -> Result<Option<CommandOutcome>, CommandError<A::Error>> {
        let first = self
            .store
            .find_idempotent_append(key)
            .await
            .map_err(LoadError::from)?;
        first
            .map(|first| outcome_of_repeat(stream.clone(), key.to_owned(), first))
            .transpose()
    }

    async fn load_until(
        &self,
        id: &str,
        max_version: u64,
        at: Option<Timestamp>,
    ) -> Result<Loaded<A>, LoadError> {
        let stream = self.stream_of(id)?;
        let mut loaded = Loaded {
            stream: stream.clone(),
            state: A::default(),
            version: 0,
            last_recorded_at: None,
        };
        // A snapshot is only a shortcut; it is skipped for loads by time because its
        // events' times are not known without reading them anyway.
        if at.is_none() {
            if let Some(snapshot) = self.store.load_snapshot(&stream).await? {
                if let Some(state) = usable_state::<A>(&snapshot, max_version) {
                    loaded.state = state;
                    loaded.version = snapshot.version;
                }
            }
        }
        while loaded.version < max_version {
            let read = StreamRead::forward(stream.clone(), loaded.version + 1, LOAD_PAGE);
            let page = match self.store.read_stream(read).await {
                Ok(page) => page,
                Err(ReadError::StreamNotFound { .. }) => break,
                Err(error) => return Err(error.into()),
            };
            let full_page = page.len() == LOAD_PAGE;
            for recorded in page {
                if recorded.stream_version > max_version
                    || at.is_some_and(|at| recorded.recorded_at > at)
                {
                    return Ok(loaded);
                }
                let event = self.codec.decode(&recorded)?;
                loaded.state.evolve(&event);
                loaded.version = recorded.stream_version;
                loaded.last_recorded_at = Some(recorded.recorded_at);
            }
            if !full_page {
                break;
            }
        }
        Ok(loaded)
    }

    /// Saves a snapshot when the policy says so. A failure here costs only speed
    /// (the next load replays more events), so it never fails the command.
    async fn snapshot_if_due(&self, loaded: Loaded<A>, decided: &[A::Event]) {
        let before = loaded.version;
        let after = before + decided.len() as u64;
        if !A::snapshot_policy().is_due(before, after) {
            return;
        }
        let mut state = loaded.state;
        for event in decided {
            state.evolve(event);
        }
        let Ok(state) = serde_json::to_value(&state) else {
            return;
        };
        let snapshot = Snapshot {
            stream: loaded.stream,
            version: after,
            state_version: A::STATE_VERSION,
            state,
            taken_at: Timestamp::now(),
        };
        let _ = self.store.save_snapshot(snapshot).await;
    }
}

fn usable_state<A: Aggregate>(snapshot: &Snapshot, max_version: u64) -> Option<A> {
    if snapshot.state_version != A::STATE_VERSION || snapshot.version > max_version {
        return None;
    }
    serde_json::from_value(snapshot.state.clone()).ok()
}

fn outcome_of_repeat<E>(
    stream: StreamId,
    key: String,
    first: AppendOutcome,
) -> Result<CommandOutcome, CommandError<E>> {
    let first_stream = first.events.first().map(|event| event.stream_id.clone());
    if let Some(first_stream) = first_stream.filter(|first_stream| *first_stream != stream) {
        return Err(CommandError::Append(AppendError::IdempotencyKeyReused {
            key,
            first_stream,
            stream,
        }));
    }
    Ok(CommandOutcome {
        stream,
        version: first.last_version(),
        position: first.last_position(),
        deduplicated: true,
        events: first.events,
    })
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use serde::{Deserialize, Serialize};
    use tokio::sync::watch;

    use super::*;
    use crate::error::{Error, InvalidStreamId, SnapshotError};
    use crate::memory::MemoryStore;
    use crate::store::StreamRead;

    #[derive(Default, Serialize, Deserialize)]
    struct Counter {
        value: u64,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum CounterEvent {
        Added { by: u64 },
    }

    #[derive(Debug, PartialEq, thiserror::Error)]
    #[error("nothing to add")]
    struct NothingToAdd;

    impl Aggregate for Counter {
        const KIND: &'static str = "counter";
        type Command = u64;
        type Event = CounterEvent;
        type Error = NothingToAdd;
        fn decide(&self, by: &u64) -> Result<Vec<CounterEvent>, NothingToAdd> {
            if *by == 0 {
                return Err(NothingToAdd);
            }
            Ok(vec![CounterEvent::Added { by: *by }])
        }
        fn evolve(&mut self, CounterEvent::Added { by }: &CounterEvent) {
            self.value += by;
        }
    }

    /// What a [`Interfering`] store does to its caller.
    enum Interference {
        /// Some other writer always got there first: every append conflicts.
        EveryAppendConflicts,
        /// The first idempotency lookup misses, as if the command's first run
        /// committed just after it.
        FirstLookupMisses,
    }

    /// A memory store that interferes with the repository in one scripted way.
    struct Interfering {
        store: MemoryStore,
        interference: Interference,
        lookups: std::sync::atomic::AtomicUsize,
    }

    impl Interfering {
        fn new(interference: Interference) -> Arc<Self> {
            Arc::new(Self {
                store: MemoryStore::new(),
                interference,
                lookups: std::sync::atomic::AtomicUsize::new(0),
            })
        }
    }

    #[async_trait]
    impl EventStore for Interfering {
        async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
            match self.interference {
                Interference::EveryAppendConflicts => Err(AppendError::Conflict {
                    stream: request.stream,
                    expected: request.expected,
                    actual: 99,
                }),
                Interference::FirstLookupMisses => self.store.append(request).await,
            }
        }
        async fn find_idempotent_append(
            &self,
            key: &str,
        ) -> Result<Option<AppendOutcome>, ReadError> {
            let lookup = self
                .lookups
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if matches!(self.interference, Interference::FirstLookupMisses) && lookup == 1 {
                return Ok(None);
            }
            self.store.find_idempotent_append(key).await
        }
        async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError> {
            self.store.read_stream(read).await
        }
        async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
            self.store.stream_version(stream).await
        }
        async fn read_all(
            &self,
            after: Position,
            limit: usize,
        ) -> Result<Vec<RecordedEvent>, ReadError> {
            self.store.read_all(after, limit).await
        }
        async fn head(&self) -> Result<Position, ReadError> {
            self.store.head().await
        }
        fn head_watch(&self) -> watch::Receiver<Position> {
            self.store.head_watch()
        }
        async fn load_snapshot(
            &self,
            stream: &StreamId,
        ) -> Result<Option<Snapshot>, SnapshotError> {
            self.store.load_snapshot(stream).await
        }
        async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
            self.store.save_snapshot(snapshot).await
        }
    }

    #[tokio::test]
    async fn a_repeat_that_races_its_first_run_returns_the_first_result() {
        // The first run's own lookup is call 0; the repeat's first lookup (call 1)
        // misses, so the repeat loads the state the first run already changed.
        let store = Interfering::new(Interference::FirstLookupMisses);
        let counters = Repository::<Counter>::new(store.clone());
        let context = CommandContext::default().expecting_version(0);
        let first = counters.execute("1", &5, &context).await.unwrap();

        let repeat = counters.execute("1", &5, &context).await.unwrap();

        assert!(repeat.deduplicated, "{repeat:?}");
        assert_eq!(repeat.events, first.events);
        assert_eq!(store.head().await.unwrap(), Position(1), "written once");
    }

    #[tokio::test]
    async fn a_stream_that_keeps_changing_gives_up_after_the_configured_attempts() {
        let store = Interfering::new(Interference::EveryAppendConflicts);
        let counters =
            Repository::<Counter>::with_config(store, RepositoryConfig { max_attempts: 3 });

        let error = counters
            .execute("1", &5, &CommandContext::default())
            .await
            .unwrap_err();

        match &error {
            CommandError::TooManyConflicts { attempts, last } => {
                assert_eq!(*attempts, 3);
                assert!(matches!(last, AppendError::Conflict { actual: 99, .. }));
            }
            other => panic!("expected TooManyConflicts, got {other:?}"),
        }
        assert!(
            error.to_string().contains("gave up after 3 attempts"),
            "{error}"
        );
        assert!(matches!(
            Error::from(error),
            Error::Append(AppendError::Conflict { .. })
        ));
    }

    #[tokio::test]
    async fn an_aggregate_id_too_long_for_a_stream_id_is_refused_before_any_io() {
        let store = Arc::new(MemoryStore::new());
        let counters = Repository::<Counter>::new(store.clone());

        let error = counters
            .execute(&"9".repeat(300), &1, &CommandContext::default())
            .await
            .unwrap_err();

        assert!(
            matches!(
                error,
                CommandError::Load(LoadError::InvalidStreamId(InvalidStreamId::TooLong {
                    length: 308,
                    ..
                }))
            ),
            "{error:?}"
        );
        assert_eq!(
            store.head().await.unwrap(),
            Position::START,
            "nothing may be written"
        );
    }

    #[tokio::test]
    async fn a_rejection_converts_into_the_crate_error_keeping_its_message() {
        let counters = Repository::<Counter>::new(Arc::new(MemoryStore::new()));
        let error = counters
            .execute("1", &0, &CommandContext::default())
            .await
            .unwrap_err();
        assert!(matches!(error, CommandError::Rejected(NothingToAdd)));
        let error = Error::from(error);
        assert!(matches!(error, Error::Rejected(_)));
        assert_eq!(error.to_string(), "command rejected: nothing to add");
    }
}
