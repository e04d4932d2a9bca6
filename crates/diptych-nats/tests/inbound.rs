//! One service's events applied to another service's view through JetStream
//! (`DIPTYCH_TEST_NATS`): the view equals a clean build of the source's log, a
//! consistency token from the source lets a reader wait for the receiving view,
//! and when every message is delivered again (as after a consumer that died
//! between commit and acknowledgement) nothing changes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use diptych_core::testkit::unique_name;
use diptych_core::testkit::{Tallies, added, append_one, clean_tallies, dump_collection};
use diptych_core::{
    CollectionSpec, EventStore, HandlerError, Interest, Projection, RecordedEvent, RelayConfig,
    ViewStore, ViewTx, spawn_relay, wait_for,
};
use diptych_nats::testing::test_url;
use diptych_nats::{InboundConfig, NatsConfig, NatsPublisher, spawn_inbound, stream_name};
use diptych_sqlite::{SqliteStore, SqliteViews};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn received_events_build_the_view_once_even_when_all_are_delivered_again() {
    let directory = tempfile::tempdir().unwrap();
    // The source service: its log, its own views (the relay's checkpoint) and relay.
    let source: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("source-events.db")).unwrap());
    let source_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("source-views.db")).unwrap());
    let service = unique_name();
    let publisher = NatsPublisher::connect(&NatsConfig::new(test_url(), &service))
        .await
        .expect("a publisher");
    let relay = spawn_relay(
        source.clone(),
        source_views,
        Arc::new(publisher),
        RelayConfig::default(),
    )
    .await
    .unwrap();
    // The receiving service's views.
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver-views.db")).unwrap());
    let inbound_config = InboundConfig {
        url: test_url(),
        source: service.clone(),
        durable: "receiver-tallies".to_owned(),
        batch: 40,
    };
    let inbound = spawn_inbound(
        views.clone(),
        Arc::new(Tallies::default()),
        inbound_config.clone(),
    )
    .await
    .expect("the inbound consumer starts");

    let mut token = diptych_core::Position::START;
    for n in 0..300u64 {
        let item = format!("item{}", n % 12);
        token = append_one(&*source, &format!("tally-{item}"), added(&item, n)).await;
    }
    // The source's token, waited on at the receiver.
    wait_for(&*views, Tallies::COLLECTION, token, Duration::from_secs(60))
        .await
        .expect("the receiving view reaches the source's token");
    let clean = clean_tallies(source.clone()).await;
    assert_eq!(dump_collection(&*views, Tallies::COLLECTION).await, clean);
    inbound.stop().await;

    // Every message delivered again, to a fresh durable consumer of the same
    // projection: each is found among the received ids and changes nothing.
    let jetstream = jetstream::new(async_nats::connect(test_url()).await.unwrap());
    let stream = jetstream.get_stream(stream_name(&service)).await.unwrap();
    stream.delete_consumer("receiver-tallies").await.unwrap();
    let again = spawn_inbound(views.clone(), Arc::new(Tallies::default()), inbound_config)
        .await
        .unwrap();
    let mut drained = false;
    for _ in 0..600 {
        // The consumer is made in the background, once the stream is found.
        let Ok(consumer) = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("receiver-tallies")
            .await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let info = consumer.cached_info().clone();
        if info.num_ack_pending == 0
            && info.num_pending == 0
            && info.ack_floor.stream_sequence >= 300
        {
            drained = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(drained, "the redelivered messages were all acknowledged");
    assert_eq!(
        dump_collection(&*views, Tallies::COLLECTION).await,
        clean,
        "300 redelivered messages changed nothing"
    );
    again.stop().await;
    relay.stop().await;
    jetstream
        .delete_stream(stream_name(&service))
        .await
        .unwrap();
}

/// Refuses an event that does not follow its stream's previous one.
struct InOrder;

#[async_trait::async_trait]
impl Projection for InOrder {
    fn name(&self) -> &str {
        "in-order"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new("last-versions")]
    }

    fn interest(&self) -> Interest {
        Interest::all()
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        let stream = event.stream_id.as_str();
        let last: u64 = views.get("last-versions", stream).await?.unwrap_or(0);
        if event.stream_version != last + 1 {
            return Err(HandlerError::msg(format!(
                "`{stream}` version {} arrived after version {last}",
                event.stream_version
            )));
        }
        views.put("last-versions", stream, &event.stream_version)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_restarted_with_unacknowledged_messages_applies_them_in_order() {
    let directory = tempfile::tempdir().unwrap();
    let source: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("source-events.db")).unwrap());
    let source_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("source-views.db")).unwrap());
    let service = unique_name();
    let publisher = NatsPublisher::connect(&NatsConfig::new(test_url(), &service))
        .await
        .unwrap();
    let relay = spawn_relay(
        source.clone(),
        source_views,
        Arc::new(publisher),
        RelayConfig::default(),
    )
    .await
    .unwrap();
    let mut token = diptych_core::Position::START;
    for n in 0..60u64 {
        token = append_one(&*source, "tally-one", added("one", n)).await;
    }

    // A consumer that took the first 25 messages and died before applying them.
    let jetstream = jetstream::new(async_nats::connect(test_url()).await.unwrap());
    let stream = loop {
        if let Ok(stream) = jetstream.get_stream(stream_name(&service)).await {
            break stream;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let durable = "receiver-in-order";
    let consumer = stream
        .get_or_create_consumer(
            durable,
            async_nats::jetstream::consumer::pull::Config {
                durable_name: Some(durable.to_owned()),
                filter_subject: diptych_nats::subjects_of(&service),
                ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut taken = 0;
    while taken < 25 {
        let mut batch = consumer
            .fetch()
            .max_messages(25 - taken)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(_unacknowledged)) = futures_util::StreamExt::next(&mut batch).await {
            taken += 1;
        }
    }

    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver-views.db")).unwrap());
    let inbound = spawn_inbound(
        views.clone(),
        Arc::new(InOrder),
        InboundConfig {
            url: test_url(),
            source: service.clone(),
            durable: durable.to_owned(),
            batch: 10,
        },
    )
    .await
    .unwrap();
    // Within the 30 s ack wait: only an in-order redelivery gets there.
    wait_for(&*views, "last-versions", token, Duration::from_secs(20))
        .await
        .expect("every event applied, each after its predecessor");
    let last: Option<u64> = views
        .get("last-versions", "tally-one")
        .await
        .unwrap()
        .map(|document| serde_json::from_value(document).unwrap());
    assert_eq!(last, Some(60));
    inbound.stop().await;
    relay.stop().await;
    jetstream
        .delete_stream(stream_name(&service))
        .await
        .unwrap();
}
