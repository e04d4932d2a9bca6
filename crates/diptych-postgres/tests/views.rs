//! What only the PostgreSQL view store does: the SQL escape hatch in both
//! directions, documents `jsonb` cannot hold, and several processes (here,
//! several instances on one schema) sharing the views.

use std::time::Duration;

use diptych_core::{
    Change, CollectionSpec, Control, Declaration, HandlerKind, Position, Query, ViewCommit,
    ViewError, ViewStore,
};
use diptych_postgres::{PgConfig, PgViews, testing};
use serde_json::json;

/// Long enough for a notification on a loaded machine; reached only on failure.
const PATIENCE: Duration = Duration::from_secs(10);

fn declaration() -> Declaration {
    Declaration {
        name: "directory".to_owned(),
        kind: HandlerKind::Projection,
        collections: vec![
            CollectionSpec::new("people").index("city").text("name"),
            CollectionSpec::new("cities"),
        ],
    }
}

async fn registered() -> (PgConfig, PgViews) {
    let config = testing::fresh_config().await;
    let views = PgViews::connect(&config).await.expect("a view store");
    views.register(&declaration()).await.expect("registering");
    (config, views)
}

fn count_visit(city: &str) -> Change {
    Change::Sql {
        statement: "INSERT INTO {cities} (key, doc) VALUES ($1, jsonb_build_object('count', 1))
                    ON CONFLICT (key) DO UPDATE
                    SET doc = jsonb_build_object('count', ({cities}.doc->>'count')::int + 1)"
            .to_owned(),
        parameters: vec![json!(city)],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_write_with_sql_in_order_and_readers_query_with_sql() {
    let (_, views) = registered().await;
    let mut commit = ViewCommit::new("directory", 1, Position::START, Position(1));
    commit.changes = vec![
        count_visit("oslo"),
        count_visit("lima"),
        count_visit("oslo"),
        // The statement sees the document put before it in the same batch.
        Change::put("people", "ada", &json!({ "name": "Ada", "city": "oslo" })),
        Change::Sql {
            statement: "UPDATE {people} AS p SET doc = p.doc || jsonb_build_object('visits', \
                        (SELECT c.doc->'count' FROM {cities} AS c WHERE c.key = p.doc->>'city'))"
                .to_owned(),
            parameters: vec![],
        },
    ];
    views.commit(commit).await.expect("a commit with SQL");
    assert_eq!(
        views.get("cities", "oslo").await.expect("get"),
        Some(json!({ "count": 2 }))
    );
    assert_eq!(
        views.get("people", "ada").await.expect("get"),
        Some(json!({ "name": "Ada", "city": "oslo", "visits": 2 }))
    );
    let rows = views
        .query_sql(
            "SELECT key, (doc->>'count')::int AS visits FROM {cities}
             WHERE (doc->>'count')::int >= $1 ORDER BY key;",
            vec![json!(1)],
        )
        .await
        .expect("a read with SQL");
    let rows: Vec<serde_json::Value> = rows.into_iter().map(serde_json::Value::Object).collect();
    assert_eq!(
        rows,
        [
            json!({ "key": "lima", "visits": 1 }),
            json!({ "key": "oslo", "visits": 2 })
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_sql_and_unstorable_documents_are_refused_and_write_nothing() {
    let (_, views) = registered().await;
    let refused = |change: Change| {
        let views = &views;
        async move {
            let mut commit = ViewCommit::new("directory", 1, Position::START, Position(1));
            commit.changes = vec![count_visit("oslo"), change];
            views
                .commit(commit)
                .await
                .expect_err("the batch is refused")
        }
    };
    let error = refused(Change::Sql {
        statement: "UPDATE {cities} SET no_such_column = 1".to_owned(),
        parameters: vec![],
    })
    .await;
    assert!(
        matches!(&error, ViewError::InvalidQuery(message) if message.contains("no_such_column")),
        "{error}"
    );
    let error = refused(Change::Sql {
        statement: "SELECT * FROM {nowhere}".to_owned(),
        parameters: vec![],
    })
    .await;
    assert!(
        matches!(&error, ViewError::UnknownCollection(name) if name == "nowhere"),
        "{error}"
    );
    let error = refused(Change::Put {
        collection: "cities".to_owned(),
        key: "nul".to_owned(),
        json: r#"{"name": "a\u0000b"}"#.to_owned(),
    })
    .await;
    assert!(
        matches!(&error, ViewError::Document { key, reason, .. } if key == "nul" && reason.contains("U+0000")),
        "{error}"
    );
    let error = refused(Change::Put {
        collection: "people".to_owned(),
        key: "broken".to_owned(),
        json: "{not json".to_owned(),
    })
    .await;
    assert!(
        matches!(&error, ViewError::Document { key, .. } if key == "broken"),
        "{error}"
    );
    assert_eq!(views.get("cities", "oslo").await.expect("get"), None);
    assert_eq!(
        views
            .projection("directory")
            .await
            .expect("record")
            .position,
        Position::START
    );
    assert!(matches!(
        views.query_sql("DELETE FROM {cities}", vec![]).await,
        Err(ViewError::InvalidQuery(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_is_woken_by_commits_and_requests_without_polling() {
    let (config, here) = registered().await;
    let there = PgViews::connect(&config)
        .await
        .expect("a second view store");
    let mut checkpoint = there.checkpoint_watch("directory");
    let mut controls = there.control_watch();
    // Let the follower's first read and the listener's start settle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    checkpoint.borrow_and_update();
    controls.borrow_and_update();
    let mut commit = ViewCommit::new("directory", 1, Position::START, Position(7));
    commit.changes = vec![Change::put("people", "ada", &json!({ "name": "Ada" }))];
    here.commit(commit).await.expect("a commit");
    tokio::time::timeout(
        PATIENCE,
        checkpoint.wait_for(|position| *position == Position(7)),
    )
    .await
    .expect("the other instance's watch moved")
    .expect("the watch is open");
    here.control("directory", Control::Pause)
        .await
        .expect("a pause");
    tokio::time::timeout(PATIENCE, controls.changed())
        .await
        .expect("the other instance's runners were told")
        .expect("the watch is open");
    assert!(there.projection("directory").await.expect("record").paused);
    assert_eq!(
        there
            .query("people", &Query::default().text("ada"))
            .await
            .expect("a query")
            .items
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_commits_from_two_processes_apply_once() {
    let (config, here) = registered().await;
    let there = PgViews::connect(&config)
        .await
        .expect("a second view store");
    for round in 0..10u64 {
        let batch = || {
            let mut commit = ViewCommit::new("directory", 1, Position(round), Position(round + 1));
            commit.changes = vec![count_visit("oslo")];
            commit
        };
        let (first, second) = tokio::join!(here.commit(batch()), there.commit(batch()));
        let refused = [&first, &second]
            .into_iter()
            .filter(|outcome| matches!(outcome, Err(ViewError::CheckpointMoved { .. })))
            .count();
        assert_eq!(refused, 1, "round {round}: {first:?} {second:?}");
    }
    assert_eq!(
        here.get("cities", "oslo").await.expect("get"),
        Some(json!({ "count": 10 }))
    );
}
