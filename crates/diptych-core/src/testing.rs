//! Given/when/then for aggregates (history in, command in, events or an error
//! out) and for process managers ([`process`]: history in, event in, commands out).
//!
//! ```
//! # use diptych_core::{Aggregate, testing::given};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Default, Serialize, Deserialize)] struct Light { on: bool }
//! # #[derive(Debug, PartialEq, Serialize, Deserialize)] enum LightEvent { SwitchedOn }
//! # #[derive(Debug, PartialEq, thiserror::Error)] #[error("already on")] struct AlreadyOn;
//! # impl Aggregate for Light {
//! #     const KIND: &'static str = "light";
//! #     type Command = ();
//! #     type Event = LightEvent;
//! #     type Error = AlreadyOn;
//! #     fn decide(&self, _: &()) -> Result<Vec<LightEvent>, AlreadyOn> {
//! #         if self.on { Err(AlreadyOn) } else { Ok(vec![LightEvent::SwitchedOn]) }
//! #     }
//! #     fn evolve(&mut self, _: &LightEvent) { self.on = true; }
//! # }
//! given::<Light>([]).when(()).then([LightEvent::SwitchedOn]);
//! given::<Light>([LightEvent::SwitchedOn]).when(()).then_error(AlreadyOn);
//! ```
//!
//! Every event given and every event decided goes through the aggregate's
//! [`EventCodec`] and back, so a test also proves the events can be stored and
//! read: an event that would not survive storage fails the test here, not in
//! production.

use std::fmt::Debug;

use crate::aggregate::Aggregate;
use crate::codec::EventCodec;
use crate::envelope::{Position, RecordedEvent, StreamId, Timestamp};
use crate::error::HandlerError;
use crate::process::ProcessManager;
use crate::repository::CommandContext;

/// Starts a test from an aggregate's history.
pub fn given<A: Aggregate>(history: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let codec = EventCodec::<A::Event>::new(A::upcasters());
    let mut state = A::default();
    for (index, event) in history.into_iter().enumerate() {
        let event = round_trip(&codec, &event, index as u64 + 1);
        state.evolve(&event);
    }
    Given { state, codec }
}

/// An aggregate with its history applied.
pub struct Given<A: Aggregate> {
    state: A,
    codec: EventCodec<A::Event>,
}

impl<A: Aggregate> Given<A> {
    /// Decides a command against the history.
    pub fn when(self, command: A::Command) -> When<A> {
        let result = self.state.decide(&command).map(|events| {
            events
                .iter()
                .enumerate()
                .map(|(index, event)| round_trip(&self.codec, event, index as u64 + 1))
                .collect()
        });
        When { result }
    }

    /// The state after the history, for asserting on it directly.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// The outcome of deciding a command.
pub struct When<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> When<A>
where
    A::Event: PartialEq + Debug,
{
    /// Asserts the command produced exactly these events.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = A::Event>) {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => assert_eq!(events, expected, "the command decided other events"),
            Err(error) => {
                panic!("expected events {expected:?}, but the command was rejected: {error}")
            }
        }
    }

    /// Asserts the command was rejected with exactly this error.
    #[track_caller]
    pub fn then_error(self, expected: A::Error)
    where
        A::Error: PartialEq + Debug,
    {
        match self.result {
            Ok(events) => {
                panic!("expected rejection {expected:?}, but the command decided {events:?}")
            }
            Err(error) => assert_eq!(
                error, expected,
                "the command was rejected for another reason"
            ),
        }
    }

    /// The raw result, for snapshot tests or custom assertions.
    pub fn result(self) -> Result<Vec<A::Event>, A::Error> {
        self.result
    }
}

#[track_caller]
fn round_trip<E: crate::codec::DomainEvent>(codec: &EventCodec<E>, event: &E, version: u64) -> E {
    let new = codec
        .encode(event)
        .unwrap_or_else(|error| panic!("event cannot be stored: {error}"));
    let recorded = RecordedEvent {
        event_id: new.event_id,
        stream_id: StreamId::new("given-test").unwrap_or_else(|error| panic!("{error}")),
        stream_version: version,
        position: Position(version),
        recorded_at: Timestamp::now(),
        event_type: new.event_type,
        schema_version: new.schema_version,
        payload: new.payload,
        metadata: new.metadata,
    };
    codec
        .decode(&recorded)
        .unwrap_or_else(|error| panic!("event does not read back after storing: {error}"))
}

/// Starts a test of a process manager: `process(&pm).given(history).when(event)
/// .then(commands)`.
///
/// `given` feeds earlier events through [`ProcessManager::react`] to build each
/// saga instance's state (their commands are dropped, as they were issued
/// before); `when` reacts to one more event; `then` checks the commands. The state
/// goes through JSON between events, as it does in a view store, so a state that
/// would not survive storage fails here. Reacting twice to the same event from the
/// same state must give the same commands (process managers must be
/// deterministic, or a replay after a crash would issue different commands); the
/// helper checks that too.
pub fn process<P: ProcessManager>(process_manager: &P) -> ProcessTest<'_, P> {
    ProcessTest {
        process_manager,
        states: std::collections::BTreeMap::new(),
    }
}

/// A process manager with some history applied.
pub struct ProcessTest<'a, P: ProcessManager> {
    process_manager: &'a P,
    states: std::collections::BTreeMap<String, serde_json::Value>,
}

impl<'a, P: ProcessManager> ProcessTest<'a, P> {
    /// Reacts to `history` in order, keeping the states and dropping the commands.
    #[track_caller]
    pub fn given(mut self, history: impl IntoIterator<Item = RecordedEvent>) -> Self {
        for event in history {
            if let Err(error) = self.react(&event) {
                panic!(
                    "the history event `{}` at {} was refused: {error}",
                    event.event_type, event.position
                );
            }
        }
        self
    }

    /// Reacts to one more event.
    #[track_caller]
    pub fn when(mut self, event: RecordedEvent) -> Reaction<P> {
        let saved = self.states.clone();
        let first = self.react(&event);
        let after_first = std::mem::replace(&mut self.states, saved);
        let replay = self.react(&event).ok();
        assert_eq!(
            after_first, self.states,
            "reacting twice to the same event from the same state left different states"
        );
        let name = self.process_manager.name();
        let targets = first.as_ref().map_or_else(
            |_| Vec::new(),
            |commands| {
                commands
                    .iter()
                    .map(|command| self.process_manager.target(command))
                    .collect()
            },
        );
        Reaction {
            replay,
            targets,
            result: first.map(|commands| {
                commands
                    .into_iter()
                    .enumerate()
                    .map(|(index, command)| {
                        (command, CommandContext::caused_by(&event, name, index))
                    })
                    .collect()
            }),
        }
    }

    fn react(&mut self, event: &RecordedEvent) -> Result<Vec<P::Command>, HandlerError> {
        let instance = self.process_manager.instance(event);
        let mut state: P::State = match instance.as_ref().and_then(|key| self.states.get(key)) {
            Some(stored) => serde_json::from_value(stored.clone())
                .unwrap_or_else(|error| panic!("the saga state does not read back: {error}")),
            None => P::State::default(),
        };
        let commands = self.process_manager.react(&mut state, event)?;
        if let Some(key) = instance {
            let stored = serde_json::to_value(&state)
                .unwrap_or_else(|error| panic!("the saga state cannot be stored: {error}"));
            self.states.insert(key, stored);
        }
        Ok(commands)
    }
}

/// The commands a process manager issued in reaction to one event, each with the
/// context it would be dispatched with.
pub struct Reaction<P: ProcessManager> {
    result: Result<Vec<(P::Command, CommandContext)>, HandlerError>,
    /// The commands of a second reaction from the same state.
    replay: Option<Vec<P::Command>>,
    /// What each command targets.
    targets: Vec<Option<String>>,
}

impl<P: ProcessManager> Reaction<P>
where
    P::Command: PartialEq + Debug,
{
    /// Asserts the reaction issued exactly these commands, in order.
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = P::Command>) {
        let expected: Vec<P::Command> = expected.into_iter().collect();
        match self.result {
            Ok(issued) => {
                let commands: Vec<&P::Command> =
                    issued.iter().map(|(command, _)| command).collect();
                let replayed: Option<Vec<&P::Command>> =
                    self.replay.as_ref().map(|replay| replay.iter().collect());
                assert_eq!(
                    replayed.as_ref(),
                    Some(&commands),
                    "reacting twice to the same event from the same state gave other commands: \
                     a replay after a crash would issue different commands"
                );
                let expected: Vec<&P::Command> = expected.iter().collect();
                assert_eq!(
                    commands, expected,
                    "the process manager issued other commands"
                );
            }
            Err(error) => panic!("expected commands {expected:?}, but reacting failed: {error}"),
        }
    }

    /// Asserts reacting failed, and returns the error's text.
    #[track_caller]
    pub fn then_fails(self) -> String {
        match self.result {
            Ok(issued) => panic!(
                "expected a failure, but the process manager issued {:?}",
                issued
                    .iter()
                    .map(|(command, _)| command)
                    .collect::<Vec<_>>()
            ),
            Err(error) => error.chain(),
        }
    }

    /// The commands with their contexts (derived ids, correlation, causation).
    #[track_caller]
    pub fn issued(self) -> Vec<(P::Command, CommandContext)> {
        self.result
            .unwrap_or_else(|error| panic!("reacting failed: {error}"))
    }

    /// What each command targets ([`ProcessManager::target`]), in the order
    /// issued: the runner dispatches commands with different targets at the
    /// same time, and those with one target (or none) in this order.
    #[track_caller]
    pub fn targets(self) -> Vec<Option<String>> {
        if let Err(error) = &self.result {
            panic!("reacting failed: {error}");
        }
        self.targets
    }
}

/// A recorded event made from a typed one, as a store would hand it to a
/// projection or a process manager: for tests. Each call gets the next position.
#[track_caller]
pub fn recorded<E: crate::codec::DomainEvent>(
    stream: &str,
    version: u64,
    event: &E,
) -> RecordedEvent {
    static NEXT_POSITION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let codec = EventCodec::<E>::default();
    let new = codec
        .encode(event)
        .unwrap_or_else(|error| panic!("event cannot be stored: {error}"));
    RecordedEvent {
        event_id: new.event_id,
        stream_id: StreamId::new(stream).unwrap_or_else(|error| panic!("{error}")),
        stream_version: version,
        position: Position(NEXT_POSITION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        recorded_at: Timestamp::now(),
        event_type: new.event_type,
        schema_version: new.schema_version,
        payload: new.payload,
        metadata: new.metadata,
    }
}
