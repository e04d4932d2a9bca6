//! Running a validated query as one SQL statement, and the conversions between
//! JSON and SQLite values it needs.

use diptych_core::backend_kit::words;
use diptych_core::{CollectionSpec, Comparison, Order, Page, Query, ViewError};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, params_from_iter};

use super::catalog::decode_document;
use super::tables::{field_expression, table_name, text_table_name};
use crate::error::backend;

/// Runs a validated query as one SQL statement.
pub(super) fn run_query(
    connection: &Connection,
    spec: &CollectionSpec,
    generation: u64,
    query: &Query,
) -> Result<Page, ViewError> {
    let table = table_name(&spec.name, generation);
    let mut conditions: Vec<String> = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    let bind = |value: SqlValue, values: &mut Vec<SqlValue>| {
        values.push(value);
        format!("?{}", values.len())
    };
    for filter in &query.filters {
        let operator = match filter.comparison {
            Comparison::Eq => "=",
            Comparison::Lt => "<",
            Comparison::Le => "<=",
            Comparison::Gt => ">",
            Comparison::Ge => ">=",
        };
        let placeholder = bind(to_sql_value(&filter.value), &mut values);
        conditions.push(format!(
            "{} {operator} {placeholder}",
            field_expression(&filter.field)
        ));
    }
    if let Some(text) = &query.text {
        let terms: Vec<String> = words(text).map(|word| format!("\"{word}\"")).collect();
        if terms.is_empty() {
            return Err(ViewError::InvalidQuery(
                "the search text has no words".to_owned(),
            ));
        }
        let placeholder = bind(SqlValue::Text(terms.join(" ")), &mut values);
        let text_table = text_table_name(&spec.name, generation);
        conditions.push(format!(
            "rowid IN (SELECT rowid FROM {text_table} WHERE {text_table} MATCH {placeholder})"
        ));
    }
    let (sort, descending) = match &query.order {
        Order::ByKey => (None, false),
        Order::ByField { field, descending } => (Some(field_expression(field)), *descending),
    };
    if let Some(sort) = &sort {
        conditions.push(format!("{sort} IS NOT NULL"));
    }
    if let Some(cursor) = &query.cursor {
        let (sort_value, key) = cursor.decode(&query.order)?;
        let operator = if descending { "<" } else { ">" };
        let key_placeholder = bind(SqlValue::Text(key), &mut values);
        match (&sort, sort_value) {
            (Some(sort), Some(value)) => {
                let value_placeholder = bind(to_sql_value(&value), &mut values);
                conditions.push(format!(
                    "({sort}, key) {operator} ({value_placeholder}, {key_placeholder})"
                ));
            }
            _ => conditions.push(format!("key {operator} {key_placeholder}")),
        }
    }
    let direction = if descending { "DESC" } else { "ASC" };
    let order_by = match &sort {
        Some(sort) => format!("{sort} {direction}, key {direction}"),
        None => format!("key {direction}"),
    };
    let where_clause = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let limit = bind(
        SqlValue::Integer(i64::try_from(query.limit.saturating_add(1)).unwrap_or(i64::MAX)),
        &mut values,
    );
    let sql =
        format!("SELECT key, doc FROM {table} {where_clause} ORDER BY {order_by} LIMIT {limit}");
    let failed = |error| backend(format!("querying `{}`", spec.name), error);
    let mut statement = connection.prepare_cached(&sql).map_err(failed)?;
    let rows = statement
        .query_map(params_from_iter(values), |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(failed)?;
    let more = rows.len() > query.limit;
    let items = rows
        .into_iter()
        .take(query.limit)
        .map(|(key, doc)| Ok((decode_document(&spec.name, &key, &doc)?, key)))
        .map(|item| item.map(|(document, key)| (key, document)))
        .collect::<Result<Vec<_>, ViewError>>()?;
    Ok(Page::of(items, more, &query.order))
}

/// A JSON scalar as SQLite compares it with `json_extract`'s results.
pub(super) fn to_sql_value(value: &serde_json::Value) -> SqlValue {
    match value {
        serde_json::Value::Null => SqlValue::Null,
        serde_json::Value::Bool(flag) => SqlValue::Integer(i64::from(*flag)),
        serde_json::Value::Number(number) => match number.as_i64() {
            Some(integer) => SqlValue::Integer(integer),
            None => SqlValue::Real(number.as_f64().unwrap_or(f64::MAX)),
        },
        serde_json::Value::String(text) => SqlValue::Text(text.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

pub(super) fn from_sql_value(value: SqlValue) -> serde_json::Value {
    match value {
        SqlValue::Null => serde_json::Value::Null,
        SqlValue::Integer(integer) => integer.into(),
        SqlValue::Real(real) => serde_json::Number::from_f64(real)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        SqlValue::Text(text) => text.into(),
        SqlValue::Blob(bytes) => bytes.into_iter().map(serde_json::Value::from).collect(),
    }
}
