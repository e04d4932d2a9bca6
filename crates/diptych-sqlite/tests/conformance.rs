//! The backend conformance suite, run against SQLite: one fresh file per check,
//! and the file reopened for the durability check.

use std::sync::Arc;

use diptych_core::EventStore;
use diptych_core::testkit::Fixture;
use diptych_sqlite::SqliteStore;

async fn fresh_store() -> Fixture {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let path = directory.path().join("events.db");
    let store = SqliteStore::open(&path).expect("a fresh store opens");
    Fixture::new(Arc::new(store))
        .with_reopen(move || {
            let path = path.clone();
            async move {
                let store = SqliteStore::open(&path).expect("the store reopens");
                Arc::new(store) as Arc<dyn EventStore>
            }
        })
        .with_guard(directory)
}

diptych_core::event_store_conformance!(fresh_store, reopenable);
