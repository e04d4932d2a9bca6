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

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use diptych_core::partition::{group_members, split_partition_name};
use diptych_core::view::group_position;
use diptych_core::view::{
    CheckpointWatches, check_redeclaration, field_value, no_parked_event, refuse_process_manager,
    same_owner, substitute_tables, verify_commit_against, words,
};
use diptych_core::{
    BackendError, Change, CollectionSpec, Comparison, Control, Declaration, Document, HandlerKind,
    Order, Page, ParkedEvent, Position, ProjectionRecord, Query, RebuildProgress, Timestamp,
    ViewCommit, ViewError, ViewStore,
};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Transaction, params, params_from_iter};
use tokio::sync::watch;

use crate::error::{OpenError, backend};
use crate::pool::{self, ReaderPool};
use crate::rows::to_sql_int;
use crate::schema;

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

/// The table holding a collection's generation.
fn table_name(collection: &str, generation: u64) -> String {
    format!("\"doc:{collection}:{generation}\"")
}

/// The FTS5 table mirroring a collection's text fields.
fn text_table_name(collection: &str, generation: u64) -> String {
    format!("\"fts:{collection}:{generation}\"")
}

/// The expression an index on `field` is built on; queries use the same text so
/// SQLite uses the index. Fields are validated to letters, digits, `_` and `.`.
fn field_expression(field: &str) -> String {
    format!("json_extract(doc, '$.{field}')")
}

fn create_tables(
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

fn drop_tables(
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

fn read_record(connection: &Connection, projection: &str) -> Result<ProjectionRecord, ViewError> {
    let row = connection
        .prepare_cached(
            "SELECT p.kind, p.generation, c.position, p.rebuild_generation, r.position,
                    p.rebuild_requested, p.paused, p.stalled,
                    (SELECT count(*) FROM parked
                     WHERE projection = p.name AND generation = p.generation)
             FROM projections p
             JOIN checkpoints c ON c.projection = p.name AND c.generation = p.generation
             LEFT JOIN checkpoints r ON r.projection = p.name AND r.generation = p.rebuild_generation
             WHERE p.name = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([projection], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, Option<i64>>(3)?,
                        row.get::<_, Option<i64>>(4)?,
                        row.get::<_, bool>(5)?,
                        row.get::<_, bool>(6)?,
                        row.get::<_, Option<String>>(7)?,
                        row.get::<_, i64>(8)?,
                    ))
                })
                .optional()
        })
        .map_err(|error| backend("reading a projection", error))?
        .ok_or_else(|| ViewError::UnknownProjection(projection.to_owned()))?;
    let (kind, generation, position, rebuild, rebuild_position, requested, paused, stalled, parked) =
        row;
    let collections = connection
        // A partition's collections are registered under whichever partition
        // came first: look under every member of its group.
        .prepare_cached(
            "SELECT spec FROM collections WHERE projection IN (SELECT value FROM json_each(?1)) \
             ORDER BY name",
        )
        .and_then(|mut statement| {
            let members = serde_json::to_string(&group_members(projection)).unwrap_or_default();
            statement
                .query_map([members], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|error| backend("reading collections", error))?
        .iter()
        .map(|text| decode_spec(text))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ProjectionRecord {
        name: projection.to_owned(),
        kind: HandlerKind::from_stored(&kind),
        collections,
        generation: generation as u64,
        position: Position(position as u64),
        rebuild: rebuild.map(|generation| RebuildProgress {
            generation: generation as u64,
            position: Position(rebuild_position.unwrap_or(0) as u64),
        }),
        rebuild_requested: requested,
        paused,
        stalled,
        parked: parked as u64,
    })
}

fn decode_spec(text: &str) -> Result<CollectionSpec, ViewError> {
    serde_json::from_str(text).map_err(|error| {
        ViewError::Backend(BackendError::with_source(
            "a corrupt collection declaration",
            error,
        ))
    })
}

/// A collection's declaration and its served generation.
fn served_collection(
    connection: &Connection,
    collection: &str,
) -> Result<(CollectionSpec, u64), ViewError> {
    let (spec, generation) = connection
        .prepare_cached(
            "SELECT c.spec, p.generation FROM collections c
             JOIN projections p ON p.name = c.projection WHERE c.name = ?1",
        )
        .and_then(|mut statement| {
            statement
                .query_row([collection], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()
        })
        .map_err(|error| backend("reading collections", error))?
        .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
    Ok((decode_spec(&spec)?, generation as u64))
}

/// Every collection's served table, by collection name.
fn served_tables(connection: &Connection) -> Result<BTreeMap<String, String>, ViewError> {
    connection
        .prepare_cached(
            "SELECT c.name, p.generation FROM collections c
             JOIN projections p ON p.name = c.projection",
        )
        .and_then(|mut statement| {
            statement
                .query_map([], |row| {
                    let name: String = row.get(0)?;
                    let generation: i64 = row.get(1)?;
                    Ok((name.clone(), table_name(&name, generation as u64)))
                })?
                .collect()
        })
        .map_err(|error| backend("reading collections", error).into())
}

fn read_document(
    connection: &Connection,
    collection: &str,
    generation: u64,
    key: &str,
) -> Result<Option<Document>, ViewError> {
    let sql = format!(
        "SELECT doc FROM {} WHERE key = ?1",
        table_name(collection, generation)
    );
    let text: Option<String> = connection
        .prepare_cached(&sql)
        .map_err(|_| ViewError::UnknownCollection(collection.to_owned()))?
        .query_row([key], |row| row.get(0))
        .optional()
        .map_err(|error| backend(format!("reading `{key}` in `{collection}`"), error))?;
    text.map(|text| decode_document(collection, key, &text))
        .transpose()
}

fn decode_document(collection: &str, key: &str, text: &str) -> Result<Document, ViewError> {
    serde_json::from_str(text).map_err(|error| {
        ViewError::Backend(BackendError::with_source(
            format!("document `{key}` in `{collection}` is corrupt"),
            error,
        ))
    })
}

/// Applies a batch; returns the served generation's new checkpoint, if it moved.
fn apply_commit(
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
struct CollectionWriter<'a> {
    spec: &'a CollectionSpec,
    upsert: String,
    delete: String,
    /// For collections with text fields: the FTS statements.
    text: Option<TextStatements>,
}

struct TextStatements {
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

/// Runs a validated query as one SQL statement.
fn run_query(
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
fn to_sql_value(value: &serde_json::Value) -> SqlValue {
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

fn from_sql_value(value: SqlValue) -> serde_json::Value {
    match value {
        SqlValue::Null => serde_json::Value::Null,
        SqlValue::Integer(integer) => integer.into(),
        SqlValue::Real(real) => serde_json::Number::from_f64(real)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        SqlValue::Text(text) => text.into(),
        SqlValue::Blob(bytes) => bytes.into_iter().map(serde_json::Value::from).collect(),
    }
}

/// Records the batch's received events; one already recorded refuses the batch.
fn record_received(transaction: &Transaction<'_>, commit: &ViewCommit) -> Result<(), ViewError> {
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
