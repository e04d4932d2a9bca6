//! Checks of the view store contract: documents, queries, commits, generations,
//! parked events and operators' requests.

use serde_json::json;

use super::ViewFixture;
use crate::envelope::{Position, Timestamp};
use crate::error::ViewError;
use crate::view::{
    Change, CollectionSpec, Comparison, Control, Cursor, Declaration, Document, HandlerKind,
    ParkedEvent, Query, ViewCommit, ViewStore,
};

/// The collection most checks use: an index on `city` and `age`, text on `name`
/// and `bio`.
pub(crate) fn people() -> CollectionSpec {
    CollectionSpec::new("people")
        .index("city")
        .index("age")
        .index("address.zip")
        .text("name")
        .text("bio")
}

fn declaration(name: &str, collections: Vec<CollectionSpec>) -> Declaration {
    Declaration {
        name: name.to_owned(),
        kind: HandlerKind::Projection,
        collections,
    }
}

fn put(collection: &str, key: &str, document: Document) -> Change {
    Change::put(collection, key, &document)
}

/// Registers `directory` with [`people`] and commits `changes` as its first batch.
async fn directory_with(views: &dyn ViewStore, changes: Vec<Change>) {
    views
        .register(&declaration("directory", vec![people()]))
        .await
        .expect("registering a projection");
    let mut commit = ViewCommit::new("directory", 1, Position::START, Position(1));
    commit.changes = changes;
    views.commit(commit).await.expect("a first commit");
}

fn parked_at(projection: &str, generation: u64, position: u64) -> ParkedEvent {
    ParkedEvent {
        projection: projection.to_owned(),
        generation,
        position: Position(position),
        stream: "person-1".to_owned(),
        event_type: "PersonRenamed".to_owned(),
        error: format!("failed in generation {generation}"),
        attempts: 1,
        parked_at: Timestamp::from_unix_micros(1_700_000_000_000_000),
        retry_requested: false,
    }
}

fn person(name: &str, city: &str, age: u32, bio: &str) -> Document {
    json!({ "name": name, "city": city, "age": age, "bio": bio, "address": { "zip": format!("Z{age}") } })
}

fn sample_people() -> Vec<Change> {
    vec![
        put(
            "people",
            "ada",
            person("Ada Lovelace", "London", 36, "wrote the first program"),
        ),
        put(
            "people",
            "alan",
            person(
                "Alan Turing",
                "London",
                41,
                "broke codes and defined computing",
            ),
        ),
        put(
            "people",
            "grace",
            person("Grace Hopper", "New York", 85, "wrote the first compiler"),
        ),
        put(
            "people",
            "edsger",
            person(
                "Edsger Dijkstra",
                "Austin",
                72,
                "shortest paths, semaphores",
            ),
        ),
        put(
            "people",
            "barbara",
            person("Barbara Liskov", "Boston", 86, "data abstraction"),
        ),
        put(
            "people",
            "ken",
            person("Ken Thompson", "Berkeley", 82, "wrote unix"),
        ),
    ]
}

/// Every document of the served generation of a collection, by key, read a page
/// of 7 at a time.
pub async fn dump_collection(views: &dyn ViewStore, collection: &str) -> Vec<(String, Document)> {
    let mut documents = Vec::new();
    let mut query = Query::default().limit(7);
    loop {
        let page = views
            .query(collection, &query)
            .await
            .unwrap_or_else(|error| panic!("reading `{collection}`: {error}"));
        documents.extend(page.items);
        match page.next {
            Some(cursor) => query = query.after(cursor),
            None => return documents,
        }
    }
}

async fn keys(views: &dyn ViewStore, query: Query) -> Vec<String> {
    views
        .query("people", &query)
        .await
        .unwrap_or_else(|error| panic!("query {query:?}: {error}"))
        .items
        .into_iter()
        .map(|(key, _)| key)
        .collect()
}

/// Documents are put, read, replaced and deleted; reads of the served generation
/// see exactly what was committed.
pub async fn views_documents_round_trip(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, sample_people()).await;
    assert_eq!(
        views.get("people", "ada").await.expect("get"),
        Some(person(
            "Ada Lovelace",
            "London",
            36,
            "wrote the first program"
        ))
    );
    assert_eq!(views.get("people", "nobody").await.expect("get"), None);
    let mut commit = ViewCommit::new("directory", 1, Position(1), Position(2));
    commit.changes = vec![
        put(
            "people",
            "ada",
            json!({ "name": "Ada King", "city": "London", "age": 37 }),
        ),
        Change::Delete {
            collection: "people".to_owned(),
            key: "ken".to_owned(),
        },
    ];
    views.commit(commit).await.expect("a second commit");
    assert_eq!(
        views.get("people", "ada").await.expect("get"),
        Some(json!({ "name": "Ada King", "city": "London", "age": 37 }))
    );
    assert_eq!(views.get("people", "ken").await.expect("get"), None);
    assert_eq!(dump_collection(&*views, "people").await.len(), 5);
    let record = views.projection("directory").await.expect("the record");
    assert_eq!(record.position, Position(2));
    assert_eq!(
        views.served_position("people").await.expect("position"),
        Position(2)
    );
    assert!(matches!(
        views.served_position("nothing").await,
        Err(ViewError::UnknownCollection(_))
    ));
    assert_eq!(record.generation, 1);
    assert_eq!(
        views.get_in("people", 1, "alan").await.expect("get_in"),
        views.get("people", "alan").await.expect("get")
    );
    // A projection's batch reads the store through, and refuses what it cannot do.
    let mut batch = crate::projection::ViewTx::new(views.clone(), 1, &[people()]);
    #[derive(Debug, serde::Deserialize)]
    struct NotAPerson {
        #[allow(dead_code)]
        serial_number: u64,
    }
    assert!(matches!(
        batch.get::<NotAPerson>("people", "alan").await,
        Err(ViewError::Document { key, .. }) if key == "alan"
    ));
    assert!(matches!(
        batch.put("elsewhere", "x", &json!({})),
        Err(ViewError::UnknownCollection(name)) if name == "elsewhere"
    ));
    assert_eq!(
        batch
            .document("people", "alan")
            .await
            .expect("a read through"),
        views.get("people", "alan").await.expect("get")
    );
}

/// Equality and range filters on indexed fields, including a dotted path, and
/// their combination.
pub async fn views_filter_on_indexes(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, sample_people()).await;
    assert_eq!(
        keys(&*views, Query::default().eq("city", "London")).await,
        ["ada", "alan"]
    );
    assert_eq!(
        keys(&*views, Query::default().filter("age", Comparison::Ge, 82)).await,
        ["barbara", "grace", "ken"]
    );
    assert_eq!(
        keys(
            &*views,
            Query::default()
                .filter("age", Comparison::Gt, 40)
                .filter("age", Comparison::Lt, 82)
        )
        .await,
        ["alan", "edsger"]
    );
    assert_eq!(
        keys(&*views, Query::default().filter("age", Comparison::Le, 36)).await,
        ["ada"]
    );
    assert_eq!(
        keys(&*views, Query::default().eq("address.zip", "Z72")).await,
        ["edsger"]
    );
    assert_eq!(
        keys(
            &*views,
            Query::default()
                .eq("city", "London")
                .filter("age", Comparison::Gt, 40)
        )
        .await,
        ["alan"]
    );
    assert!(
        keys(&*views, Query::default().eq("city", "Paris"))
            .await
            .is_empty()
    );
    // A number never equals a string, as in SQL.
    assert!(
        keys(&*views, Query::default().eq("age", "36"))
            .await
            .is_empty()
    );
}

/// Ordering by a field, either way, with pages that cover every document once,
/// ties broken by key.
pub async fn views_order_and_page_stably(fixture: ViewFixture) {
    let views = fixture.views();
    let mut changes = sample_people();
    // Ties on age, to check the key breaks them.
    changes.push(put("people", "zed", person("Zed", "London", 41, "")));
    changes.push(put("people", "aaron", person("Aaron", "London", 41, "")));
    // No age: left out when ordering by age.
    changes.push(put("people", "nobody", json!({ "name": "Nobody" })));
    directory_with(&*views, changes).await;
    let by_age: Vec<String> =
        keys(&*views, Query::default().order_by("age", false).limit(100)).await;
    assert_eq!(
        by_age,
        [
            "ada", "aaron", "alan", "zed", "edsger", "ken", "grace", "barbara"
        ]
    );
    let oldest_first = keys(&*views, Query::default().order_by("age", true).limit(100)).await;
    let mut reversed = by_age.clone();
    reversed.reverse();
    assert_eq!(oldest_first, reversed);
    for descending in [false, true] {
        for page_size in 1..=4 {
            let mut paged = Vec::new();
            let mut query = Query::default()
                .order_by("age", descending)
                .limit(page_size);
            loop {
                let page = views.query("people", &query).await.expect("a page");
                assert!(page.items.len() <= page_size);
                paged.extend(page.items.into_iter().map(|(key, _)| key));
                match page.next {
                    Some(cursor) => query = query.after(cursor),
                    None => break,
                }
            }
            let expected = if descending { &reversed } else { &by_age };
            assert_eq!(
                &paged, expected,
                "pages of {page_size}, descending: {descending}"
            );
        }
    }
    let all_keys = keys(&*views, Query::default().limit(100)).await;
    let mut sorted = all_keys.clone();
    sorted.sort();
    assert_eq!(all_keys, sorted, "the default order is by key");
    assert_eq!(all_keys.len(), 9);
}

/// Full-text search finds documents holding every word, in any text field, any
/// case, combined with filters and paging.
pub async fn views_full_text_search(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, sample_people()).await;
    assert_eq!(
        keys(&*views, Query::default().text("wrote first")).await,
        ["ada", "grace"]
    );
    assert_eq!(
        keys(&*views, Query::default().text("COMPILER")).await,
        ["grace"]
    );
    assert_eq!(
        keys(&*views, Query::default().text("Turing")).await,
        ["alan"]
    );
    assert_eq!(
        keys(
            &*views,
            Query::default().text("wrote").eq("city", "Berkeley")
        )
        .await,
        ["ken"]
    );
    assert!(
        keys(&*views, Query::default().text("wrote cobol"))
            .await
            .is_empty()
    );
    let first = views
        .query("people", &Query::default().text("wrote").limit(2))
        .await
        .expect("a page");
    assert_eq!(first.items.len(), 2);
    let cursor = first.next.expect("a second page");
    let second = views
        .query(
            "people",
            &Query::default().text("wrote").limit(2).after(cursor),
        )
        .await
        .expect("a page");
    assert_eq!(second.items.len(), 1);
    assert_eq!(second.next, None);
    // Updated and deleted documents leave the index too.
    let mut commit = ViewCommit::new("directory", 1, Position(1), Position(2));
    commit.changes = vec![
        put(
            "people",
            "grace",
            person("Grace Hopper", "New York", 85, "admiral"),
        ),
        Change::Delete {
            collection: "people".to_owned(),
            key: "ken".to_owned(),
        },
    ];
    views.commit(commit).await.expect("a commit");
    assert_eq!(keys(&*views, Query::default().text("wrote")).await, ["ada"]);
    assert_eq!(
        keys(&*views, Query::default().text("admiral")).await,
        ["grace"]
    );
}

/// Queries that cannot run are refused with errors that name the problem.
pub async fn views_refuse_bad_queries(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, sample_people()).await;
    let refused = |query: Query| {
        let views = views.clone();
        async move {
            views
                .query("people", &query)
                .await
                .expect_err("the query should be refused")
        }
    };
    assert!(matches!(
        refused(Query::default().eq("name", "Ada")).await,
        ViewError::NotIndexed { field, .. } if field == "name"
    ));
    assert!(matches!(
        refused(Query::default().order_by("bio", false)).await,
        ViewError::NotIndexed { field, .. } if field == "bio"
    ));
    assert!(matches!(
        refused(Query::default().eq("city", json!(["London"]))).await,
        ViewError::InvalidQuery(_)
    ));
    assert!(matches!(
        refused(Query::default().text("!!!")).await,
        ViewError::InvalidQuery(_)
    ));
    assert!(matches!(
        refused(Query::default().limit(0)).await,
        ViewError::InvalidQuery(_)
    ));
    assert!(matches!(
        refused(Query::default().after(Cursor::from_text("not-a-cursor"))).await,
        ViewError::InvalidQuery(_)
    ));
    assert!(matches!(
        views.query("nothing", &Query::default()).await,
        Err(ViewError::UnknownCollection(name)) if name == "nothing"
    ));
    assert!(matches!(
        views.get("nothing", "key").await,
        Err(ViewError::UnknownCollection(_))
    ));
    views
        .register(&declaration(
            "plain",
            vec![CollectionSpec::new("plain-docs")],
        ))
        .await
        .expect("registering");
    assert!(matches!(
        views
            .query("plain-docs", &Query::default().text("word"))
            .await,
        Err(ViewError::InvalidQuery(_))
    ));
}

/// Registration checks names, is idempotent, and never gives one collection to
/// two projections.
pub async fn views_registration_rules(fixture: ViewFixture) {
    let views = fixture.views();
    let first = views
        .register(&declaration("directory", vec![people()]))
        .await
        .expect("registering");
    assert_eq!((first.generation, first.position), (1, Position::START));
    let again = views
        .register(&declaration("directory", vec![people()]))
        .await
        .expect("registering again");
    assert_eq!(again, first);
    assert!(matches!(
        views.register(&declaration("other", vec![people()])).await,
        Err(ViewError::CollectionTaken { owner, .. }) if owner == "directory"
    ));
    for bad in ["", "Upper", "1starts-with-digit", "has space", "semi;colon"] {
        assert!(
            matches!(
                views.register(&declaration(bad, vec![])).await,
                Err(ViewError::InvalidName { .. })
            ),
            "projection name {bad:?} should be refused"
        );
        assert!(
            matches!(
                views
                    .register(&declaration("fine", vec![CollectionSpec::new(bad)]))
                    .await,
                Err(ViewError::InvalidName { .. })
            ),
            "collection name {bad:?} should be refused"
        );
    }
    assert!(matches!(
        views
            .register(&declaration(
                "fine",
                vec![CollectionSpec::new("ok").index("a'); DROP")]
            ))
            .await,
        Err(ViewError::InvalidName { what: "field", .. })
    ));
    assert!(matches!(
        views.projection("missing").await,
        Err(ViewError::UnknownProjection(_))
    ));
    let names: Vec<String> = views
        .projections()
        .await
        .expect("the list")
        .into_iter()
        .map(|record| record.name)
        .collect();
    assert_eq!(names, ["directory"]);
    assert_eq!(
        views.owner_of("people").await.expect("the owner"),
        "directory"
    );
    // A new index is built over the documents already there; new text fields are
    // refused, as stored documents are not indexed for them.
    let mut commit = ViewCommit::new("directory", 1, Position::START, Position(1));
    commit.changes = sample_people();
    views.commit(commit).await.expect("a commit");
    let with_index = people().index("name");
    views
        .register(&declaration("directory", vec![with_index]))
        .await
        .expect("adding an index");
    assert_eq!(
        keys(&*views, Query::default().eq("name", "Ada Lovelace")).await,
        ["ada"]
    );
    assert!(matches!(
        views
            .register(&declaration("directory", vec![people().text("city")]))
            .await,
        Err(ViewError::NotPossible { .. })
    ));
    assert!(matches!(
        views
            .register(&declaration(
                "directory",
                vec![CollectionSpec::new("people")]
            ))
            .await,
        Err(ViewError::NotPossible { .. })
    ));
    assert_eq!(
        keys(&*views, Query::default().text("lovelace")).await,
        ["ada"]
    );
}

/// A batch whose starting checkpoint is stale is refused and writes nothing; so is
/// a batch touching another projection's collection.
pub async fn views_refuse_a_commit_from_a_moved_checkpoint(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, sample_people()).await;
    let before = dump_collection(&*views, "people").await;
    let mut stale = ViewCommit::new("directory", 1, Position::START, Position(5));
    stale.changes = vec![put("people", "intruder", json!({ "name": "Intruder" }))];
    assert!(matches!(
        views.commit(stale).await,
        Err(ViewError::CheckpointMoved {
            expected: 0,
            actual: 1,
            ..
        })
    ));
    views
        .register(&declaration("other", vec![CollectionSpec::new("things")]))
        .await
        .expect("registering");
    let mut foreign = ViewCommit::new("other", 1, Position::START, Position(1));
    foreign.changes = vec![put("people", "intruder", json!({}))];
    assert!(views.commit(foreign).await.is_err());
    let mut unknown_generation = ViewCommit::new("directory", 7, Position(1), Position(2));
    unknown_generation.changes = vec![put("people", "intruder", json!({}))];
    assert!(matches!(
        views.commit(unknown_generation).await,
        Err(ViewError::NotPossible { .. })
    ));
    assert_eq!(dump_collection(&*views, "people").await, before);
    assert_eq!(
        views
            .projection("directory")
            .await
            .expect("record")
            .position,
        Position(1)
    );
    assert_eq!(
        views.projection("other").await.expect("record").position,
        Position::START
    );
}

/// A rebuild fills a new generation while the old one serves; the switching commit
/// makes the new one served and drops the old in one step.
pub async fn views_switch_generations_atomically(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, sample_people()).await;
    let mut watch = views.checkpoint_watch("directory");
    assert_eq!(*watch.borrow_and_update(), Position(1));
    let mut parks_in_one = ViewCommit::new("directory", 1, Position(1), Position(1));
    parks_in_one.parked = vec![parked_at("directory", 1, 1)];
    views
        .commit(parks_in_one)
        .await
        .expect("parking in generation 1");
    watch.borrow_and_update();
    let rebuild = views.begin_rebuild("directory").await.expect("a rebuild");
    assert_eq!(rebuild.generation, 2);
    assert_eq!(rebuild.position, Position::START);
    assert_eq!(
        views
            .begin_rebuild("directory")
            .await
            .expect("the same rebuild"),
        rebuild,
        "asking again returns the rebuild under way"
    );
    let mut partial = ViewCommit::new("directory", 2, Position::START, Position(1));
    partial.changes = vec![put("people", "new", person("New", "Oslo", 1, "fresh"))];
    partial.parked = vec![parked_at("directory", 2, 1)];
    views.commit(partial).await.expect("a rebuild batch");
    // Still served from generation 1.
    assert_eq!(dump_collection(&*views, "people").await.len(), 6);
    assert_eq!(views.get("people", "new").await.expect("get"), None);
    assert_eq!(
        views.get_in("people", 2, "new").await.expect("get_in"),
        Some(person("New", "Oslo", 1, "fresh"))
    );
    let record = views.projection("directory").await.expect("record");
    assert_eq!(record.rebuild.map(|r| r.position), Some(Position(1)));
    assert!(!watch.has_changed().expect("the watch is open"));
    let parked = views.parked("directory").await.expect("parked");
    assert_eq!(
        parked.len(),
        1,
        "only the served generation's parked events are listed"
    );
    assert_eq!(parked[0].generation, 1);
    let mut switch = ViewCommit::new("directory", 2, Position(1), Position(3));
    switch.switch = true;
    views.commit(switch).await.expect("the switch");
    let record = views.projection("directory").await.expect("record");
    assert_eq!(
        (record.generation, record.position, record.rebuild),
        (2, Position(3), None)
    );
    assert_eq!(
        dump_collection(&*views, "people").await,
        vec![("new".to_owned(), person("New", "Oslo", 1, "fresh"))]
    );
    assert_eq!(keys(&*views, Query::default().text("fresh")).await, ["new"]);
    assert_eq!(
        keys(&*views, Query::default().eq("city", "Oslo")).await,
        ["new"]
    );
    assert_eq!(*watch.borrow_and_update(), Position(3));
    let parked = views.parked("directory").await.expect("parked");
    assert_eq!(
        parked.iter().map(|p| p.generation).collect::<Vec<_>>(),
        [2],
        "the old generation's parked events went with it; the new one's are served"
    );
    assert_eq!(
        views.projection("directory").await.expect("record").parked,
        1
    );
    // The old generation is gone: a straggling batch for it is refused.
    let straggler = ViewCommit::new("directory", 1, Position(1), Position(2));
    assert!(views.commit(straggler).await.is_err());
}

/// Parked events are stored with their error, listed in order, retried or
/// skipped by request; requests about events that are not parked are refused.
pub async fn views_park_retry_and_skip(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, vec![]).await;
    let parked = |position: u64| ParkedEvent {
        projection: "directory".to_owned(),
        generation: 1,
        position: Position(position),
        stream: format!("person-{position}"),
        event_type: "PersonRenamed".to_owned(),
        error: format!("bad event {position}"),
        attempts: 3,
        parked_at: Timestamp::from_unix_micros(1_700_000_000_000_000),
        retry_requested: false,
    };
    let mut commit = ViewCommit::new("directory", 1, Position(1), Position(9));
    commit.parked = vec![parked(7), parked(4)];
    views
        .commit(commit)
        .await
        .expect("a commit with parked events");
    assert_eq!(
        views.parked("directory").await.expect("parked"),
        vec![parked(4), parked(7)]
    );
    assert_eq!(
        views.projection("directory").await.expect("record").parked,
        2
    );
    let mut controls = views.control_watch();
    controls.borrow_and_update();
    views
        .control("directory", Control::Retry(Position(4)))
        .await
        .expect("a retry request");
    assert!(
        controls.has_changed().expect("open"),
        "a request wakes runners in this process"
    );
    assert!(views.parked("directory").await.expect("parked")[0].retry_requested);
    views
        .control("directory", Control::Skip(Position(7)))
        .await
        .expect("a skip");
    assert_eq!(views.parked("directory").await.expect("parked").len(), 1);
    for control in [Control::Retry(Position(5)), Control::Skip(Position(7))] {
        assert!(matches!(
            views.control("directory", control).await,
            Err(ViewError::NotPossible { .. })
        ));
    }
    let mut resolve = ViewCommit::new("directory", 1, Position(9), Position(9));
    resolve.resolved = vec![Position(4)];
    views.commit(resolve).await.expect("resolving");
    assert!(views.parked("directory").await.expect("parked").is_empty());
    assert!(matches!(
        views.parked("missing").await,
        Err(ViewError::UnknownProjection(_))
    ));
}

/// Pause, resume and rebuild requests are recorded; a process manager is never
/// rebuilt; requests for unknown projections are refused.
pub async fn views_record_operator_requests(fixture: ViewFixture) {
    let views = fixture.views();
    directory_with(&*views, vec![]).await;
    views
        .control("directory", Control::Pause)
        .await
        .expect("pause");
    assert!(views.projection("directory").await.expect("record").paused);
    views
        .control("directory", Control::Resume)
        .await
        .expect("resume");
    assert!(!views.projection("directory").await.expect("record").paused);
    views
        .control("directory", Control::Rebuild)
        .await
        .expect("rebuild");
    let status = crate::runner::projection_status(&*fixture.store(), &*views)
        .await
        .expect("status");
    assert_eq!(status[0].state, crate::runner::ProjectionState::Rebuilding);
    assert!(
        views
            .projection("directory")
            .await
            .expect("record")
            .rebuild_requested
    );
    let rebuild = views.begin_rebuild("directory").await.expect("begin");
    let record = views.projection("directory").await.expect("record");
    assert!(!record.rebuild_requested);
    assert_eq!(record.rebuild, Some(rebuild));
    views
        .set_stalled("directory", Some("disk full".to_owned()))
        .await
        .expect("stalled");
    assert_eq!(
        views
            .projection("directory")
            .await
            .expect("record")
            .stalled
            .as_deref(),
        Some("disk full")
    );
    views.set_stalled("directory", None).await.expect("cleared");
    views
        .register(&Declaration {
            name: "saga".to_owned(),
            kind: HandlerKind::ProcessManager,
            collections: vec![CollectionSpec::new("saga-state")],
        })
        .await
        .expect("registering a process manager");
    assert!(matches!(
        views.control("saga", Control::Rebuild).await,
        Err(ViewError::NotPossible { .. })
    ));
    assert!(matches!(
        views.begin_rebuild("saga").await,
        Err(ViewError::NotPossible { .. })
    ));
    assert!(matches!(
        views.control("missing", Control::Pause).await,
        Err(ViewError::UnknownProjection(_))
    ));
}

/// Events received from a broker are recorded with the batch that applies them:
/// a later batch naming one again (a redelivery) is refused whole, with nothing
/// of it applied, and the record is per projection.
pub async fn views_apply_a_received_event_once(fixture: ViewFixture) {
    let views = fixture.views();
    let (first, second, never) = (
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
        uuid::Uuid::now_v7(),
    );
    views
        .register(&declaration("directory", vec![people()]))
        .await
        .expect("registering a projection");
    let mut commit = ViewCommit::new("directory", 1, Position::START, Position(1));
    commit.changes = vec![put("people", "ada", json!({"name": "Ada"}))];
    commit.received = vec![first, second];
    views.commit(commit).await.expect("a first batch");
    let mut found = views
        .received("directory", &[first, never, second])
        .await
        .expect("received ids");
    found.sort();
    let mut expected = vec![first, second];
    expected.sort();
    assert_eq!(found, expected, "exactly the ids committed are recorded");

    let mut again = ViewCommit::new("directory", 1, Position(1), Position(2));
    again.changes = vec![put("people", "ada", json!({"name": "Ada twice"}))];
    again.received = vec![never, second];
    match views.commit(again).await {
        Err(ViewError::AlreadyReceived { event_id, .. }) => assert_eq!(event_id, second),
        other => panic!("a redelivered event must be refused, got {other:?}"),
    }
    assert_eq!(
        views.projection("directory").await.unwrap().position,
        Position(1),
        "the refused batch moved nothing"
    );
    assert_eq!(
        views.get("people", "ada").await.unwrap(),
        Some(json!({"name": "Ada"})),
        "the refused batch wrote nothing"
    );
    assert_eq!(
        views.received("directory", &[never]).await.unwrap(),
        Vec::<uuid::Uuid>::new(),
        "nor recorded its other ids"
    );
    assert!(
        views.received("other", &[first]).await.unwrap().is_empty(),
        "another projection has received nothing"
    );

    // One id twice in a batch is refused too: it would be applied twice.
    let mut doubled = ViewCommit::new("directory", 1, Position(1), Position(3));
    doubled.changes = vec![put("people", "ada", json!({"name": "Ada doubled"}))];
    doubled.received = vec![never, never];
    assert!(
        matches!(
            views.commit(doubled).await,
            Err(ViewError::AlreadyReceived { .. })
        ),
        "an id twice in one batch must be refused"
    );
    assert_eq!(
        views.get("people", "ada").await.unwrap(),
        Some(json!({"name": "Ada"})),
        "the doubled batch wrote nothing"
    );
}
