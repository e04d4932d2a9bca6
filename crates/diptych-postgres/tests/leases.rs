//! Partitioned projections under leases, across processes: two projector
//! processes share the four partitions of a projection; one is killed with
//! SIGKILL while events keep arriving; the other takes its partitions once their
//! leases expire and finishes, and the view equals a clean build of the log (so
//! no event was lost or applied twice across the hand-over).
//!
//! This binary is both the parent (run by `cargo test`) and the projector
//! processes it starts (marked by an environment variable).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use diptych_core::partition::partition_name;
use diptych_core::testkit::{Tallies, added, append_one, clean_tallies, dump_collection};
use diptych_core::{EventStore, Handler, HandlerKind, RunnerConfig, ViewStore, wait_for};
use diptych_postgres::testing::{self, ChildGuard};
use diptych_postgres::{LeaseConfig, PartitionedRunner, PgConfig, PgLeases, PgStore, PgViews};

const ROLE: &str = "DIPTYCH_LEASES_ROLE";
const SCHEMA: &str = "DIPTYCH_LEASES_SCHEMA";
const HOLDER: &str = "DIPTYCH_LEASES_HOLDER";
const PARTITIONS: u32 = 4;
const ITEMS: u64 = 40;
const LEASE_TTL: Duration = Duration::from_millis(1500);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    match std::env::var(ROLE).as_deref() {
        Ok("projector") => runtime.block_on(projector()),
        _ => runtime.block_on(parent()),
    }
}

/// Runs the partitioned tallies under leases until killed.
async fn projector() {
    let schema = std::env::var(SCHEMA).expect("the parent names the schema");
    let config = PgConfig::new(testing::test_url()).with_schema(schema);
    let store = Arc::new(PgStore::connect(&config).await.expect("a store"));
    let views = Arc::new(PgViews::connect(&config).await.expect("views"));
    let leases = PgLeases::connect(&config).await.expect("leases");
    let runner = PartitionedRunner::spawn(
        leases,
        store,
        views,
        Handler {
            projection: Arc::new(Tallies::default()),
            kind: HandlerKind::Projection,
            partitionable: true,
        },
        PARTITIONS,
        RunnerConfig {
            batch_size: 20,
            ..RunnerConfig::default()
        },
        LeaseConfig {
            ttl: LEASE_TTL,
            holder: std::env::var(HOLDER).expect("the parent names the holder"),
        },
    );
    let mut held = runner.held();
    while held.changed().await.is_ok() {
        println!("holding {:?}", *held.borrow_and_update());
    }
}

fn spawn_projector(schema: &str, holder: &str) -> ChildGuard {
    let child = Command::new(std::env::current_exe().expect("this test's path"))
        .env(ROLE, "projector")
        .env(SCHEMA, schema)
        .env(HOLDER, holder)
        .stdout(Stdio::null())
        .spawn()
        .expect("a projector process");
    ChildGuard(child)
}

/// One item per stream, so each tally is written by one stream's events: the
/// condition for partitioning by stream.
async fn add(store: &dyn EventStore, n: u64) {
    let item = format!("item{}", n % ITEMS);
    append_one(store, &format!("tally-{item}"), added(&item, n)).await;
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if done().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what} did not happen within 60 s");
}

async fn parent() {
    let config = testing::fresh_config().await;
    let store = Arc::new(PgStore::connect(&config).await.expect("a store"));
    let views = Arc::new(PgViews::connect(&config).await.expect("views"));
    let leases = PgLeases::connect(&config).await.expect("leases");
    for n in 0..1000 {
        add(&*store, n).await;
    }
    let mut doomed = spawn_projector(&config.schema, "doomed");
    let mut survivor = spawn_projector(&config.schema, "survivor");
    wait_until("both projectors holding two partitions", async || {
        let holders = leases.holders("tallies").await.expect("leases");
        let doomed = holders.values().filter(|h| *h == "doomed").count();
        holders.len() == PARTITIONS as usize && doomed == 2
    })
    .await;

    // Events keep arriving while one projector dies.
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            for n in 1000..2500 {
                add(&*store, n).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    doomed.kill();
    writer.await.expect("the writer");

    wait_until("the survivor taking every partition", async || {
        let holders = leases.holders("tallies").await.expect("leases");
        holders.len() == PARTITIONS as usize && holders.values().all(|h| h == "survivor")
    })
    .await;
    let head = store.head().await.expect("the head");
    wait_for(&*views, Tallies::COLLECTION, head, Duration::from_secs(60))
        .await
        .expect("every partition catches up with the log");

    let built = dump_collection(&*views, Tallies::COLLECTION).await;
    let clean = clean_tallies(store.clone() as Arc<dyn EventStore>).await;
    assert_eq!(built.len(), ITEMS as usize);
    assert_eq!(built, clean, "the partitioned view equals a clean build");
    let mut parked = Vec::new();
    for index in 0..PARTITIONS {
        let name = partition_name("tallies", index, PARTITIONS);
        parked.extend(views.parked(&name).await.expect("parked events"));
    }
    assert!(parked.is_empty(), "nothing was parked: {parked:?}");
    survivor.kill();
    println!(
        "leases: {PARTITIONS} partitions over two projector processes; one killed with SIGKILL \
         while 1500 events arrived; the survivor took over and the view equals a clean build"
    );
}
