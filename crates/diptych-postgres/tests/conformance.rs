//! The backend conformance suite, run against PostgreSQL: one fresh schema per
//! check, and the store reconnected for the durability check.

use std::sync::Arc;

use diptych_core::EventStore;
use diptych_core::testkit::Fixture;
use diptych_postgres::{PgStore, testing};

async fn fresh_store() -> Fixture {
    let config = testing::fresh_config().await;
    let store = PgStore::connect(&config)
        .await
        .expect("a fresh store opens");
    Fixture::new(Arc::new(store)).with_reopen(move || {
        let config = config.clone();
        async move {
            let store = PgStore::connect(&config).await.expect("the store reopens");
            Arc::new(store) as Arc<dyn EventStore>
        }
    })
}

diptych_core::event_store_conformance!(fresh_store, reopenable);
