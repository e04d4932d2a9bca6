//! What only the SQLite view store does: its own file kind, durability across a
//! reopen, and the SQL escape hatch in both directions.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use diptych_core::testkit::{added, append_one, wait_until_caught_up};
use diptych_core::{
    Change, CollectionSpec, Control, Declaration, EventStore, HandlerError, HandlerKind, Interest,
    Position, Projection, RecordedEvent, RunnerConfig, ViewCommit, ViewError, ViewStore, ViewTx,
    spawn_projection,
};
use diptych_sqlite::{OpenError, SqliteStore, SqliteViews};
use serde_json::json;

fn declaration() -> Declaration {
    Declaration {
        name: "directory".to_owned(),
        kind: HandlerKind::Projection,
        collections: vec![CollectionSpec::new("people").index("city").text("name")],
    }
}

#[test]
fn an_event_store_file_is_refused_as_views_and_the_other_way_round() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.db");
    let views = dir.path().join("views.db");
    drop(SqliteStore::open(&events).unwrap());
    drop(SqliteViews::open(&views).unwrap());
    let before = std::fs::read(&events).unwrap();
    let error = SqliteViews::open(&events).err().expect("refused");
    assert!(
        matches!(error, OpenError::NotDiptychDatabase { .. }),
        "{error}"
    );
    assert_eq!(std::fs::read(&events).unwrap(), before);
    let error = SqliteStore::open(&views).err().expect("refused");
    assert!(
        matches!(error, OpenError::NotDiptychDatabase { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn documents_checkpoints_parked_events_and_requests_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("views.db");
    {
        let views = SqliteViews::open(&path).unwrap();
        views.register(&declaration()).await.unwrap();
        let mut commit = ViewCommit::new("directory", 1, Position::START, Position(12));
        commit.changes = vec![Change::put(
            "people",
            "ada",
            &json!({ "name": "Ada Lovelace", "city": "London" }),
        )];
        views.commit(commit).await.unwrap();
        views.control("directory", Control::Pause).await.unwrap();
    }
    let views = SqliteViews::open(&path).unwrap();
    let record = views.projection("directory").await.unwrap();
    assert_eq!(record.position, Position(12));
    assert!(record.paused);
    assert_eq!(
        views.get("people", "ada").await.unwrap(),
        Some(json!({ "name": "Ada Lovelace", "city": "London" }))
    );
    assert_eq!(*views.checkpoint_watch("directory").borrow(), Position(12));
    let found = views
        .query("people", &diptych_core::Query::default().text("lovelace"))
        .await
        .unwrap();
    assert_eq!(found.items.len(), 1);
}

/// Keeps a per-city count with SQL next to the documents.
struct CityCounts;

#[async_trait]
impl Projection for CityCounts {
    fn name(&self) -> &str {
        "city-counts"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new("cities")]
    }

    fn interest(&self) -> Interest {
        Interest::event_types(["Added"])
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        let city = event.payload["item"].as_str().unwrap_or("?").to_owned();
        views.execute_sql(
            "INSERT INTO {cities} (key, doc) VALUES (?1, json_object('count', 1))
             ON CONFLICT (key) DO UPDATE SET doc = json_set(doc, '$.count', json_extract(doc, '$.count') + 1)",
            vec![json!(city)],
        );
        Ok(())
    }
}

async fn open_both(dir: &Path) -> (Arc<dyn EventStore>, Arc<SqliteViews>) {
    let store = SqliteStore::open(dir.join("events.db")).unwrap();
    let views = SqliteViews::open(dir.join("views.db")).unwrap();
    (Arc::new(store), Arc::new(views))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_can_write_with_sql_and_readers_can_query_with_sql() {
    let dir = tempfile::tempdir().unwrap();
    let (store, views) = open_both(dir.path()).await;
    for city in ["oslo", "lima", "oslo", "oslo"] {
        append_one(&*store, "visits-1", added(city, 1)).await;
    }
    let runner = spawn_projection(
        store.clone(),
        views.clone(),
        Arc::new(CityCounts),
        HandlerKind::Projection,
        RunnerConfig::default(),
    )
    .await
    .unwrap();
    wait_until_caught_up(&*store, &*views, "cities").await;
    runner.stop().await;
    assert_eq!(
        views.get("cities", "oslo").await.unwrap(),
        Some(json!({ "count": 3 }))
    );
    let rows = views
        .query_sql(
            "SELECT key, json_extract(doc, '$.count') AS visits FROM {cities}
             WHERE json_extract(doc, '$.count') >= ?1 ORDER BY key",
            vec![json!(1)],
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::Value::from(
            rows.into_iter()
                .map(serde_json::Value::Object)
                .collect::<Vec<_>>()
        ),
        json!([{ "key": "lima", "visits": 1 }, { "key": "oslo", "visits": 3 }])
    );
}

#[tokio::test]
async fn bad_sql_is_refused_with_an_error_that_names_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (_, views) = open_both(dir.path()).await;
    views.register(&declaration()).await.unwrap();
    assert!(matches!(
        views.query_sql("SELECT * FROM {nowhere}", vec![]).await,
        Err(ViewError::UnknownCollection(name)) if name == "nowhere"
    ));
    assert!(matches!(
        views.query_sql("SELEKT 1", vec![]).await,
        Err(ViewError::InvalidQuery(_))
    ));
    assert!(matches!(
        views.query_sql("SELECT * FROM {people", vec![]).await,
        Err(ViewError::InvalidQuery(_))
    ));
    // Reads are read-only, whatever the statement says.
    assert!(
        views
            .query_sql("DELETE FROM {people}", vec![])
            .await
            .is_err()
    );
    // A batch whose SQL fails is refused whole: neither its documents nor its
    // checkpoint are written.
    let mut commit = ViewCommit::new("directory", 1, Position::START, Position(3));
    commit.changes = vec![
        Change::put("people", "ada", &json!({ "name": "Ada" })),
        Change::Sql {
            statement: "UPDATE {people} SET nonsense = 1".to_owned(),
            parameters: vec![],
        },
    ];
    assert!(matches!(
        views.commit(commit).await,
        Err(ViewError::InvalidQuery(_))
    ));
    assert_eq!(views.get("people", "ada").await.unwrap(), None);
    assert_eq!(
        views.projection("directory").await.unwrap().position,
        Position::START
    );
}

/// Does what each event says: `Put {key, doc}` or `Sql {statement}`.
struct Scripted;

#[async_trait]
impl Projection for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn collections(&self) -> Vec<CollectionSpec> {
        vec![CollectionSpec::new("scripted")]
    }

    async fn apply(&self, event: &RecordedEvent, views: &mut ViewTx) -> Result<(), HandlerError> {
        match event.event_type.as_str() {
            "Put" => {
                let key = event.payload["key"].as_str().unwrap_or_default();
                views.put("scripted", key, &event.payload["doc"])?;
            }
            "Sql" => {
                let statement = event.payload["statement"].as_str().unwrap_or_default();
                views.execute_sql(statement, vec![]);
            }
            _ => {}
        }
        Ok(())
    }
}

async fn run_scripted(
    store: Arc<dyn EventStore>,
    path: &Path,
    batch_size: usize,
) -> Arc<SqliteViews> {
    let views = Arc::new(SqliteViews::open(path).unwrap());
    let config = RunnerConfig {
        batch_size,
        ..RunnerConfig::default()
    };
    let runner = spawn_projection(
        store.clone(),
        views.clone(),
        Arc::new(Scripted),
        HandlerKind::Projection,
        config,
    )
    .await
    .unwrap();
    wait_until_caught_up(&*store, &*views, "scripted").await;
    runner.stop().await;
    views
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_keeps_its_order_and_sql_the_store_refuses_parks_its_event() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = open_both(dir.path()).await;
    let put = |key: &str, n: u64| {
        diptych_core::NewEvent::new("Put", json!({ "key": key, "doc": { "n": n } }))
    };
    let sql =
        |statement: &str| diptych_core::NewEvent::new("Sql", json!({ "statement": statement }));
    append_one(&*store, "script-1", put("a", 1)).await;
    append_one(
        &*store,
        "script-1",
        sql("UPDATE {scripted} SET doc = json_set(doc, '$.n', 5) WHERE key = 'a'"),
    )
    .await;
    append_one(&*store, "script-1", put("b", 7)).await;
    let bad = append_one(
        &*store,
        "script-1",
        sql("UPDATE {scripted} SET no_such_column = 1"),
    )
    .await;
    append_one(&*store, "script-1", put("c", 9)).await;
    append_one(
        &*store,
        "script-1",
        sql("UPDATE {scripted} SET doc = json_set(doc, '$.n', 8) WHERE key = 'c'"),
    )
    .await;
    append_one(&*store, "script-1", put("a", 2)).await;

    let one_by_one = run_scripted(store.clone(), &dir.path().join("one.db"), 1).await;
    let all_at_once = run_scripted(store.clone(), &dir.path().join("all.db"), 1000).await;
    for views in [&one_by_one, &all_at_once] {
        let docs = diptych_core::testkit::dump_collection(&**views, "scripted").await;
        assert_eq!(
            docs,
            vec![
                ("a".to_owned(), json!({ "n": 2 })),
                ("b".to_owned(), json!({ "n": 7 })),
                ("c".to_owned(), json!({ "n": 8 })),
            ],
            "the view must not depend on where batches end"
        );
        let parked = views.parked("scripted").await.unwrap();
        assert_eq!(parked.iter().map(|p| p.position).collect::<Vec<_>>(), [bad]);
        assert!(
            parked[0].error.contains("no_such_column"),
            "{}",
            parked[0].error
        );
        assert_eq!(
            views.projection("scripted").await.unwrap().position,
            store.head().await.unwrap()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_sees_commits_made_through_another_instance_of_the_same_views() {
    let dir = tempfile::tempdir().unwrap();
    let (store, projecting) = open_both(dir.path()).await;
    let runner = spawn_projection(
        store.clone(),
        projecting.clone(),
        Arc::new(CityCounts),
        HandlerKind::Projection,
        RunnerConfig::default(),
    )
    .await
    .unwrap();
    // Another process's view of the same file: nothing it commits reaches this one.
    let querying = SqliteViews::open(dir.path().join("views.db")).unwrap();
    let position = append_one(&*store, "visits-1", added("oslo", 1)).await;
    let reached = diptych_core::wait_for(
        &querying,
        "cities",
        position,
        std::time::Duration::from_secs(30),
    )
    .await
    .expect("the commit is seen by the other instance");
    assert!(reached >= position);
    assert_eq!(
        querying.get("cities", "oslo").await.unwrap(),
        Some(json!({ "count": 1 }))
    );
    runner.stop().await;
}
