//! The relay and an inbound consumer over a real RabbitMQ (`DIPTYCH_TEST_AMQP`):
//! every appended event reaches the receiving view exactly once, each stream in
//! order (the view checks versions), a source token is waited on at the receiver,
//! and a relay that lost its checkpoint republishes everything without a single
//! event applied twice.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::testkit::dump_collection;
use diptych_core::testkit::unique_name;
use diptych_core::{
    AppendRequest, CollectionSpec, EventStore, ExpectedVersion, HandlerError, NewEvent, Position,
    Projection, RecordedEvent, RelayConfig, StreamId, ViewStore, ViewTx, spawn_relay, wait_for,
};
use diptych_rabbitmq::testing::test_url;
use diptych_rabbitmq::{AmqpInboundConfig, AmqpPublisher, spawn_amqp_inbound};
use diptych_sqlite::{SqliteStore, SqliteViews};
use serde_json::json;

/// Per stream: how many events, and the last version. An event out of order or
/// applied twice fails (and would keep failing), so the view only reaches the
/// log's end if every stream arrived whole and in order.
struct StreamsSeen;

#[async_trait]
impl Projection for StreamsSeen {
    fn name(&self) -> &str {
        "streams-seen"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new("streams-seen")]
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        let key = event.stream_id.as_str();
        let seen: Option<serde_json::Value> = views.get("streams-seen", key).await?;
        let last = seen
            .as_ref()
            .map_or(0, |seen| seen["last"].as_u64().unwrap_or(0));
        if event.stream_version != last + 1 {
            return Err(HandlerError::msg(format!(
                "{key}: version {} after {last}",
                event.stream_version
            )));
        }
        let count = seen.map_or(0, |seen| seen["count"].as_u64().unwrap_or(0));
        views.put(
            "streams-seen",
            key,
            &json!({"last": event.stream_version, "count": count + 1}),
        )?;
        Ok(())
    }
}

/// Appends to eight streams; returns the last position and how many events.
async fn append_many(store: &dyn EventStore, appends: usize) -> (Position, u64) {
    let mut last = Position::START;
    let mut count = 0;
    for n in 0..appends {
        let stream = StreamId::new(format!("order-{}", n % 8)).unwrap();
        let events: Vec<NewEvent> = (0..1 + n % 3)
            .map(|i| NewEvent::new("Placed", json!({"n": n, "i": i})))
            .collect();
        count += events.len() as u64;
        last = store
            .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
            .await
            .expect("an append")
            .last_position();
    }
    (last, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_reaches_the_receiver_once_in_order_even_when_all_are_published_again() {
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db")).unwrap());
    let service = unique_name();
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver.db")).unwrap());
    let queue = format!("{service}-receiver");
    let inbound = spawn_amqp_inbound(
        views.clone(),
        Arc::new(StreamsSeen),
        AmqpInboundConfig {
            url: test_url(),
            source: service.clone(),
            queue: queue.clone(),
            prefetch: 64,
        },
    )
    .await
    .expect("the consumer starts");
    let relay_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("relay.db")).unwrap());
    let publisher = AmqpPublisher::connect(&test_url(), &service)
        .await
        .expect("a publisher");
    let relay = spawn_relay(
        store.clone(),
        relay_views,
        Arc::new(publisher),
        RelayConfig {
            page: 40,
            ..RelayConfig::default()
        },
    )
    .await
    .unwrap();
    let (token, appended) = append_many(&*store, 200).await;
    wait_for(&*views, "streams-seen", token, Duration::from_secs(60))
        .await
        .expect("the source's token is reached at the receiver");
    let whole = dump_collection(&*views, "streams-seen").await;
    let total: u64 = whole
        .iter()
        .map(|(_, seen)| seen["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, appended, "every event applied once");
    relay.stop().await;
    assert!(views.parked("streams-seen").await.unwrap().is_empty());

    // A relay with no checkpoint publishes the whole log again: each message is
    // a redelivery to the receiver and changes nothing.
    let amnesiac: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("forgotten.db")).unwrap());
    let publisher = AmqpPublisher::connect(&test_url(), &service).await.unwrap();
    let relay_name = diptych_core::Publisher::name(&publisher).to_owned();
    let rerun = spawn_relay(
        store.clone(),
        amnesiac.clone(),
        Arc::new(publisher),
        RelayConfig::default(),
    )
    .await
    .unwrap();
    wait_for(&*amnesiac, &relay_name, token, Duration::from_secs(60))
        .await
        .expect("everything republished and confirmed");
    rerun.stop().await;
    // A marker after the republished log: once the receiver has it, it has
    // seen every republished message before it on the same queue.
    let (marker, _) = append_many(&*store, 1).await;
    let publisher = AmqpPublisher::connect(&test_url(), &service).await.unwrap();
    let finisher = spawn_relay(
        store.clone(),
        amnesiac,
        Arc::new(publisher),
        RelayConfig::default(),
    )
    .await
    .unwrap();
    wait_for(&*views, "streams-seen", marker, Duration::from_secs(60))
        .await
        .expect("the marker arrives");
    finisher.stop().await;
    let after: u64 = dump_collection(&*views, "streams-seen")
        .await
        .iter()
        .map(|(_, seen)| seen["count"].as_u64().unwrap())
        .sum();
    assert_eq!(
        after,
        appended + 1,
        "the republished log applied nothing twice"
    );
    inbound.stop().await;
    let connection =
        lapin::Connection::connect(&test_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("the test's queue is deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_nobody_is_bound_to_receive_is_refused_not_dropped() {
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db")).unwrap());
    let (token, appended) = append_many(&*store, 5).await;
    let page = store.read_all(Position::START, 100).await.unwrap();
    let service = unique_name();
    let publisher = AmqpPublisher::connect(&test_url(), &service).await.unwrap();
    let refused = diptych_core::Publisher::publish(&publisher, &page)
        .await
        .expect_err("with no queue bound, the page is refused");
    assert!(
        format!("{refused:?}").contains("no queue is bound"),
        "the error says why: {refused:?}"
    );

    // Once a consumer's queue exists, the same page goes through, whole.
    let queue = format!("{service}-late");
    diptych_rabbitmq::declare_queue(&test_url(), &queue, &service)
        .await
        .unwrap();
    diptych_core::Publisher::publish(&publisher, &page)
        .await
        .expect("published once a queue is bound");
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver.db")).unwrap());
    let inbound = spawn_amqp_inbound(
        views.clone(),
        Arc::new(StreamsSeen),
        AmqpInboundConfig {
            url: test_url(),
            source: service.clone(),
            queue: queue.clone(),
            prefetch: 8,
        },
    )
    .await
    .unwrap();
    wait_for(&*views, "streams-seen", token, Duration::from_secs(60))
        .await
        .expect("the late consumer gets the page");
    let total: u64 = dump_collection(&*views, "streams-seen")
        .await
        .iter()
        .map(|(_, seen)| seen["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, appended);
    inbound.stop().await;
    diptych_rabbitmq::delete_queue(&test_url(), &queue)
        .await
        .unwrap();
}
