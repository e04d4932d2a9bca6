//! Inbound over JetStream: a durable pull consumer with explicit
//! acknowledgement feeds another service's events to a local projection through
//! core's [`InboundProjection`], which applies each event once and records its
//! id with the view change; messages are acknowledged only after that commit.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use diptych_core::{
    BackendError, InboundProjection, Projection, Received, RecordedEvent, RunnerHandle, ViewStore,
};
use futures_util::StreamExt;
use tokio::sync::watch;

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

/// Registers `projection` and starts applying `config.source`'s events to it.
pub async fn spawn_inbound(
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    config: InboundConfig,
) -> Result<RunnerHandle, BackendError> {
    let inbound = InboundProjection::register(views, projection)
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
    let name = inbound.name().to_owned();
    let task = tokio::spawn(run(inbound, consumer, config.batch.max(1), stopped));
    Ok(RunnerHandle::new(name, stop, task))
}

async fn run(
    mut inbound: InboundProjection,
    consumer: consumer::Consumer<consumer::pull::Config>,
    batch_size: usize,
    stopped: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    while !*stopped.borrow() {
        let fetched = consumer
            .fetch()
            .max_messages(batch_size)
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
        match apply(&mut inbound, &batch).await {
            Ok(received) => {
                backoff = Duration::from_millis(50);
                count(inbound.name(), received);
                for message in &batch {
                    if let Err(error) = message.ack().await {
                        // Redelivered later, and then skipped as received.
                        tracing::warn!(%error, "acknowledging a message failed");
                    }
                }
            }
            Err(error) => {
                // Not acknowledged: JetStream redelivers the batch.
                tracing::warn!(%error, projection = %inbound.name(), "applying received events failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn apply(
    inbound: &mut InboundProjection,
    batch: &[jetstream::Message],
) -> Result<Received, BackendError> {
    let events = batch
        .iter()
        .map(|message| serde_json::from_slice::<RecordedEvent>(&message.payload))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| BackendError::with_source("a message is not a diptych envelope", error))?;
    inbound.apply(&events).await
}

/// Received and redelivered messages, for `/metrics`.
fn count(projection: &str, received: Received) {
    let projection = projection.to_owned();
    metrics::counter!("diptych_inbound_received_total", "projection" => projection.clone())
        .increment((received.applied + received.redelivered) as u64);
    // Messages applied before (a crash between commit and ack, a lost ack).
    metrics::counter!("diptych_inbound_redeliveries_total", "projection" => projection)
        .increment(received.redelivered as u64);
}
