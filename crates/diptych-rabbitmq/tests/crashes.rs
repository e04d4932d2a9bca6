//! The relay and the consumer killed with SIGKILL at moments of chance, again
//! and again, while events keep being appended: a relay killed mid-page
//! publishes the page again (RabbitMQ has no duplicate window, so the queue
//! holds repeats), and a consumer killed between its commit and its
//! acknowledgement gets its messages again. Once a relay and a consumer run to
//! the end, the receiving view equals a clean build of the log: no event
//! missing, no repeat applied.
//!
//! This binary is the parent (run by `cargo test`) and the relay and consumer
//! processes it starts and kills (marked by an environment variable).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use diptych_core::testkit::{
    ExitAfterReceivedCommits, KillOnDrop, Tallies, append_tallies, clean_tallies, dump_collection,
    expect_exit_after_commit, unique_name,
};
use diptych_core::{
    EventStore, Publisher, RelayConfig, ViewStore, inbound_stats, spawn_relay, wait_for,
};
use diptych_rabbitmq::testing::test_url;
use diptych_rabbitmq::{
    AmqpInboundConfig, AmqpPublisher, declare_queue, delete_queue, spawn_amqp_inbound,
};
use diptych_sqlite::{SqliteStore, SqliteViews};

const CHILD_ROLE: &str = "DIPTYCH_CRASHES_ROLE";
const CHILD_DIRECTORY: &str = "DIPTYCH_CRASHES_DIRECTORY";
const CHILD_SERVICE: &str = "DIPTYCH_CRASHES_SERVICE";
/// For a consumer that exits after this many commits, before acknowledging.
const CHILD_EXIT_AFTER: &str = "DIPTYCH_CRASHES_EXIT_AFTER";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    match std::env::var(CHILD_ROLE).as_deref() {
        Ok("relay") => runtime.block_on(relay_until_killed()),
        Ok("consumer") => runtime.block_on(consume_until_killed()),
        Ok("consume-then-exit") => runtime.block_on(consume_then_exit()),
        _ => runtime.block_on(parent()),
    }
}

fn child_setting(name: &str) -> String {
    std::env::var(name).expect("the parent sets it")
}

fn queue_of(service: &str) -> String {
    format!("{service}-receiver")
}

fn consumer_config(service: &str) -> AmqpInboundConfig {
    AmqpInboundConfig {
        url: test_url(),
        source: service.to_owned(),
        queue: queue_of(service),
        prefetch: 16,
    }
}

/// A child: relays the log in small pages until killed.
async fn relay_until_killed() {
    let directory = std::path::PathBuf::from(child_setting(CHILD_DIRECTORY));
    let store = Arc::new(SqliteStore::open(directory.join("events.db")).expect("the log"));
    let views = Arc::new(SqliteViews::open(directory.join("relay.db")).expect("the checkpoint"));
    let publisher = AmqpPublisher::connect(&test_url(), &child_setting(CHILD_SERVICE))
        .await
        .expect("a publisher");
    let config = RelayConfig {
        page: 25,
        ..RelayConfig::default()
    };
    let _relay = spawn_relay(store, views, Arc::new(publisher), config)
        .await
        .expect("the relay starts");
    std::future::pending::<()>().await;
}

/// A child: applies the queue to the receiving view until killed.
async fn consume_until_killed() {
    let directory = std::path::PathBuf::from(child_setting(CHILD_DIRECTORY));
    let views = Arc::new(SqliteViews::open(directory.join("receiver.db")).expect("the views"));
    let config = consumer_config(&child_setting(CHILD_SERVICE));
    let _consumer = spawn_amqp_inbound(views, Arc::new(Tallies::default()), config)
        .await
        .expect("the consumer starts");
    std::future::pending::<()>().await;
}

/// A child: applies the queue, and exits right after its `CHILD_EXIT_AFTER`-th
/// commit, before acknowledging that delivery.
async fn consume_then_exit() {
    let directory = std::path::PathBuf::from(child_setting(CHILD_DIRECTORY));
    let views = Arc::new(SqliteViews::open(directory.join("receiver.db")).expect("the views"));
    let commits = child_setting(CHILD_EXIT_AFTER).parse().expect("a number");
    let views = Arc::new(ExitAfterReceivedCommits::new(views, commits));
    let config = consumer_config(&child_setting(CHILD_SERVICE));
    let _consumer = spawn_amqp_inbound(views, Arc::new(Tallies::default()), config)
        .await
        .expect("the consumer starts");
    std::future::pending::<()>().await;
}

fn spawn_child(role: &str, directory: &std::path::Path, service: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new(std::env::current_exe().expect("this test's path"))
            .env(CHILD_ROLE, role)
            .env(CHILD_DIRECTORY, directory)
            .env(CHILD_SERVICE, service)
            .spawn()
            .expect("a child process"),
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
    // The queue exists before the first relay, so nothing published is lost.
    declare_queue(&test_url(), &queue_of(&service), &service)
        .await
        .unwrap();
    let relay_name = AmqpPublisher::connect(&test_url(), &service)
        .await
        .unwrap()
        .name()
        .to_owned();
    let mut appended = 0u64;
    let (mut relay_killed_mid_work, mut consumer_killed_mid_work) = (0, 0);
    for cycle in 0..cycles {
        // A backlog, then a relay and a consumer at work on it, killed at a
        // moment of chance while more is appended.
        append_tallies(&*store, &mut appended, 100, 9).await;
        let relay = spawn_child("relay", directory.path(), &service);
        let consumer = spawn_child("consumer", directory.path(), &service);
        append_tallies(&*store, &mut appended, 50, 9).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..80))).await;
        drop(relay); // SIGKILL
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..80))).await;
        drop(consumer); // SIGKILL
        let head = store.head().await.unwrap();
        let checkpoint = |file: &str, name: &str| {
            let views = SqliteViews::open(directory.path().join(file)).unwrap();
            let name = name.to_owned();
            async move {
                views
                    .projection(&name)
                    .await
                    .map_or(diptych_core::Position::START, |record| record.position)
            }
        };
        let relayed = checkpoint("relay.db", &relay_name).await;
        let applied = checkpoint("receiver.db", Tallies::COLLECTION).await;
        relay_killed_mid_work += usize::from(relayed < head);
        consumer_killed_mid_work += usize::from(applied < relayed);
        println!(
            "crashes: cycle {cycle}: relay killed at {relayed}, consumer at {applied}, of {head}"
        );
    }
    assert!(
        relay_killed_mid_work > 0,
        "no relay was killed with work left to do"
    );

    // A last relay runs to the end; on a fresh backlog, consumers that each die
    // right after a commit, before acknowledging; then a last consumer.
    let relay_views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("relay.db")).unwrap());
    let publisher = AmqpPublisher::connect(&test_url(), &service).await.unwrap();
    let relay = spawn_relay(
        store.clone(),
        relay_views,
        Arc::new(publisher),
        RelayConfig::default(),
    )
    .await
    .unwrap();
    append_tallies(&*store, &mut appended, 100, 9).await;
    let deaths = 4;
    for death in 0..deaths {
        let child = Command::new(std::env::current_exe().expect("this test's path"))
            .env(CHILD_ROLE, "consume-then-exit")
            .env(CHILD_DIRECTORY, directory.path())
            .env(CHILD_SERVICE, &service)
            .env(CHILD_EXIT_AFTER, (1 + death * 5).to_string())
            .spawn()
            .expect("a consumer process");
        expect_exit_after_commit(child, Duration::from_secs(60));
    }

    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(directory.path().join("receiver.db")).unwrap());
    let consumer = spawn_amqp_inbound(
        views.clone(),
        Arc::new(Tallies::default()),
        consumer_config(&service),
    )
    .await
    .unwrap();
    let head = store.head().await.unwrap();
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
        "the delivery committed by the last consumer to die came back, and was skipped"
    );
    consumer.stop().await;
    relay.stop().await;
    delete_queue(&test_url(), &queue_of(&service))
        .await
        .unwrap();
    println!(
        "crashes: {cycles} relays and {cycles} consumers killed with SIGKILL ({relay_killed_mid_work} \
         relays and {consumer_killed_mid_work} consumers with work left), {deaths} consumers ended \
         between commit and ack; {appended} events; the last consumer skipped {redelivered} \
         repeats; the receiving view equals a clean build"
    );
}
