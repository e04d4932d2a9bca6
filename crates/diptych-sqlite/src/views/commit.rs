//! Applying one batch in the writer's transaction: the checks, the received
//! ids, the documents and their text rows, the projection's SQL, the
//! checkpoint, parked events and a generation switch, all or nothing.

use std::collections::BTreeMap;

use diptych_core::backend_kit::{field_value, substitute_tables, verify_commit_against};
use diptych_core::{Change, CollectionSpec, Document, Position, ViewCommit, ViewError};
use rusqlite::types::Value as SqlValue;
use rusqlite::{OptionalExtension, Transaction, params, params_from_iter};

use super::catalog::read_record;
use super::query::to_sql_value;
use super::tables::{drop_tables, table_name, text_table_name};
use crate::error::backend;
use crate::rows::to_sql_int;

/// Applies a batch; returns the served generation's new checkpoint, if it moved.
pub(super) fn apply_commit(
    transaction: &Transaction<'_>,
    commit: ViewCommit,
) -> Result<Option<Position>, ViewError> {
    let record = read_record(transaction, &commit.projection)?;
    verify_commit_against(&commit, &record)?;
    record_received(transaction, &commit)?;
    let generation = commit.generation;
    let writers: BTreeMap<&str, CollectionWriter<'_>> = record
        .collections
        .iter()
        .map(|spec| (spec.name.as_str(), CollectionWriter::new(spec, generation)))
        .collect();
    let writer_of = |collection: &str| {
        writers
            .get(collection)
            .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))
    };
    for change in &commit.changes {
        match change {
            Change::Put {
                collection,
                key,
                json,
            } => writer_of(collection)?.put(transaction, key, json)?,
            Change::Delete { collection, key } => {
                writer_of(collection)?.delete(transaction, key)?
            }
            Change::Sql {
                statement,
                parameters,
            } => {
                let tables = writers
                    .keys()
                    .map(|name| ((*name).to_owned(), table_name(name, generation)))
                    .collect();
                let statement = substitute_tables(statement, &tables)?;
                let values = parameters.iter().map(to_sql_value).collect::<Vec<_>>();
                transaction
                    .execute(&statement, params_from_iter(values))
                    .map_err(|error| {
                        ViewError::InvalidQuery(format!("the projection's SQL failed: {error}"))
                    })?;
            }
        }
    }
    let projection = &commit.projection;
    let sql_error = |error| backend("writing a checkpoint", error);
    transaction
        .prepare_cached(
            "UPDATE checkpoints SET position = ?3 WHERE projection = ?1 AND generation = ?2",
        )
        .and_then(|mut statement| {
            statement.execute(params![
                projection,
                to_sql_int(generation),
                to_sql_int(commit.checkpoint.0)
            ])
        })
        .map_err(sql_error)?;
    for parked in &commit.parked {
        transaction
            .prepare_cached(
                "INSERT OR REPLACE INTO parked (projection, generation, position, stream,
                     event_type, error, attempts, parked_at, retry_requested)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    projection,
                    to_sql_int(generation),
                    to_sql_int(parked.position.0),
                    parked.stream,
                    parked.event_type,
                    parked.error,
                    parked.attempts,
                    parked.parked_at.as_unix_micros(),
                    parked.retry_requested
                ])
            })
            .map_err(|error| backend("parking an event", error))?;
    }
    for position in &commit.resolved {
        transaction
            .execute(
                "DELETE FROM parked WHERE projection = ?1 AND generation = ?2 AND position = ?3",
                params![projection, to_sql_int(generation), to_sql_int(position.0)],
            )
            .map_err(|error| backend("resolving a parked event", error))?;
    }
    if commit.switch {
        transaction
            .execute(
                "UPDATE projections SET generation = ?2, rebuild_generation = NULL WHERE name = ?1",
                params![projection, to_sql_int(generation)],
            )
            .and_then(|_| {
                transaction.execute(
                    "DELETE FROM checkpoints WHERE projection = ?1 AND generation = ?2",
                    params![projection, to_sql_int(record.generation)],
                )
            })
            .and_then(|_| {
                // The old generation's parked events go with it: the new one has
                // tried every event itself and parked its own.
                transaction.execute(
                    "DELETE FROM parked WHERE projection = ?1 AND generation = ?2",
                    params![projection, to_sql_int(record.generation)],
                )
            })
            .map_err(|error| backend("switching generations", error))?;
        for spec in &record.collections {
            drop_tables(transaction, &spec.name, record.generation)?;
        }
    }
    let served = commit.switch || generation == record.generation;
    Ok(served.then_some(commit.checkpoint))
}

/// Writes one collection's generation, with its statements' text built once per
/// commit rather than once per document.
pub(super) struct CollectionWriter<'a> {
    spec: &'a CollectionSpec,
    upsert: String,
    delete: String,
    /// For collections with text fields: the FTS statements.
    text: Option<TextStatements>,
}

pub(super) struct TextStatements {
    delete: String,
    insert: String,
}

impl<'a> CollectionWriter<'a> {
    fn new(spec: &'a CollectionSpec, generation: u64) -> Self {
        let table = table_name(&spec.name, generation);
        if spec.text_fields.is_empty() {
            return Self {
                spec,
                upsert: format!(
                    "INSERT INTO {table} (key, doc) VALUES (?1, ?2)
                     ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
                ),
                delete: format!("DELETE FROM {table} WHERE key = ?1"),
                text: None,
            };
        }
        let text_table = text_table_name(&spec.name, generation);
        let columns = (0..spec.text_fields.len())
            .map(|index| format!("f{index}"))
            .collect::<Vec<_>>()
            .join(", ");
        let placeholders = (0..spec.text_fields.len())
            .map(|index| format!("?{}", index + 2))
            .collect::<Vec<_>>()
            .join(", ");
        Self {
            spec,
            upsert: format!(
                "INSERT INTO {table} (key, doc) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET doc = excluded.doc RETURNING rowid"
            ),
            delete: format!("DELETE FROM {table} WHERE key = ?1 RETURNING rowid"),
            text: Some(TextStatements {
                delete: format!("DELETE FROM {text_table} WHERE rowid = ?1"),
                insert: format!(
                    "INSERT INTO {text_table} (rowid, {columns}) VALUES (?1, {placeholders})"
                ),
            }),
        }
    }

    fn put(&self, transaction: &Transaction<'_>, key: &str, json: &str) -> Result<(), ViewError> {
        let failed = |error| backend(format!("writing `{key}` in `{}`", self.spec.name), error);
        let Some(text) = &self.text else {
            transaction
                .prepare_cached(&self.upsert)
                .and_then(|mut statement| statement.execute(params![key, json]))
                .map_err(failed)?;
            return Ok(());
        };
        let rowid: i64 = transaction
            .prepare_cached(&self.upsert)
            .and_then(|mut statement| statement.query_row(params![key, json], |row| row.get(0)))
            .map_err(failed)?;
        let document: Document =
            serde_json::from_str(json).map_err(|error| ViewError::Document {
                collection: self.spec.name.clone(),
                key: key.to_owned(),
                reason: error.to_string(),
            })?;
        let mut values = vec![SqlValue::Integer(rowid)];
        values.extend(self.spec.text_fields.iter().map(|field| {
            match field_value(&document, field) {
                Some(serde_json::Value::String(text)) => SqlValue::Text(text.clone()),
                Some(serde_json::Value::Null) | None => SqlValue::Null,
                Some(other) => SqlValue::Text(other.to_string()),
            }
        }));
        transaction
            .prepare_cached(&text.delete)
            .and_then(|mut statement| statement.execute([rowid]))
            .and_then(|_| {
                transaction
                    .prepare_cached(&text.insert)?
                    .execute(params_from_iter(values))
            })
            .map_err(failed)?;
        Ok(())
    }

    fn delete(&self, transaction: &Transaction<'_>, key: &str) -> Result<(), ViewError> {
        let failed = |error| backend(format!("deleting `{key}` in `{}`", self.spec.name), error);
        let Some(text) = &self.text else {
            transaction
                .prepare_cached(&self.delete)
                .and_then(|mut statement| statement.execute([key]))
                .map_err(failed)?;
            return Ok(());
        };
        let rowid: Option<i64> = transaction
            .prepare_cached(&self.delete)
            .and_then(|mut statement| statement.query_row([key], |row| row.get(0)).optional())
            .map_err(failed)?;
        if let Some(rowid) = rowid {
            transaction
                .prepare_cached(&text.delete)
                .and_then(|mut statement| statement.execute([rowid]))
                .map_err(failed)?;
        }
        Ok(())
    }
}

/// Records the batch's received events; one already recorded refuses the batch.
pub(super) fn record_received(
    transaction: &Transaction<'_>,
    commit: &ViewCommit,
) -> Result<(), ViewError> {
    let mut insert = transaction
        .prepare_cached("INSERT INTO received (projection, event_id) VALUES (?1, ?2)")
        .map_err(|error| backend("recording received events", error))?;
    for event_id in &commit.received {
        match insert.execute(params![commit.projection, event_id.as_bytes().as_slice()]) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(ViewError::AlreadyReceived {
                    projection: commit.projection.clone(),
                    event_id: *event_id,
                });
            }
            Err(error) => return Err(backend("recording received events", error).into()),
        }
    }
    Ok(())
}
