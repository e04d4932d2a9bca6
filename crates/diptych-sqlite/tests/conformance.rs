//! The backend conformance suite, run against SQLite: one fresh file per check.

use std::sync::Arc;

use diptych_core::testkit::Fixture;
use diptych_sqlite::SqliteStore;

async fn fresh_store() -> Fixture {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(directory.path().join("events.db")).expect("a fresh store opens");
    Fixture::new(Arc::new(store)).with_guard(directory)
}

diptych_core::event_store_conformance!(fresh_store);
