//! Reading the catalogue: projections' records, collections' declarations and
//! the tables that serve them.

use std::collections::BTreeMap;

use deadpool_postgres::GenericClient;
use diptych_core::{
    BackendError, CollectionSpec, HandlerKind, Position, ProjectionRecord, RebuildProgress,
    ViewError,
};
use tokio_postgres::Row;

use super::errors::failure as backend;
use super::tables::table_name;

/// A projection's record, with the number of each of its collections (which
/// names their tables).
pub(crate) struct Stored {
    pub record: ProjectionRecord,
    pub ids: BTreeMap<String, i64>,
}

/// A collection's row belongs to projection `p`: registered by it, or by
/// another partition of the same projection (partitions share collections; see
/// `diptych_core::partition`).
macro_rules! same_group {
    () => {
        "(projection = p.name OR regexp_replace(projection, '\\.[0-9]+of[0-9]+$', '') \
         = regexp_replace(p.name, '\\.[0-9]+of[0-9]+$', ''))"
    };
}

/// Every column of a record, in the order `stored_from_row` reads them.
const RECORD_SELECT: &str = concat!(
    "SELECT p.name, p.kind, p.generation, c.position, p.rebuild_generation, r.position,
            p.rebuild_requested, p.paused, p.stalled,
            (SELECT count(*) FROM parked
             WHERE projection = p.name AND generation = p.generation),
            COALESCE((SELECT array_agg(spec ORDER BY name) FROM collections WHERE ",
    same_group!(),
    "), '{}'),
            COALESCE((SELECT array_agg(id ORDER BY name) FROM collections WHERE ",
    same_group!(),
    "), '{}')
     FROM projections p
     JOIN checkpoints c ON c.projection = p.name AND c.generation = p.generation
     LEFT JOIN checkpoints r ON r.projection = p.name AND r.generation = p.rebuild_generation"
);

/// One projection's record; with `lock`, its row stays locked until the
/// transaction ends, so two writers of one projection take turns.
pub(crate) async fn read_stored(
    client: &impl GenericClient,
    projection: &str,
    lock: bool,
) -> Result<Stored, ViewError> {
    if lock {
        // Locked first and read after, in a statement of its own: a locking read
        // that waited for another writer would see that writer's row but still
        // the old checkpoints it joins.
        prepared_query_opt(
            client,
            "SELECT 1 FROM projections WHERE name = $1 FOR UPDATE",
            &[&projection],
        )
        .await
        .map_err(|error| backend("locking a projection", error))?;
    }
    let sql = format!("{RECORD_SELECT} WHERE p.name = $1");
    let row = prepared_query_opt(client, &sql, &[&projection])
        .await
        .map_err(|error| backend("reading a projection", error))?
        .ok_or_else(|| ViewError::UnknownProjection(projection.to_owned()))?;
    stored_from_row(&row)
}

/// Every projection's record, by name.
pub(crate) async fn read_all(
    client: &impl GenericClient,
) -> Result<Vec<ProjectionRecord>, ViewError> {
    let sql = format!("{RECORD_SELECT} ORDER BY p.name");
    let statement = client
        .prepare_cached(&sql)
        .await
        .map_err(|error| backend("listing projections", error))?;
    client
        .query(&statement, &[])
        .await
        .map_err(|error| backend("listing projections", error))?
        .iter()
        .map(|row| stored_from_row(row).map(|stored| stored.record))
        .collect()
}

fn stored_from_row(row: &Row) -> Result<Stored, ViewError> {
    let specs: Vec<serde_json::Value> = row.get(10);
    let ids: Vec<i64> = row.get(11);
    let collections = specs
        .into_iter()
        .map(decode_spec)
        .collect::<Result<Vec<_>, _>>()?;
    let ids = collections
        .iter()
        .map(|spec| spec.name.clone())
        .zip(ids)
        .collect();
    let rebuild: Option<i64> = row.get(4);
    let record = ProjectionRecord {
        name: row.get(0),
        kind: HandlerKind::from_stored(row.get(1)),
        collections,
        generation: row.get::<_, i64>(2) as u64,
        position: Position(row.get::<_, i64>(3) as u64),
        rebuild: rebuild.map(|generation| RebuildProgress {
            generation: generation as u64,
            position: Position(row.get::<_, Option<i64>>(5).unwrap_or(0) as u64),
        }),
        rebuild_requested: row.get(6),
        paused: row.get(7),
        stalled: row.get(8),
        parked: row.get::<_, i64>(9) as u64,
    };
    Ok(Stored { record, ids })
}

/// A served collection: its declaration, number and served generation.
pub(crate) struct Served {
    pub spec: CollectionSpec,
    pub id: i64,
    pub generation: u64,
}

impl Served {
    /// The table a read of the collection reads.
    pub fn table(&self) -> String {
        table_name(self.id, self.generation)
    }
}

/// The served generation of a collection.
pub(crate) async fn served(
    client: &impl GenericClient,
    collection: &str,
) -> Result<Served, ViewError> {
    let row = prepared_query_opt(
        client,
        "SELECT c.spec, c.id, p.generation FROM collections c
         JOIN projections p ON p.name = c.projection WHERE c.name = $1",
        &[&collection],
    )
    .await
    .map_err(|error| backend("reading collections", error))?
    .ok_or_else(|| ViewError::UnknownCollection(collection.to_owned()))?;
    Ok(Served {
        spec: decode_spec(row.get(0))?,
        id: row.get(1),
        generation: row.get::<_, i64>(2) as u64,
    })
}

/// The served table of every collection, by collection name.
pub(crate) async fn served_tables(
    client: &impl GenericClient,
) -> Result<BTreeMap<String, String>, ViewError> {
    let rows = client
        .query(
            "SELECT c.name, c.id, p.generation FROM collections c
             JOIN projections p ON p.name = c.projection",
            &[],
        )
        .await
        .map_err(|error| backend("reading collections", error))?;
    Ok(rows
        .iter()
        .map(|row| {
            let generation: i64 = row.get(2);
            (row.get(0), table_name(row.get(1), generation as u64))
        })
        .collect())
}

pub(crate) async fn prepared_query_opt(
    client: &impl GenericClient,
    sql: &str,
    parameters: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Option<Row>, tokio_postgres::Error> {
    let statement = client.prepare_cached(sql).await?;
    client.query_opt(&statement, parameters).await
}

pub(crate) fn decode_spec(value: serde_json::Value) -> Result<CollectionSpec, ViewError> {
    serde_json::from_value(value).map_err(|error| {
        ViewError::Backend(BackendError::with_source(
            "a corrupt collection declaration in the catalogue",
            error,
        ))
    })
}

/// Converts a position or generation to PostgreSQL's bigint, saturating.
pub(crate) fn to_sql(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
