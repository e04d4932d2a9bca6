//! Two processes' repositories on one PostgreSQL database: each has its own
//! store (connections, head watch) and its own aggregate cache, and each must
//! see the other's events.

use std::sync::Arc;

use diptych_core::EventStore;
use diptych_core::testkit::repository_caches_follow_writers_of_another_store;
use diptych_postgres::{PgStore, testing};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cached_aggregates_follow_the_other_process_writes() {
    let config = testing::fresh_config().await;
    let one: Arc<dyn EventStore> = Arc::new(PgStore::connect(&config).await.expect("opens"));
    let other: Arc<dyn EventStore> = Arc::new(PgStore::connect(&config).await.expect("opens"));
    repository_caches_follow_writers_of_another_store(one, other).await;
}
