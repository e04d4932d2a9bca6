//! Aggregates: the pure decide/evolve pair that enforces a stream's business rules.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{DomainEvent, Upcasters};

/// When to save a snapshot of an aggregate's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SnapshotPolicy {
    /// Never: always replay the whole stream (right for short streams).
    #[default]
    Never,
    /// Whenever the stream's version crosses a multiple of this many events.
    Every(u64),
}

impl SnapshotPolicy {
    /// Whether an append taking a stream from `before` to `after` calls for one.
    pub fn is_due(self, before: u64, after: u64) -> bool {
        match self {
            SnapshotPolicy::Never => false,
            SnapshotPolicy::Every(0) => false,
            SnapshotPolicy::Every(every) => before / every != after / every,
        }
    }
}

/// A consistency boundary: the state of one stream, the commands it accepts and the
/// events it emits.
///
/// `decide` and `evolve` are pure and synchronous, so an aggregate is tested without
/// a store (see [`crate::testing::given`]). The state is serde so it can be
/// snapshotted; bump [`Aggregate::STATE_VERSION`] whenever its shape changes and old
/// snapshots are then ignored (the state is rebuilt from events).
///
/// ```
/// use diptych_core::Aggregate;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { value: u64 }
///
/// #[derive(Debug, PartialEq, Serialize, Deserialize)]
/// enum CounterEvent { Incremented { by: u64 } }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("counter would overflow")]
/// struct Overflow;
///
/// impl Aggregate for Counter {
///     const KIND: &'static str = "counter";
///     type Command = u64;
///     type Event = CounterEvent;
///     type Error = Overflow;
///     fn decide(&self, by: &u64) -> Result<Vec<CounterEvent>, Overflow> {
///         self.value.checked_add(*by).ok_or(Overflow)?;
///         Ok(vec![CounterEvent::Incremented { by: *by }])
///     }
///     fn evolve(&mut self, event: &CounterEvent) {
///         let CounterEvent::Incremented { by } = event;
///         self.value += by;
///     }
/// }
/// ```
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The stream category: an aggregate with id `42` lives in stream `<KIND>-42`.
    const KIND: &'static str;
    /// The schema version of the serialized state, for snapshots.
    const STATE_VERSION: u32 = 1;
    /// What the aggregate is asked to do.
    type Command: Send + Sync;
    /// What it records having happened: a serde enum (see [`DomainEvent`]).
    type Event: DomainEvent;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Checks a command against the current state and returns the events it causes.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Applies one event to the state. Must not fail: the event already happened.
    fn evolve(&mut self, event: &Self::Event);

    /// When to snapshot; never by default.
    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::Never
    }

    /// The upcasters that bring this aggregate's old events up to date.
    fn upcasters() -> Upcasters {
        Upcasters::new()
    }
}
