//! The view store and projection suite against SQLite: events and views in two
//! files of one fresh directory per check.

use std::sync::Arc;

use diptych_core::testkit::ViewFixture;
use diptych_sqlite::{SqliteStore, SqliteViews};

async fn fresh_stores() -> ViewFixture {
    let directory = tempfile::tempdir().expect("a temporary directory");
    let store = SqliteStore::open(directory.path().join("events.db")).expect("an event store");
    let views = SqliteViews::open(directory.path().join("views.db")).expect("a view store");
    ViewFixture::new(Arc::new(store), Arc::new(views)).with_guard(directory)
}

diptych_core::view_store_conformance!(fresh_stores);
