//! The view store and projection suite against PostgreSQL: events and views in
//! one fresh schema per check.

use std::sync::Arc;

use diptych_core::testkit::ViewFixture;
use diptych_postgres::{PgStore, PgViews, testing};

async fn fresh_stores() -> ViewFixture {
    let config = testing::fresh_config().await;
    let store = PgStore::connect(&config).await.expect("an event store");
    let views = PgViews::connect(&config).await.expect("a view store");
    ViewFixture::new(Arc::new(store), Arc::new(views))
}

diptych_core::view_store_conformance!(fresh_stores);
