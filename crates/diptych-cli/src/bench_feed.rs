//! `diptych bench feed`: a post by a user with many followers, from sending the
//! command until every follower's feed has it, against the
//! floor of the same feed documents upserted straight into SQLite (the table the
//! view store made for `feeds`, copied with its indexes), alternated round by
//! round in one run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use diptych::sqlite::{SqliteStore, SqliteViews};
use diptych::{CommandContext, EventStore, RunnerConfig, ViewStore, wait_for};
use diptych_social::Social;
use diptych_social::views::FeedDocument;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;

use crate::bench::percentile;
use crate::bench_query::{memory_kib, reset_peak_rss};

/// One `bench feed` result.
#[derive(Debug, Serialize)]
pub struct FeedResult {
    /// Always `feed`.
    pub bench: &'static str,
    /// The author's followers.
    pub followers: usize,
    /// Posts measured.
    pub rounds: usize,
    /// From sending the post to every follower's feed holding it, median.
    pub fanout_p50_ms: f64,
    /// The same, slowest round.
    pub fanout_max_ms: f64,
    /// The same documents upserted straight into SQLite, median.
    pub floor_p50_ms: f64,
    /// `floor_p50_ms / fanout_p50_ms`.
    pub ratio: f64,
    /// Seconds the followers took to register and follow (setup, not measured).
    pub setup_s: f64,
    /// Peak resident memory during the rounds.
    pub peak_rss_mib: f64,
}

pub async fn run_feed(followers: usize, rounds: usize, dir: Option<PathBuf>) -> Result<FeedResult> {
    // The temporary directory lives as long as the bench.
    let (dir, _temporary) = match dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir)?;
            anyhow::ensure!(
                std::fs::read_dir(&dir)?.next().is_none(),
                "{} is not empty: give --dir a new or empty directory, as the bench registers \
                 its own users",
                dir.display()
            );
            (dir, None)
        }
        None => {
            let temporary = tempfile::tempdir()?;
            (temporary.path().to_owned(), Some(temporary))
        }
    };
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open(dir.join("events.db"))?);
    let views: Arc<dyn ViewStore> = Arc::new(SqliteViews::open(dir.join("views.db"))?);
    let social = Arc::new(Social::new(store.clone(), views.clone()));
    let mut runners = Vec::new();
    for handler in social.application().handlers() {
        runners.push(
            handler
                .spawn(store.clone(), views.clone(), RunnerConfig::default())
                .await?,
        );
    }

    let started = Instant::now();
    send(
        &social,
        "RegisterUser",
        json!({"user_id": "star", "handle": "star", "display_name": "Star", "bio": ""}),
    )
    .await?;
    futures_util::stream::iter(0..followers)
        .map(|n| {
            let social = social.clone();
            async move {
                let user_id = format!("f{n}");
                let register =
                    json!({"user_id": user_id, "handle": user_id, "display_name": "F", "bio": ""});
                send(&social, "RegisterUser", register).await?;
                send(
                    &social,
                    "FollowUser",
                    json!({"user_id": user_id, "target_id": "star"}),
                )
                .await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<Result<()>>>()
        .await
        .into_iter()
        .collect::<Result<()>>()?;
    settle(&*store, &*views).await?;
    let setup_s = started.elapsed().as_secs_f64();

    let floor_db = dir.join("floor.db");
    let table = feeds_table(&dir.join("views.db"))?;
    let mut fanouts = Vec::with_capacity(rounds);
    let mut floors = Vec::with_capacity(rounds);
    reset_peak_rss();
    for round in 0..rounds {
        let post_id = format!("post-{round}");
        let began = Instant::now();
        let outcome = social
            .application()
            .execute(
                "CreatePost",
                json!({"post_id": post_id, "author_id": "star", "text": "Hello, all of you"}),
                &CommandContext::default(),
            )
            .await?;
        wait_for(&*views, "feeds", outcome.position, Duration::from_secs(600)).await?;
        fanouts.push(began.elapsed().as_micros() as u64);
        let last = format!("f{}/{post_id}", followers - 1);
        anyhow::ensure!(
            views.get("feeds", &last).await?.is_some(),
            "the last follower's feed lacks {post_id}"
        );
        floors.push(floor_upserts(&floor_db, &table, followers, round)?);
    }
    let peak_rss_mib = memory_kib("VmHWM:") as f64 / 1024.0;
    for runner in runners {
        runner.stop().await;
    }
    fanouts.sort_unstable();
    floors.sort_unstable();
    let ms = |us: u64| us as f64 / 1000.0;
    let fanout_p50_ms = ms(percentile(&fanouts, 0.5));
    let floor_p50_ms = ms(percentile(&floors, 0.5));
    Ok(FeedResult {
        bench: "feed",
        followers,
        rounds,
        fanout_p50_ms,
        fanout_max_ms: ms(fanouts.last().copied().unwrap_or(0)),
        floor_p50_ms,
        ratio: floor_p50_ms / fanout_p50_ms.max(f64::EPSILON),
        setup_s,
        peak_rss_mib,
    })
}

async fn send(social: &Social, name: &str, body: serde_json::Value) -> Result<()> {
    social
        .application()
        .execute(name, body, &CommandContext::default())
        .await
        .with_context(|| format!("setting up with {name}"))?;
    Ok(())
}

/// Waits until every view has applied the whole log.
async fn settle(store: &dyn EventStore, views: &dyn ViewStore) -> Result<()> {
    let head = store.head().await?;
    for view in diptych_social::VIEWS {
        wait_for(views, view, head, Duration::from_secs(600)).await?;
    }
    Ok(())
}

/// The `CREATE` statements of the table (and its indexes) that the view store
/// made for `feeds`, so the floor writes into the same shape.
fn feeds_table(views: &Path) -> Result<Vec<String>> {
    let connection = rusqlite::Connection::open(views)?;
    let name: String = connection
        .query_row(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'doc:feeds:%'",
            [],
            |row| row.get(0),
        )
        .context("finding the feeds table in views.db")?;
    let mut statement = connection.prepare(
        "SELECT sql FROM sqlite_master WHERE tbl_name = ?1 AND sql IS NOT NULL ORDER BY type DESC",
    )?;
    let sql = statement
        .query_map([&name], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(sql
        .into_iter()
        .map(|sql| sql.replace(&format!("\"{name}\""), "floor_feeds"))
        .collect())
}

/// The floor: one feed document per follower upserted in one transaction, as
/// the runner commits a batch, into a copy of the feeds table. Returns µs.
fn floor_upserts(path: &Path, table: &[String], followers: usize, round: usize) -> Result<u64> {
    let mut connection = rusqlite::Connection::open(path)?;
    connection.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA cache_size = -65536;",
    )?;
    if round == 0 {
        for statement in table {
            connection.execute_batch(statement)?;
        }
    }
    let post_id = format!("post-{round}");
    let began = Instant::now();
    let transaction = connection.transaction()?;
    {
        let mut statement = transaction.prepare_cached(
            "INSERT INTO floor_feeds (key, doc) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET doc = excluded.doc",
        )?;
        for n in 0..followers {
            let reader = format!("f{n}");
            let document = FeedDocument {
                user_id: reader.clone(),
                post_id: post_id.clone(),
                author_id: "star".to_owned(),
                author_handle: "star".to_owned(),
                text: "Hello, all of you".to_owned(),
                created_at_us: 1_700_000_000_000_000,
            };
            let key = format!("{reader}/{post_id}");
            statement.execute(rusqlite::params![key, serde_json::to_string(&document)?])?;
        }
    }
    transaction.commit()?;
    Ok(began.elapsed().as_micros() as u64)
}
