//! Inbound: another service's events, received from JetStream, applied to a
//! local projection exactly once.
//!
//! A durable pull consumer with explicit acknowledgement delivers the source
//! service's messages. Each batch is applied through a [`ViewTx`] and committed
//! with the ids of the events it applied (`ViewCommit::received`), so the view
//! store records them in the same transaction as the view change; messages are
//! acknowledged only after that commit. A message redelivered (the consumer died
//! between commit and acknowledgement, or the acknowledgement was lost) is found
//! among the received ids and acknowledged without being applied again.
//!
//! The projection's checkpoint is the source's log position of the newest event
//! applied, so a consistency token from the source service's command works here
//! too: `wait_for(views, view, token)` waits until this service has it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use diptych_core::{
    BackendError, Declaration, HandlerKind, Position, Projection, RecordedEvent, ViewCommit,
    ViewError, ViewStore, ViewTx,
};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::subjects::{stream_name, subjects_of};

/// Where the events come from and how they are pulled.
#[derive(Clone, Debug)]
pub struct InboundConfig {
    /// The server, such as `nats://127.0.0.1:4222`.
    pub url: String,
    /// The service whose events are applied.
    pub source: String,
    /// The durable consumer's name: one per receiving service and projection.
    pub durable: String,
    /// The most messages applied in one batch.
    pub batch: usize,
}

/// A running inbound consumer; [`Inbound::stop`] stops it after its batch.
pub struct Inbound {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Inbound {
    /// Stops after the current batch and waits.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Registers `projection` and starts applying `config.source`'s events to it.
pub async fn spawn_inbound(
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    config: InboundConfig,
) -> Result<Inbound, BackendError> {
    let declaration = Declaration {
        name: projection.name().to_owned(),
        kind: HandlerKind::Projection,
        collections: projection.collections(),
    };
    let record = views
        .register(&declaration)
        .await
        .map_err(|error| BackendError::with_source("registering an inbound projection", error))?;
    let client = async_nats::connect(&config.url).await.map_err(|error| {
        BackendError::with_source(format!("connecting to NATS at {}", config.url), error)
    })?;
    let stream = jetstream::new(client)
        .get_stream(stream_name(&config.source))
        .await
        .map_err(|error| {
            BackendError::with_source(
                format!(
                    "finding the JetStream stream of `{}` (has its relay run yet?)",
                    config.source
                ),
                error,
            )
        })?;
    let consumer = stream
        .get_or_create_consumer(
            &config.durable,
            consumer::pull::Config {
                durable_name: Some(config.durable.clone()),
                filter_subject: subjects_of(&config.source),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .map_err(|error| BackendError::with_source("creating the durable consumer", error))?;
    let (stop, stopped) = watch::channel(false);
    let applier = Applier {
        views,
        projection,
        declaration,
        generation: record.generation,
        position: record.position,
        batch: config.batch.max(1),
    };
    Ok(Inbound {
        stop,
        task: tokio::spawn(applier.run(consumer, stopped)),
    })
}

struct Applier {
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    declaration: Declaration,
    generation: u64,
    position: Position,
    batch: usize,
}

impl Applier {
    async fn run(
        mut self,
        consumer: consumer::Consumer<consumer::pull::Config>,
        stopped: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(50);
        while !*stopped.borrow() {
            let fetched = consumer
                .fetch()
                .max_messages(self.batch)
                .expires(Duration::from_millis(500))
                .messages()
                .await;
            let mut messages = match fetched {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(%error, "fetching from JetStream failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            let mut batch = Vec::new();
            while let Some(Ok(message)) = messages.next().await {
                batch.push(message);
            }
            if batch.is_empty() {
                continue;
            }
            match self.apply(&batch).await {
                Ok(()) => {
                    backoff = Duration::from_millis(50);
                    for message in &batch {
                        if let Err(error) = message.ack().await {
                            // Redelivered later, and then skipped as received.
                            tracing::warn!(%error, "acknowledging a message failed");
                        }
                    }
                }
                Err(error) => {
                    // Not acknowledged: JetStream redelivers the batch.
                    tracing::warn!(%error, projection = %self.declaration.name, "applying received events failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Applies the batch's events not yet received and commits them with their
    /// ids and the newest source position.
    async fn apply(&mut self, batch: &[jetstream::Message]) -> Result<(), BackendError> {
        let events = batch
            .iter()
            .map(|message| serde_json::from_slice::<RecordedEvent>(&message.payload))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| {
                BackendError::with_source("a message is not a diptych envelope", error)
            })?;
        let ids: Vec<_> = events.iter().map(|event| event.event_id).collect();
        let seen = self
            .views
            .received(&self.declaration.name, &ids)
            .await
            .map_err(view)?;
        let name = self.declaration.name.clone();
        metrics::counter!("diptych_inbound_received_total", "projection" => name.clone())
            .increment(ids.len() as u64);
        // Messages applied before (a crash between commit and ack, a lost ack).
        metrics::counter!("diptych_inbound_redeliveries_total", "projection" => name)
            .increment(seen.len() as u64);
        let mut tx = ViewTx::new(
            Arc::clone(&self.views),
            self.generation,
            &self.declaration.collections,
        );
        let interest = self.projection.interest();
        let mut received = Vec::new();
        let mut checkpoint = self.position;
        for event in events
            .iter()
            .filter(|event| !seen.contains(&event.event_id))
        {
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
        if received.is_empty() {
            return Ok(());
        }
        let mut commit = ViewCommit::new(
            &self.declaration.name,
            self.generation,
            self.position,
            checkpoint,
        );
        commit.changes = tx.into_changes();
        commit.received = received;
        match self.views.commit(commit).await {
            Ok(()) => {
                self.position = checkpoint;
                Ok(())
            }
            Err(ViewError::CheckpointMoved { actual, .. }) => {
                // Another consumer of the same projection committed: carry on
                // from there, and let the redelivery sort out what it applied.
                self.position = Position(actual);
                Err(BackendError::msg("another consumer moved the checkpoint"))
            }
            Err(error) => Err(view(error)),
        }
    }
}

fn view(error: ViewError) -> BackendError {
    BackendError::with_source("the view store", error)
}
