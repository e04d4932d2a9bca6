//! `diptych bench command`: what users run, `Repository::execute` (load, decide,
//! append) through the public API with its default configuration, against the
//! floor of `bench append` in the same run.
//!
//! Each command decides one event of about 150 bytes. Scenarios:
//!
//! - `new`: every command creates an aggregate;
//! - `existing`: commands on `--existing` aggregates (10,000) visited in a
//!   shuffled order, each writer on its own share, after one untimed pass (the
//!   warm path: a default-sized cache holds them all);
//! - `cold`: the same on `--aggregates` aggregates (200,000) with the aggregate
//!   cache off, so every command loads its aggregate from the store;
//! - `hot`: every writer commands one aggregate; commands that run out of
//!   retries count in `gave_up`.
//!
//! **The floor** writes the same rows (same streams, next versions, same payload)
//! with no diptych logic, as `bench append`'s floor does: on SQLite, plain
//! rusqlite inserts into a copy of the store's file, one transaction per round
//! of one row per writer, only the time inside transactions counted; on
//! PostgreSQL, one multi-row INSERT per committed transaction from as many
//! connections as writers, into a copy of the store's table. Store and floor
//! alternate in slices, so both see the same disk.
//!
//! `load_10k` loads one aggregate of 10,000 events (no snapshot) and compares it
//! with reading the same rows with a plain `SELECT` on the same kind of
//! connection, each column into an owned value and the payload parsed as JSON
//! (what any reader of events must do).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use diptych::postgres::{PgConfig, PgStore};
use diptych::sqlite::SqliteStore;
use diptych::{
    Aggregate, AppendRequest, CommandContext, CommandError, EventStore, ExpectedVersion,
    Repository, RepositoryConfig, StreamId,
};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::bench::{
    FLOOR_PRAGMAS, SLICES, insert_floor_rows, percentile, remove_database, work_directory,
};
use crate::bench_pg::{FLOOR_INSERT, connect, drop_schemas, stamp};

/// The scenarios, in the order they run.
pub const SCENARIOS: [&str; 5] = ["new", "existing", "cold", "hot", "load_10k"];

/// What to run.
#[derive(Clone, Debug)]
pub struct CommandBenchConfig {
    /// A PostgreSQL URL; SQLite files in `directory` when `None`.
    pub postgres: Option<String>,
    /// Which of [`SCENARIOS`] to run.
    pub scenarios: Vec<String>,
    /// Concurrent writers; by default 1, 16, 64, 256 on SQLite (`hot` without
    /// 256) and 1, 16, 32 on PostgreSQL.
    pub writers: Option<Vec<usize>>,
    /// How long each measurement (store and floor alike) runs.
    pub duration: Duration,
    /// Aggregates of the `cold` scenario.
    pub cold_aggregates: usize,
    /// Aggregates of the `existing` scenario.
    pub existing_aggregates: usize,
    /// The aggregate cache's capacity for `new`, `existing` and `hot` (the
    /// repository's default when `None`); `cold` always runs without a cache.
    pub cache_capacity: Option<usize>,
    /// Where SQLite files go (a temporary directory when `None`).
    pub directory: Option<PathBuf>,
}

/// One result line of a command scenario.
#[derive(Debug, Serialize)]
pub struct CommandResult {
    /// `command` (SQLite) or `command-postgres`.
    pub bench: &'static str,
    /// `new`, `existing`, `cold` or `hot`.
    pub scenario: &'static str,
    /// Concurrent writers.
    pub writers: usize,
    /// Commands that wrote their event, per second.
    pub commands_per_sec: f64,
    /// Median command latency, microseconds.
    pub p50_us: u64,
    /// 99th percentile command latency, microseconds.
    pub p99_us: u64,
    /// Rows per second of the floor.
    pub floor_per_sec: f64,
    /// `commands_per_sec / floor_per_sec`.
    pub ratio: f64,
    /// Commands decided again after another writer appended first.
    pub conflicts_retried: u64,
    /// Commands that ran out of retries (only `hot` should have any).
    pub gave_up: u64,
}

/// The result line of `load_10k`.
#[derive(Debug, Serialize)]
pub struct LoadResult {
    /// `command` (SQLite) or `command-postgres`.
    pub bench: &'static str,
    /// Always `load_10k`.
    pub scenario: &'static str,
    /// Median time of `Repository::load` of the aggregate, milliseconds.
    pub load_10k_ms: f64,
    /// Median time of the plain `SELECT` of the same rows, milliseconds.
    pub floor_ms: f64,
}

/// A line of output.
pub enum Line {
    /// A command scenario.
    Command(CommandResult),
    /// The load of a long aggregate.
    Load(LoadResult),
}

/// Runs the chosen scenarios, handing each line to `report` as soon as it is
/// known.
pub async fn run(config: &CommandBenchConfig, mut report: impl FnMut(&Line)) -> Result<()> {
    for scenario in &config.scenarios {
        if !SCENARIOS.contains(&scenario.as_str()) {
            bail!(
                "unknown scenario `{scenario}`: choose among {}",
                SCENARIOS.join(", ")
            );
        }
    }
    // Held until the bench ends, so a temporary directory outlives its files.
    let mut _temporary = None;
    let backend = match &config.postgres {
        Some(url) => Backend::Postgres {
            url: url.clone(),
            stamp: stamp()?,
            admin: connect(url, None).await?,
        },
        None => {
            let (directory, guard) = work_directory(config.directory.as_deref())?;
            _temporary = guard;
            Backend::Sqlite { directory }
        }
    };
    for name in SCENARIOS {
        if !config.scenarios.iter().any(|chosen| chosen == name) {
            continue;
        }
        if name == "load_10k" {
            report(&Line::Load(backend.load_10k().await?));
            continue;
        }
        let scenario = Scenario::named(name, config);
        let mut bench = backend.prepare(scenario).await?;
        let writer_counts = config
            .writers
            .clone()
            .unwrap_or_else(|| backend.default_writers(scenario.kind));
        let measured = async {
            for writers in writer_counts {
                let result = bench.measure(writers, config.duration).await?;
                report(&Line::Command(result));
            }
            anyhow::Ok(())
        }
        .await;
        let cleaned = bench.clean_up(&backend).await;
        measured?;
        cleaned?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    New,
    Existing,
    Cold,
    Hot,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    name: &'static str,
    kind: Kind,
    /// Aggregates seeded before measuring.
    aggregates: usize,
    cache_capacity: usize,
}

impl Scenario {
    fn named(name: &'static str, config: &CommandBenchConfig) -> Self {
        let default_cache = config
            .cache_capacity
            .unwrap_or(RepositoryConfig::default().cache_capacity);
        let (kind, aggregates, cache_capacity) = match name {
            "new" => (Kind::New, 0, default_cache),
            "existing" => (Kind::Existing, config.existing_aggregates, default_cache),
            "cold" => (Kind::Cold, config.cold_aggregates, 0),
            _ => (Kind::Hot, 1, default_cache),
        };
        Self {
            name,
            kind,
            aggregates,
            cache_capacity,
        }
    }
}

/// The aggregate the bench commands: an order that is placed, then gains lines.
#[derive(Default, Serialize, Deserialize)]
struct BenchOrder {
    placed: bool,
    lines: u64,
    total_cents: u64,
}

#[derive(Clone, Copy, Debug)]
enum BenchCommand {
    Place,
    AddLine,
}

#[derive(Debug, Serialize, Deserialize)]
struct Line150 {
    product_id: String,
    quantity: u32,
    price_cents: u64,
}

/// About 150 bytes of JSON each, as `bench append`'s rows.
#[derive(Debug, Serialize, Deserialize)]
enum BenchEvent {
    OrderPlaced {
        customer_id: String,
        lines: Vec<Line150>,
        total_cents: u64,
        note: String,
    },
    LineAdded {
        customer_id: String,
        lines: Vec<Line150>,
        total_cents: u64,
        note: String,
    },
}

#[derive(Debug, thiserror::Error)]
enum BenchRefusal {
    #[error("the order is already placed")]
    AlreadyPlaced,
    #[error("the order is not placed")]
    NotPlaced,
}

impl Aggregate for BenchOrder {
    const KIND: &'static str = "order";
    type Command = BenchCommand;
    type Event = BenchEvent;
    type Error = BenchRefusal;

    fn decide(&self, command: &BenchCommand) -> Result<Vec<BenchEvent>, BenchRefusal> {
        let (customer_id, lines, total_cents, note) = (
            "customer-42".to_owned(),
            vec![Line150 {
                product_id: "product-17".to_owned(),
                quantity: 2,
                price_cents: 1299,
            }],
            self.total_cents + 2598,
            "leave at the door".to_owned(),
        );
        match (command, self.placed) {
            (BenchCommand::Place, true) => Err(BenchRefusal::AlreadyPlaced),
            (BenchCommand::AddLine, false) => Err(BenchRefusal::NotPlaced),
            (BenchCommand::Place, false) => Ok(vec![BenchEvent::OrderPlaced {
                customer_id,
                lines,
                total_cents,
                note,
            }]),
            (BenchCommand::AddLine, true) => Ok(vec![BenchEvent::LineAdded {
                customer_id,
                lines,
                total_cents,
                note,
            }]),
        }
    }

    fn evolve(&mut self, event: &BenchEvent) {
        match event {
            BenchEvent::OrderPlaced { total_cents, .. } => {
                self.placed = true;
                self.total_cents = *total_cents;
            }
            BenchEvent::LineAdded { total_cents, .. } => {
                self.lines += 1;
                self.total_cents = *total_cents;
            }
        }
    }
}

/// The aggregates one writer visits, in its order, for the store and (with its
/// own copy) for the floor, so both write the same rows.
#[derive(Clone)]
enum Targets {
    /// New aggregates `new-<measurement>-<writer>-<n>`.
    New {
        measurement: usize,
        writer: usize,
        made: u64,
    },
    /// The writer's share of the seeded aggregates, shuffled, round and round;
    /// `versions` is the floor's own count per aggregate.
    Visit {
        ids: Arc<[u32]>,
        next: usize,
        versions: Vec<i64>,
    },
    /// The one hot aggregate, whose version the floor's writers share.
    Hot { version: Arc<AtomicI64> },
}

impl Targets {
    /// Each writer's targets: seeded aggregates dealt out in a shuffled order.
    fn for_writers(scenario: Scenario, writers: usize, measurement: usize) -> Vec<Targets> {
        match scenario.kind {
            Kind::New => (0..writers)
                .map(|writer| Targets::New {
                    measurement,
                    writer,
                    made: 0,
                })
                .collect(),
            Kind::Hot => {
                let version = Arc::new(AtomicI64::new(1));
                (0..writers)
                    .map(|_| Targets::Hot {
                        version: Arc::clone(&version),
                    })
                    .collect()
            }
            Kind::Existing | Kind::Cold => {
                let mut order: Vec<u32> = (0..scenario.aggregates as u32).collect();
                fastrand::Rng::with_seed(writers as u64).shuffle(&mut order);
                (0..writers)
                    .map(|writer| {
                        let ids: Arc<[u32]> = order
                            .iter()
                            .skip(writer)
                            .step_by(writers)
                            .copied()
                            .collect();
                        Targets::Visit {
                            versions: vec![0; ids.len()],
                            ids,
                            next: 0,
                        }
                    })
                    .collect()
            }
        }
    }

    /// The next aggregate id, for a command.
    fn next_id(&mut self) -> String {
        match self {
            Targets::New {
                measurement,
                writer,
                made,
            } => {
                *made += 1;
                format!("new-{measurement}-{writer}-{made}")
            }
            Targets::Visit { ids, next, .. } => {
                let id = ids[*next % ids.len()];
                *next += 1;
                id.to_string()
            }
            Targets::Hot { .. } => "hot".to_owned(),
        }
    }

    /// The next floor row: the same stream a command would write, at its next
    /// version (the floor's versions start where seeding left them, at 1).
    fn next_row(&mut self) -> (String, i64) {
        match self {
            Targets::New { .. } => (format!("order-{}", self.next_id()), 1),
            Targets::Visit {
                ids,
                next,
                versions,
            } => {
                let slot = *next % ids.len();
                *next += 1;
                if versions[slot] == 0 {
                    versions[slot] = 1;
                }
                versions[slot] += 1;
                (format!("order-{}", ids[slot]), versions[slot])
            }
            Targets::Hot { version } => (
                "order-hot".to_owned(),
                version.fetch_add(1, Ordering::Relaxed) + 1,
            ),
        }
    }
}

/// Where the bench runs.
enum Backend {
    Sqlite {
        directory: PathBuf,
    },
    Postgres {
        url: String,
        stamp: u64,
        admin: Client,
    },
}

/// A scenario ready to measure: a seeded store, its repository, and the floor
/// on a copy of the seeded rows.
struct Prepared {
    scenario: Scenario,
    store: Arc<dyn EventStore>,
    repository: Repository<BenchOrder>,
    floor: Floor,
    /// Each writer count's targets are dealt afresh; the floor's versions carry
    /// over between writer counts, as the store's do.
    floor_versions: std::collections::HashMap<String, i64>,
    /// Measurements made so far, so new aggregates are never named twice.
    measurements: usize,
    bench: &'static str,
}

impl Backend {
    fn default_writers(&self, kind: Kind) -> Vec<usize> {
        match (self, kind) {
            (Backend::Postgres { .. }, _) => vec![1, 16, 32],
            (Backend::Sqlite { .. }, Kind::Hot) => vec![1, 16, 64],
            (Backend::Sqlite { .. }, _) => vec![1, 16, 64, 256],
        }
    }

    fn bench_name(&self) -> &'static str {
        match self {
            Backend::Sqlite { .. } => "command",
            Backend::Postgres { .. } => "command-postgres",
        }
    }

    /// Opens a store for `scenario`, seeds its aggregates, and makes the floor
    /// from a copy of the seeded rows.
    async fn prepare(&self, scenario: Scenario) -> Result<Prepared> {
        let store = self.open_store(scenario.name).await?;
        match self {
            // Seeding only sets the scene, so on PostgreSQL it is one statement
            // rather than minutes of appends: the same rows, at positions below
            // any the store will give (those start at its transaction ids).
            Backend::Postgres { stamp, admin, .. } if scenario.kind != Kind::Hot => {
                let (store_schema, _) = pg_schemas(*stamp, scenario.name);
                let payload: serde_json::Value = serde_json::from_str(&floor_payload()?)?;
                admin
                    .execute(
                        &format!(
                            "INSERT INTO {store_schema}.events (position, stream_id, version, \
                             event_id, event_type, schema_version, payload, metadata, recorded_at) \
                             SELECT g, 'order-' || (g - 1), 1, gen_random_uuid(), 'OrderPlaced', \
                             1, $1, '{{}}'::jsonb, $2 FROM generate_series(1, $3::bigint) AS g"
                        ),
                        &[
                            &payload,
                            &diptych::Timestamp::now().as_unix_micros(),
                            &(scenario.aggregates as i64),
                        ],
                    )
                    .await
                    .context("seeding the aggregates")?;
            }
            _ => seed(&store, scenario.kind, scenario.aggregates).await?,
        }
        let (store, floor) = match self {
            Backend::Sqlite { directory } => {
                let store_path = sqlite_path(directory, scenario.name, "store");
                let floor_path = sqlite_path(directory, scenario.name, "floor");
                // Closing the store checkpoints its WAL, so the copy is whole.
                drop(store);
                remove_database(&floor_path);
                std::fs::copy(&store_path, &floor_path).context("copying the seeded store")?;
                let store = self.open_store(scenario.name).await?;
                let connection = rusqlite::Connection::open(&floor_path)?;
                connection.execute_batch(FLOOR_PRAGMAS)?;
                let position = connection.query_row(
                    "SELECT COALESCE(max(position), 0) FROM events",
                    [],
                    |row| row.get(0),
                )?;
                // Warm the floor's page cache as the store's writer is warm.
                connection.query_row("SELECT count(*) FROM events", [], |row| {
                    row.get::<_, i64>(0)
                })?;
                (
                    store,
                    Floor::Sqlite {
                        connection,
                        position,
                        path: floor_path,
                    },
                )
            }
            Backend::Postgres { url, stamp, admin } => {
                let (store_schema, floor_schema) = pg_schemas(*stamp, scenario.name);
                drop(
                    PgStore::connect(&PgConfig::new(url).with_schema(&floor_schema))
                        .await
                        .context("creating the floor's tables")?,
                );
                admin
                    .batch_execute(&format!(
                        "INSERT INTO {floor_schema}.events SELECT * FROM {store_schema}.events; \
                         ANALYZE {floor_schema}.events; ANALYZE {store_schema}.events;"
                    ))
                    .await
                    .context("copying the seeded rows to the floor")?;
                let position: i64 = admin
                    .query_one(
                        &format!("SELECT COALESCE(max(position), 0) FROM {floor_schema}.events"),
                        &[],
                    )
                    .await?
                    .get(0);
                (
                    store,
                    Floor::Postgres {
                        url: url.clone(),
                        schema: floor_schema,
                        position: Arc::new(AtomicI64::new(position)),
                    },
                )
            }
        };
        let repository = Repository::with_config(
            Arc::clone(&store),
            RepositoryConfig::default().with_cache_capacity(scenario.cache_capacity),
        );
        if scenario.kind == Kind::Existing {
            // The warm path: one untimed command on every aggregate first.
            let ids: Vec<String> = (0..scenario.aggregates).map(|id| id.to_string()).collect();
            for_each_concurrently(ids, 64, |id| {
                let repository = repository.clone();
                async move {
                    repository
                        .execute(&id, &BenchCommand::AddLine, &CommandContext::default())
                        .await
                        .map(drop)
                        .context("warming the cache")
                }
            })
            .await?;
        }
        Ok(Prepared {
            scenario,
            store,
            repository,
            floor,
            floor_versions: std::collections::HashMap::new(),
            measurements: 0,
            bench: self.bench_name(),
        })
    }

    async fn open_store(&self, scenario: &str) -> Result<Arc<dyn EventStore>> {
        Ok(match self {
            Backend::Sqlite { directory } => {
                let path = sqlite_path(directory, scenario, "store");
                Arc::new(
                    SqliteStore::open(&path)
                        .with_context(|| format!("opening {}", path.display()))?,
                )
            }
            Backend::Postgres { url, stamp, .. } => {
                let (store_schema, _) = pg_schemas(*stamp, scenario);
                Arc::new(
                    PgStore::connect(&PgConfig::new(url).with_schema(&store_schema))
                        .await
                        .context("opening the PostgreSQL store")?,
                )
            }
        })
    }

    /// `load_10k`: one aggregate of 10,000 events, loaded through the
    /// repository and read with a plain `SELECT`, alternately, five times each.
    async fn load_10k(&self) -> Result<LoadResult> {
        const EVENTS: usize = 10_000;
        const ROUNDS: usize = 5;
        let store = self.open_store("load").await?;
        let repository = Repository::<BenchOrder>::new(Arc::clone(&store));
        let stream = repository.stream_of("long")?;
        let mut placed = false;
        let mut version = 0;
        while version < EVENTS {
            let events = (0..1000)
                .map(|_| {
                    let command = if placed {
                        BenchCommand::AddLine
                    } else {
                        BenchCommand::Place
                    };
                    let state = BenchOrder {
                        placed,
                        ..BenchOrder::default()
                    };
                    placed = true;
                    let decided = state.decide(&command).map_err(anyhow::Error::from)?;
                    Ok(repository.codec().encode(&decided[0])?)
                })
                .collect::<Result<Vec<_>>>()?;
            store
                .append(AppendRequest::new(
                    stream.clone(),
                    ExpectedVersion::Exact(version as u64),
                    events,
                ))
                .await?;
            version += 1000;
        }
        let mut floor = match self {
            Backend::Sqlite { directory } => {
                let path = sqlite_path(directory, "load", "store");
                LoadFloor::Sqlite(rusqlite::Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )?)
            }
            Backend::Postgres { url, stamp, .. } => {
                let (store_schema, _) = pg_schemas(*stamp, "load");
                LoadFloor::Postgres(connect(url, Some(&store_schema)).await?)
            }
        };
        let (mut loads, mut floors) = (Vec::new(), Vec::new());
        // One untimed round first, so both read from warm caches.
        for round in 0..=ROUNDS {
            let started = Instant::now();
            let loaded = repository.load("long").await?;
            let load_time = started.elapsed();
            anyhow::ensure!(
                loaded.version == EVENTS as u64,
                "the load saw {} events",
                loaded.version
            );
            let started = Instant::now();
            let rows = floor.read(stream.as_str()).await?;
            let floor_time = started.elapsed();
            anyhow::ensure!(rows == EVENTS, "the floor read {rows} rows");
            if round > 0 {
                loads.push(load_time.as_micros() as u64);
                floors.push(floor_time.as_micros() as u64);
            }
        }
        drop(store);
        if let Backend::Postgres { stamp, admin, .. } = self {
            let (store_schema, floor_schema) = pg_schemas(*stamp, "load");
            drop_schemas(admin, &[&store_schema, &floor_schema]).await?;
        }
        loads.sort_unstable();
        floors.sort_unstable();
        Ok(LoadResult {
            bench: self.bench_name(),
            scenario: "load_10k",
            load_10k_ms: percentile(&loads, 0.5) as f64 / 1000.0,
            floor_ms: percentile(&floors, 0.5) as f64 / 1000.0,
        })
    }
}

fn sqlite_path(directory: &Path, scenario: &str, side: &str) -> PathBuf {
    directory.join(format!("bench-command-{scenario}-{side}.db"))
}

fn pg_schemas(stamp: u64, scenario: &str) -> (String, String) {
    (
        format!("bench_{stamp}_command_{scenario}_store"),
        format!("bench_{stamp}_command_{scenario}_floor"),
    )
}

/// Seeds the scenario's aggregates through the store, 64 appends in flight.
async fn seed(store: &Arc<dyn EventStore>, kind: Kind, aggregates: usize) -> Result<()> {
    let ids: Vec<String> = match kind {
        Kind::New => return Ok(()),
        Kind::Hot => vec!["hot".to_owned()],
        Kind::Existing | Kind::Cold => (0..aggregates).map(|id| id.to_string()).collect(),
    };
    let placed = BenchOrder::default()
        .decide(&BenchCommand::Place)
        .map_err(anyhow::Error::from)?;
    let event = diptych::EventCodec::<BenchEvent>::default().encode(&placed[0])?;
    for_each_concurrently(ids, 64, |id| {
        let store = Arc::clone(store);
        let event = event.clone().with_event_id(uuid::Uuid::now_v7());
        async move {
            let stream = StreamId::for_aggregate(BenchOrder::KIND, &id)?;
            store
                .append(AppendRequest::new(
                    stream,
                    ExpectedVersion::NoStream,
                    vec![event],
                ))
                .await
                .map(drop)
                .context("seeding an aggregate")
        }
    })
    .await
}

/// Runs `work` on every item, `concurrency` at a time.
async fn for_each_concurrently<F>(
    items: Vec<String>,
    concurrency: usize,
    work: impl Fn(String) -> F,
) -> Result<()>
where
    F: std::future::Future<Output = Result<()>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for item in items {
        if running.len() >= concurrency {
            if let Some(done) = running.join_next().await {
                done.context("a seeding task panicked")??;
            }
        }
        running.spawn(work(item));
    }
    while let Some(done) = running.join_next().await {
        done.context("a seeding task panicked")??;
    }
    Ok(())
}

impl Prepared {
    /// Store and floor at `writers`, alternating in slices.
    async fn measure(&mut self, writers: usize, duration: Duration) -> Result<CommandResult> {
        let slice = duration / SLICES;
        self.measurements += 1;
        let mut targets = Targets::for_writers(self.scenario, writers, self.measurements);
        let mut floor_targets = targets.clone();
        self.restore_floor_versions(&mut floor_targets);
        let mut floor_clients = Vec::new();
        if let Floor::Postgres { url, schema, .. } = &self.floor {
            for _ in 0..writers {
                floor_clients.push(Arc::new(connect(url, Some(schema)).await?));
            }
        }
        let conflicts_before = self.repository.stats().conflicts_retried;
        let mut store_run = Run::default();
        let mut floor_run = Run::default();
        for _ in 0..SLICES {
            targets = self.store_slice(targets, slice, &mut store_run).await?;
            floor_targets = self
                .floor
                .slice(floor_targets, &floor_clients, slice, &mut floor_run)
                .await?;
        }
        self.keep_floor_versions(&floor_targets);
        let gave_up = store_run.gave_up;
        let store = store_run.summary();
        let floor = floor_run.summary();
        Ok(CommandResult {
            bench: self.bench,
            scenario: self.scenario.name,
            writers,
            commands_per_sec: store.per_sec,
            p50_us: store.p50_us,
            p99_us: store.p99_us,
            floor_per_sec: floor.per_sec,
            ratio: store.per_sec / floor.per_sec.max(f64::EPSILON),
            conflicts_retried: self.repository.stats().conflicts_retried - conflicts_before,
            gave_up,
        })
    }

    /// Every writer runs commands until the slice ends.
    async fn store_slice(
        &self,
        targets: Vec<Targets>,
        slice: Duration,
        run: &mut Run,
    ) -> Result<Vec<Targets>> {
        let command = match self.scenario.kind {
            Kind::New => BenchCommand::Place,
            _ => BenchCommand::AddLine,
        };
        let started = Instant::now();
        let deadline = started + slice;
        let tasks: Vec<_> = targets
            .into_iter()
            .map(|mut targets| {
                let repository = self.repository.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut gave_up = 0;
                    while Instant::now() < deadline {
                        let id = targets.next_id();
                        let began = Instant::now();
                        match repository
                            .execute(&id, &command, &CommandContext::default())
                            .await
                        {
                            Ok(_) => latencies.push(began.elapsed().as_micros() as u64),
                            Err(CommandError::TooManyConflicts { .. }) => gave_up += 1,
                            Err(error) => {
                                return Err(anyhow::Error::from(error)
                                    .context(format!("a command on `{id}` failed")));
                            }
                        }
                    }
                    Ok((targets, latencies, gave_up))
                })
            })
            .collect();
        let mut targets = Vec::new();
        for task in tasks {
            let (writer_targets, latencies, gave_up) =
                task.await.context("a bench writer panicked")??;
            targets.push(writer_targets);
            run.done += latencies.len();
            run.latencies.extend(latencies);
            run.gave_up += gave_up;
        }
        run.elapsed += started.elapsed();
        Ok(targets)
    }

    /// The floor's aggregates keep their versions from one writer count to the
    /// next, as the store's do.
    fn restore_floor_versions(&self, targets: &mut [Targets]) {
        for target in targets {
            if let Targets::Visit { ids, versions, .. } = target {
                for (slot, id) in ids.iter().enumerate() {
                    if let Some(version) = self.floor_versions.get(&id.to_string()) {
                        versions[slot] = *version;
                    }
                }
            }
            if let Targets::Hot { version } = target {
                if let Some(kept) = self.floor_versions.get("hot") {
                    version.store(*kept, Ordering::Relaxed);
                }
            }
        }
    }

    fn keep_floor_versions(&mut self, targets: &[Targets]) {
        for target in targets {
            match target {
                Targets::Visit { ids, versions, .. } => {
                    for (id, version) in ids.iter().zip(versions) {
                        if *version > 0 {
                            self.floor_versions.insert(id.to_string(), *version);
                        }
                    }
                }
                Targets::Hot { version } => {
                    self.floor_versions
                        .insert("hot".to_owned(), version.load(Ordering::Relaxed));
                }
                Targets::New { .. } => {}
            }
        }
    }

    async fn clean_up(self, backend: &Backend) -> Result<()> {
        drop(self.repository);
        drop(self.store);
        match (&self.floor, backend) {
            (Floor::Sqlite { path, .. }, Backend::Sqlite { directory }) => {
                remove_database(path);
                remove_database(&sqlite_path(directory, self.scenario.name, "store"));
            }
            (Floor::Postgres { .. }, Backend::Postgres { stamp, admin, .. }) => {
                let (store_schema, floor_schema) = pg_schemas(*stamp, self.scenario.name);
                drop_schemas(admin, &[&store_schema, &floor_schema]).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// What one side did over all its slices.
#[derive(Default)]
struct Run {
    done: usize,
    latencies: Vec<u64>,
    elapsed: Duration,
    gave_up: u64,
}

struct Summary {
    per_sec: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Run {
    fn summary(mut self) -> Summary {
        self.latencies.sort_unstable();
        Summary {
            per_sec: self.done as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON),
            p50_us: percentile(&self.latencies, 0.50),
            p99_us: percentile(&self.latencies, 0.99),
        }
    }
}

/// The floor: the same rows with no diptych logic.
enum Floor {
    Sqlite {
        connection: rusqlite::Connection,
        position: i64,
        path: PathBuf,
    },
    Postgres {
        url: String,
        schema: String,
        position: Arc<AtomicI64>,
    },
}

impl Floor {
    async fn slice(
        &mut self,
        targets: Vec<Targets>,
        clients: &[Arc<Client>],
        slice: Duration,
        run: &mut Run,
    ) -> Result<Vec<Targets>> {
        match self {
            Floor::Sqlite {
                connection,
                position,
                ..
            } => sqlite_floor_slice(connection, position, targets, slice, run),
            Floor::Postgres { position, .. } => {
                pg_floor_slice(clients, position, targets, slice, run).await
            }
        }
    }
}

/// One transaction per round of one row per writer, as `bench append`'s floor
/// (only the time inside transactions counts).
fn sqlite_floor_slice(
    connection: &mut rusqlite::Connection,
    position: &mut i64,
    mut targets: Vec<Targets>,
    slice: Duration,
    run: &mut Run,
) -> Result<Vec<Targets>> {
    let payload = floor_payload()?;
    let deadline = Instant::now() + slice;
    while Instant::now() < deadline {
        let rows: Vec<_> = targets
            .iter_mut()
            .map(|target| {
                *position += 1;
                let (stream, version) = target.next_row();
                (*position, stream, version, uuid::Uuid::now_v7())
            })
            .collect();
        let elapsed = insert_floor_rows(connection, &rows, &payload)?;
        run.elapsed += elapsed;
        run.latencies
            .extend(std::iter::repeat_n(elapsed.as_micros() as u64, rows.len()));
        run.done += rows.len();
    }
    Ok(targets)
}

/// Each writer's connection inserts its rows, one committed transaction each.
async fn pg_floor_slice(
    clients: &[Arc<Client>],
    position: &Arc<AtomicI64>,
    targets: Vec<Targets>,
    slice: Duration,
    run: &mut Run,
) -> Result<Vec<Targets>> {
    let payload: serde_json::Value = serde_json::from_str(&floor_payload()?)?;
    let started = Instant::now();
    let deadline = started + slice;
    let tasks: Vec<_> = targets
        .into_iter()
        .zip(clients)
        .map(|(mut targets, client)| {
            let client = Arc::clone(client);
            let position = Arc::clone(position);
            let payload = payload.clone();
            tokio::spawn(async move {
                let statement = client.prepare(FLOOR_INSERT).await?;
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let (stream, version) = targets.next_row();
                    let at = position.fetch_add(1, Ordering::Relaxed) + 1;
                    let began = Instant::now();
                    client
                        .execute(
                            &statement,
                            &[
                                &stream,
                                &vec![at],
                                &vec![version],
                                &payload,
                                &diptych::Timestamp::now().as_unix_micros(),
                                &vec![uuid::Uuid::now_v7()],
                            ],
                        )
                        .await?;
                    latencies.push(began.elapsed().as_micros() as u64);
                }
                anyhow::Ok((targets, latencies))
            })
        })
        .collect();
    let mut targets = Vec::new();
    for task in tasks {
        let (writer_targets, latencies) = task.await.context("a floor writer panicked")??;
        targets.push(writer_targets);
        run.done += latencies.len();
        run.latencies.extend(latencies);
    }
    run.elapsed += started.elapsed();
    Ok(targets)
}

/// The payload a command's event carries, as the floor stores it.
fn floor_payload() -> Result<String> {
    let decided = BenchOrder {
        placed: true,
        ..BenchOrder::default()
    }
    .decide(&BenchCommand::AddLine)
    .map_err(anyhow::Error::from)?;
    let codec = diptych::EventCodec::<BenchEvent>::default();
    Ok(codec.encode(&decided[0])?.payload.to_string())
}

/// The plain reads `load_10k` is compared with.
enum LoadFloor {
    Sqlite(rusqlite::Connection),
    Postgres(Client),
}

/// A row as the floor reads it: every column owned, the payload parsed.
type FloorEvent = (
    i64,
    String,
    i64,
    Vec<u8>,
    String,
    i64,
    serde_json::Value,
    String,
    i64,
);

/// A row as the PostgreSQL floor reads it: jsonb columns parsed by the driver.
type PgFloorEvent = (
    i64,
    String,
    i64,
    uuid::Uuid,
    String,
    i32,
    serde_json::Value,
    serde_json::Value,
    i64,
);

impl LoadFloor {
    /// Reads the stream's rows; returns how many.
    async fn read(&mut self, stream: &str) -> Result<usize> {
        const SELECT: &str = "SELECT position, stream_id, version, event_id, event_type, \
                              schema_version, payload, metadata, recorded_at FROM events \
                              WHERE stream_id = $1 ORDER BY version";
        match self {
            LoadFloor::Sqlite(connection) => {
                let mut statement = connection.prepare_cached(&SELECT.replace("$1", "?1"))?;
                let rows = statement
                    .query_map([stream], |row| {
                        let payload: String = row.get(6)?;
                        Ok((
                            row.get(0)?,
                            row.get(1)?,
                            row.get(2)?,
                            row.get(3)?,
                            row.get(4)?,
                            row.get(5)?,
                            serde_json::from_str(&payload).unwrap_or_default(),
                            row.get(7)?,
                            row.get(8)?,
                        ))
                    })?
                    .collect::<Result<Vec<FloorEvent>, _>>()?;
                Ok(rows.len())
            }
            LoadFloor::Postgres(client) => {
                let statement = client.prepare(SELECT).await?;
                let rows: Vec<PgFloorEvent> = client
                    .query(&statement, &[&stream])
                    .await?
                    .iter()
                    .map(|row| {
                        (
                            row.get(0),
                            row.get(1),
                            row.get(2),
                            row.get(3),
                            row.get(4),
                            row.get(5),
                            row.get(6),
                            row.get(7),
                            row.get(8),
                        )
                    })
                    .collect();
                Ok(rows.len())
            }
        }
    }
}
