//! The command path: load an aggregate, decide, append with the expected version,
//! and retry on conflict.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use uuid::Uuid;

use crate::aggregate::{Aggregate, SnapshotPolicy};
use crate::cache::{AggregateCache, Cached};
use crate::codec::EventCodec;
use crate::envelope::{Metadata, Position, RecordedEvent, StreamId, Timestamp};
use crate::error::{AppendError, CommandError, LoadError, ReadError};
use crate::store::{
    AppendOutcome, AppendRequest, EventStore, ExpectedVersion, Snapshot, StreamRead,
};
use crate::turns::Turns;

/// How many events a load reads per round trip: large, so a long stream loads
/// in a few reads (the page is held in memory only while it is applied).
const LOAD_PAGE: usize = 4096;

/// How many aggregates' states a repository keeps between commands by default.
///
/// A state costs its own size in memory (plus about 100 bytes of bookkeeping), so
/// the default holds the working set of a busy service of small aggregates in a
/// few MiB; raise it for many warm aggregates, or set 0 to turn the cache off.
pub const DEFAULT_CACHE_CAPACITY: usize = 16_384;

/// Settings of a [`Repository`].
#[derive(Clone, Debug)]
pub struct RepositoryConfig {
    /// How many times a command is decided and appended before giving up when the
    /// stream keeps changing underneath it. At least 1.
    pub max_attempts: u32,
    /// How many aggregates' states are kept between commands, so a command on a
    /// warm aggregate reads nothing before it appends (0: no cache). A cached
    /// state is only ever used at the version the store confirms; see
    /// [`Repository::execute`].
    pub cache_capacity: usize,
}

impl Default for RepositoryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }
}

impl RepositoryConfig {
    /// Sets how many times a command is tried against a changing stream.
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets how many aggregates' states are cached (0 turns the cache off).
    pub fn with_cache_capacity(mut self, cache_capacity: usize) -> Self {
        self.cache_capacity = cache_capacity;
        self
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

/// Counts of what a repository's commands met, since it was made (shared by its
/// clones): for metrics, and for telling a hot aggregate from a cold cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RepositoryStats {
    /// Commands decided again because another writer appended first.
    pub conflicts_retried: u64,
    /// Commands that started from a cached state.
    pub cache_hits: u64,
    /// Commands that loaded their aggregate from the store.
    pub cache_misses: u64,
    /// Cached states found behind the store (another process or repository
    /// wrote since), caught up by reading only the events after them.
    pub stale_cache_entries: u64,
}

#[derive(Default)]
struct Counters {
    conflicts_retried: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    stale_cache_entries: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Loads and runs commands against aggregates of one type.
///
/// Clones share the store, the aggregate cache and the counters.
pub struct Repository<A: Aggregate> {
    store: Arc<dyn EventStore>,
    codec: EventCodec<A::Event>,
    config: RepositoryConfig,
    cache: Option<Arc<AggregateCache<A>>>,
    turns: Arc<Turns>,
    counters: Arc<Counters>,
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            codec: self.codec.clone(),
            config: self.config.clone(),
            cache: self.cache.clone(),
            turns: Arc::clone(&self.turns),
            counters: Arc::clone(&self.counters),
        }
    }
}

/// A state a command decides from, and whether the store vouched for it since
/// the command began (a cached state is vouched for only by an append that
/// succeeds or by reading the stream's tail).
struct Working<A> {
    loaded: Loaded<A>,
    confirmed: bool,
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
            cache: AggregateCache::new(config.cache_capacity).map(Arc::new),
            config,
            turns: Arc::default(),
            counters: Arc::default(),
        }
    }

    /// The codec used for this aggregate's events.
    pub fn codec(&self) -> &EventCodec<A::Event> {
        &self.codec
    }

    /// What this repository's commands met so far.
    pub fn stats(&self) -> RepositoryStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        RepositoryStats {
            conflicts_retried: read(&self.counters.conflicts_retried),
            cache_hits: read(&self.counters.cache_hits),
            cache_misses: read(&self.counters.cache_misses),
            stale_cache_entries: read(&self.counters.stale_cache_entries),
        }
    }

    /// The stream of the aggregate with this id.
    pub fn stream_of(&self, id: &str) -> Result<StreamId, LoadError> {
        Ok(StreamId::for_aggregate(A::KIND, id)?)
    }

    /// The current state: the latest usable snapshot plus the events after it.
    /// Always read from the store (the cache only serves commands).
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, LoadError> {
        self.load_until(self.stream_of(id)?, u64::MAX, None).await
    }

    /// The state as it was right after version `version` (or the current state when
    /// the stream is shorter).
    pub async fn load_at_version(&self, id: &str, version: u64) -> Result<Loaded<A>, LoadError> {
        self.load_until(self.stream_of(id)?, version, None).await
    }

    /// The state as it was at time `at`: every event recorded at or before it.
    pub async fn load_at_time(&self, id: &str, at: Timestamp) -> Result<Loaded<A>, LoadError> {
        self.load_until(self.stream_of(id)?, u64::MAX, Some(at))
            .await
    }

    /// Runs a typed command on the aggregate it addresses: its id from
    /// [`Command::aggregate_id`](crate::Command::aggregate_id) (a blank one is
    /// refused with [`CommandError::MissingId`]), then [`Repository::execute`].
    pub async fn execute_command<C>(
        &self,
        command: C,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<A::Error>>
    where
        C: crate::AggregateCommand<Aggregate = A>,
    {
        let id = crate::require_id(&command)?.to_owned();
        self.execute(&id, &command.into_command(), context).await
    }

    /// Runs a command: decide from the aggregate's state, append at its version;
    /// on a conflict, read what was appended since, decide again, up to
    /// [`RepositoryConfig::max_attempts`] times.
    ///
    /// The state comes from the cache when it holds this aggregate, and from the
    /// store otherwise. A cached state is used only at the version the store
    /// confirms: the append expects exactly that version, so it either succeeds
    /// or conflicts; a rejection or an empty decision made from a cached state is
    /// checked against the stream's tail before it is returned, and made again
    /// if the stream had moved on.
    ///
    /// The command id is the idempotency key: a repeat returns the first run's
    /// outcome (the store recognises the key inside the append), also when
    /// deciding it again would now be rejected or decide nothing.
    ///
    /// Commands of this repository (and its clones) on one aggregate take turns,
    /// so they do not race each other into conflicts; commands on different
    /// aggregates run concurrently, and other processes are kept right by the
    /// store's version check alone.
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
        context: &CommandContext,
    ) -> Result<CommandOutcome, CommandError<A::Error>> {
        let stream = self.stream_of(id)?;
        let key = context.command_id.to_string();
        let attempts = self.config.max_attempts.max(1);
        let _turn = self.turns.wait(&stream).await;
        let mut conflicts = 0;
        let mut working = self.check_out(&stream).await?;
        loop {
            if let Some(expected) = context.expected_version {
                if expected != working.loaded.version {
                    if self.confirm(&mut working).await? {
                        continue;
                    }
                    if let Some(repeat) = self.repeat_of(&stream, &key).await? {
                        return Ok(repeat);
                    }
                    let actual = working.loaded.version;
                    self.check_in(working.loaded);
                    return Err(CommandError::Append(AppendError::Conflict {
                        stream,
                        expected: ExpectedVersion::Exact(expected),
                        actual,
                    }));
                }
            }
            let decided = match working.loaded.state.decide(command) {
                Ok(decided) => decided,
                Err(rejection) => {
                    if self.confirm(&mut working).await? {
                        continue;
                    }
                    // A first run of this same command may have committed before
                    // (a client retrying after a timeout): its result, not an
                    // answer computed from the state it changed, is the answer.
                    if let Some(repeat) = self.repeat_of(&stream, &key).await? {
                        return Ok(repeat);
                    }
                    self.check_in(working.loaded);
                    return Err(CommandError::Rejected(rejection));
                }
            };
            if decided.is_empty() {
                if self.confirm(&mut working).await? {
                    continue;
                }
                if let Some(repeat) = self.repeat_of(&stream, &key).await? {
                    return Ok(repeat);
                }
                let version = working.loaded.version;
                self.check_in(working.loaded);
                return Ok(CommandOutcome {
                    stream,
                    events: Vec::new(),
                    version,
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
                ExpectedVersion::Exact(working.loaded.version),
                events,
            )
            .with_idempotency_key(key.clone());
            match self.store.append(request).await {
                Ok(outcome) if outcome.deduplicated => {
                    // The first run's events are what the stream holds; the state
                    // decided from here is not, so it is not kept.
                    return Ok(CommandOutcome {
                        stream,
                        version: outcome.last_version(),
                        position: outcome.last_position(),
                        deduplicated: true,
                        events: outcome.events,
                    });
                }
                Ok(outcome) => {
                    let mut loaded = working.loaded;
                    let before = loaded.version;
                    for event in &decided {
                        loaded.state.evolve(event);
                    }
                    loaded.version = outcome.last_version();
                    loaded.last_recorded_at = outcome.events.last().map(|e| e.recorded_at);
                    self.snapshot_if_due(before, &loaded).await;
                    self.check_in(loaded);
                    return Ok(CommandOutcome {
                        stream,
                        version: outcome.last_version(),
                        position: outcome.last_position(),
                        deduplicated: false,
                        events: outcome.events,
                    });
                }
                Err(conflict @ AppendError::Conflict { .. })
                    if context.expected_version.is_none() =>
                {
                    conflicts += 1;
                    if conflicts >= attempts {
                        return Err(CommandError::TooManyConflicts {
                            attempts,
                            last: conflict,
                        });
                    }
                    bump(&self.counters.conflicts_retried);
                    self.catch_up(&mut working.loaded).await?;
                }
                Err(other) => return Err(CommandError::Append(other)),
            }
        }
    }

    /// The state a command starts from: cached (unconfirmed) or loaded.
    async fn check_out(&self, stream: &StreamId) -> Result<Working<A>, LoadError> {
        if let Some(cache) = &self.cache {
            if let Some(cached) = cache.take(stream) {
                bump(&self.counters.cache_hits);
                return Ok(Working {
                    loaded: Loaded {
                        stream: stream.clone(),
                        state: cached.state,
                        version: cached.version,
                        last_recorded_at: cached.last_recorded_at,
                    },
                    confirmed: false,
                });
            }
            bump(&self.counters.cache_misses);
        }
        Ok(Working {
            loaded: self.load_until(stream.clone(), u64::MAX, None).await?,
            confirmed: true,
        })
    }

    /// Keeps a state the store vouched for, for the next command.
    fn check_in(&self, loaded: Loaded<A>) {
        if let Some(cache) = &self.cache {
            cache.put(
                loaded.stream,
                Cached {
                    state: loaded.state,
                    version: loaded.version,
                    last_recorded_at: loaded.last_recorded_at,
                },
            );
        }
    }

    /// Makes sure a decision that writes nothing was made from the stream's
    /// current state: reads the events after an unconfirmed state's version.
    /// Returns true when there were some (decide again).
    async fn confirm(&self, working: &mut Working<A>) -> Result<bool, LoadError> {
        if working.confirmed {
            return Ok(false);
        }
        working.confirmed = true;
        let moved = self.catch_up(&mut working.loaded).await?;
        if moved {
            bump(&self.counters.stale_cache_entries);
        }
        Ok(moved)
    }

    /// Applies the events stored after the state's version. Returns whether there
    /// were any.
    async fn catch_up(&self, loaded: &mut Loaded<A>) -> Result<bool, LoadError> {
        let before = loaded.version;
        self.replay(loaded, u64::MAX, None).await?;
        Ok(loaded.version != before)
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
        stream: StreamId,
        max_version: u64,
        at: Option<Timestamp>,
    ) -> Result<Loaded<A>, LoadError> {
        let mut loaded = Loaded {
            stream,
            state: A::default(),
            version: 0,
            last_recorded_at: None,
        };
        // A snapshot is only a shortcut; it is skipped for loads by time because its
        // events' times are not known without reading them anyway, and for
        // aggregates that never take one (a round trip saved per load; a snapshot
        // left from an earlier policy is merely not used).
        let snapshots = A::snapshot_policy() != SnapshotPolicy::Never;
        if at.is_none() && snapshots {
            if let Some(snapshot) = self.store.load_snapshot(&loaded.stream).await? {
                if let Some(state) = usable_state::<A>(&snapshot, max_version) {
                    loaded.state = state;
                    loaded.version = snapshot.version;
                }
            }
        }
        self.replay(&mut loaded, max_version, at).await?;
        Ok(loaded)
    }

    /// Applies the stream's events after `loaded.version`, up to `max_version`
    /// and (when given) recorded at or before `at`.
    async fn replay(
        &self,
        loaded: &mut Loaded<A>,
        max_version: u64,
        at: Option<Timestamp>,
    ) -> Result<(), LoadError> {
        while loaded.version < max_version {
            let read = StreamRead::forward(loaded.stream.clone(), loaded.version + 1, LOAD_PAGE);
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
                    return Ok(());
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
        Ok(())
    }

    /// Saves a snapshot when the policy says so. A failure here costs only speed
    /// (the next load replays more events), so it never fails the command.
    async fn snapshot_if_due(&self, before: u64, after: &Loaded<A>) {
        if !A::snapshot_policy().is_due(before, after.version) {
            return;
        }
        let Ok(state) = serde_json::to_value(&after.state) else {
            return;
        };
        let snapshot = Snapshot {
            stream: after.stream.clone(),
            version: after.version,
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

    /// A memory store that counts the reads made before appends, and can make
    /// every append conflict as if another writer always got there first.
    struct Interfering {
        store: MemoryStore,
        every_append_conflicts: bool,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl Interfering {
        fn new() -> Arc<Self> {
            Self::build(false)
        }

        fn conflicting() -> Arc<Self> {
            Self::build(true)
        }

        fn build(every_append_conflicts: bool) -> Arc<Self> {
            Arc::new(Self {
                store: MemoryStore::new(),
                every_append_conflicts,
                reads: std::sync::atomic::AtomicUsize::new(0),
            })
        }

        fn reads(&self) -> usize {
            self.reads.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn count_read(&self) {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl EventStore for Interfering {
        async fn append(&self, request: AppendRequest) -> Result<AppendOutcome, AppendError> {
            if self.every_append_conflicts {
                return Err(AppendError::Conflict {
                    stream: request.stream,
                    expected: request.expected,
                    actual: 99,
                });
            }
            self.store.append(request).await
        }
        async fn find_idempotent_append(
            &self,
            key: &str,
        ) -> Result<Option<AppendOutcome>, ReadError> {
            self.count_read();
            self.store.find_idempotent_append(key).await
        }
        async fn read_stream(&self, read: StreamRead) -> Result<Vec<RecordedEvent>, ReadError> {
            self.count_read();
            self.store.read_stream(read).await
        }
        async fn stream_version(&self, stream: &StreamId) -> Result<u64, ReadError> {
            self.count_read();
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
            self.count_read();
            self.store.load_snapshot(stream).await
        }
        async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), SnapshotError> {
            self.store.save_snapshot(snapshot).await
        }
    }

    #[tokio::test]
    async fn a_repeat_decided_before_its_first_run_committed_returns_the_first_result() {
        // `late` holds the counter at version 1 in its cache; the first run of
        // the command (through `early`) then commits version 2. The repeat
        // decides from version 1, and its append meets its own key.
        let store = Arc::new(MemoryStore::new());
        let early = Repository::<Counter>::new(store.clone());
        let late = Repository::<Counter>::new(store.clone());
        late.execute("1", &1, &CommandContext::default())
            .await
            .unwrap();
        let context = CommandContext::default().expecting_version(1);
        let first = early.execute("1", &5, &context).await.unwrap();

        let repeat = late.execute("1", &5, &context).await.unwrap();

        assert!(repeat.deduplicated, "{repeat:?}");
        assert_eq!(repeat.events, first.events);
        assert_eq!(store.head().await.unwrap(), Position(2), "written once");
        assert_eq!(late.load("1").await.unwrap().state.value, 6);
    }

    #[tokio::test]
    async fn a_warm_command_reads_nothing_before_it_appends() {
        let store = Interfering::new();
        let counters = Repository::<Counter>::new(store.clone());
        counters
            .execute("1", &1, &CommandContext::default())
            .await
            .unwrap();
        let reads = store.reads();

        let outcome = counters
            .execute("1", &2, &CommandContext::default())
            .await
            .unwrap();

        assert_eq!(outcome.version, 2);
        assert_eq!(store.reads(), reads, "a cached state needs no read");
        let stats = counters.stats();
        assert_eq!((stats.cache_hits, stats.cache_misses), (1, 1));
        assert_eq!(counters.load("1").await.unwrap().state.value, 3);
    }

    #[tokio::test]
    async fn without_a_cache_every_command_loads_its_aggregate() {
        let store = Interfering::new();
        let counters = Repository::<Counter>::with_config(
            store.clone(),
            RepositoryConfig::default().with_cache_capacity(0),
        );
        counters
            .execute("1", &1, &CommandContext::default())
            .await
            .unwrap();
        let reads = store.reads();

        counters
            .execute("1", &2, &CommandContext::default())
            .await
            .unwrap();

        assert_eq!(store.reads(), reads + 1, "one read of the stream");
        assert_eq!(counters.stats(), RepositoryStats::default());
    }

    #[tokio::test]
    async fn a_rejection_from_a_cached_state_reads_the_stream_tail_once() {
        let store = Interfering::new();
        let counters = Repository::<Counter>::new(store.clone());
        counters
            .execute("1", &1, &CommandContext::default())
            .await
            .unwrap();
        let reads = store.reads();

        let error = counters
            .execute("1", &0, &CommandContext::default())
            .await
            .unwrap_err();

        assert!(matches!(error, CommandError::Rejected(NothingToAdd)));
        // The tail (nothing new) and the idempotency look-up of a rejection.
        assert_eq!(store.reads(), reads + 2);
    }

    #[tokio::test]
    async fn a_stream_that_keeps_changing_gives_up_after_the_configured_attempts() {
        let store = Interfering::conflicting();
        let counters = Repository::<Counter>::with_config(
            store,
            RepositoryConfig::default().with_max_attempts(3),
        );

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
