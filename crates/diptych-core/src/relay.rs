//! The outbox relay: the event log is the outbox.
//!
//! A relay follows the log from a durable checkpoint, publishes each page of
//! events to a broker, waits until the broker has acknowledged every one, and only
//! then moves its checkpoint. Nothing is published from the request path, so a
//! process that dies between committing an append and publishing it loses
//! nothing: the relay publishes it when it comes back. A relay killed after
//! publishing but before its checkpoint publishes that page again; every message
//! carries its event id, so the broker's duplicate window and the consumers'
//! dedupe absorb the repeat.
//!
//! The checkpoint lives in the view store as a projection without collections,
//! named after the publisher (`relay-nats`), so `diptych projections status` and
//! `GET /projections` show the relay's lag like any projection's.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::copies::is_copy;
use crate::envelope::{Position, RecordedEvent};
use crate::error::{BackendError, ViewError};
use crate::runner::RunnerHandle;
use crate::store::EventStore;
use crate::view::{Declaration, HandlerKind, ViewCommit, ViewStore};

/// Where a relay publishes: a broker and the way events map onto it.
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    /// The relay's name, under which its checkpoint is kept (`relay-nats`).
    fn name(&self) -> &str;

    /// Publishes the events in order and returns once the broker has
    /// acknowledged every one of them (publishing may be pipelined). An error
    /// means some may not have been: the relay publishes the whole page again.
    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BackendError>;
}

/// How a relay works.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The most events published before the checkpoint moves.
    pub page: usize,
    /// The wait after a failure to publish; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// The longest wait between two tries.
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            page: 500,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Starts a relay: registers its checkpoint (an error here is the caller's), then
/// publishes the log from there on, following it live.
pub async fn spawn_relay(
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
) -> Result<RunnerHandle, ViewError> {
    let record = views
        .register(&Declaration {
            name: publisher.name().to_owned(),
            kind: HandlerKind::Projection,
            collections: Vec::new(),
        })
        .await?;
    let (stop, stopped) = watch::channel(false);
    let relay = Relay {
        store,
        views,
        publisher,
        config,
        generation: record.generation,
        position: record.position,
    };
    let name = relay.publisher.name().to_owned();
    Ok(RunnerHandle::new(
        name,
        stop,
        tokio::spawn(relay.run(stopped)),
    ))
}

struct Relay {
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    generation: u64,
    position: Position,
}

impl Relay {
    async fn run(mut self, mut stopped: watch::Receiver<bool>) {
        let mut head = self.store.head_watch();
        let mut backoff = self.config.first_backoff;
        loop {
            if *stopped.borrow() {
                return;
            }
            match self.publish_next_page().await {
                Ok(true) => backoff = self.config.first_backoff,
                Ok(false) => {
                    tokio::select! {
                        changed = head.changed() => if changed.is_err() { return },
                        _ = stopped.changed() => return,
                    }
                }
                Err(RelayError::Checkpoint(ViewError::CheckpointMoved { actual, .. })) => {
                    // Another relay of the same name moved on: carry on from there.
                    tracing::warn!(relay = %self.publisher.name(), "another relay moved the checkpoint");
                    self.position = Position(actual);
                }
                Err(error) => {
                    tracing::warn!(%error, relay = %self.publisher.name(), "publishing failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stopped.changed() => return,
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Publishes the next page and moves the checkpoint past it; false when the
    /// log has nothing new.
    async fn publish_next_page(&mut self) -> Result<bool, RelayError> {
        let page = self.store.read_all(self.position, self.config.page).await?;
        let Some(last) = page.last().map(|event| event.position) else {
            return Ok(false);
        };
        // Copies of other services' streams are theirs to publish.
        if page.iter().any(is_copy) {
            let own: Vec<RecordedEvent> = page
                .iter()
                .filter(|event| !is_copy(event))
                .cloned()
                .collect();
            if !own.is_empty() {
                self.publisher.publish(&own).await?;
            }
        } else {
            self.publisher.publish(&page).await?;
        }
        self.views
            .commit(ViewCommit::new(
                self.publisher.name(),
                self.generation,
                self.position,
                last,
            ))
            .await?;
        self.position = last;
        Ok(true)
    }
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Read(#[from] crate::error::ReadError),
    #[error(transparent)]
    Publish(#[from] BackendError),
    #[error(transparent)]
    Checkpoint(#[from] ViewError),
}
