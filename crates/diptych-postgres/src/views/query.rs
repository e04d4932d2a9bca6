//! A view query as one SQL statement, with the model's semantics: filters and
//! ordering compare values by type rank, then number or text (see
//! `tables::SortKey`); full-text search matches whole words; ties are
//! broken by key so cursors page stably.

use deadpool_postgres::GenericClient;
use diptych_core::backend_kit::words;
use diptych_core::{Comparison, Cursor, Order, Page, Query, ViewError};
use serde_json::Value;
use tokio_postgres::types::ToSql;

use super::catalog::Served;
use super::errors::failure as backend;
use super::sql::Parameter;
use super::tables::SortKey;

/// The longest word a `tsvector` holds, in bytes; longer words are not indexed.
pub(crate) const MAX_WORD_BYTES: usize = 2046;

/// Runs a validated query over a served collection.
pub(crate) async fn run_query(
    client: &impl GenericClient,
    served: &Served,
    query: &Query,
) -> Result<Page, ViewError> {
    let mut sql = Statement::default();
    for filter in &query.filters {
        let condition = sql.filter(&filter.field, filter.comparison, &filter.value)?;
        sql.conditions.push(condition);
    }
    if let Some(text) = &query.text {
        let condition = sql.text(text)?;
        sql.conditions.push(condition);
    }
    let (sort, descending) = match &query.order {
        Order::ByKey => (None, false),
        Order::ByField { field, descending } => (Some(SortKey::of_field(field)), *descending),
    };
    if let Some(sort) = &sort {
        // A document without the field is left out when ordering by it.
        sql.conditions.push(format!("{} IS NOT NULL", sort.rank));
    }
    if let Some(cursor) = &query.cursor {
        let condition = sql.after(cursor, &query.order, sort.as_ref(), descending)?;
        sql.conditions.push(condition);
    }
    let direction = if descending { "DESC" } else { "ASC" };
    let order_by = match &sort {
        Some(sort) => format!(
            "{rank} {direction}, {number} {direction}, {text} {direction}, key {direction}",
            rank = sort.rank,
            number = sort.number,
            text = sort.text
        ),
        None => format!("key {direction}"),
    };
    let where_clause = if sql.conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", sql.conditions.join(" AND "))
    };
    // One more than a page, to know whether another follows.
    let limit = sql.bind(i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX));
    let text = format!(
        "SELECT key, doc FROM {} {where_clause} ORDER BY {order_by} LIMIT {limit}",
        served.table()
    );
    let failed = |error| backend(format!("querying `{}`", served.spec.name), error);
    let statement = client.prepare_cached(&text).await.map_err(failed)?;
    let parameters: Vec<&(dyn ToSql + Sync)> = sql
        .values
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = client
        .query(&statement, &parameters)
        .await
        .map_err(failed)?;
    let more = rows.len() > query.limit;
    let items: Vec<(String, Value)> = rows
        .iter()
        .take(query.limit)
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    Ok(Page::of(items, more, &query.order))
}

/// The parts of a statement being built: its conditions and their values.
#[derive(Default)]
struct Statement {
    conditions: Vec<String>,
    values: Vec<Parameter>,
}

impl Statement {
    /// Binds a value; returns its placeholder.
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.values.push(Box::new(value));
        format!("${}", self.values.len())
    }

    /// A scalar's rank and its placeholder, cast to compare with the column of
    /// that rank (a filter's value is a string, number or boolean).
    fn scalar(&mut self, value: &Value) -> Result<(u8, String), ViewError> {
        match value {
            Value::Bool(flag) => Ok((1, self.number(if *flag { "1" } else { "0" }))),
            Value::Number(number) => Ok((1, self.number(&number.to_string()))),
            Value::String(text) => Ok((2, self.bind(text.clone()))),
            other => Err(ViewError::InvalidQuery(format!(
                "{other} is not a string, number or boolean"
            ))),
        }
    }

    /// A number as an exact `numeric`, whatever its size.
    fn number(&mut self, text: &str) -> String {
        format!("{}::text::numeric", self.bind(text.to_owned()))
    }

    fn filter(
        &mut self,
        field: &str,
        comparison: Comparison,
        value: &Value,
    ) -> Result<String, ViewError> {
        let key = SortKey::of_field(field);
        let (rank, placeholder) = self.scalar(value)?;
        let column = if rank == 1 { &key.number } else { &key.text };
        let of_rank = format!("{} = {rank} AND {column}", key.rank);
        // Values of a lower rank are less than every value of a higher one; a
        // null or missing field (no rank) matches nothing.
        Ok(match comparison {
            Comparison::Eq => format!("({of_rank} = {placeholder})"),
            Comparison::Lt => format!("({} < {rank} OR {of_rank} < {placeholder})", key.rank),
            Comparison::Le => format!("({} < {rank} OR {of_rank} <= {placeholder})", key.rank),
            Comparison::Gt => format!("({} > {rank} OR {of_rank} > {placeholder})", key.rank),
            Comparison::Ge => format!("({} > {rank} OR {of_rank} >= {placeholder})", key.rank),
        })
    }

    /// Every word of `text` among the document's words.
    fn text(&mut self, text: &str) -> Result<String, ViewError> {
        let wanted: Vec<String> = words(text).collect();
        if wanted.is_empty() {
            return Err(ViewError::InvalidQuery(
                "the search text has no words".to_owned(),
            ));
        }
        if let Some(long) = wanted.iter().find(|word| word.len() > MAX_WORD_BYTES) {
            return Err(ViewError::InvalidQuery(format!(
                "a word of {} bytes cannot be searched: PostgreSQL indexes words up to \
                 {MAX_WORD_BYTES} bytes",
                long.len()
            )));
        }
        // Quoted lexemes are taken as they are: no parsing, stemming or stop
        // words, so matching is exactly `words`' whole-word equality. Words hold
        // only letters and digits, so nothing needs escaping.
        let lexemes: Vec<String> = wanted.iter().map(|word| format!("'{word}'")).collect();
        let placeholder = self.bind(lexemes.join(" & "));
        Ok(format!("words @@ {placeholder}::text::tsquery"))
    }

    /// Only what sorts after the cursor's document (before it, descending).
    fn after(
        &mut self,
        cursor: &Cursor,
        order: &Order,
        sort: Option<&SortKey>,
        descending: bool,
    ) -> Result<String, ViewError> {
        let (value, key) = cursor.decode(order)?;
        let operator = if descending { "<" } else { ">" };
        let key = self.bind(key);
        let (Some(sort), Some(value)) = (sort, value) else {
            return Ok(format!("key {operator} {key}"));
        };
        let (rank, column, placeholder) = match &value {
            // Null sorts before everything.
            Value::Null => return Ok((if descending { "FALSE" } else { "TRUE" }).to_owned()),
            Value::Bool(_) | Value::Number(_) => {
                let (rank, placeholder) = self.scalar(&value)?;
                (rank, &sort.number, placeholder)
            }
            // Arrays and objects compare as PostgreSQL writes them, so the
            // cursor's value goes through the same expression as the column's.
            Value::String(_) | Value::Array(_) | Value::Object(_) => {
                let json = format!("{}::jsonb", self.bind(value.clone()));
                (2, &sort.text, SortKey::of(&json).text)
            }
        };
        Ok(format!(
            "({r} {operator} {rank} OR ({r} = {rank} AND ({column}, key) {operator} ({placeholder}, {key})))",
            r = sort.rank
        ))
    }
}
