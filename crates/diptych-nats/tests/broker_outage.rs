//! The broker stopped while the service keeps taking writes, restarted later:
//! no append was refused while it was down, every event arrives, and the
//! receiving view equals a clean build. The test runs its own `nats-server` on a
//! free port (the machine's shared one is never stopped), killing and
//! restarting it on the same storage directory.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use diptych_core::testkit::{KillOnDrop, Tallies, append_tallies, clean_tallies, dump_collection};
use diptych_core::{EventStore, RelayConfig, ViewStore, spawn_relay, wait_for};
use diptych_nats::{InboundConfig, NatsConfig, NatsPublisher, spawn_inbound};
use diptych_sqlite::{SqliteStore, SqliteViews};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

fn start_server(port: u16, storage: &std::path::Path) -> KillOnDrop {
    KillOnDrop(
        Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(storage)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {NATS_SERVER}: {error}")),
    )
}

async fn wait_until_listening(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nats-server did not listen on {port} within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_on_while_the_broker_is_down_and_everything_arrives_after() {
    let directory = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let storage = directory.path().join("jetstream");
    let server = start_server(port, &storage);
    wait_until_listening(port).await;

    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db")).unwrap());
    let relay_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("relay.db")).unwrap());
    let publisher = NatsPublisher::connect(&NatsConfig::new(&url, "outage"))
        .await
        .expect("a publisher");
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
    let inbound = spawn_inbound(
        views.clone(),
        Arc::new(Tallies::default()),
        InboundConfig {
            url: url.clone(),
            source: "outage".to_owned(),
            durable: "receiver".to_owned(),
            batch: 50,
        },
    )
    .await
    .unwrap();

    // `append_tallies` fails the test if any append is refused.
    let mut next = 0;
    append_tallies(&*store, &mut next, 100, 7).await;
    drop(server); // the broker goes away
    append_tallies(&*store, &mut next, 200, 7).await; // and the write side does not notice
    let server = start_server(port, &storage);
    wait_until_listening(port).await;
    append_tallies(&*store, &mut next, 100, 7).await;

    let head = store.head().await.unwrap();
    wait_for(&*views, Tallies::COLLECTION, head, Duration::from_secs(120))
        .await
        .expect("every event arrives once the broker is back");
    assert_eq!(
        dump_collection(&*views, Tallies::COLLECTION).await,
        clean_tallies(store.clone()).await,
        "the receiving view equals a clean build of the log"
    );
    inbound.stop().await;
    relay.stop().await;
    drop(server);
}
