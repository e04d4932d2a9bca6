//! The backend conformance suite: one set of checks that every [`EventStore`] must
//! pass, whatever it stores events in.
//!
//! # Using it
//!
//! A backend crate writes one test file that says how to make a fresh, empty store,
//! and expands [`event_store_conformance!`](crate::event_store_conformance):
//!
//! ```text
//! use std::sync::Arc;
//! use diptych_core::testkit::Fixture;
//!
//! diptych_core::event_store_conformance!(|| async {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = SqliteStore::open(dir.path().join("events.db")).unwrap();
//!     // The directory must outlive the store, so the fixture keeps it.
//!     Fixture::new(Arc::new(store)).with_guard(dir)
//! });
//! ```
//!
//! The macro expands to one `#[tokio::test]` per check, each on its own fresh
//! fixture, so a failure is reported by name and one broken rule does not hide the
//! others. The using crate needs `tokio` with the `macros` and `rt-multi-thread`
//! features as a dev-dependency. Every check is also a plain `pub async fn` taking
//! an `Arc<dyn EventStore>`, for a backend that wants to run one by hand.
//!
//! # What it checks
//!
//! * **The sequential contract**: dense versions,
//!   increasing positions, expected versions, refusals that write nothing,
//!   idempotency, paging edges of both reads, exact round trips of payloads and
//!   metadata, snapshots.
//! * **Concurrency**: racing appends on one stream and on many, with subscribers
//!   started before and during the writes; every subscriber must see the final log
//!   exactly, in order, once.
//! * **The repository on top of the store**: commands, deduplication, retries,
//!   temporal loads, snapshots (written, used, and ignored after a state version
//!   bump) and upcasting of old events read back from storage.
//! * **Property tests**: random sequences of operations give the same results on the
//!   backend as on [`MemoryStore`](crate::MemoryStore), the reference model
//!   ([`check_against_model`]); random concurrent batches keep the invariants
//!   ([`check_concurrent_batches`]).
//!
//! # What it reads into the contract
//!
//! * **Positions may have gaps.** Only their order is compared with the model, so
//!   a backend whose sequence skips numbers (PostgreSQL's does after a rollback)
//!   still conforms.
//! * **Read your writes when quiet.** Once an append has returned and no other
//!   append is in flight, its events are readable and `head` reports them; the
//!   head watch moves promptly. Consistency tokens rely on this.
//! * **Refusals come in the reference model's order** (see the contract in
//!   [`crate::store`]), and [`EventStore::find_idempotent_append`] reports what it
//!   finds with `deduplicated` set, exactly as a repeated append would.
//! * **Arguments are taken at their word:** limits up to `usize::MAX`, versions and
//!   positions up to `u64::MAX`, `u32::MAX` schema versions, `u64::MAX` inside
//!   payloads, and stream ids that are compared exactly (case-sensitive, no
//!   trimming) and may be 256 bytes of multi-byte UTF-8. A backend that converts to
//!   a signed SQL integer must clamp, not overflow.

use std::any::Any;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::json;

use crate::envelope::{NewEvent, Position, RecordedEvent, StreamId};
use crate::error::{AppendError, ReadError};
use crate::store::{AppendOutcome, AppendRequest, EventStore, StreamRead};

mod concurrency_checks;
mod durability_checks;
mod failpoints;
mod model;
mod projection_checks;
mod proxy;
mod repository_checks;
mod store_checks;
mod view_checks;
mod view_model;

pub use concurrency_checks::{
    concurrent_appends_to_one_stream_keep_versions_dense,
    concurrent_writers_and_subscribers_see_every_event_once,
    subscription_catches_up_then_follows_live, subscription_with_page_size_one_sees_everything,
};
pub use durability_checks::acknowledged_writes_survive_reopening;
pub use failpoints::{EXITED_AFTER_COMMIT, ExitAfterReceivedCommits, expect_exit_after_commit};
pub use model::{check_against_model, check_concurrent_batches};
pub use projection_checks::{
    Tallies, TallyLine, added, append_one, append_tallies, clean_tallies,
    paused_projection_applies_nothing_until_resumed,
    poison_event_is_parked_and_retried_after_a_fix,
    process_manager_dispatches_to_different_aggregates_at_once,
    process_manager_effects_happen_once, process_manager_failing_dispatch_parks_its_own_event,
    process_manager_keeps_each_aggregates_commands_in_order,
    projection_catches_up_then_follows_live, projection_resumes_from_its_checkpoint,
    rebuild_after_a_fix_applies_parked_events_once, rebuild_during_writes_equals_a_clean_build,
    run_tallies, stalled_projection_reports_its_error_then_recovers,
    transient_failures_are_retried_without_parking,
    two_runners_of_one_projection_never_apply_an_event_twice,
    uninteresting_events_are_skipped_but_advance_the_checkpoint,
    wait_for_resolves_for_a_fresh_write_and_times_out_otherwise, wait_until_caught_up,
};
pub use proxy::{KillOnDrop, TcpProxy};
pub use repository_checks::{
    repository_business_rejection_writes_nothing,
    repository_caches_follow_writers_of_another_store,
    repository_caches_never_serve_a_state_older_than_the_store,
    repository_concurrent_commands_all_apply,
    repository_concurrent_repeats_of_a_command_write_once,
    repository_expected_version_mismatch_is_a_conflict,
    repository_ignores_snapshots_of_another_state_version, repository_loads_at_time,
    repository_loads_at_version, repository_records_command_metadata,
    repository_repeated_command_is_deduplicated, repository_reports_undecodable_events,
    repository_upcasts_old_events_from_the_store, repository_writes_and_uses_snapshots,
};
pub use store_checks::{
    appends_get_dense_versions_and_increasing_positions,
    conflict_reports_actual_version_and_writes_nothing,
    duplicate_event_id_is_refused_and_writes_nothing, empty_append_is_refused_and_writes_nothing,
    event_with_empty_type_is_refused_and_writes_nothing, expected_version_is_enforced,
    head_watch_changes_after_an_append, idempotency_key_reused_for_another_stream_is_refused,
    idempotent_retry_returns_first_outcome_and_writes_nothing,
    missing_stream_is_not_found_and_at_version_zero, payload_and_metadata_round_trip_exactly,
    read_all_pages_cover_the_log_once_in_order, read_stream_pages_forward_and_backward,
    snapshots_round_trip_and_are_replaced, stream_id_of_max_length_works,
};
pub use view_checks::{
    dump_collection, views_apply_a_received_event_once, views_documents_round_trip,
    views_filter_on_indexes, views_full_text_search, views_order_and_page_stably,
    views_park_retry_and_skip, views_record_operator_requests,
    views_refuse_a_commit_from_a_moved_checkpoint, views_refuse_bad_queries,
    views_registration_rules, views_switch_generations_atomically,
};
pub use view_model::check_views_against_model;

/// A name no other test run uses (`t<pid>x<uuid>`): for what tests make on a
/// shared server, such as a broker's streams and queues.
pub fn unique_name() -> String {
    format!("t{}x{}", std::process::id(), uuid::Uuid::now_v7().simple())
}

/// Opens the same storage again, for the durability check.
type Reopen =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn EventStore>> + Send>> + Send + Sync>;

/// A store under test, plus whatever must live exactly as long as it.
///
/// Fields drop in declaration order, so the store goes first and the guard (a
/// temporary directory, a database that a drop deletes) after it.
pub struct Fixture {
    store: Arc<dyn EventStore>,
    reopen: Option<Reopen>,
    _guard: Box<dyn Any + Send + Sync>,
}

impl Fixture {
    /// A fixture around a fresh, empty store.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            reopen: None,
            _guard: Box::new(()),
        }
    }

    /// Keeps `guard` alive until after the store is dropped: for a temporary
    /// directory holding the store's files, say.
    pub fn with_guard(self, guard: impl Any + Send + Sync) -> Self {
        Self {
            _guard: Box::new(guard),
            ..self
        }
    }

    /// Says how to open the same storage again once the store is dropped, which
    /// enables [`acknowledged_writes_survive_reopening`] (invariant 4).
    pub fn with_reopen<F, Fut>(self, reopen: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn EventStore>> + Send + 'static,
    {
        Self {
            reopen: Some(Box::new(move || Box::pin(reopen()))),
            ..self
        }
    }

    /// The store, for handing to a check.
    pub fn store(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.store)
    }

    /// Drops the store (the caller must hold no other handle to it) and opens the
    /// same storage again.
    async fn reopen_store(&mut self) {
        let Some(reopen) = &self.reopen else {
            panic!("this fixture cannot reopen its store: build it with Fixture::with_reopen");
        };
        // Replace first, so the old store is closed before the new one opens.
        self.store = Arc::new(crate::memory::MemoryStore::new());
        self.store = reopen().await;
    }
}

/// A view store under test, the event store its projections read, and whatever
/// must live exactly as long as both.
pub struct ViewFixture {
    store: Arc<dyn EventStore>,
    views: Arc<dyn crate::view::ViewStore>,
    _guard: Box<dyn Any + Send + Sync>,
}

impl ViewFixture {
    /// A fixture around a fresh, empty event store and view store.
    pub fn new(store: Arc<dyn EventStore>, views: Arc<dyn crate::view::ViewStore>) -> Self {
        Self {
            store,
            views,
            _guard: Box::new(()),
        }
    }

    /// Keeps `guard` alive until after both stores are dropped.
    pub fn with_guard(self, guard: impl Any + Send + Sync) -> Self {
        Self {
            _guard: Box::new(guard),
            ..self
        }
    }

    /// The event store.
    pub fn store(&self) -> Arc<dyn EventStore> {
        Arc::clone(&self.store)
    }

    /// The view store.
    pub fn views(&self) -> Arc<dyn crate::view::ViewStore> {
        Arc::clone(&self.views)
    }
}

/// Runs the view store and projection suite against the stores a factory makes:
/// an expression callable as `factory()` returning a future of a [`ViewFixture`]
/// with fresh, empty stores. Expands to one test per check, named after it.
#[macro_export]
macro_rules! view_store_conformance {
    ($factory:expr $(,)?) => {
        $crate::view_store_conformance!(@checks $factory;
            views_documents_round_trip,
            views_filter_on_indexes,
            views_order_and_page_stably,
            views_full_text_search,
            views_refuse_bad_queries,
            views_registration_rules,
            views_refuse_a_commit_from_a_moved_checkpoint,
            views_switch_generations_atomically,
            views_park_retry_and_skip,
            views_record_operator_requests,
            views_apply_a_received_event_once,
            projection_catches_up_then_follows_live,
            projection_resumes_from_its_checkpoint,
            wait_for_resolves_for_a_fresh_write_and_times_out_otherwise,
            poison_event_is_parked_and_retried_after_a_fix,
            transient_failures_are_retried_without_parking,
            stalled_projection_reports_its_error_then_recovers,
            two_runners_of_one_projection_never_apply_an_event_twice,
            uninteresting_events_are_skipped_but_advance_the_checkpoint,
            paused_projection_applies_nothing_until_resumed,
            rebuild_during_writes_equals_a_clean_build,
            rebuild_after_a_fix_applies_parked_events_once,
            process_manager_effects_happen_once,
            process_manager_dispatches_to_different_aggregates_at_once,
            process_manager_keeps_each_aggregates_commands_in_order,
            process_manager_failing_dispatch_parks_its_own_event,
        );

        #[test]
        fn property_queries_match_the_memory_model() {
            $crate::testkit::check_views_against_model($factory, $crate::testkit::property_cases());
        }
    };
    (@checks $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let fixture: $crate::testkit::ViewFixture = ($factory)().await;
                $crate::testkit::$check(fixture).await;
            }
        )*
    };
}

/// How many random cases each property test runs: a quick 24 on a laptop, 128
/// under CI (`CI=true`), where time is cheaper than a missed bug.
pub fn property_cases() -> u32 {
    if std::env::var("CI").is_ok_and(|value| value == "true") {
        128
    } else {
        24
    }
}

/// Runs the whole conformance suite against the stores a factory makes.
///
/// `$factory` is an expression callable as `factory()` that returns a future of a
/// [`Fixture`] holding a fresh, empty store, for example
/// `|| async { Fixture::new(Arc::new(MemoryStore::new())) }`. It is called once per
/// test (and once per property case), so tests never share a store.
///
/// With `, reopenable` (for a fixture built with [`Fixture::with_reopen`]) it also
/// checks that acknowledged writes survive closing and reopening the store.
///
/// Expands to one test function per check, named after it, in the invoking module;
/// put the invocation in its own test file or module. The invoking crate needs
/// `tokio` (features `macros`, `rt-multi-thread`) as a dev-dependency.
#[macro_export]
macro_rules! event_store_conformance {
    ($factory:expr, reopenable $(,)?) => {
        $crate::event_store_conformance!($factory);

        #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn acknowledged_writes_survive_reopening() {
            let fixture: $crate::testkit::Fixture = ($factory)().await;
            $crate::testkit::acknowledged_writes_survive_reopening(fixture).await;
        }
    };
    ($factory:expr $(,)?) => {
        $crate::event_store_conformance!(@checks $factory;
            appends_get_dense_versions_and_increasing_positions,
            head_watch_changes_after_an_append,
            expected_version_is_enforced,
            conflict_reports_actual_version_and_writes_nothing,
            empty_append_is_refused_and_writes_nothing,
            event_with_empty_type_is_refused_and_writes_nothing,
            duplicate_event_id_is_refused_and_writes_nothing,
            idempotent_retry_returns_first_outcome_and_writes_nothing,
            idempotency_key_reused_for_another_stream_is_refused,
            read_stream_pages_forward_and_backward,
            missing_stream_is_not_found_and_at_version_zero,
            read_all_pages_cover_the_log_once_in_order,
            payload_and_metadata_round_trip_exactly,
            stream_id_of_max_length_works,
            snapshots_round_trip_and_are_replaced,
            concurrent_appends_to_one_stream_keep_versions_dense,
            concurrent_writers_and_subscribers_see_every_event_once,
            subscription_catches_up_then_follows_live,
            subscription_with_page_size_one_sees_everything,
            repository_records_command_metadata,
            repository_repeated_command_is_deduplicated,
            repository_concurrent_repeats_of_a_command_write_once,
            repository_concurrent_commands_all_apply,
            repository_expected_version_mismatch_is_a_conflict,
            repository_business_rejection_writes_nothing,
            repository_caches_never_serve_a_state_older_than_the_store,
            repository_loads_at_version,
            repository_loads_at_time,
            repository_writes_and_uses_snapshots,
            repository_ignores_snapshots_of_another_state_version,
            repository_upcasts_old_events_from_the_store,
            repository_reports_undecodable_events,
        );

        #[test]
        fn property_operations_match_the_memory_model() {
            $crate::testkit::check_against_model($factory, $crate::testkit::property_cases());
        }

        #[test]
        fn property_concurrent_batches_keep_the_invariants() {
            $crate::testkit::check_concurrent_batches($factory, $crate::testkit::property_cases());
        }
    };
    (@checks $factory:expr; $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                let fixture: $crate::testkit::Fixture = ($factory)().await;
                $crate::testkit::$check(fixture.store()).await;
                // Dropped only now, so the guard outlives everything the check did.
                drop(fixture);
            }
        )*
    };
}

/// Builds the runtime a property test drives its cases on: several workers, so the
/// concurrent batches really race.
fn property_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("the property tests need a tokio runtime")
}

/// A stream id the checks know to be valid.
fn stream(name: &str) -> StreamId {
    StreamId::new(name).unwrap_or_else(|error| panic!("test stream id `{name}`: {error}"))
}

/// A small event whose payload says which one it is, so mix-ups show in a diff.
fn numbered(n: u64) -> NewEvent {
    NewEvent::new("Numbered", json!({ "n": n }))
}

/// `count` numbered events, starting at `first`.
fn numbered_events(first: u64, count: u64) -> Vec<NewEvent> {
    (first..first + count).map(numbered).collect()
}

/// The whole global log, read a page at a time (a page size that does not divide
/// typical logs, so the last short page is exercised too).
async fn read_whole_log(store: &dyn EventStore) -> Vec<RecordedEvent> {
    let mut log = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store
            .read_all(after, 97)
            .await
            .unwrap_or_else(|error| panic!("read_all after {after} failed: {error}"));
        let Some(last) = page.last() else {
            return log;
        };
        // Without this a backend that returns the event at `after` again would make
        // the loop run forever instead of failing.
        assert!(
            page.iter().all(|event| event.position > after),
            "read_all after {after} returned an event at or before {after}"
        );
        after = last.position;
        log.extend(page);
    }
}

/// The whole of one stream, read a page at a time (empty when it does not exist).
async fn read_whole_stream(store: &dyn EventStore, stream: &StreamId) -> Vec<RecordedEvent> {
    let mut events: Vec<RecordedEvent> = Vec::new();
    loop {
        let from = events.last().map_or(1, |event| event.stream_version + 1);
        match store
            .read_stream(StreamRead::forward(stream.clone(), from, 97))
            .await
        {
            Ok(page) if page.is_empty() => return events,
            Ok(page) => {
                assert!(
                    page.iter().all(|event| event.stream_version >= from),
                    "read_stream of `{stream}` forward from {from} returned an earlier version"
                );
                events.extend(page);
            }
            Err(ReadError::StreamNotFound { .. }) if events.is_empty() => return events,
            Err(error) => panic!("reading stream `{stream}` from version {from} failed: {error}"),
        }
    }
}

/// Appends and returns the outcome, failing the check with the request's gist when
/// the store refuses.
async fn append_ok(store: &dyn EventStore, request: AppendRequest) -> AppendOutcome {
    let what = format!(
        "append of {} event(s) to `{}` expecting {}",
        request.events.len(),
        request.stream,
        request.expected
    );
    store
        .append(request)
        .await
        .unwrap_or_else(|error| panic!("{what} failed: {error}"))
}

/// Runs an append that must be refused, checks that it left no trace (log, head,
/// stream version, idempotency key) and returns the error for the caller to match.
async fn append_refused(store: &dyn EventStore, request: AppendRequest) -> AppendError {
    let log_before = read_whole_log(store).await;
    let head_before = head(store).await;
    let version_before = stream_version(store, &request.stream).await;
    let stream = request.stream.clone();
    let key = request.idempotency_key.clone();
    let key_was_unused = match &key {
        Some(key) => find_idempotent(store, key).await.is_none(),
        None => false,
    };
    let what = format!(
        "append of {} event(s) to `{}` expecting {}",
        request.events.len(),
        request.stream,
        request.expected
    );
    let error = match store.append(request).await {
        Ok(outcome) => panic!("{what} should have been refused, but it returned {outcome:?}"),
        Err(error) => error,
    };
    assert_eq!(
        read_whole_log(store).await,
        log_before,
        "{what} was refused ({error}) but the log changed: a refused append must write nothing"
    );
    assert_eq!(
        head(store).await,
        head_before,
        "{what} was refused ({error}) but the head moved"
    );
    assert_eq!(
        stream_version(store, &stream).await,
        version_before,
        "{what} was refused ({error}) but the stream's version changed"
    );
    if let Some(key) = key.filter(|_| key_was_unused) {
        assert_eq!(
            find_idempotent(store, &key).await,
            None,
            "{what} was refused ({error}) but its idempotency key `{key}` was recorded: \
             a retry with the key would then be wrongly deduplicated"
        );
    }
    error
}

/// The store's head, failing the check on error.
async fn head(store: &dyn EventStore) -> Position {
    store
        .head()
        .await
        .unwrap_or_else(|error| panic!("head() failed: {error}"))
}

/// A stream's version, failing the check on error.
async fn stream_version(store: &dyn EventStore, stream: &StreamId) -> u64 {
    store
        .stream_version(stream)
        .await
        .unwrap_or_else(|error| panic!("stream_version(`{stream}`) failed: {error}"))
}

/// The outcome recorded under an idempotency key, failing the check on error.
async fn find_idempotent(store: &dyn EventStore, key: &str) -> Option<AppendOutcome> {
    store
        .find_idempotent_append(key)
        .await
        .unwrap_or_else(|error| panic!("find_idempotent_append(`{key}`) failed: {error}"))
}

/// Asserts that stored events are exactly the new events given, in order, with the
/// fields the caller chose intact.
#[track_caller]
fn assert_recorded_as_given(given: &[NewEvent], recorded: &[RecordedEvent], what: &str) {
    assert_eq!(
        recorded.len(),
        given.len(),
        "{what}: {} event(s) given, {} recorded",
        given.len(),
        recorded.len()
    );
    for (new, stored) in given.iter().zip(recorded) {
        let as_given = (
            new.event_id,
            &new.event_type,
            new.schema_version,
            &new.payload,
            &new.metadata,
        );
        let as_stored = (
            stored.event_id,
            &stored.event_type,
            stored.schema_version,
            &stored.payload,
            &stored.metadata,
        );
        assert_eq!(
            as_stored, as_given,
            "{what}: an event was not stored exactly as given"
        );
    }
}

/// Waits for every task of a set, re-raising a task's panic so its message (the
/// violated rule) is what the test reports.
async fn join_all<T: 'static>(mut tasks: tokio::task::JoinSet<T>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(result) => results.push(result),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(error) => panic!("a task of the check was cancelled: {error}"),
        }
    }
    results
}
