//! `diptych bench relay --broker nats://…|amqp://…`: the outbox relay against a
//! floor.
//!
//! Throughput: a log of N events (SQLite, in a temporary directory) published by
//! the relay from its checkpoint to the end, against the floor: the same events,
//! read into memory first, published by the same publisher in pages of the same
//! size with every acknowledgement awaited, and no relay around it (no log reads,
//! no checkpoint). Latency: one event at a time appended, relayed, received by an
//! inbound consumer and committed to another service's view; the time from the
//! append's acknowledgement until a reader waiting on its token sees it.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use diptych::nats::{InboundConfig, NatsConfig, NatsPublisher, delete_stream, spawn_inbound};
use diptych::rabbitmq::{
    AmqpInboundConfig, AmqpPublisher, declare_queue, delete_queue, spawn_amqp_inbound,
};
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{
    AppendRequest, CollectionSpec, EventStore, ExpectedVersion, HandlerError, NewEvent, Position,
    Projection, Publisher, RecordedEvent, RelayConfig, RunnerHandle, StreamId, ViewStore, ViewTx,
    spawn_relay, wait_for,
};
use serde::Serialize;

use crate::bench::{payload_template, percentile};

/// One result line.
#[derive(Debug, Serialize)]
pub struct RelayBenchResult {
    /// `relay-nats` or `relay-amqp`.
    pub bench: &'static str,
    /// Events in the log.
    pub events: u64,
    /// Events per page (per checkpoint move).
    pub page: usize,
    /// Events published per second by the relay, acknowledged.
    pub events_per_sec: f64,
    /// Events per second of the floor.
    pub floor_events_per_sec: f64,
    /// `events_per_sec / floor_events_per_sec`.
    pub ratio: f64,
    /// Append to the receiving view's commit, median, microseconds.
    pub e2e_p50_us: u64,
    /// The same, 99th percentile.
    pub e2e_p99_us: u64,
    /// How many events the latency was measured on.
    pub e2e_samples: usize,
}

/// Runs the throughput and latency measurements against `broker` (a `nats://`
/// or `amqp://` URL).
pub async fn run(
    broker: &str,
    events: u64,
    page: usize,
    samples: usize,
) -> Result<RelayBenchResult> {
    let broker = Broker::parse(broker)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let directory = tempfile::tempdir().context("creating a temporary directory")?;
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db"))?);
    let views: Arc<dyn ViewStore> = Arc::new(SqliteViews::open(directory.path().join("views.db"))?);
    seed(&*store, events).await?;
    let head = store.head().await?;

    let services = ["relay", "floor", "e2e"].map(|phase| format!("bench{stamp}{phase}"));
    let measured = async {
        let relay_publisher = broker
            .publisher(&services[0])
            .await
            .context("connecting the relay's publisher")?;
        let relay_name = relay_publisher.name().to_owned();
        let started = Instant::now();
        let relay = spawn_relay(
            store.clone(),
            views.clone(),
            relay_publisher,
            RelayConfig {
                page,
                ..RelayConfig::default()
            },
        )
        .await?;
        wait_for(&*views, &relay_name, head, Duration::from_secs(3600)).await?;
        let relayed = started.elapsed();
        relay.stop().await;
        let floor = floor(&broker, &*store, page, &services[1]).await?;
        let latencies = end_to_end(&broker, samples, &services[2]).await?;
        anyhow::Ok((relayed, floor, latencies))
    }
    .await;
    for service in &services {
        broker.clean_up(service).await;
    }
    let (relayed, floor, latencies) = measured?;
    let events_per_sec = events as f64 / relayed.as_secs_f64().max(f64::EPSILON);
    let floor_events_per_sec = events as f64 / floor.as_secs_f64().max(f64::EPSILON);
    Ok(RelayBenchResult {
        bench: broker.label(),
        events,
        page,
        events_per_sec,
        floor_events_per_sec,
        ratio: events_per_sec / floor_events_per_sec.max(f64::EPSILON),
        e2e_p50_us: percentile(&latencies, 0.50),
        e2e_p99_us: percentile(&latencies, 0.99),
        e2e_samples: latencies.len(),
    })
}

/// The broker under test.
enum Broker {
    Nats(String),
    Amqp(String),
}

impl Broker {
    fn parse(url: &str) -> Result<Self> {
        if url.starts_with("nats://") {
            Ok(Broker::Nats(url.to_owned()))
        } else if url.starts_with("amqp://") || url.starts_with("amqps://") {
            Ok(Broker::Amqp(url.to_owned()))
        } else {
            anyhow::bail!("--broker takes a nats:// or amqp:// URL, not `{url}`")
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Broker::Nats(_) => "relay-nats",
            Broker::Amqp(_) => "relay-amqp",
        }
    }

    /// A publisher as `service`. On RabbitMQ a durable queue is bound first, so
    /// the messages are kept (and written to disk) as a consumer's would be.
    async fn publisher(&self, service: &str) -> Result<Arc<dyn Publisher>> {
        Ok(match self {
            Broker::Nats(url) => {
                Arc::new(NatsPublisher::connect(&NatsConfig::new(url, service)).await?)
            }
            Broker::Amqp(url) => {
                declare_queue(url, &queue(service), service).await?;
                Arc::new(AmqpPublisher::connect(url, service).await?)
            }
        })
    }

    async fn receive(
        &self,
        views: Arc<dyn ViewStore>,
        projection: Arc<dyn Projection>,
        source: &str,
    ) -> Result<RunnerHandle> {
        Ok(match self {
            Broker::Nats(url) => {
                spawn_inbound(
                    views,
                    projection,
                    InboundConfig {
                        url: url.clone(),
                        source: source.to_owned(),
                        durable: "bench".to_owned(),
                        batch: 100,
                    },
                )
                .await?
            }
            Broker::Amqp(url) => {
                spawn_amqp_inbound(
                    views,
                    projection,
                    AmqpInboundConfig {
                        url: url.clone(),
                        source: source.to_owned(),
                        queue: queue(source),
                        prefetch: 100,
                    },
                )
                .await?
            }
        })
    }

    /// Drops what the bench made on the broker.
    async fn clean_up(&self, service: &str) {
        let _ = match self {
            Broker::Nats(url) => delete_stream(url, service).await,
            Broker::Amqp(url) => delete_queue(url, &queue(service)).await,
        };
    }
}

fn queue(service: &str) -> String {
    format!("{service}-bench")
}

/// Appends `events` events of the usual size, 100 to an append, over 100 streams.
async fn seed(store: &dyn EventStore, events: u64) -> Result<()> {
    let template = payload_template();
    let mut written = 0;
    while written < events {
        let count = (events - written).min(100);
        let batch = (0..count)
            .map(|_| NewEvent::new("OrderPlaced", template.clone()))
            .collect();
        let stream = StreamId::new(format!("order-{}", written / 100 % 100))?;
        store
            .append(AppendRequest::new(stream, ExpectedVersion::Any, batch))
            .await?;
        written += count;
    }
    Ok(())
}

/// The same events, already in memory, published page by page with no relay.
async fn floor(
    broker: &Broker,
    store: &dyn EventStore,
    page: usize,
    service: &str,
) -> Result<Duration> {
    let mut log = Vec::new();
    let mut after = Position::START;
    loop {
        let read = store.read_all(after, 5000).await?;
        let Some(last) = read.last() else { break };
        after = last.position;
        log.extend(read);
    }
    let publisher = broker
        .publisher(service)
        .await
        .context("connecting the floor's publisher")?;
    let started = Instant::now();
    for chunk in log.chunks(page.max(1)) {
        publisher.publish(chunk).await?;
    }
    Ok(started.elapsed())
}

/// Append → relay → broker → inbound consumer → view commit, one at a time.
async fn end_to_end(broker: &Broker, samples: usize, service: &str) -> Result<Vec<u64>> {
    let directory = tempfile::tempdir()?;
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db"))?);
    let source_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("views.db"))?);
    let receiver: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver.db"))?);
    let publisher = broker.publisher(service).await?;
    // One event first, so the stream exists before the consumer looks for it.
    append_one(&*store, "order-warmup").await?;
    let relay = spawn_relay(
        store.clone(),
        source_views,
        publisher,
        RelayConfig::default(),
    )
    .await?;
    let inbound = broker
        .receive(receiver.clone(), Arc::new(Counts), service)
        .await?;
    let mut latencies = Vec::with_capacity(samples);
    for n in 0..samples {
        let token = append_one(&*store, &format!("order-{}", n % 10)).await?;
        let appended = Instant::now();
        wait_for(
            &*receiver,
            Counts::COLLECTION,
            token,
            Duration::from_secs(60),
        )
        .await?;
        latencies.push(appended.elapsed().as_micros() as u64);
    }
    inbound.stop().await;
    relay.stop().await;
    latencies.sort_unstable();
    Ok(latencies)
}

async fn append_one(store: &dyn EventStore, stream: &str) -> Result<Position> {
    let outcome = store
        .append(AppendRequest::new(
            StreamId::new(stream)?,
            ExpectedVersion::Any,
            vec![NewEvent::new("OrderPlaced", payload_template())],
        ))
        .await?;
    Ok(outcome.last_position())
}

/// The receiving service's view: events counted per stream.
struct Counts;

impl Counts {
    const COLLECTION: &'static str = "bench-counts";
}

#[async_trait::async_trait]
impl Projection for Counts {
    fn name(&self) -> &str {
        Self::COLLECTION
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new(Self::COLLECTION)]
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        views
            .upsert(
                Self::COLLECTION,
                event.stream_id.as_str(),
                |count: &mut u64| {
                    *count += 1;
                },
            )
            .await?;
        Ok(())
    }
}
