//! Applying one batch in the caller's transaction: the checks, the documents,
//! the projection's own SQL, the checkpoint, parked events and a generation
//! switch, all or nothing.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use diptych_core::backend_kit::{field_value, verify_commit_against, words};
use diptych_core::{Change, CollectionSpec, Position, ViewCommit, ViewError};
use tokio_postgres::types::ToSql;

use super::catalog::{read_stored, to_sql};
use super::errors::{describe, failure as backend};
use super::query::MAX_WORD_BYTES;
use super::sql::{parameters, substitute_tables};
use super::tables::{drop_sql, table_name};

/// Applies a batch; returns the served generation's new checkpoint if the batch
/// was on it. `channel` is notified when that checkpoint moves.
pub(crate) async fn apply(
    transaction: &impl GenericClient,
    commit: &ViewCommit,
    channel: &str,
) -> Result<Option<Position>, ViewError> {
    // Locking the projection's row makes a second writer wait here, then see
    // the checkpoint the first one wrote and be refused.
    let stored = read_stored(transaction, &commit.projection, true).await?;
    let record = &stored.record;
    verify_commit_against(commit, record)?;
    record_received(transaction, commit).await?;
    let generation = commit.generation;
    let tables: BTreeMap<&str, Table<'_>> = record
        .collections
        .iter()
        .filter_map(|spec| {
            let id = *stored.ids.get(&spec.name)?;
            Some((
                spec.name.as_str(),
                Table {
                    spec,
                    id,
                    generation,
                },
            ))
        })
        .collect();
    let mut documents = Documents::default();
    for change in &commit.changes {
        match change {
            Change::Put {
                collection,
                key,
                json,
            } => {
                documents.add(table_of(&tables, collection)?, key, Some(json))?;
            }
            Change::Delete { collection, key } => {
                documents.add(table_of(&tables, collection)?, key, None)?;
            }
            Change::Sql {
                statement,
                parameters,
            } => {
                // The projection's SQL sees the documents changed before it.
                documents.write(transaction).await?;
                run_sql(transaction, &tables, statement, parameters).await?;
            }
        }
    }
    documents.write(transaction).await?;
    let projection = commit.projection.as_str();
    // Guarded by the batch's starting checkpoint as well as by the row lock taken
    // above, so the refusal of a stale batch does not rest on the isolation level.
    let moved = execute(
        transaction,
        "writing a checkpoint",
        "UPDATE checkpoints SET position = $3 \
         WHERE projection = $1 AND generation = $2 AND position = $4",
        &[
            &projection,
            &to_sql(generation),
            &to_sql(commit.checkpoint.0),
            &to_sql(commit.from.0),
        ],
    )
    .await?;
    if moved != 1 {
        return Err(ViewError::CheckpointMoved {
            projection: commit.projection.clone(),
            generation,
            expected: commit.from.0,
            actual: read_stored(transaction, projection, false)
                .await
                .map_or(0, |stored| stored.record.position.0),
        });
    }
    for parked in &commit.parked {
        execute(
            transaction,
            "parking an event",
            "INSERT INTO parked (projection, generation, position, stream, event_type, error,
                                 attempts, parked_at, retry_requested)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (projection, generation, position) DO UPDATE SET
                 stream = excluded.stream, event_type = excluded.event_type,
                 error = excluded.error, attempts = excluded.attempts,
                 parked_at = excluded.parked_at, retry_requested = excluded.retry_requested",
            &[
                &projection,
                &to_sql(generation),
                &to_sql(parked.position.0),
                &parked.stream,
                &parked.event_type,
                &parked.error,
                &i64::from(parked.attempts),
                &parked.parked_at.as_unix_micros(),
                &parked.retry_requested,
            ],
        )
        .await?;
    }
    if !commit.resolved.is_empty() {
        let positions: Vec<i64> = commit.resolved.iter().map(|p| to_sql(p.0)).collect();
        execute(
            transaction,
            "resolving parked events",
            "DELETE FROM parked WHERE projection = $1 AND generation = $2 AND position = ANY($3)",
            &[&projection, &to_sql(generation), &positions],
        )
        .await?;
    }
    if commit.switch {
        switch(transaction, projection, generation, &stored).await?;
    }
    let served = commit.switch || generation == record.generation;
    if commit.switch || (served && commit.checkpoint != record.position) {
        // Delivered at commit: wakes `wait_for` in every process.
        execute(
            transaction,
            "notifying a checkpoint",
            "SELECT pg_notify($1, $2)",
            &[&channel, &projection],
        )
        .await?;
    }
    Ok(served.then_some(commit.checkpoint))
}

/// Makes the rebuilt generation the served one and drops the old one, with its
/// checkpoint and parked events: the new generation tried every event itself.
async fn switch(
    transaction: &impl GenericClient,
    projection: &str,
    generation: u64,
    stored: &super::catalog::Stored,
) -> Result<(), ViewError> {
    let old = to_sql(stored.record.generation);
    execute(
        transaction,
        "switching generations",
        "UPDATE projections SET generation = $2, rebuild_generation = NULL WHERE name = $1",
        &[&projection, &to_sql(generation)],
    )
    .await?;
    for sql in [
        "DELETE FROM checkpoints WHERE projection = $1 AND generation = $2",
        "DELETE FROM parked WHERE projection = $1 AND generation = $2",
    ] {
        execute(
            transaction,
            "switching generations",
            sql,
            &[&projection, &old],
        )
        .await?;
    }
    let drops: String = stored
        .ids
        .values()
        .map(|id| drop_sql(*id, stored.record.generation))
        .collect();
    transaction
        .batch_execute(&drops)
        .await
        .map_err(|error| backend("dropping the replaced generation", error).into())
}

async fn execute(
    transaction: &impl GenericClient,
    context: &str,
    sql: &str,
    parameters: &[&(dyn ToSql + Sync)],
) -> Result<u64, ViewError> {
    let statement = transaction
        .prepare_cached(sql)
        .await
        .map_err(|error| backend(context, error))?;
    transaction
        .execute(&statement, parameters)
        .await
        .map_err(|error| backend(context, error).into())
}

/// A collection's table in the batch's generation.
#[derive(Clone, Copy)]
struct Table<'a> {
    spec: &'a CollectionSpec,
    id: i64,
    generation: u64,
}

fn table_of<'a>(
    tables: &BTreeMap<&str, Table<'a>>,
    collection: &str,
) -> Result<Table<'a>, ViewError> {
    tables
        .get(collection)
        .copied()
        .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))
}

/// Runs the projection's own statement, `{collection}` naming the batch's
/// generation of that collection.
async fn run_sql(
    transaction: &impl GenericClient,
    tables: &BTreeMap<&str, Table<'_>>,
    statement: &str,
    values: &[serde_json::Value],
) -> Result<(), ViewError> {
    let names = tables
        .iter()
        .map(|(name, table)| ((*name).to_owned(), table_name(table.id, table.generation)))
        .collect();
    let text = substitute_tables(statement, &names)?;
    let failed = |error: tokio_postgres::Error| {
        ViewError::InvalidQuery(format!("the projection's SQL failed: {}", describe(&error)))
    };
    let prepared = transaction.prepare_cached(&text).await.map_err(failed)?;
    let bound = parameters(values, prepared.params())?;
    let references: Vec<&(dyn ToSql + Sync)> = bound
        .iter()
        .map(|value| value.as_ref() as &(dyn ToSql + Sync))
        .collect();
    transaction
        .execute(&prepared, &references)
        .await
        .map_err(failed)?;
    Ok(())
}

/// Document changes not yet written: the last change to each key wins, so each
/// collection takes one DELETE and one INSERT however many changes it had.
#[derive(Default)]
struct Documents<'a> {
    by_table: BTreeMap<i64, (Table<'a>, BTreeMap<&'a str, Option<Put<'a>>>)>,
}

struct Put<'a> {
    json: &'a str,
    /// The document's words, space-separated, for collections with text fields.
    words: Option<String>,
}

impl<'a> Documents<'a> {
    fn add(
        &mut self,
        table: Table<'a>,
        key: &'a str,
        json: Option<&'a str>,
    ) -> Result<(), ViewError> {
        let put = match json {
            None => None,
            Some(json) => Some(Put {
                json,
                words: document_words(table.spec, key, json)?,
            }),
        };
        self.by_table
            .entry(table.id)
            .or_insert_with(|| (table, BTreeMap::new()))
            .1
            .insert(key, put);
        Ok(())
    }

    async fn write(&mut self, transaction: &impl GenericClient) -> Result<(), ViewError> {
        for (table, changes) in std::mem::take(&mut self.by_table).into_values() {
            write_table(transaction, table, &changes).await?;
        }
        Ok(())
    }
}

async fn write_table(
    transaction: &impl GenericClient,
    table: Table<'_>,
    changes: &BTreeMap<&str, Option<Put<'_>>>,
) -> Result<(), ViewError> {
    let name = table_name(table.id, table.generation);
    let collection = &table.spec.name;
    let deleted: Vec<&str> = changes
        .iter()
        .filter(|(_, put)| put.is_none())
        .map(|(key, _)| *key)
        .collect();
    if !deleted.is_empty() {
        execute(
            transaction,
            &format!("deleting documents of `{collection}`"),
            &format!("DELETE FROM {name} WHERE key = ANY($1)"),
            &[&deleted],
        )
        .await?;
    }
    let puts: Vec<(&str, &Put<'_>)> = changes
        .iter()
        .filter_map(|(key, put)| Some((*key, put.as_ref()?)))
        .collect();
    if puts.is_empty() {
        return Ok(());
    }
    let keys: Vec<&str> = puts.iter().map(|(key, _)| *key).collect();
    let jsons: Vec<&str> = puts.iter().map(|(_, put)| put.json).collect();
    let written = if table.spec.text_fields.is_empty() {
        let sql = format!(
            "INSERT INTO {name} (key, doc)
             SELECT k, d::jsonb FROM unnest($1::text[], $2::text[]) AS u(k, d)
             ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
        );
        prepared_execute(transaction, &sql, &[&keys, &jsons]).await
    } else {
        let words: Vec<&str> = puts
            .iter()
            .map(|(_, put)| put.words.as_deref().unwrap_or(""))
            .collect();
        let sql = format!(
            "INSERT INTO {name} (key, doc, words)
             SELECT k, d::jsonb, array_to_tsvector(string_to_array(w, ' '))
             FROM unnest($1::text[], $2::text[], $3::text[]) AS u(k, d, w)
             ON CONFLICT (key) DO UPDATE SET doc = excluded.doc, words = excluded.words"
        );
        prepared_execute(transaction, &sql, &[&keys, &jsons, &words]).await
    };
    written.map_err(|error| unstorable(collection, &puts, error))?;
    Ok(())
}

async fn prepared_execute(
    transaction: &impl GenericClient,
    sql: &str,
    parameters: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let statement = transaction.prepare_cached(sql).await?;
    transaction.execute(&statement, parameters).await
}

/// The error for documents PostgreSQL refused: names the document when it can
/// be found (invalid JSON, or a NUL character, which `jsonb` cannot hold).
fn unstorable(
    collection: &str,
    puts: &[(&str, &Put<'_>)],
    error: tokio_postgres::Error,
) -> ViewError {
    let is_data_error = error
        .as_db_error()
        .is_some_and(|db| db.code().code().starts_with("22"));
    if is_data_error {
        for (key, put) in puts {
            let reason = match serde_json::from_str::<serde_json::Value>(put.json) {
                Err(error) => error.to_string(),
                Ok(_) if put.json.contains("\\u0000") => {
                    "PostgreSQL cannot store the character U+0000 in a document; remove it"
                        .to_owned()
                }
                Ok(_) => continue,
            };
            return ViewError::Document {
                collection: collection.to_owned(),
                key: (*key).to_owned(),
                reason,
            };
        }
    }
    backend(format!("writing documents of `{collection}`"), error).into()
}

/// The words full-text search finds in a document: those of its text fields,
/// as `words` splits them (a field that is not a string counts as its JSON
/// text; null or missing as nothing).
fn document_words(
    spec: &CollectionSpec,
    key: &str,
    json: &str,
) -> Result<Option<String>, ViewError> {
    if spec.text_fields.is_empty() {
        return Ok(None);
    }
    let document: serde_json::Value =
        serde_json::from_str(json).map_err(|error| ViewError::Document {
            collection: spec.name.clone(),
            key: key.to_owned(),
            reason: error.to_string(),
        })?;
    let mut found = String::new();
    for field in &spec.text_fields {
        let text = match field_value(&document, field) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
        };
        for word in words(&text).filter(|word| word.len() <= MAX_WORD_BYTES) {
            if !found.is_empty() {
                found.push(' ');
            }
            found.push_str(&word);
        }
    }
    Ok(Some(found))
}

/// Records the batch's received events; one already recorded refuses the batch.
async fn record_received(
    transaction: &impl GenericClient,
    commit: &ViewCommit,
) -> Result<(), ViewError> {
    if commit.received.is_empty() {
        return Ok(());
    }
    let row = transaction
        .query_one(
            "WITH new AS (
                 INSERT INTO received (projection, event_id)
                 SELECT $1, id FROM unnest($2::uuid[]) AS id
                 ON CONFLICT DO NOTHING RETURNING event_id)
             SELECT array_agg(id) FROM unnest($2::uuid[]) AS id
             WHERE id NOT IN (SELECT event_id FROM new)",
            &[&commit.projection, &commit.received],
        )
        .await
        .map_err(|error| backend("recording received events", error))?;
    let repeated: Option<Vec<uuid::Uuid>> = row.get(0);
    match repeated.and_then(|ids| ids.into_iter().next()) {
        Some(event_id) => Err(ViewError::AlreadyReceived {
            projection: commit.projection.clone(),
            event_id,
        }),
        None => Ok(()),
    }
}
