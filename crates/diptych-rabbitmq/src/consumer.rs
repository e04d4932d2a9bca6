//! Inbound over RabbitMQ: a durable queue per receiving projection, bound to the
//! source service's routing keys, consumed with manual acknowledgement through
//! core's `InboundProjection`.

use std::sync::Arc;

use diptych_core::{
    BackendError, InboundProjection, Projection, RecordedEvent, RunnerHandle, ViewStore,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio::sync::watch;

use crate::publisher::{EXCHANGE, open_channel};

/// Where the events come from.
#[derive(Clone, Debug)]
pub struct AmqpInboundConfig {
    /// The server, such as `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// The service whose events are applied.
    pub source: String,
    /// The durable queue's name: one per receiving service and projection.
    pub queue: String,
    /// How many unacknowledged messages the broker may send ahead.
    pub prefetch: u16,
}

/// Registers `projection`, declares and binds its queue, and starts applying.
pub async fn spawn_amqp_inbound(
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    config: AmqpInboundConfig,
) -> Result<RunnerHandle, BackendError> {
    let mut inbound = InboundProjection::register(views, projection)
        .await
        .map_err(|error| BackendError::with_source("registering an inbound projection", error))?;
    let failed = |what: &'static str| move |error| BackendError::with_source(what, error);
    let (connection, channel) = open_channel(&config.url).await?;
    declare_bound_queue(&channel, &config.queue, &config.source).await?;
    channel
        .basic_qos(config.prefetch.max(1), BasicQosOptions::default())
        .await
        .map_err(failed("setting the prefetch"))?;
    let mut consumer = channel
        .basic_consume(
            config.queue.as_str().into(),
            format!("diptych-{}", inbound.name()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(failed("consuming the inbound queue"))?;
    let (stop, mut stopped) = watch::channel(false);
    let name = inbound.name().to_owned();
    let task = tokio::spawn(async move {
        let _connection = connection;
        loop {
            let delivery = tokio::select! {
                delivery = consumer.next() => delivery,
                _ = stopped.changed() => return,
            };
            let Some(Ok(delivery)) = delivery else {
                tracing::warn!("the RabbitMQ consumer ended");
                return;
            };
            let applied = match serde_json::from_slice::<RecordedEvent>(&delivery.data) {
                Ok(event) => inbound.apply(std::slice::from_ref(&event)).await,
                Err(error) => Err(BackendError::with_source(
                    "a message is not a diptych envelope",
                    error,
                )),
            };
            let acked = match applied {
                Ok(received) => {
                    metrics::counter!("diptych_inbound_redeliveries_total", "projection" => inbound.name().to_owned())
                        .increment(received.redelivered as u64);
                    delivery.ack(BasicAckOptions::default()).await
                }
                Err(error) => {
                    tracing::warn!(%error, projection = %inbound.name(), "applying a received event failed; redelivering");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await
                }
            };
            if let Err(error) = acked {
                // Redelivered later, and then skipped as received.
                tracing::warn!(%error, "acknowledging a message failed");
            }
        }
    });
    Ok(RunnerHandle::new(name, stop, task))
}

/// Declares a durable queue bound to `source`'s routing keys (idempotent).
async fn declare_bound_queue(
    channel: &lapin::Channel,
    queue: &str,
    source: &str,
) -> Result<(), BackendError> {
    let failed = |what: &'static str| move |error| BackendError::with_source(what, error);
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(failed("declaring a queue"))?;
    channel
        .queue_bind(
            queue.into(),
            EXCHANGE.into(),
            format!("{}.#", source.replace(['.', '*', '#'], "_")).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(failed("binding a queue"))?;
    Ok(())
}

/// Declares a durable queue bound to `source`'s events, so they are kept until
/// consumed (for benches and tests that publish before consuming).
pub async fn declare_queue(url: &str, queue: &str, source: &str) -> Result<(), BackendError> {
    let (_connection, channel) = open_channel(url).await?;
    declare_bound_queue(&channel, queue, source).await
}

/// Deletes a queue and what it holds (for benches and tests).
pub async fn delete_queue(url: &str, queue: &str) -> Result<(), BackendError> {
    let (_connection, channel) = open_channel(url).await?;
    channel
        .queue_delete(queue.into(), lapin::options::QueueDeleteOptions::default())
        .await
        .map_err(|error| BackendError::with_source(format!("deleting the queue {queue}"), error))?;
    Ok(())
}
