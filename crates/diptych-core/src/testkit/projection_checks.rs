//! Checks of projections and process managers running on a backend: catch-up and
//! live, consistency tokens, failures, rebuilds, pause, and exactly-once effects.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::ViewFixture;
use super::view_checks::dump_collection;
use crate::aggregate::Aggregate;
use crate::codec::EventCodec;
use crate::envelope::{Metadata, NewEvent, Position, RecordedEvent, StreamId};
use crate::error::{HandlerError, WaitError};
use crate::memory_views::MemoryViews;
use crate::process::{ProcessManager, spawn_process_manager};
use crate::projection::{Interest, Projection, ViewTx};
use crate::repository::{CommandContext, Repository};
use crate::runner::{
    ProjectionState, RunnerConfig, RunnerHandle, projection_status, spawn_projection,
};
use crate::store::{AppendRequest, EventStore, ExpectedVersion};
use crate::view::{CollectionSpec, Control, Document, HandlerKind, Query, ViewStore, wait_for};

/// Long enough for any healthy backend on a loaded machine; only reached when a
/// check fails.
const PATIENCE: Duration = Duration::from_secs(30);

/// Retries quickly so failure checks run fast, in small batches so they commit
/// often.
pub(crate) fn quick_config() -> RunnerConfig {
    RunnerConfig {
        batch_size: 16,
        max_attempts: 3,
        first_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        control_poll: Duration::from_millis(20),
        ..RunnerConfig::default()
    }
}

/// One line of the `tallies` view.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TallyLine {
    /// The item counted.
    pub item: String,
    /// The sum of its amounts.
    pub total: u64,
    /// How many additions.
    pub count: u64,
}

/// The projection the checks (and the crash tests) run: per item, the sum and
/// the number of `Added` events, deleted by `Removed`. Counting makes any event
/// applied twice or lost show up. `Poison` events fail (and `Panic` events
/// panic) while [`Tallies::broken`] is set; `Flaky` events fail a set number of
/// times first.
pub struct Tallies {
    /// Whether `Poison` and `Panic` events fail.
    pub broken: AtomicBool,
    /// How many more times a `Flaky` event fails.
    pub flaky_failures: AtomicU32,
}

impl Default for Tallies {
    fn default() -> Self {
        Self {
            broken: AtomicBool::new(false),
            flaky_failures: AtomicU32::new(0),
        }
    }
}

impl Tallies {
    /// The projection's one collection.
    pub const COLLECTION: &'static str = "tallies";
}

#[async_trait]
impl Projection for Tallies {
    fn name(&self) -> &str {
        "tallies"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![
            CollectionSpec::new(Self::COLLECTION)
                .index("total")
                .text("item"),
        ]
    }

    fn interest(&self) -> Interest {
        Interest::event_types(["Added", "Removed", "Poison", "Panic", "Flaky"])
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        let item = event.payload["item"].as_str().unwrap_or("none").to_owned();
        match event.event_type.as_str() {
            "Added" => {
                let amount = event.payload["amount"].as_u64().unwrap_or(0);
                views
                    .upsert(Self::COLLECTION, &item, |line: &mut TallyLine| {
                        line.item.clone_from(&item);
                        line.total += amount;
                        line.count += 1;
                    })
                    .await?;
            }
            "Removed" => views.delete(Self::COLLECTION, &item)?,
            "Poison" | "Panic" | "Flaky" => {
                // A write before the failure, to check it is undone with the event.
                views.put(
                    Self::COLLECTION,
                    "touched-by-failure",
                    &json!({ "item": item }),
                )?;
                if event.event_type == "Flaky" {
                    let left = self.flaky_failures.load(Ordering::SeqCst);
                    if left > 0 {
                        self.flaky_failures.store(left - 1, Ordering::SeqCst);
                        return Err(HandlerError::msg("flaky: try again"));
                    }
                } else if self.broken.load(Ordering::SeqCst) {
                    if event.event_type == "Panic" {
                        panic!("a bug in the projection");
                    }
                    return Err(HandlerError::msg(format!("cannot handle {item}")));
                }
                views.delete(Self::COLLECTION, "touched-by-failure")?;
                views
                    .upsert(
                        Self::COLLECTION,
                        &format!("handled-{item}"),
                        |line: &mut TallyLine| {
                            line.item.clone_from(&item);
                            line.count += 1;
                        },
                    )
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// An `Added` event.
pub fn added(item: &str, amount: u64) -> NewEvent {
    NewEvent::new("Added", json!({ "item": item, "amount": amount }))
}

/// Appends one event to `stream` and returns its position.
pub async fn append_one(store: &dyn EventStore, stream: &str, event: NewEvent) -> Position {
    let stream = StreamId::new(stream).expect("a valid stream id");
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::Any,
            vec![event],
        ))
        .await
        .expect("an append")
        .last_position()
}

/// Appends `count` tallies, one event each, numbered from `*next` over
/// `items` item streams (`tally-item0`…), failing the test if one is refused.
pub async fn append_tallies(store: &dyn EventStore, next: &mut u64, count: u64, items: u64) {
    for _ in 0..count {
        let item = format!("item{}", *next % items);
        append_one(store, &format!("tally-{item}"), added(&item, *next)).await;
        *next += 1;
    }
}

/// What `tallies` must hold after `events`, computed without any projection code.
fn expected_tallies(events: &[(String, u64)]) -> Vec<(String, Document)> {
    let mut lines: BTreeMap<String, TallyLine> = BTreeMap::new();
    for (item, amount) in events {
        let line = lines.entry(item.clone()).or_default();
        line.item.clone_from(item);
        line.total += amount;
        line.count += 1;
    }
    lines
        .into_iter()
        .map(|(item, line)| (item, serde_json::to_value(line).expect("a line encodes")))
        .collect()
}

/// Waits until `view` has applied everything in the store, failing the check
/// after thirty seconds.
pub async fn wait_until_caught_up(store: &dyn EventStore, views: &dyn ViewStore, view: &str) {
    let head = store.head().await.expect("the head");
    wait_for(views, view, head, PATIENCE)
        .await
        .unwrap_or_else(|error| panic!("{view} did not catch up: {error}"));
}

/// Builds `tallies` from the whole log into a fresh in-memory view store, the
/// reference a view must equal.
pub async fn clean_tallies(store: Arc<dyn EventStore>) -> Vec<(String, Document)> {
    let views: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    wait_until_caught_up(&*store, &*views, Tallies::COLLECTION).await;
    runner.stop().await;
    dump_collection(&*views, Tallies::COLLECTION).await
}

/// Starts `tallies` with the quick configuration.
pub async fn run_tallies(
    store: Arc<dyn EventStore>,
    views: Arc<dyn ViewStore>,
    tallies: Arc<Tallies>,
) -> RunnerHandle {
    spawn_projection(
        store,
        views,
        tallies,
        HandlerKind::Projection,
        quick_config(),
    )
    .await
    .expect("tallies registers")
}

/// A projection catches up on the existing log, then follows live; its view
/// equals the model, every event counted once.
pub async fn projection_catches_up_then_follows_live(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let mut applied = Vec::new();
    for n in 0..60u64 {
        let item = format!("item-{}", n % 7);
        append_one(&*store, &format!("stock-{}", n % 5), added(&item, n)).await;
        applied.push((item, n));
    }
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    assert_eq!(
        dump_collection(&*views, "tallies").await,
        expected_tallies(&applied)
    );
    for n in 60..100u64 {
        let item = format!("item-{}", n % 9);
        let position = append_one(&*store, &format!("stock-{}", n % 5), added(&item, n)).await;
        applied.push((item, n));
        if n % 10 == 0 {
            wait_for(&*views, "tallies", position, PATIENCE)
                .await
                .expect("the live event is applied");
        }
    }
    wait_until_caught_up(&*store, &*views, "tallies").await;
    assert_eq!(
        dump_collection(&*views, "tallies").await,
        expected_tallies(&applied)
    );
    runner.stop().await;
}

/// A runner stopped and started again resumes from its checkpoint: nothing is
/// lost or applied twice.
pub async fn projection_resumes_from_its_checkpoint(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    for n in 0..40u64 {
        append_one(&*store, "stock-1", added(&format!("item-{}", n % 3), n)).await;
    }
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    runner.stop().await;
    for n in 40..80u64 {
        append_one(&*store, "stock-2", added(&format!("item-{}", n % 4), n)).await;
    }
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    runner.stop().await;
    assert_eq!(
        dump_collection(&*views, "tallies").await,
        clean_tallies(store.clone()).await
    );
}

/// `wait_for` resolves once a fresh write is applied, times out (naming where the
/// view is) for a position that never comes, and names an unknown view.
pub async fn wait_for_resolves_for_a_fresh_write_and_times_out_otherwise(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    let position = append_one(&*store, "stock-1", added("apple", 3)).await;
    let reached = wait_for(&*views, "tallies", position, PATIENCE)
        .await
        .expect("the write is applied");
    assert!(reached >= position);
    // Read your writes: the document is there once the wait returns.
    let line = views.get("tallies", "apple").await.expect("get");
    assert_eq!(line.map(|line| line["total"].clone()), Some(json!(3)));
    // The projection's own name works as well as a collection's.
    wait_for(&*views, "tallies", position, PATIENCE)
        .await
        .expect("by projection name");
    let never = Position(position.0 + 1_000);
    match wait_for(&*views, "tallies", never, Duration::from_millis(50)).await {
        Err(WaitError::Timeout {
            position: waited_for,
            reached,
            ..
        }) => {
            assert_eq!(waited_for, never);
            assert!(reached >= position && reached < never);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(matches!(
        wait_for(&*views, "no-such-view", position, Duration::from_millis(10)).await,
        Err(WaitError::UnknownView(name)) if name == "no-such-view"
    ));
    runner.stop().await;
}

/// A poison event is retried, then parked with its error; later events still
/// apply; after the fix, an operator's retry applies it and clears it; a skip
/// drops another without applying it.
pub async fn poison_event_is_parked_and_retried_after_a_fix(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let tallies = Arc::new(Tallies::default());
    tallies.broken.store(true, Ordering::SeqCst);
    let runner = run_tallies(store.clone(), views.clone(), tallies.clone()).await;
    append_one(&*store, "stock-1", added("apple", 1)).await;
    let poison = append_one(
        &*store,
        "stock-1",
        NewEvent::new("Poison", json!({ "item": "p" })),
    )
    .await;
    let panic = append_one(
        &*store,
        "stock-1",
        NewEvent::new("Panic", json!({ "item": "q" })),
    )
    .await;
    append_one(&*store, "stock-1", added("apple", 2)).await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    let parked = views.parked("tallies").await.expect("parked");
    assert_eq!(
        parked.iter().map(|p| p.position).collect::<Vec<_>>(),
        [poison, panic]
    );
    assert!(
        parked[0].error.contains("cannot handle p"),
        "{}",
        parked[0].error
    );
    assert!(parked[1].error.contains("panicked"), "{}", parked[1].error);
    assert_eq!(parked[0].attempts, quick_config().max_attempts);
    assert_eq!(parked[0].event_type, "Poison");
    let line = views
        .get("tallies", "apple")
        .await
        .expect("get")
        .expect("apple");
    assert_eq!(
        (line["total"].clone(), line["count"].clone()),
        (json!(3), json!(2))
    );
    assert_eq!(
        views
            .get("tallies", "touched-by-failure")
            .await
            .expect("get"),
        None,
        "a failed event's writes are undone"
    );
    let status = projection_status(&*store, &*views).await.expect("status");
    assert_eq!(status[0].parked, 2);
    // The fix ships; the operator retries one and skips the other.
    tallies.broken.store(false, Ordering::SeqCst);
    views
        .control("tallies", Control::Retry(poison))
        .await
        .expect("retry");
    views
        .control("tallies", Control::Skip(panic))
        .await
        .expect("skip");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !views.parked("tallies").await.expect("parked").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry never applied"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let handled = views.get("tallies", "handled-p").await.expect("get");
    assert_eq!(handled.map(|line| line["count"].clone()), Some(json!(1)));
    assert_eq!(views.get("tallies", "handled-q").await.expect("get"), None);
    runner.stop().await;
}

/// A rebuild after a fix applies the event the old generation parked, and the
/// parked entry goes with the old generation: it is not left to be retried (and
/// applied a second time).
pub async fn rebuild_after_a_fix_applies_parked_events_once(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let tallies = Arc::new(Tallies::default());
    tallies.broken.store(true, Ordering::SeqCst);
    let runner = run_tallies(store.clone(), views.clone(), tallies.clone()).await;
    append_one(
        &*store,
        "stock-1",
        NewEvent::new("Poison", json!({ "item": "p" })),
    )
    .await;
    append_one(&*store, "stock-1", added("apple", 1)).await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    assert_eq!(views.projection("tallies").await.expect("record").parked, 1);
    tallies.broken.store(false, Ordering::SeqCst);
    views
        .control("tallies", Control::Rebuild)
        .await
        .expect("a rebuild");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let record = views.projection("tallies").await.expect("record");
        if record.generation == 2 && record.rebuild.is_none() {
            assert_eq!(
                record.parked, 0,
                "the old generation's parked event is gone"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rebuild never switched"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(views.parked("tallies").await.expect("parked").is_empty());
    let handled = views.get("tallies", "handled-p").await.expect("get");
    assert_eq!(handled.map(|line| line["count"].clone()), Some(json!(1)));
    assert_eq!(
        dump_collection(&*views, "tallies").await,
        clean_tallies(store.clone()).await
    );
    runner.stop().await;
}

/// An event that fails a few times and then succeeds is applied once, not parked.
pub async fn transient_failures_are_retried_without_parking(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let tallies = Arc::new(Tallies::default());
    tallies.flaky_failures.store(2, Ordering::SeqCst);
    let runner = run_tallies(store.clone(), views.clone(), tallies.clone()).await;
    append_one(
        &*store,
        "stock-1",
        NewEvent::new("Flaky", json!({ "item": "f" })),
    )
    .await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    assert!(views.parked("tallies").await.expect("parked").is_empty());
    let handled = views.get("tallies", "handled-f").await.expect("get");
    assert_eq!(handled.map(|line| line["count"].clone()), Some(json!(1)));
    assert_eq!(tallies.flaky_failures.load(Ordering::SeqCst), 0);
    assert_eq!(
        views.projection("tallies").await.expect("record").stalled,
        None
    );
    runner.stop().await;
}

/// While an event keeps failing the projection is reported stalled, with the
/// error; once it succeeds the projection is live again.
pub async fn stalled_projection_reports_its_error_then_recovers(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let tallies = Arc::new(Tallies::default());
    tallies.flaky_failures.store(u32::MAX, Ordering::SeqCst);
    let config = RunnerConfig {
        max_attempts: u32::MAX,
        ..quick_config()
    };
    let runner = spawn_projection(
        store.clone(),
        views.clone(),
        tallies.clone(),
        HandlerKind::Projection,
        config,
    )
    .await
    .expect("tallies registers");
    append_one(
        &*store,
        "stock-1",
        NewEvent::new("Flaky", json!({ "item": "f" })),
    )
    .await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let stalled = loop {
        let status = projection_status(&*store, &*views).await.expect("status");
        if status[0].state == ProjectionState::Stalled {
            break status[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reported stalled"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let error = stalled.stalled.expect("the error");
    assert!(error.contains("flaky: try again"), "{error}");
    assert_eq!(stalled.lag_events, 1);
    tallies.flaky_failures.store(0, Ordering::SeqCst);
    wait_until_caught_up(&*store, &*views, "tallies").await;
    let status = projection_status(&*store, &*views).await.expect("status");
    assert_eq!(
        (status[0].state, status[0].stalled.clone()),
        (ProjectionState::Live, None)
    );
    assert!(views.parked("tallies").await.expect("parked").is_empty());
    runner.stop().await;
}

/// Two runners of one projection (a second process started by mistake) never
/// apply an event twice: a batch from a checkpoint that moved is refused, and the
/// runner that lost the race carries on from the new checkpoint.
pub async fn two_runners_of_one_projection_never_apply_an_event_twice(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let first = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    let second = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    for n in 0..300u64 {
        append_one(
            &*store,
            &format!("stock-{}", n % 3),
            added(&format!("item-{}", n % 7), n),
        )
        .await;
    }
    wait_until_caught_up(&*store, &*views, "tallies").await;
    first.stop().await;
    second.stop().await;
    assert_eq!(
        dump_collection(&*views, "tallies").await,
        clean_tallies(store.clone()).await
    );
}

/// Events the projection does not want are skipped, and still advance its
/// checkpoint, so consistency tokens for them resolve.
pub async fn uninteresting_events_are_skipped_but_advance_the_checkpoint(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    append_one(&*store, "stock-1", added("apple", 1)).await;
    let mut last = Position::START;
    for n in 0..20 {
        last = append_one(
            &*store,
            "noise-1",
            NewEvent::new("Noise", json!({ "n": n })),
        )
        .await;
    }
    wait_for(&*views, "tallies", last, PATIENCE)
        .await
        .expect("skipped events advance the checkpoint");
    assert_eq!(dump_collection(&*views, "tallies").await.len(), 1);
    runner.stop().await;
}

/// A paused projection applies nothing; resumed, it catches up.
pub async fn paused_projection_applies_nothing_until_resumed(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    let first = append_one(&*store, "stock-1", added("apple", 1)).await;
    wait_for(&*views, "tallies", first, PATIENCE)
        .await
        .expect("applied");
    views
        .control("tallies", Control::Pause)
        .await
        .expect("pause");
    // The runner reads the request before its next batch; give it that batch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = append_one(&*store, "stock-1", added("apple", 2)).await;
    assert!(matches!(
        wait_for(&*views, "tallies", second, Duration::from_millis(200)).await,
        Err(WaitError::Timeout { .. })
    ));
    let status = projection_status(&*store, &*views).await.expect("status");
    assert_eq!(status[0].state, ProjectionState::Paused);
    assert_eq!(status[0].lag_events, 1);
    views
        .control("tallies", Control::Resume)
        .await
        .expect("resume");
    wait_for(&*views, "tallies", second, PATIENCE)
        .await
        .expect("applied after resume");
    let status = projection_status(&*store, &*views).await.expect("status");
    assert_eq!(status[0].state, ProjectionState::Live);
    assert_eq!((status[0].lag_events, status[0].lag_ms), (0, 0));
    runner.stop().await;
}

/// A rebuild while writes go on: readers never see the view go backwards (an
/// empty or half-built generation would), and the result equals a clean build.
pub async fn rebuild_during_writes_equals_a_clean_build(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    const SEEDED: u64 = 2000;
    for n in 0..SEEDED {
        append_one(
            &*store,
            &format!("stock-{}", n % 4),
            added(&format!("item-{}", n % 5), 1),
        )
        .await;
    }
    let runner = run_tallies(store.clone(), views.clone(), Arc::new(Tallies::default())).await;
    wait_until_caught_up(&*store, &*views, "tallies").await;
    let switched = Arc::new(AtomicBool::new(false));
    // Writes until the rebuild has been switched in, counting those made while it
    // was under way.
    let writer = {
        let (store, views, switched) = (store.clone(), views.clone(), switched.clone());
        tokio::spawn(async move {
            let mut during_rebuild = 0u64;
            for n in SEEDED.. {
                if switched.load(Ordering::SeqCst) || n > SEEDED + 50_000 {
                    break;
                }
                let record = views.projection("tallies").await.expect("record");
                if record.rebuild.is_some() {
                    during_rebuild += 1;
                }
                // About as fast as a busy application writes, not as fast as a loop
                // can: the rebuild must be able to catch up.
                tokio::time::sleep(Duration::from_millis(1)).await;
                append_one(
                    &*store,
                    &format!("stock-{}", n % 4),
                    added(&format!("item-{}", n % 5), 1),
                )
                .await;
            }
            during_rebuild
        })
    };
    // A reader that sums the counts: the served view only ever grows. It reads on
    // until it has seen the new generation served a few times.
    let reader = {
        let (views, switched) = (views.clone(), switched.clone());
        tokio::spawn(async move {
            let mut smallest_allowed = SEEDED;
            let mut reads_after_switch = 0u32;
            loop {
                let documents = dump_collection(&*views, "tallies").await;
                let counted: u64 = documents
                    .iter()
                    .map(|(_, document)| document["count"].as_u64().unwrap_or(0))
                    .sum();
                assert!(
                    counted >= smallest_allowed,
                    "a reader saw {counted} events counted after seeing {smallest_allowed}: \
                     an empty or half-built generation was served"
                );
                smallest_allowed = counted;
                if switched.load(Ordering::SeqCst) {
                    reads_after_switch += 1;
                    if reads_after_switch > 3 {
                        return;
                    }
                }
                tokio::task::yield_now().await;
            }
        })
    };
    views
        .control("tallies", Control::Rebuild)
        .await
        .expect("a rebuild");
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let record = views.projection("tallies").await.expect("record");
        if record.generation == 2 && record.rebuild.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the rebuild never switched"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    switched.store(true, Ordering::SeqCst);
    let during_rebuild = writer.await.expect("the writer");
    assert!(
        during_rebuild > 0,
        "no write landed while the rebuild was under way"
    );
    reader.await.expect("the reader");
    wait_until_caught_up(&*store, &*views, "tallies").await;
    assert_eq!(
        dump_collection(&*views, "tallies").await,
        clean_tallies(store.clone()).await
    );
    let by_total = views
        .query(
            "tallies",
            &Query::default().order_by("total", true).limit(1),
        )
        .await
        .expect("the index survives the switch");
    assert_eq!(by_total.items.len(), 1);
    runner.stop().await;
}

/// A shelf of one item: reservations up to its capacity.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Shelf {
    reserved: u64,
}

const SHELF_CAPACITY: u64 = 5;

#[derive(Clone, Debug, PartialEq)]
enum ShelfCommand {
    Reserve { order: String, quantity: u64 },
    Release { order: String, quantity: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum ShelfEvent {
    Reserved { order: String, quantity: u64 },
    ReservationFailed { order: String, quantity: u64 },
    Released { order: String, quantity: u64 },
}

impl Aggregate for Shelf {
    const KIND: &'static str = "shelf";
    type Command = ShelfCommand;
    type Event = ShelfEvent;
    type Error = std::convert::Infallible;

    fn decide(&self, command: &ShelfCommand) -> Result<Vec<ShelfEvent>, Self::Error> {
        Ok(vec![match command.clone() {
            ShelfCommand::Reserve { order, quantity }
                if self.reserved + quantity > SHELF_CAPACITY =>
            {
                ShelfEvent::ReservationFailed { order, quantity }
            }
            ShelfCommand::Reserve { order, quantity } => ShelfEvent::Reserved { order, quantity },
            ShelfCommand::Release { order, quantity } => ShelfEvent::Released { order, quantity },
        }])
    }

    fn evolve(&mut self, event: &ShelfEvent) {
        match event {
            ShelfEvent::Reserved { quantity, .. } => self.reserved += quantity,
            ShelfEvent::Released { quantity, .. } => self.reserved -= quantity,
            ShelfEvent::ReservationFailed { .. } => {}
        }
    }
}

/// The saga: reserve every item of a placed order; if one fails, release the
/// others (the compensation), including any reserved after the failure.
struct Reserver {
    shelves: Repository<Shelf>,
    codec: EventCodec<ShelfEvent>,
}

#[derive(Default, Serialize, Deserialize)]
struct ReservationState {
    quantity: u64,
    reserved: Vec<String>,
    failed: bool,
}

#[async_trait]
impl ProcessManager for Reserver {
    type State = ReservationState;
    type Command = (String, ShelfCommand);

    fn name(&self) -> &str {
        "reserver"
    }

    fn interest(&self) -> Interest {
        Interest::categories(["order", "shelf"])
    }

    fn instance(&self, event: &RecordedEvent) -> Option<String> {
        event.payload["order"].as_str().map(str::to_owned)
    }

    fn react(
        &self,
        state: &mut ReservationState,
        event: &RecordedEvent,
    ) -> Result<Vec<Self::Command>, HandlerError> {
        let item = event
            .stream_id
            .as_str()
            .trim_start_matches("shelf-")
            .to_owned();
        if event.event_type == "OrderPlaced" {
            let order = event.payload["order"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            state.quantity = event.payload["quantity"].as_u64().unwrap_or(0);
            let items = event.payload["items"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            return Ok(items
                .iter()
                .filter_map(|item| item.as_str())
                .map(|item| {
                    let reserve = ShelfCommand::Reserve {
                        order: order.clone(),
                        quantity: state.quantity,
                    };
                    (item.to_owned(), reserve)
                })
                .collect());
        }
        Ok(match self.codec.decode(event)? {
            ShelfEvent::Reserved { order, quantity } => {
                state.reserved.push(item.clone());
                if state.failed {
                    vec![(item, ShelfCommand::Release { order, quantity })]
                } else {
                    vec![]
                }
            }
            ShelfEvent::ReservationFailed { order, .. } if !state.failed => {
                state.failed = true;
                state
                    .reserved
                    .iter()
                    .map(|item| {
                        let release = ShelfCommand::Release {
                            order: order.clone(),
                            quantity: state.quantity,
                        };
                        (item.clone(), release)
                    })
                    .collect()
            }
            ShelfEvent::ReservationFailed { .. } | ShelfEvent::Released { .. } => vec![],
        })
    }

    async fn dispatch(
        &self,
        (item, command): Self::Command,
        context: CommandContext,
    ) -> Result<(), HandlerError> {
        self.shelves.execute(&item, &command, &context).await?;
        Ok(())
    }
}

/// Runs the reserver until it has nothing left to do (its commands append
/// events it reacts to in turn).
async fn settle_reserver(store: &Arc<dyn EventStore>, views: &Arc<dyn ViewStore>) {
    let process = Arc::new(Reserver {
        shelves: Repository::new(store.clone()),
        codec: EventCodec::default(),
    });
    let runner = spawn_process_manager(store.clone(), views.clone(), process, quick_config())
        .await
        .expect("the reserver registers");
    loop {
        let head = store.head().await.expect("head");
        wait_for(&**views, "reserver", head, PATIENCE)
            .await
            .expect("the reserver catches up");
        if store.head().await.expect("head") == head {
            break;
        }
    }
    runner.stop().await;
}

async fn place_order(
    store: &dyn EventStore,
    order: &str,
    items: &[&str],
    quantity: u64,
) -> RecordedEvent {
    let mut event = NewEvent::new(
        "OrderPlaced",
        json!({ "order": order, "items": items, "quantity": quantity }),
    );
    event.metadata = Metadata {
        correlation_id: Some(uuid::Uuid::now_v7()),
        ..Metadata::default()
    };
    let stream = StreamId::new(format!("order-{order}")).expect("a stream id");
    store
        .append(AppendRequest::new(
            stream,
            ExpectedVersion::NoStream,
            vec![event],
        ))
        .await
        .expect("placing an order")
        .events
        .remove(0)
}

/// A process manager issues each command once, with correlation and causation
/// carried over, compensates a failed reservation with releases, and, run again
/// from scratch over the same log (a crash that lost its checkpoint), issues no
/// duplicate: the derived command ids are deduplicated by the store.
pub async fn process_manager_effects_happen_once(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let first = place_order(&*store, "1", &["a", "b"], 3).await;
    let second = place_order(&*store, "2", &["c", "a"], 3).await;
    settle_reserver(&store, &views).await;
    let shelves: Repository<Shelf> = Repository::new(store.clone());
    let reserved = |id: &'static str| {
        let shelves = shelves.clone();
        async move { shelves.load(id).await.expect("a shelf").state.reserved }
    };
    assert_eq!(
        (
            reserved("a").await,
            reserved("b").await,
            reserved("c").await
        ),
        (3, 3, 0)
    );
    let log = |id: &str| {
        let store = store.clone();
        let stream = StreamId::new(format!("shelf-{id}")).expect("a stream id");
        async move { super::read_whole_stream(&*store, &stream).await }
    };
    let shelf_c = log("c").await;
    let types: Vec<&str> = shelf_c
        .iter()
        .map(|event| event.event_type.as_str())
        .collect();
    assert_eq!(
        types,
        ["Reserved", "Released"],
        "the compensation released c"
    );
    assert_eq!(shelf_c[0].metadata.causation_id, Some(second.event_id));
    assert_eq!(
        shelf_c[0].metadata.correlation_id,
        second.metadata.correlation_id
    );
    let shelf_b = log("b").await;
    assert_eq!(shelf_b[0].metadata.causation_id, Some(first.event_id));
    assert_eq!(
        shelf_b[0].metadata.correlation_id,
        first.metadata.correlation_id
    );
    let head = store.head().await.expect("head");
    // Everything replayed from position 0 with no saved progress or state.
    let fresh: Arc<dyn ViewStore> = Arc::new(MemoryViews::new());
    settle_reserver(&store, &fresh).await;
    assert_eq!(
        store.head().await.expect("head"),
        head,
        "a replay issued new commands"
    );
    // And on the fixture's own store, a second settle from its checkpoint does nothing.
    settle_reserver(&store, &views).await;
    assert_eq!(store.head().await.expect("head"), head);
    let status = projection_status(&*store, &*views).await.expect("status");
    assert_eq!(status[0].kind, HandlerKind::ProcessManager);
    assert_eq!(status[0].lag_events, 0);
}

/// What a courier ([`Courier`]) did, shared with the check that runs it.
#[derive(Default)]
struct Deliveries {
    /// Dispatches under way now.
    in_flight: std::sync::atomic::AtomicUsize,
    /// The most that were ever under way at once.
    peak: std::sync::Mutex<usize>,
    /// Woken whenever the peak grows.
    peak_grew: tokio::sync::Notify,
    /// Each dispatch's start and end, in the order they happened.
    steps: std::sync::Mutex<Vec<Step>>,
}

/// A dispatch starting or ending.
#[derive(Clone, Debug, PartialEq)]
struct Step {
    job: u64,
    target: Option<String>,
    finished: bool,
}

impl Deliveries {
    fn started(&self, parcel: &Parcel) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        {
            let mut peak = self.peak.lock().expect("the peak");
            *peak = (*peak).max(now);
        }
        self.peak_grew.notify_waiters();
        self.record(parcel, false);
    }

    fn finished(&self, parcel: &Parcel) {
        self.record(parcel, true);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn record(&self, parcel: &Parcel, finished: bool) {
        self.steps.lock().expect("the steps").push(Step {
            job: parcel.job,
            target: parcel.target.clone(),
            finished,
        });
    }

    fn peak(&self) -> usize {
        *self.peak.lock().expect("the peak")
    }

    /// Waits until `count` dispatches have been under way at once.
    async fn reach(&self, count: usize) -> Result<(), HandlerError> {
        let reached = async {
            loop {
                let grew = self.peak_grew.notified();
                if self.peak() >= count {
                    return;
                }
                grew.await;
            }
        };
        tokio::time::timeout(PATIENCE, reached).await.map_err(|_| {
            HandlerError::msg(format!(
                "only {} of {count} dispatches were ever under way at once",
                self.peak()
            ))
        })
    }

    fn steps(&self) -> Vec<Step> {
        self.steps.lock().expect("the steps").clone()
    }
}

/// A `Send` event's command: deliver job `job` to `target`, as the `seen`-th
/// job of its instance.
#[derive(Clone, Debug, PartialEq)]
struct Parcel {
    job: u64,
    target: Option<String>,
    seen: u64,
}

/// One saga instance of a courier: how many of its jobs it has seen.
#[derive(Default, Serialize, Deserialize)]
struct CourierState {
    seen: u64,
}

/// A process manager for the dispatch checks: each `Send` event (`job`,
/// `instance`, `target`) issues one parcel, which dispatch stores as one event
/// in a stream of its own job (`parcel-<courier>.<job>`, idempotent by the
/// command id), after yielding more often for earlier jobs so that a later
/// parcel overtakes an earlier one wherever the runner lets it.
struct Courier {
    name: &'static str,
    store: Arc<dyn EventStore>,
    deliveries: Arc<Deliveries>,
    /// Whether it names its parcels' targets (or leaves the default).
    declares_targets: bool,
    /// Each dispatch waits until this many are under way at once.
    gate: Option<usize>,
    /// The job whose dispatch fails while `broken`, by an error or a panic.
    failing_job: Option<(u64, Failing)>,
    broken: AtomicBool,
}

#[derive(Clone, Copy)]
enum Failing {
    WithAnError,
    WithAPanic,
}

impl Courier {
    fn new(name: &'static str, store: Arc<dyn EventStore>) -> Self {
        Self {
            name,
            store,
            deliveries: Arc::default(),
            declares_targets: true,
            gate: None,
            failing_job: None,
            broken: AtomicBool::new(false),
        }
    }

    fn parcel_stream(&self, job: u64) -> StreamId {
        StreamId::new(format!("parcel-{}.{job}", self.name)).expect("a stream id")
    }

    /// The parcels stored for `job`, as `seen` values.
    async fn delivered(&self, job: u64) -> Vec<u64> {
        super::read_whole_stream(&*self.store, &self.parcel_stream(job))
            .await
            .iter()
            .map(|event| event.payload["seen"].as_u64().expect("seen"))
            .collect()
    }

    async fn spawn(
        self: &Arc<Self>,
        views: Arc<dyn ViewStore>,
        config: RunnerConfig,
    ) -> RunnerHandle {
        spawn_process_manager(self.store.clone(), views, self.clone(), config)
            .await
            .expect("the courier registers")
    }
}

#[async_trait]
impl ProcessManager for Courier {
    type State = CourierState;
    type Command = Parcel;

    fn name(&self) -> &str {
        self.name
    }

    fn interest(&self) -> Interest {
        Interest::event_types(["Send"])
    }

    fn instance(&self, event: &RecordedEvent) -> Option<String> {
        event.payload["instance"].as_str().map(str::to_owned)
    }

    fn react(
        &self,
        state: &mut CourierState,
        event: &RecordedEvent,
    ) -> Result<Vec<Parcel>, HandlerError> {
        state.seen += 1;
        Ok(vec![Parcel {
            job: event.payload["job"].as_u64().expect("a job"),
            target: event.payload["target"].as_str().map(str::to_owned),
            seen: state.seen,
        }])
    }

    fn target(&self, parcel: &Parcel) -> Option<String> {
        parcel.target.clone().filter(|_| self.declares_targets)
    }

    async fn dispatch(&self, parcel: Parcel, context: CommandContext) -> Result<(), HandlerError> {
        self.deliveries.started(&parcel);
        let outcome = self.deliver(&parcel, context).await;
        self.deliveries.finished(&parcel);
        outcome
    }
}

impl Courier {
    async fn deliver(&self, parcel: &Parcel, context: CommandContext) -> Result<(), HandlerError> {
        if let Some(gate) = self.gate {
            self.deliveries.reach(gate).await?;
        }
        for _ in 0..(64u64.saturating_sub(parcel.job) * 4) {
            tokio::task::yield_now().await;
        }
        match self.failing_job {
            Some((job, Failing::WithAnError))
                if job == parcel.job && self.broken.load(Ordering::SeqCst) =>
            {
                return Err(HandlerError::msg(format!("job {job} cannot be delivered")));
            }
            Some((job, Failing::WithAPanic))
                if job == parcel.job && self.broken.load(Ordering::SeqCst) =>
            {
                panic!("job {job} cannot be delivered");
            }
            _ => {}
        }
        let mut event = NewEvent::new("Parcel", json!({ "job": parcel.job, "seen": parcel.seen }));
        event.metadata.command_id = Some(context.command_id);
        let request = AppendRequest::new(
            self.parcel_stream(parcel.job),
            ExpectedVersion::Any,
            vec![event],
        )
        .with_idempotency_key(context.command_id.to_string());
        self.store
            .append(request)
            .await
            .map_err(|error| HandlerError::with_source("storing a parcel", error))?;
        Ok(())
    }
}

/// Appends a `Send` event for `job` of `instance` to `target`.
async fn send(store: &dyn EventStore, job: u64, instance: &str, target: Option<&str>) -> Position {
    append_one(
        store,
        &format!("job-{job}"),
        NewEvent::new(
            "Send",
            json!({ "job": job, "instance": instance, "target": target }),
        ),
    )
    .await
}

/// A process manager's commands to different aggregates are in flight at the
/// same time: each dispatch waits until all of the batch's are under way, which
/// only happens if the runner starts them together.
pub async fn process_manager_dispatches_to_different_aggregates_at_once(fixture: ViewFixture) {
    const JOBS: u64 = 8;
    let (store, views) = (fixture.store(), fixture.views());
    for job in 1..=JOBS {
        // Appended before the runner starts, so they arrive in one batch.
        send(&*store, job, &format!("i{job}"), Some(&format!("t{job}"))).await;
    }
    let courier = Arc::new(Courier {
        gate: Some(JOBS as usize),
        ..Courier::new("fan-out", store.clone())
    });
    let runner = courier.spawn(views.clone(), quick_config()).await;
    wait_until_caught_up(&*store, &*views, "fan-out").await;
    assert_eq!(views.parked("fan-out").await.expect("parked"), []);
    assert_eq!(courier.deliveries.peak(), JOBS as usize);
    for job in 1..=JOBS {
        assert_eq!(courier.delivered(job).await, [1], "job {job}");
    }
    runner.stop().await;
}

/// Commands to one aggregate are dispatched one after another in the order they
/// were issued, even while commands to others run beside them; an instance's
/// later event sees the state its earlier one left in the same batch, and its
/// commands wait for the earlier one's; and a process manager that names no
/// targets dispatches one command at a time, in order, as it always did.
pub async fn process_manager_keeps_each_aggregates_commands_in_order(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let targets = ["a", "b", "c"];
    let target_of = |job: u64| targets[(job % 3) as usize];
    // Jobs 1 to 15 go round the three targets; jobs 1 to 12 are each their own
    // instance, jobs 13 to 15 one instance's.
    for job in 1..=15 {
        let instance = if job > 12 {
            "shared".to_owned()
        } else {
            format!("i{job}")
        };
        send(&*store, job, &instance, Some(target_of(job))).await;
    }
    for (name, declares_targets) in [("ordered", true), ("one-by-one", false)] {
        let courier = Arc::new(Courier {
            declares_targets,
            ..Courier::new(name, store.clone())
        });
        let runner = courier.spawn(views.clone(), quick_config()).await;
        wait_until_caught_up(&*store, &*views, name).await;
        runner.stop().await;
        assert_eq!(views.parked(name).await.expect("parked"), []);
        let steps = courier.deliveries.steps();
        // Per target, and for the shared instance, each dispatch starts after the
        // one before it ended, in the order issued.
        let mut lanes: Vec<Vec<u64>> = targets
            .iter()
            .map(|target| (1..=15).filter(|&job| target_of(job) == *target).collect())
            .collect();
        lanes.push(vec![13, 14, 15]);
        for lane in &lanes {
            let in_lane: Vec<(u64, bool)> = steps
                .iter()
                .filter(|step| lane.contains(&step.job))
                .map(|step| (step.job, step.finished))
                .collect();
            let one_by_one: Vec<(u64, bool)> = lane
                .iter()
                .flat_map(|&job| [(job, false), (job, true)])
                .collect();
            assert_eq!(in_lane, one_by_one, "{name}: the dispatches of {lane:?}");
        }
        for (job, seen) in (13..=15).zip(1..) {
            assert_eq!(courier.delivered(job).await, [seen], "{name}: job {job}");
        }
        if declares_targets {
            assert!(
                courier.deliveries.peak() >= 3,
                "the three targets were never served at once: {steps:?}"
            );
        } else {
            assert_eq!(courier.deliveries.peak(), 1, "{steps:?}");
            let jobs: Vec<u64> = steps.iter().map(|step| step.job).collect();
            let in_order: Vec<u64> = (1..=15).flat_map(|job| [job, job]).collect();
            assert_eq!(jobs, in_order, "{name}: dispatched out of order");
        }
    }
}

/// A dispatch that fails holds the checkpoint before its event, reported as
/// stalled on that event, while the batch's other commands go out; its
/// instance's later event waits. Once it succeeds every command has been
/// stored once (those sent before the failure are recognised by their ids). A
/// dispatch that keeps failing (here, panicking) parks its own event and no
/// other; its changes to the instance's state are undone before the instance's
/// later event reacts, and nothing was sent from the undone state.
pub async fn process_manager_failing_dispatch_parks_its_own_event(fixture: ViewFixture) {
    let (store, views) = (fixture.store(), fixture.views());
    let mut positions = BTreeMap::new();
    for job in 1..=6 {
        let instance = if job == 3 || job == 5 {
            "shared".to_owned()
        } else {
            format!("i{job}")
        };
        let target = format!("t{job}");
        positions.insert(job, send(&*store, job, &instance, Some(&target)).await);
    }
    // Failing until healed: the runner retries (for ever here) and says why.
    let courier = Arc::new(Courier {
        failing_job: Some((3, Failing::WithAnError)),
        broken: AtomicBool::new(true),
        ..Courier::new("healed", store.clone())
    });
    let config = RunnerConfig {
        max_attempts: u32::MAX,
        ..quick_config()
    };
    let runner = courier.spawn(views.clone(), config).await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let stalled = loop {
        if let Some(stalled) = views.projection("healed").await.expect("record").stalled {
            break stalled;
        }
        assert!(tokio::time::Instant::now() < deadline, "never stalled");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert!(
        stalled.contains(&format!("event at position {}", positions[&3]))
            && stalled.contains("job 3 cannot be delivered"),
        "{stalled}"
    );
    assert!(views.projection("healed").await.expect("record").position < positions[&3]);
    for (job, delivered) in [(1, 1), (2, 1), (3, 0), (4, 1), (5, 0), (6, 1)] {
        assert_eq!(
            courier.delivered(job).await.len(),
            delivered,
            "job {job} while job 3 fails"
        );
    }
    courier.broken.store(false, Ordering::SeqCst);
    wait_until_caught_up(&*store, &*views, "healed").await;
    runner.stop().await;
    assert_eq!(views.parked("healed").await.expect("parked"), []);
    assert_eq!(
        views.projection("healed").await.expect("record").stalled,
        None
    );
    for (job, seen) in [(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 1)] {
        assert_eq!(
            courier.delivered(job).await,
            [seen],
            "job {job} once healed"
        );
    }

    // Failing for good: parked after its attempts, alone.
    let courier = Arc::new(Courier {
        failing_job: Some((3, Failing::WithAPanic)),
        broken: AtomicBool::new(true),
        ..Courier::new("parks", store.clone())
    });
    let runner = courier.spawn(views.clone(), quick_config()).await;
    wait_until_caught_up(&*store, &*views, "parks").await;
    runner.stop().await;
    let parked = views.parked("parks").await.expect("parked");
    assert_eq!(
        parked
            .iter()
            .map(|parked| parked.position)
            .collect::<Vec<_>>(),
        [positions[&3]]
    );
    assert!(parked[0].error.contains("panicked"), "{}", parked[0].error);
    assert_eq!(parked[0].attempts, quick_config().max_attempts);
    // Job 5 reacted as the instance's first job: job 3's reaction was undone.
    for (job, seen) in [(1, 1), (2, 1), (4, 1), (5, 1), (6, 1)] {
        assert_eq!(courier.delivered(job).await, [seen], "job {job}");
    }
    assert_eq!(
        courier.delivered(3).await,
        Vec::<u64>::new(),
        "the parked job"
    );
}
