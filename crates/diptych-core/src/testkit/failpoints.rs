//! A view store that ends its process right after a commit of received
//! events, before the caller can acknowledge them to the broker: the window in
//! which a consumer dies "between commit and ack".

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::envelope::Position;
use crate::error::ViewError;
use crate::view::{
    Control, Declaration, Document, Page, ParkedEvent, ProjectionRecord, Query, RebuildProgress,
    ViewCommit, ViewStore,
};

/// The exit code of a process ended by [`ExitAfterReceivedCommits`].
pub const EXITED_AFTER_COMMIT: i32 = 86;

/// Delegates to a view store, and exits the process with
/// [`EXITED_AFTER_COMMIT`] as soon as the `n`-th commit carrying received ids
/// has succeeded.
pub struct ExitAfterReceivedCommits {
    inner: Arc<dyn ViewStore>,
    left: AtomicUsize,
}

impl ExitAfterReceivedCommits {
    /// Exits after `n` (at least 1) commits of received events through `inner`.
    pub fn new(inner: Arc<dyn ViewStore>, n: usize) -> Self {
        Self {
            inner,
            left: AtomicUsize::new(n.max(1)),
        }
    }
}

#[async_trait]
impl ViewStore for ExitAfterReceivedCommits {
    async fn register(&self, declaration: &Declaration) -> Result<ProjectionRecord, ViewError> {
        self.inner.register(declaration).await
    }

    async fn projections(&self) -> Result<Vec<ProjectionRecord>, ViewError> {
        self.inner.projections().await
    }

    async fn projection(&self, projection: &str) -> Result<ProjectionRecord, ViewError> {
        self.inner.projection(projection).await
    }

    async fn owner_of(&self, collection: &str) -> Result<String, ViewError> {
        self.inner.owner_of(collection).await
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Document>, ViewError> {
        self.inner.get(collection, key).await
    }

    async fn get_in(
        &self,
        collection: &str,
        generation: u64,
        key: &str,
    ) -> Result<Option<Document>, ViewError> {
        self.inner.get_in(collection, generation, key).await
    }

    async fn query(&self, collection: &str, query: &Query) -> Result<Page, ViewError> {
        self.inner.query(collection, query).await
    }

    async fn commit(&self, commit: ViewCommit) -> Result<(), ViewError> {
        let received = !commit.received.is_empty();
        self.inner.commit(commit).await?;
        if received && self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Committed, not acknowledged: the broker delivers it again.
            std::process::exit(EXITED_AFTER_COMMIT);
        }
        Ok(())
    }

    async fn begin_rebuild(&self, projection: &str) -> Result<RebuildProgress, ViewError> {
        self.inner.begin_rebuild(projection).await
    }

    async fn control(&self, projection: &str, control: Control) -> Result<(), ViewError> {
        self.inner.control(projection, control).await
    }

    async fn set_stalled(&self, projection: &str, error: Option<String>) -> Result<(), ViewError> {
        self.inner.set_stalled(projection, error).await
    }

    async fn parked(&self, projection: &str) -> Result<Vec<ParkedEvent>, ViewError> {
        self.inner.parked(projection).await
    }

    async fn received(
        &self,
        projection: &str,
        event_ids: &[uuid::Uuid],
    ) -> Result<Vec<uuid::Uuid>, ViewError> {
        self.inner.received(projection, event_ids).await
    }

    fn checkpoint_watch(&self, projection: &str) -> watch::Receiver<Position> {
        self.inner.checkpoint_watch(projection)
    }

    fn control_watch(&self) -> watch::Receiver<u64> {
        self.inner.control_watch()
    }
}

/// Runs `child` (a consumer process wrapped in [`ExitAfterReceivedCommits`])
/// to its end and checks it ended in the window between commit and
/// acknowledgement, not some other way. Panics after `within`.
pub fn expect_exit_after_commit(mut child: std::process::Child, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        match child.try_wait().expect("the consumer's status") {
            Some(status) => {
                assert_eq!(
                    status.code(),
                    Some(EXITED_AFTER_COMMIT),
                    "the consumer ended right after a commit, before acknowledging"
                );
                return;
            }
            None if std::time::Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the consumer did not commit received events within {within:?}");
            }
            None => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}
