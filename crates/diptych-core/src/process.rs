//! Process managers (sagas): code that reacts to events by issuing commands.
//!
//! A process manager is pure where it decides: [`ProcessManager::react`] turns an
//! event (and the saga instance's state, if it keeps one) into commands. Sending
//! them is [`ProcessManager::dispatch`], usually a [`crate::Repository::execute`].
//!
//! It runs on the projection runner, so it gets batching, checkpoints, retries,
//! parking, pause and status for free. Its state lives in a collection of its own,
//! committed in the same transaction as its checkpoint. Exactly-once *effects* come
//! from the event store's idempotency: each command's id is derived from the
//! triggering event, the process manager's name and the command's index
//! ([`CommandContext::caused_by`]). After a crash between dispatching and the
//! checkpoint, the same event reacts again from the same committed state, produces
//! the same command ids, and the store returns the first results instead of
//! writing again.
//!
//! Reacting is sequential; dispatching is not. The runner first reacts to every
//! event of a batch in order (a later event of a saga instance sees the state an
//! earlier one left), then dispatches all the commands together, so concurrent
//! appends share the store's group commit instead of paying one durable write
//! each in turn. What keeps that safe:
//!
//! * Commands to one aggregate ([`ProcessManager::target`]) are dispatched in
//!   the order they were issued; a command without a target is dispatched alone,
//!   which is what every command is unless the process manager says otherwise.
//! * An event's commands wait for those of the same saga instance's earlier
//!   events, so no command is ever sent from a state that is later undone.
//! * The checkpoint never passes an event whose commands did not all succeed:
//!   the batch's changes are undone back to the first such event, which is
//!   retried alone (reacting and dispatching again, as a crash would make it) and
//!   parked if it keeps failing; the events after it react again, and their
//!   commands already sent are recognised by their ids.
//!
//! Compensations are ordinary commands issued in reaction to a failure event
//! (`StockReservationFailed` → release what was reserved).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::envelope::RecordedEvent;
use crate::error::{HandlerError, ViewError};
use crate::projection::{Deferred, Effect, Interest, Projection, ViewTx};
use crate::repository::CommandContext;
use crate::runner::{RunnerConfig, RunnerHandle, spawn_projection};
use crate::store::EventStore;
use crate::view::{CollectionSpec, HandlerKind, ViewStore};

/// Reacts to events by issuing commands.
#[async_trait]
pub trait ProcessManager: Send + Sync + 'static {
    /// The state of one saga instance (`()` for a stateless process manager).
    type State: Serialize + DeserializeOwned + Default + Send + Sync;
    /// The commands it issues.
    type Command: Send + Sync + 'static;

    /// Its name (lower-case letters, digits, `-`, `_`; at most 58 bytes, as its
    /// state collection is named `<name>-state`).
    fn name(&self) -> &str;

    /// The events it reacts to.
    fn interest(&self) -> Interest;

    /// The saga instance an event belongs to (an order id, say), whose state
    /// [`ProcessManager::react`] receives; `None` for no state.
    fn instance(&self, event: &RecordedEvent) -> Option<String> {
        let _ = event;
        None
    }

    /// Decides the commands an event calls for, updating the instance's state.
    /// Must be deterministic: after a crash it runs again on the same state.
    fn react(
        &self,
        state: &mut Self::State,
        event: &RecordedEvent,
    ) -> Result<Vec<Self::Command>, HandlerError>;

    /// The aggregate `command` addresses (its stream id, `stock-42`), so that
    /// commands to different aggregates can be dispatched at the same time while
    /// those to one aggregate keep the order they were issued in.
    ///
    /// The default, `None`, says nothing about the command: it is dispatched
    /// alone, after every command issued before it and before any issued after
    /// it, so a process manager that does not implement this dispatches one
    /// command at a time, in order. The target is asked of the process manager
    /// rather than of the command type because it is the process manager that
    /// knows which of its commands may overtake one another (two commands to
    /// different aggregates may still have to be ordered, when one of them is
    /// sent somewhere that reads the other's effect: give both the same target
    /// then, or none).
    fn target(&self, command: &Self::Command) -> Option<String> {
        let _ = command;
        None
    }

    /// Sends one command. `context` carries the derived command id (the
    /// idempotency key) and the correlation and causation ids. It may be called
    /// again with the same command and id (after a failure in the same batch or
    /// a crash), so it must be idempotent by that id, as
    /// [`crate::Repository::execute`] is.
    async fn dispatch(
        &self,
        command: Self::Command,
        context: CommandContext,
    ) -> Result<(), HandlerError>;
}

/// The name of a process manager's state collection.
pub fn state_collection(process_manager: &str) -> String {
    format!("{process_manager}-state")
}

impl CommandContext {
    /// The context of the `index`-th command that `handler` issues in reaction to
    /// `event`: the command id is derived from the three, so reacting again to
    /// the same event issues the same ids; the correlation id is carried over and
    /// the causation id is the event's id.
    pub fn caused_by(event: &RecordedEvent, handler: &str, index: usize) -> Self {
        let name = format!("{handler}/{index}");
        let mut context = CommandContext::new(Uuid::new_v5(&event.event_id, name.as_bytes()));
        context.correlation_id = Some(event.metadata.correlation_id.unwrap_or(event.event_id));
        context.causation_id = Some(event.event_id);
        context
    }
}

/// Registers a process manager and starts its runner on the current tokio
/// runtime (see [`spawn_projection`]).
pub async fn spawn_process_manager<P: ProcessManager>(
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    process_manager: Arc<P>,
    config: RunnerConfig,
) -> Result<RunnerHandle, ViewError> {
    spawn_projection(
        store,
        views,
        as_projection(process_manager),
        HandlerKind::ProcessManager,
        config,
    )
    .await
}

/// A process manager as the runner sees it: a projection whose only view is its
/// state. Run it with [`HandlerKind::ProcessManager`], as
/// [`spawn_process_manager`] does.
pub fn as_projection<P: ProcessManager>(process_manager: Arc<P>) -> Arc<dyn Projection> {
    let state_collection = state_collection(process_manager.name());
    Arc::new(AsProjection {
        process_manager,
        state_collection,
    })
}

/// A process manager seen as a projection whose only view is its state.
struct AsProjection<P> {
    process_manager: Arc<P>,
    state_collection: String,
}

#[async_trait]
impl<P: ProcessManager> Projection for AsProjection<P> {
    fn name(&self) -> &str {
        self.process_manager.name()
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new(self.state_collection.clone())]
    }

    fn interest(&self) -> Interest {
        self.process_manager.interest()
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        // One at a time, in the order issued: that meets every target's order.
        for effect in self.apply_deferred(event, views).await?.effects {
            effect.run().await?;
        }
        Ok(())
    }

    /// The batch's saga states, read together rather than one per event.
    async fn prefetch(&self, events: &[&RecordedEvent], views: &mut ViewTx) {
        let instances = events
            .iter()
            .filter_map(|event| self.process_manager.instance(event));
        views.prefetch(&self.state_collection, instances).await;
    }

    async fn apply_deferred(
        &self,
        event: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<Deferred, HandlerError> {
        let instance = self.process_manager.instance(event);
        let mut state = match &instance {
            Some(key) => views
                .get::<P::State>(&self.state_collection, key)
                .await?
                .unwrap_or_default(),
            None => P::State::default(),
        };
        let commands = self.process_manager.react(&mut state, event)?;
        if let Some(key) = &instance {
            views.put(&self.state_collection, key, &state)?;
        }
        let name = self.process_manager.name();
        let effects = commands
            .into_iter()
            .enumerate()
            .map(|(index, command)| {
                let context = CommandContext::caused_by(event, name, index);
                let target = self.process_manager.target(&command);
                let process_manager = Arc::clone(&self.process_manager);
                Effect::new(target, async move {
                    process_manager.dispatch(command, context).await
                })
            })
            .collect();
        Ok(Deferred {
            sequence: instance,
            effects,
        })
    }
}
