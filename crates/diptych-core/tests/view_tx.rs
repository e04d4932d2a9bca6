//! A batch's buffered changes: the order they reach the view store in, and undo.

use std::sync::Arc;

use diptych_core::{Change, CollectionSpec, MemoryViews, ViewTx};
use serde_json::json;

fn batch() -> ViewTx {
    ViewTx::new(
        Arc::new(MemoryViews::new()),
        1,
        &[CollectionSpec::new("counts")],
    )
}

fn describe(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .map(|change| match change {
            Change::Put { key, json, .. } => format!("put {key}={json}"),
            Change::Delete { key, .. } => format!("delete {key}"),
            Change::Sql { statement, .. } => format!("sql {statement}"),
        })
        .collect()
}

#[test]
fn sql_statements_keep_their_place_among_document_changes() {
    let mut views = batch();
    views.put("counts", "a", &json!({ "n": 1 })).unwrap();
    views.put("counts", "a", &json!({ "n": 2 })).unwrap();
    views.execute_sql("UPDATE {counts} SET doc = json_set(doc, '$.n', 5)", vec![]);
    views.put("counts", "a", &json!({ "n": 3 })).unwrap();
    views.delete("counts", "b").unwrap();
    views.execute_sql("DELETE FROM {counts} WHERE key = 'c'", vec![]);
    assert_eq!(
        describe(&views.into_changes()),
        [
            r#"put a={"n":2}"#,
            "sql UPDATE {counts} SET doc = json_set(doc, '$.n', 5)",
            r#"put a={"n":3}"#,
            "delete b",
            "sql DELETE FROM {counts} WHERE key = 'c'",
        ]
    );
}

#[test]
fn rolling_back_undoes_statements_and_the_writes_around_them() {
    let mut views = batch();
    views.put("counts", "a", &json!(1)).unwrap();
    let mark = views.mark();
    views.put("counts", "b", &json!(2)).unwrap();
    views.execute_sql("UPDATE {counts} SET doc = 0", vec![]);
    views.put("counts", "a", &json!(3)).unwrap();
    views.rollback_to(mark);
    views.put("counts", "c", &json!(4)).unwrap();
    assert_eq!(describe(&views.into_changes()), ["put a=1", "put c=4"]);
}
