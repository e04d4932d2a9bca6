//! The relay killed with SIGKILL mid-batch, again and again, while events keep
//! being appended: once a relay finally runs to the end, JetStream holds every
//! event exactly once (the republished ones were dropped as duplicates), and a
//! receiving service's view built from it equals a clean build of the log.
//!
//! This binary is both the parent (run by `cargo test`) and the relay process
//! it starts and kills (marked by an environment variable).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use diptych_core::testkit::unique_name;
use diptych_core::testkit::{
    ExitAfterReceivedCommits, KillOnDrop, Tallies, append_tallies, clean_tallies, dump_collection,
    expect_exit_after_commit,
};
use diptych_core::{
    EventStore, Publisher, RelayConfig, ViewStore, inbound_stats, spawn_relay, wait_for,
};
use diptych_nats::testing::test_url;
use diptych_nats::{InboundConfig, NatsConfig, NatsPublisher, spawn_inbound, stream_name};
use diptych_sqlite::{SqliteStore, SqliteViews};

const CHILD_DIRECTORY: &str = "DIPTYCH_RELAY_CRASH_DIRECTORY";
/// Set for a consumer child: how many batches it commits before it exits
/// without acknowledging the last.
const CHILD_EXIT_AFTER: &str = "DIPTYCH_RELAY_CRASH_EXIT_AFTER";
const CHILD_SERVICE: &str = "DIPTYCH_RELAY_CRASH_SERVICE";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    match (
        std::env::var(CHILD_DIRECTORY),
        std::env::var(CHILD_EXIT_AFTER),
    ) {
        (Ok(directory), Ok(batches)) => runtime.block_on(consume_then_exit(directory, batches)),
        (Ok(directory), Err(_)) => runtime.block_on(relay_until_killed(directory)),
        _ => runtime.block_on(parent()),
    }
}

/// The child: relays the log in small pages until killed.
async fn relay_until_killed(directory: String) {
    let service = std::env::var(CHILD_SERVICE).expect("the parent names the service");
    let directory = std::path::Path::new(&directory);
    let store = Arc::new(SqliteStore::open(directory.join("events.db")).expect("the log"));
    let views = Arc::new(SqliteViews::open(directory.join("relay.db")).expect("the checkpoint"));
    let publisher = NatsPublisher::connect(&NatsConfig::new(test_url(), service))
        .await
        .expect("a publisher");
    let _relay = spawn_relay(
        store,
        views,
        Arc::new(publisher),
        RelayConfig {
            page: 25,
            ..RelayConfig::default()
        },
    )
    .await
    .expect("the relay starts");
    std::future::pending::<()>().await;
}

/// The child that consumes `batches` batches and dies after committing the
/// last, before acknowledging it.
async fn consume_then_exit(directory: String, batches: String) {
    let service = std::env::var(CHILD_SERVICE).expect("the parent names the service");
    let views = Arc::new(
        SqliteViews::open(std::path::Path::new(&directory).join("receiver.db")).expect("the views"),
    );
    let batches = batches.parse().expect("a number of batches");
    let _inbound = spawn_inbound(
        Arc::new(ExitAfterReceivedCommits::new(views, batches)),
        Arc::new(Tallies::default()),
        receiver(&service),
    )
    .await
    .expect("the consumer starts");
    std::future::pending::<()>().await;
}

fn receiver(service: &str) -> InboundConfig {
    InboundConfig {
        url: test_url(),
        source: service.to_owned(),
        durable: "receiver".to_owned(),
        batch: 16,
    }
}

fn spawn_relay_process(directory: &std::path::Path, service: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(std::env::current_exe().expect("this test's path"))
            .env(CHILD_DIRECTORY, directory)
            .env(CHILD_SERVICE, service)
            .spawn()
            .expect("a relay process"),
    )
}

async fn parent() {
    let cycles = if std::env::var("CI").is_ok_and(|ci| ci == "true") {
        12
    } else {
        5
    };
    let directory = tempfile::tempdir().unwrap();
    let store: Arc<dyn EventStore> =
        Arc::new(SqliteStore::open(directory.path().join("events.db")).unwrap());
    let service = unique_name();
    // The stream exists before the first relay, so the consumer can be made.
    drop(
        NatsPublisher::connect(&NatsConfig::new(test_url(), &service))
            .await
            .unwrap(),
    );
    let relay_name = NatsPublisher::connect(&NatsConfig::new(test_url(), &service))
        .await
        .unwrap()
        .name()
        .to_owned();
    let mut appended = 0u64;
    let mut killed_mid_work = 0;
    for cycle in 0..cycles {
        let relay = spawn_relay_process(directory.path(), &service);
        // Appends while the relay runs, then a kill at a moment of chance.
        append_tallies(&*store, &mut appended, 150, 9).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..60))).await;
        drop(relay); // SIGKILL
        let head = store.head().await.unwrap();
        let reached = SqliteViews::open(directory.path().join("relay.db"))
            .unwrap()
            .projection(&relay_name)
            .await
            .map_or(diptych_core::Position::START, |record| record.position);
        if reached < head {
            killed_mid_work += 1;
        }
        println!("relay_crash: cycle {cycle}: killed the relay at {reached} of {head}");
    }
    assert!(
        killed_mid_work > 0,
        "no relay was killed with work left to do"
    );

    // A last relay runs to the end of the log.
    let relay = spawn_relay_process(directory.path(), &service);
    let relay_views = SqliteViews::open(directory.path().join("relay.db")).unwrap();
    let head = store.head().await.unwrap();
    wait_for(&relay_views, &relay_name, head, Duration::from_secs(120))
        .await
        .expect("the last relay publishes everything");
    drop(relay);

    let jetstream = jetstream::new(async_nats::connect(test_url()).await.unwrap());
    let mut stream = jetstream.get_stream(stream_name(&service)).await.unwrap();
    let stored = stream.info().await.unwrap().state.messages;
    assert_eq!(
        stored, appended,
        "every event once in JetStream, none missing, none twice"
    );

    // A receiving service builds its view from the stream; its first consumers
    // each die right after a commit, before acknowledging the batch.
    let deaths = 4;
    for death in 0..deaths {
        let child = Command::new(std::env::current_exe().expect("this test's path"))
            .env(CHILD_DIRECTORY, directory.path())
            .env(CHILD_SERVICE, &service)
            .env(CHILD_EXIT_AFTER, (1 + death % 3).to_string())
            .spawn()
            .expect("a consumer process");
        expect_exit_after_commit(child, Duration::from_secs(60));
    }
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver.db")).unwrap());
    let inbound = spawn_inbound(
        views.clone(),
        Arc::new(Tallies::default()),
        receiver(&service),
    )
    .await
    .unwrap();
    wait_for(&*views, Tallies::COLLECTION, head, Duration::from_secs(120))
        .await
        .expect("the receiving view catches up");
    assert_eq!(
        dump_collection(&*views, Tallies::COLLECTION).await,
        clean_tallies(store.clone()).await,
        "the receiving view equals a clean build of the log"
    );
    let redelivered =
        inbound_stats(&*views, Tallies::COLLECTION).map_or(0, |stats| stats.redelivered);
    assert!(
        redelivered > 0,
        "the batch committed by the last consumer to die came back, and was skipped"
    );
    inbound.stop().await;
    jetstream
        .delete_stream(stream_name(&service))
        .await
        .unwrap();
    println!(
        "relay_crash: {cycles} relays killed with SIGKILL ({killed_mid_work} with work left); \
         {appended} events, each once in JetStream; {deaths} consumers died between commit and \
         ack, the last consumer skipped {redelivered} redelivered events; the receiving view \
         equals a clean build"
    );
}
