//! Given/when/then for aggregates: history in, command in, events or an error out.
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
