//! `diptych bench project` and `diptych bench lag`: the query side against floors
//! measured in the same run.
//!
//! * **project**: a projection catching up on a large log, one document upsert
//!   per event, committed by the runner in batches with its checkpoint. The floor
//!   is the same upserts (same keys, same document text, same batch size) done
//!   directly with rusqlite into the same table shape with the same PRAGMAs: no
//!   log to read, no runner, no checkpoint. Peak RSS during the catch-up shows
//!   that memory stays bounded whatever the log's length.
//! * **lag**: appends at a steady rate while the projection follows live; for
//!   each event, the time from the append's acknowledgement to the view having
//!   committed it. The floor is a bare subscription in the same run: the time
//!   from acknowledgement to the event being read, with no view to write.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{
    AppendRequest, CollectionSpec, Declaration, EventStore, ExpectedVersion, HandlerError,
    HandlerKind, NewEvent, Position, Projection, RecordedEvent, RunnerConfig, StreamId,
    Subscription, ViewStore, ViewTx, spawn_projection, wait_for,
};
use serde::Serialize;
use serde_json::json;

use crate::bench::{percentile, remove_database};

/// The bench projection's collection.
pub(crate) const COLLECTION: &str = "bench-docs";
/// Events appended per append while seeding the log.
const SEED_BATCH: u64 = 1000;

/// The projection measured: each event's payload becomes the document under its
/// `key`, so every event is one upsert.
struct Upserts;

#[async_trait]
impl Projection for Upserts {
    fn name(&self) -> &str {
        "bench-upserts"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new(COLLECTION)]
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        let key = event.payload["key"].as_str().unwrap_or_default();
        views.put(COLLECTION, key, &event.payload)?;
        Ok(())
    }
}

/// The bench projection as a view store registers it.
pub(crate) fn declaration() -> Declaration {
    Declaration {
        name: Upserts.name().to_owned(),
        kind: HandlerKind::Projection,
        collections: Upserts.collections(),
    }
}

/// How many keys a log of `events` events updates: one event in ten updates a
/// key again.
pub(crate) fn distinct_keys(events: u64) -> u64 {
    (events / 10).max(1)
}

/// The payload of the `n`th event: a document of typical size, keyed so that one
/// key in ten is updated again later.
pub(crate) fn document(n: u64, distinct_keys: u64) -> serde_json::Value {
    json!({
        "key": format!("customer-{}", n % distinct_keys),
        "name": "Ada Lovelace",
        "orders": n % 97,
        "lifetime_value_cents": n * 1299 % 1_000_000,
        "last_order": format!("order-{n}"),
    })
}

/// One `bench project` result.
#[derive(Debug, Serialize)]
pub struct ProjectResult {
    /// Always `project`.
    pub bench: &'static str,
    /// Events in the log.
    pub events: u64,
    /// Events per transaction (the runner's batch size, and the floor's).
    pub batch: usize,
    /// Events applied per second by the projection.
    pub events_per_sec: f64,
    /// Upserts per second by the floor.
    pub floor_events_per_sec: f64,
    /// `events_per_sec / floor_events_per_sec`.
    pub ratio: f64,
    /// The resident memory when the catch-up started, in MiB (what seeding the
    /// log left behind, when this run seeded it).
    pub start_rss_mib: f64,
    /// The peak resident memory during the catch-up, in MiB.
    pub peak_rss_mib: f64,
}

impl ProjectResult {
    /// The result of a catch-up of `events` events against a floor that took
    /// `floor_seconds`.
    pub(crate) fn new(
        bench: &'static str,
        events: u64,
        batch: usize,
        catch_up: CatchUp,
        floor_seconds: f64,
    ) -> Self {
        let events_per_sec = events as f64 / catch_up.seconds;
        let floor_events_per_sec = events as f64 / floor_seconds;
        Self {
            bench,
            events,
            batch,
            events_per_sec,
            floor_events_per_sec,
            ratio: events_per_sec / floor_events_per_sec,
            start_rss_mib: catch_up.start_rss_mib,
            peak_rss_mib: catch_up.peak_rss_mib,
        }
    }
}

/// Seeds a log of `events` events, then measures the floor and the projection's
/// catch-up.
pub async fn run_project(
    events: u64,
    batch: usize,
    directory: Option<PathBuf>,
) -> Result<ProjectResult> {
    let temporary = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = directory.unwrap_or_else(|| temporary.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let distinct_keys = distinct_keys(events);
    let store: Arc<dyn EventStore> = Arc::new(
        SqliteStore::open(dir.join("bench-events.db")).context("opening the bench event store")?,
    );
    seed(&*store, events, distinct_keys).await?;

    let floor_path = dir.join("bench-floor.db");
    remove_database(&floor_path);
    let floor_seconds = tokio::task::spawn_blocking(move || {
        floor_upserts(&floor_path, events, distinct_keys, batch)
    })
    .await
    .context("the floor task")??;

    let views_path = dir.join("bench-views.db");
    remove_database(&views_path);
    let views: Arc<dyn ViewStore> =
        Arc::new(SqliteViews::open(&views_path).context("opening the bench views")?);
    let catch_up = catch_up(store, views, batch).await?;
    Ok(ProjectResult::new(
        "project",
        events,
        batch,
        catch_up,
        floor_seconds,
    ))
}

/// What a projection's catch-up took.
pub(crate) struct CatchUp {
    seconds: f64,
    start_rss_mib: f64,
    peak_rss_mib: f64,
}

/// Runs the bench projection over the whole log in `store` into `views`,
/// `batch` events per transaction, until it has applied the head.
pub(crate) async fn catch_up(
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    batch: usize,
) -> Result<CatchUp> {
    reset_peak_rss();
    let start_rss_mib = memory_kib("VmRSS:") as f64 / 1024.0;
    let started = Instant::now();
    let config = RunnerConfig {
        batch_size: batch,
        ..RunnerConfig::default()
    };
    let runner = spawn_projection(
        store.clone(),
        views.clone(),
        Arc::new(Upserts),
        HandlerKind::Projection,
        config,
    )
    .await?;
    let head = store.head().await?;
    wait_for(&*views, COLLECTION, head, Duration::from_secs(3600)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss_mib = memory_kib("VmHWM:") as f64 / 1024.0;
    runner.stop().await;
    Ok(CatchUp {
        seconds,
        start_rss_mib,
        peak_rss_mib,
    })
}

async fn seed(store: &dyn EventStore, events: u64, distinct_keys: u64) -> Result<()> {
    let existing = store.head().await?.0;
    anyhow::ensure!(
        existing == 0 || existing == events,
        "the bench directory holds a log of {existing} events, not {events}: pass another --dir"
    );
    if existing == events {
        return Ok(());
    }
    for chunk in 0..events.div_ceil(SEED_BATCH) {
        append_chunk(store, chunk, SEED_BATCH, events, distinct_keys).await?;
    }
    Ok(())
}

/// Appends the `chunk`th run of `size` events of a log of `events` events, to
/// a stream of its own.
pub(crate) async fn append_chunk(
    store: &dyn EventStore,
    chunk: u64,
    size: u64,
    events: u64,
    distinct_keys: u64,
) -> Result<()> {
    let first = chunk * size;
    let batch = (first..(first + size).min(events))
        .map(|i| NewEvent::new("CustomerUpdated", document(i, distinct_keys)))
        .collect();
    let stream = StreamId::new(format!("seed-{chunk}"))?;
    store
        .append(AppendRequest::new(stream, ExpectedVersion::NoStream, batch))
        .await?;
    Ok(())
}

/// The floor: the same upserts straight into SQLite, same schema and PRAGMAs as
/// the view store, `batch` per transaction. Returns the seconds it took.
fn floor_upserts(path: &Path, events: u64, distinct_keys: u64, batch: usize) -> Result<f64> {
    let mut connection = rusqlite::Connection::open(path)?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA cache_size = -65536;
         CREATE TABLE docs (key TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;",
    )?;
    let started = Instant::now();
    let mut n = 0;
    while n < events {
        let transaction = connection.transaction()?;
        {
            let mut statement = transaction.prepare_cached(
                "INSERT INTO docs (key, doc) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET doc = excluded.doc",
            )?;
            for i in n..(n + batch as u64).min(events) {
                let document = document(i, distinct_keys);
                let key = document["key"].as_str().unwrap_or_default().to_owned();
                statement.execute(rusqlite::params![key, document.to_string()])?;
            }
        }
        transaction.commit()?;
        n += batch as u64;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One `bench lag` result.
#[derive(Debug, Serialize)]
pub struct LagResult {
    /// Always `lag`.
    pub bench: &'static str,
    /// Appends per second asked for.
    pub rate: u64,
    /// Appends per second achieved.
    pub achieved_rate: f64,
    /// Events measured.
    pub events: usize,
    /// Acknowledgement to view committed, median, in microseconds.
    pub p50_us: u64,
    /// The same, 99th percentile.
    pub p99_us: u64,
    /// The same, worst.
    pub max_us: u64,
    /// Acknowledgement to a bare subscription having read it, median.
    pub floor_p50_us: u64,
    /// The same, 99th percentile.
    pub floor_p99_us: u64,
    /// The same, worst.
    pub floor_max_us: u64,
}

/// Appends one event at a time at `rate` per second for `duration` while the
/// projection and a bare subscription follow, and measures each one's lag.
pub async fn run_lag(
    rate: u64,
    duration: Duration,
    directory: Option<PathBuf>,
) -> Result<LagResult> {
    let temporary = tempfile::tempdir().context("creating a temporary directory")?;
    let dir = directory.unwrap_or_else(|| temporary.path().to_owned());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in ["lag-events.db", "lag-views.db"] {
        remove_database(&dir.join(name));
    }
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.join("lag-events.db"))?);
    let views: Arc<dyn ViewStore> = Arc::new(SqliteViews::open(dir.join("lag-views.db"))?);
    let runner = spawn_projection(
        store.clone(),
        views.clone(),
        Arc::new(Upserts),
        HandlerKind::Projection,
        RunnerConfig::default(),
    )
    .await?;

    // When each position was applied to the view, and read by a bare subscriber.
    let applied = Arc::new(Mutex::new(Vec::<(Position, Instant)>::new()));
    let observer = {
        let applied = applied.clone();
        let mut watch = views.checkpoint_watch("bench-upserts");
        tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                let position = *watch.borrow_and_update();
                applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((position, Instant::now()));
            }
        })
    };
    let read = Arc::new(Mutex::new(Vec::<(Position, Instant)>::new()));
    let subscriber = {
        let read = read.clone();
        let mut subscription = Subscription::new(store.clone(), Position::START);
        tokio::spawn(async move {
            while let Ok(batch) = subscription.next_batch().await {
                let now = Instant::now();
                if let Some(last) = batch.last() {
                    read.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((last.position, now));
                }
            }
        })
    };

    let acknowledged = Arc::new(Mutex::new(Vec::<(Position, Instant)>::new()));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut appends = Vec::new();
    let mut n = 0u64;
    while started.elapsed() < duration {
        ticker.tick().await;
        let store = store.clone();
        let acknowledged = acknowledged.clone();
        n += 1;
        appends.push(tokio::spawn(async move {
            let stream = StreamId::new(format!("customer-{}", n % 1000))?;
            let event = NewEvent::new("CustomerUpdated", document(n, 1000));
            let outcome = store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::Any,
                    vec![event],
                ))
                .await?;
            let now = Instant::now();
            acknowledged
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((outcome.last_position(), now));
            anyhow::Ok(())
        }));
    }
    for append in appends {
        append.await.context("an append task")??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let head = store.head().await?;
    wait_for(&*views, COLLECTION, head, Duration::from_secs(60)).await?;
    // Let the subscriber and the observer record the last positions.
    tokio::time::sleep(Duration::from_millis(100)).await;
    runner.stop().await;
    observer.abort();
    subscriber.abort();

    let mut acknowledged =
        std::mem::take(&mut *acknowledged.lock().unwrap_or_else(|p| p.into_inner()));
    acknowledged.sort();
    let lags = lags_us(
        &acknowledged,
        &applied.lock().unwrap_or_else(|p| p.into_inner()),
    );
    let floor = lags_us(
        &acknowledged,
        &read.lock().unwrap_or_else(|p| p.into_inner()),
    );
    Ok(LagResult {
        bench: "lag",
        rate,
        achieved_rate: acknowledged.len() as f64 / elapsed,
        events: acknowledged.len(),
        p50_us: percentile(&lags, 0.50),
        p99_us: percentile(&lags, 0.99),
        max_us: lags.last().copied().unwrap_or(0),
        floor_p50_us: percentile(&floor, 0.50),
        floor_p99_us: percentile(&floor, 0.99),
        floor_max_us: floor.last().copied().unwrap_or(0),
    })
}

/// For each acknowledged position, the time until the first observation at or
/// past it (zero when it was observed before the acknowledgement reached its
/// caller); sorted.
fn lags_us(acknowledged: &[(Position, Instant)], observed: &[(Position, Instant)]) -> Vec<u64> {
    let mut lags = Vec::with_capacity(acknowledged.len());
    let mut next = 0;
    for (position, acked_at) in acknowledged {
        while next < observed.len() && observed[next].0 < *position {
            next += 1;
        }
        if let Some((_, seen_at)) = observed.get(next) {
            lags.push(seen_at.saturating_duration_since(*acked_at).as_micros() as u64);
        }
    }
    lags.sort_unstable();
    lags
}

/// Resets the kernel's record of this process's peak resident memory, so the next
/// reading covers only what follows.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A memory figure of this process from `/proc/self/status` (`VmRSS:`, or
/// `VmHWM:` for the peak since the last reset), in KiB; 0 where unknown.
pub(crate) fn memory_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}
