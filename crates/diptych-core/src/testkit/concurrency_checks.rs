//! Racing writers and live subscribers: the invariants that only break under load.
//!
//! Every wait is bounded by a timeout, so a lost wake-up or a deadlock fails the
//! check with a message instead of hanging the test run.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;

use super::{
    append_ok, head, join_all, numbered_events, read_whole_log, read_whole_stream, stream,
};
use crate::envelope::{NewEvent, Position, RecordedEvent, StreamId};
use crate::error::AppendError;
use crate::store::{AppendOutcome, AppendRequest, EventStore, ExpectedVersion};
use crate::subscription::Subscription;

/// How long a whole concurrent phase may take before the check calls it a hang. Far
/// above what any sane backend needs, even one that fsyncs every append.
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);

/// 32 tasks append 10 times each to one stream: 24 with `Exact(version)`, retrying
/// on conflict with the version the conflict reports (and the same events, so a
/// conflict that wrote anything would surface as a duplicate id), 8 with `Any`.
/// Afterwards the stream is exactly versions 1..N, N is the number of events the
/// successful appends reported, and each outcome's events sit at its versions.
pub async fn concurrent_appends_to_one_stream_keep_versions_dense(store: Arc<dyn EventStore>) {
    const TASKS: u64 = 32;
    const APPENDS_PER_TASK: u64 = 10;
    const ANY_TASKS: u64 = 8;
    let contended = stream("contended");
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let contended = contended.clone();
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for append in 0..APPENDS_PER_TASK {
                let events = numbered_events(task * 1000 + append * 10, 1 + (task + append) % 2);
                let outcome = if task < ANY_TASKS {
                    let request =
                        AppendRequest::new(contended.clone(), ExpectedVersion::Any, events.clone());
                    (ExpectedVersion::Any, append_ok(&*store, request).await)
                } else {
                    append_with_retries(&*store, &contended, &events).await
                };
                outcomes.push((events, outcome));
            }
            outcomes
        });
    }
    let outcomes: Vec<(Vec<NewEvent>, (ExpectedVersion, AppendOutcome))> = within(
        PHASE_TIMEOUT,
        "32 tasks appending to one stream (a deadlock?)",
        join_all(tasks),
    )
    .await
    .into_iter()
    .flatten()
    .collect();

    let stored = read_whole_stream(&*store, &contended).await;
    let versions: Vec<u64> = stored.iter().map(|event| event.stream_version).collect();
    let written: usize = outcomes
        .iter()
        .map(|(_, (_, outcome))| outcome.events.len())
        .sum();
    assert_eq!(
        versions,
        (1..=written as u64).collect::<Vec<_>>(),
        "racing appends must leave versions exactly 1..={written}, no gap, no duplicate"
    );
    assert_increasing_positions(&stored);
    for (events, (expected, outcome)) in &outcomes {
        assert!(
            !outcome.deduplicated,
            "an append without a key was deduplicated"
        );
        super::assert_recorded_as_given(events, &outcome.events, "a racing append's outcome");
        if let ExpectedVersion::Exact(version) = expected {
            assert_eq!(
                outcome.events[0].stream_version,
                version + 1,
                "an append expecting version {version} must start at {}",
                version + 1
            );
        }
        for event in &outcome.events {
            assert_eq!(
                &stored[event.stream_version as usize - 1],
                event,
                "the stream does not hold an appended event where its outcome said"
            );
        }
    }
    assert_eq!(
        read_whole_log(&*store).await,
        stored,
        "the log must hold exactly the stream's events"
    );
}

/// 16 writers append 20 times each (1 to 3 events) to their own stream (with
/// `Exact`) and to 4 shared ones (with `Any`), while one subscriber follows from
/// the start and a second joins midway from the then head. Each subscriber must
/// receive exactly the final log from its checkpoint: every event once, in
/// position order, with each stream's versions rising by one; nothing more.
pub async fn concurrent_writers_and_subscribers_see_every_event_once(store: Arc<dyn EventStore>) {
    const WRITERS: u64 = 16;
    const APPENDS_PER_WRITER: usize = 20;
    const SHARED_STREAMS: usize = 4;
    // Each writer's plan is fixed up front, so the number of events is known before
    // anything runs and subscribers know when they have seen everything.
    let plans: Vec<Vec<(Option<usize>, u64)>> = (0..WRITERS)
        .map(|writer| {
            let mut rng = fastrand::Rng::with_seed(writer);
            (0..APPENDS_PER_WRITER)
                .map(|_| {
                    let shared = rng.bool().then(|| rng.usize(..SHARED_STREAMS));
                    (shared, rng.u64(1..=3))
                })
                .collect()
        })
        .collect();
    let total: u64 = plans.iter().flatten().map(|(_, count)| count).sum();

    let from_start = tokio::spawn(collect(
        Subscription::new(Arc::clone(&store), Position::START),
        total,
    ));
    let midway = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut watch = store.head_watch();
            within(
                PHASE_TIMEOUT,
                "waiting for the writers to get going",
                watch.wait_for(|head| head.0 >= total / 3),
            )
            .await
            .expect("the head watch was closed while the store is alive");
            let checkpoint = head(&*store).await;
            let before = events_up_to(&*store, checkpoint).await;
            let subscription = Subscription::with_page_size(Arc::clone(&store), checkpoint, 7);
            (checkpoint, collect(subscription, total - before).await)
        })
    };

    let mut writers = JoinSet::new();
    for (writer, plan) in plans.into_iter().enumerate() {
        let store = Arc::clone(&store);
        writers.spawn(async move {
            let own = stream(&format!("writer-{writer}"));
            let mut own_version = 0;
            for (append, (shared, count)) in plan.into_iter().enumerate() {
                let events = numbered_events(writer as u64 * 1000 + append as u64 * 10, count);
                let request = match shared {
                    Some(shared) => AppendRequest::new(
                        stream(&format!("shared-{shared}")),
                        ExpectedVersion::Any,
                        events,
                    ),
                    None => {
                        let request = AppendRequest::new(
                            own.clone(),
                            ExpectedVersion::Exact(own_version),
                            events,
                        );
                        own_version += count;
                        request
                    }
                };
                append_ok(&*store, request).await;
            }
        });
    }
    within(
        PHASE_TIMEOUT,
        "16 writers appending to many streams (a deadlock?)",
        join_all(writers),
    )
    .await;
    // Once every append is acknowledged, subscribers have no reason to take long: one
    // still waiting has skipped an event or missed a wake-up.
    let straggling = "waiting for the subscribers once the writers were done (a subscriber that skipped an \
                      event committed late with a lower position, or missed a wake-up, waits forever)";
    let from_start = within(Duration::from_secs(10), straggling, from_start).await;
    let from_start =
        from_start.unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
    let midway = within(Duration::from_secs(10), straggling, midway).await;
    let (checkpoint, midway) =
        midway.unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));

    let log = read_whole_log(&*store).await;
    assert_eq!(
        log.len() as u64,
        total,
        "the log must hold every appended event"
    );
    assert_increasing_positions(&log);
    let mut versions: HashMap<&StreamId, u64> = HashMap::new();
    for event in &log {
        let version = versions.entry(&event.stream_id).or_default();
        *version += 1;
        assert_eq!(
            event.stream_version, *version,
            "in position order, `{}` must go through versions 1, 2, 3…",
            event.stream_id
        );
    }
    assert_eq!(
        from_start, log,
        "a subscriber from the start must see the final log exactly: every event once, in order"
    );
    let after_checkpoint: Vec<RecordedEvent> = log
        .into_iter()
        .filter(|event| event.position > checkpoint)
        .collect();
    assert_eq!(
        midway, after_checkpoint,
        "a subscriber from checkpoint {checkpoint} must see exactly the events after it, once, in order"
    );
}

/// A subscription first reads what is already stored, then follows new appends as
/// they commit; one resumed from a checkpoint sees exactly what follows it.
pub async fn subscription_catches_up_then_follows_live(store: Arc<dyn EventStore>) {
    let feed = stream("feed");
    append_ok(
        &*store,
        AppendRequest::new(feed.clone(), ExpectedVersion::Any, numbered_events(1, 3)),
    )
    .await;
    append_ok(
        &*store,
        AppendRequest::new(
            stream("feed-other"),
            ExpectedVersion::Any,
            numbered_events(4, 2),
        ),
    )
    .await;
    let stored = read_whole_log(&*store).await;

    let mut subscription = Subscription::new(Arc::clone(&store), Position::START);
    let mut seen = Vec::new();
    for _ in 0..stored.len() {
        seen.push(
            within(
                Duration::from_secs(10),
                "catching up with stored events",
                subscription.next(),
            )
            .await
            .expect("subscription failed"),
        );
    }
    assert_eq!(
        seen, stored,
        "catching up must deliver the stored log in order"
    );
    assert_eq!(
        subscription.position(),
        stored[stored.len() - 1].position,
        "the checkpoint must be the last event delivered"
    );

    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for round in 0..3 {
                // Sleep first, so the subscriber is already waiting for a commit.
                tokio::time::sleep(Duration::from_millis(20)).await;
                let request = AppendRequest::new(
                    stream("feed"),
                    ExpectedVersion::Any,
                    numbered_events(10 + round * 3, 3),
                );
                outcomes.extend(append_ok(&*store, request).await.events);
            }
            outcomes
        })
    };
    let live = collect_from(&mut subscription, 9, Duration::from_secs(10)).await;
    let written = writer
        .await
        .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
    assert_eq!(
        live, written,
        "a caught-up subscription must deliver each live append, in order"
    );
    assert_eq!(subscription.position(), head(&*store).await);

    let log = read_whole_log(&*store).await;
    let resumed = collect(
        Subscription::new(Arc::clone(&store), log[2].position),
        log.len() as u64 - 3,
    )
    .await;
    assert_eq!(
        resumed,
        log[3..],
        "a subscription resumed from a checkpoint must start right after it"
    );
}

/// With a page size of one, a subscription still delivers the whole log, caught-up
/// and live parts alike, never holding more than one event at a time.
pub async fn subscription_with_page_size_one_sees_everything(store: Arc<dyn EventStore>) {
    for round in 0..4 {
        append_ok(
            &*store,
            AppendRequest::new(
                stream(&format!("paged-feed-{}", round % 2)),
                ExpectedVersion::Any,
                numbered_events(round * 3, 3),
            ),
        )
        .await;
    }
    let writer = {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            for round in 0..6 {
                append_ok(
                    &*store,
                    AppendRequest::new(
                        stream("paged-feed-live"),
                        ExpectedVersion::Any,
                        numbered_events(100 + round * 2, 2),
                    ),
                )
                .await;
            }
        })
    };
    let mut subscription = Subscription::with_page_size(Arc::clone(&store), Position::START, 1);
    let mut seen = Vec::new();
    within(
        Duration::from_secs(30),
        "reading 24 events a page of one at a time (a lost wake-up?)",
        async {
            while seen.len() < 24 {
                let batch = subscription
                    .next_batch()
                    .await
                    .expect("subscription failed");
                assert!(
                    batch.len() <= 1,
                    "a subscription with page size 1 handed out {} events at once",
                    batch.len()
                );
                seen.extend(batch);
            }
        },
    )
    .await;
    writer
        .await
        .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
    assert_eq!(
        seen,
        read_whole_log(&*store).await,
        "a page size of one must still deliver the whole log, in order"
    );
}

/// Appends `events` expecting the version last seen, retrying with the version a
/// conflict reports. Returns the expectation that finally held and the outcome.
async fn append_with_retries(
    store: &dyn EventStore,
    stream: &StreamId,
    events: &[NewEvent],
) -> (ExpectedVersion, AppendOutcome) {
    let mut expected = ExpectedVersion::Exact(super::stream_version(store, stream).await);
    for _ in 0..100_000 {
        match store
            .append(AppendRequest::new(
                stream.clone(),
                expected,
                events.to_vec(),
            ))
            .await
        {
            Ok(outcome) => return (expected, outcome),
            Err(AppendError::Conflict {
                actual,
                expected: reported,
                ..
            }) => {
                assert_eq!(
                    reported, expected,
                    "a conflict must report the expectation it refused"
                );
                assert!(
                    !expected.admits(actual),
                    "a conflict reported version {actual}, which {expected} admits"
                );
                expected = ExpectedVersion::Exact(actual);
            }
            Err(error) => panic!("appending to `{stream}` expecting {expected} failed: {error}"),
        }
    }
    panic!("an append to `{stream}` conflicted 100000 times in a row: appends are starving")
}

/// Reads `count` events from a subscription, then makes sure no further one
/// arrives: with the writers done, anything more is a duplicate or an invention.
async fn collect(mut subscription: Subscription, count: u64) -> Vec<RecordedEvent> {
    let events = collect_from(&mut subscription, count, PHASE_TIMEOUT).await;
    let extra = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await;
    assert!(
        extra.is_err(),
        "a subscription delivered an event beyond the log: {extra:?}"
    );
    events
}

/// Reads `count` events from a subscription, failing if they do not all arrive
/// within `limit`.
async fn collect_from(
    subscription: &mut Subscription,
    count: u64,
    limit: Duration,
) -> Vec<RecordedEvent> {
    let mut events = Vec::with_capacity(count as usize);
    let reading = async {
        while (events.len() as u64) < count {
            events.push(subscription.next().await.expect("subscription failed"));
        }
    };
    if tokio::time::timeout(limit, reading).await.is_err() {
        panic!(
            "a subscription delivered {} of {count} events and then stalled: a lost wake-up or a skipped event",
            events.len()
        );
    }
    events
}

/// How many events have a position at or below `checkpoint`.
async fn events_up_to(store: &dyn EventStore, checkpoint: Position) -> u64 {
    let mut count = 0;
    let mut after = Position::START;
    while after < checkpoint {
        let page = store.read_all(after, 64).await.expect("read_all failed");
        let Some(last) = page.last() else { break };
        assert!(
            last.position > after,
            "read_all after {after} returned nothing later"
        );
        after = last.position;
        count += page
            .iter()
            .filter(|event| event.position <= checkpoint)
            .count() as u64;
    }
    count
}

/// Asserts positions strictly increase along `events` and ids are unique.
#[track_caller]
fn assert_increasing_positions(events: &[RecordedEvent]) {
    for pair in events.windows(2) {
        assert!(
            pair[0].position < pair[1].position,
            "positions must strictly increase: {} then {}",
            pair[0].position,
            pair[1].position
        );
    }
    let ids: HashSet<_> = events.iter().map(|event| event.event_id).collect();
    assert_eq!(
        ids.len(),
        events.len(),
        "an event id appears twice in the log"
    );
}

/// Runs `work` or fails the check, saying what hung.
async fn within<T>(limit: Duration, what: &str, work: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {} s", limit.as_secs()))
}
