//! Many writer processes, many subscriber processes, one PostgreSQL log.
//!
//! This binary plays three parts, chosen by an environment variable. Run by
//! `cargo test`, it is the parent: it starts writer processes that append
//! concurrently (from several tasks each) to random streams, and subscriber
//! processes that follow the log from the start and print every event they
//! deliver. When the writers are done the parent appends an end marker; each
//! subscriber stops there. The parent then checks that every subscriber
//! delivered exactly the log, every committed event once, in position order,
//! and that each stream's versions arrive as 1, 2, 3…

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use diptych_core::{AppendRequest, EventStore, ExpectedVersion, NewEvent, Position, StreamId};
use diptych_postgres::testing::{self, ChildGuard};
use diptych_postgres::{PgConfig, PgStore};
use serde_json::json;

const ROLE: &str = "DIPTYCH_TORTURE_ROLE";
const SCHEMA: &str = "DIPTYCH_TORTURE_SCHEMA";
const WRITER: &str = "DIPTYCH_TORTURE_WRITER";
const WRITERS: usize = 4;
const TASKS_PER_WRITER: usize = 8;
const APPENDS_PER_TASK: usize = 60;
const SUBSCRIBERS: usize = 3;
const STREAMS: u64 = 12;
const END: &str = "torture-end";

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    match std::env::var(ROLE).as_deref() {
        Ok("writer") => runtime.block_on(write()),
        Ok("subscriber") => runtime.block_on(subscribe()),
        _ => runtime.block_on(parent()),
    }
}

fn child_config() -> PgConfig {
    let schema = std::env::var(SCHEMA).expect("the parent names the schema");
    PgConfig::new(testing::test_url())
        .with_schema(schema)
        .with_pool_size(TASKS_PER_WRITER)
}

/// Appends from several tasks to random streams; prints how many events were
/// acknowledged.
async fn write() {
    let writer: usize = std::env::var(WRITER).unwrap().parse().unwrap();
    let store = Arc::new(PgStore::connect(&child_config()).await.expect("a store"));
    let mut tasks = Vec::new();
    for task in 0..TASKS_PER_WRITER {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = 0;
            for n in 0..APPENDS_PER_TASK {
                let stream = StreamId::new(format!("s-{}", fastrand::u64(0..STREAMS))).unwrap();
                let events = (0..fastrand::usize(1..=3))
                    .map(|i| {
                        NewEvent::new("Wrote", json!({"w": writer, "t": task, "n": n, "i": i}))
                    })
                    .collect::<Vec<_>>();
                let count = events.len();
                store
                    .append(AppendRequest::new(stream, ExpectedVersion::Any, events))
                    .await
                    .expect("an append");
                acknowledged += count;
            }
            acknowledged
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("a writer task");
    }
    println!("acknowledged {total}");
}

/// Follows the log from the start, printing `position stream version id` for
/// every event, until the end marker.
async fn subscribe() {
    let store = PgStore::connect(&child_config()).await.expect("a store");
    let mut head = store.head_watch();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 50).await.expect("the log reads");
        for event in &page {
            if event.stream_id.as_str() == END {
                println!("end");
                return;
            }
            println!(
                "{} {} {} {}",
                event.position, event.stream_id, event.stream_version, event.event_id
            );
        }
        match page.last() {
            Some(last) => after = last.position,
            // Woken by the head watch alone: a lost wake-up would stall here,
            // and the parent's deadline would fail the test.
            None => head.changed().await.expect("the store is open"),
        }
    }
}

fn spawn(role: &str, schema: &str, writer: usize) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("this test's path"))
        .env(ROLE, role)
        .env(SCHEMA, schema)
        .env(WRITER, writer.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("a child process");
    ChildGuard(child)
}

/// A child whose output is read from the start, on a thread of its own, so it
/// never blocks on a full pipe (a subscriber must follow the log live, not
/// catch up once the parent gets round to reading).
struct Running {
    child: ChildGuard,
    lines: std::sync::mpsc::Receiver<Vec<String>>,
}

fn drain(mut child: ChildGuard) -> Running {
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let read: Vec<String> = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect();
        let _ = sender.send(read);
    });
    Running { child, lines }
}

/// Everything the child printed, once it has exited successfully (within 120 s).
fn output_lines(mut running: Running) -> Vec<String> {
    let lines = running
        .lines
        .recv_timeout(Duration::from_secs(120))
        .expect("the child finished within 120 s");
    let status = running.child.0.wait().expect("the child exits");
    assert!(status.success(), "a child failed: {status}");
    lines
}

async fn parent() {
    let config = testing::fresh_config().await;
    let store = PgStore::connect(&config).await.expect("a store");
    let subscribers: Vec<Running> = (0..SUBSCRIBERS)
        .map(|n| drain(spawn("subscriber", &config.schema, n)))
        .collect();
    let writers: Vec<Running> = (0..WRITERS)
        .map(|n| drain(spawn("writer", &config.schema, n)))
        .collect();
    let acknowledged: usize = writers
        .into_iter()
        .map(|writer| {
            let lines = output_lines(writer);
            lines
                .iter()
                .find_map(|line| line.strip_prefix("acknowledged "))
                .expect("a writer reports its count")
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    store
        .append(AppendRequest::new(
            StreamId::new(END).unwrap(),
            ExpectedVersion::NoStream,
            vec![NewEvent::new("End", json!({}))],
        ))
        .await
        .expect("the end marker");

    // The truth: the whole log, read once everything has committed.
    let mut log = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, 1000).await.expect("the log reads");
        let Some(last) = page.last() else { break };
        after = last.position;
        log.extend(page.into_iter().filter(|e| e.stream_id.as_str() != END));
    }
    assert_eq!(
        log.len(),
        acknowledged,
        "the log holds every acknowledged event"
    );
    let mut versions: HashMap<&str, u64> = HashMap::new();
    for event in &log {
        let version = versions.entry(event.stream_id.as_str()).or_default();
        *version += 1;
        assert_eq!(
            event.stream_version, *version,
            "in position order, {} goes through versions 1, 2, 3…",
            event.stream_id
        );
    }
    let expected: Vec<String> = log
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {}",
                e.position, e.stream_id, e.stream_version, e.event_id
            )
        })
        .collect();
    for (n, subscriber) in subscribers.into_iter().enumerate() {
        let mut lines = output_lines(subscriber);
        assert_eq!(
            lines.pop().as_deref(),
            Some("end"),
            "subscriber {n} reached the end"
        );
        assert_eq!(
            lines.len(),
            expected.len(),
            "subscriber {n} delivered every event once"
        );
        if let Some(index) = (0..lines.len()).find(|&i| lines[i] != expected[i]) {
            panic!(
                "subscriber {n} differs from the log at delivery {index}: {} instead of {}",
                lines[index], expected[index]
            );
        }
    }
    println!(
        "torture: {WRITERS} writer processes appended {acknowledged} events; \
         {SUBSCRIBERS} subscriber processes each delivered all of them once, in order"
    );
}
