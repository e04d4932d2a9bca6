//! The global order on PostgreSQL: a transaction that appended and has not
//! committed yet holds back every later position, however many other writers
//! commit meanwhile; once it commits, its event is delivered exactly once, in
//! its place. See docs/postgres-ordering.md.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use diptych_core::{
    AppendRequest, EventStore, ExpectedVersion, NewEvent, Position, RecordedEvent, StreamId,
};
use diptych_postgres::{PgStore, testing};
use serde_json::json;
use uuid::Uuid;

/// Follows the log from the start, keeping everything it delivers.
fn subscribe(store: Arc<PgStore>) -> Arc<Mutex<Vec<RecordedEvent>>> {
    let delivered = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&delivered);
    tokio::spawn(async move {
        let mut head = store.head_watch();
        let mut after = Position::START;
        loop {
            let page = store.read_all(after, 100).await.expect("the log reads");
            if let Some(last) = page.last() {
                after = last.position;
                sink.lock().unwrap().extend(page);
                continue;
            }
            if head.changed().await.is_err() {
                return;
            }
        }
    });
    delivered
}

async fn wait_for_count(delivered: &Mutex<Vec<RecordedEvent>>, count: usize) {
    for _ in 0..600 {
        if delivered.lock().unwrap().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the subscriber delivered {} events, not {count}, within 30 s",
        delivered.lock().unwrap().len()
    );
}

/// How the held transaction appends: alone, or as a group of appends to two
/// streams (the group's locks, id and inserts all in one held transaction).
#[derive(Clone, Copy)]
enum Held {
    Alone,
    Group,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_transaction_holds_back_later_positions_until_it_commits() {
    holds_back_until_commit(Held::Alone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_group_holds_back_later_positions_until_it_commits() {
    holds_back_until_commit(Held::Group).await;
}

async fn holds_back_until_commit(held: Held) {
    let config = testing::fresh_config().await;
    let store = Arc::new(PgStore::connect(&config).await.expect("a store"));
    // Writers that do not wait for readability: the held transaction would
    // otherwise make each of them wait the whole readable_wait.
    let mut writer_config = config.clone();
    writer_config.readable_wait = Duration::ZERO;
    let writer = Arc::new(PgStore::connect(&writer_config).await.expect("a store"));
    let delivered = subscribe(Arc::clone(&store));

    let before = append(&*writer, "early-1", 0).await;
    wait_for_count(&delivered, 1).await;

    // An append in a transaction of our own, left open.
    let mut held_client = testing::raw_client(&config).await;
    let held_transaction = held_client.transaction().await.expect("a transaction");
    let held_ids: Vec<Uuid> = match held {
        Held::Alone => vec![Uuid::now_v7()],
        Held::Group => vec![Uuid::now_v7(), Uuid::now_v7()],
    };
    let held_sql = match held {
        Held::Alone => {
            "SELECT first_position FROM diptych_append('held-1', NULL, NULL, $1, \
             ARRAY['Held'], ARRAY[1], ARRAY['{\"held\": true}'::jsonb], ARRAY['{}'::jsonb])"
        }
        Held::Group => {
            "SELECT min(first_position) FROM diptych_append_group(true, \
             ARRAY['held-1', 'held-2'], ARRAY[0, NULL]::bigint[], ARRAY['held-key', NULL], \
             ARRAY[1, 1], ARRAY[1, 2], ARRAY[0, 0], $1, ARRAY['Held', 'Held'], ARRAY[1, 1], \
             ARRAY['{\"held\": 1}'::jsonb, '{\"held\": 2}'::jsonb], \
             ARRAY['{}'::jsonb, '{}'::jsonb])"
        }
    };
    let held_row = held_transaction
        .query_one(held_sql, &[&held_ids])
        .await
        .expect("the held append");
    let held_position = Position(held_row.get::<_, i64>(0) as u64);
    assert!(
        held_position > before,
        "the held event comes after the first"
    );
    // An append to a held stream waits for the stream's lock, and so lands
    // after the held events once they commit.
    let blocked = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move { append(&*writer, "held-1", 1).await })
    };

    // Many writers commit meanwhile, on other streams.
    let mut writers = Vec::new();
    for task in 0..8 {
        let writer = Arc::clone(&writer);
        writers.push(tokio::spawn(async move {
            for n in 0..25 {
                append(&*writer, &format!("other-{task}"), n).await;
            }
        }));
    }
    for task in writers {
        task.await.expect("a writer");
    }
    // All 200 are committed (a stream read sees them) but none is readable in
    // the global order, because each has a position above the held one.
    for task in 0..8 {
        let version = writer
            .stream_version(&StreamId::new(format!("other-{task}")).unwrap())
            .await
            .unwrap();
        assert_eq!(version, 25, "every writer's appends committed");
    }
    let head = store.head().await.expect("the head");
    assert!(
        head < held_position,
        "the head {head} passed the held event at {held_position}"
    );
    // Give the subscriber every chance to run ahead, then check it did not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let seen = delivered.lock().unwrap();
        assert_eq!(
            seen.len(),
            1,
            "the subscriber passed the held event: it delivered {:?}",
            seen.iter().map(|e| e.position).collect::<Vec<_>>()
        );
    }

    assert!(!blocked.is_finished(), "the held stream's lock is held");
    held_transaction
        .commit()
        .await
        .expect("the held append commits");
    let after_held = blocked.await.expect("the blocked append");
    assert!(
        after_held > held_position,
        "the append that waited for the held stream comes after it"
    );
    let total = 1 + held_ids.len() + 200 + 1;
    wait_for_count(&delivered, total).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = delivered.lock().unwrap().clone();
    assert_eq!(seen.len(), total, "every event once, none twice");
    let ids: HashSet<Uuid> = seen.iter().map(|event| event.event_id).collect();
    assert_eq!(ids.len(), total, "no event delivered twice");
    assert!(
        seen.windows(2)
            .all(|pair| pair[0].position < pair[1].position),
        "positions increase along the delivery"
    );
    for (offset, held_id) in held_ids.iter().enumerate() {
        assert_eq!(
            seen.iter().position(|event| event.event_id == *held_id),
            Some(1 + offset),
            "the held events are delivered in their place: right after the first"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_waits_until_it_is_readable_so_readers_that_follow_see_it() {
    // Transaction ids are server-wide: the other test's held transaction holds
    // this one's appends back too, for as long as it is held.
    let mut config = testing::fresh_config().await;
    config.readable_wait = Duration::from_secs(120);
    let store = PgStore::connect(&config).await.expect("a store");
    for n in 0..20 {
        let position = append(&store, "follow-1", n).await;
        assert_eq!(store.head().await.unwrap(), position);
        let page = store.read_all(Position::START, 100).await.unwrap();
        assert_eq!(page.last().map(|event| event.position), Some(position));
    }
}

async fn append(store: &dyn EventStore, stream: &str, n: u64) -> Position {
    store
        .append(AppendRequest::new(
            StreamId::new(stream).unwrap(),
            ExpectedVersion::Exact(n),
            vec![NewEvent::new("Wrote", json!({ "n": n }))],
        ))
        .await
        .expect("an append")
        .last_position()
}
