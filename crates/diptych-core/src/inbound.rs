//! Applying another service's events, received from a broker, to a local
//! projection exactly once, whatever the broker redelivers.
//!
//! A broker consumer hands each batch of received envelopes to
//! [`InboundProjection::apply`] and acknowledges the messages only when it
//! returns `Ok`. The batch's new events are applied through a [`ViewTx`] and
//! committed with their ids (`ViewCommit::received`), which the view store
//! records in the same transaction; events already recorded are skipped, so a
//! redelivery (a crash between commit and acknowledgement, a lost ack) changes
//! nothing. The projection's checkpoint is the source's log position of the
//! newest event applied, so a consistency token from the source service can be
//! waited on here.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, Mutex};

use crate::envelope::{Position, RecordedEvent, Timestamp};
use crate::error::{BackendError, ViewError};
use crate::projection::{Projection, ViewTx};
use crate::view::{Declaration, HandlerKind, ViewCommit, ViewStore};

/// What one batch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    /// Events applied for the first time.
    pub applied: usize,
    /// Events found among those already applied (redeliveries).
    pub redelivered: usize,
}

/// A local projection fed by a broker.
pub struct InboundProjection {
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    declaration: Declaration,
    generation: u64,
    position: Position,
    /// The failure recorded as the projection's stall, if any.
    stalled: Option<String>,
}

impl InboundProjection {
    /// Registers `projection` (an error here is the caller's) and reads where it is.
    pub async fn register(
        views: Arc<dyn ViewStore>,
        projection: Arc<dyn Projection>,
    ) -> Result<Self, ViewError> {
        let declaration = Declaration {
            name: projection.name().to_owned(),
            kind: HandlerKind::Inbound,
            collections: projection.collections(),
        };
        let record = views.register(&declaration).await?;
        Ok(Self {
            views,
            projection,
            declaration,
            generation: record.generation,
            position: record.position,
            stalled: record.stalled,
        })
    }

    /// The projection's name.
    pub fn name(&self) -> &str {
        &self.declaration.name
    }

    /// Records how many messages the broker still holds for this consumer
    /// after the last batch, for its lag in [`crate::projection_status`].
    pub fn report_pending(&self, pending: u64) {
        record(&*self.views, self.name(), |stats| stats.pending = pending);
    }

    /// Records that the consumer is failing with `error` (a batch that does
    /// not apply, a broker it cannot reach) and retrying: the projection shows
    /// as stalled, in every process sharing the view store, until a batch
    /// goes through.
    pub async fn report_failure(&mut self, error: &(dyn std::fmt::Display + Sync)) {
        let error = error.to_string();
        if self.stalled.as_ref() == Some(&error) {
            return;
        }
        match self
            .views
            .set_stalled(self.name(), Some(error.clone()))
            .await
        {
            Ok(()) => self.stalled = Some(error),
            Err(stored) => tracing::warn!(%stored, "could not record a stalled consumer"),
        }
    }

    /// Clears a stall recorded by [`InboundProjection::report_failure`].
    async fn recovered(&mut self) {
        if self.stalled.is_some() && self.views.set_stalled(self.name(), None).await.is_ok() {
            self.stalled = None;
        }
    }

    /// Applies the events of a batch not applied before and commits them with
    /// their ids. Acknowledge the batch's messages only after `Ok`; after an
    /// error, let the broker redeliver them.
    pub async fn apply(&mut self, events: &[RecordedEvent]) -> Result<Received, BackendError> {
        let ids: Vec<_> = events.iter().map(|event| event.event_id).collect();
        let seen = self.views.received(self.name(), &ids).await.map_err(view)?;
        let mut tx = ViewTx::new(
            Arc::clone(&self.views),
            self.generation,
            &self.declaration.collections,
        );
        let interest = self.projection.interest();
        let mut received = Vec::new();
        let mut checkpoint = self.position;
        // A batch can hold one event twice (republished after the broker's
        // duplicate window): the second is a redelivery too.
        let mut in_batch = std::collections::HashSet::new();
        for event in events {
            if seen.contains(&event.event_id) {
                continue;
            }
            if !in_batch.insert(event.event_id) {
                continue;
            }
            if interest.wants(event) {
                self.projection
                    .apply(event, &mut tx)
                    .await
                    .map_err(|error| {
                        BackendError::with_source("applying a received event", error)
                    })?;
            }
            received.push(event.event_id);
            checkpoint = checkpoint.max(event.position);
        }
        let outcome = Received {
            applied: received.len(),
            redelivered: events.len() - received.len(),
        };
        if !received.is_empty() {
            let mut commit =
                ViewCommit::new(self.name(), self.generation, self.position, checkpoint);
            commit.changes = tx.into_changes();
            commit.received = received;
            match self.views.commit(commit).await {
                Ok(()) => self.position = checkpoint,
                Err(ViewError::CheckpointMoved { actual, .. }) => {
                    // Another consumer of the same projection committed: carry
                    // on from there; the redelivery sorts out what it applied.
                    self.position = Position(actual);
                    return Err(BackendError::msg("another consumer moved the checkpoint"));
                }
                Err(error) => return Err(view(error)),
            }
        }
        record(&*self.views, self.name(), |stats| {
            stats.received += (outcome.applied + outcome.redelivered) as u64;
            stats.redelivered += outcome.redelivered as u64;
            if let Some(newest) = events.iter().map(|event| event.recorded_at).max() {
                stats.newest_received_at = Some(newest);
            }
        });
        self.recovered().await;
        Ok(outcome)
    }
}

impl Drop for InboundProjection {
    /// A consumer that stops takes its figures with it (another process may
    /// take over, and a view store at the same address later is another).
    fn drop(&mut self) {
        STATS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&key(&*self.views, self.name()));
    }
}

/// What this process's consumer of an inbound projection has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct InboundStats {
    /// Messages the broker held for it after its last batch: its lag in events.
    pub pending: u64,
    /// Messages received, first deliveries and redeliveries.
    pub received: u64,
    /// Messages received again after being applied (a crash between commit
    /// and acknowledgement, a lost acknowledgement); each changed nothing.
    pub redelivered: u64,
    /// When the source recorded the newest event received.
    #[serde(skip)]
    pub newest_received_at: Option<Timestamp>,
}

impl InboundStats {
    /// How far behind the source it is, in milliseconds: the age of the newest
    /// event received while more wait at the broker, else 0.
    pub fn lag_ms(&self) -> u64 {
        match (self.pending, self.newest_received_at) {
            (0, _) | (_, None) => 0,
            (_, Some(newest)) => {
                let age_us = Timestamp::now().as_unix_micros() - newest.as_unix_micros();
                u64::try_from(age_us / 1000).unwrap_or(0)
            }
        }
    }
}

/// Consumers' stats, by view store (its address: each process keeps one per
/// store, and tests run several side by side) and projection.
type Stats = BTreeMap<(usize, String), InboundStats>;

static STATS: LazyLock<Mutex<Stats>> = LazyLock::new(Mutex::default);

fn key(views: &dyn ViewStore, projection: &str) -> (usize, String) {
    let address = std::ptr::from_ref(views).cast::<()>() as usize;
    (address, projection.to_owned())
}

fn record(views: &dyn ViewStore, projection: &str, change: impl FnOnce(&mut InboundStats)) {
    let mut stats = STATS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    change(stats.entry(key(views, projection)).or_default());
}

/// What this process's consumer of `projection` on `views` has seen, if one
/// runs here.
pub fn inbound_stats(views: &dyn ViewStore, projection: &str) -> Option<InboundStats> {
    STATS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(&key(views, projection))
        .cloned()
}

fn view(error: ViewError) -> BackendError {
    BackendError::with_source("the view store", error)
}
