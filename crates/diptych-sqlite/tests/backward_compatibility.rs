//! Files written by earlier versions of diptych keep opening and reading the same.
//!
//! `fixtures/schema-v1.db` was written by the first release of the schema: one
//! stream `order-42` with two events (one with metadata), an idempotency key and a
//! snapshot. When the schema changes, the migration must bring this file forward
//! and every assertion here must still hold. Add a fixture per schema version.

use diptych_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, Position, StreamId, StreamRead,
};
use diptych_sqlite::SqliteStore;
use serde_json::json;

/// Opens a copy: opening migrates and switches to WAL, which would change the
/// committed file.
fn open_copy_of(fixture: &str) -> (tempfile::TempDir, SqliteStore) {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let directory = tempfile::tempdir().unwrap();
    let copy = directory.path().join(fixture);
    std::fs::copy(&source, &copy).unwrap();
    let store = SqliteStore::open(&copy).unwrap();
    (directory, store)
}

#[tokio::test]
async fn a_schema_v1_file_reads_as_written_and_takes_new_appends() {
    let (_directory, store) = open_copy_of("schema-v1.db");
    let stream = StreamId::new("order-42").unwrap();

    let events = store
        .read_stream(StreamRead::forward(stream.clone(), 1, 10))
        .await
        .unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].event_type, "OrderPlaced");
    assert_eq!(
        events[0].payload,
        json!({"order_id": "42", "total_cents": 2598})
    );
    assert_eq!(
        events[0].event_id.to_string(),
        "0193a1c2-7f55-7000-8000-00000000000a"
    );
    assert_eq!(events[0].metadata.extra["tenant"], "acme");
    assert_eq!(
        events[0]
            .metadata
            .command_id
            .map(|id| id.to_string())
            .as_deref(),
        Some("0193a1c2-7f55-7000-8000-000000000001")
    );
    assert_eq!(events[1].event_type, "OrderConfirmed");
    assert_eq!(events[1].payload, json!(null));
    assert_eq!(
        (events[1].stream_version, events[1].position),
        (2, Position(2))
    );

    let first = store.find_idempotent_append("place-42").await.unwrap();
    assert_eq!(first.map(|outcome| outcome.events), Some(events));
    let snapshot = store.load_snapshot(&stream).await.unwrap().unwrap();
    assert_eq!(snapshot.state, json!({"status": "confirmed"}));

    let outcome = store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::Exact(2),
            vec![NewEvent::new("OrderShipped", json!({}))],
        ))
        .await
        .unwrap();
    assert_eq!(
        (outcome.last_version(), outcome.last_position()),
        (3, Position(3))
    );
}
