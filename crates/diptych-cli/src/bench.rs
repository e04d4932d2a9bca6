//! `diptych bench`: throughput and latency measured against a floor in the same run.
//!
//! Every scenario is measured twice on the same machine, minutes apart at most:
//! once through the store, and once as the *floor*: the same rows inserted with
//! plain rusqlite into the same schema, with the same durability (WAL,
//! `synchronous=FULL`), in batched transactions as large as the scenario's whole
//! concurrency (writers × events per append), with no store logic at all. The
//! ratio of the two is what to read: it holds on a noisy machine where absolute
//! numbers do not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diptych::sqlite::SqliteStore;
use diptych::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId, Timestamp};
use serde::Serialize;
use serde_json::json;

/// What to run.
#[derive(Clone, Debug)]
pub struct AppendBenchConfig {
    /// Concurrent writers per scenario.
    pub writers: Vec<usize>,
    /// Events per append.
    pub events_per_append: Vec<usize>,
    /// How long each measurement (store and floor alike) runs.
    pub duration: Duration,
    /// Where the database files go (a temporary directory when `None`).
    pub directory: Option<PathBuf>,
}

/// One result line.
#[derive(Debug, Serialize)]
pub struct AppendBenchResult {
    /// Always `append`.
    pub bench: &'static str,
    /// Concurrent writers.
    pub writers: usize,
    /// Events per append.
    pub events_per_append: usize,
    /// `own` (each writer on its own stream, at exact versions) or `hot` (all on
    /// one stream, at any version).
    pub streams: &'static str,
    /// Events made durable per second through the store.
    pub events_per_sec: f64,
    /// Appends acknowledged per second.
    pub appends_per_sec: f64,
    /// Median append latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile append latency, microseconds.
    pub p99_us: u64,
    /// Events per second of the floor.
    pub floor_events_per_sec: f64,
    /// Median floor transaction latency, microseconds.
    pub floor_p50_us: u64,
    /// 99th percentile floor transaction latency, microseconds.
    pub floor_p99_us: u64,
    /// `events_per_sec / floor_events_per_sec`.
    pub ratio: f64,
}

/// Runs every scenario, handing each result to `report` as soon as it is known.
pub async fn run_append(
    config: &AppendBenchConfig,
    mut report: impl FnMut(&AppendBenchResult),
) -> Result<()> {
    let (directory, _temporary) = work_directory(config.directory.as_deref())?;
    let mut run = 0;
    for &hot in &[false, true] {
        for &events_per_append in &config.events_per_append {
            for &writers in &config.writers {
                run += 1;
                let scenario = Scenario {
                    writers,
                    events_per_append,
                    hot,
                };
                let store_path = directory.join(format!("bench-store-{run}.db"));
                let floor_path = directory.join(format!("bench-floor-{run}.db"));
                let (through_store, floor) =
                    measure_alternating(&store_path, &floor_path, scenario, config.duration)
                        .await?;
                remove_database(&store_path);
                remove_database(&floor_path);
                report(&AppendBenchResult {
                    bench: "append",
                    writers,
                    events_per_append,
                    streams: if hot { "hot" } else { "own" },
                    events_per_sec: through_store.events_per_sec,
                    appends_per_sec: through_store.operations_per_sec,
                    p50_us: through_store.p50_us,
                    p99_us: through_store.p99_us,
                    floor_events_per_sec: floor.events_per_sec,
                    floor_p50_us: floor.p50_us,
                    floor_p99_us: floor.p99_us,
                    ratio: through_store.events_per_sec / floor.events_per_sec.max(f64::EPSILON),
                });
            }
        }
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Scenario {
    pub writers: usize,
    pub events_per_append: usize,
    pub hot: bool,
}

pub(crate) struct Measured {
    pub events_per_sec: f64,
    pub operations_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
}

impl Measured {
    pub(crate) fn from_samples(
        events: usize,
        elapsed: Duration,
        mut latencies_us: Vec<u64>,
    ) -> Self {
        latencies_us.sort_unstable();
        let seconds = elapsed.as_secs_f64().max(f64::EPSILON);
        Self {
            events_per_sec: events as f64 / seconds,
            operations_per_sec: latencies_us.len() as f64 / seconds,
            p50_us: percentile(&latencies_us, 0.50),
            p99_us: percentile(&latencies_us, 0.99),
        }
    }
}

/// The `p` quantile (0 to 1) of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// A payload of the size and shape of a typical domain event (about 150 bytes).
///
/// Built once and cloned: the bench measures the store, so its clients should
/// spend as little of the two shared cores as an application's would.
pub(crate) fn payload_template() -> serde_json::Value {
    json!({
        "order_id": "order-0193a1c2-7f55-7000-8000-000000000000",
        "customer_id": "customer-42",
        "lines": [{"product_id": "product-17", "quantity": 2, "price_cents": 1299}],
        "total_cents": 2598,
    })
}

/// Alternates short slices of the store and the floor, so that both see the same
/// disk and the same neighbours: a disk that slows down for a second slows both.
pub(crate) const SLICES: u32 = 10;

async fn measure_alternating(
    store_path: &Path,
    floor_path: &Path,
    scenario: Scenario,
    duration: Duration,
) -> Result<(Measured, Measured)> {
    let store: Arc<dyn EventStore> = Arc::new(
        SqliteStore::open(store_path)
            .with_context(|| format!("opening {}", store_path.display()))?,
    );
    let mut floor = Floor::open(floor_path, scenario)?;
    let slice = duration / SLICES;
    let mut store_events = 0;
    let mut store_latencies = Vec::new();
    let mut store_elapsed = Duration::ZERO;
    // Each writer's stream and version carry over from slice to slice, so the
    // store's streams grow exactly as the floor's do.
    let mut versions = vec![0; scenario.writers];
    for _ in 0..SLICES {
        store_slice(
            &store,
            scenario,
            &mut versions,
            slice,
            (&mut store_events, &mut store_latencies, &mut store_elapsed),
        )
        .await?;
        floor.run_for(slice)?;
    }
    Ok((
        Measured::from_samples(store_events, store_elapsed, store_latencies),
        floor.measured(),
    ))
}

/// Runs every writer against `store` for one slice, adding what they did to
/// `(events, latencies, elapsed)`.
pub(crate) async fn store_slice(
    store: &Arc<dyn EventStore>,
    scenario: Scenario,
    versions: &mut [u64],
    slice: Duration,
    (events, latencies, elapsed): (&mut usize, &mut Vec<u64>, &mut Duration),
) -> Result<()> {
    let started = Instant::now();
    let deadline = started + slice;
    let tasks: Vec<_> = versions
        .iter()
        .enumerate()
        .map(|(writer, &version)| {
            let store = Arc::clone(store);
            tokio::spawn(
                async move { append_until(store, scenario, writer, version, deadline).await },
            )
        })
        .collect();
    for (writer, task) in tasks.into_iter().enumerate() {
        let run = task.await.context("a bench writer panicked")??;
        *events += run.events;
        latencies.extend(run.latencies_us);
        versions[writer] = run.version;
    }
    *elapsed += started.elapsed();
    Ok(())
}

/// What one writer did in one slice.
struct WriterRun {
    events: usize,
    latencies_us: Vec<u64>,
    /// The version of its stream afterwards (own streams only).
    version: u64,
}

async fn append_until(
    store: Arc<dyn EventStore>,
    scenario: Scenario,
    writer: usize,
    mut version: u64,
    deadline: Instant,
) -> Result<WriterRun> {
    // The same stream names as the floor's rows.
    let stream = if scenario.hot {
        StreamId::new("bench-hot")?
    } else {
        StreamId::new(format!("bench-{writer}"))?
    };
    let mut events = 0;
    let mut latencies = Vec::new();
    let template = payload_template();
    while Instant::now() < deadline {
        let batch = (0..scenario.events_per_append)
            .map(|_| NewEvent::new("OrderPlaced", template.clone()))
            .collect();
        let expected = if scenario.hot {
            ExpectedVersion::Any
        } else {
            ExpectedVersion::Exact(version)
        };
        let started = Instant::now();
        let outcome = store
            .append(AppendRequest::new(stream.clone(), expected, batch))
            .await?;
        latencies.push(started.elapsed().as_micros() as u64);
        version = outcome.last_version();
        events += scenario.events_per_append;
    }
    Ok(WriterRun {
        events,
        latencies_us: latencies,
        version,
    })
}

/// The floor's connection settings: the store's durability (WAL, fsync at every
/// commit) and its page cache size, so the floor is not slowed by a smaller cache.
pub(crate) const FLOOR_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA cache_size = -65536;";

/// The floor: the same rows, same schema, same durability, batched, no store.
struct Floor {
    connection: rusqlite::Connection,
    scenario: Scenario,
    payload: String,
    versions: Vec<i64>,
    hot_version: i64,
    position: i64,
    latencies: Vec<u64>,
    events: usize,
    /// Only time inside transactions counts, so the floor is the database's own
    /// speed with row preparation excluded: a strict floor.
    busy: Duration,
}

impl Floor {
    fn open(path: &Path, scenario: Scenario) -> Result<Self> {
        // Let the store create the schema so the floor writes into exactly the
        // same tables and indexes.
        drop(SqliteStore::open(path).with_context(|| format!("opening {}", path.display()))?);
        let connection = rusqlite::Connection::open(path)?;
        connection.execute_batch(FLOOR_PRAGMAS)?;
        Ok(Self {
            connection,
            scenario,
            payload: payload_template().to_string(),
            versions: vec![0; scenario.writers],
            hot_version: 0,
            position: 0,
            latencies: Vec::new(),
            events: 0,
            busy: Duration::ZERO,
        })
    }

    fn run_for(&mut self, duration: Duration) -> Result<()> {
        let scenario = self.scenario;
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline {
            // Prepared outside the timed part, as the store's callers serialize
            // payloads before the writer sees them.
            let mut rows = Vec::with_capacity(scenario.writers * scenario.events_per_append);
            for writer in 0..scenario.writers {
                for _ in 0..scenario.events_per_append {
                    self.position += 1;
                    let (stream, version) = if scenario.hot {
                        self.hot_version += 1;
                        ("bench-hot".to_owned(), self.hot_version)
                    } else {
                        self.versions[writer] += 1;
                        (format!("bench-{writer}"), self.versions[writer])
                    };
                    rows.push((self.position, stream, version, uuid::Uuid::now_v7()));
                }
            }
            let elapsed = insert_floor_rows(&mut self.connection, &rows, &self.payload)?;
            self.busy += elapsed;
            // Every writer's append in this round waited for this one transaction.
            self.latencies.extend(std::iter::repeat_n(
                elapsed.as_micros() as u64,
                scenario.writers,
            ));
            self.events += rows.len();
        }
        Ok(())
    }

    fn measured(self) -> Measured {
        Measured::from_samples(self.events, self.busy, self.latencies)
    }
}

/// Inserts one floor transaction of `(position, stream, version, event id)` rows
/// with plain rusqlite into the store's `events` table, and returns how long the
/// transaction took (preparing the rows is the caller's, and is not counted).
pub(crate) fn insert_floor_rows(
    connection: &mut rusqlite::Connection,
    rows: &[(i64, String, i64, uuid::Uuid)],
    payload: &str,
) -> Result<Duration> {
    let transaction_started = Instant::now();
    let transaction = connection.transaction()?;
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO events (position, stream_id, version, event_id, event_type, \
             schema_version, payload, metadata, recorded_at) \
             VALUES (?1, ?2, ?3, ?4, 'OrderPlaced', 1, ?5, '{}', ?6)",
        )?;
        let recorded_at = Timestamp::now().as_unix_micros();
        for (position, stream, version, event_id) in rows {
            insert.execute(rusqlite::params![
                position,
                stream,
                version,
                event_id.as_bytes().as_slice(),
                payload,
                recorded_at
            ])?;
        }
    }
    transaction.commit()?;
    Ok(transaction_started.elapsed())
}

/// The directory a bench's files go in: the one given (created if missing), or
/// a temporary one, removed when the returned guard is dropped.
pub(crate) fn work_directory(given: Option<&Path>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    let (directory, temporary) = match given {
        Some(directory) => (directory.to_owned(), None),
        None => {
            let temporary = tempfile::tempdir().context("creating a temporary directory")?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };
    std::fs::create_dir_all(&directory)
        .with_context(|| format!("creating {}", directory.display()))?;
    Ok((directory, temporary))
}

/// Removes an SQLite database and its WAL and shared-memory files.
pub fn remove_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(file));
    }
}
