//! The runner's own lifecycle, on the in-memory stores.

use std::sync::Arc;
use std::time::Duration;

use diptych_core::testkit::{Tallies, added, append_one, run_tallies};
use diptych_core::{EventStore, MemoryStore, MemoryViews, ViewStore, WaitError, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_handle_stops_the_runner() {
    let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    let first = append_one(&*store, "stock-1", added("apple", 1)).await;
    wait_for(&*views, "tallies", first, Duration::from_secs(30))
        .await
        .expect("applied while running");
    drop(runner);
    // Let the runner see the dropped handle and leave its loop.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = append_one(&*store, "stock-1", added("apple", 1)).await;
    assert!(matches!(
        wait_for(&*views, "tallies", second, Duration::from_millis(200)).await,
        Err(WaitError::Timeout { .. })
    ));
}
