//! The relay against a real JetStream (`DIPTYCH_TEST_NATS`): every appended event
//! is published exactly once as a consumer sees it, each stream in version order,
//! and a relay that lost its checkpoint republishes without a single duplicate
//! reaching the stream.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use diptych_core::testkit::unique_name;
use diptych_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, RecordedEvent, RelayConfig, StreamId,
    ViewStore, spawn_relay, wait_for,
};
use diptych_nats::testing::test_url;
use diptych_nats::{NatsConfig, NatsPublisher, stream_name, subjects_of};
use diptych_sqlite::{SqliteStore, SqliteViews};
use futures_util::StreamExt;
use serde_json::json;

async fn append_many(store: &dyn EventStore, count: usize) -> usize {
    let mut written = 0;
    let mut n = 0;
    while written < count {
        let stream = StreamId::new(format!("order-{}", n % 10)).unwrap();
        let events: Vec<NewEvent> = (0..1 + n % 3)
            .map(|i| NewEvent::new("Placed", json!({"n": n, "i": i})))
            .collect();
        written += events.len();
        store
            .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
            .await
            .expect("an append");
        n += 1;
    }
    written
}

/// Pulls until `count` messages arrived (acking each), or fails after 60 s.
async fn consume(
    jetstream: &jetstream::Context,
    service: &str,
    count: usize,
) -> Vec<RecordedEvent> {
    let stream = jetstream
        .get_stream(stream_name(service))
        .await
        .expect("the stream");
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("test-reader".to_owned()),
            filter_subject: subjects_of(service),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut received = Vec::new();
    while received.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(60), messages.next())
            .await
            .expect("a message within 60 s")
            .expect("the subscription is open")
            .expect("a message");
        received
            .push(serde_json::from_slice::<RecordedEvent>(&message.payload).expect("an envelope"));
        message.ack().await.expect("acked");
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_is_published_once_in_stream_order_and_a_rerun_adds_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db")).unwrap());
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("views.db")).unwrap());
    let service = unique_name();
    let config = NatsConfig::new(test_url(), &service);
    let publisher = Arc::new(NatsPublisher::connect(&config).await.expect("a publisher"));
    let relay_name = diptych_core::Publisher::name(&*publisher).to_owned();
    let relay_config = RelayConfig {
        page: 50,
        ..RelayConfig::default()
    };
    // Some events before the relay starts, some while it runs.
    let mut written = append_many(&*store, 150).await;
    let relay = spawn_relay(
        store.clone(),
        views.clone(),
        publisher,
        relay_config.clone(),
    )
    .await
    .expect("the relay starts");
    written += append_many(&*store, 150).await;

    let jetstream = jetstream::new(async_nats::connect(test_url()).await.unwrap());
    let received = consume(&jetstream, &service, written).await;
    let ids: HashSet<_> = received.iter().map(|event| event.event_id).collect();
    assert_eq!(ids.len(), written, "every event once");
    let mut versions: BTreeMap<&str, u64> = BTreeMap::new();
    for event in &received {
        let last = versions.entry(event.stream_id.as_str()).or_default();
        assert_eq!(
            event.stream_version,
            *last + 1,
            "{} in version order",
            event.stream_id
        );
        *last = event.stream_version;
    }
    let head = store.head().await.unwrap();
    wait_for(&*views, &relay_name, head, Duration::from_secs(30))
        .await
        .expect("the relay's checkpoint reaches the head");
    relay.stop().await;

    // A relay that lost its checkpoint (a fresh view store) publishes the whole
    // log again: JetStream drops every message as a duplicate.
    let amnesiac: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("forgotten.db")).unwrap());
    let publisher = Arc::new(NatsPublisher::connect(&config).await.unwrap());
    let rerun = spawn_relay(store.clone(), amnesiac.clone(), publisher, relay_config)
        .await
        .unwrap();
    wait_for(&*amnesiac, &relay_name, head, Duration::from_secs(30))
        .await
        .expect("the second relay republished everything");
    rerun.stop().await;
    let mut stream = jetstream.get_stream(stream_name(&service)).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(
        info.state.messages, written as u64,
        "no duplicate was stored"
    );
    jetstream
        .delete_stream(stream_name(&service))
        .await
        .unwrap();
}
