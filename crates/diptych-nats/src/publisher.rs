//! [`NatsPublisher`]: the relay's publisher to JetStream.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use diptych_core::{BackendError, Publisher, RecordedEvent};
use futures_util::future::try_join_all;

use crate::subjects::{stream_name, subject_for, subjects_of};

/// Where and as whom to publish.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// The server, such as `nats://127.0.0.1:4222`.
    pub url: String,
    /// The publishing service's name: the second token of its subjects.
    pub service: String,
    /// How long JetStream remembers message ids to drop republished events: it
    /// must outlast a relay's restart.
    pub duplicate_window: Duration,
}

impl NatsConfig {
    /// Publishing as `service` to the server at `url`, with a two-minute window.
    pub fn new(url: impl Into<String>, service: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            service: service.into(),
            duplicate_window: Duration::from_secs(120),
        }
    }

    /// The relay's name, under which its checkpoint (and on PostgreSQL its
    /// lease) is kept: `relay-nats-<service>`.
    pub fn relay_name(&self) -> String {
        format!("relay-nats-{}", self.service)
    }
}

/// Publishes events to the service's JetStream stream, created if missing.
pub struct NatsPublisher {
    jetstream: jetstream::Context,
    service: String,
    name: String,
}

impl NatsPublisher {
    /// Connects and makes sure the stream exists.
    pub async fn connect(config: &NatsConfig) -> Result<Self, BackendError> {
        let client = async_nats::connect(&config.url).await.map_err(|error| {
            BackendError::with_source(
                format!(
                    "connecting to NATS at {} (is the server up, with JetStream?)",
                    config.url
                ),
                error,
            )
        })?;
        let jetstream = jetstream::new(client);
        jetstream
            .get_or_create_stream(stream::Config {
                name: stream_name(&config.service),
                subjects: vec![subjects_of(&config.service)],
                duplicate_window: config.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|error| {
                BackendError::with_source(
                    format!(
                        "creating the JetStream stream {}",
                        stream_name(&config.service)
                    ),
                    error,
                )
            })?;
        Ok(Self {
            jetstream,
            service: config.service.clone(),
            name: config.relay_name(),
        })
    }
}

/// The headers of an event's message: its id for deduplication, then what a
/// consumer routes and correlates by without parsing the body.
fn headers(event: &RecordedEvent) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
    headers.insert("Diptych-Stream", event.stream_id.as_str());
    headers.insert("Diptych-Event-Type", event.event_type.as_str());
    headers.insert("Diptych-Version", event.stream_version.to_string().as_str());
    headers.insert("Diptych-Position", event.position.to_string().as_str());
    let metadata = &event.metadata;
    for (name, id) in [
        ("Diptych-Command-Id", metadata.command_id),
        ("Diptych-Correlation-Id", metadata.correlation_id),
        ("Diptych-Causation-Id", metadata.causation_id),
    ] {
        if let Some(id) = id {
            headers.insert(name, id.to_string().as_str());
        }
    }
    headers
}

#[async_trait]
impl Publisher for NatsPublisher {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BackendError> {
        let failed = |error: &dyn std::fmt::Display| {
            BackendError::msg(format!("publishing to NATS JetStream: {error}"))
        };
        // Sent one after another on one connection (so in log order), their
        // acknowledgements awaited together.
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            let body = serde_json::to_vec(event)
                .map_err(|error| BackendError::with_source("encoding an event", error))?;
            let ack = self
                .jetstream
                .publish_with_headers(
                    subject_for(&self.service, &event.stream_id),
                    headers(event),
                    body.into(),
                )
                .await
                .map_err(|error| failed(&error))?;
            acks.push(ack.into_future());
        }
        let acks = try_join_all(acks).await.map_err(|error| failed(&error))?;
        let republished = acks.iter().filter(|ack| ack.duplicate).count() as u64;
        metrics::counter!("diptych_relay_published_total", "relay" => self.name.clone())
            .increment(events.len() as u64);
        // Events the broker already had: a relay restarted before its checkpoint.
        metrics::counter!("diptych_relay_republished_total", "relay" => self.name.clone())
            .increment(republished);
        Ok(())
    }
}

/// Deletes `service`'s stream and what it holds (for benches and tests).
pub async fn delete_stream(url: &str, service: &str) -> Result<(), BackendError> {
    remove_stream(url, service, true).await
}

/// Deletes `service`'s stream if there is one: a fresh start, with nothing of
/// an earlier run left for consumers to receive.
pub async fn clear_stream(url: &str, service: &str) -> Result<(), BackendError> {
    remove_stream(url, service, false).await
}

async fn remove_stream(url: &str, service: &str, must_exist: bool) -> Result<(), BackendError> {
    let client = async_nats::connect(url).await.map_err(|error| {
        BackendError::with_source(format!("connecting to NATS at {url}"), error)
    })?;
    let jetstream = jetstream::new(client);
    if !must_exist && jetstream.get_stream(stream_name(service)).await.is_err() {
        return Ok(());
    }
    jetstream
        .delete_stream(stream_name(service))
        .await
        .map_err(|error| {
            BackendError::with_source(
                format!("deleting the stream {}", stream_name(service)),
                error,
            )
        })?;
    Ok(())
}
