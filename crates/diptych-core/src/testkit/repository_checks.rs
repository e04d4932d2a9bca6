//! The command path on top of the store: what a [`Repository`] needs from a backend
//! (idempotency, conflicts, snapshots, exact times and schema versions) checked
//! end to end with small aggregates defined here.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::task::JoinSet;
use uuid::Uuid;

use super::{append_ok, find_idempotent, join_all, read_whole_log, read_whole_stream};
use crate::aggregate::{Aggregate, SnapshotPolicy};
use crate::codec::Upcasters;
use crate::envelope::{Metadata, NewEvent, StreamId, Timestamp};
use crate::error::{AppendError, CommandError, DecodeError, LoadError};
use crate::repository::{CommandContext, Loaded, Repository, RepositoryConfig};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, Snapshot};

/// Running a command appends the decided events with the command, correlation and
/// causation ids and the free key/values in their metadata; without explicit
/// correlation and causation ids, both default to the command id.
pub async fn repository_records_command_metadata(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    let mut context = CommandContext::new(Uuid::now_v7());
    context.correlation_id = Some(Uuid::now_v7());
    context.causation_id = Some(Uuid::now_v7());
    context.extra = BTreeMap::from([("tenant".to_owned(), "ünïcode ✓".to_owned())]);
    let outcome = tallies
        .execute("meta", &5, &context)
        .await
        .expect("the command must succeed");
    assert!(!outcome.deduplicated);
    assert_eq!((outcome.version, outcome.events.len()), (1, 1));
    assert_eq!(
        outcome.position, outcome.events[0].position,
        "the outcome's position must be its last event's"
    );
    let expected = Metadata {
        command_id: Some(context.command_id),
        correlation_id: context.correlation_id,
        causation_id: context.causation_id,
        extra: context.extra.clone(),
    };
    assert_eq!(
        outcome.events[0].metadata, expected,
        "the command's ids must be carried into the event's metadata"
    );
    let stream = tallies.stream_of("meta").expect("valid id");
    assert_eq!(
        read_whole_stream(&*store, &stream).await,
        outcome.events,
        "the store must hold what the command reported"
    );

    let plain = CommandContext::new(Uuid::now_v7());
    let outcome = tallies
        .execute("meta", &6, &plain)
        .await
        .expect("the command must succeed");
    let ids = &outcome.events[0].metadata;
    assert_eq!(
        (ids.command_id, ids.correlation_id, ids.causation_id),
        (
            Some(plain.command_id),
            Some(plain.command_id),
            Some(plain.command_id)
        ),
        "correlation and causation must default to the command id"
    );
}

/// Repeating a command id returns the first outcome (same events and positions),
/// flagged as deduplicated, and writes nothing: even when the repeat carries
/// another command, when the stream has moved on, and when deciding it again would
/// now be rejected. The same id for another aggregate is refused.
pub async fn repository_repeated_command_is_deduplicated(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    let context = CommandContext::new(Uuid::now_v7());
    let first = tallies
        .execute("repeat", &(TALLY_LIMIT - 10), &context)
        .await
        .expect("the first run must succeed");
    assert!(!first.deduplicated);
    let log = read_whole_log(&*store).await;
    for (what, amount) in [
        ("the same command", TALLY_LIMIT - 10),
        ("another command", 3),
    ] {
        let again = tallies
            .execute("repeat", &amount, &context)
            .await
            .unwrap_or_else(|error| panic!("repeating a command id with {what} failed: {error}"));
        assert!(
            again.deduplicated,
            "repeating a command id with {what} must be deduplicated"
        );
        assert_eq!(
            (&again.events, again.position, again.version),
            (&first.events, first.position, first.version),
            "repeating a command id with {what} must return the first outcome"
        );
        assert_eq!(
            read_whole_log(&*store).await,
            log,
            "repeating a command id with {what} must write nothing"
        );
    }
    tallies
        .execute("repeat", &1, &CommandContext::default())
        .await
        .expect("another command must succeed");
    let again = tallies
        .execute("repeat", &(TALLY_LIMIT - 10), &context)
        .await
        .expect("a repeat after the stream moved on must succeed");
    assert_eq!(
        (again.deduplicated, &again.events),
        (true, &first.events),
        "a repeat must still return the first outcome after the stream moved on"
    );

    match tallies.execute("elsewhere", &1, &context).await {
        Err(CommandError::Append(AppendError::IdempotencyKeyReused {
            first_stream,
            stream,
            ..
        })) => {
            assert_eq!(
                (first_stream, stream),
                (
                    first.stream.clone(),
                    tallies.stream_of("elsewhere").expect("valid id")
                )
            );
        }
        other => panic!(
            "the same command id for another aggregate must fail with IdempotencyKeyReused, got {other:?}"
        ),
    }
}

/// The same command sent 8 times at once (a client retrying impatiently) writes
/// once: exactly one run is not deduplicated, and every run reports its events.
pub async fn repository_concurrent_repeats_of_a_command_write_once(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::with_config(
        Arc::clone(&store),
        RepositoryConfig::default().with_max_attempts(100),
    );
    tallies
        .execute("impatient", &1, &CommandContext::default())
        .await
        .expect("setup command");
    let context = CommandContext::new(Uuid::now_v7());
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let (tallies, context) = (tallies.clone(), context.clone());
        tasks.spawn(async move {
            tallies
                .execute("impatient", &7, &context)
                .await
                .unwrap_or_else(|error| panic!("a repeat of one command failed: {error}"))
        });
    }
    let outcomes = tokio::time::timeout(Duration::from_secs(60), join_all(tasks))
        .await
        .expect("8 repeats of one command did not finish within 60 s");
    let writers = outcomes
        .iter()
        .filter(|outcome| !outcome.deduplicated)
        .count();
    assert_eq!(
        writers, 1,
        "exactly one of 8 simultaneous repeats of a command must write"
    );
    for outcome in &outcomes {
        assert_eq!(
            outcome.events, outcomes[0].events,
            "every repeat of a command must report the same events"
        );
    }
    let loaded = tallies.load("impatient").await.expect("load");
    assert_eq!(
        (loaded.state.total, loaded.version),
        (8, 2),
        "a command repeated at once must apply once"
    );
}

/// 16 tasks run 5 commands each against one aggregate, each task through its
/// own repository (as separate processes would, so they race through the
/// store rather than taking turns); conflicts are retried, so every command
/// succeeds once and the final state is the sum of them all.
pub async fn repository_concurrent_commands_all_apply(store: Arc<dyn EventStore>) {
    const TASKS: u64 = 16;
    const COMMANDS_PER_TASK: u64 = 5;
    let repository = || {
        Repository::<Tally>::with_config(
            Arc::clone(&store),
            RepositoryConfig::default().with_max_attempts(10_000),
        )
    };
    let tallies = repository();
    let mut tasks = JoinSet::new();
    for task in 0..TASKS {
        let tallies = repository();
        tasks.spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..COMMANDS_PER_TASK {
                let outcome = tallies
                    .execute("hot", &(task + 1), &CommandContext::default())
                    .await
                    .unwrap_or_else(|error| panic!("a racing command failed: {error}"));
                assert!(!outcome.deduplicated, "a fresh command id was deduplicated");
                versions.push(outcome.version);
            }
            versions
        });
    }
    let running = join_all(tasks);
    let mut versions: Vec<u64> = tokio::time::timeout(Duration::from_secs(120), running)
        .await
        .expect("16 tasks running commands did not finish within 120 s")
        .into_iter()
        .flatten()
        .collect();
    versions.sort_unstable();
    let commands = TASKS * COMMANDS_PER_TASK;
    assert_eq!(
        versions,
        (1..=commands).collect::<Vec<_>>(),
        "each racing command must have written exactly one version"
    );
    let loaded = tallies.load("hot").await.expect("load");
    let sum = COMMANDS_PER_TASK * (1..=TASKS).sum::<u64>();
    assert_eq!(
        (loaded.state.total, loaded.state.additions, loaded.version),
        (sum, commands, commands),
        "the final state must include every command once"
    );
}

/// A command expecting a version the aggregate is not at fails with a conflict
/// naming both versions, writes nothing, and is not retried; at the right version
/// it succeeds.
pub async fn repository_expected_version_mismatch_is_a_conflict(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    for amount in [1, 2] {
        tallies
            .execute("guarded", &amount, &CommandContext::default())
            .await
            .expect("setup command");
    }
    let log = read_whole_log(&*store).await;
    let stale = CommandContext::default().expecting_version(1);
    match tallies.execute("guarded", &3, &stale).await {
        Err(CommandError::Append(AppendError::Conflict {
            expected,
            actual,
            stream,
        })) => assert_eq!(
            (expected, actual, stream),
            (
                ExpectedVersion::Exact(1),
                2,
                tallies.stream_of("guarded").expect("valid id")
            ),
            "the conflict must name the expected and the actual version"
        ),
        other => panic!(
            "a command expecting version 1 of a stream at 2 must fail with a conflict, got {other:?}"
        ),
    }
    assert_eq!(
        read_whole_log(&*store).await,
        log,
        "a conflicting command must write nothing"
    );
    assert_eq!(
        find_idempotent(&*store, &stale.command_id.to_string()).await,
        None,
        "a conflicting command must not record its id"
    );
    let current = CommandContext::default().expecting_version(2);
    let outcome = tallies
        .execute("guarded", &3, &current)
        .await
        .expect("a command at the right version must succeed");
    assert_eq!(outcome.version, 3);
}

/// A command the aggregate rejects comes back as `Rejected` with the aggregate's
/// error and writes nothing (and does not use up its command id).
pub async fn repository_business_rejection_writes_nothing(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    match tallies
        .execute("picky", &0, &CommandContext::default())
        .await
    {
        Err(CommandError::Rejected(TallyError::ZeroAmount)) => {}
        other => panic!("adding zero must be rejected with ZeroAmount, got {other:?}"),
    }
    assert_eq!(
        read_whole_log(&*store).await,
        Vec::new(),
        "a rejected command must write nothing"
    );
    tallies
        .execute("picky", &(TALLY_LIMIT - 1), &CommandContext::default())
        .await
        .expect("a valid command");
    let log = read_whole_log(&*store).await;
    let rejected = CommandContext::default();
    match tallies.execute("picky", &2, &rejected).await {
        Err(CommandError::Rejected(TallyError::OverLimit)) => {}
        other => panic!("going over the limit must be rejected with OverLimit, got {other:?}"),
    }
    assert_eq!(
        read_whole_log(&*store).await,
        log,
        "a rejected command must write nothing"
    );
    assert_eq!(
        find_idempotent(&*store, &rejected.command_id.to_string()).await,
        None,
        "a rejected command must not record its id"
    );
}

/// Two repositories (two processes, or two `Repository` values on one store,
/// each with its own aggregate cache) command one aggregate alternately, and
/// each sees the other's events: a cached state is never decided from at a
/// version the store has moved past. Covered: a command whose cached state is
/// behind (its append conflicts, it catches up and succeeds), a rejection and
/// an empty decision made from a stale state (both checked against the store
/// and decided again), and `If-Match` against a stale state.
pub async fn repository_caches_never_serve_a_state_older_than_the_store(
    store: Arc<dyn EventStore>,
) {
    repository_caches_follow_writers_of_another_store(Arc::clone(&store), store).await;
}

/// [`repository_caches_never_serve_a_state_older_than_the_store`] with each
/// repository on its own store value over the same storage (two processes on
/// one PostgreSQL database, say: each has its own connections and head watch).
pub async fn repository_caches_follow_writers_of_another_store(
    store: Arc<dyn EventStore>,
    other: Arc<dyn EventStore>,
) {
    let first = Repository::<Door>::new(Arc::clone(&store));
    let second = Repository::<Door>::new(other);
    let run = |repository: &Repository<Door>, command: DoorCommand| {
        let repository = repository.clone();
        async move {
            repository
                .execute("front", &command, &CommandContext::default())
                .await
        }
    };
    let version = |outcome: Result<_, CommandError<DoorError>>| match outcome {
        Ok(crate::repository::CommandOutcome { version, .. }) => version,
        Err(error) => panic!("the command must succeed, got {error:?}"),
    };

    assert_eq!(version(run(&first, DoorCommand::Open).await), 1);
    assert_eq!(version(run(&second, DoorCommand::Enter).await), 2);
    // `first` holds the door at version 1: its append conflicts, it reads
    // version 2 and closes the door at 3.
    assert_eq!(version(run(&first, DoorCommand::Close).await), 3);
    // `second` holds the open door of version 2, which would let it in: the
    // append conflicts, and the closed door refuses.
    match run(&second, DoorCommand::Enter).await {
        Err(CommandError::Rejected(DoorError::Closed)) => {}
        other => panic!("entering a closed door must be rejected, got {other:?}"),
    }
    assert_eq!(version(run(&first, DoorCommand::Open).await), 4);
    // `second` holds the closed door of version 3: the rejection it would give
    // is checked against the store, which has the door open again.
    assert_eq!(version(run(&second, DoorCommand::Enter).await), 5);
    // `first` holds the open door of version 4: opening it decides nothing, and
    // the answer must carry the store's version, 5.
    let nothing = run(&first, DoorCommand::Open)
        .await
        .expect("opening an open door decides nothing");
    assert_eq!((nothing.events.len(), nothing.version), (0, 5));
    assert_eq!(version(run(&second, DoorCommand::Close).await), 6);
    // `first` holds the open door of version 5, where opening decides nothing;
    // the store has it closed at 6, so opening writes version 7.
    assert_eq!(version(run(&first, DoorCommand::Open).await), 7);
    assert_eq!(version(run(&second, DoorCommand::Enter).await), 8);
    // `If-Match: 8` against `first`'s cached version 7 is checked against the
    // store, not refused.
    let matched = first
        .execute(
            "front",
            &DoorCommand::Enter,
            &CommandContext::default().expecting_version(8),
        )
        .await
        .expect("the store is at version 8, so If-Match 8 holds");
    assert_eq!(matched.version, 9);

    for round in 0..40u64 {
        let repository = if round % 2 == 0 { &second } else { &first };
        assert_eq!(
            version(run(repository, DoorCommand::Enter).await),
            10 + round,
            "round {round}: each command must see every earlier one"
        );
    }
    for repository in [&first, &second] {
        let loaded = repository.load("front").await.expect("load");
        assert_eq!(
            (loaded.state.open, loaded.state.entries, loaded.version),
            (true, 44, 49),
            "both repositories must agree with the log"
        );
        let stats = repository.stats();
        assert!(
            stats.cache_hits > 0 && stats.stale_cache_entries + stats.conflicts_retried > 0,
            "the check must exercise cached states that fell behind: {stats:?}"
        );
    }
    let log = read_whole_log(&*store).await;
    assert_eq!(log.len(), 49, "nothing may be written twice");
}

/// Loading at version `n` gives the state after exactly the first `n` events (a
/// replay of what the store returns), even where a later snapshot exists; past the
/// end it gives the current state.
pub async fn repository_loads_at_version(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    let amounts = [1, 2, 3, 4, 5];
    for amount in amounts {
        tallies
            .execute("history", &amount, &CommandContext::default())
            .await
            .expect("setup command");
    }
    let stored = read_whole_stream(&*store, &tallies.stream_of("history").expect("valid id")).await;
    for version in 0..=amounts.len() as u64 {
        let mut replayed = Tally::default();
        for recorded in &stored[..version as usize] {
            replayed.evolve(&tallies.codec().decode(recorded).expect("decodable event"));
        }
        let loaded = tallies
            .load_at_version("history", version)
            .await
            .expect("load_at_version");
        assert_eq!(
            (loaded.state, loaded.version),
            (replayed, version),
            "load_at_version({version}) must equal a replay of the first {version} events"
        );
    }
    let beyond = tallies
        .load_at_version("history", 99)
        .await
        .expect("load_at_version");
    assert_eq!(
        (beyond.state.total, beyond.version),
        (15, 5),
        "load_at_version past the end must give the current state"
    );
}

/// Loading at a time gives the state after the events recorded at or before it:
/// nothing before the first, the first two at the second's exact time and between
/// the second and the third, everything after the last.
pub async fn repository_loads_at_time(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    let mut times = Vec::new();
    for amount in [1, 2, 3, 4] {
        let outcome = tallies
            .execute("clock", &amount, &CommandContext::default())
            .await
            .expect("setup command");
        times.push(outcome.events[0].recorded_at);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for pair in times.windows(2) {
        assert!(
            pair[0] < pair[1],
            "appends 5 ms apart were recorded at {} and {}: the store must keep time to the microsecond",
            pair[0],
            pair[1]
        );
    }
    let micros = |time: Timestamp| time.as_unix_micros();
    let cases = [
        (
            "before the first event",
            Timestamp::from_unix_micros(micros(times[0]) - 1),
            0,
            0,
        ),
        ("at the first event", times[0], 1, 1),
        ("at the second event", times[1], 3, 2),
        (
            "between the second and third",
            Timestamp::from_unix_micros((micros(times[1]) + micros(times[2])) / 2),
            3,
            2,
        ),
        (
            "just before the third",
            Timestamp::from_unix_micros(micros(times[2]) - 1),
            3,
            2,
        ),
        (
            "after the last event",
            Timestamp::from_unix_micros(micros(times[3]) + 1_000_000),
            10,
            4,
        ),
    ];
    for (what, at, total, version) in cases {
        let loaded: Loaded<Tally> = tallies
            .load_at_time("clock", at)
            .await
            .expect("load_at_time");
        assert_eq!(
            (loaded.state.total, loaded.version),
            (total, version),
            "load_at_time {what} ({at}) saw the wrong events"
        );
        let last = (version > 0).then(|| times[version as usize - 1]);
        assert_eq!(
            loaded.last_recorded_at, last,
            "load_at_time {what} must report the time of the last event applied"
        );
    }
}

/// With `SnapshotPolicy::Every(2)` the repository saves snapshots through the
/// store, and loads read them back: a snapshot planted at the head is taken as the
/// state, and one planted behind it has the later events replayed on top.
pub async fn repository_writes_and_uses_snapshots(store: Arc<dyn EventStore>) {
    let tallies = Repository::<Tally>::new(Arc::clone(&store));
    for amount in [1, 2, 3, 4] {
        tallies
            .execute("snap", &amount, &CommandContext::default())
            .await
            .expect("setup command");
    }
    let stream = tallies.stream_of("snap").expect("valid id");
    let saved = store
        .load_snapshot(&stream)
        .await
        .expect("load_snapshot")
        .expect("a snapshot must have been saved at version 2 or 4");
    assert_eq!(
        (saved.version, saved.state_version),
        (4, Tally::STATE_VERSION),
        "the latest snapshot must be at version 4"
    );
    assert_eq!(saved.state, json!({"total": 10, "additions": 4}));

    // A state no replay could produce proves the load read the snapshot.
    plant_snapshot(&*store, &stream, 4, json!({"total": 500, "additions": 1})).await;
    let loaded = tallies.load("snap").await.expect("load");
    assert_eq!(
        (loaded.state.total, loaded.version),
        (500, 4),
        "a load must start from the stored snapshot"
    );
    // A snapshot behind the stream's head: written straight to the store, so no
    // newer snapshot exists for this stream.
    let behind = StreamId::new("tally-behind").expect("valid id");
    let events = [1, 2, 3, 4]
        .map(|amount| {
            tallies
                .codec()
                .encode(&TallyEvent::Added { amount })
                .expect("encode")
        })
        .to_vec();
    store
        .append(AppendRequest::new(
            behind.clone(),
            ExpectedVersion::NoStream,
            events,
        ))
        .await
        .expect("setup append");
    plant_snapshot(&*store, &behind, 2, json!({"total": 1000, "additions": 2})).await;
    let loaded = tallies.load("behind").await.expect("load");
    assert_eq!(
        (loaded.state.total, loaded.version),
        (1007, 4),
        "a load must replay the events after the snapshot"
    );
    let early = tallies
        .load_at_version("behind", 1)
        .await
        .expect("load_at_version");
    assert_eq!(
        early.state.total, 1,
        "a load before the snapshot's version must not use it"
    );
}

/// An aggregate whose state shape changed (same kind, `STATE_VERSION` bumped)
/// ignores snapshots of the old shape, even ones its deserializer would accept, and
/// rebuilds from the events; the old shape in turn ignores the new snapshots.
pub async fn repository_ignores_snapshots_of_another_state_version(store: Arc<dyn EventStore>) {
    let old = Repository::<Tally>::new(Arc::clone(&store));
    for amount in [1, 2, 3, 4] {
        old.execute("reshaped", &amount, &CommandContext::default())
            .await
            .expect("setup command");
    }
    let stream = old.stream_of("reshaped").expect("valid id");
    let snapshot = store
        .load_snapshot(&stream)
        .await
        .expect("load_snapshot")
        .expect("the old shape saved a snapshot");
    assert_eq!(snapshot.state_version, 1);

    let new = Repository::<TallyInCents>::new(Arc::clone(&store));
    let loaded = new.load("reshaped").await.expect("load");
    assert_eq!(
        (
            loaded.state.total_cents,
            loaded.state.additions,
            loaded.state.largest,
            loaded.version
        ),
        (1000, 4, 4, 4),
        "a bumped STATE_VERSION must ignore the old snapshot and rebuild from events"
    );
    for amount in [5, 6] {
        new.execute("reshaped", &amount, &CommandContext::default())
            .await
            .expect("command under the new shape");
    }
    let snapshot = store
        .load_snapshot(&stream)
        .await
        .expect("load_snapshot")
        .expect("the new shape saved a snapshot");
    assert_eq!(
        (snapshot.version, snapshot.state_version),
        (6, TallyInCents::STATE_VERSION),
        "the store must keep the snapshot's state version"
    );
    let loaded = old.load("reshaped").await.expect("load");
    assert_eq!(
        (loaded.state.total, loaded.state.additions),
        (21, 6),
        "the old shape must ignore the new shape's snapshot"
    );
}

/// Events stored under an old name and schema come back from the store unchanged
/// and are upcast on load: renamed, reshaped, and mixed with events written today
/// at the current schema version.
pub async fn repository_upcasts_old_events_from_the_store(store: Arc<dyn EventStore>) {
    let stream = StreamId::for_aggregate(Ledger::KIND, "old").expect("valid id");
    let old_events = vec![
        NewEvent::new("Deposited", json!({"euros": 3})),
        NewEvent::new("Credited", json!({"amount_eur": 2})),
    ];
    append_ok(
        &*store,
        AppendRequest::new(
            stream.clone(),
            ExpectedVersion::NoStream,
            old_events.clone(),
        ),
    )
    .await;
    let ledgers = Repository::<Ledger>::new(Arc::clone(&store));
    let outcome = ledgers
        .execute("old", &50, &CommandContext::default())
        .await
        .expect("a command on upcast history");
    assert_eq!(outcome.version, 3);
    let loaded = ledgers.load("old").await.expect("load of upcast history");
    assert_eq!(
        (loaded.state.balance_cents, loaded.state.entries),
        (550, 3),
        "old events must be upcast on load"
    );

    let stored = read_whole_stream(&*store, &stream).await;
    super::assert_recorded_as_given(
        &old_events,
        &stored[..2],
        "old events (storage is never rewritten)",
    );
    assert_eq!(
        (
            stored[2].event_type.as_str(),
            stored[2].schema_version,
            &stored[2].payload
        ),
        ("Credited", 2, &json!({"cents": 50})),
        "new events must be stored at the current schema version"
    );
}

/// A stored event the aggregate cannot read fails the load with the decode error
/// that says why: an unknown type, a payload that does not fit, a schema version
/// from newer code.
pub async fn repository_reports_undecodable_events(store: Arc<dyn EventStore>) {
    let ledgers = Repository::<Ledger>::new(Arc::clone(&store));
    let cases = [
        ("unknown", NewEvent::new("Vanished", json!({}))),
        (
            "garbled",
            NewEvent::new("Credited", json!({"cents": "lots"})).with_schema_version(2),
        ),
        (
            "future",
            NewEvent::new("Credited", json!({"cents": 1})).with_schema_version(9),
        ),
    ];
    for (id, event) in cases {
        let stream = StreamId::for_aggregate(Ledger::KIND, id).expect("valid id");
        append_ok(
            &*store,
            AppendRequest::new(stream.clone(), ExpectedVersion::Any, vec![event]),
        )
        .await;
        let error = match ledgers.load(id).await {
            Ok(loaded) => panic!(
                "loading `{stream}` must fail to decode, but gave {:?}",
                loaded.state
            ),
            Err(LoadError::Decode(error)) => error,
            Err(other) => panic!("loading `{stream}` must fail with a decode error, got {other:?}"),
        };
        let as_expected = match (id, &error) {
            (
                "unknown",
                DecodeError::UnknownEventType {
                    event_type,
                    stream: at,
                    version: 1,
                },
            ) => event_type == "Vanished" && *at == stream,
            (
                "garbled",
                DecodeError::InvalidPayload {
                    event_type,
                    stream: at,
                    version: 1,
                    ..
                },
            ) => event_type == "Credited" && *at == stream,
            (
                "future",
                DecodeError::FutureSchemaVersion {
                    found: 9,
                    current: 2,
                    stream: at,
                    ..
                },
            ) => *at == stream,
            _ => false,
        };
        assert!(
            as_expected,
            "loading the `{id}` event gave the wrong decode error: {error:?}"
        );
    }
}

/// Saves a snapshot of the given state for a [`Tally`] stream.
async fn plant_snapshot(
    store: &dyn EventStore,
    stream: &StreamId,
    version: u64,
    state: serde_json::Value,
) {
    let snapshot = Snapshot {
        stream: stream.clone(),
        version,
        state_version: Tally::STATE_VERSION,
        state,
        taken_at: Timestamp::now(),
    };
    store.save_snapshot(snapshot).await.expect("save_snapshot");
}

/// The most a [`Tally`] may hold, so a command can be rejected for going over.
/// A door: opened, closed, entered only while open. Unlike a [`Tally`], a
/// command refused in one state is accepted in a later one, and some commands
/// decide nothing (opening an open door), so a stale state shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Door {
    open: bool,
    entries: u64,
}

/// What a [`Door`] is asked.
#[derive(Clone, Copy, Debug)]
enum DoorCommand {
    Open,
    Close,
    Enter,
}

/// What happens to a [`Door`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum DoorEvent {
    Opened,
    Closed,
    Entered,
}

/// Why a [`Door`] refuses.
#[derive(Debug, PartialEq, thiserror::Error)]
enum DoorError {
    #[error("the door is closed")]
    Closed,
}

impl Aggregate for Door {
    const KIND: &'static str = "door";
    type Command = DoorCommand;
    type Event = DoorEvent;
    type Error = DoorError;

    fn decide(&self, command: &DoorCommand) -> Result<Vec<DoorEvent>, DoorError> {
        Ok(match (command, self.open) {
            (DoorCommand::Open, true) | (DoorCommand::Close, false) => Vec::new(),
            (DoorCommand::Open, false) => vec![DoorEvent::Opened],
            (DoorCommand::Close, true) => vec![DoorEvent::Closed],
            (DoorCommand::Enter, true) => vec![DoorEvent::Entered],
            (DoorCommand::Enter, false) => return Err(DoorError::Closed),
        })
    }

    fn evolve(&mut self, event: &DoorEvent) {
        match event {
            DoorEvent::Opened => self.open = true,
            DoorEvent::Closed => self.open = false,
            DoorEvent::Entered => self.entries += 1,
        }
    }
}

const TALLY_LIMIT: u64 = 1_000_000;

/// A running total: the smallest aggregate with a business rule, and snapshots
/// every two events so the snapshot paths run too.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Tally {
    total: u64,
    additions: u64,
}

/// What happens to a [`Tally`] (and to a [`TallyInCents`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum TallyEvent {
    Added { amount: u64 },
}

/// Why a [`Tally`] refuses an amount.
#[derive(Debug, PartialEq, thiserror::Error)]
enum TallyError {
    #[error("an amount must be positive")]
    ZeroAmount,
    #[error("the total would exceed {TALLY_LIMIT}")]
    OverLimit,
}

impl Aggregate for Tally {
    const KIND: &'static str = "tally";
    type Command = u64;
    type Event = TallyEvent;
    type Error = TallyError;

    fn decide(&self, amount: &u64) -> Result<Vec<TallyEvent>, TallyError> {
        if *amount == 0 {
            return Err(TallyError::ZeroAmount);
        }
        if self.total + amount > TALLY_LIMIT {
            return Err(TallyError::OverLimit);
        }
        Ok(vec![TallyEvent::Added { amount: *amount }])
    }

    fn evolve(&mut self, event: &TallyEvent) {
        let TallyEvent::Added { amount } = event;
        self.total += amount;
        self.additions += 1;
    }

    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::Every(2)
    }
}

/// A [`Tally`] whose state changed shape: the total is now in cents and the largest
/// amount is kept. Every field has a default, so an old snapshot would deserialize
/// into it and be silently wrong; only the bumped `STATE_VERSION` keeps it out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct TallyInCents {
    #[serde(alias = "total")]
    total_cents: u64,
    additions: u64,
    largest: u64,
}

impl Aggregate for TallyInCents {
    const KIND: &'static str = Tally::KIND;
    const STATE_VERSION: u32 = 2;
    type Command = u64;
    type Event = TallyEvent;
    type Error = Infallible;

    fn decide(&self, amount: &u64) -> Result<Vec<TallyEvent>, Infallible> {
        Ok(vec![TallyEvent::Added { amount: *amount }])
    }

    fn evolve(&mut self, event: &TallyEvent) {
        let TallyEvent::Added { amount } = event;
        self.total_cents += amount * 100;
        self.additions += 1;
        self.largest = self.largest.max(*amount);
    }

    fn snapshot_policy() -> SnapshotPolicy {
        SnapshotPolicy::Every(2)
    }
}

/// An account whose event history went through two schema changes: `Deposited {
/// euros }` was renamed `Credited { amount_eur }`, which then became `Credited {
/// cents }` at schema version 2.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Ledger {
    balance_cents: u64,
    entries: u64,
}

/// What happens to a [`Ledger`] today.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum LedgerEvent {
    Credited { cents: u64 },
}

impl Aggregate for Ledger {
    const KIND: &'static str = "ledger";
    type Command = u64;
    type Event = LedgerEvent;
    type Error = Infallible;

    fn decide(&self, cents: &u64) -> Result<Vec<LedgerEvent>, Infallible> {
        Ok(vec![LedgerEvent::Credited { cents: *cents }])
    }

    fn evolve(&mut self, event: &LedgerEvent) {
        let LedgerEvent::Credited { cents } = event;
        self.balance_cents += cents;
        self.entries += 1;
    }

    fn upcasters() -> Upcasters {
        Upcasters::new()
            .add_renaming("Deposited", 1, "Credited", 1, |old| {
                let euros = old["euros"].as_u64().ok_or("`euros` missing")?;
                Ok(json!({ "amount_eur": euros }))
            })
            .add("Credited", 1, |v1| {
                let euros = v1["amount_eur"].as_u64().ok_or("`amount_eur` missing")?;
                Ok(json!({ "cents": euros * 100 }))
            })
    }
}
