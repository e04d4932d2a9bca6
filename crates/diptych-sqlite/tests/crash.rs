//! Crash safety: an acknowledged append survives `kill -9`, and no append is ever
//! half there.
//!
//! This binary plays two parts. Run by `cargo test`, it is the parent: it starts
//! itself again as a child (marked by an environment variable), lets the child
//! append under load from many tasks while printing one line per acknowledged
//! append, kills it with SIGKILL at a random moment, reopens the store and checks:
//!
//! * every acknowledged append is there, at the versions and positions it was
//!   acknowledged with;
//! * every append is whole (each event says how many its append held);
//! * every stream's versions are 1..n, and positions strictly increase;
//! * SQLite's own integrity check passes.
//!
//! Under `CI=true` it runs at least 100 kill cycles; otherwise 10, so a laptop run
//! stays quick. `DIPTYCH_CRASH_CYCLES` overrides both.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use diptych_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, Position, StreamId, StreamRead,
};
use diptych_sqlite::SqliteStore;
use serde_json::json;

const CHILD_DATABASE: &str = "DIPTYCH_CRASH_CHILD_DATABASE";
const CHILD_CYCLE: &str = "DIPTYCH_CRASH_CHILD_CYCLE";
const WRITERS: usize = 8;

fn main() {
    if let Ok(path) = std::env::var(CHILD_DATABASE) {
        let cycle: u64 = std::env::var(CHILD_CYCLE)
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        run_child(PathBuf::from(path), cycle);
        return;
    }
    let cycles = std::env::var("DIPTYCH_CRASH_CYCLES")
        .ok()
        .and_then(|cycles| cycles.parse().ok())
        .unwrap_or(if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            100
        } else {
            10
        });
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("crash.db");
    let mut acknowledged: Vec<Ack> = Vec::new();
    let mut killed_mid_work = 0;
    for cycle in 0..cycles {
        let acks = run_and_kill(&path, cycle);
        if !acks.is_empty() {
            killed_mid_work += 1;
        }
        acknowledged.extend(acks);
        verify(&path, &acknowledged);
    }
    let events: u64 = acknowledged
        .iter()
        .map(|ack| ack.last_version - ack.first_version + 1)
        .sum();
    println!(
        "crash test: {cycles} SIGKILL cycles ({killed_mid_work} while appending), \
         {} acknowledged appends ({events} events) all present after every restart",
        acknowledged.len()
    );
    assert!(
        killed_mid_work > 0,
        "the child never acknowledged an append before being killed"
    );
    println!("1 passed, 0 failed");
}

/// One acknowledged append, as the child reported it.
#[derive(Clone, Debug)]
struct Ack {
    stream: String,
    first_version: u64,
    last_version: u64,
    first_position: u64,
}

fn run_and_kill(path: &Path, cycle: u64) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().expect("own executable"))
        .env(CHILD_DATABASE, path)
        .env(CHILD_CYCLE, cycle.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the child");
    let stdout = child.stdout.take().expect("child stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .filter_map(|line| parse_ack(&line))
            .collect::<Vec<Ack>>()
    });
    // A random moment: sometimes while the store opens, mostly mid-append.
    std::thread::sleep(Duration::from_millis(fastrand::u64(5..250)));
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    reader.join().expect("reader thread")
}

fn parse_ack(line: &str) -> Option<Ack> {
    // "ack <stream> <first_version> <last_version> <first_position> end": a line
    // cut short by the kill lacks its "end" and is not an acknowledgement.
    let mut fields = line.split(' ');
    let (Some("ack"), Some(stream), Some(first), Some(last), Some(position), Some("end")) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return None;
    };
    Some(Ack {
        stream: stream.to_owned(),
        first_version: first.parse().ok()?,
        last_version: last.parse().ok()?,
        first_position: position.parse().ok()?,
    })
}

fn verify(path: &Path, acknowledged: &[Ack]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let store = SqliteStore::open(path).expect("the store reopens after SIGKILL");
        let mut log = Vec::new();
        let mut after = Position::START;
        loop {
            let page = store.read_all(after, 1000).await.expect("read the log");
            let Some(last) = page.last() else { break };
            after = last.position;
            log.extend(page);
        }
        for pair in log.windows(2) {
            assert!(
                pair[0].position < pair[1].position,
                "positions must strictly increase"
            );
        }
        assert_eq!(
            store.head().await.unwrap(),
            after,
            "head is the last readable position"
        );

        let mut streams: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        let mut appends: HashMap<String, (u64, u64)> = HashMap::new();
        for event in &log {
            streams
                .entry(event.stream_id.as_str())
                .or_default()
                .push(event.stream_version);
            let append = event.payload["append"]
                .as_str()
                .expect("append id")
                .to_owned();
            let count = event.payload["count"].as_u64().expect("count");
            let entry = appends.entry(append).or_insert((0, count));
            entry.0 += 1;
        }
        for (stream, versions) in &streams {
            let dense: Vec<u64> = (1..=versions.len() as u64).collect();
            assert_eq!(
                versions, &dense,
                "versions of {stream} must be 1..n in log order"
            );
        }
        for (append, (seen, count)) in &appends {
            assert_eq!(
                seen, count,
                "append {append} is partial: {seen} of {count} events"
            );
        }
        // Checked against the log read above, in memory: reading each of the
        // thousands of acknowledged appends back one by one would dominate the run.
        let positions: HashMap<(&str, u64), u64> = log
            .iter()
            .map(|event| {
                (
                    (event.stream_id.as_str(), event.stream_version),
                    event.position.0,
                )
            })
            .collect();
        for ack in acknowledged {
            for version in ack.first_version..=ack.last_version {
                let position = positions.get(&(ack.stream.as_str(), version));
                assert!(
                    position.is_some(),
                    "acknowledged append {ack:?} lost version {version}"
                );
            }
            assert_eq!(
                positions.get(&(ack.stream.as_str(), ack.first_version)),
                Some(&ack.first_position),
                "acknowledged append {ack:?} moved"
            );
        }
        let one = acknowledged
            .last()
            .map(|ack| StreamId::new(ack.stream.clone()).unwrap());
        if let Some(stream) = one {
            // And once through the stream API, which readers use.
            let events = store
                .read_stream(StreamRead::backward(stream, u64::MAX, 1))
                .await;
            assert!(events.is_ok_and(|events| events.len() == 1));
        }
        drop(store);
        let connection = rusqlite::Connection::open(path).unwrap();
        let integrity: String = connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(integrity, "ok");
    });
}

fn run_child(path: PathBuf, cycle: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).expect("open"));
        let writers: Vec<_> = (0..WRITERS)
            .map(|writer| {
                let store = Arc::clone(&store);
                tokio::spawn(async move { append_forever(store, cycle, writer).await })
            })
            .collect();
        for writer in writers {
            let _ = writer.await;
        }
    });
}

async fn append_forever(store: Arc<dyn EventStore>, cycle: u64, writer: usize) {
    let mut versions = [0u64; 4];
    for sequence in 0u64.. {
        // Mostly this writer's own streams at exact versions; sometimes a stream all
        // writers share, appended at any version.
        let (stream, expected) = if sequence % 5 == 4 {
            (format!("shared-{}", sequence % 3), ExpectedVersion::Any)
        } else {
            let slot = (sequence % 4) as usize;
            (
                format!("w-{cycle}-{writer}-{slot}"),
                ExpectedVersion::Exact(versions[slot]),
            )
        };
        let count = 1 + (sequence % 5);
        let append_id = format!("{cycle}-{writer}-{sequence}");
        let events = (0..count)
            .map(|index| {
                NewEvent::new(
                    "Appended",
                    json!({"append": append_id, "index": index, "count": count}),
                )
            })
            .collect();
        let request = AppendRequest::new(StreamId::new(stream.clone()).unwrap(), expected, events);
        let outcome = store.append(request).await.expect("append");
        if let ExpectedVersion::Exact(_) = expected {
            versions[(sequence % 4) as usize] = outcome.last_version();
        }
        let first = &outcome.events[0];
        let line = format!(
            "ack {stream} {} {} {} end\n",
            first.stream_version,
            outcome.last_version(),
            first.position.0
        );
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(line.as_bytes());
        let _ = stdout.flush();
    }
}
