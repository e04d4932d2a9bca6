//! The sequential contract: one caller at a time, every rule the trait documents and
//! every paging edge a backend's query can get wrong.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use super::{
    append_ok, append_refused, assert_recorded_as_given, find_idempotent, head, numbered,
    numbered_events, read_whole_log, read_whole_stream, stream, stream_version,
};
use crate::envelope::{Metadata, NewEvent, Position, RecordedEvent, StreamId, Timestamp};
use crate::error::{AppendError, InvalidEvent, ReadError};
use crate::store::{
    AppendOutcome, AppendRequest, EventStore, ExpectedVersion, Snapshot, StreamRead,
};

/// Sequential appends to two interleaved streams get versions 1, 2, 3… per stream
/// and strictly increasing positions across them; `head` and `stream_version`
/// follow every append, and the stored events are the ones given.
pub async fn appends_get_dense_versions_and_increasing_positions(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_eq!(
        head(store).await,
        Position::START,
        "an empty store's head must be 0"
    );
    let streams = [stream("dense-a"), stream("dense-b")];
    let mut versions = [0_u64; 2];
    let mut last_position = Position::START;
    for (round, (which, count)) in [(0, 1), (1, 2), (0, 3), (1, 1), (0, 2)]
        .into_iter()
        .enumerate()
    {
        let events = numbered_events(round as u64 * 10, count);
        let request =
            AppendRequest::new(streams[which].clone(), ExpectedVersion::Any, events.clone());
        let outcome = append_ok(store, request).await;
        assert!(
            !outcome.deduplicated,
            "an append without a key must never be deduplicated"
        );
        assert_recorded_as_given(&events, &outcome.events, "append outcome");
        for event in &outcome.events {
            versions[which] += 1;
            assert_eq!(
                event.stream_id, streams[which],
                "an event was recorded in the wrong stream"
            );
            assert_eq!(
                event.stream_version, versions[which],
                "versions in `{}` must be 1, 2, 3… with no gap",
                streams[which]
            );
            assert!(
                event.position > last_position,
                "positions must strictly increase: got {} after {}",
                event.position,
                last_position
            );
            last_position = event.position;
        }
        assert_eq!(
            head(store).await,
            outcome.last_position(),
            "head must move to the position of the last appended event"
        );
        assert_eq!(
            stream_version(store, &streams[which]).await,
            versions[which]
        );
    }
    let log = read_whole_log(store).await;
    assert_eq!(log.len(), 9, "the log must hold every appended event");
    for (which, stream) in streams.iter().enumerate() {
        let stored: Vec<u64> = read_whole_stream(store, stream)
            .await
            .iter()
            .map(|event| event.stream_version)
            .collect();
        let dense: Vec<u64> = (1..=versions[which]).collect();
        assert_eq!(
            stored, dense,
            "stream `{stream}` must read back as versions 1..={}",
            versions[which]
        );
    }
}

/// The head watch changes after every append and ends up at the appended position,
/// so subscribers wake without polling.
pub async fn head_watch_changes_after_an_append(store: Arc<dyn EventStore>) {
    let mut watch = store.head_watch();
    assert_eq!(
        *watch.borrow_and_update(),
        Position::START,
        "an empty store's head watch must start at 0"
    );
    for round in 0..3 {
        watch.borrow_and_update();
        let request = AppendRequest::new(
            stream("watched"),
            ExpectedVersion::Any,
            numbered_events(round, 2),
        );
        let outcome = append_ok(&*store, request).await;
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("the head watch did not change within 5 s of an append")
            .expect("the head watch was closed while the store is alive");
        let target = outcome.last_position();
        tokio::time::timeout(
            Duration::from_secs(5),
            watch.wait_for(|head| *head >= target),
        )
        .await
        .expect("the head watch did not reach the appended position within 5 s")
        .expect("the head watch was closed while the store is alive");
        assert_eq!(
            *watch.borrow(),
            target,
            "the head watch went past the last append"
        );
    }
}

/// `Any` always appends; `NoStream` and `Exact(0)` append only to a stream that does
/// not exist; `Exact(n)` appends only at version `n`. Every refusal is a conflict
/// reporting the actual version.
pub async fn expected_version_is_enforced(store: Arc<dyn EventStore>) {
    let store = &*store;
    let fresh = stream("expect-no-stream");
    let outcome = append_ok(
        store,
        AppendRequest::new(fresh.clone(), ExpectedVersion::NoStream, vec![numbered(1)]),
    )
    .await;
    assert_eq!(
        outcome.last_version(),
        1,
        "NoStream on a new stream must append at version 1"
    );
    assert_conflict(
        store,
        AppendRequest::new(fresh.clone(), ExpectedVersion::NoStream, vec![numbered(2)]),
        1,
    )
    .await;

    let exact = stream("expect-exact");
    let outcome = append_ok(
        store,
        AppendRequest::new(exact.clone(), ExpectedVersion::Exact(0), vec![numbered(3)]),
    )
    .await;
    assert_eq!(
        outcome.last_version(),
        1,
        "Exact(0) on a new stream must append at version 1"
    );
    let outcome = append_ok(
        store,
        AppendRequest::new(
            exact.clone(),
            ExpectedVersion::Exact(1),
            numbered_events(4, 2),
        ),
    )
    .await;
    assert_eq!(
        outcome.last_version(),
        3,
        "Exact(1) on a stream at version 1 must append"
    );
    assert_conflict(
        store,
        AppendRequest::new(exact.clone(), ExpectedVersion::Exact(1), vec![numbered(6)]),
        3,
    )
    .await;
    assert_conflict(
        store,
        AppendRequest::new(exact.clone(), ExpectedVersion::Exact(0), vec![numbered(7)]),
        3,
    )
    .await;
    assert_conflict(
        store,
        AppendRequest::new(exact.clone(), ExpectedVersion::Exact(9), vec![numbered(8)]),
        3,
    )
    .await;

    let missing = stream("expect-missing");
    assert_conflict(
        store,
        AppendRequest::new(
            missing.clone(),
            ExpectedVersion::Exact(1),
            vec![numbered(9)],
        ),
        0,
    )
    .await;

    let any = append_ok(
        store,
        AppendRequest::new(exact.clone(), ExpectedVersion::Any, vec![numbered(10)]),
    )
    .await;
    assert_eq!(
        any.last_version(),
        4,
        "Any must append at the end of an existing stream"
    );
    let any = append_ok(
        store,
        AppendRequest::new(missing.clone(), ExpectedVersion::Any, vec![numbered(11)]),
    )
    .await;
    assert_eq!(any.last_version(), 1, "Any must create a missing stream");
}

/// A conflicting append of several events, with an idempotency key, writes none of
/// them and does not use up the key: the same events (same ids) and key then
/// append normally at the right version.
pub async fn conflict_reports_actual_version_and_writes_nothing(store: Arc<dyn EventStore>) {
    let store = &*store;
    let stream = stream("conflicted");
    append_ok(
        store,
        AppendRequest::new(stream.clone(), ExpectedVersion::Any, numbered_events(1, 2)),
    )
    .await;
    let events = numbered_events(10, 3);
    let stale = AppendRequest::new(stream.clone(), ExpectedVersion::Exact(1), events.clone())
        .with_idempotency_key("conflicted-once");
    assert_conflict(store, stale, 2).await;
    let retry = AppendRequest::new(stream.clone(), ExpectedVersion::Exact(2), events.clone())
        .with_idempotency_key("conflicted-once");
    let outcome = append_ok(store, retry).await;
    assert!(
        !outcome.deduplicated,
        "a key whose first use conflicted must not deduplicate its retry"
    );
    assert_recorded_as_given(&events, &outcome.events, "retry after a conflict");
    assert_eq!(outcome.last_version(), 5);
}

/// An append with no events is refused with `NoEvents`, on a new stream (which must
/// not come into existence) and on an existing one.
pub async fn empty_append_is_refused_and_writes_nothing(store: Arc<dyn EventStore>) {
    let store = &*store;
    let fresh = stream("empty-new");
    let error = append_refused(
        store,
        AppendRequest::new(fresh.clone(), ExpectedVersion::Any, Vec::new()),
    )
    .await;
    assert!(
        matches!(&error, AppendError::NoEvents { stream } if *stream == fresh),
        "an empty append must fail with NoEvents naming the stream, got {error:?}"
    );
    assert_not_found(store, &fresh).await;

    let existing = stream("empty-existing");
    append_ok(
        store,
        AppendRequest::new(existing.clone(), ExpectedVersion::Any, vec![numbered(1)]),
    )
    .await;
    let request = AppendRequest::new(existing.clone(), ExpectedVersion::Exact(1), Vec::new())
        .with_idempotency_key("empty");
    let error = append_refused(store, request).await;
    assert!(
        matches!(&error, AppendError::NoEvents { stream } if *stream == existing),
        "an empty append must fail with NoEvents naming the stream, got {error:?}"
    );
}

/// An event without a type name is refused with `InvalidEvent`, and the valid
/// events around it in the same append are not written either (atomicity).
pub async fn event_with_empty_type_is_refused_and_writes_nothing(store: Arc<dyn EventStore>) {
    let store = &*store;
    let events = vec![numbered(1), NewEvent::new("", json!({"n": 2})), numbered(3)];
    let request = AppendRequest::new(stream("untyped"), ExpectedVersion::Any, events.clone());
    let error = append_refused(store, request).await;
    assert!(
        matches!(
            error,
            AppendError::InvalidEvent(InvalidEvent::EmptyEventType)
        ),
        "an event with an empty type must fail with InvalidEvent(EmptyEventType), got {error:?}"
    );
    assert_not_found(store, &stream("untyped")).await;
    // Nothing of the refused append was kept, so its valid events' ids are still free.
    let valid = vec![events[0].clone(), events[2].clone()];
    let outcome = append_ok(
        store,
        AppendRequest::new(stream("untyped"), ExpectedVersion::NoStream, valid.clone()),
    )
    .await;
    assert_recorded_as_given(&valid, &outcome.events, "append after a refused one");
}

/// Event ids are unique across the whole store: an id already stored (in this or
/// another stream), or given twice in one append, is refused with
/// `DuplicateEventId` naming it, and the append writes nothing.
pub async fn duplicate_event_id_is_refused_and_writes_nothing(store: Arc<dyn EventStore>) {
    let store = &*store;
    let stored = numbered(1);
    append_ok(
        store,
        AppendRequest::new(stream("ids-a"), ExpectedVersion::Any, vec![stored.clone()]),
    )
    .await;

    let fresh = numbered(2);
    let again = numbered(3).with_event_id(stored.event_id);
    for target in [stream("ids-a"), stream("ids-b")] {
        let request = AppendRequest::new(
            target.clone(),
            ExpectedVersion::Any,
            vec![fresh.clone(), again.clone()],
        );
        let error = append_refused(store, request).await;
        assert!(
            matches!(error, AppendError::DuplicateEventId { event_id } if event_id == stored.event_id),
            "re-using a stored event id in `{target}` must fail with DuplicateEventId naming it, got {error:?}"
        );
    }

    let twin = numbered(4);
    let twin_again = numbered(5).with_event_id(twin.event_id);
    let request = AppendRequest::new(
        stream("ids-c"),
        ExpectedVersion::NoStream,
        vec![twin.clone(), twin_again],
    )
    .with_idempotency_key("twins");
    let error = append_refused(store, request).await;
    assert!(
        matches!(error, AppendError::DuplicateEventId { event_id } if event_id == twin.event_id),
        "one id twice in one append must fail with DuplicateEventId naming it, got {error:?}"
    );
    assert_not_found(store, &stream("ids-c")).await;

    // The refused appends left their fresh ids unused.
    let outcome = append_ok(
        store,
        AppendRequest::new(
            stream("ids-c"),
            ExpectedVersion::NoStream,
            vec![fresh.clone(), twin.clone()],
        ),
    )
    .await;
    assert_recorded_as_given(
        &[fresh, twin],
        &outcome.events,
        "append of ids freed by refusals",
    );
}

/// A repeat of an append's idempotency key on the same stream returns the first
/// outcome, flagged as deduplicated, with the same events and positions, and writes
/// nothing, even when the repeat carries other events or an expected version that
/// would now conflict. `find_idempotent_append` returns the same.
pub async fn idempotent_retry_returns_first_outcome_and_writes_nothing(store: Arc<dyn EventStore>) {
    let store = &*store;
    let stream = stream("idempotent");
    let events = numbered_events(1, 3);
    let request = AppendRequest::new(stream.clone(), ExpectedVersion::NoStream, events.clone())
        .with_idempotency_key("order-42-placed");
    let first = append_ok(store, request.clone()).await;
    assert!(
        !first.deduplicated,
        "the first use of a key must not be deduplicated"
    );
    let repeat_of_first = AppendOutcome {
        events: first.events.clone(),
        deduplicated: true,
    };
    let log = read_whole_log(store).await;

    let repeats = [
        ("the identical request", request.clone()),
        (
            "a request with other events and a stale expected version",
            AppendRequest::new(
                stream.clone(),
                ExpectedVersion::Exact(0),
                numbered_events(10, 2),
            )
            .with_idempotency_key("order-42-placed"),
        ),
        (
            "a request expecting any version",
            AppendRequest::new(stream.clone(), ExpectedVersion::Any, vec![numbered(20)])
                .with_idempotency_key("order-42-placed"),
        ),
    ];
    for (what, repeat) in repeats {
        let outcome = append_ok(store, repeat).await;
        assert_eq!(
            outcome, repeat_of_first,
            "repeating a key with {what} must return the first outcome, deduplicated"
        );
        assert_eq!(
            read_whole_log(store).await,
            log,
            "repeating a key with {what} must write nothing"
        );
    }
    assert_eq!(
        find_idempotent(store, "order-42-placed").await,
        Some(repeat_of_first.clone()),
        "find_idempotent_append must return the first outcome, flagged as deduplicated"
    );
    assert_eq!(
        find_idempotent(store, "never-used").await,
        None,
        "an unused key must find nothing"
    );

    // Later appends to the stream do not change what the key returns.
    append_ok(
        store,
        AppendRequest::new(
            stream.clone(),
            ExpectedVersion::Exact(3),
            vec![numbered(30)],
        ),
    )
    .await;
    let outcome = append_ok(store, request).await;
    assert_eq!(
        outcome, repeat_of_first,
        "a key must keep returning its first outcome after the stream moved on"
    );
}

/// An idempotency key first used for one stream is refused for another with
/// `IdempotencyKeyReused`, naming both, and nothing is written.
pub async fn idempotency_key_reused_for_another_stream_is_refused(store: Arc<dyn EventStore>) {
    let store = &*store;
    let first_stream = stream("key-owner");
    let other = stream("key-thief");
    append_ok(
        store,
        AppendRequest::new(
            first_stream.clone(),
            ExpectedVersion::Any,
            vec![numbered(1)],
        )
        .with_idempotency_key("shared-key"),
    )
    .await;
    let request = AppendRequest::new(other.clone(), ExpectedVersion::Any, vec![numbered(2)])
        .with_idempotency_key("shared-key");
    let error = append_refused(store, request).await;
    match &error {
        AppendError::IdempotencyKeyReused {
            key,
            first_stream: first,
            stream,
        } => {
            assert_eq!(
                (key.as_str(), first, stream),
                ("shared-key", &first_stream, &other),
                "IdempotencyKeyReused must name the key and both streams"
            );
        }
        other => panic!(
            "re-using a key for another stream must fail with IdempotencyKeyReused, got {other:?}"
        ),
    }
    assert_not_found(store, &other).await;
}

/// Reads of one stream page correctly forwards and backwards: from the start, the
/// middle, the end and past it, one event at a time, and with limits far larger
/// than the stream; every event equals its copy in the global log.
pub async fn read_stream_pages_forward_and_backward(store: Arc<dyn EventStore>) {
    let store = &*store;
    let paged = stream("paged");
    let noise = stream("paged-noise");
    for (first, count) in [(1, 3), (4, 3), (7, 4)] {
        append_ok(
            store,
            AppendRequest::new(
                paged.clone(),
                ExpectedVersion::Any,
                numbered_events(first, count),
            ),
        )
        .await;
        append_ok(
            store,
            AppendRequest::new(
                noise.clone(),
                ExpectedVersion::Any,
                numbered_events(100 + first, 1),
            ),
        )
        .await;
    }
    let whole: Vec<RecordedEvent> = read_whole_log(store)
        .await
        .into_iter()
        .filter(|event| event.stream_id == paged)
        .collect();
    assert_eq!(whole.len(), 10);
    let versions = |range: &[u64]| -> Vec<RecordedEvent> {
        range
            .iter()
            .map(|version| whole[*version as usize - 1].clone())
            .collect()
    };
    let cases: Vec<(StreamRead, Vec<RecordedEvent>)> = vec![
        (
            StreamRead::forward(paged.clone(), 1, 100),
            versions(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        ),
        (StreamRead::forward(paged.clone(), 0, 2), versions(&[1, 2])),
        (
            StreamRead::forward(paged.clone(), 4, 3),
            versions(&[4, 5, 6]),
        ),
        (StreamRead::forward(paged.clone(), 9, 5), versions(&[9, 10])),
        (StreamRead::forward(paged.clone(), 10, 1), versions(&[10])),
        (StreamRead::forward(paged.clone(), 11, 5), Vec::new()),
        (StreamRead::forward(paged.clone(), u64::MAX, 5), Vec::new()),
        (
            StreamRead::forward(paged.clone(), 1, usize::MAX),
            versions(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]),
        ),
        (
            StreamRead::backward(paged.clone(), u64::MAX, 100),
            versions(&[10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
        ),
        (
            StreamRead::backward(paged.clone(), u64::MAX, 2),
            versions(&[10, 9]),
        ),
        (
            StreamRead::backward(paged.clone(), 6, 3),
            versions(&[6, 5, 4]),
        ),
        (StreamRead::backward(paged.clone(), 2, 5), versions(&[2, 1])),
        (StreamRead::backward(paged.clone(), 1, 5), versions(&[1])),
        (StreamRead::backward(paged.clone(), 0, 5), Vec::new()),
        (
            StreamRead::backward(paged.clone(), 20, usize::MAX),
            versions(&[10, 9, 8, 7, 6, 5, 4, 3, 2, 1]),
        ),
    ];
    for (read, expected) in cases {
        let what = format!(
            "{:?} from {} limit {}",
            read.direction, read.from, read.limit
        );
        let page = store
            .read_stream(read)
            .await
            .unwrap_or_else(|error| panic!("read_stream {what} failed: {error}"));
        assert_eq!(page, expected, "read_stream {what} returned the wrong page");
    }
    let mut forward = Vec::new();
    for from in 1..=11 {
        let page = store
            .read_stream(StreamRead::forward(paged.clone(), from, 1))
            .await
            .unwrap_or_else(|error| {
                panic!("read_stream forward from {from} limit 1 failed: {error}")
            });
        assert!(page.len() <= 1, "limit 1 returned {} events", page.len());
        forward.extend(page);
    }
    assert_eq!(
        forward, whole,
        "stepping forwards one event at a time must visit every version once"
    );
    let mut backward = Vec::new();
    for from in (0..=10).rev() {
        let page = store
            .read_stream(StreamRead::backward(paged.clone(), from, 1))
            .await
            .unwrap_or_else(|error| {
                panic!("read_stream backward from {from} limit 1 failed: {error}")
            });
        assert!(page.len() <= 1, "limit 1 returned {} events", page.len());
        backward.extend(page);
    }
    backward.reverse();
    assert_eq!(
        backward, whole,
        "stepping backwards one event at a time must visit every version once"
    );
}

/// A stream without events cannot be read (`StreamNotFound`, both directions) and
/// is at version 0, including ids that are a prefix, an extension or a change of
/// case of an existing one: stream ids are exact and case-sensitive.
pub async fn missing_stream_is_not_found_and_at_version_zero(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_not_found(store, &stream("never-written")).await;
    append_ok(
        store,
        AppendRequest::new(stream("Order-1"), ExpectedVersion::Any, vec![numbered(1)]),
    )
    .await;
    for near_miss in [
        "Order-", "Order-10", "order-1", "ORDER-1", "Order-1 ", "Order",
    ] {
        assert_not_found(store, &stream(near_miss)).await;
    }
    assert_eq!(stream_version(store, &stream("Order-1")).await, 1);
}

/// The global log pages correctly: from the start, from after any event, from at
/// and past the head (empty), with page sizes 1 to 7 and with huge limits; every
/// paging covers the log exactly once, in position order.
pub async fn read_all_pages_cover_the_log_once_in_order(store: Arc<dyn EventStore>) {
    let store = &*store;
    assert_eq!(
        store
            .read_all(Position::START, 10)
            .await
            .expect("read_all of an empty store"),
        Vec::new()
    );
    let mut expected = Vec::new();
    for (round, count) in [3_u64, 1, 4, 2, 5, 1, 3, 2, 4].into_iter().enumerate() {
        let target = stream(&format!("global-{}", round % 3));
        let outcome = append_ok(
            store,
            AppendRequest::new(
                target,
                ExpectedVersion::Any,
                numbered_events(round as u64 * 10, count),
            ),
        )
        .await;
        expected.extend(outcome.events);
    }
    let read = |after: Position, limit: usize| async move {
        store
            .read_all(after, limit)
            .await
            .unwrap_or_else(|error| panic!("read_all after {after} limit {limit} failed: {error}"))
    };
    assert_eq!(
        read(Position::START, 1000).await,
        expected,
        "read_all from the start must return the whole log in order"
    );
    assert_eq!(
        read(Position::START, usize::MAX).await,
        expected,
        "read_all with limit usize::MAX must return the whole log"
    );
    let last = expected
        .last()
        .map(|event| event.position)
        .unwrap_or_default();
    assert_eq!(
        read(last, 10).await,
        Vec::new(),
        "read_all after the head must be empty"
    );
    assert_eq!(
        read(Position(last.0 + 1000), 10).await,
        Vec::new(),
        "read_all far past the head must be empty"
    );
    assert_eq!(
        read(Position(u64::MAX), 10).await,
        Vec::new(),
        "read_all after u64::MAX must be empty"
    );
    for (index, event) in expected.iter().enumerate() {
        let tail: Vec<RecordedEvent> = expected[index + 1..].iter().take(5).cloned().collect();
        assert_eq!(
            read(event.position, 5).await,
            tail,
            "read_all after position {} must start at the next event",
            event.position
        );
    }
    for page_size in 1..=7 {
        let mut seen = Vec::new();
        let mut after = Position::START;
        loop {
            let page = read(after, page_size).await;
            assert!(
                page.len() <= page_size,
                "read_all returned {} events for limit {page_size}",
                page.len()
            );
            assert!(
                page.iter().all(|event| event.position > after),
                "read_all after {after} returned an event at or before it"
            );
            let Some(last) = page.last() else { break };
            after = last.position;
            let short = page.len() < page_size;
            seen.extend(page);
            assert!(
                !short || seen.len() == expected.len(),
                "read_all returned a short page before the end of the log"
            );
        }
        assert_eq!(
            seen, expected,
            "pages of {page_size} must cover the log exactly once, in order"
        );
    }
}

/// Payloads and metadata come back exactly as written: nested JSON, unicode,
/// escapes, integers at the edges of i64 and u64, exact floats, null, every
/// metadata id and free key/values, and the schema version, through appends,
/// stream reads and global reads alike.
pub async fn payload_and_metadata_round_trip_exactly(store: Arc<dyn EventStore>) {
    let store = &*store;
    let full_metadata = Metadata {
        command_id: Some(Uuid::now_v7()),
        correlation_id: Some(Uuid::now_v7()),
        causation_id: Some(Uuid::now_v7()),
        extra: BTreeMap::from([
            ("tenant".to_owned(), "acme".to_owned()),
            (
                "user-agent".to_owned(),
                "curl/8.5 \"quoted\" \\ back".to_owned(),
            ),
            ("ключ".to_owned(), "значение ✓ 🎉".to_owned()),
            ("empty".to_owned(), String::new()),
        ]),
    };
    let payloads = [
        json!({
            "order_id": "o-1",
            "lines": [{"product_id": "p-1", "quantity": 2}, {"product_id": "p-2", "quantity": 1}],
            "nested": {"deeper": {"deepest": [1, [2, [3, {"four": null}]]]}},
            "flags": [true, false],
        }),
        json!({"max_u64": u64::MAX, "min_i64": i64::MIN, "max_i64": i64::MAX, "zero": 0, "negative": -1}),
        json!({"exact_floats": [1.5, -0.25, 0.0, 1024.0]}),
        json!({"text": "Grüße, 世界, مرحبا, 🎉 \"quotes\" \\ backslash \n newline \t tab \u{1F600}", "": "empty key"}),
        json!(null),
        json!("a bare string"),
        json!(42),
        json!([]),
        json!({}),
    ];
    let mut events: Vec<NewEvent> = payloads
        .iter()
        .enumerate()
        .map(|(index, payload)| {
            NewEvent::new(format!("Payload{index}"), payload.clone())
                .with_metadata(full_metadata.clone())
        })
        .collect();
    events.push(
        NewEvent::new("ÉvénementÜnicode✓", json!({"ok": true})).with_schema_version(u32::MAX),
    );
    events.push(NewEvent::new("NoMetadata", json!({"ok": true})).with_schema_version(7));
    let before = Timestamp::now();
    let outcome = append_ok(
        store,
        AppendRequest::new(
            stream("round-trip"),
            ExpectedVersion::NoStream,
            events.clone(),
        ),
    )
    .await;
    let after = Timestamp::now();
    assert_recorded_as_given(&events, &outcome.events, "append outcome");
    let slack = 5_000_000; // five seconds, for a store that takes the time on another clock
    for event in &outcome.events {
        let micros = event.recorded_at.as_unix_micros();
        assert!(
            micros >= before.as_unix_micros() - slack && micros <= after.as_unix_micros() + slack,
            "recorded_at {} is not the time of the append ({before} to {after})",
            event.recorded_at
        );
    }
    assert_eq!(
        read_whole_stream(store, &stream("round-trip")).await,
        outcome.events,
        "read_stream must return the events exactly as the append reported them"
    );
    assert_eq!(
        read_whole_log(store).await,
        outcome.events,
        "read_all must return the events exactly as the append reported them"
    );
}

/// A stream id of exactly [`crate::MAX_STREAM_ID_BYTES`] bytes works, in ASCII and
/// in multi-byte UTF-8, and two such ids differing only in their last character are
/// two streams (nothing truncates them).
pub async fn stream_id_of_max_length_works(store: Arc<dyn EventStore>) {
    let store = &*store;
    let max = crate::MAX_STREAM_ID_BYTES;
    let ascii_a = stream(&format!("{}a", "s".repeat(max - 1)));
    let ascii_b = stream(&format!("{}b", "s".repeat(max - 1)));
    let multibyte = stream(&"é".repeat(max / 2));
    for id in [&ascii_a, &ascii_b, &multibyte] {
        assert_eq!(id.as_str().len(), max);
    }
    let mut expected = Vec::new();
    for (index, id) in [&ascii_a, &ascii_b, &multibyte].into_iter().enumerate() {
        let outcome = append_ok(
            store,
            AppendRequest::new(
                id.clone(),
                ExpectedVersion::NoStream,
                vec![numbered(index as u64)],
            ),
        )
        .await;
        assert_eq!(outcome.events[0].stream_id, *id);
        assert_eq!(
            read_whole_stream(store, id).await,
            outcome.events,
            "a stream with a {max}-byte id must read back whole"
        );
        assert_eq!(
            stream_version(store, id).await,
            1,
            "streams with {max}-byte ids must be distinct"
        );
        expected.extend(outcome.events);
    }
    assert_eq!(read_whole_log(store).await, expected);
}

/// A snapshot reads back exactly as saved; saving again replaces it; streams do not
/// share snapshots.
pub async fn snapshots_round_trip_and_are_replaced(store: Arc<dyn EventStore>) {
    let store = &*store;
    let first_stream = stream("snapshotted-1");
    let other = stream("snapshotted-2");
    append_ok(
        store,
        AppendRequest::new(
            first_stream.clone(),
            ExpectedVersion::Any,
            numbered_events(1, 5),
        ),
    )
    .await;
    append_ok(
        store,
        AppendRequest::new(other.clone(), ExpectedVersion::Any, numbered_events(10, 1)),
    )
    .await;
    let load = |id: StreamId| async move {
        store
            .load_snapshot(&id)
            .await
            .unwrap_or_else(|error| panic!("load_snapshot(`{id}`) failed: {error}"))
    };
    let save = |snapshot: Snapshot| async move {
        let id = snapshot.stream.clone();
        store
            .save_snapshot(snapshot)
            .await
            .unwrap_or_else(|error| panic!("save_snapshot(`{id}`) failed: {error}"));
    };
    assert_eq!(
        load(first_stream.clone()).await,
        None,
        "a stream never snapshotted must have no snapshot"
    );
    let early = Snapshot {
        stream: first_stream.clone(),
        version: 2,
        state_version: 1,
        state: json!({"total": 3, "names": ["ä", "🎉"], "nested": {"big": u64::MAX}}),
        taken_at: Timestamp::now(),
    };
    save(early.clone()).await;
    let early_copy = early.clone();
    assert_eq!(
        load(first_stream.clone()).await,
        Some(early),
        "a snapshot must read back exactly as saved"
    );
    let later = Snapshot {
        stream: first_stream.clone(),
        version: 5,
        state_version: 3,
        state: json!(null),
        taken_at: Timestamp::from_unix_micros(Timestamp::now().as_unix_micros() + 1),
    };
    save(later.clone()).await;
    assert_eq!(
        load(first_stream.clone()).await,
        Some(later),
        "saving a snapshot must replace the stream's earlier one"
    );
    // Two commands racing to snapshot: the one at the lower version may finish
    // last, and must not roll the snapshot back.
    let stale = Snapshot {
        version: 3,
        ..early_copy
    };
    save(stale).await;
    assert_eq!(
        load(first_stream.clone())
            .await
            .map(|snapshot| snapshot.version),
        Some(5),
        "an older snapshot must never replace a newer one"
    );
    assert_eq!(
        load(other).await,
        None,
        "a snapshot must belong to its own stream only"
    );
}

/// Asserts an append is refused as a conflict reporting `actual`, having written
/// nothing.
async fn assert_conflict(store: &dyn EventStore, request: AppendRequest, actual: u64) {
    let (stream, expected) = (request.stream.clone(), request.expected);
    let error = append_refused(store, request).await;
    match error {
        AppendError::Conflict {
            stream: reported,
            expected: reported_expected,
            actual: reported_actual,
        } => assert_eq!(
            (reported, reported_expected, reported_actual),
            (stream, expected, actual),
            "a conflict must name the stream, the expected version and the actual version"
        ),
        other => panic!(
            "appending to `{stream}` expecting {expected} must be a conflict (actual version {actual}), got {other:?}"
        ),
    }
}

/// Asserts a stream does not exist: not found forwards nor backwards, version 0.
async fn assert_not_found(store: &dyn EventStore, missing: &StreamId) {
    for read in [
        StreamRead::forward(missing.clone(), 1, 10),
        StreamRead::backward(missing.clone(), u64::MAX, 10),
    ] {
        let direction = read.direction;
        match store.read_stream(read).await {
            Err(ReadError::StreamNotFound { stream }) => {
                assert_eq!(stream, *missing, "StreamNotFound must name the stream read")
            }
            other => panic!(
                "reading missing stream `{missing}` {direction:?} must fail with StreamNotFound, got {other:?}"
            ),
        }
    }
    assert_eq!(
        stream_version(store, missing).await,
        0,
        "a missing stream `{missing}` must be at version 0"
    );
}
