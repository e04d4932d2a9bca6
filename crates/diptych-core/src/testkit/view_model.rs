//! The property test of view queries: random documents and random queries give
//! the same pages on the backend as on [`MemoryViews`], the reference model.
//!
//! Documents mix the types an indexed field can hold (integers, decimals,
//! strings, booleans, null, missing); queries mix equality and range filters, a
//! word to search, every order and small pages, read to the end through cursors.

use std::future::Future;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};

use super::{ViewFixture, property_runtime};
use crate::envelope::Position;
use crate::memory_views::MemoryViews;
use crate::view::{
    Change, CollectionSpec, Comparison, Declaration, HandlerKind, Query, ViewCommit, ViewStore,
};

const WORDS: &[&str] = &["red", "green", "blue", "oak", "pine", "river"];

fn collection() -> CollectionSpec {
    CollectionSpec::new("things")
        .index("size")
        .index("tag")
        .text("title")
}

fn field_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        (-3i64..4).prop_map(|n| Some(json!(n))),
        (-3i64..4).prop_map(|n| Some(json!(n as f64 + 0.5))),
        prop::sample::select(vec!["a", "b", "c", "3"]).prop_map(|s| Some(json!(s))),
        any::<bool>().prop_map(|b| Some(json!(b))),
    ]
}

fn document() -> impl Strategy<Value = Value> {
    (
        field_value(),
        field_value(),
        prop::collection::vec(prop::sample::select(WORDS), 0..3),
    )
        .prop_map(|(size, tag, title)| {
            let mut document = json!({ "title": title.join(" ") });
            if let Some(size) = size {
                document["size"] = size;
            }
            if let Some(tag) = tag {
                document["tag"] = tag;
            }
            document
        })
}

/// A batch: puts and deletes over a small key space, so keys are overwritten.
fn batch() -> impl Strategy<Value = Vec<(u8, Option<Value>)>> {
    prop::collection::vec((0u8..12, prop::option::weighted(0.85, document())), 1..10)
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-3i64..4).prop_map(|n| json!(n)),
        (-3i64..4).prop_map(|n| json!(n as f64 + 0.5)),
        prop::sample::select(vec!["a", "b", "c", "3"]).prop_map(|s| json!(s)),
        any::<bool>().prop_map(|b| json!(b)),
    ]
}

fn query() -> impl Strategy<Value = Query> {
    let comparison = prop::sample::select(vec![
        Comparison::Eq,
        Comparison::Lt,
        Comparison::Le,
        Comparison::Gt,
        Comparison::Ge,
    ]);
    let field = prop::sample::select(vec!["size", "tag"]);
    (
        prop::collection::vec((field.clone(), comparison, scalar()), 0..3),
        prop::option::of(prop::sample::select(WORDS)),
        prop::option::of((field, any::<bool>())),
        1usize..5,
    )
        .prop_map(|(filters, text, order, limit)| {
            let mut query = Query::default().limit(limit);
            for (field, comparison, value) in filters {
                query = query.filter(field, comparison, value);
            }
            if let Some(word) = text {
                query = query.text(word);
            }
            if let Some((field, descending)) = order {
                query = query.order_by(field, descending);
            }
            query
        })
}

/// Checks that random batches and queries give the same results on the backend
/// as on [`MemoryViews`].
pub fn check_views_against_model<F, Fut>(factory: F, cases: u32)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ViewFixture>,
{
    let runtime = property_runtime();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    });
    let case = (
        prop::collection::vec(batch(), 1..4),
        prop::collection::vec(query(), 1..8),
    );
    let result = runner.run(&case, |(batches, queries)| {
        runtime
            .block_on(async {
                let fixture = factory().await;
                compare(&*fixture.views(), &batches, &queries).await
            })
            .map_err(TestCaseError::fail)
    });
    if let Err(failure) = result {
        panic!("the view store disagrees with the reference model (MemoryViews): {failure}");
    }
}

async fn compare(
    views: &dyn ViewStore,
    batches: &[Vec<(u8, Option<Value>)>],
    queries: &[Query],
) -> Result<(), String> {
    let model = MemoryViews::new();
    let declaration = Declaration {
        name: "things".to_owned(),
        kind: HandlerKind::Projection,
        collections: vec![collection()],
    };
    for store in [views, &model as &dyn ViewStore] {
        store
            .register(&declaration)
            .await
            .map_err(|error| error.to_string())?;
        for (index, batch) in batches.iter().enumerate() {
            let mut commit = ViewCommit::new(
                "things",
                1,
                Position(index as u64),
                Position(index as u64 + 1),
            );
            commit.changes = batch
                .iter()
                .map(|(key, document)| {
                    let key = format!("k{key:02}");
                    match document {
                        Some(document) => Change::put("things", &key, document),
                        None => Change::Delete {
                            collection: "things".to_owned(),
                            key,
                        },
                    }
                })
                .collect();
            store
                .commit(commit)
                .await
                .map_err(|error| error.to_string())?;
        }
    }
    for query in queries {
        let expected = all_pages(&model, query).await;
        let actual = all_pages(views, query).await;
        if actual != expected {
            return Err(format!(
                "query {query:?}\n  backend: {actual:?}\n  model:   {expected:?}"
            ));
        }
    }
    Ok(())
}

/// Every page of a query, read through its cursors, or the error's text.
async fn all_pages(views: &dyn ViewStore, query: &Query) -> Result<Vec<(String, Value)>, String> {
    let mut items = Vec::new();
    let mut query = query.clone();
    for _ in 0..100 {
        let page = views
            .query("things", &query)
            .await
            .map_err(|error| error.to_string())?;
        if page.items.len() > query.limit {
            return Err(format!(
                "a page of {} for a limit of {}",
                page.items.len(),
                query.limit
            ));
        }
        items.extend(page.items);
        match page.next {
            Some(cursor) => query = query.after(cursor),
            None => return Ok(items),
        }
    }
    Err("more than 100 pages: the cursor does not advance".to_owned())
}
