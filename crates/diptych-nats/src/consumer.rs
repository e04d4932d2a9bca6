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
///
/// The source's stream may not exist yet (its relay has not run): the consumer
/// waits for it in the background, so services can start in any order.
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
    let (stop, stopped) = watch::channel(false);
    let name = inbound.name().to_owned();
    let task = tokio::spawn(async move {
        let jetstream = jetstream::new(client);
        run(inbound, &jetstream, &config, stopped).await;
    });
    Ok(RunnerHandle::new(name, stop, task))
}

/// The durable consumer, once the source's stream exists; `None` when stopped
/// first.
async fn durable_consumer(
    inbound: &mut InboundProjection,
    jetstream: &jetstream::Context,
    config: &InboundConfig,
    mut stopped: watch::Receiver<bool>,
) -> Option<consumer::Consumer<consumer::pull::Config>> {
    let mut backoff = FIRST_BACKOFF;
    loop {
        match ordered_durable(jetstream, config).await {
            Ok(consumer) => return Some(consumer),
            Err(error) => {
                tracing::warn!(
                    %error,
                    source = %config.source,
                    "waiting for the source's JetStream stream (has its relay run yet?)"
                );
                let waiting = format!("waiting for the stream of `{}`: {error}", config.source);
                inbound.report_failure(&waiting).await;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped.changed() => return None,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Creates or opens the durable consumer so that it delivers in log order.
///
/// Messages delivered but not acknowledged before a restart would be
/// redelivered only after the ack wait, behind newer ones, and a stream's
/// events would then apply out of order. So a consumer found with
/// unacknowledged messages is made again from its acknowledged floor: what
/// follows the floor is delivered again, in order, and what was applied
/// already is skipped as received.
async fn ordered_durable(
    jetstream: &jetstream::Context,
    config: &InboundConfig,
) -> Result<consumer::Consumer<consumer::pull::Config>, BackendError> {
    let stream = jetstream
        .get_stream(stream_name(&config.source))
        .await
        .map_err(|error| {
            BackendError::with_source(
                format!("finding the JetStream stream of `{}`", config.source),
                error,
            )
        })?;
    let settings = |deliver_policy| consumer::pull::Config {
        durable_name: Some(config.durable.clone()),
        filter_subject: subjects_of(&config.source),
        ack_policy: consumer::AckPolicy::Explicit,
        deliver_policy,
        ..Default::default()
    };
    let consumer_error = |error| BackendError::with_source("creating the durable consumer", error);
    let mut consumer = stream
        .get_or_create_consumer(&config.durable, settings(consumer::DeliverPolicy::All))
        .await
        .map_err(consumer_error)?;
    let info = consumer
        .info()
        .await
        .map_err(|error| BackendError::with_source("reading the durable consumer", error))?;
    if info.num_ack_pending == 0 {
        return Ok(consumer);
    }
    let start_sequence = info.ack_floor.stream_sequence + 1;
    tracing::info!(
        durable = %config.durable,
        start_sequence,
        "delivering again from the acknowledged floor, in order"
    );
    stream
        .delete_consumer(&config.durable)
        .await
        .map_err(consumer_error)?;
    stream
        .get_or_create_consumer(
            &config.durable,
            settings(consumer::DeliverPolicy::ByStartSequence { start_sequence }),
        )
        .await
        .map_err(consumer_error)
}

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

async fn run(
    mut inbound: InboundProjection,
    jetstream: &jetstream::Context,
    config: &InboundConfig,
    mut stopped: watch::Receiver<bool>,
) {
    let Some(mut consumer) =
        durable_consumer(&mut inbound, jetstream, config, stopped.clone()).await
    else {
        return;
    };
    let mut backoff = FIRST_BACKOFF;
    // The consumer numbers its deliveries 1, 2, 3…: a number skipped is a
    // delivery that never reached this process and would come back, after
    // the ack wait, behind newer ones.
    let mut next_delivery: Option<u64> = None;
    while !*stopped.borrow() {
        let fetched = consumer
            .fetch()
            .max_messages(config.batch.max(1))
            .expires(Duration::from_millis(500))
            .messages()
            .await;
        let mut messages = match fetched {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "fetching from JetStream failed; retrying");
                inbound.report_failure(&error).await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = FIRST_BACKOFF;
        let mut batch = Vec::new();
        let mut broken = false;
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "a fetch from JetStream broke off");
                    broken = true;
                    break;
                }
            };
            let delivery = message.info().map(|info| info.consumer_sequence).ok();
            if delivery.is_some() && next_delivery.is_some() && delivery != next_delivery {
                tracing::warn!(?delivery, expected = ?next_delivery, "a delivery went missing");
                broken = true;
                break;
            }
            next_delivery = delivery.map(|sequence| sequence + 1);
            batch.push(message);
        }
        let applied = if batch.is_empty() {
            if !broken {
                inbound.report_pending(0);
            }
            Applied::Yes
        } else {
            apply_and_acknowledge(&mut inbound, &batch, &mut stopped).await
        };
        match applied {
            Applied::Stopped => return,
            Applied::GaveUp => broken = true,
            Applied::Yes => {}
        }
        if broken {
            // Delivery starts again after what is acknowledged, in order.
            let Some(again) =
                durable_consumer(&mut inbound, jetstream, config, stopped.clone()).await
            else {
                return;
            };
            consumer = again;
            next_delivery = None;
        }
    }
}

enum Applied {
    Yes,
    /// Failed every try: delivered again from the acknowledged floor, in case
    /// the failure is an event that came before its predecessor.
    GaveUp,
    Stopped,
}

/// How many times a batch is tried before delivery starts again from the
/// acknowledged floor.
const TRIES_PER_DELIVERY: u32 = 5;

/// Applies a batch, retrying it as it is, then acknowledges it.
async fn apply_and_acknowledge(
    inbound: &mut InboundProjection,
    batch: &[jetstream::Message],
    stopped: &mut watch::Receiver<bool>,
) -> Applied {
    // A batch that fails is tried again as it is, before anything newer, so
    // a stream's events apply in order; the broker is told it is still in
    // hand so that it does not deliver it again meanwhile.
    let mut retry = FIRST_BACKOFF;
    let mut tries = 0;
    loop {
        match apply(inbound, batch).await {
            Ok(_) => break,
            Err(error) => {
                tracing::warn!(%error, projection = %inbound.name(), "applying received events failed; retrying");
                inbound.report_failure(&error).await;
                tries += 1;
                if tries == TRIES_PER_DELIVERY {
                    return Applied::GaveUp;
                }
                for message in batch {
                    let _ = message.ack_with(jetstream::AckKind::Progress).await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    // Not acknowledged: delivered again after a restart.
                    _ = stopped.changed() => return Applied::Stopped,
                }
                retry = (retry * 2).min(MAX_BACKOFF);
            }
        }
    }
    // What the broker still holds after the newest message: the lag.
    if let Some(Ok(info)) = batch.last().map(|message| message.info()) {
        inbound.report_pending(info.pending);
    }
    for message in batch {
        if let Err(error) = message.ack().await {
            // Delivered again later, and then skipped as received.
            tracing::warn!(%error, "acknowledging a message failed");
        }
    }
    Applied::Yes
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
