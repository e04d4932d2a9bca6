//! Typed handlers: events decoded with their aggregate's upcasters, interest
//! derived from the event types, the envelope alongside, and instances that
//! only the events a process manager reacts to have.

use async_trait::async_trait;
use diptych_core::testing::{process, recorded};
use diptych_core::{
    Aggregate, CollectionSpec, CommandContext, Declaration, EventSet, HandlerError, HandlerKind,
    MemoryViews, Projection, RecordedEvent, TypedProcessManager, TypedProjection, Upcasters,
    ViewStore, ViewTx,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;

#[derive(Default, Serialize, Deserialize)]
struct Account;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum AccountEvent {
    Opened { owner: String },
    Deposited { amount: u64 },
}

impl Aggregate for Account {
    const KIND: &'static str = "account";
    type Command = ();
    type Event = AccountEvent;
    type Error = std::convert::Infallible;

    fn decide(&self, (): &()) -> Result<Vec<AccountEvent>, Self::Error> {
        Ok(Vec::new())
    }

    fn evolve(&mut self, _: &AccountEvent) {}

    /// `Credited {value}` was the first name of `Deposited {amount}`.
    fn upcasters() -> Upcasters {
        Upcasters::new().add_renaming("Credited", 1, "Deposited", 2, |payload| {
            Ok(json!({ "amount": payload["value"] }))
        })
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Note;

#[derive(Clone, Debug, Serialize, Deserialize)]
enum NoteEvent {
    Written { text: String },
}

impl Aggregate for Note {
    const KIND: &'static str = "note";
    type Command = ();
    type Event = NoteEvent;
    type Error = std::convert::Infallible;

    fn decide(&self, (): &()) -> Result<Vec<NoteEvent>, Self::Error> {
        Ok(Vec::new())
    }

    fn evolve(&mut self, _: &NoteEvent) {}
}

#[derive(Debug)]
enum Seen {
    Account(AccountEvent),
    Note(NoteEvent),
}

/// One document per account: its balance and the version that last moved it.
struct Balances {
    events: EventSet<Seen>,
}

#[async_trait]
impl TypedProjection for Balances {
    type Event = Seen;

    fn name(&self) -> &str {
        "balances"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new("balances")]
    }

    fn events(&self) -> &EventSet<Seen> {
        &self.events
    }

    async fn apply(
        &self,
        event: Seen,
        envelope: &RecordedEvent,
        views: &mut ViewTx,
    ) -> Result<(), HandlerError> {
        if let Seen::Account(AccountEvent::Deposited { amount }) = event {
            let version = envelope.stream_version;
            views
                .upsert(
                    "balances",
                    envelope.stream_id.as_str(),
                    |doc: &mut Balance| {
                        doc.cents += amount;
                        doc.version = version;
                    },
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(Default, Serialize, Deserialize)]
struct Balance {
    cents: u64,
    version: u64,
}

fn balances() -> Balances {
    Balances {
        events: EventSet::new().aggregate::<Account>(Seen::Account),
    }
}

/// A deposit stored under its first name and shape.
fn credited(stream: &str, version: u64, value: u64) -> RecordedEvent {
    let mut event = recorded(stream, version, &AccountEvent::Deposited { amount: 0 });
    event.event_type = "Credited".to_owned();
    event.schema_version = 1;
    event.payload = json!({ "value": value });
    event
}

fn opened(stream: &str) -> RecordedEvent {
    recorded(
        stream,
        1,
        &AccountEvent::Opened {
            owner: "ada".to_owned(),
        },
    )
}

/// A batch of `balances` on a view store where it is registered.
async fn batch() -> ViewTx {
    let store = MemoryViews::new();
    let collections = vec![CollectionSpec::new("balances")];
    store
        .register(&Declaration {
            name: "balances".to_owned(),
            kind: HandlerKind::Projection,
            collections: collections.clone(),
        })
        .await
        .unwrap();
    ViewTx::new(Arc::new(store), 1, &collections)
}

#[test]
fn interest_is_the_aggregates_categories_and_event_types_old_names_included() {
    let interest = Projection::interest(&balances());
    assert!(interest.wants(&opened("account-1")));
    assert!(interest.wants(&credited("account-1", 2, 5)));
    let written = NoteEvent::Written {
        text: "hi".to_owned(),
    };
    assert!(!interest.wants(&recorded("note-1", 1, &written)));
    let mut closed = opened("account-1");
    closed.event_type = "Closed".to_owned();
    assert!(!interest.wants(&closed), "a type no enum variant names");
    let mut borrowed = opened("loan-1");
    borrowed.event_type = "Opened".to_owned();
    assert!(!interest.wants(&borrowed), "another category's `Opened`");
}

#[tokio::test]
async fn a_projection_receives_events_upcast_by_their_aggregate_with_the_envelope() {
    let projection = balances();
    let mut views = batch().await;
    for event in [
        opened("account-1"),
        credited("account-1", 2, 5),
        credited("account-1", 3, 7),
    ] {
        Projection::apply(&projection, &event, &mut views)
            .await
            .unwrap();
    }
    let balance: Balance = views.get("balances", "account-1").await.unwrap().unwrap();
    assert_eq!((balance.cents, balance.version), (12, 3));
}

#[tokio::test]
async fn an_event_that_does_not_fit_its_aggregate_is_an_error_not_a_skip() {
    let projection = balances();
    let mut views = batch().await;
    let mut broken = credited("account-1", 2, 5);
    broken.payload = json!({ "value": "five" });
    let error = Projection::apply(&projection, &broken, &mut views)
        .await
        .unwrap_err();
    assert!(format!("{error:?}").contains("invalid type"), "{error:?}");
}

/// Welcomes each new account owner; notes and deposits concern it not.
struct Welcome {
    events: EventSet<Seen>,
}

#[async_trait]
impl TypedProcessManager for Welcome {
    type Event = Seen;
    type State = u32;
    type Command = String;

    fn name(&self) -> &str {
        "welcome"
    }

    fn events(&self) -> &EventSet<Seen> {
        &self.events
    }

    fn instance(&self, event: &Seen, envelope: &RecordedEvent) -> Option<String> {
        matches!(event, Seen::Account(AccountEvent::Opened { .. }))
            .then(|| envelope.stream_id.as_str().to_owned())
    }

    fn react(
        &self,
        welcomed: &mut u32,
        event: Seen,
        _: &RecordedEvent,
    ) -> Result<Vec<String>, HandlerError> {
        Ok(match event {
            Seen::Account(AccountEvent::Opened { owner }) => {
                *welcomed += 1;
                vec![format!("welcome {owner} ({welcomed})")]
            }
            Seen::Note(NoteEvent::Written { text }) => vec![format!("noted {text}")],
            Seen::Account(AccountEvent::Deposited { .. }) => Vec::new(),
        })
    }

    async fn dispatch(&self, _: String, _: CommandContext) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[test]
fn a_process_manager_reacts_to_typed_events_of_several_aggregates() {
    let welcome = Welcome {
        events: EventSet::new()
            .aggregate::<Account>(Seen::Account)
            .aggregate::<Note>(Seen::Note),
    };
    process(&welcome)
        .given([opened("account-1")])
        .when(opened("account-1"))
        .then(["welcome ada (2)".to_owned()]);
    let written = NoteEvent::Written {
        text: "hi".to_owned(),
    };
    process(&welcome)
        .when(recorded("note-1", 1, &written))
        .then(["noted hi".to_owned()]);
    assert_eq!(
        diptych_core::ProcessManager::instance(&welcome, &credited("account-1", 2, 5)),
        None
    );
}

#[tokio::test]
async fn another_aggregates_event_type_in_this_stream_is_skipped_not_parked() {
    let projection = Balances {
        events: EventSet::new()
            .aggregate::<Account>(Seen::Account)
            .aggregate::<Note>(Seen::Note),
    };
    // `Written` is a note's type; the pooled interest lets it through in an
    // account's stream, and the account's enum does not know it.
    let mut stray = opened("account-1");
    stray.event_type = "Written".to_owned();
    stray.payload = json!({"text": "hi"});
    assert!(Projection::interest(&projection).wants(&stray));
    let mut views = batch().await;
    Projection::apply(&projection, &stray, &mut views)
        .await
        .unwrap();
    assert!(projection.events.decode(&stray).unwrap().is_none());
}
