//! Invariant 4, as far as a test can reach it: what a store acknowledged is still
//! there, exactly, after the store is closed and opened again. (Surviving a crash
//! of the process is each backend's own test; see the SQLite crash test.)

use serde_json::json;

use super::{Fixture, append_ok, find_idempotent, numbered_events, read_whole_log, stream};
use crate::envelope::{Position, Timestamp};
use crate::store::{AppendRequest, ExpectedVersion, Snapshot};

/// Appends, a keyed append and a snapshot are all there after a reopen, the log
/// identical to the last byte and time, and the store carries on from them.
pub async fn acknowledged_writes_survive_reopening(mut fixture: Fixture) {
    let store = fixture.store();
    let first = append_ok(
        &*store,
        AppendRequest::new(
            stream("durable-1"),
            ExpectedVersion::NoStream,
            numbered_events(1, 3),
        )
        .with_idempotency_key("durable-key"),
    )
    .await;
    append_ok(
        &*store,
        AppendRequest::new(
            stream("durable-2"),
            ExpectedVersion::Any,
            numbered_events(4, 2),
        ),
    )
    .await;
    let snapshot = Snapshot {
        stream: stream("durable-1"),
        version: 3,
        state_version: 2,
        state: json!({"kept": true}),
        taken_at: Timestamp::from_unix_micros(1_700_000_000_000_000),
    };
    store
        .save_snapshot(snapshot.clone())
        .await
        .expect("save_snapshot");
    let log = read_whole_log(&*store).await;
    let head = store.head().await.expect("head");
    drop(store);

    fixture.reopen_store().await;
    let store = fixture.store();

    assert_eq!(
        read_whole_log(&*store).await,
        log,
        "the log must read back exactly after a reopen"
    );
    assert_eq!(
        store.head().await.expect("head"),
        head,
        "the head must survive"
    );
    let repeat = find_idempotent(&*store, "durable-key").await;
    assert_eq!(
        repeat.map(|outcome| outcome.events),
        Some(first.events),
        "an idempotency key must survive a reopen"
    );
    assert_eq!(
        store
            .load_snapshot(&stream("durable-1"))
            .await
            .expect("load_snapshot"),
        Some(snapshot),
        "a snapshot must survive a reopen"
    );
    let next = append_ok(
        &*store,
        AppendRequest::new(
            stream("durable-1"),
            ExpectedVersion::Exact(3),
            numbered_events(6, 1),
        ),
    )
    .await;
    assert_eq!(
        next.last_version(),
        4,
        "versions go on from where they were"
    );
    assert!(
        next.last_position() > head && head > Position::START,
        "positions go on after the old head"
    );
}
