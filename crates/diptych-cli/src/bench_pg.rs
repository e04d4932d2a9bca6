//! `diptych bench append --store postgres://…`: appends through [`PgStore`]
//! against a floor in the same run.
//!
//! The floor writes the same rows (same table, same indexes, same payload) with
//! one multi-row INSERT per append from as many connections as the store has
//! writers, each its own committed transaction: PostgreSQL doing the same
//! durable work with no store logic (no stream lock, no version check, no
//! idempotency, no notification). Both run in fresh schemas of the given
//! database, dropped afterwards, in alternating slices so both see the same
//! server and disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use diptych::postgres::{PgConfig, PgStore};
use diptych::{EventStore, Timestamp};
use tokio_postgres::{Client, NoTls};

use crate::bench::{AppendBenchResult, Measured, SLICES, Scenario, payload_template, store_slice};

/// Runs every scenario (own streams only: PostgreSQL's interest is how writers
/// on different streams scale), handing each result to `report`.
pub async fn run_append(
    url: &str,
    writers: &[usize],
    events_per_append: &[usize],
    duration: Duration,
    mut report: impl FnMut(&AppendBenchResult),
) -> Result<()> {
    let stamp = stamp()?;
    let admin = connect(url, None).await?;
    for &events in events_per_append {
        for &writer_count in writers {
            let scenario = Scenario {
                writers: writer_count,
                events_per_append: events,
                hot: false,
            };
            let store_schema = format!("bench_{stamp}_{writer_count}_{events}_store");
            let floor_schema = format!("bench_{stamp}_{writer_count}_{events}_floor");
            let measured = measure(url, &store_schema, &floor_schema, scenario, duration).await;
            drop_schemas(&admin, &[&store_schema, &floor_schema]).await?;
            let (store, floor) = measured?;
            report(&AppendBenchResult {
                bench: "append-postgres",
                writers: writer_count,
                events_per_append: events,
                streams: "own",
                events_per_sec: store.events_per_sec,
                appends_per_sec: store.operations_per_sec,
                p50_us: store.p50_us,
                p99_us: store.p99_us,
                floor_events_per_sec: floor.events_per_sec,
                floor_p50_us: floor.p50_us,
                floor_p99_us: floor.p99_us,
                ratio: store.events_per_sec / floor.events_per_sec.max(f64::EPSILON),
            });
        }
    }
    Ok(())
}

async fn measure(
    url: &str,
    store_schema: &str,
    floor_schema: &str,
    scenario: Scenario,
    duration: Duration,
) -> Result<(Measured, Measured)> {
    // One connection per writer, plus the store's own head reads and notifications.
    let pool_size = scenario.writers + 2;
    let store: Arc<dyn EventStore> = Arc::new(
        PgStore::connect(
            &PgConfig::new(url)
                .with_schema(store_schema)
                .with_pool_size(pool_size),
        )
        .await
        .context("opening the PostgreSQL store")?,
    );
    // The store creates the floor's tables too, so both write the same layout.
    drop(
        PgStore::connect(&PgConfig::new(url).with_schema(floor_schema))
            .await
            .context("creating the floor's tables")?,
    );
    let mut floor_clients = Vec::new();
    for _ in 0..scenario.writers {
        floor_clients.push(Arc::new(connect(url, Some(floor_schema)).await?));
    }
    let slice = duration / SLICES;
    let (mut events, mut latencies, mut elapsed) = (0, Vec::new(), Duration::ZERO);
    let mut versions = vec![0; scenario.writers];
    let mut floor = FloorRun {
        versions: vec![0; scenario.writers],
        ..FloorRun::default()
    };
    let position = Arc::new(AtomicI64::new(0));
    for _ in 0..SLICES {
        store_slice(
            &store,
            scenario,
            &mut versions,
            slice,
            (&mut events, &mut latencies, &mut elapsed),
        )
        .await?;
        floor_slice(&floor_clients, scenario, &position, slice, &mut floor).await?;
    }
    Ok((
        Measured::from_samples(events, elapsed, latencies),
        Measured::from_samples(floor.events, floor.elapsed, floor.latencies),
    ))
}

/// The floor's statement: rows of one stream, `$1`, at positions `$2` and
/// versions `$3` with event ids `$6`, all with payload `$4` and time `$5`.
pub(crate) const FLOOR_INSERT: &str = "INSERT INTO events (position, stream_id, version, \
     event_id, event_type, schema_version, payload, metadata, recorded_at) \
     SELECT p, $1, v, id, 'OrderPlaced', 1, $4, '{}'::jsonb, $5 \
     FROM unnest($2::bigint[], $3::bigint[], $6::uuid[]) AS u(p, v, id)";

#[derive(Default)]
struct FloorRun {
    /// Each floor writer's stream version, carried from slice to slice.
    versions: Vec<i64>,
    events: usize,
    latencies: Vec<u64>,
    elapsed: Duration,
}

/// Each floor writer inserts its rows in one statement per "append" until the
/// slice ends; positions come from a shared counter, versions from the writer.
async fn floor_slice(
    clients: &[Arc<Client>],
    scenario: Scenario,
    position: &Arc<AtomicI64>,
    slice: Duration,
    run: &mut FloorRun,
) -> Result<()> {
    let started = Instant::now();
    let deadline = started + slice;
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(writer, client)| {
            let client = Arc::clone(client);
            let position = Arc::clone(position);
            let mut version = run.versions[writer];
            tokio::spawn(async move {
                let statement = client.prepare(FLOOR_INSERT).await?;
                let payload = payload_template();
                let stream = format!("bench-{writer}");
                let (mut events, mut latencies) = (0usize, Vec::new());
                while Instant::now() < deadline {
                    let n = scenario.events_per_append;
                    let first = position.fetch_add(n as i64, Ordering::Relaxed) + 1;
                    let positions: Vec<i64> = (first..first + n as i64).collect();
                    let versions: Vec<i64> = (version + 1..=version + n as i64).collect();
                    let ids: Vec<uuid::Uuid> = (0..n).map(|_| uuid::Uuid::now_v7()).collect();
                    version += n as i64;
                    let began = Instant::now();
                    client
                        .execute(
                            &statement,
                            &[
                                &stream,
                                &positions,
                                &versions,
                                &payload,
                                &Timestamp::now().as_unix_micros(),
                                &ids,
                            ],
                        )
                        .await?;
                    latencies.push(began.elapsed().as_micros() as u64);
                    events += n;
                }
                anyhow::Ok((events, latencies, version))
            })
        })
        .collect();
    for (writer, task) in tasks.into_iter().enumerate() {
        let (events, latencies, version) = task.await.context("a floor writer panicked")??;
        run.versions[writer] = version;
        run.events += events;
        run.latencies.extend(latencies);
    }
    run.elapsed += started.elapsed();
    Ok(())
}

/// A stamp for the names of a run's schemas (`bench_<stamp>_…`), so runs never
/// share one.
pub(crate) fn stamp() -> Result<u64> {
    Ok(SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs())
}

/// Drops a run's schemas with everything in them.
pub(crate) async fn drop_schemas(admin: &Client, schemas: &[&str]) -> Result<()> {
    for schema in schemas {
        admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await
            .with_context(|| format!("dropping the bench schema {schema}"))?;
    }
    Ok(())
}

/// A plain connection to `url`, its search path set to `schema` when given.
pub(crate) async fn connect(url: &str, schema: Option<&str>) -> Result<Client> {
    let mut config: tokio_postgres::Config = url.parse().context("parsing the PostgreSQL URL")?;
    if let Some(schema) = schema {
        config.options(format!("-c search_path={schema}"));
    }
    let (client, connection) = config
        .connect(NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(connection);
    Ok(client)
}
