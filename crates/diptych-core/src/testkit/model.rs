//! Property tests: random operations against the reference model, and random
//! concurrent batches against the invariants.
//!
//! Both drive proptest's [`TestRunner`] by hand, with a runtime of their own, so
//! they can run as plain `#[test]`s in any backend crate and still shrink a failure
//! to a minimal list of operations.

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{Fixture, join_all, property_runtime, read_whole_log, stream};
use crate::envelope::{NewEvent, Position, RecordedEvent, StreamId, Timestamp};
use crate::error::{AppendError, ReadError};
use crate::memory::MemoryStore;
use crate::store::{
    AppendOutcome, AppendRequest, Direction, EventStore, ExpectedVersion, StreamRead,
};

/// Streams the model test spreads its operations over: few, so they collide.
const MODEL_STREAMS: usize = 4;
/// Idempotency keys to draw from: few, so they repeat.
const KEYS: usize = 3;
/// Event ids to draw from besides fresh ones, so duplicates happen.
const POOLED_EVENT_IDS: u8 = 3;

/// Runs `cases` random sequences of operations (appends with every kind of
/// expected version, idempotency keys and the odd invalid or duplicate event;
/// stream and global reads at random places; head, versions, key look-ups) on a
/// fresh backend from `factory` and on a fresh [`MemoryStore`], and panics with a
/// minimal failing sequence when any result differs.
///
/// Results are compared whole, except the time each event was recorded and the
/// positions' numbers: positions are compared by rank, so a backend may leave gaps.
pub fn check_against_model<F, Fut>(factory: F, cases: u32)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    let runtime = property_runtime();
    let mut runner = TestRunner::new(property_config(cases));
    let operations = prop::collection::vec(operation(), 1..48);
    let result = runner.run(&operations, |operations| {
        runtime
            .block_on(async {
                let fixture = factory().await;
                compare_with_model(&*fixture.store(), &operations).await
            })
            .map_err(TestCaseError::fail)
    });
    if let Err(failure) = result {
        panic!("the backend disagrees with the reference model (MemoryStore): {failure}");
    }
}

/// Runs `cases` random waves of appends (random streams, expected versions and
/// idempotency keys), each wave's appends all at once, on a fresh backend from
/// `factory`, then checks the invariants against what the appends reported: every
/// written event is in the log where its outcome said, versions are dense, the log
/// holds exactly the written events, refused appends wrote nothing, and each
/// idempotency key wrote once.
pub fn check_concurrent_batches<F, Fut>(factory: F, cases: u32)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    let runtime = property_runtime();
    let mut runner = TestRunner::new(property_config(cases));
    let waves = prop::collection::vec(prop::collection::vec(batch_append(), 2..10), 1..=3);
    let result = runner.run(&waves, |waves| {
        runtime
            .block_on(async {
                let fixture = factory().await;
                run_waves(fixture.store(), &waves).await
            })
            .map_err(TestCaseError::fail)
    });
    if let Err(failure) = result {
        panic!("concurrent appends broke an invariant: {failure}");
    }
}

/// The runner's settings: no regression files (there is no source file to put them
/// beside when the runner is driven by hand) and a bound on shrinking, since every
/// step replays a case against a real backend.
fn property_config(cases: u32) -> Config {
    Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 1024,
        ..Config::default()
    }
}

/// One step of the model test. Indexes pick streams, keys and pooled ids, so
/// shrinking keeps a case meaningful.
#[derive(Clone, Debug)]
enum Operation {
    Append {
        stream: usize,
        expected: ExpectedVersion,
        events: Vec<EventChoice>,
        key: Option<usize>,
    },
    ReadStream {
        stream: usize,
        from: u64,
        direction: Direction,
        limit: usize,
    },
    /// `after` counts events: read after the `after`-th event of the log.
    ReadAll {
        after: u64,
        limit: usize,
    },
    StreamVersion {
        stream: usize,
    },
    Head,
    FindIdempotent {
        key: usize,
    },
}

/// One event of a generated append.
#[derive(Clone, Debug)]
struct EventChoice {
    /// `Some(i)` re-uses pooled id `i`; `None` takes a fresh one.
    pooled_id: Option<u8>,
    /// An empty type name, which every backend must refuse.
    untyped: bool,
}

fn expected_version(max_exact: u64) -> impl Strategy<Value = ExpectedVersion> {
    prop_oneof![
        2 => Just(ExpectedVersion::Any),
        1 => Just(ExpectedVersion::NoStream),
        3 => (0..max_exact).prop_map(ExpectedVersion::Exact),
    ]
}

fn event_choice() -> impl Strategy<Value = EventChoice> {
    (
        prop::option::weighted(0.08, 0..POOLED_EVENT_IDS),
        prop::bool::weighted(0.03),
    )
        .prop_map(|(pooled_id, untyped)| EventChoice { pooled_id, untyped })
}

fn operation() -> impl Strategy<Value = Operation> {
    let events = prop_oneof![
        1 => Just(Vec::new()),
        30 => prop::collection::vec(event_choice(), 1..=3),
    ];
    prop_oneof![
        5 => (0..MODEL_STREAMS, expected_version(6), events, prop::option::weighted(0.3, 0..KEYS))
            .prop_map(|(stream, expected, events, key)| Operation::Append { stream, expected, events, key }),
        2 => (0..MODEL_STREAMS, prop_oneof![4 => 0_u64..8, 1 => Just(u64::MAX)], any::<bool>(), 1_usize..5)
            .prop_map(|(stream, from, forward, limit)| Operation::ReadStream {
                stream,
                from,
                direction: if forward { Direction::Forward } else { Direction::Backward },
                limit,
            }),
        2 => (0_u64..40, 1_usize..6).prop_map(|(after, limit)| Operation::ReadAll { after, limit }),
        1 => (0..MODEL_STREAMS).prop_map(|stream| Operation::StreamVersion { stream }),
        1 => Just(Operation::Head),
        1 => (0..KEYS).prop_map(|key| Operation::FindIdempotent { key }),
    ]
}

fn model_stream(index: usize) -> StreamId {
    stream(&format!("model-{index}"))
}

fn model_key(index: usize) -> String {
    format!("model-key-{index}")
}

/// Applies the operations to the backend and to the model, one at a time, and
/// returns the first difference. The whole logs are compared at the end too, so a
/// refused append that wrote something is caught even if nothing read it.
async fn compare_with_model(
    backend: &dyn EventStore,
    operations: &[Operation],
) -> Result<(), String> {
    let model = MemoryStore::new();
    let mut positions = PositionMap::default();
    let mut fresh_ids = 0_u128;
    for (index, operation) in operations.iter().enumerate() {
        let differ = |backend: &dyn Debug, model: &dyn Debug| {
            format!(
                "operation #{index} {operation:?}:\n  backend: {backend:?}\n  model:   {model:?}"
            )
        };
        match operation {
            Operation::Append {
                stream,
                expected,
                events,
                key,
            } => {
                let events = events
                    .iter()
                    .enumerate()
                    .map(|(position_in_append, choice)| {
                        let event_id = match choice.pooled_id {
                            Some(pooled) => Uuid::from_u128(u128::from(pooled) + 1),
                            None => {
                                fresh_ids += 1;
                                Uuid::from_u128((1 << 64) + fresh_ids)
                            }
                        };
                        let event_type = if choice.untyped { "" } else { "Modelled" };
                        let payload = json!({ "operation": index, "event": position_in_append });
                        NewEvent::new(event_type, payload).with_event_id(event_id)
                    })
                    .collect();
                let mut request = AppendRequest::new(model_stream(*stream), *expected, events);
                request.idempotency_key = key.map(model_key);
                let from_backend = backend.append(request.clone()).await;
                let from_model = model.append(request).await;
                match (&from_backend, &from_model) {
                    (Ok(b), Ok(m))
                        if b.deduplicated == m.deduplicated && b.events.len() == m.events.len() =>
                    {
                        if !b.deduplicated {
                            positions
                                .extend(&b.events)
                                .map_err(|error| differ(&error, &from_model))?;
                        }
                        let b = positions
                            .normalize_outcome(b)
                            .map_err(|error| differ(&error, &from_model))?;
                        if b != normalize_model_outcome(m) {
                            return Err(differ(&from_backend, &from_model));
                        }
                    }
                    (Err(b), Err(m)) if same_append_error(b, m) => {}
                    _ => return Err(differ(&from_backend, &from_model)),
                }
            }
            Operation::ReadStream {
                stream,
                from,
                direction,
                limit,
            } => {
                let read = StreamRead {
                    stream: model_stream(*stream),
                    from: *from,
                    direction: *direction,
                    limit: *limit,
                };
                let from_backend = backend.read_stream(read.clone()).await;
                let from_model = model.read_stream(read).await;
                let same = match (&from_backend, &from_model) {
                    (Ok(b), Ok(m)) => positions.normalize(b).is_ok_and(|b| b == normalize(m)),
                    (Err(b), Err(m)) => same_read_error(b, m),
                    _ => false,
                };
                if !same {
                    return Err(differ(&from_backend, &from_model));
                }
            }
            Operation::ReadAll { after, limit } => {
                let after = (*after).min(positions.len() + 1);
                let from_backend = backend.read_all(positions.to_backend(after), *limit).await;
                let from_model = model.read_all(Position(after), *limit).await;
                let same = match (&from_backend, &from_model) {
                    (Ok(b), Ok(m)) => positions.normalize(b).is_ok_and(|b| b == normalize(m)),
                    _ => false,
                };
                if !same {
                    return Err(differ(&from_backend, &from_model));
                }
            }
            Operation::StreamVersion { stream } => {
                let from_backend = backend.stream_version(&model_stream(*stream)).await;
                let from_model = model.stream_version(&model_stream(*stream)).await;
                if from_backend.as_ref().ok() != from_model.as_ref().ok() {
                    return Err(differ(&from_backend, &from_model));
                }
            }
            Operation::Head => {
                let from_backend = backend.head().await;
                let from_model = model.head().await;
                let same = match (&from_backend, &from_model) {
                    (Ok(b), Ok(m)) => positions.to_model(*b).is_ok_and(|b| b == *m),
                    _ => false,
                };
                if !same {
                    return Err(differ(&from_backend, &from_model));
                }
            }
            Operation::FindIdempotent { key } => {
                let from_backend = backend.find_idempotent_append(&model_key(*key)).await;
                let from_model = model.find_idempotent_append(&model_key(*key)).await;
                let same = match (&from_backend, &from_model) {
                    (Ok(Some(b)), Ok(Some(m))) => positions
                        .normalize_outcome(b)
                        .is_ok_and(|b| b == normalize_model_outcome(m)),
                    (Ok(None), Ok(None)) => true,
                    _ => false,
                };
                if !same {
                    return Err(differ(&from_backend, &from_model));
                }
            }
        }
    }
    let backend_log = read_whole_log(backend).await;
    let model_log = read_whole_log(&model).await;
    match positions.normalize(&backend_log) {
        Ok(log) if log == normalize(&model_log) => Ok(()),
        _ => Err(format!(
            "after all operations the logs differ:\n  backend: {backend_log:?}\n  model:   {model_log:?}"
        )),
    }
}

/// The backend's position of each event, in log order: entry `i` is the event the
/// model has at position `i + 1`. Lets positions be compared by rank.
#[derive(Default)]
struct PositionMap {
    backend: Vec<Position>,
}

impl PositionMap {
    fn len(&self) -> u64 {
        self.backend.len() as u64
    }

    /// Records newly written events, which must come after everything before them.
    fn extend(&mut self, events: &[RecordedEvent]) -> Result<(), String> {
        for event in events {
            if let Some(last) = self.backend.last().filter(|last| event.position <= **last) {
                return Err(format!(
                    "new event at position {} is not after the previous one at {last}",
                    event.position
                ));
            }
            self.backend.push(event.position);
        }
        Ok(())
    }

    /// The model's position for a backend position.
    fn to_model(&self, position: Position) -> Result<Position, String> {
        if position == Position::START {
            return Ok(Position::START);
        }
        self.backend
            .binary_search(&position)
            .map(|index| Position(index as u64 + 1))
            .map_err(|_| format!("position {position} was never returned by an append"))
    }

    /// The backend's position for "after the `count`-th event" (past the head when
    /// `count` exceeds the log).
    fn to_backend(&self, count: u64) -> Position {
        match (count, self.backend.last()) {
            (0, _) | (_, None) => Position(count),
            (count, Some(last)) if count > self.len() => Position(last.0 + (count - self.len())),
            (count, _) => self.backend[count as usize - 1],
        }
    }

    /// Backend events with model positions and no recording time.
    fn normalize(&self, events: &[RecordedEvent]) -> Result<Vec<RecordedEvent>, String> {
        events
            .iter()
            .map(|event| {
                Ok(RecordedEvent {
                    position: self.to_model(event.position)?,
                    recorded_at: Timestamp::default(),
                    ..event.clone()
                })
            })
            .collect()
    }

    fn normalize_outcome(&self, outcome: &AppendOutcome) -> Result<AppendOutcome, String> {
        Ok(AppendOutcome {
            events: self.normalize(&outcome.events)?,
            deduplicated: outcome.deduplicated,
        })
    }
}

/// Model events without recording time (their positions are the reference).
fn normalize(events: &[RecordedEvent]) -> Vec<RecordedEvent> {
    events
        .iter()
        .map(|event| RecordedEvent {
            recorded_at: Timestamp::default(),
            ..event.clone()
        })
        .collect()
}

fn normalize_model_outcome(outcome: &AppendOutcome) -> AppendOutcome {
    AppendOutcome {
        events: normalize(&outcome.events),
        deduplicated: outcome.deduplicated,
    }
}

/// Same kind and same fields. Every field of these variants is part of the
/// contract (which stream, which versions, which key, which id), so they are
/// compared through their debug form; a backend failure never matches.
fn same_append_error(backend: &AppendError, model: &AppendError) -> bool {
    !matches!(backend, AppendError::Backend(_)) && format!("{backend:?}") == format!("{model:?}")
}

fn same_read_error(backend: &ReadError, model: &ReadError) -> bool {
    matches!((backend, model), (ReadError::StreamNotFound { stream: b }, ReadError::StreamNotFound { stream: m }) if b == m)
}

/// One append of a concurrent wave.
#[derive(Clone, Debug)]
struct BatchAppend {
    stream: usize,
    expected: ExpectedVersion,
    events: u64,
    key: Option<usize>,
}

fn batch_append() -> impl Strategy<Value = BatchAppend> {
    (
        0_usize..3,
        expected_version(4),
        1_u64..=3,
        prop::option::weighted(0.3, 0_usize..4),
    )
        .prop_map(|(stream, expected, events, key)| BatchAppend {
            stream,
            expected,
            events,
            key,
        })
}

/// Runs each wave's appends all at once, waits for the wave, then checks all that
/// the appends reported against the final log.
async fn run_waves(store: Arc<dyn EventStore>, waves: &[Vec<BatchAppend>]) -> Result<(), String> {
    let mut attempts = Vec::new();
    for (wave_index, wave) in waves.iter().enumerate() {
        let mut tasks = JoinSet::new();
        for (append_index, append) in wave.iter().enumerate() {
            let events = (0..append.events)
                .map(|event| {
                    NewEvent::new(
                        "Batched",
                        json!({ "wave": wave_index, "append": append_index, "event": event }),
                    )
                })
                .collect();
            let mut request = AppendRequest::new(
                stream(&format!("batch-{}", append.stream)),
                append.expected,
                events,
            );
            request.idempotency_key = append.key.map(|key| format!("batch-key-{key}"));
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                let result = store.append(request.clone()).await;
                (request, result)
            });
        }
        attempts.extend(join_all(tasks).await);
    }
    check_batches(&*store, &attempts).await
}

/// The invariants of a set of finished appends, checked against the final log.
async fn check_batches(
    store: &dyn EventStore,
    attempts: &[(AppendRequest, Result<AppendOutcome, AppendError>)],
) -> Result<(), String> {
    let log = read_whole_log(store).await;
    let mut last_position = Position::START;
    let mut versions: HashMap<&StreamId, u64> = HashMap::new();
    let mut by_id: HashMap<Uuid, &RecordedEvent> = HashMap::new();
    for event in &log {
        if event.position <= last_position {
            return Err(format!(
                "log positions go from {last_position} to {}",
                event.position
            ));
        }
        last_position = event.position;
        let version = versions.entry(&event.stream_id).or_default();
        *version += 1;
        if event.stream_version != *version {
            return Err(format!(
                "`{}` has version {} where {} was due: {log:?}",
                event.stream_id, event.stream_version, version
            ));
        }
        if by_id.insert(event.event_id, event).is_some() {
            return Err(format!(
                "event id {} appears twice in the log",
                event.event_id
            ));
        }
    }

    // Appends that wrote, and which one wrote for each key.
    let mut written = 0;
    let mut writers_by_key: HashMap<&str, &AppendOutcome> = HashMap::new();
    for (request, result) in attempts {
        let context = || {
            format!(
                "append to `{}` expecting {} with key {:?}",
                request.stream, request.expected, request.idempotency_key
            )
        };
        let wrote = matches!(result, Ok(outcome) if !outcome.deduplicated);
        if !wrote {
            if let Some(event) = request
                .events
                .iter()
                .find(|event| by_id.contains_key(&event.event_id))
            {
                return Err(format!(
                    "{} returned {result:?} yet its event {} is in the log",
                    context(),
                    event.event_id
                ));
            }
        }
        match result {
            Ok(outcome) if !outcome.deduplicated => {
                written += outcome.events.len();
                let first_version = match request.expected {
                    ExpectedVersion::Exact(version) => Some(version + 1),
                    ExpectedVersion::NoStream => Some(1),
                    ExpectedVersion::Any => None,
                };
                let start = outcome.events.first().map(|event| event.stream_version);
                if first_version.is_some_and(|first| Some(first) != start) {
                    return Err(format!("{} wrote from version {start:?}", context()));
                }
                for (offset, (new, recorded)) in
                    request.events.iter().zip(&outcome.events).enumerate()
                {
                    let as_requested = recorded.event_id == new.event_id
                        && recorded.payload == new.payload
                        && recorded.stream_id == request.stream
                        && Some(recorded.stream_version)
                            == start.map(|start| start + offset as u64);
                    if !as_requested || by_id.get(&recorded.event_id) != Some(&recorded) {
                        return Err(format!(
                            "{} reported {recorded:?}, which is not what the log holds",
                            context()
                        ));
                    }
                }
                if outcome.events.len() != request.events.len() {
                    return Err(format!(
                        "{} wrote {} of its {} events",
                        context(),
                        outcome.events.len(),
                        request.events.len()
                    ));
                }
                if let Some(key) = &request.idempotency_key {
                    if writers_by_key.insert(key, outcome).is_some() {
                        return Err(format!("two appends with key `{key}` both wrote"));
                    }
                }
            }
            Ok(_) => {}
            Err(AppendError::Conflict {
                stream,
                expected,
                actual,
            }) => {
                if *stream != request.stream
                    || *expected != request.expected
                    || expected.admits(*actual)
                {
                    return Err(format!(
                        "{} failed with an inconsistent conflict: {result:?}",
                        context()
                    ));
                }
            }
            Err(AppendError::IdempotencyKeyReused { .. }) => {}
            Err(error) => return Err(format!("{} failed: {error:?}", context())),
        }
    }
    if written != log.len() {
        return Err(format!(
            "the appends reported {written} written events but the log holds {}",
            log.len()
        ));
    }

    // Repeats of a key return what its writer wrote, or name the writer's stream.
    for (request, result) in attempts {
        let key = request.idempotency_key.as_deref();
        let writer = key.and_then(|key| writers_by_key.get(key));
        let consistent = match result {
            Ok(outcome) if outcome.deduplicated => writer.is_some_and(|writer| {
                outcome.events == writer.events && request.stream == writer.events[0].stream_id
            }),
            Err(AppendError::IdempotencyKeyReused {
                key: reported,
                first_stream,
                stream,
            }) => {
                Some(reported.as_str()) == key
                    && stream != first_stream
                    && writer.is_some_and(|writer| writer.events[0].stream_id == *first_stream)
            }
            _ => true,
        };
        if !consistent {
            return Err(format!(
                "an append to `{}` with key {key:?} returned {result:?}, which does not match \
                 the append that wrote with that key: {writer:?}",
                request.stream
            ));
        }
    }

    let streams: HashSet<&StreamId> = attempts
        .iter()
        .map(|(request, _)| &request.stream)
        .collect();
    for stream in streams {
        let version = store
            .stream_version(stream)
            .await
            .map_err(|error| format!("stream_version failed: {error}"))?;
        let expected = versions.get(stream).copied().unwrap_or(0);
        if version != expected {
            return Err(format!(
                "stream_version(`{stream}`) is {version} but the log holds {expected} events of it"
            ));
        }
    }
    replay_against_the_model(attempts, &log).await?;
    Ok(())
}

/// Compares the concurrent run with the reference model: replaying the appends that
/// wrote, in the order of their positions, into a fresh [`MemoryStore`] with their
/// original expected versions and keys must accept every one of them and produce
/// the same log. So the backend's history is one the model could have produced
/// sequentially.
async fn replay_against_the_model(
    attempts: &[(AppendRequest, Result<AppendOutcome, AppendError>)],
    log: &[RecordedEvent],
) -> Result<(), String> {
    let mut writers: Vec<(&AppendRequest, Position)> = attempts
        .iter()
        .filter_map(|(request, result)| match result {
            Ok(outcome) if !outcome.deduplicated => {
                Some((request, outcome.events.first()?.position))
            }
            _ => None,
        })
        .collect();
    writers.sort_by_key(|&(_, position)| position);
    let model = MemoryStore::new();
    for (request, _) in writers {
        if let Err(error) = model.append(request.clone()).await {
            return Err(format!(
                "the model refuses the append to `{}` expecting {} that the backend took, \
                 in the backend's order: {error}",
                request.stream, request.expected
            ));
        }
    }
    let model_log = read_whole_log(&model).await;
    let shape = |event: &RecordedEvent| {
        (
            event.event_id,
            event.stream_id.clone(),
            event.stream_version,
            event.payload.clone(),
        )
    };
    let backend: Vec<_> = log.iter().map(shape).collect();
    let modelled: Vec<_> = model_log.iter().map(shape).collect();
    if backend != modelled {
        return Err(format!(
            "the backend's log differs from the model's replay of the same appends:\n\
             backend: {backend:?}\nmodel: {modelled:?}"
        ));
    }
    Ok(())
}
