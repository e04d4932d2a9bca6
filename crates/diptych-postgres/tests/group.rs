//! Group commit on PostgreSQL: appends that arrive together share a
//! transaction, and each still gets exactly its own answer. A refused append
//! (a version conflict, a repeated or reused key, a duplicate event id) fails
//! alone; the others in its group commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use diptych_core::{
    AppendError, AppendOutcome, AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId,
};
use diptych_postgres::{PgStore, testing};
use serde_json::json;
use tokio::sync::Barrier;
use uuid::Uuid;

/// A store that writes one group at a time, with no wait for readability (the
/// default), so that concurrent appends queue and share transactions.
async fn one_lane_store() -> Arc<PgStore> {
    let config = testing::fresh_config()
        .await
        .with_append_lanes(1)
        .with_readable_wait(Duration::ZERO);
    Arc::new(PgStore::connect(&config).await.expect("a store"))
}

fn stream(name: &str) -> StreamId {
    StreamId::new(name).unwrap()
}

fn event(n: usize) -> NewEvent {
    NewEvent::new("Wrote", json!({ "n": n }))
}

/// The transaction an event was written in: the high bits of its position.
fn transaction_of(outcome: &AppendOutcome) -> u64 {
    outcome.events[0].position.0 >> 16
}

/// For one key used on two streams: the streams that claimed it, and the
/// refused ones with the stream their refusal names.
type Claims = (Vec<String>, Vec<(String, String)>);

/// What each task asks for, and so what exactly it must be answered.
#[derive(Clone)]
enum Ask {
    /// Expects version 1 of a stream several tasks race for: one wins.
    Race { stream: String },
    /// Repeats a key with the others of its set (same stream): one writes.
    Repeat { stream: String, key: String },
    /// Uses one key on two streams at once: one claims it.
    Reuse { stream: String, key: String },
    /// Appends at any version to a stream many share: all succeed.
    Any { stream: String },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_each_get_their_own_answer() {
    let store = one_lane_store().await;
    // Eight streams at version 1, raced by four tasks each.
    for s in 0..8 {
        store
            .append(AppendRequest::new(
                stream(&format!("race-{s}")),
                ExpectedVersion::NoStream,
                vec![event(0)],
            ))
            .await
            .expect("the first event");
    }
    let mut asks = Vec::new();
    for s in 0..8 {
        for _ in 0..4 {
            asks.push(Ask::Race {
                stream: format!("race-{s}"),
            });
        }
    }
    for k in 0..6 {
        for _ in 0..3 {
            asks.push(Ask::Repeat {
                stream: format!("repeat-{k}"),
                key: format!("repeat-key-{k}"),
            });
        }
    }
    for k in 0..4 {
        for side in ["a", "b"] {
            asks.push(Ask::Reuse {
                stream: format!("reuse-{k}-{side}"),
                key: format!("reuse-key-{k}"),
            });
        }
    }
    for _ in 0..20 {
        asks.push(Ask::Any {
            stream: "shared-1".to_owned(),
        });
    }
    fastrand::shuffle(&mut asks);

    let start = Arc::new(Barrier::new(asks.len()));
    let tasks: Vec<_> = asks
        .iter()
        .cloned()
        .enumerate()
        .map(|(n, ask)| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                let request = match &ask {
                    Ask::Race { stream: name } => {
                        AppendRequest::new(stream(name), ExpectedVersion::Exact(1), vec![event(n)])
                    }
                    Ask::Repeat { stream: name, key } | Ask::Reuse { stream: name, key } => {
                        AppendRequest::new(stream(name), ExpectedVersion::Any, vec![event(n)])
                            .with_idempotency_key(key.clone())
                    }
                    Ask::Any { stream: name } => AppendRequest::new(
                        stream(name),
                        ExpectedVersion::Any,
                        vec![event(n), event(n)],
                    ),
                };
                start.wait().await;
                store.append(request).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("an append task"));
    }

    // Races: per stream, one writer at version 2, the others told the stream
    // is at version 2.
    let mut winners: HashMap<String, usize> = HashMap::new();
    // Repeats: per key, one writer; the others get its events back.
    let mut repeats: HashMap<String, Vec<AppendOutcome>> = HashMap::new();
    // Reuses: per key, the stream that claimed it and the refused one.
    let mut reuses: HashMap<String, Claims> = HashMap::new();
    let mut shared_versions = Vec::new();
    let mut transactions: HashMap<u64, usize> = HashMap::new();
    for (ask, answer) in asks.iter().zip(answers) {
        if let Ok(outcome) = &answer
            && !outcome.deduplicated
        {
            *transactions.entry(transaction_of(outcome)).or_default() += 1;
        }
        match ask {
            Ask::Race { stream } => match answer {
                Ok(outcome) => {
                    assert_eq!(outcome.last_version(), 2, "a race winner on {stream}");
                    *winners.entry(stream.clone()).or_default() += 1;
                }
                Err(AppendError::Conflict {
                    actual, expected, ..
                }) => {
                    assert_eq!(expected, ExpectedVersion::Exact(1));
                    assert_eq!(actual, 2, "a loser on {stream} sees the winner's version");
                }
                Err(other) => panic!("a race on {stream} answered {other}"),
            },
            Ask::Repeat { key, .. } => {
                repeats
                    .entry(key.clone())
                    .or_default()
                    .push(answer.expect("a repeated key is never refused"));
            }
            Ask::Reuse { stream, key } => {
                let (claimed, refused) = reuses.entry(key.clone()).or_default();
                match answer {
                    Ok(outcome) => {
                        assert!(!outcome.deduplicated);
                        claimed.push(stream.clone());
                    }
                    Err(AppendError::IdempotencyKeyReused {
                        first_stream,
                        stream: refused_stream,
                        ..
                    }) => {
                        assert_eq!(refused_stream.as_str(), stream);
                        refused.push((stream.clone(), first_stream.to_string()));
                    }
                    Err(other) => panic!("a reused key on {stream} answered {other}"),
                }
            }
            Ask::Any { .. } => {
                let outcome = answer.expect("an append at any version succeeds");
                shared_versions.extend(outcome.events.iter().map(|e| e.stream_version));
            }
        }
    }

    assert_eq!(winners.len(), 8, "every raced stream has a winner");
    assert!(winners.values().all(|&count| count == 1), "{winners:?}");
    for s in 0..8 {
        let version = store
            .stream_version(&stream(&format!("race-{s}")))
            .await
            .unwrap();
        assert_eq!(version, 2, "losers wrote nothing on race-{s}");
    }

    for (key, outcomes) in &repeats {
        let written: Vec<_> = outcomes.iter().filter(|o| !o.deduplicated).collect();
        assert_eq!(written.len(), 1, "one append with {key} writes");
        for outcome in outcomes {
            assert_eq!(
                outcome.events, written[0].events,
                "every repeat of {key} gets the first append's events"
            );
        }
        let name = &written[0].events[0].stream_id;
        assert_eq!(store.stream_version(name).await.unwrap(), 1);
    }

    for (key, (claimed, refused)) in &reuses {
        assert_eq!(claimed.len(), 1, "one stream claims {key}: {claimed:?}");
        assert_eq!(refused.len(), 1, "the other is refused: {refused:?}");
        assert_eq!(refused[0].1, claimed[0], "the refusal names the claimer");
        let refused_stream = stream(&refused[0].0);
        assert_eq!(store.stream_version(&refused_stream).await.unwrap(), 0);
    }

    shared_versions.sort_unstable();
    assert_eq!(
        shared_versions,
        (1..=40).collect::<Vec<u64>>(),
        "appends to one stream in one group see each other: dense versions"
    );
    assert!(
        transactions.values().any(|&appends| appends > 1),
        "some appends shared a transaction: {transactions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_event_id_fails_only_its_own_append() {
    let store = one_lane_store().await;
    let taken = Uuid::now_v7();
    store
        .append(AppendRequest::new(
            stream("first-1"),
            ExpectedVersion::Any,
            vec![event(0).with_event_id(taken)],
        ))
        .await
        .expect("the first use of the id");
    // Two appends that share a fresh id between them: only one can have it.
    let shared = Uuid::now_v7();

    let appends = 24;
    let start = Arc::new(Barrier::new(appends));
    let tasks: Vec<_> = (0..appends)
        .map(|n| {
            let store = Arc::clone(&store);
            let start = Arc::clone(&start);
            tokio::spawn(async move {
                let mut second = event(n);
                match n {
                    0 => second = second.with_event_id(taken),
                    1 | 2 => second = second.with_event_id(shared),
                    _ => {}
                }
                let request = AppendRequest::new(
                    stream(&format!("group-{n}")),
                    ExpectedVersion::NoStream,
                    vec![event(n), second],
                );
                start.wait().await;
                store.append(request).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("an append task"));
    }

    match &answers[0] {
        Err(AppendError::DuplicateEventId { event_id }) => assert_eq!(*event_id, taken),
        other => panic!("the append reusing a stored id answered {other:?}"),
    }
    let sharing: Vec<_> = answers[1..3].iter().collect();
    let refused: Vec<_> = sharing
        .iter()
        .filter(|answer| {
            matches!(answer, Err(AppendError::DuplicateEventId { event_id }) if *event_id == shared)
        })
        .collect();
    assert_eq!(refused.len(), 1, "one of the two sharing an id is refused");
    assert_eq!(
        sharing.iter().filter(|answer| answer.is_ok()).count(),
        1,
        "the other one is written"
    );
    for (n, answer) in answers.iter().enumerate().skip(3) {
        let outcome = answer
            .as_ref()
            .unwrap_or_else(|error| panic!("append {n} failed: {error}"));
        assert_eq!(outcome.last_version(), 2);
    }
    for (n, answer) in answers.iter().enumerate() {
        let version = store
            .stream_version(&stream(&format!("group-{n}")))
            .await
            .unwrap();
        let expected = if answer.is_ok() { 2 } else { 0 };
        assert_eq!(version, expected, "group-{n} holds what its answer says");
    }
}
