//! The tables of a collection's generation: names, creation with their
//! expression indexes and FTS5 mirror, and dropping.

use std::fmt::Write as _;

use diptych_core::{CollectionSpec, ViewError};
use rusqlite::Transaction;

use crate::error::backend;

/// The table holding a collection's generation.
pub(super) fn table_name(collection: &str, generation: u64) -> String {
    format!("\"doc:{collection}:{generation}\"")
}

/// The FTS5 table mirroring a collection's text fields.
pub(super) fn text_table_name(collection: &str, generation: u64) -> String {
    format!("\"fts:{collection}:{generation}\"")
}

/// The expression an index on `field` is built on; queries use the same text so
/// SQLite uses the index. Fields are validated to letters, digits, `_` and `.`.
pub(super) fn field_expression(field: &str) -> String {
    format!("json_extract(doc, '$.{field}')")
}

pub(super) fn create_tables(
    transaction: &Transaction<'_>,
    spec: &CollectionSpec,
    generation: u64,
) -> Result<(), ViewError> {
    let table = table_name(&spec.name, generation);
    // Documents searched by text need a rowid to key their FTS rows; the others are
    // stored by key alone, one b-tree per write instead of two.
    let mut ddl = if spec.text_fields.is_empty() {
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (key TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;"
        )
    } else {
        let columns = (0..spec.text_fields.len())
            .map(|index| format!("f{index}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (key TEXT NOT NULL UNIQUE, doc TEXT NOT NULL);
             CREATE VIRTUAL TABLE IF NOT EXISTS {} USING fts5({columns}, tokenize = 'unicode61 remove_diacritics 0');",
            text_table_name(&spec.name, generation)
        )
    };
    for field in &spec.indexes {
        let _ = write!(
            ddl,
            "CREATE INDEX IF NOT EXISTS \"idx:{}:{generation}:{field}\" ON {table} ({});",
            spec.name,
            field_expression(field)
        );
    }
    transaction
        .execute_batch(&ddl)
        .map_err(|error| backend(format!("creating the tables of `{}`", spec.name), error).into())
}

pub(super) fn drop_tables(
    transaction: &Transaction<'_>,
    collection: &str,
    generation: u64,
) -> Result<(), ViewError> {
    transaction
        .execute_batch(&format!(
            "DROP TABLE IF EXISTS {}; DROP TABLE IF EXISTS {};",
            table_name(collection, generation),
            text_table_name(collection, generation)
        ))
        .map_err(|error| {
            backend(
                format!("dropping an old generation of `{collection}`"),
                error,
            )
            .into()
        })
}
