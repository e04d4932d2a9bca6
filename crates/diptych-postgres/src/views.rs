//! [`PgViews`]: views, checkpoints and parked events in PostgreSQL, shared by
//! every process that runs projections or serves reads.
//!
//! Each collection's generation is a table of documents as `jsonb` (see
//! `tables`); queries compare and order values as the in-memory model does
//! (`query`); a batch is applied in one transaction that locks its
//! projection's row first (`commit`), so two runners of one projection
//! take turns and the second is refused instead of applying events twice.
//! Commits and operators' requests notify the other processes (`watch`).

mod catalog;
mod commit;
mod control;
mod errors;
mod query;
mod register;
mod schema;
mod sql;
mod tables;
mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use diptych_core::backend_kit::group_position;
use diptych_core::backend_kit::split_partition_name;
use diptych_core::{
    Control, Declaration, Document, Page, ParkedEvent, Position, ProjectionRecord, Query,
    RebuildProgress, Timestamp, ViewCommit, ViewError, ViewStore,
};
use tokio::sync::watch as tokio_watch;
use tokio::task::JoinHandle;
use tokio_postgres::types::ToSql;

use self::catalog::{prepared_query_opt, read_all, read_stored, served, served_tables};
use self::control::notify;
use self::errors::{describe, failure as backend, table_gone};
use self::query::run_query;
use self::schema::VIEWS;
use self::sql::{parameters, substitute_tables};
use self::tables::table_name;
use self::watch::{CHECKPOINTS, CONTROLS, Watches, spawn_follower};
use crate::database::{Database, PgConfig, channel};
use crate::error::OpenError;

/// How many times a read starts again when a generation switch dropped the table
/// it was about to read.
const SWITCH_RETRIES: usize = 3;

/// Views, checkpoints and parked events on PostgreSQL.
pub struct PgViews {
    database: Arc<Database>,
    watches: Arc<Watches>,
    /// Collections' numbers, which never change once given.
    ids: Mutex<HashMap<String, i64>>,
    follower: JoinHandle<()>,
}

impl PgViews {
    /// Connects to the views in `config`'s schema, creating or migrating their
    /// tables.
    pub async fn connect(config: &PgConfig) -> Result<Self, OpenError> {
        let database =
            Arc::new(Database::open(config, &VIEWS, &[CHECKPOINTS, CONTROLS], "").await?);
        let watches = Arc::new(Watches::default());
        let follower = spawn_follower(Arc::clone(&database), Arc::clone(&watches));
        Ok(Self {
            database,
            watches,
            ids: Mutex::new(HashMap::new()),
            follower,
        })
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.database.schema
    }

    /// The escape hatch for reads: runs a read-only query over the served
    /// generations and returns each row as a JSON object of its columns. Write
    /// `{collection-name}` where a collection's table belongs; `{orders}` becomes
    /// the table of the served generation of `orders`, whose columns are `key`,
    /// `doc` (`jsonb`) and `words`. The statement must be a query (a `SELECT`,
    /// `VALUES` or `WITH ... SELECT`); it runs in a read-only transaction.
    pub async fn query_sql(
        &self,
        statement: &str,
        parameters_: Vec<serde_json::Value>,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, ViewError> {
        let mut client = self.client("running a query").await?;
        let transaction = client
            .build_transaction()
            .read_only(true)
            .start()
            .await
            .map_err(|error| backend("starting a read", error))?;
        let tables = served_tables(&transaction).await?;
        let statement = substitute_tables(statement.trim().trim_end_matches(';'), &tables)?;
        // Each row as one jsonb object, whatever the types of its columns.
        let wrapped = format!("SELECT to_jsonb(q) FROM ({statement}) AS q");
        let invalid = |error: tokio_postgres::Error| ViewError::InvalidQuery(describe(&error));
        let prepared = transaction.prepare(&wrapped).await.map_err(invalid)?;
        let bound = parameters(&parameters_, prepared.params())?;
        let references: Vec<&(dyn ToSql + Sync)> = bound
            .iter()
            .map(|value| value.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = transaction
            .query(&prepared, &references)
            .await
            .map_err(invalid)?;
        Ok(rows
            .iter()
            .map(|row| match row.get::<_, serde_json::Value>(0) {
                serde_json::Value::Object(object) => object,
                _ => serde_json::Map::new(),
            })
            .collect())
    }

    async fn client(&self, context: &str) -> Result<deadpool_postgres::Client, ViewError> {
        Ok(self.database.connection(context).await?)
    }

    /// A collection's number, from the cache or the catalogue.
    async fn collection_id(
        &self,
        client: &deadpool_postgres::Client,
        collection: &str,
    ) -> Result<i64, ViewError> {
        if let Some(id) = self.lock_ids().get(collection) {
            return Ok(*id);
        }
        let id: i64 = prepared_query_opt(
            client,
            "SELECT id FROM collections WHERE name = $1",
            &[&collection],
        )
        .await
        .map_err(|error| backend("reading collections", error))?
        .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?
        .get(0);
        self.lock_ids().insert(collection.to_owned(), id);
        Ok(id)
    }

    fn lock_ids(&self) -> std::sync::MutexGuard<'_, HashMap<String, i64>> {
        self.ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a transaction on `client`.
    async fn begin<'c>(
        client: &'c mut deadpool_postgres::Client,
        context: &str,
    ) -> Result<deadpool_postgres::Transaction<'c>, ViewError> {
        Ok(client
            .transaction()
            .await
            .map_err(|error| backend(context, error))?)
    }

    /// Records a change to a projection's record, and announces it to every
    /// process's runners.
    async fn finish(
        &self,
        transaction: deadpool_postgres::Transaction<'_>,
        projection: &str,
        context: &str,
    ) -> Result<(), ViewError> {
        notify(
            &transaction,
            &channel(&self.database.schema, CONTROLS),
            projection,
        )
        .await?;
        transaction
            .commit()
            .await
            .map_err(|error| backend(context, error))?;
        Ok(())
    }
}

impl Drop for PgViews {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

#[async_trait]
impl ViewStore for PgViews {
    async fn register(&self, declaration: &Declaration) -> Result<ProjectionRecord, ViewError> {
        declaration.validate()?;
        let context = "registering a projection";
        let mut client = self.client(context).await?;
        let transaction = Self::begin(&mut client, context).await?;
        let record = register::register(&transaction, declaration).await?;
        transaction
            .commit()
            .await
            .map_err(|error| backend(context, error))?;
        Ok(record)
    }

    async fn projections(&self) -> Result<Vec<ProjectionRecord>, ViewError> {
        let client = self.client("listing projections").await?;
        read_all(&client).await
    }

    async fn projection(&self, projection: &str) -> Result<ProjectionRecord, ViewError> {
        let client = self.client("reading a projection").await?;
        Ok(read_stored(&client, projection, false).await?.record)
    }

    async fn owner_of(&self, collection: &str) -> Result<String, ViewError> {
        let client = self.client("reading collections").await?;
        prepared_query_opt(
            &client,
            "SELECT projection FROM collections WHERE name = $1",
            &[&collection],
        )
        .await
        .map_err(|error| backend("reading collections", error))?
        .map(|row| row.get(0))
        .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))
    }

    async fn served_position(&self, collection: &str) -> Result<Position, ViewError> {
        let client = self.client("reading a checkpoint").await?;
        let (owner, position): (String, i64) = prepared_query_opt(
            &client,
            "SELECT p.name, k.position FROM collections c
             JOIN projections p ON p.name = c.projection
             JOIN checkpoints k ON k.projection = p.name AND k.generation = p.generation
             WHERE c.name = $1",
            &[&collection],
        )
        .await
        .map_err(|error| backend("reading a checkpoint", error))?
        .map(|row| (row.get(0), row.get(1)))
        .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
        if split_partition_name(&owner).is_some() {
            return group_position(self, &owner).await;
        }
        Ok(Position(position as u64))
    }

    async fn get(&self, collection: &str, key: &str) -> Result<Option<Document>, ViewError> {
        let client = self.client("reading views").await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let served = served(&client, collection).await?;
            match read_document(&client, collection, &served.table(), key).await {
                // A switch dropped the table since: read the new one.
                Err(ViewError::Backend(error)) if tries < SWITCH_RETRIES && table_gone(&error) => {}
                other => return other,
            }
        }
    }

    async fn get_in(
        &self,
        collection: &str,
        generation: u64,
        key: &str,
    ) -> Result<Option<Document>, ViewError> {
        let client = self.client("reading views").await?;
        let id = self.collection_id(&client, collection).await?;
        match read_document(&client, collection, &table_name(id, generation), key).await {
            // No such generation (never made, or replaced).
            Err(ViewError::Backend(error)) if table_gone(&error) => {
                Err(ViewError::UnknownCollection(collection.to_owned()))
            }
            other => other,
        }
    }

    async fn query(&self, collection: &str, query: &Query) -> Result<Page, ViewError> {
        let client = self.client("querying views").await?;
        let mut tries = 0;
        loop {
            tries += 1;
            let served = served(&client, collection).await?;
            query.validate(&served.spec)?;
            match run_query(&client, &served, query).await {
                // A switch dropped the table since: query the new one.
                Err(ViewError::Backend(error)) if tries < SWITCH_RETRIES && table_gone(&error) => {}
                other => return other,
            }
        }
    }

    async fn commit(&self, commit: ViewCommit) -> Result<(), ViewError> {
        let context = "committing views";
        let mut client = self.client(context).await?;
        let transaction = Self::begin(&mut client, context).await?;
        let channel = channel(&self.database.schema, CHECKPOINTS);
        let served = commit::apply(&transaction, &commit, &channel).await?;
        transaction
            .commit()
            .await
            .map_err(|error| backend(context, error))?;
        if let Some(position) = served {
            self.watches.committed(&commit.projection, position);
        }
        Ok(())
    }

    async fn begin_rebuild(&self, projection: &str) -> Result<RebuildProgress, ViewError> {
        let context = "starting a rebuild";
        let mut client = self.client(context).await?;
        let transaction = Self::begin(&mut client, context).await?;
        let rebuild = register::begin_rebuild(&transaction, projection).await?;
        self.finish(transaction, projection, context).await?;
        Ok(rebuild)
    }

    async fn control(&self, projection: &str, request: Control) -> Result<(), ViewError> {
        let context = "recording an operator's request";
        let mut client = self.client(context).await?;
        let transaction = Self::begin(&mut client, context).await?;
        control::control(&transaction, projection, &request).await?;
        self.finish(transaction, projection, context).await?;
        // Runners in this process react at once, without the round trip.
        self.watches.control();
        Ok(())
    }

    async fn set_stalled(&self, projection: &str, error: Option<String>) -> Result<(), ViewError> {
        let context = "recording a stalled projection";
        let mut client = self.client(context).await?;
        let transaction = Self::begin(&mut client, context).await?;
        control::set_stalled(&transaction, projection, error.as_deref()).await?;
        self.finish(transaction, projection, context).await
    }

    async fn received(
        &self,
        projection: &str,
        event_ids: &[uuid::Uuid],
    ) -> Result<Vec<uuid::Uuid>, ViewError> {
        let client = self.client("reading received events").await?;
        let rows = client
            .query(
                "SELECT event_id FROM received WHERE projection = $1 AND event_id = ANY($2)",
                &[&projection, &event_ids],
            )
            .await
            .map_err(|error| backend("reading received events", error))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    async fn parked(&self, projection: &str) -> Result<Vec<ParkedEvent>, ViewError> {
        let client = self.client("reading parked events").await?;
        // One statement, so the served generation and its events agree.
        let rows = client
            .query(
                "SELECT p.generation, k.position, k.stream, k.event_type, k.error, k.attempts,
                        k.parked_at, k.retry_requested
                 FROM projections p
                 LEFT JOIN parked k ON k.projection = p.name AND k.generation = p.generation
                 WHERE p.name = $1 ORDER BY k.position",
                &[&projection],
            )
            .await
            .map_err(|error| backend("reading parked events", error))?;
        if rows.is_empty() {
            return Err(ViewError::UnknownProjection(projection.to_owned()));
        }
        Ok(rows
            .iter()
            .filter_map(|row| {
                let position: Option<i64> = row.get(1);
                Some(ParkedEvent {
                    projection: projection.to_owned(),
                    generation: row.get::<_, i64>(0) as u64,
                    position: Position(position? as u64),
                    stream: row.get(2),
                    event_type: row.get(3),
                    error: row.get(4),
                    attempts: u32::try_from(row.get::<_, i64>(5)).unwrap_or(u32::MAX),
                    parked_at: Timestamp::from_unix_micros(row.get(6)),
                    retry_requested: row.get(7),
                })
            })
            .collect())
    }

    fn checkpoint_watch(&self, projection: &str) -> tokio_watch::Receiver<Position> {
        self.watches.checkpoint(projection)
    }

    fn control_watch(&self) -> tokio_watch::Receiver<u64> {
        self.watches.controls()
    }
}

async fn read_document(
    client: &deadpool_postgres::Client,
    collection: &str,
    table: &str,
    key: &str,
) -> Result<Option<Document>, ViewError> {
    prepared_query_opt(
        client,
        &format!("SELECT doc FROM {table} WHERE key = $1"),
        &[&key],
    )
    .await
    .map(|row| row.map(|row| row.get(0)))
    .map_err(|error| backend(format!("reading `{key}` in `{collection}`"), error).into())
}
