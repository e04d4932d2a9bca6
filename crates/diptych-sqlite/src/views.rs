//! [`SqliteViews`]: views, checkpoints and parked events in their own SQLite file.
//!
//! The view file is separate from the event store's, as the two sides may live on
//! different machines. Each collection's generation is a table of `(key, doc)` with
//! the document as JSON text; a declared index is an expression index on
//! `json_extract(doc, '$.field')`, and the queries use the same expression so
//! SQLite picks the index. Full-text fields are copied into an FTS5 table keyed by
//! the document's rowid, kept in step by every put and delete.
//!
//! One connection writes, behind a mutex, on tokio's blocking threads: each
//! projection commits a whole batch per transaction, so there is little to group.
//! `synchronous=NORMAL` in WAL mode: a power loss may lose the last commits, but
//! each loses its checkpoint with its changes, so the runner simply applies those
//! events again. Reads run in one read transaction each on their own connections,
//! so a query never sees a generation switch half done.

mod catalog;
mod commit;
mod query;
mod tables;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::backend_kit::group_position;
use diptych_core::backend_kit::split_partition_name;
use diptych_core::backend_kit::{
    CheckpointWatches, check_redeclaration, no_parked_event, refuse_process_manager, same_owner,
    substitute_tables,
};
use diptych_core::{
    BackendError, Control, Declaration, Document, Page, ParkedEvent, Position, ProjectionRecord,
    Query, RebuildProgress, Timestamp, ViewCommit, ViewError, ViewStore,
};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Transaction, params, params_from_iter};
use tokio::sync::watch;

use crate::error::{OpenError, backend};
use crate::pool::{self, ReaderPool};
use crate::rows::to_sql_int;
use crate::schema;

use catalog::{decode_spec, read_document, read_record, served_collection, served_tables};
use commit::apply_commit;
use query::{from_sql_value, run_query, to_sql_value};
use tables::{create_tables, drop_tables};

/// Views, checkpoints and parked events on one SQLite file.
pub struct SqliteViews {
    path: PathBuf,
    /// Taken before a write goes to the blocking pool, so concurrent commits
    /// wait as tasks, not as blocked threads.
    writer: Arc<tokio::sync::Mutex<Connection>>,
    readers: Arc<ReaderPool>,
    checkpoints: CheckpointWatches,
    controls: watch::Sender<u64>,
}

impl SqliteViews {
    /// Opens (creating if needed) the view database at `path`.
    ///
    /// Refuses, without writing anything, a file that is not a diptych view
    /// database (an event store, say) or whose schema is newer than this build's.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, OpenError> {
        let path = path.as_ref().to_owned();
        let mut connection = schema::open_file(&path)?;
        schema::VIEWS.check_identity(&connection, &path)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA cache_size = -65536;",
            )
            .and_then(|()| connection.busy_timeout(Duration::from_secs(5)))
            .map_err(|error| OpenError::Backend(backend("configuring the view database", error)))?;
        connection.set_prepared_statement_cache_capacity(256);
        schema::VIEWS.migrate(&mut connection)?;
        Ok(Self {
            readers: Arc::new(ReaderPool::new(path.clone(), pool::default_size())),
            path,
            writer: Arc::new(tokio::sync::Mutex::new(connection)),
            checkpoints: CheckpointWatches::default(),
            controls: watch::Sender::new(0),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The escape hatch for reads: runs a read-only statement over the served
    /// generations and returns each row as a JSON object of its columns. Write
    /// `{collection-name}` where a collection's table belongs; `{orders}` becomes
    /// the table of the served generation of `orders`.
    pub async fn query_sql(
        &self,
        statement: &str,
        parameters: Vec<serde_json::Value>,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, ViewError> {
        let statement = statement.to_owned();
        self.read(move |connection| {
            let transaction = connection
                .unchecked_transaction()
                .map_err(|error| backend("starting a read", error))?;
            let tables = served_tables(&transaction)?;
            let statement = substitute_tables(&statement, &tables)?;
            let mut prepared = transaction
                .prepare(&statement)
                .map_err(|error| ViewError::InvalidQuery(error.to_string()))?;
            let names: Vec<String> = prepared
                .column_names()
                .into_iter()
                .map(String::from)
                .collect();
            let values = parameters.iter().map(to_sql_value).collect::<Vec<_>>();
            let mut rows = prepared
                .query(params_from_iter(values))
                .map_err(|error| ViewError::InvalidQuery(error.to_string()))?;
            let mut result = Vec::new();
            while let Some(row) = rows
                .next()
                .map_err(|error| backend("reading a row", error))?
            {
                let mut object = serde_json::Map::new();
                for (index, name) in names.iter().enumerate() {
                    let value: SqlValue = row
                        .get(index)
                        .map_err(|error| backend("reading a column", error))?;
                    object.insert(name.clone(), from_sql_value(value));
                }
                result.push(object);
            }
            Ok(result)
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Connection) -> Result<T, ViewError> + Send + 'static,
    ) -> Result<T, ViewError> {
        self.readers.run(work).await
    }

    async fn write<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> Result<T, ViewError> + Send + 'static,
    ) -> Result<T, ViewError> {
        let mut connection = Arc::clone(&self.writer).lock_owned().await;
        tokio::task::spawn_blocking(move || {
            let transaction = connection
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|error| backend("starting a write", error))?;
            let result = work(&transaction)?;
            transaction
                .commit()
                .map_err(|error| backend("committing views", error))?;
            Ok(result)
        })
        .await
        .map_err(|error| {
            ViewError::Backend(BackendError::with_source("a write task failed", error))
        })?
    }
}

#[async_trait]
impl ViewStore for SqliteViews {
    async fn register(&self, declaration: &Declaration) -> Result<ProjectionRecord, ViewError> {
        declaration.validate()?;
        let declaration = declaration.clone();
        let record = self
            .write(move |transaction| {
                let name = &declaration.name;
                for spec in &declaration.collections {
                    let stored: Option<(String, String)> = transaction
                        .query_row(
                            "SELECT projection, spec FROM collections WHERE name = ?1",
                            [&spec.name],
                            |row| Ok((row.get(0)?, row.get(1)?)),
                        )
                        .optional()
                        .map_err(|error| backend("reading collections", error))?;
                    let Some((owner, stored)) = stored else {
                        continue;
                    };
                    if !same_owner(&owner, name) {
                        return Err(ViewError::CollectionTaken {
                            collection: spec.name.clone(),
                            owner,
                        });
                    }
                    check_redeclaration(name, &decode_spec(&stored)?, spec)?;
                }
                let kind = declaration.kind.as_str();
                transaction
                    .execute(
                        "INSERT INTO projections (name, kind, generation) VALUES (?1, ?2, 1)
                         ON CONFLICT (name) DO UPDATE SET kind = excluded.kind",
                        params![name, kind],
                    )
                    .and_then(|_| {
                        transaction.execute(
                            "INSERT OR IGNORE INTO checkpoints (projection, generation, position)
                             VALUES (?1, 1, 0)",
                            [name],
                        )
                    })
                    .map_err(|error| backend("registering a projection", error))?;
                for spec in &declaration.collections {
                    let text = serde_json::to_string(spec).map_err(|error| {
                        BackendError::with_source("encoding a collection's declaration", error)
                    })?;
                    transaction
                        .execute(
                            "INSERT INTO collections (name, projection, spec) VALUES (?1, ?2, ?3)
                             ON CONFLICT (name) DO UPDATE SET spec = excluded.spec",
                            params![spec.name, name, text],
                        )
                        .map_err(|error| backend("registering a collection", error))?;
                }
                let record = read_record(transaction, name)?;
                for generation in std::iter::once(record.generation)
                    .chain(record.rebuild.map(|rebuild| rebuild.generation))
                {
                    for spec in &declaration.collections {
                        create_tables(transaction, spec, generation)?;
                    }
                }
                Ok(record)
            })
            .await?;
        Ok(record)
    }

    async fn projections(&self) -> Result<Vec<ProjectionRecord>, ViewError> {
        self.read(|connection| {
            let transaction = connection
                .unchecked_transaction()
                .map_err(|error| backend("starting a read", error))?;
            let names: Vec<String> = transaction
                .prepare_cached("SELECT name FROM projections ORDER BY name")
                .and_then(|mut statement| {
                    statement
                        .query_map([], |row| row.get(0))?
                        .collect::<Result<_, _>>()
                })
                .map_err(|error| backend("listing projections", error))?;
            names
                .iter()
                .map(|name| read_record(&transaction, name))
                .collect()
        })
        .await
    }

    async fn projection(&self, projection: &str) -> Result<ProjectionRecord, ViewError> {
        let projection = projection.to_owned();
        self.read(move |connection| {
            let transaction = connection
                .unchecked_transaction()
                .map_err(|error| backend("starting a read", error))?;
            read_record(&transaction, &projection)
        })
        .await
    }

    async fn owner_of(&self, collection: &str) -> Result<String, ViewError> {
        let collection = collection.to_owned();
        self.read(move |connection| {
            connection
                .prepare_cached("SELECT projection FROM collections WHERE name = ?1")
                .and_then(|mut statement| {
                    statement
                        .query_row([&collection], |row| row.get(0))
                        .optional()
                })
                .map_err(|error| backend("reading collections", error))?
                .ok_or(ViewError::UnknownCollection(collection))
        })
        .await
    }

    async fn served_position(&self, collection: &str) -> Result<Position, ViewError> {
        let collection = collection.to_owned();
        let (owner, position) = self
            .read(move |connection| {
                connection
                    .prepare_cached(
                        "SELECT p.name, k.position FROM collections c
                         JOIN projections p ON p.name = c.projection
                         JOIN checkpoints k ON k.projection = p.name AND k.generation = p.generation
                         WHERE c.name = ?1",
                    )
                    .and_then(|mut statement| {
                        statement
                            .query_row([&collection], |row| {
                                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                            })
                            .optional()
                    })
                    .map_err(|error| backend("reading a checkpoint", error))?
                    .ok_or(ViewError::UnknownCollection(collection))
            })
            .await?;
        if split_partition_name(&owner).is_some() {
            return group_position(self, &owner).await;
        }
        Ok(Position(position as u64))
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Document>, ViewError> {
        let (collection, key) = (collection.to_owned(), key.to_owned());
        self.read(move |connection| {
            let transaction = connection
                .unchecked_transaction()
                .map_err(|error| backend("starting a read", error))?;
            let (_, generation) = served_collection(&transaction, &collection)?;
            read_document(&transaction, &collection, generation, &key)
        })
        .await
    }

    async fn get_in(
        &self,
        collection: &str,
        generation: u64,
        key: &str,
    ) -> Result<Option<Document>, ViewError> {
        let (collection, key) = (collection.to_owned(), key.to_owned());
        self.read(move |connection| read_document(connection, &collection, generation, &key))
            .await
    }

    async fn query(&self, collection: &str, query: &Query) -> Result<Page, ViewError> {
        let (collection, query) = (collection.to_owned(), query.clone());
        self.read(move |connection| {
            let transaction = connection
                .unchecked_transaction()
                .map_err(|error| backend("starting a read", error))?;
            let (spec, generation) = served_collection(&transaction, &collection)?;
            query.validate(&spec)?;
            run_query(&transaction, &spec, generation, &query)
        })
        .await
    }

    async fn commit(&self, commit: ViewCommit) -> Result<(), ViewError> {
        let projection = commit.projection.clone();
        let served = self
            .write(move |transaction| apply_commit(transaction, commit))
            .await?;
        if let Some(position) = served {
            self.checkpoints.publish(&projection, position);
        }
        Ok(())
    }

    async fn begin_rebuild(&self, projection: &str) -> Result<RebuildProgress, ViewError> {
        let projection = projection.to_owned();
        self.write(move |transaction| {
            let record = read_record(transaction, &projection)?;
            refuse_process_manager(&projection, record.kind)?;
            if let Some(rebuild) = record.rebuild {
                return Ok(rebuild);
            }
            let generation = record.generation + 1;
            transaction
                .execute(
                    "UPDATE projections SET rebuild_generation = ?2, rebuild_requested = 0
                     WHERE name = ?1",
                    params![projection, to_sql_int(generation)],
                )
                .and_then(|_| {
                    transaction.execute(
                        "INSERT OR REPLACE INTO checkpoints (projection, generation, position)
                         VALUES (?1, ?2, 0)",
                        params![projection, to_sql_int(generation)],
                    )
                })
                .map_err(|error| backend("starting a rebuild", error))?;
            for spec in &record.collections {
                drop_tables(transaction, &spec.name, generation)?;
                create_tables(transaction, spec, generation)?;
            }
            Ok(RebuildProgress {
                generation,
                position: Position::START,
            })
        })
        .await
    }

    async fn control(&self, projection: &str, control: Control) -> Result<(), ViewError> {
        let projection = projection.to_owned();
        self.write(move |transaction| {
            let record = read_record(transaction, &projection)?;
            match control {
                Control::Pause => transaction.execute(
                    "UPDATE projections SET paused = 1 WHERE name = ?1",
                    [&projection],
                ),
                Control::Resume => transaction.execute(
                    "UPDATE projections SET paused = 0 WHERE name = ?1",
                    [&projection],
                ),
                Control::Rebuild => {
                    refuse_process_manager(&projection, record.kind)?;
                    transaction.execute(
                        "UPDATE projections SET rebuild_requested = 1
                         WHERE name = ?1 AND rebuild_generation IS NULL",
                        [&projection],
                    )
                }
                Control::Retry(position) | Control::Skip(position) => {
                    let statement = if matches!(control, Control::Retry(_)) {
                        "UPDATE parked SET retry_requested = 1
                         WHERE projection = ?1 AND generation = ?2 AND position = ?3"
                    } else {
                        "DELETE FROM parked
                         WHERE projection = ?1 AND generation = ?2 AND position = ?3"
                    };
                    let parked = params![
                        projection,
                        to_sql_int(record.generation),
                        to_sql_int(position.0)
                    ];
                    match transaction.execute(statement, parked) {
                        Ok(0) => return Err(no_parked_event(&projection, position)),
                        other => other,
                    }
                }
            }
            .map_err(|error| backend("recording an operator's request", error))?;
            Ok(())
        })
        .await?;
        self.controls.send_modify(|count| *count += 1);
        Ok(())
    }

    async fn set_stalled(&self, projection: &str, error: Option<String>) -> Result<(), ViewError> {
        let projection = projection.to_owned();
        self.write(move |transaction| {
            let changed = transaction
                .execute(
                    "UPDATE projections SET stalled = ?2 WHERE name = ?1",
                    params![projection, error],
                )
                .map_err(|error| backend("recording a stalled projection", error))?;
            if changed == 0 {
                return Err(ViewError::UnknownProjection(projection));
            }
            Ok(())
        })
        .await
    }

    async fn received(
        &self,
        projection: &str,
        event_ids: &[uuid::Uuid],
    ) -> Result<Vec<uuid::Uuid>, ViewError> {
        let (projection, event_ids) = (projection.to_owned(), event_ids.to_vec());
        self.read(move |connection| {
            let mut statement = connection
                .prepare_cached("SELECT 1 FROM received WHERE projection = ?1 AND event_id = ?2")
                .map_err(|error| backend("reading received events", error))?;
            let mut found = Vec::new();
            for id in event_ids {
                let seen = statement
                    .exists(params![projection, id.as_bytes().as_slice()])
                    .map_err(|error| backend("reading received events", error))?;
                if seen {
                    found.push(id);
                }
            }
            Ok(found)
        })
        .await
    }

    async fn parked(&self, projection: &str) -> Result<Vec<ParkedEvent>, ViewError> {
        let projection = projection.to_owned();
        self.read(move |connection| {
            let transaction = connection
                .unchecked_transaction()
                .map_err(|error| backend("starting a read", error))?;
            let served = read_record(&transaction, &projection)?.generation;
            let mut statement = transaction
                .prepare_cached(
                    "SELECT position, stream, event_type, error, attempts, parked_at,
                            retry_requested
                     FROM parked WHERE projection = ?1 AND generation = ?2 ORDER BY position",
                )
                .map_err(|error| backend("reading parked events", error))?;
            let rows = statement
                .query_map(params![projection, to_sql_int(served)], |row| {
                    Ok(ParkedEvent {
                        projection: projection.clone(),
                        generation: served,
                        position: Position(row.get::<_, i64>(0)? as u64),
                        stream: row.get(1)?,
                        event_type: row.get(2)?,
                        error: row.get(3)?,
                        attempts: row.get(4)?,
                        parked_at: Timestamp::from_unix_micros(row.get(5)?),
                        retry_requested: row.get(6)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(|error| backend("reading parked events", error))?;
            Ok(rows)
        })
        .await
    }

    fn checkpoint_watch(&self, projection: &str) -> watch::Receiver<Position> {
        self.checkpoints.subscribe(projection, || {
            self.readers
                .with_connection(|connection| -> Result<Position, ViewError> {
                    let transaction = connection
                        .unchecked_transaction()
                        .map_err(|error| backend("starting a read", error))?;
                    Ok(read_record(&transaction, projection)?.position)
                })
                .unwrap_or(Position::START)
        })
    }

    fn control_watch(&self) -> watch::Receiver<u64> {
        self.controls.subscribe()
    }
}
