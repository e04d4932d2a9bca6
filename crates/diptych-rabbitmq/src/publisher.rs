//! [`AmqpPublisher`]: the relay's publisher to RabbitMQ, with publisher confirms.

use std::time::Duration;

use async_trait::async_trait;
use diptych_core::{BackendError, Publisher, RecordedEvent, StreamId};
use futures_util::future::try_join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// The topic exchange every diptych service publishes to.
pub const EXCHANGE: &str = "diptych";

/// The routing key of an event of `stream` published by `service`:
/// `<service>.<category>.<stream id>`, with `.`, `*` and `#` in the parts made
/// `_` (the exact stream id travels in the `diptych-stream` header).
pub fn routing_key(service: &str, stream: &StreamId) -> String {
    let part = |text: &str| text.replace(['.', '*', '#'], "_");
    format!(
        "{}.{}.{}",
        part(service),
        part(stream.category()),
        part(stream.as_str())
    )
}

/// Publishes events as a service, on a channel in confirm mode. A connection
/// lost (the broker restarted, the network cut) is opened again at the next
/// page; the relay publishes the page that failed again.
pub struct AmqpPublisher {
    url: String,
    /// The connection (kept so its channel stays open) and the channel; `None`
    /// after a failure, until the next page opens them again.
    open: tokio::sync::Mutex<Option<(Connection, Channel)>>,
    service: String,
    name: String,
}

impl AmqpPublisher {
    /// Connects to `url` (`amqp://user:pass@host:5672/%2f`), declares the
    /// exchange and puts the channel in confirm mode.
    pub async fn connect(url: &str, service: &str) -> Result<Self, BackendError> {
        let open = confirming_channel(url).await?;
        Ok(Self {
            url: url.to_owned(),
            open: tokio::sync::Mutex::new(Some(open)),
            service: service.to_owned(),
            name: format!("relay-amqp-{service}"),
        })
    }

    /// Publishes in order on the channel and awaits the confirms together.
    async fn publish_on(&self, channel: &Channel, events: &[RecordedEvent]) -> Result<(), Refused> {
        let failed = |error: lapin::Error| {
            Refused::Failed(BackendError::with_source("publishing to RabbitMQ", error))
        };
        let mut confirms = Vec::with_capacity(events.len());
        for event in events {
            let body = serde_json::to_vec(event).map_err(|error| {
                Refused::Failed(BackendError::with_source("encoding an event", error))
            })?;
            let confirm = channel
                .basic_publish(
                    EXCHANGE.into(),
                    routing_key(&self.service, &event.stream_id).into(),
                    // Unroutable (no queue bound yet) comes back instead of
                    // being dropped: the page is published again later.
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties(event),
                )
                .await
                .map_err(failed)?;
            confirms.push(confirm);
        }
        let confirmations = try_join_all(confirms).await.map_err(failed)?;
        for confirmation in confirmations {
            if confirmation.is_nack() {
                return Err(Refused::Failed(BackendError::msg(
                    "RabbitMQ refused (nacked) a message: the page is published again",
                )));
            }
            if let Some(returned) = confirmation.take_message() {
                return Err(Refused::Unroutable(BackendError::msg(format!(
                    "no queue is bound for `{}`, so RabbitMQ would drop it: the relay holds \
                     its checkpoint until a consumer's queue exists (declare it first, as \
                     diptych_rabbitmq::declare_queue does)",
                    returned.delivery.routing_key
                ))));
            }
        }
        Ok(())
    }
}

/// Why a page was not published.
enum Refused {
    /// No queue is bound for a message; the connection is fine.
    Unroutable(BackendError),
    /// The connection or the channel failed, or the broker nacked.
    Failed(BackendError),
}

/// A channel in confirm mode, with the exchange declared.
async fn confirming_channel(url: &str) -> Result<(Connection, Channel), BackendError> {
    let (connection, channel) = open_channel(url).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| BackendError::with_source("enabling publisher confirms", error))?;
    Ok((connection, channel))
}

/// Connects to `url`, opens a channel and declares the exchange on it. The
/// connection must be kept as long as the channel is used.
pub(crate) async fn open_channel(url: &str) -> Result<(Connection, Channel), BackendError> {
    // Bounded: a connection dropped during the handshake must not leave the
    // caller waiting for ever.
    tokio::time::timeout(CONNECT_WITHIN, open_channel_unbounded(url))
        .await
        .unwrap_or_else(|_| {
            Err(BackendError::msg(format!(
                "connecting to RabbitMQ did not finish within {CONNECT_WITHIN:?} (is the server up?)"
            )))
        })
}

/// How long connecting (and opening a channel) may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(10);

/// How long a page's confirms may take before the page is published again on
/// a new connection.
const CONFIRMS_WITHIN: Duration = Duration::from_secs(30);

async fn open_channel_unbounded(url: &str) -> Result<(Connection, Channel), BackendError> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|error| {
            BackendError::with_source(
                "connecting to RabbitMQ (is the server up, and the URL right?)",
                error,
            )
        })?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| BackendError::with_source("opening an AMQP channel", error))?;
    declare_exchange(&channel).await?;
    Ok((connection, channel))
}

/// Declares the durable topic exchange (idempotent).
async fn declare_exchange(channel: &Channel) -> Result<(), BackendError> {
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| BackendError::with_source("declaring the diptych exchange", error))
}

fn properties(event: &RecordedEvent) -> BasicProperties {
    let mut headers = FieldTable::default();
    let text = |value: String| AMQPValue::LongString(value.into());
    headers.insert("diptych-stream".into(), text(event.stream_id.to_string()));
    headers.insert("diptych-event-type".into(), text(event.event_type.clone()));
    headers.insert(
        "diptych-version".into(),
        text(event.stream_version.to_string()),
    );
    headers.insert("diptych-position".into(), text(event.position.to_string()));
    let metadata = &event.metadata;
    for (name, id) in [
        ("diptych-command-id", metadata.command_id),
        ("diptych-correlation-id", metadata.correlation_id),
        ("diptych-causation-id", metadata.causation_id),
    ] {
        if let Some(id) = id {
            headers.insert(name.into(), text(id.to_string()));
        }
    }
    BasicProperties::default()
        // 2: persistent, written to disk by a durable queue.
        .with_delivery_mode(2)
        .with_message_id(ShortString::from(event.event_id.to_string()))
        .with_content_type(ShortString::from("application/json"))
        .with_headers(headers)
}

#[async_trait]
impl Publisher for AmqpPublisher {
    fn name(&self) -> &str {
        &self.name
    }

    async fn publish(&self, events: &[RecordedEvent]) -> Result<(), BackendError> {
        // One page at a time, so the log's order is the channel's.
        let mut open = self.open.lock().await;
        if open.is_none() {
            *open = Some(confirming_channel(&self.url).await?);
        }
        let channel = open.as_ref().map(|(_, channel)| channel.clone());
        if let Some(channel) = channel {
            let published =
                tokio::time::timeout(CONFIRMS_WITHIN, self.publish_on(&channel, events))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Refused::Failed(BackendError::msg(format!(
                            "RabbitMQ did not confirm the page within {CONFIRMS_WITHIN:?}"
                        ))))
                    });
            match published {
                Ok(()) => {}
                // The connection is fine: only no queue is bound yet.
                Err(Refused::Unroutable(error)) => return Err(error),
                Err(Refused::Failed(error)) => {
                    // Opened afresh for the next try.
                    *open = None;
                    return Err(error);
                }
            }
        }
        metrics::counter!("diptych_relay_published_total", "relay" => self.name.clone())
            .increment(events.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_name_service_category_and_stream_and_escape_what_amqp_would_read() {
        let stream = StreamId::new("order-42.a*b#c").unwrap();
        assert_eq!(routing_key("shop", &stream), "shop.order.order-42_a_b_c");
    }
}
