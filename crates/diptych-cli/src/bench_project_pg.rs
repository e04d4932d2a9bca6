//! `diptych bench project --store postgres://…`: the bench projection catching
//! up on a log in [`PgStore`], into [`PgViews`], against a floor in the same run.
//!
//! The floor makes the same upserts (same keys, same document text, `batch` per
//! transaction) straight into an identical table with tokio-postgres: one
//! multi-row `INSERT … ON CONFLICT DO UPDATE` per transaction, the statement the
//! view store itself uses. As with the SQLite floor, the documents come from
//! memory: there is no log to read, no runner and no checkpoint, so the ratio is
//! the price of everything the platform adds to writing the documents. The
//! table is made by letting [`PgViews`] register the bench collection in a
//! schema of its own, so both write the same layout and indexes. Both schemas
//! are fresh in the given database (`bench_<stamp>_project_…`) and dropped
//! afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use diptych::postgres::{PgConfig, PgStore, PgViews};
use diptych::{EventStore, ViewStore};
use tokio::task::JoinSet;

use crate::bench_pg::{connect, drop_schemas, stamp};
use crate::bench_query::{
    COLLECTION, ProjectResult, append_chunk, catch_up, declaration, distinct_keys, document,
};

/// Events per append while seeding the log.
const SEED_BATCH: u64 = 500;
/// Appends in flight while seeding: PostgreSQL takes concurrent appends to
/// different streams without one waiting for another.
const SEED_WRITERS: usize = 8;

/// Seeds a log of `events` events in a fresh schema, then measures the floor
/// and the projection's catch-up.
pub async fn run_project(url: &str, events: u64, batch: usize) -> Result<ProjectResult> {
    let stamp = stamp()?;
    let admin = connect(url, None).await?;
    let store_schema = format!("bench_{stamp}_project_store");
    let floor_schema = format!("bench_{stamp}_project_floor");
    let measured = measure(url, &store_schema, &floor_schema, events, batch).await;
    drop_schemas(&admin, &[&store_schema, &floor_schema]).await?;
    measured
}

async fn measure(
    url: &str,
    store_schema: &str,
    floor_schema: &str,
    events: u64,
    batch: usize,
) -> Result<ProjectResult> {
    let distinct_keys = distinct_keys(events);
    // The seeding writers, plus the store's own head reads.
    let config = PgConfig::new(url)
        .with_schema(store_schema)
        .with_pool_size(SEED_WRITERS + 2);
    let store: Arc<dyn EventStore> = Arc::new(
        PgStore::connect(&config)
            .await
            .context("opening the PostgreSQL store")?,
    );
    seed(&store, events, distinct_keys).await?;
    let floor_seconds = floor_upserts(url, floor_schema, events, distinct_keys, batch).await?;
    let views: Arc<dyn ViewStore> = Arc::new(
        PgViews::connect(&config)
            .await
            .context("opening the PostgreSQL views")?,
    );
    let catch_up = catch_up(store, views, batch).await?;
    Ok(ProjectResult::new(
        "project-postgres",
        events,
        batch,
        catch_up,
        floor_seconds,
    ))
}

/// Appends the log in runs of [`SEED_BATCH`] events, each to a stream of its
/// own, [`SEED_WRITERS`] at a time.
async fn seed(store: &Arc<dyn EventStore>, events: u64, distinct_keys: u64) -> Result<()> {
    let chunks = events.div_ceil(SEED_BATCH);
    let mut writers = JoinSet::new();
    for writer in 0..SEED_WRITERS as u64 {
        let store = Arc::clone(store);
        writers.spawn(async move {
            for chunk in (writer..chunks).step_by(SEED_WRITERS) {
                append_chunk(&*store, chunk, SEED_BATCH, events, distinct_keys).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(written) = writers.join_next().await {
        written.context("a seeding task panicked")??;
    }
    Ok(())
}

/// The floor: the documents of the log's events upserted `batch` per
/// transaction into the bench collection's table in `schema`. Returns the
/// seconds it took.
async fn floor_upserts(
    url: &str,
    schema: &str,
    events: u64,
    distinct_keys: u64,
    batch: usize,
) -> Result<f64> {
    let table = floor_table(url, schema).await?;
    let mut client = connect(url, Some(schema)).await?;
    let upsert = client
        .prepare(&format!(
            "INSERT INTO {table} (key, doc)
             SELECT k, d::jsonb FROM unnest($1::text[], $2::text[]) AS u(k, d)
             ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
        ))
        .await
        .context("preparing the floor's upsert")?;
    let started = Instant::now();
    for first in (0..events).step_by(batch) {
        // One row per key, the last document winning: a statement may not
        // update a row twice, and the view store folds a batch the same way.
        let rows: BTreeMap<String, String> = (first..(first + batch as u64).min(events))
            .map(|i| {
                let document = document(i, distinct_keys);
                let key = document["key"].as_str().unwrap_or_default().to_owned();
                (key, document.to_string())
            })
            .collect();
        let (keys, documents): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
        let transaction = client.transaction().await?;
        transaction
            .execute(&upsert, &[&keys, &documents])
            .await
            .context("the floor's upsert")?;
        transaction.commit().await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Registers the bench projection's collection in `schema` and returns the name
/// of the table [`PgViews`] made for it.
async fn floor_table(url: &str, schema: &str) -> Result<String> {
    let views = PgViews::connect(&PgConfig::new(url).with_schema(schema))
        .await
        .context("creating the floor's table")?;
    views.register(&declaration()).await?;
    // The escape hatch puts a collection's table where `{collection}` stands.
    let rows = views
        .query_sql(
            &format!("SELECT '{{{COLLECTION}}}'::regclass::text AS name"),
            Vec::new(),
        )
        .await?;
    rows.first()
        .and_then(|row| Some(row.get("name")?.as_str()?.to_owned()))
        .context("PgViews named no table for the bench collection")
}
