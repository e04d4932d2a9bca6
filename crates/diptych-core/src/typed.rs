//! Handlers that receive typed events: each aggregate's events decoded with that
//! aggregate's upcasters, and an interest derived from the event types.
//!
//! A projection or process manager names the aggregates whose events it reads
//! in an [`EventSet`], mapping each aggregate's event enum into one enum of its
//! own; the set decodes every event with the right codec (so an upcaster added
//! to an aggregate reaches its views and sagas too) and tells the runner which
//! stream categories and event types to deliver. [`TypedProjection`] and
//! [`TypedProcessManager`] receive that enum with the event's envelope (stream,
//! version, position, time, metadata); each is also a [`Projection`] or a
//! [`ProcessManager`], so it runs as any handler does. An untyped `Projection`
//! stays possible for a view over raw events.

use std::collections::BTreeSet;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::envelope::RecordedEvent;
use crate::error::{DecodeError, HandlerError};
use crate::process::ProcessManager;
use crate::projection::{Interest, Projection, ViewTx};
use crate::repository::CommandContext;
use crate::view::CollectionSpec;
use crate::{Aggregate, EventCodec};

type Decode<E> = Box<dyn Fn(&RecordedEvent) -> Result<E, DecodeError> + Send + Sync>;

struct Source<E> {
    kind: &'static str,
    event_types: Vec<String>,
    decode: Decode<E>,
}

/// The aggregates whose events a handler reads, each mapped into the handler's
/// own event enum `E`.
///
/// ```ignore
/// EventSet::new()
///     .aggregate::<Product>(ShopEvent::Catalog)
///     .aggregate::<Stock>(ShopEvent::Inventory)
/// ```
pub struct EventSet<E> {
    sources: Vec<Source<E>>,
}

impl<E: Send + 'static> Default for EventSet<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Send + 'static> EventSet<E> {
    /// No aggregates yet.
    pub fn new() -> Self {
        Self {
            sources: Vec::new(),
        }
    }

    /// Also the events of aggregate `A` (streams `<A::KIND>-<id>`), decoded with
    /// its upcasters and wrapped by `into`.
    pub fn aggregate<A: Aggregate>(
        mut self,
        into: impl Fn(A::Event) -> E + Send + Sync + 'static,
    ) -> Self {
        let codec = EventCodec::<A::Event>::new(A::upcasters());
        let mut event_types: BTreeSet<String> = codec
            .event_types()
            .iter()
            .map(|name| (*name).to_owned())
            .collect();
        event_types.extend(codec.upcasters().source_types().map(str::to_owned));
        // Sorted, from the set: `decode` looks a type up by binary search.
        self.sources.push(Source {
            kind: A::KIND,
            event_types: event_types.into_iter().collect(),
            decode: Box::new(move |event| codec.decode(event).map(&into)),
        });
        self
    }

    /// The events to deliver: those of the aggregates' stream categories whose
    /// type one of their enums (or upcasters) knows. An aggregate whose event
    /// type is not an enum is taken whole.
    pub fn interest(&self) -> Interest {
        let kinds = self.sources.iter().map(|source| source.kind);
        if self
            .sources
            .iter()
            .any(|source| source.event_types.is_empty())
        {
            return Interest::categories(kinds);
        }
        let types = self
            .sources
            .iter()
            .flat_map(|source| source.event_types.iter().cloned());
        Interest::event_types(types).in_categories(kinds)
    }

    /// The event, typed; `None` for a stream of no aggregate in the set, and
    /// for a type its aggregate's enum does not know (the runner's interest
    /// pools the types of all the set's aggregates, so another aggregate's type
    /// may reach here in this one's stream: it is skipped, not parked).
    pub fn decode(&self, event: &RecordedEvent) -> Result<Option<E>, DecodeError> {
        let category = event.stream_id.category();
        let Some(source) = self.sources.iter().find(|source| source.kind == category) else {
            return Ok(None);
        };
        let known = source.event_types.is_empty()
            || source
                .event_types
                .binary_search_by(|known| known.as_str().cmp(&event.event_type))
                .is_ok();
        if !known {
            return Ok(None);
        }
        (source.decode)(event).map(Some)
    }
}

/// A projection over typed events; every one is a [`Projection`].
#[async_trait]
pub trait TypedProjection: Send + Sync + 'static {
    /// Its own enum over the events it reads.
    type Event: Send + 'static;

    /// The projection's name (see [`Projection::name`]).
    fn name(&self) -> &str;

    /// The collections it writes, which only it writes.
    fn collections(&self) -> Vec<CollectionSpec>;

    /// The aggregates whose events it reads, built once and kept by it.
    fn events(&self) -> &EventSet<Self::Event>;

    /// Applies one event, with its envelope. An error undoes this event's
    /// changes; the runner retries and parks it if it keeps failing.
    async fn apply(
        &self,
        event: Self::Event,
        envelope: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError>;
}

#[async_trait]
impl<P: TypedProjection> Projection for P {
    fn name(&self) -> &str {
        TypedProjection::name(self)
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        TypedProjection::collections(self)
    }

    fn interest(&self) -> Interest {
        self.events().interest()
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        match self.events().decode(event)? {
            Some(typed) => TypedProjection::apply(self, typed, event, views).await,
            None => Ok(()),
        }
    }
}

/// A process manager over typed events; every one is a [`ProcessManager`] (see
/// there for what each method promises).
#[async_trait]
pub trait TypedProcessManager: Send + Sync + 'static {
    /// Its own enum over the events it reacts to.
    type Event: Send + 'static;
    /// The state of one instance.
    type State: Serialize + DeserializeOwned + Default + Send + Sync;
    /// The commands it issues.
    type Command: Send + Sync + 'static;

    /// Its name.
    fn name(&self) -> &str;

    /// The aggregates whose events it reacts to, built once and kept by it.
    fn events(&self) -> &EventSet<Self::Event>;

    /// The instance an event belongs to; `None` for no state (and no state
    /// read or written: return `None` for the events it ignores).
    fn instance(&self, event: &Self::Event, envelope: &RecordedEvent) -> Option<String> {
        let _ = (event, envelope);
        None
    }

    /// The commands an event calls for, updating the instance's state.
    fn react(
        &self,
        state: &mut Self::State,
        event: Self::Event,
        envelope: &RecordedEvent,
    ) -> Result<Vec<Self::Command>, HandlerError>;

    /// The aggregate a command addresses, so commands to different ones run at
    /// the same time (see [`ProcessManager::target`]).
    fn target(&self, command: &Self::Command) -> Option<String> {
        let _ = command;
        None
    }

    /// Sends one command, idempotently by the context's command id.
    async fn dispatch(
        &self,
        command: Self::Command,
        context: CommandContext,
    ) -> Result<(), HandlerError>;
}

#[async_trait]
impl<P: TypedProcessManager> ProcessManager for P {
    type State = P::State;
    type Command = P::Command;

    fn name(&self) -> &str {
        TypedProcessManager::name(self)
    }

    fn interest(&self) -> Interest {
        self.events().interest()
    }

    fn instance(&self, event: &RecordedEvent) -> Option<String> {
        // An event that does not decode has no instance; `react` reports it.
        let typed = self.events().decode(event).ok()??;
        TypedProcessManager::instance(self, &typed, event)
    }

    fn react(
        &self,
        state: &mut P::State,
        event: &RecordedEvent,
    ) -> Result<Vec<P::Command>, HandlerError> {
        match self.events().decode(event)? {
            Some(typed) => TypedProcessManager::react(self, state, typed, event),
            None => Ok(Vec::new()),
        }
    }

    fn target(&self, command: &P::Command) -> Option<String> {
        TypedProcessManager::target(self, command)
    }

    async fn dispatch(
        &self,
        command: P::Command,
        context: CommandContext,
    ) -> Result<(), HandlerError> {
        TypedProcessManager::dispatch(self, command, context).await
    }
}
