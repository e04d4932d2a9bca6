//! RabbitMQ taken away while the service keeps taking writes, given back later:
//! no append was refused meanwhile, the relay and the consumer reconnect by
//! themselves, every event arrives, and the receiving view equals a clean build.
//!
//! The broker is the machine's shared one, so it is never stopped: the service
//! reaches it through a TCP proxy of the test's own, which the test cuts (every
//! connection dropped, new ones refused) and restores.

use std::sync::Arc;
use std::time::Duration;

use diptych_core::testkit::{
    Tallies, TcpProxy, append_tallies, clean_tallies, dump_collection, unique_name,
};
use diptych_core::{EventStore, RelayConfig, ViewStore, inbound_stats, spawn_relay, wait_for};
use diptych_rabbitmq::testing::test_url;
use diptych_rabbitmq::{
    AmqpInboundConfig, AmqpPublisher, declare_queue, delete_queue, spawn_amqp_inbound,
};
use diptych_sqlite::{SqliteStore, SqliteViews};

/// The broker's `host:port`, and the URL with the proxy's address in its place.
fn through(url: &str, proxy: std::net::SocketAddr) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("an amqp:// URL");
    let (credentials, rest) = rest.rsplit_once('@').map_or(("", rest), |(c, r)| (c, r));
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let at = if credentials.is_empty() { "" } else { "@" };
    (
        host.to_owned(),
        format!("{scheme}://{credentials}{at}{proxy}/{path}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_the_broker_is_unreachable_and_everything_arrives_after() {
    let directory = tempfile::tempdir().unwrap();
    let direct = test_url();
    let (broker, _) = through(&direct, "127.0.0.1:1".parse().unwrap());
    let proxy = TcpProxy::start(&broker).await;
    let (_, url) = through(&direct, proxy.addr());
    let service = unique_name();
    let queue = format!("{service}-receiver");
    declare_queue(&direct, &queue, &service).await.unwrap();

    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db")).unwrap());
    let relay_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("relay.db")).unwrap());
    let publisher = AmqpPublisher::connect(&url, &service)
        .await
        .expect("a publisher through the proxy");
    let relay = spawn_relay(
        store.clone(),
        relay_views,
        Arc::new(publisher),
        RelayConfig {
            page: 20,
            max_backoff: Duration::from_millis(500),
            ..RelayConfig::default()
        },
    )
    .await
    .unwrap();
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver.db")).unwrap());
    let inbound = spawn_amqp_inbound(
        views.clone(),
        Arc::new(Tallies::default()),
        AmqpInboundConfig {
            url: url.clone(),
            source: service.clone(),
            queue: queue.clone(),
            prefetch: 32,
        },
    )
    .await
    .expect("a consumer through the proxy");

    // `append_tallies` fails the test if any append is refused.
    let mut next = 0;
    append_tallies(&*store, &mut next, 100, 7).await;
    proxy.cut(); // the broker goes away
    append_tallies(&*store, &mut next, 200, 7).await; // and the write side does not notice
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    append_tallies(&*store, &mut next, 100, 7).await;

    let head = store.head().await.unwrap();
    wait_for(&*views, Tallies::COLLECTION, head, Duration::from_secs(120))
        .await
        .expect("every event arrives once the broker is reachable again");
    assert_eq!(
        dump_collection(&*views, Tallies::COLLECTION).await,
        clean_tallies(store.clone()).await,
        "the receiving view equals a clean build of the log"
    );
    let received = inbound_stats(&*views, Tallies::COLLECTION).expect("the consumer's stats");
    assert!(received.received >= 400, "{received:?}");
    inbound.stop().await;
    relay.stop().await;
    delete_queue(&direct, &queue).await.unwrap();
}
