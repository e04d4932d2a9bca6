//! Opening files: diptych's own, a stranger's, a newer diptych's. A refused file is
//! never written to.

use std::path::Path;

use diptych_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId, StreamRead};
use diptych_sqlite::{OpenError, SCHEMA_VERSION, SqliteStore};
use serde_json::json;

fn file_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();

    let error = SqliteStore::open(&path)
        .err()
        .expect("garbage must be refused");

    assert!(
        matches!(error, OpenError::NotDiptychDatabase { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains("not an SQLite database"),
        "{error}"
    );
    assert_eq!(file_bytes(&path), garbage);
}

#[test]
fn another_applications_sqlite_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.db");
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch(
                "CREATE TABLE invoices (id INTEGER PRIMARY KEY); INSERT INTO invoices VALUES (1);",
            )
            .unwrap();
    }
    let before = file_bytes(&path);

    let error = SqliteStore::open(&path)
        .err()
        .expect("a foreign database must be refused");

    assert!(
        matches!(error, OpenError::NotDiptychDatabase { .. }),
        "{error}"
    );
    assert_eq!(file_bytes(&path), before);
    assert!(
        !dir.path().join("other.db-wal").exists(),
        "no WAL may be created"
    );
}

#[test]
fn a_database_from_a_newer_diptych_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    drop(SqliteStore::open(&path).unwrap());
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection
            .execute_batch(&format!(
                "PRAGMA user_version = {}; PRAGMA wal_checkpoint(TRUNCATE); PRAGMA journal_mode = DELETE;",
                SCHEMA_VERSION + 1
            ))
            .unwrap();
    }
    let before = file_bytes(&path);

    let error = SqliteStore::open(&path)
        .err()
        .expect("a newer schema must be refused");

    match &error {
        OpenError::NewerSchema {
            found, supported, ..
        } => {
            assert_eq!(*found, SCHEMA_VERSION + 1);
            assert_eq!(*supported, SCHEMA_VERSION);
        }
        other => panic!("expected NewerSchema, got {other}"),
    }
    assert!(error.to_string().contains("upgrade diptych"), "{error}");
    assert_eq!(file_bytes(&path), before);
}

#[test]
fn a_path_that_cannot_be_a_database_file_is_a_backend_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let error = SqliteStore::open(dir.path())
        .err()
        .expect("a directory is not a file");
    assert!(matches!(error, OpenError::Backend(_)), "{error}");
    assert!(
        error.to_string().contains("could not open the store"),
        "{error}"
    );
}

/// Opens the store at `path` and appends one order to `order-1`.
async fn store_with_one_order(path: &Path) -> SqliteStore {
    let store = SqliteStore::open(path).unwrap();
    let events = vec![NewEvent::new("OrderPlaced", json!({"total_cents": 1250}))];
    let stream = StreamId::new("order-1").unwrap();
    let request = AppendRequest::new(stream, ExpectedVersion::NoStream, events);
    store.append(request).await.unwrap();
    store
}

#[tokio::test]
async fn missing_parent_directories_are_created_and_the_store_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/store.db");
    drop(store_with_one_order(&path).await);

    let store = SqliteStore::open(&path).unwrap();
    let stream = StreamId::new("order-1").unwrap();
    let events = store
        .read_stream(StreamRead::forward(stream, 1, 10))
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].payload, json!({"total_cents": 1250}));
    assert_eq!(*store.head_watch().borrow(), diptych_core::Position(1));
}

/// Writes one event, then damages a column behind the store's back.
async fn store_with_damaged(column_update: &str) -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let store = store_with_one_order(&path).await;
        let stream = StreamId::new("order-1").unwrap();
        store
            .save_snapshot(diptych_core::Snapshot {
                stream,
                version: 1,
                state_version: 1,
                state: json!({}),
                taken_at: diptych_core::Timestamp::now(),
            })
            .await
            .unwrap();
    }
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(column_update)
        .unwrap();
    let store = SqliteStore::open(&path).unwrap();
    (dir, store)
}

#[tokio::test]
async fn a_corrupt_event_row_is_a_backend_error_naming_its_position() {
    let (_dir, store) =
        store_with_damaged("UPDATE events SET payload = '{not json' WHERE position = 1").await;

    let error = store
        .read_all(diptych_core::Position::START, 10)
        .await
        .unwrap_err();

    assert!(
        matches!(error, diptych_core::ReadError::Backend(_)),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("position 1 is corrupt"), "{message}");
    assert!(message.contains("payload is not JSON"), "{message}");
}

#[tokio::test]
async fn a_corrupt_snapshot_is_a_backend_error_naming_its_stream() {
    let (_dir, store) = store_with_damaged("UPDATE snapshots SET state = 'garbage'").await;

    let error = store
        .load_snapshot(&StreamId::new("order-1").unwrap())
        .await
        .unwrap_err();

    assert!(
        matches!(error, diptych_core::SnapshotError::Backend(_)),
        "{error:?}"
    );
    assert!(
        error
            .to_string()
            .contains("snapshot of `order-1` is corrupt"),
        "{error}"
    );
}
