//! The tables of a collection's generation: their names, their indexes, and the
//! expressions that order an indexed field exactly as the in-memory model does.
//!
//! A generation of a collection is a table `doc_<id>_<generation>` of `(key,
//! doc, words)`: the document as `jsonb`, and for collections with text fields
//! the words full-text search finds, as a `tsvector` with a GIN index. `<id>`
//! is the collection's number in the catalogue.

use std::fmt::Write as _;

use diptych_core::CollectionSpec;

/// The table holding a generation of the collection numbered `id`. A plain
/// identifier: no quoting needed.
pub(crate) fn table_name(id: i64, generation: u64) -> String {
    format!("doc_{id}_{generation}")
}

/// The SQL for a field of the document as `jsonb` (NULL when missing). Fields
/// are validated to letters, digits and `_` joined by `.`, so they are safe in
/// literals; `->` with a text key never indexes into an array, just as
/// `field_value` never does.
pub(crate) fn field_json(field: &str) -> String {
    let mut expression = String::from("doc");
    for segment in field.split('.') {
        let _ = write!(expression, "->'{segment}'::text");
    }
    expression
}

/// The expressions that order a JSON value as `MemoryViews` compares them:
/// first its type's rank (numbers and booleans 1, strings, arrays and objects 2;
/// NULL for JSON null or a missing field), then its number (booleans as 1 and
/// 0, exactly as `numeric`), then its text, byte by byte. Within one rank the
/// other column is NULL on every row, so ordering by all three is ordering by
/// the one that matters.
pub(crate) struct SortKey {
    pub rank: String,
    pub number: String,
    pub text: String,
}

impl SortKey {
    /// The sort key of a `jsonb` SQL expression.
    pub fn of(json: &str) -> Self {
        Self {
            rank: format!(
                "(CASE jsonb_typeof({json}) WHEN 'number' THEN 1 WHEN 'boolean' THEN 1 \
                 WHEN 'string' THEN 2 WHEN 'array' THEN 2 WHEN 'object' THEN 2 END)"
            ),
            number: format!(
                "(CASE jsonb_typeof({json}) WHEN 'number' THEN ({json})::numeric \
                 WHEN 'boolean' THEN (CASE WHEN ({json})::boolean THEN 1 ELSE 0 END)::numeric END)"
            ),
            text: format!(
                "((CASE jsonb_typeof({json}) WHEN 'string' THEN ({json}) #>> '{{}}' \
                 WHEN 'array' THEN ({json})::text WHEN 'object' THEN ({json})::text END) \
                 COLLATE \"C\")"
            ),
        }
    }

    /// The sort key of a document's field.
    pub fn of_field(field: &str) -> Self {
        Self::of(&field_json(field))
    }
}

/// Creates a generation's table and its indexes, those already there left as
/// they are (a new index is built over the documents already stored).
pub(crate) fn create_sql(spec: &CollectionSpec, id: i64, generation: u64) -> String {
    let table = table_name(id, generation);
    // Keys sort byte by byte, as the model's strings do.
    let mut ddl = format!(
        "CREATE TABLE IF NOT EXISTS {table} (
             key   text COLLATE \"C\" PRIMARY KEY,
             doc   jsonb NOT NULL,
             words tsvector
         );"
    );
    if !spec.text_fields.is_empty() {
        let _ = write!(
            ddl,
            "CREATE INDEX IF NOT EXISTS {table}_words ON {table} USING gin (words);"
        );
    }
    for field in &spec.indexes {
        let key = SortKey::of_field(field);
        let _ = write!(
            ddl,
            "CREATE INDEX IF NOT EXISTS {table}_{} ON {table} ({}, {}, {}, key);",
            index_suffix(field),
            key.rank,
            key.number,
            key.text
        );
    }
    ddl
}

/// Drops a generation's table, with its indexes.
pub(crate) fn drop_sql(id: i64, generation: u64) -> String {
    format!("DROP TABLE IF EXISTS {};", table_name(id, generation))
}

/// A short, stable suffix naming a field's index: field paths are up to 64
/// bytes and may hold `.`, so the name carries a hash of the path (FNV-1a)
/// instead, which keeps `IF NOT EXISTS` keyed on the field whatever the order
/// of a declaration's indexes.
fn index_suffix(field: &str) -> String {
    let hash = field.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("f{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_fit_an_identifier_and_differ_by_field() {
        let spec = CollectionSpec::new("c")
            .index("a".repeat(64))
            .index("address.zip")
            .index("address_zip");
        let ddl = create_sql(&spec, i64::MAX, u64::MAX);
        let names: Vec<&str> = ddl
            .split("CREATE INDEX IF NOT EXISTS ")
            .skip(1)
            .map(|rest| rest.split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(names.len(), 3);
        assert!(names.iter().all(|name| name.len() <= 63), "{names:?}");
        assert_ne!(names[1], names[2]);
    }

    #[test]
    fn fields_are_read_by_key_segment() {
        assert_eq!(
            field_json("address.zip"),
            "doc->'address'::text->'zip'::text"
        );
    }
}
