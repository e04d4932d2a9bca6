//! Watches fed by PostgreSQL notifications, so a commit or an operator's request
//! in one process wakes waiters in every other one without polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use diptych_core::backend_kit::CheckpointWatches;
use diptych_core::{Position, ViewError};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::errors::failure as backend;
use crate::database::Database;

/// The topic notified when a served checkpoint moves (payload: the projection).
pub(crate) const CHECKPOINTS: &str = "checkpoints";
/// The topic notified after an operator's request or a runner's report.
pub(crate) const CONTROLS: &str = "controls";

/// The watches of one view store, shared with the task that follows the
/// notifications.
#[derive(Default)]
pub(crate) struct Watches {
    checkpoints: CheckpointWatches,
    /// The last checkpoint published per projection, so re-reads publish only
    /// what moved (a published value wakes every waiter, even if unchanged).
    published: Mutex<HashMap<String, Position>>,
    controls: watch::Sender<u64>,
    /// Asks the follower to re-read the checkpoints now.
    refresh: Notify,
}

impl Watches {
    /// A receiver of a projection's served checkpoint. The first watcher of a
    /// projection whose checkpoint was never read starts at 0 and is moved as
    /// soon as the follower has read it (this method cannot wait for a read).
    pub fn checkpoint(&self, projection: &str) -> watch::Receiver<Position> {
        let known = self.lock().get(projection).copied();
        if known.is_none() {
            self.refresh.notify_one();
        }
        self.checkpoints
            .subscribe(projection, || known.unwrap_or(Position::START))
    }

    /// Publishes a checkpoint this process committed.
    pub fn committed(&self, projection: &str, position: Position) {
        let mut published = self.lock();
        published.insert(projection.to_owned(), position);
        self.checkpoints.publish(projection, position);
    }

    /// Publishes a checkpoint read back, if it is ahead of what was published:
    /// a read racing a local commit must not move the watch back.
    fn read(&self, projection: &str, position: Position) {
        let mut published = self.lock();
        if published
            .get(projection)
            .is_some_and(|known| *known >= position)
        {
            return;
        }
        published.insert(projection.to_owned(), position);
        self.checkpoints.publish(projection, position);
    }

    /// Bumps the control watch.
    pub fn control(&self) {
        self.controls.send_modify(|count| *count += 1);
    }

    /// A receiver of the control watch.
    pub fn controls(&self) -> watch::Receiver<u64> {
        self.controls.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Position>> {
        self.published
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Follows the notifications until aborted.
pub(crate) fn spawn_follower(database: Arc<Database>, watches: Arc<Watches>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut checkpoints = database.wakes(CHECKPOINTS);
        let mut controls = database.wakes(CONTROLS);
        loop {
            tokio::select! {
                changed = checkpoints.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    checkpoints.borrow_and_update();
                }
                changed = controls.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    controls.borrow_and_update();
                    watches.control();
                    continue;
                }
                () = watches.refresh.notified() => {}
            }
            if let Err(error) = read_checkpoints(&database, &watches).await {
                tracing::warn!(%error, "could not re-read the served checkpoints");
                // `wait_for` re-reads on its own meanwhile; try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                watches.refresh.notify_one();
            }
        }
    })
}

/// Reads every projection's served checkpoint and publishes those that moved.
async fn read_checkpoints(database: &Database, watches: &Watches) -> Result<(), ViewError> {
    let client = database.connection("reading checkpoints").await?;
    let rows = client
        .query(
            "SELECT p.name, c.position FROM projections p
             JOIN checkpoints c ON c.projection = p.name AND c.generation = p.generation",
            &[],
        )
        .await
        .map_err(|error| backend("reading checkpoints", error))?;
    for row in rows {
        let name: String = row.get(0);
        let position: i64 = row.get(1);
        watches.read(&name, Position(position as u64));
    }
    Ok(())
}
