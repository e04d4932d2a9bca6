//! Inbound over RabbitMQ: a durable queue per receiving projection, bound to the
//! source service's routing keys, consumed with manual acknowledgement through
//! core's `InboundProjection`.

use std::sync::Arc;
use std::time::Duration;

use diptych_core::{
    BackendError, InboundProjection, Projection, RecordedEvent, RunnerHandle, ViewStore,
};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions,
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
///
/// A lost connection is opened again, with backoff, for as long as the
/// consumer runs; what was delivered and not acknowledged comes back, and what
/// was applied already is skipped as received.
pub async fn spawn_amqp_inbound(
    views: Arc<dyn ViewStore>,
    projection: Arc<dyn Projection>,
    config: AmqpInboundConfig,
) -> Result<RunnerHandle, BackendError> {
    let inbound = InboundProjection::register(views, projection)
        .await
        .map_err(|error| BackendError::with_source("registering an inbound projection", error))?;
    // The first connection is made here, so a wrong URL is the caller's error.
    let first = Consuming::open(&config, inbound.name()).await?;
    let (stop, stopped) = watch::channel(false);
    let name = inbound.name().to_owned();
    let task = tokio::spawn(run(inbound, config, first, stopped));
    Ok(RunnerHandle::new(name, stop, task))
}

/// An open connection consuming the queue.
struct Consuming {
    // Kept so the channel stays open.
    _connection: lapin::Connection,
    channel: lapin::Channel,
    consumer: lapin::Consumer,
}

impl Consuming {
    /// Connects and starts consuming, within a bound: a connection cut during
    /// the handshake must not leave the consumer waiting for ever.
    async fn open(config: &AmqpInboundConfig, projection: &str) -> Result<Self, BackendError> {
        tokio::time::timeout(OPEN_WITHIN, Self::open_unbounded(config, projection))
            .await
            .unwrap_or_else(|_| {
                Err(BackendError::msg(format!(
                    "consuming from RabbitMQ did not start within {OPEN_WITHIN:?}"
                )))
            })
    }

    async fn open_unbounded(
        config: &AmqpInboundConfig,
        projection: &str,
    ) -> Result<Self, BackendError> {
        let failed = |what: &'static str| move |error| BackendError::with_source(what, error);
        let (connection, channel) = open_channel(&config.url).await?;
        declare_bound_queue(&channel, &config.queue, &config.source).await?;
        channel
            .basic_qos(config.prefetch.max(1), BasicQosOptions::default())
            .await
            .map_err(failed("setting the prefetch"))?;
        let consumer = channel
            .basic_consume(
                config.queue.as_str().into(),
                format!("diptych-{projection}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(failed("consuming the inbound queue"))?;
        Ok(Self {
            _connection: connection,
            channel,
            consumer,
        })
    }

    /// Messages still in the queue, not yet delivered: the consumer's lag.
    async fn waiting(&self, queue: &str) -> Option<u64> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declare = self
            .channel
            .queue_declare(queue.into(), passive, FieldTable::default());
        let declared = tokio::time::timeout(Duration::from_secs(1), declare)
            .await
            .ok()?
            .ok()?;
        Some(u64::from(declared.message_count()))
    }
}

/// How long connecting and starting to consume may take.
const OPEN_WITHIN: Duration = Duration::from_secs(15);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long an acknowledgement may take before the connection is taken for
/// lost.
const ACK_WITHIN: Duration = Duration::from_secs(5);
/// How often the queue's depth is read for the lag.
const LAG_EVERY: Duration = Duration::from_secs(1);

async fn run(
    mut inbound: InboundProjection,
    config: AmqpInboundConfig,
    first: Consuming,
    mut stopped: watch::Receiver<bool>,
) {
    let mut open = Some(first);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let consuming = match open.take() {
            Some(consuming) => consuming,
            None => {
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped.changed() => return,
                }
                match Consuming::open(&config, inbound.name()).await {
                    Ok(consuming) => {
                        tracing::info!(queue = %config.queue, "consuming from RabbitMQ again");
                        consuming
                    }
                    Err(error) => {
                        tracing::warn!(%error, queue = %config.queue, "reconnecting to RabbitMQ failed; retrying");
                        inbound.report_failure(&error).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
        };
        backoff = FIRST_BACKOFF;
        match consume(&mut inbound, &config, consuming, &mut stopped).await {
            Ended::Stopped => return,
            Ended::Lost(reason) => {
                tracing::warn!(%reason, queue = %config.queue, "lost the RabbitMQ connection; reconnecting");
                let lost = format!("lost the RabbitMQ connection: {reason}");
                inbound.report_failure(&lost).await;
            }
        }
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

/// Applies deliveries one by one until stopped or the connection is lost.
async fn consume(
    inbound: &mut InboundProjection,
    config: &AmqpInboundConfig,
    mut consuming: Consuming,
    stopped: &mut watch::Receiver<bool>,
) -> Ended {
    let mut lag_read = tokio::time::Instant::now();
    loop {
        let delivery = tokio::select! {
            delivery = consuming.consumer.next() => delivery,
            _ = tokio::time::sleep(LAG_EVERY) => {
                // The queue's depth, and a check that the connection is alive:
                // a connection cut without a word would otherwise leave the
                // consumer waiting for deliveries that never come.
                match consuming.waiting(&config.queue).await {
                    Some(waiting) => inbound.report_pending(waiting),
                    None => return Ended::Lost("the broker did not answer a queue check".to_owned()),
                }
                lag_read = tokio::time::Instant::now();
                continue;
            }
            _ = stopped.changed() => return Ended::Stopped,
        };
        let delivery = match delivery {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => return Ended::Lost(error.to_string()),
            None => return Ended::Lost("the consumer ended".to_owned()),
        };
        // A delivery that fails is tried again as it is, before the next, so
        // a stream's events apply in order.
        let mut retry = FIRST_BACKOFF;
        loop {
            let applied = match serde_json::from_slice::<RecordedEvent>(&delivery.data) {
                Ok(event) => inbound.apply(std::slice::from_ref(&event)).await,
                Err(error) => Err(BackendError::with_source(
                    "a message is not a diptych envelope",
                    error,
                )),
            };
            match applied {
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, projection = %inbound.name(), "applying a received event failed; retrying");
                    inbound.report_failure(&error).await;
                    tokio::select! {
                        _ = tokio::time::sleep(retry) => {}
                        // Not acknowledged: delivered again to the next consumer.
                        _ = stopped.changed() => return Ended::Stopped,
                    }
                    retry = (retry * 2).min(MAX_BACKOFF);
                }
            }
        }
        // Bounded: on a connection cut mid-way the acknowledgement can wait for
        // ever. Unacknowledged, it is delivered again after reconnecting, and
        // then skipped as received.
        match tokio::time::timeout(ACK_WITHIN, delivery.ack(BasicAckOptions::default())).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Ended::Lost(format!("acknowledging a message failed: {error}"));
            }
            Err(_) => return Ended::Lost("acknowledging a message did not finish".to_owned()),
        }
        if lag_read.elapsed() >= LAG_EVERY {
            if let Some(waiting) = consuming.waiting(&config.queue).await {
                inbound.report_pending(waiting);
            }
            lag_read = tokio::time::Instant::now();
        }
    }
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
