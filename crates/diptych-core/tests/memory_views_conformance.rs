//! The view store and projection suite against the in-memory stores, the
//! reference models themselves.

use std::sync::Arc;

use diptych_core::testkit::ViewFixture;
use diptych_core::{MemoryStore, MemoryViews};

diptych_core::view_store_conformance!(|| async {
    ViewFixture::new(Arc::new(MemoryStore::new()), Arc::new(MemoryViews::new()))
});

/// The in-memory store has no SQL: a batch carrying a statement is refused whole,
/// with an error saying where such a projection can be tested.
#[tokio::test]
async fn memory_views_refuse_sql_and_write_nothing() {
    use diptych_core::{
        Change, CollectionSpec, Declaration, HandlerKind, Position, ViewCommit, ViewError,
        ViewStore,
    };
    let views = MemoryViews::new();
    views
        .register(&Declaration {
            name: "counts".to_owned(),
            kind: HandlerKind::Projection,
            collections: vec![CollectionSpec::new("counts")],
        })
        .await
        .expect("registering");
    let mut commit = ViewCommit::new("counts", 1, Position::START, Position(1));
    commit.changes = vec![
        Change::put("counts", "a", &serde_json::json!(1)),
        Change::Sql {
            statement: "UPDATE {counts} SET doc = 2".to_owned(),
            parameters: vec![],
        },
    ];
    let error = views.commit(commit).await.expect_err("refused");
    assert!(
        matches!(&error, ViewError::Unsupported(text) if text.contains("SQLite")),
        "{error}"
    );
    assert_eq!(views.get("counts", "a").await.expect("get"), None);
    assert_eq!(
        views.projection("counts").await.expect("record").position,
        Position::START
    );
}
